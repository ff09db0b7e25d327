"""Throughput ceiling: how fast one leader drains the queue end to end, next to what
PostgreSQL alone can do with the same statements, measured in the same run.

    ./scripts/bench/run.sh throughput                        # the full run (about 8 minutes)
    N=20000 SLOW_N=2000 ./scripts/bench/run.sh throughput    # a quick one

Set-up: local PostgreSQL (fsync=off, as the test suite), Redis and the mock provider
on free 127.0.0.1 ports under a work directory; ONE replica (REPLICAS=3 adds two idle
followers; only the leader dispatches), Redis lease on, BATCH_SIZE=500,
PROCESSING_INTERVAL=0s, everything else default (DB_POOL_SIZE 8). Four drains:
provider latency 0 and 20 ms x SEND_CONCURRENCY 1 and 32. Each drain starts from an
empty queue: N rows seeded, VACUUM ANALYZE, CHECKPOINT, then the replica starts.
Latency 20 ms at concurrency 1 is bound to 1000/20 = 50 messages/s by construction,
so that drain uses SLOW_N messages (default 10,000: 200 s) instead of N; set
SLOW_N=100000 for the full 33 minutes.

End to end = from the first claim (min(claimed_at) in the table: the start of the
first claim transaction) to the last "batch finished" log line (after the last result
was recorded). Then it checks exactly once: every row `sent`, the mock provider
counted N requests, N unique Idempotency-Keys, no duplicate, and its key set is
exactly 1..N; at concurrency 1 also that the first deliveries came in FIFO order.

PostgreSQL reference, per send concurrency C, in a second database of the same schema
(`migrate`) holding the same N rows (`seed`, VACUUM ANALYZE, CHECKPOINT):
  1. claim: pgbench -M prepared -c 1 -t N/500 -f scripts/bench/sql/claim.sql, the
     exact claim transaction of src/store/ (lock the fence row, read the schedule,
     rescue, claim 500 ... FOR UPDATE SKIP LOCKED, set last_batch_at; the same SQL
     text, each $n bound from a pgbench variable). One client: the leader claims
     serially, one batch at a time.
  2. marks: pgbench -M prepared -c C -t N/C -f scripts/bench/sql/mark.sql, the
     per-message MARK_SENT UPDATE (one statement each, autocommit), on the N rows the
     claims left in `sending`, from C connections at once (pgbench -j = number of
     CPUs). The service itself never has more than DB_POOL_SIZE = 8 statements in
     flight; that is a limit of the service, not of PostgreSQL, so the reference does
     not apply it.
  DB msg/s(C) = 500 / (t_claim + 500 / marks_per_s(C)): a batch is one serial claim
  followed by 500 marks at concurrency C, as in the dispatcher. The reference is
  measured right before and right after the drains of the same concurrency; the
  higher of the two is the PostgreSQL limit, and the ratio printed is the service's
  end-to-end rate over it. The run stops if claim.sql or mark.sql no longer replays
  the statements of src/store/ verbatim (ALLOW_SQL_DRIFT=1 runs anyway).

-M prepared parses and plans each statement once per connection: the database's own
limit, and what the service does too (tokio-postgres prepare_cached, once per pooled
connection). PGBENCH_MODE=extended re-plans every statement, for comparison.

Settings (environment): N (100000), SLOW_N (10000), BATCH (500), REPLICAS (1),
LATENCIES ("0 20"), CONCURRENCIES ("1 32"), PGBENCH_MODE (prepared), REF (1; 0 skips
the PostgreSQL reference), ALLOW_SQL_DRIFT (0), BIN (a built binary; default: cargo
build --release), KEEP_BENCH_DIR=1 keeps the logs.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))
from harness import BIN, ROOT, env, env_int, note, psql, run_child  # noqa: E402
from measure import MIB, constant, drain_run, fmt_s, reset_queue, seed, table, verdict, write_result  # noqa: E402

SQL = Path(__file__).resolve().parent / "sql"


def pgbench(args: list[str], db: str) -> dict:
    cmd = [str(Path(env("PG_BIN")) / "pgbench"), "-n", "-M", env("PGBENCH_MODE", "prepared"),
           "-h", "127.0.0.1", "-p", env("PG_PORT"), "-U", "postgres", *args, db]
    out = run_child(cmd)
    text = out.stdout + out.stderr
    if out.returncode != 0 or "aborted" in text:
        raise RuntimeError(f"pgbench failed:\n{text}")
    tps = float(re.search(r"tps = ([\d.]+) \(without initial connection time\)", text).group(1))
    lat = float(re.search(r"latency average = ([\d.]+) ms", text).group(1))
    done = re.search(r"number of transactions actually processed: (\d+)", text).group(1)
    return {"tps": tps, "latency_ms": lat, "transactions": int(done)}


def _sql_norm(sql: str) -> str:
    """Placeholders ($1, :name) to P, whitespace collapsed, no trailing semicolon."""
    sql = re.sub(r"\$\d+", "P", sql)
    sql = re.sub(r"(?<!:):[a-z_]+", "P", sql)
    return " ".join(sql.split()).rstrip(";").strip()


def _script_statements(path: Path) -> list[str]:
    text = "\n".join(line for line in path.read_text().splitlines()
                     if not line.lstrip().startswith(("--", "\\")))
    return [_sql_norm(x) for x in re.split(r";\s*\n", text) if x.strip()]


def sql_drift() -> list[str]:
    """Statements of src/store/ that scripts/bench/sql/{claim,mark}.sql do not replay
    verbatim (the claimed_by/sent_at/provider id values aside, which are bound from
    pgbench variables); empty when they match or the source is not here."""
    sources = sorted((ROOT / "src" / "store").rglob("*.rs"))
    if not sources:
        return []
    rust = "\n".join(p.read_text() for p in sources)
    wanted_names = ("LOCK_FENCE", "READ_SCHEDULE", "EXPIRE_DUE", "CLAIM", "OPEN_BATCH",
                    "CLOSE_BATCH", "MARK_SENT")
    consts = {name: _sql_norm(constant(rust, name)) for name in wanted_names}
    claim = set(_script_statements(SQL / "claim.sql"))
    mark = set(_script_statements(SQL / "mark.sql"))
    wanted = {"LOCK_FENCE": claim, "READ_SCHEDULE": claim, "EXPIRE_DUE": claim, "CLAIM": claim,
              "OPEN_BATCH": claim, "CLOSE_BATCH": claim, "MARK_SENT": mark}
    drift = []
    for name, statements in wanted.items():
        if name in consts and consts[name] not in statements:
            drift.append(name)
        elif name not in consts and name in ("LOCK_FENCE", "CLAIM", "MARK_SENT"):
            drift.append(f"{name} (not found in the source)")
    return drift


def pg_reference(concurrency: int, n: int, batch: int, ttl_s: float, timeout_s: float) -> dict:
    """The claim transaction and the per-message mark of src/store/, replayed
    by pgbench against a copy of the schema holding the same number of rows."""
    db = "pgref_db"
    if psql(f"SELECT count(*) FROM pg_database WHERE datname = '{db}'") == "0":
        psql(f"CREATE DATABASE {db}")
        url = f"postgres://postgres@127.0.0.1:{env('PG_PORT')}/{db}"
        subprocess.run([BIN, "migrate"], check=True, stdout=subprocess.DEVNULL,
                       env={**os.environ, "DATABASE_URL": url, "LOG_FORMAT": "json"})
    reset_queue(db)
    psql("UPDATE dispatcher_leader SET epoch = 1, holder = 'pgbench', acquired_at = now(); "
         "UPDATE dispatcher_control SET running = true", db)
    seed(n, db)
    claims = math.ceil(n / batch)
    # The fence window as the service derives it from the TTL (src/leadership/fence.rs);
    # batches are closed here, so it only enters the schedule's arithmetic.
    window_ms = min(max(int(ttl_s * 1000) // 3, 100), 1000)
    claim = pgbench(["-c", "1", "-j", "1", "-t", str(claims),
                     "-D", f"batch={batch}", "-D", "interval_ms=0", "-D", f"window_ms={window_ms}",
                     "-D", "epoch=1", "-D", "replica=pgbench", "-D", "token=42",
                     "-D", "ages={0,1000,2000}", "-D", "opened_at=2026-01-01T00:00:00Z",
                     "-f", str(SQL / "claim.sql")], db)
    sending = int(psql("SELECT count(*) FROM messages WHERE status = 'sending' AND claim_epoch = 1", db))
    if sending != n:
        raise RuntimeError(f"pgbench claim moved {sending} rows to sending, expected {n}")
    per_client = math.ceil(n / concurrency)
    mark = pgbench(["-c", str(concurrency), "-j", str(min(concurrency, os.cpu_count() or 1)),
                    "-t", str(per_client), "-D", "k=0", "-D", f"nclients={concurrency}",
                    "-D", "first_id=1", "-D", "epoch=1",
                    "-D", f"sent_at={datetime.now().astimezone().isoformat()}",
                    "-D", "provider_id=6f1c2a4e-8b1d-4c55-9d8e-0a7b3c2d1e4f",
                    "-f", str(SQL / "mark.sql")], db)
    sent = int(psql("SELECT count(*) FROM messages WHERE status = 'sent'", db))
    if sent != n:
        raise RuntimeError(f"pgbench mark moved {sent} rows to sent, expected {n}")
    claim_s = 1.0 / claim["tps"]
    marks_per_s = mark["tps"] * n / mark["transactions"]  # transactions past id n update nothing
    limit = batch / (claim_s + batch / marks_per_s)
    reset_queue(db)
    return {"concurrency": concurrency, "claim_ms": claim_s * 1000, "claims_per_s": claim["tps"],
            "marks_per_s": marks_per_s, "limit": limit}



def main() -> int:
    n = env_int("N", 100_000)
    slow_n = env_int("SLOW_N", 10_000)
    batch = env_int("BATCH", 500)
    replicas_count = env_int("REPLICAS", 1)
    latencies = [int(x) for x in env("LATENCIES", "0 20").split()]
    concurrencies = [int(x) for x in env("CONCURRENCIES", "1 32").split()]
    ttl_s, timeout_s = 15.0, 6.0  # defaults of DISTRIBUTED_LOCK_TTL and SMS_API_TIMEOUT
    refs, runs = {}, []
    with_ref = env("REF", "1") != "0"
    drift = sql_drift() if with_ref else []
    if drift:
        msg = (f"scripts/bench/sql/claim.sql or mark.sql no longer replays src/store/: "
               f"{', '.join(drift)} changed; update them (ALLOW_SQL_DRIFT=1 runs anyway)")
        if env("ALLOW_SQL_DRIFT", "0") != "1":
            sys.exit("throughput.py: " + msg)
        note("WARNING: " + msg)

    def reference(c: int, when: str) -> dict:
        note(f"PostgreSQL reference ({when}), marks at concurrency {c}: pgbench, {n} rows, claims of {batch}")
        ref = pg_reference(c, n, batch, ttl_s, timeout_s)
        note(f"  claim {ref['claim_ms']:.2f} ms per {batch}, marks {ref['marks_per_s']:.0f}/s"
             f" -> {ref['limit']:.0f} messages/s")
        return {**ref, "when": when}

    for c in concurrencies:
        # The reference brackets the drains of the same concurrency (before and after);
        # the higher of the two is the limit, so noise on a shared machine cannot make
        # the ratio look better than it is.
        before = reference(c, "before") if with_ref else None
        for lat in latencies:
            count = slow_n if (c == 1 and lat > 0) else n
            note(f"drain: {count} messages, latency {lat} ms, SEND_CONCURRENCY {c}, "
                 f"{replicas_count} replica(s)")
            run = drain_run(lat, c, count, batch, replicas_count)
            runs.append(run)
            note(f"  {run['rate']:.0f} messages/s in {run['elapsed_s']:.1f} s; exactly once: "
                 f"{run['exactly_once']}")
        if with_ref:
            after = reference(c, "after")
            refs[c] = {"runs": [before, after], "limit": max(before["limit"], after["limit"])}
        else:
            refs[c] = {"runs": [], "limit": None}
        for run in runs:
            if run["concurrency"] == c:
                run["ref"] = refs[c]
    rows, json_rows = [], []
    for r in runs:
        ref = r["ref"]
        ratio = r["rate"] / ref["limit"] if ref["limit"] else None
        provider_bound = (r["concurrency"] * 1000 / r["latency_ms"]) if r["latency_ms"] else None
        target, ok = "-", None
        if r["latency_ms"] == 0 and r["concurrency"] == 32:
            target, ok = ">= 50 % of PG limit", None if ratio is None else ratio >= 0.5
        if not r["exactly_once"]:
            ok = False
        rows.append([f"{r['latency_ms']} ms", r["concurrency"], r["n"], fmt_s(r["elapsed_s"], 1),
                     f"{r['rate']:.0f}", "-" if ratio is None else f"{ref['limit']:.0f}",
                     "-" if ratio is None else f"{ratio * 100:.1f}%",
                     "-" if provider_bound is None else f"{provider_bound:.0f}",
                     r["batch_ms_median"], "yes" if r["exactly_once"] else "NO",
                     "-" if r["fifo"] is None else ("yes" if r["fifo"] else "NO"),
                     f"{r['rss'] / MIB:.1f}", f"{r['hwm'] / MIB:.1f}",
                     f"{r['cpu_replica_s']:.1f}/{r['cpu_mock_s']:.1f}/{r['cpu_postgres_s']:.1f}/{r['cpu_redis_s']:.1f}",
                     target, verdict(ok)])
        json_rows.append({"figure": f"throughput latency {r['latency_ms']} ms, SEND_CONCURRENCY {r['concurrency']}",
                          "n": r["n"], "value": f"{r['rate']:.0f} msg/s = "
                                                + ("(no reference)" if ratio is None else
                                                   f"{ratio * 100:.1f}% of PG limit {ref['limit']:.0f}/s")
                                                + f"; RSS after {r['rss'] / MIB:.1f} MiB",
                          "target": target, "result": verdict(ok)})
    ref_rows = [[c, x["when"], f"{x['claim_ms']:.2f}", f"{x['claims_per_s'] * batch:.0f}",
                 f"{x['marks_per_s']:.0f}", f"{x['limit']:.0f}",
                 f"{ref['limit']:.0f}" if x["limit"] == ref["limit"] else ""]
                for c, ref in refs.items() for x in ref["runs"]]
    if ref_rows:
        print()
        print(table(["mark concurrency", "measured", f"claim ms per {batch}", "claim-only msg/s", "marks/s",
                     "DB msg/s", "PG limit msg/s"],
                    ref_rows, f"PostgreSQL reference (pgbench -M {env('PGBENCH_MODE', 'prepared')}, "
                              f"{n} rows, claim (+ close) -c 1, marks -c <concurrency>): "
                              f"DB msg/s = {batch} / (claim + {batch} / marks per s); limit = the higher of "
                              f"before/after"))
    print()
    print(table(["provider latency", "SEND_CONCURRENCY", "messages", "seconds", "msg/s", "PG limit msg/s",
                 "ratio", "latency bound msg/s", "batch ms (median)", "exactly once", "FIFO",
                 "RSS after MiB", "peak RSS MiB", "CPU s replica/mock/pg/redis", "target", "result"],
                rows, f"Throughput: BATCH_SIZE {batch}, PROCESSING_INTERVAL 0s, {replicas_count} replica(s) "
                      f"(Redis lease on), end to end = first claim to last batch finished"))
    write_result("throughput", json_rows, {"runs": runs, "refs": refs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
