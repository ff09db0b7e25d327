"""History: what the size of the finished history costs. The table grows to each of
SIZES finished rows (default 0, 1, 5 and 20 million: 96 % sent, 3 % failed, 1 %
cancelled, created over the last 20 days, then VACUUM ANALYZE); at each size one
replica (MESSAGE_RETENTION=0, so nothing is removed under the measurement) answers
REQUESTS sequential requests to each of the console's reads, timed at the client
(p50/p95 ms): the first page of the list, a page of one status, a rare status, a second
page, and the stats; then it drains N (100,000) fresh messages (BATCH_SIZE 500, interval 0,
SEND_CONCURRENCY 32, provider latency 0), timed from the first claim to the last send,
each message checked to reach the provider once.

Targets: list and stats p95 under 50 ms at every size; the drain at every size within
10 % of the empty table's (ratio >= 0.90).

    ./scripts/bench/run.sh history                          # about 17 minutes
    SIZES=0,1000000 N=10000 ./scripts/bench/run.sh history   # a quick look

Settings (environment): SIZES (0,1000000,5000000,20000000), N (100000), REQUESTS (100),
SQL_AFTER_GROW (statements run once the history is grown, for experiments),
BIN, KEEP_BENCH_DIR=1 keeps the logs.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))
from harness import env, env_int, http, http_json, note, psql, start_mock, start_replicas, stop, wait_until  # noqa: E402
from measure import table, verdict, write_result  # noqa: E402

API_TARGET_MS = 50.0
DRAIN_RATIO_TARGET = 0.90
CHUNK = 1_000_000


def grow_history(rows: int) -> float:
    """Adds finished rows until the table holds `rows` finished ones; returns seconds."""
    t0 = time.time()
    have = int(psql("SELECT count(*) FROM messages WHERE status <> 'pending'"))
    while have < rows:
        n = min(CHUNK, rows - have)
        # Spread over 20 days; ids still grow with created_at, as in a real table.
        psql(f"""
            INSERT INTO messages (phone_number, content, status, attempts, created_at,
                                  next_attempt_at, claimed_at, sent_at, provider_message_id)
            SELECT '+90555' || lpad((s % 10000000)::text, 7, '0'),
                   'History message ' || s,
                   CASE WHEN s % 100 < 96 THEN 'sent' WHEN s % 100 < 99 THEN 'failed' ELSE 'cancelled' END,
                   1, t, t, t, CASE WHEN s % 100 < 96 THEN t END,
                   CASE WHEN s % 100 < 96 THEN 'h-' || s END
            FROM (SELECT s, now() - interval '20 days' + (s - {have}) * (interval '20 days' / {rows})
                  AS t FROM generate_series({have + 1}, {have + n}) AS s) AS g
            ORDER BY s""", timeout=None)
        have += n
        note(f"history: {have:,} finished rows")
    psql("VACUUM ANALYZE messages", timeout=None)
    psql("CHECKPOINT", timeout=None)
    return time.time() - t0


def timed(url: str, requests: int) -> tuple[float, float]:
    """p50 and p95 in ms of `requests` sequential GETs (after 5 unmeasured ones)."""
    for _ in range(5):
        http(url, timeout=30)
    samples = []
    for _ in range(requests):
        t0 = time.perf_counter()
        code, _ = http(url, timeout=30)
        samples.append((time.perf_counter() - t0) * 1000)
        if code != 200:
            raise RuntimeError(f"{url} answered {code}")
    samples.sort()
    return statistics.median(samples), samples[max(0, int(len(samples) * 0.95) - 1)]


def drain(replica_env: dict[str, str], n: int) -> dict:
    """N fresh messages drained by one replica; rate and exactly-once."""
    mock, mock_url = start_mock(0)
    first_id = int(psql("SELECT coalesce(max(id), 0) FROM messages")) + 1
    psql(f"""INSERT INTO messages (phone_number, content)
             SELECT '+90556' || lpad(s::text, 7, '0'), 'Drain ' || s
             FROM generate_series(1, {n}) AS s ORDER BY s""")
    psql("ANALYZE messages")
    replicas = start_replicas(1, {**replica_env, "SMS_API_URL": mock_url + "/send"})
    wait_until(lambda: psql(f"SELECT count(*) FROM messages WHERE id >= {first_id} AND status <> 'sent'") == "0",
               600, 0.5, f"{n} messages to drain")
    elapsed = float(psql(f"SELECT extract(epoch FROM max(sent_at) - min(claimed_at)) FROM messages "
                         f"WHERE id >= {first_id}"))
    stats = http_json(mock_url + "/stats")
    once = stats["requests"] == n and stats["unique_keys"] == n and stats["duplicates"] == 0
    for r in replicas:
        r.stop()
    stop(mock)
    return {"rate": n / elapsed, "elapsed_s": elapsed, "exactly_once": once}


def main() -> int:
    sizes = [int(s) for s in env("SIZES", "0,1000000,5000000,20000000").split(",")]
    n, requests = env_int("N", 100000), env_int("REQUESTS", 100)
    replica_env = {"BATCH_SIZE": "500", "PROCESSING_INTERVAL": "0s", "SEND_CONCURRENCY": "32",
                   "MESSAGE_RETENTION": "0", "AUTO_START": "true"}
    reads = [("list, first page", "/api/messages?limit=50"),
             ("list, status sent", "/api/messages?status=sent&limit=50"),
             ("list, status failed", "/api/messages?status=failed&limit=50"),
             ("list, second page", None),
             ("stats", "/api/messages/stats")]
    results = []
    base_rate = None
    for size in sizes:
        grown = grow_history(size)
        if env("SQL_AFTER_GROW", ""):
            # For experiments: a schema change to compare (e.g. an index dropped).
            psql(env("SQL_AFTER_GROW"), timeout=None)
        note(f"{size:,} finished rows ready ({grown:.0f} s); measuring the reads")
        mock, mock_url = start_mock(0)
        [replica] = start_replicas(1, {**replica_env, "SMS_API_URL": mock_url + "/send"})
        api = {}
        for label, path in reads:
            if path is None:
                first = http_json(replica.url + "/api/messages?limit=50")
                path = f"/api/messages?limit=50&cursor={first['next_cursor']}" if first["next_cursor"] else \
                    "/api/messages?limit=50"
            api[label] = timed(replica.url + path, requests)
        replica.stop()
        stop(mock)
        note(f"{size:,} rows: draining {n} messages")
        d = drain(replica_env, n)
        if base_rate is None:
            base_rate = d["rate"]
        results.append({"size": size, "api": api, **d, "ratio": d["rate"] / base_rate})
        psql("DELETE FROM messages WHERE content LIKE 'Drain %'")
        psql("VACUUM ANALYZE messages", timeout=None)

    rows, json_rows = [], []
    for r in results:
        worst = max(p95 for _, p95 in r["api"].values())
        ok_api = worst < API_TARGET_MS
        ok_drain = r["ratio"] >= DRAIN_RATIO_TARGET and r["exactly_once"]
        rows.append([f"{r['size']:,}"] + [f"{p50:.1f}/{p95:.1f}" for p50, p95 in r["api"].values()]
                    + [f"{r['rate']:.0f}", f"{r['ratio']:.2f}", "yes" if r["exactly_once"] else "NO",
                       verdict(ok_api and ok_drain)])
        json_rows.append({"figure": f"history {r['size']:,} finished rows",
                          "n": n,
                          "value": f"reads p95 <= {worst:.1f} ms; drain {r['rate']:.0f} msg/s "
                                   f"= {r['ratio']:.2f} of empty",
                          "target": f"p95 < {API_TARGET_MS:.0f} ms, drain >= {DRAIN_RATIO_TARGET:.2f}",
                          "result": verdict(ok_api and ok_drain)})
    print()
    print(table(["finished rows"] + [f"{label} p50/p95 ms" for label, _ in reads]
                + ["drain msg/s", "of empty", "once", "result"], rows,
                f"History: reads ({requests} each, sequential, at the client) and a drain of {n} "
                f"(BATCH_SIZE 500, SEND_CONCURRENCY 32, latency 0) per table size; "
                f"{os.cpu_count()} cores shared by everything"))
    write_result("history", json_rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
