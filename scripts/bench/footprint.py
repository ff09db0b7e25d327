"""Footprint: three replicas with the default schedule (BATCH_SIZE 2 every 2m) and an
empty queue sit idle for IDLE_SECONDS (60); for the leader and the followers it
reports RSS (VmRSS of /proc/PID/status at the start and end of the window, its maximum
sampled every 5 s, the anon/file split, and the replica's own
process_resident_memory_bytes) and CPU (utime + stime of /proc/PID/stat over the
window, as % of one core). Target: idle RSS <= 20 MiB.
Then N (100000) messages are queued and the leader drains them at BATCH_SIZE 500,
PROCESSING_INTERVAL 0s (set at run time through PUT /api/messaging/config, so the same
processes are measured) and SEND_CONCURRENCY (default 1); RSS right after the drain,
10 s later, and the peak (VmHWM). The throughput benchmark also prints the RSS after
each of its drains (including SEND_CONCURRENCY 32).
Last, start-up: STARTS (10) fresh replicas, one at a time, each timed from spawn to its
first /health/ready 200 (polled every 2 ms), PostgreSQL and Redis already up.

    ./scripts/bench/run.sh footprint                          # about 2.5 minutes
    IDLE_SECONDS=10 N=10000 ./scripts/bench/run.sh footprint

Settings (environment): IDLE_SECONDS (60), N (100000), SEND_CONCURRENCY (1), STARTS
(10), WARMUP (5 s after the election before the window opens), AFTER_DRAIN_WAIT (10),
RSS_TARGET_MIB (20), BIN, KEEP_BENCH_DIR=1 keeps the logs.
"""

from __future__ import annotations

import os
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))
from harness import (  # noqa: E402
    Replica,
    env,
    env_float,
    env_int,
    http,
    http_json,
    leader_row,
    note,
    psql,
    start_mock,
    start_replicas,
    stop,
    wait_until,
)
from measure import CLK_TCK, MIB, cpu_ticks, proc_status, seed, table, verdict, write_result  # noqa: E402


