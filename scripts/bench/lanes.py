"""Lanes: scale-out. Does a cluster drain LANES lanes about LANES times as fast as one,
when each lane is bound by its provider (latency x send concurrency) and the lanes'
leaders are spread over the replicas (docs/design.md, "Lanes", "Spread", "Rate per
lane")?

Set-up: REPLICAS (3) replicas of the release build, DISPATCH_CONFIG files written here
(every lane: batch_size LANE_BATCH_SIZE = 10000, interval LANE_INTERVAL = "0", which
is "back to back", no rate limit; send_concurrency LANE_CONCURRENCY = 32), the mock
provider answering after LATENCY_MS (50) ms, so one lane is bound to
32 x 1000 / 50 = 640 messages/s by its provider; DB_POOL_SIZE and everything else at
the defaults. MOCKS=shared (the default) sends every lane to one mock provider;
MOCKS=lane gives each lane a mock provider of its own (the mock is one process: this
tells whether it is the bound).

  Phase A: one lane, `default`, alone; N (6000) messages.
  Phase B: LANES (6) lanes, `default` and lane-1 ... lane-5, on the same number of
           replicas; N messages in each lane (LANES x N in all).

Each phase gets a fresh database (CREATE DATABASE, `migrate`), an empty Redis and its
own mock provider(s), then starts the replicas and waits until GET /api/lanes shows
every lane with a leader, no replica leading more than ceil(lanes / replicas), and the
same leaders and epochs for SPREAD_STABLE (5) seconds. Then it stops dispatching
(POST /api/messaging/stop), inserts the messages in one INSERT (the lanes interleaved,
a different phone number each), VACUUM ANALYZE, CHECKPOINT, and starts again on every
replica at once (POST /api/messaging/start wakes that replica's lanes, so no lane waits
for its idle poll). Throughput = (messages - 1) / (last - first delivery at the
provider), from the mock's first_seen of each key: the aggregate over all lanes, and
each lane's own. Also printed: each lane's first delivery after the phase's first (the
stagger), the rate in the window where every lane was sending, which replica led
which lane (GET /api/lanes before the load and after the drain; who claimed the rows),
the CPU seconds of each replica, the mock(s), PostgreSQL and Redis over the drain, how
busy the whole machine was (/proc/stat), and each replica's pool sessions sampled
from pg_stat_activity every 0.5 s (a pool busy in every session means claims and
results wait for connections).

Checks: every message `sent`, the provider(s) saw exactly LANES x N requests with as
many unique Idempotency-Keys and no duplicate, the key set is the database's, and
dispatcher_messages_sent_total{lane} summed over the replicas is N per lane.
Target: aggregate B / aggregate A >= RATIO_TARGET (5).

    ./scripts/bench/run.sh lanes                          # about 2 minutes
    MOCKS=lane ./scripts/bench/run.sh lanes               # one mock provider per lane
    N=2000 ./scripts/bench/run.sh lanes                   # quick

Settings (environment): N (6000), LANES (6), REPLICAS (3), LATENCY_MS (50),
LANE_CONCURRENCY (32), LANE_BATCH_SIZE (10000), LANE_INTERVAL (0), MOCKS (shared or
lane), SPREAD_STABLE (5 s), RATIO_TARGET (5), DB_POOL_SIZE (passed to the replicas;
their default is 8), BIN, KEEP_BENCH_DIR=1 keeps the logs.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))
from harness import (  # noqa: E402
    BIN,
    WORK,
    env,
    env_float,
    env_int,
    http,
    http_json,
    note,
    psql,
    redis_cli,
    start_mock,
    start_replicas,
    stop,
    wait_until,
)
from measure import (  # noqa: E402
    CLK_TCK,
    PoolSampler,
    cpu_ticks,
    fmt_s,
    lane_names,
    lanes_view,
    machine_ticks,
    postgres_ticks,
    redis_ticks,
    table,
    verdict,
    wait_spread,
    write_lanes_config,
    write_result,
)


def sent_by_lane(replicas: list) -> dict[str, float]:
    """dispatcher_messages_sent_total per lane, summed over the replicas' /metrics."""
    out: dict[str, float] = {}
    for r in replicas:
        code, body = http(r.url + "/metrics", timeout=5)
        if code != 200:
            continue
        for line in body.decode().splitlines():
            if line.startswith("dispatcher_messages_sent_total{"):
                lane = re.search(r'lane="([^"]*)"', line)
                if lane:
                    out[lane.group(1)] = out.get(lane.group(1), 0) + float(line.rsplit(" ", 1)[1])
    return out


