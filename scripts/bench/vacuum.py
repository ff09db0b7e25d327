"""Vacuum: the drain while another session holds a transaction open. ROUNDS times, in
turn: a drain of N messages with nothing else running (plain), then the same drain
while a REPEATABLE READ transaction opened HOLD_BEFORE seconds earlier (a report, a
stuck client) stays open through it, so PostgreSQL can clean up none of the dead rows
the drain leaves. One replica, BATCH_SIZE 500, interval 0, SEND_CONCURRENCY 32,
provider latency 0; each drain timed from the first claim to the last send and checked
exactly once. Also read while the transaction is open: the claim's plan (EXPLAIN of the
claim's index probe) and `dispatcher_db_oldest_transaction_age_seconds`.

Target: the held drain at least 70 % of the plain one (median of the rounds' ratios),
and the gauge reports the transaction.

    ./scripts/bench/run.sh vacuum                   # about 8 minutes
    N=50000 ROUNDS=1 ./scripts/bench/run.sh vacuum  # a quick look

Settings (environment): N (500000), ROUNDS (2), HOLD_BEFORE (5), BIN, KEEP_BENCH_DIR=1.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))
from harness import env, env_int, http, http_json, note, psql, start_mock, start_replicas, stop, wait_until  # noqa: E402
from measure import table, verdict, write_result  # noqa: E402

RATIO_TARGET = 0.70
GAUGE = "dispatcher_db_oldest_transaction_age_seconds"


def hold_transaction() -> subprocess.Popen:
    """A psql session that opens a REPEATABLE READ transaction, reads, and sleeps in it."""
    proc = subprocess.Popen(
        ["psql", "-X", "-q", "-h", "127.0.0.1", "-p", env("PG_PORT"), "-U", "postgres", "-d", "messages_db"],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
    proc.stdin.write("BEGIN ISOLATION LEVEL REPEATABLE READ;\nSELECT count(*) FROM messages;\n"
                     "SELECT pg_sleep(86400);\n")
    proc.stdin.flush()
    wait_until(lambda: psql("SELECT count(*) FROM pg_stat_activity WHERE backend_xmin IS NOT NULL "
                            "AND query LIKE '%pg_sleep(86400)%' AND pid <> pg_backend_pid()") == "1",
               30, 0.1, "the held transaction")
    return proc


def gauge(url: str) -> float | None:
    code, body = http(url + "/metrics")
    for line in body.decode().splitlines() if code == 200 else []:
        if line.startswith(GAUGE + " "):
            return float(line.split()[1])
    return None


def drain(n: int, held: bool, hold_before: float) -> dict:
    mock, mock_url = start_mock(0)
    psql("TRUNCATE messages RESTART IDENTITY")
    psql("VACUUM ANALYZE messages")
    holder = None
    if held:
        holder = hold_transaction()
        time.sleep(hold_before)
    psql(f"""INSERT INTO messages (phone_number, content)
             SELECT '+90556' || lpad(s::text, 7, '0'), 'Drain ' || s
             FROM generate_series(1, {n}) AS s ORDER BY s""")
    psql("ANALYZE messages")
    [replica] = start_replicas(1, {"BATCH_SIZE": "500", "PROCESSING_INTERVAL": "0s", "SEND_CONCURRENCY": "32",
                                   "SMS_API_URL": mock_url + "/send"})
    half = n // 2
    wait_until(lambda: int(psql("SELECT count(*) FROM messages WHERE status = 'sent'")) >= half,
               1200, 0.5, "half of the drain")
    plan = psql("EXPLAIN SELECT id FROM messages WHERE status = 'pending' AND lane = 'default' "
                "AND next_attempt_at <= now() ORDER BY priority DESC, created_at, id LIMIT 500")
    age = gauge(replica.url)
    wait_until(lambda: psql("SELECT count(*) FROM messages WHERE status <> 'sent'") == "0",
               1200, 0.5, f"{n} messages to drain")
    elapsed = float(psql("SELECT extract(epoch FROM max(sent_at) - min(claimed_at)) FROM messages"))
    stats = http_json(mock_url + "/stats")
    once = stats["requests"] == n and stats["unique_keys"] == n and stats["duplicates"] == 0
    dead = int(psql("SELECT n_dead_tup FROM pg_stat_user_tables WHERE relname = 'messages'"))
    replica.stop()
    stop(mock)
    if holder:
        # The server session would sleep on, holding its snapshot and its lock on the
        # table, after its client died: end it on the server.
        psql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE '%pg_sleep(86400)%' "
             "AND pid <> pg_backend_pid()")
        holder.wait(timeout=30)
    index_scan = "Index Scan" in plan or "Index Only Scan" in plan
    return {"rate": n / elapsed, "elapsed_s": elapsed, "exactly_once": once, "gauge_s": age,
            "index_scan": index_scan, "plan_first": plan.splitlines()[1].strip() if "\n" in plan else plan,
            "dead_rows": dead}


def main() -> int:
    n, rounds, hold_before = env_int("N", 500000), env_int("ROUNDS", 2), float(env("HOLD_BEFORE", "5"))
    runs = []
    for i in range(rounds):
        note(f"round {i + 1}: plain drain of {n}")
        plain = drain(n, False, hold_before)
        note(f"round {i + 1}: drain of {n} with a transaction held open")
        held = drain(n, True, hold_before)
        runs.append((plain, held))
    ratios = [h["rate"] / p["rate"] for p, h in runs]
    ratio = statistics.median(ratios)
    once = all(p["exactly_once"] and h["exactly_once"] for p, h in runs)
    gauge_seen = all((h["gauge_s"] or 0) > 0 for _, h in runs)
    ok = ratio >= RATIO_TARGET and once and gauge_seen
    rows = []
    for i, (p, h) in enumerate(runs):
        rows.append([i + 1, f"{p['rate']:.0f}", f"{h['rate']:.0f}", f"{h['rate'] / p['rate']:.2f}",
                     f"{h['dead_rows']:,}", "yes" if h["index_scan"] else "NO", fmt(h["gauge_s"]),
                     "yes" if p["exactly_once"] and h["exactly_once"] else "NO"])
    print()
    print(table(["round", "plain msg/s", "held msg/s", "held/plain", "dead rows after", "claim index scan",
                 "gauge s", "once"], rows,
                f"Vacuum: drains of {n} (BATCH_SIZE 500, SEND_CONCURRENCY 32, latency 0), plain and with a "
                f"REPEATABLE READ transaction held open from {hold_before:.0f} s before; "
                f"{os.cpu_count()} cores shared by everything"))
    print(f"held/plain, median of {rounds}: {ratio:.2f} (target >= {RATIO_TARGET:.2f}): {verdict(ok)}")
    write_result("vacuum", [{
        "figure": "drain with a transaction held open, of plain", "n": n,
        "value": f"{ratio:.2f} (plain {statistics.median(p['rate'] for p, _ in runs):.0f} msg/s, "
                 f"held {statistics.median(h['rate'] for _, h in runs):.0f} msg/s)",
        "target": f">= {RATIO_TARGET:.2f}", "result": verdict(ok)}])
    return 0


def fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}"


if __name__ == "__main__":
    sys.exit(main())