def main() -> int:
    idle = env_float("IDLE_SECONDS", 60)
    n = env_int("N", 100_000)
    mock, mock_url = start_mock(0)
    os.environ["SMS_API_URL"] = mock_url + "/send"
    extra = {"SEND_CONCURRENCY": env("SEND_CONCURRENCY", "1")}  # default interval and batch size
    replicas = start_replicas(3, extra)
    epoch, holder = wait_until(lambda: (lambda e_h: e_h if e_h[1] else None)(leader_row()), 30, 0.2,
                               "a leader")
    time.sleep(env_float("WARMUP", 5))
    epoch, holder = leader_row()
    note(f"idle for {idle:.0f} s; leader {holder}")
    # Measured: the three replicas, plus the idle mock provider as the machine's own
    # reference (the same binary, runtime and HTTP stack, with no database or Redis).
    watched = [("leader" if r.id == holder else "follower", r.id, r.pid, r.url)
               for r in sorted(replicas, key=lambda r: r.id != holder)]
    watched.append(("reference", "mock-provider", mock.pid, None))
    t0 = time.time()
    start = {w[1]: (cpu_ticks(w[2]), proc_status(w[2])) for w in watched}
    peak = {w[1]: start[w[1]][1]["VmRSS"] for w in watched}
    while time.time() < t0 + idle:
        time.sleep(min(5.0, max(0.0, t0 + idle - time.time())))
        for w in watched:
            peak[w[1]] = max(peak[w[1]], proc_status(w[2])["VmRSS"])
    t1 = time.time()
    end = {w[1]: (cpu_ticks(w[2]), proc_status(w[2])) for w in watched}
    epoch2, holder2 = leader_row()
    if (epoch2, holder2) != (epoch, holder):
        note(f"leadership changed during the idle window ({holder} -> {holder2})")
    metric_rss = {}
    for _, name, _, url in watched:
        metric_rss[name] = None
        if url:
            _, body = http(url + "/metrics")
            m = re.search(rb"^process_resident_memory_bytes ([\d.e+]+)$", body, re.M)
            metric_rss[name] = float(m.group(1)) if m else None
    rows, json_rows = [], []
    target_mib = env_float("RSS_TARGET_MIB", 20)
    for role, name, _, _ in watched:
        ticks = end[name][0] - start[name][0]
        cpu_pct = ticks / CLK_TCK / (t1 - t0) * 100
        s0, s1 = start[name][1], end[name][1]
        ok = max(peak[name], s1["VmRSS"]) <= target_mib * MIB if role != "reference" else None
        target = f"RSS <= {target_mib:g} MiB" if role != "reference" else "-"
        rows.append([role, name, f"{s0['VmRSS'] / MIB:.1f}", f"{s1['VmRSS'] / MIB:.1f}",
                     f"{peak[name] / MIB:.1f}", f"{s1.get('RssAnon', 0) / MIB:.1f}",
                     f"{s1.get('RssFile', 0) / MIB:.1f}",
                     "-" if metric_rss[name] is None else f"{metric_rss[name] / MIB:.1f}",
                     s1.get("Threads", "-"), f"{ticks / CLK_TCK:.2f}", f"{cpu_pct:.2f}%", target, verdict(ok)])
        json_rows.append({"figure": f"idle {role} ({name}) over {t1 - t0:.0f} s", "n": 1,
                          "value": f"RSS {s1['VmRSS'] / MIB:.1f} MiB (max {peak[name] / MIB:.1f}), "
                                   f"CPU {cpu_pct:.2f}%",
                          "target": target, "result": verdict(ok)})
    idle_table = table(["role", "process", "RSS start MiB", "RSS end MiB", "RSS max MiB", "anon MiB",
                        "file MiB", "process_resident_memory MiB", "threads", "CPU s", "CPU %",
                        "target", "result"], rows,
                       f"Idle footprint: 3 replicas, default BATCH_SIZE/PROCESSING_INTERVAL, no messages, "
                       f"{t1 - t0:.0f} s window (RSS = VmRSS; CPU = utime+stime)")

    # The drain: N messages through the leader at BATCH_SIZE 500, interval 0, set at run time.
    note(f"draining {n} messages through the leader")
    seed(n)
    leader = next(r for r in replicas if r.id == holder)
    code, _ = http(leader.url + "/api/messaging/config", method="PUT",
                   body={"batch_size": 500, "processing_interval": "0s"})
    if code != 200:
        raise RuntimeError(f"PUT /api/messaging/config answered {code}")
    d0 = time.time()
    wait_until(lambda: psql("SELECT count(*) FROM messages WHERE status <> 'sent'") == "0",
               max(600, n / 50), 0.5, "the drain")
    drain_s = time.time() - d0
    time.sleep(0.5)
    after = {r.id: proc_status(r.pid) for r in replicas}
    time.sleep(env_float("AFTER_DRAIN_WAIT", 10))
    later = {r.id: proc_status(r.pid) for r in replicas}
    stats = http_json(mock_url + "/stats")
    once = stats["unique_keys"] == n and stats["duplicates"] == 0
    drain_rows = []
    for r in sorted(replicas, key=lambda r: r.id != holder):
        role = "leader" if r.id == holder else "follower"
        drain_rows.append([role, r.id, f"{after[r.id]['VmRSS'] / MIB:.1f}",
                           f"{later[r.id]['VmRSS'] / MIB:.1f}", f"{after[r.id]['VmHWM'] / MIB:.1f}",
                           f"{after[r.id].get('RssAnon', 0) / MIB:.1f}"])
    json_rows.append({"figure": f"leader RSS after a {n}-message drain", "n": 1,
                      "value": f"{after[holder]['VmRSS'] / MIB:.1f} MiB (peak {after[holder]['VmHWM'] / MIB:.1f})",
                      "target": "-", "result": "-" if once else "FAIL (not exactly once)"})
    for r in replicas:
        r.stop()

    # Start-up: a fresh replica (PostgreSQL and Redis up, schema applied) from spawn to
    # the first 200 of /health/ready, polled every 2 ms; STARTS times, one at a time.
    starts = env_int("STARTS", 10)
    start_s = []
    for i in range(starts):
        r = Replica(100 + i, extra)
        t_spawn = time.time()
        r.start()
        r.wait_ready(timeout=30, step=0.002)
        start_s.append(r.ready_at - t_spawn)
        r.stop()
    stop(mock)
    if start_s:
        json_rows.append({"figure": "start -> /health/ready 200", "n": len(start_s),
                          "value": f"min {min(start_s) * 1000:.0f} / med {statistics.median(start_s) * 1000:.0f} / "
                                   f"max {max(start_s) * 1000:.0f} ms",
                          "target": "-", "result": "-"})
    print()
    print(idle_table)
    print()
    print(table(["role", "replica", "RSS right after MiB", f"RSS +{env_float('AFTER_DRAIN_WAIT', 10):.0f} s MiB",
                 "peak RSS (VmHWM) MiB", "anon MiB"], drain_rows,
                f"After draining {n} messages (BATCH_SIZE 500, interval 0s, SEND_CONCURRENCY "
                f"{extra['SEND_CONCURRENCY']}) in {drain_s:.1f} s; provider: {stats['unique_keys']} unique, "
                f"{stats['duplicates']} duplicates"))
    if start_s:
        print()
        print(f"Start-up ({len(start_s)} runs, PostgreSQL and Redis up, schema applied): spawn -> /health/ready 200 "
              f"min {min(start_s) * 1000:.0f} / median {statistics.median(start_s) * 1000:.0f} / "
              f"max {max(start_s) * 1000:.0f} ms")
    write_result("footprint", json_rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
