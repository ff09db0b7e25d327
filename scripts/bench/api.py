"""API: wrk against one replica (the leader, idle, with SENT = 1000 sent messages in the
table and their delivery-cache entries in Redis): /health/live, /health, /metrics and
/api/messages/sent?limit=100, each after a 2 s warm-up, for DURATION (10s) with
THREADS (2) threads and CONNECTIONS (32) connections; then the mock provider's
/health, the same HTTP stack answering a constant, as the machine's own reference.
Reports requests/second and the p50/p90/p99 of wrk's --latency distribution, non-2xx
answers, socket errors and the server's CPU time. wrk, the replica, PostgreSQL and
Redis share this machine's cores, so the rates are what the whole box does.
Target: /health/live p99 <= 5 ms at the rate wrk reaches.

    ./scripts/bench/run.sh api                   # about 1 minute
    DURATION=3s ./scripts/bench/run.sh api

Settings (environment): SENT (1000), DURATION (10s), THREADS (2), CONNECTIONS (32),
BIN, KEEP_BENCH_DIR=1 keeps the logs (logs/wrk.log has wrk's full output).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))
from harness import WORK, env, env_int, http, psql, run_child, start_mock, start_replicas, stop, wait_until  # noqa: E402
from measure import (  # noqa: E402
    CLK_TCK,
    cpu_ticks,
    fmt_s,
    postgres_ticks,
    redis_ticks,
    seed,
    table,
    verdict,
    write_result,
)


def wrk_latency_ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        raise ValueError(f"wrk latency {text!r}")
    return float(m.group(1)) * {"us": 0.001, "ms": 1, "s": 1000, "m": 60000}[m.group(2)]


def parse_wrk(text: str) -> dict:
    out = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))}
    for pct in ("50", "75", "90", "99"):
        m = re.search(rf"^\s+{pct}%\s+(\S+)$", text, re.M)
        out[f"p{pct}"] = wrk_latency_ms(m.group(1)) if m else None
    m = re.search(r"(\d+) requests in", text)
    out["requests"] = int(m.group(1)) if m else 0
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    out["non2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    out["socket_errors"] = sum(int(x) for x in m.groups()) if m else 0
    return out


def main() -> int:
    sent = env_int("SENT", 1000)
    duration, threads, conns = env("DURATION", "10s"), env("THREADS", "2"), env("CONNECTIONS", "32")
    mock, mock_url = start_mock(0)
    os.environ["SMS_API_URL"] = mock_url + "/send"
    seed(sent)
    replicas = start_replicas(1, {"BATCH_SIZE": str(sent), "SEND_CONCURRENCY": "32"})
    r = replicas[0]
    wait_until(lambda: psql("SELECT count(*) FROM messages WHERE status = 'sent'") == str(sent), 120, 0.2,
               f"{sent} sent messages")
    # The last row is the machine's own reference: the mock provider's GET /health, the
    # same warp/hyper stack answering a constant, measured with the same wrk settings.
    endpoints = [(r, p) for p in ("/health/live", "/health", "/metrics", "/api/messages/sent?limit=100")]
    endpoints.append((None, "/health"))
    rows, json_rows = [], []
    for replica, path in endpoints:
        label = path if replica else f"reference: mock-provider {path}"
        url = (replica.url if replica else mock_url) + path
        pid = replica.pid if replica else mock.pid
        code, body = http(url)
        if code != 200:
            raise RuntimeError(f"{url} answered {code}")
        run_child(["wrk", "-t", threads, "-c", conns, "-d", "2s", url])  # warm-up
        t_cpu0, pg0, redis0 = cpu_ticks(pid), postgres_ticks(), redis_ticks()
        done = run_child(["wrk", "-t", threads, "-c", conns, "-d", duration, "--latency", url])
        if done.returncode != 0:
            raise RuntimeError(f"wrk failed: {done.stderr}")
        out = done.stdout
        cpu_s = (cpu_ticks(pid) - t_cpu0) / CLK_TCK
        pg_s, redis_s = (postgres_ticks() - pg0) / CLK_TCK, (redis_ticks() - redis0) / CLK_TCK
        with open(WORK / "logs" / "wrk.log", "a") as f:
            f.write(f"### {label}\n{out}\n")
        w = parse_wrk(out)
        target, ok = "-", None
        if replica and path == "/health/live":
            target, ok = "p99 <= 5 ms", w["p99"] is not None and w["p99"] <= 5
        if w["non2xx"] or w["socket_errors"]:
            ok = False
        rows.append([label, f"{w['rps']:.0f}", fmt_s(w["p50"], 2), fmt_s(w["p90"], 2), fmt_s(w["p99"], 2),
                     w["requests"], w["non2xx"], w["socket_errors"], f"{len(body)}",
                     f"{cpu_s:.1f}/{pg_s:.1f}/{redis_s:.1f}", target, verdict(ok)])
        json_rows.append({"figure": f"API {label}", "n": w["requests"],
                          "value": f"{w['rps']:.0f} req/s, p99 {fmt_s(w['p99'], 2)} ms",
                          "target": target, "result": verdict(ok)})
    for x in replicas:
        x.stop()
    stop(mock)
    print()
    print(table(["endpoint", "req/s", "p50 ms", "p90 ms", "p99 ms", "requests", "non-2xx", "socket errors",
                 "body bytes", "CPU s server/pg/redis", "target", "result"], rows,
                f"API: wrk -t{threads} -c{conns} -d{duration} --latency against one replica (the leader, idle) "
                f"with {sent} sent messages; wrk runs on the same {os.cpu_count()} cores"))
    write_result("api", json_rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