def run_phase(tag: str, lanes: list[str], n: int, replicas_count: int) -> dict:
    """One phase: fresh database, mock(s), replicas, spread, load, drain, checks."""
    latency = env_int("LATENCY_MS", 50)
    concurrency = env_int("LANE_CONCURRENCY", 32)
    batch = env_int("LANE_BATCH_SIZE", 10_000)
    interval = env("LANE_INTERVAL", "0")
    per_lane_mocks = env("MOCKS", "shared") == "lane"
    total = n * len(lanes)

    db = f"lanes_{tag.lower()}"
    psql(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
    psql(f"CREATE DATABASE {db}")
    url = f"postgres://postgres@127.0.0.1:{env('PG_PORT')}/{db}"
    with open(WORK / "logs" / f"migrate-{db}.log", "ab") as log:
        subprocess.run([BIN, "migrate"], env={**os.environ, "DATABASE_URL": url}, check=True,
                       stdout=log, stderr=log)
    redis_cli("FLUSHDB")

    mocks: dict[str, tuple] = {}  # provider name -> (process, base URL)
    if per_lane_mocks:
        for lane in lanes:
            mocks[f"mock-{lane}"] = start_mock(latency)
        route = {lane: f"mock-{lane}" for lane in lanes}
    else:
        mocks["mock"] = start_mock(latency)
        route = {lane: "mock" for lane in lanes}
    config = write_lanes_config(WORK / f"dispatch-{tag}.toml",
                                {name: base + "/send" for name, (_, base) in mocks.items()},
                                route, batch, interval, concurrency)
    extra = {"DATABASE_URL": url, "DISPATCH_CONFIG": str(config), "SMS_API_TOKEN": "bench"}
    note(f"phase {tag}: {len(lanes)} lane(s) on {replicas_count} replicas, {n} messages per lane, "
         f"latency {latency} ms, send_concurrency {concurrency}, batch_size {batch}, interval {interval}, "
         f"{'a mock per lane' if per_lane_mocks else 'one mock'}")
    replicas = start_replicas(replicas_count, extra)
    stable = env_float("SPREAD_STABLE", 5)
    spread = wait_spread(replicas, lanes, stable, 120)
    note("  leaders: " + ", ".join(f"{lane} {spread[lane]['leader']} (epoch {spread[lane]['epoch']})"
                                   for lane in lanes))

    code, body = http(replicas[0].url + "/api/messaging/stop", "POST", timeout=15)
    if code != 200:
        raise RuntimeError(f"POST /api/messaging/stop: {code} {body!r}")
    names = ",".join(f"'{lane}'" for lane in lanes)
    psql("INSERT INTO messages (phone_number, content, lane) "
         "SELECT '+90555' || lpad(s::text, 7, '0'), 'Lane benchmark message ' || s, "
         f"(ARRAY[{names}])[1 + s % {len(lanes)}] FROM generate_series(1, {total}) AS s", db)
    psql("VACUUM ANALYZE messages", db)
    psql("CHECKPOINT", db)
    before = lanes_view(replicas)
    moved = [lane for lane in lanes if before[lane]["leader"] != spread[lane]["leader"]]
    if moved:
        note(f"  WARNING: leaders moved while the messages were loaded: {moved}")

    procs = {r.id: r.pid for r in replicas}
    mock_pids = {name: proc.pid for name, (proc, _) in mocks.items()}

    def ticks() -> dict:
        return {"replicas": {rid: cpu_ticks(pid) for rid, pid in procs.items()},
                "mocks": {name: cpu_ticks(pid) for name, pid in mock_pids.items()},
                "postgres": postgres_ticks(), "redis": redis_ticks(), "machine": machine_ticks()}

    ticks0 = ticks()
    t0 = time.time()
    starts = [threading.Thread(target=http, args=(r.url + "/api/messaging/start",),
                               kwargs={"method": "POST", "timeout": 10}) for r in replicas]
    for t in starts:
        t.start()
    for t in starts:
        t.join()

    def delivered() -> int:
        return sum(int(http_json(base + "/stats")["unique_keys"]) for _, base in mocks.values())
    bound = concurrency * 1000 / latency if latency else None
    timeout = max(120.0, 5 * total / (len(lanes) * bound)) if bound else 600.0
    with PoolSampler(replicas, db) as sampler:
        wait_until(lambda: delivered() >= total, timeout, 0.25, f"{total} deliveries")
        t1 = time.time()
    wait_until(lambda: psql("SELECT count(*) FROM messages WHERE status IN ('pending', 'sending')", db) == "0",
               60, 0.2, "the queue to settle")
    time.sleep(0.3)
    ticks1 = ticks()
    after = lanes_view(replicas)
    metrics_sent = sent_by_lane(replicas)

    # What arrived, per lane.
    lane_of_key = dict(line.split("|") for line in psql(
        "SELECT coalesce(delivery_key::text, id::text) || '|' || lane FROM messages", db).splitlines())
    deliveries, stats = [], {"requests": 0, "accepted": 0, "unique_keys": 0, "duplicates": 0}
    wrong_provider = 0
    for name, (_, base) in mocks.items():
        for d in http_json(base + "/deliveries", timeout=60):
            lane = lane_of_key.get(d["key"])
            if per_lane_mocks and lane is not None and route[lane] != name:
                wrong_provider += 1
            deliveries.append((d["first_seen_us"] / 1e6, lane, d["key"], d["times_seen"]))
        s = http_json(base + "/stats")
        for k in stats:
            stats[k] += int(s[k])
    counts = dict(line.split("|") for line in psql(
        "SELECT status || '|' || count(*) FROM messages GROUP BY status", db).splitlines())
    claimed = {}
    for line in psql("SELECT lane || '|' || coalesce(claimed_by, '?') || '|' || count(*) FROM messages "
                     "GROUP BY lane, claimed_by ORDER BY lane, claimed_by", db).splitlines():
        lane, by, k = line.split("|")
        claimed.setdefault(lane, {})[by] = int(k)

    times = sorted(t for t, *_ in deliveries)
    first, last = times[0], times[-1]
    per_lane = {}
    for lane in lanes:
        ts = sorted(t for t, ln, *_ in deliveries if ln == lane)
        per_lane[lane] = {
            "n": len(ts), "first": ts[0] - first, "last": ts[-1] - first, "span": ts[-1] - ts[0],
            "rate": (len(ts) - 1) / (ts[-1] - ts[0]) if len(ts) > 1 and ts[-1] > ts[0] else None,
            "leader": before[lane]["leader"], "epoch": before[lane]["epoch"],
            "leader_after": after[lane]["leader"], "epoch_after": after[lane]["epoch"],
            "assigned_to": before[lane]["assigned_to"], "claimed_by": claimed.get(lane, {}),
            "metrics_sent": metrics_sent.get(lane, 0),
        }
    common_from = max(p["first"] for p in per_lane.values()) + first
    common_to = min(p["last"] for p in per_lane.values()) + first
    in_common = sum(1 for t in times if common_from <= t <= common_to)
    common_rate = (in_common - 1) / (common_to - common_from) if common_to > common_from and in_common > 1 else None
    span = last - first

    ok_db = counts == {"sent": str(total)}
    ok_mock = (stats["requests"] == total and stats["accepted"] == total and stats["unique_keys"] == total
               and stats["duplicates"] == 0 and all(d[3] == 1 for d in deliveries))
    ok_keys = sorted(d[2] for d in deliveries) == sorted(lane_of_key)
    ok_metrics = all(abs(metrics_sent.get(lane, 0) - n) < 0.5 for lane in lanes)

    def cpu(a, b) -> float:
        return (b - a) / CLK_TCK
    busy = ticks1["machine"][0] - ticks0["machine"][0]
    all_ticks = ticks1["machine"][1] - ticks0["machine"][1]
    result = {
        "tag": tag, "lanes": len(lanes), "n_per_lane": n, "messages": total, "replicas": replicas_count,
        "latency_ms": latency, "concurrency": concurrency, "batch_size": batch, "interval": interval,
        "mocks": len(mocks), "pool_size": int(os.environ.get("DB_POOL_SIZE") or 8),
        "span_s": span, "rate": (total - 1) / span if span > 0 else None, "common_rate": common_rate,
        "common_window_s": common_to - common_from, "bound": bound * len(lanes) if bound else None,
        "start_to_first_s": first - t0, "start_to_all_delivered_s": t1 - t0,
        "per_lane": per_lane,
        "cpu": {"replicas": {rid: cpu(ticks0["replicas"][rid], ticks1["replicas"][rid]) for rid in procs},
                "mocks": {m: cpu(ticks0["mocks"][m], ticks1["mocks"][m]) for m in mock_pids},
                "postgres": cpu(ticks0["postgres"], ticks1["postgres"]),
                "redis": cpu(ticks0["redis"], ticks1["redis"])},
        "machine_busy": busy / all_ticks if all_ticks else None,
        "pool": sampler.summary(int(os.environ.get("DB_POOL_SIZE") or 8)),
        "db_counts": counts, "mock_stats": stats, "wrong_provider": wrong_provider,
        "exactly_once": ok_db and ok_mock and ok_keys and wrong_provider == 0, "metrics_ok": ok_metrics,
        "leaders_moved_during_drain": [lane for lane in lanes
                                       if (before[lane]["leader"], before[lane]["epoch"])
                                       != (after[lane]["leader"], after[lane]["epoch"])],
    }
    for r in replicas:
        r.stop()
    for proc, _ in mocks.values():
        stop(proc)
    psql(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
    note(f"  {total} messages in {span:.2f} s: {result['rate']:.0f} msg/s; exactly once: "
         f"{result['exactly_once']}")
    return result


def main() -> int:
    n = env_int("N", 6000)
    count = env_int("LANES", 6)
    replicas_count = env_int("REPLICAS", 3)
    target = env_float("RATIO_TARGET", 5)
    a = run_phase("A", lane_names(1), n, replicas_count)
    b = run_phase("B", lane_names(count), n, replicas_count)
    ratio = b["rate"] / a["rate"]

    lane_rows = []
    for phase in (a, b):
        for lane, p in phase["per_lane"].items():
            lane_rows.append([
                phase["tag"], lane, f"{p['leader']} (epoch {p['epoch']})",
                "same" if (p["leader_after"], p["epoch_after"]) == (p["leader"], p["epoch"])
                else f"{p['leader_after']} (epoch {p['epoch_after']})",
                p["assigned_to"] or "-",
                ", ".join(f"{by} {k}" for by, k in sorted(p["claimed_by"].items())),
                p["n"], fmt_s(p["first"], 2), fmt_s(p["span"], 2),
                "-" if p["rate"] is None else f"{p['rate']:.0f}", int(p["metrics_sent"])])
    print()
    print(table(["phase", "lane", "leader before the load", "leader after the drain", "assigned to",
                 "claimed by", "delivered", "first delivery +s", "span s", "msg/s", "metrics sent"],
                lane_rows, "Lanes: each lane (first delivery +s: after the phase's first delivery)"))

    summary_rows = []
    for phase in (a, b):
        cpu = phase["cpu"]
        summary_rows.append([
            phase["tag"], phase["lanes"], phase["messages"], fmt_s(phase["span_s"], 2), f"{phase['rate']:.0f}",
            "-" if phase["common_rate"] is None else f"{phase['common_rate']:.0f}",
            f"{phase['bound']:.0f}", fmt_s(phase["start_to_first_s"], 2),
            "/".join(f"{v:.1f}" for v in cpu["replicas"].values()),
            "/".join(f"{v:.1f}" for v in cpu["mocks"].values()),
            f"{cpu['postgres']:.1f}", f"{cpu['redis']:.1f}",
            f"{phase['machine_busy'] * 100:.0f}%" if phase["machine_busy"] is not None else "-",
            "yes" if phase["exactly_once"] else "NO", phase["mock_stats"]["duplicates"],
            "yes" if phase["metrics_ok"] else "NO"])
    print()
    print(table(["phase", "lanes", "messages", "first->last delivery s", "aggregate msg/s",
                 "all-lanes window msg/s", "provider bound msg/s", "start->first delivery s",
                 "CPU s replicas", "CPU s mock(s)", "CPU s pg", "CPU s redis", "machine busy",
                 "exactly once", "duplicates", "metrics = N"],
                summary_rows,
                f"Lanes: {a['replicas']} replicas, latency {a['latency_ms']} ms, send_concurrency "
                f"{a['concurrency']}, batch_size {a['batch_size']}, interval {a['interval']}, DB_POOL_SIZE "
                f"{a['pool_size']}, {'one mock per lane' if a['mocks'] > 1 else 'one mock provider'}; "
                f"CPU over the drain (start to settled)"))

    pool_rows = []
    for phase in (a, b):
        for rid, p in phase["pool"].items():
            if not p.get("samples"):
                continue
            leads = sorted(lane for lane, q in phase["per_lane"].items() if q["leader"] == rid)
            pool_rows.append([phase["tag"], rid, ", ".join(leads) or "-", p["samples"], p["sessions_max"],
                              f"{p['busy_mean']:.1f}", p["busy_max"], f"{p['all_busy_share'] * 100:.0f}%",
                              p["lock_waits_max"]])
    print()
    print(table(["phase", "replica", "leads", "samples", "pool sessions (max)", "busy mean", "busy max",
                 f"samples with all {a['pool_size']} busy", "lock waits max"],
                pool_rows, "Pool sessions in pg_stat_activity, sampled every 0.5 s during the drain"))

    ok_ratio = ratio >= target
    ok_once = a["exactly_once"] and b["exactly_once"] and a["metrics_ok"] and b["metrics_ok"]
    per = {}
    for lane, p in b["per_lane"].items():
        per.setdefault(p["leader"], []).append(lane)
    most = max(len(v) for v in per.values())
    allowed = -(-b["lanes"] // b["replicas"])
    rates_b = [p["rate"] for p in b["per_lane"].values() if p["rate"]]
    print()
    print(f"ratio B/A = {b['rate']:.0f} / {a['rate']:.0f} = {ratio:.2f} (target >= {target:g}): "
          f"{verdict(ok_ratio)}; duplicates A {a['mock_stats']['duplicates']}, B {b['mock_stats']['duplicates']}; "
          f"exactly once {verdict(ok_once)}")

    json_rows = [
        {"figure": "lanes: 1 lane alone, aggregate", "n": a["messages"],
         "value": f"{a['rate']:.0f} msg/s (provider bound {a['bound']:.0f}); leader {a['per_lane']['default']['leader']}",
         "target": "-", "result": "-"},
        {"figure": f"lanes: {b['lanes']} lanes over {b['replicas']} replicas, aggregate", "n": b["messages"],
         "value": f"{b['rate']:.0f} msg/s (provider bound {b['bound']:.0f}); per lane "
                  f"{min(rates_b):.0f}-{max(rates_b):.0f} msg/s; all-lanes window "
                  + ("-" if b["common_rate"] is None else f"{b['common_rate']:.0f}") + " msg/s",
         "target": "-", "result": "-"},
        {"figure": f"lanes: aggregate {b['lanes']} lanes / 1 lane", "n": b["messages"],
         "value": f"{ratio:.2f}x", "target": f">= {target:g}x", "result": verdict(ok_ratio)},
        {"figure": f"lanes: leaders of {b['lanes']} lanes", "n": b["lanes"],
         "value": "; ".join(f"{rid}: {', '.join(sorted(v))}" for rid, v in sorted(per.items())),
         "target": f"<= {allowed} per replica", "result": verdict(most <= allowed)},
        {"figure": "lanes: exactly once (both phases)", "n": a["messages"] + b["messages"],
         "value": f"duplicates {a['mock_stats']['duplicates'] + b['mock_stats']['duplicates']}; every row sent: "
                  f"{a['db_counts'] == {'sent': str(a['messages'])} and b['db_counts'] == {'sent': str(b['messages'])}}",
         "target": "0 duplicates, each message once", "result": verdict(ok_once)},
    ]
    write_result("lanes", json_rows, {"phases": [a, b], "ratio": ratio})
    return 0


if __name__ == "__main__":
    sys.exit(main())
