"""What the benchmarks measure with (standard library only): CPU time and memory from
/proc, the queue seeded and reset, one end-to-end drain with its exactly-once check,
the lanes (a DISPATCH_CONFIG file, GET /api/lanes, waiting for the spread, each
replica's pool sessions), and the tables and result rows they print. The processes themselves are started
through scripts/lib/harness.py; scripts/bench/run.sh sets up the environment both
read and turns the rows a benchmark writes to $BENCH_RESULT into a result record.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))
from harness import (  # noqa: E402
    BIN,
    WORK,
    env,
    http,
    http_json,
    leader_row,
    parse_ts,
    psql,
    read_events,
    redis_cli,
    start_mock,
    start_replicas,
    stop,
    wait_until,
)

MIB = 1024 * 1024
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------------------ /proc


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile in bytes."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem", "Threads"):
                parts = value.split()
                out[key] = int(parts[0]) * (1024 if len(parts) > 1 else 1)
    return out


def cpu_ticks(pid: int, reaped_children: bool = False) -> int:
    """utime + stime of the process (all threads), in clock ticks; with
    `reaped_children`, plus cutime + cstime (children it has waited for)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    if reaped_children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks


def children_of(ppid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == ppid:
                        pids.append(int(entry))
            except OSError:
                pass
    return pids


def postgres_ticks() -> int:
    """CPU ticks of the benchmark's PostgreSQL: the postmaster, its live children
    (backends, background processes) and the children it has reaped (backends of
    connections that ended). A backend reaped while the children are being read would
    be missed (reaped after the postmaster's figures were read, gone before its own
    were): the read is repeated until no child was reaped during it."""
    pidfile = WORK / "postgres" / "data" / "postmaster.pid"
    master = int(pidfile.read_text().split()[0])

    def own_and_reaped() -> tuple[int, int]:
        with open(f"/proc/{master}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12]), int(fields[13]) + int(fields[14])

    for _ in range(50):
        own, reaped = own_and_reaped()
        live = 0
        for pid in children_of(master):
            try:
                live += cpu_ticks(pid)
            except OSError:
                pass
        if own_and_reaped()[1] == reaped:
            break
    return own + reaped + live


def redis_ticks() -> int:
    try:
        return cpu_ticks(int((WORK / "redis" / "redis.pid").read_text().strip()))
    except OSError:
        return 0


# ------------------------------------------------------------------------------ queue


def seed(count: int, db: str = "messages_db") -> None:
    url = f"postgres://postgres@127.0.0.1:{env('PG_PORT')}/{db}"
    subprocess.run([BIN, "seed", "--count", str(count)], check=True, stdout=subprocess.DEVNULL,
                   env={**os.environ, "DATABASE_URL": url, "LOG_FORMAT": "json"})
    psql("VACUUM ANALYZE messages", db)
    psql("CHECKPOINT", db)


def reset_queue(db: str = "messages_db") -> None:
    psql("TRUNCATE messages RESTART IDENTITY; UPDATE dispatcher_leader SET last_batch_at = NULL", db)


def drain_run(latency_ms: int, concurrency: int, n: int, batch: int, replicas_count: int) -> dict:
    """N seeded messages drained end to end by `replicas_count` replicas (BATCH_SIZE
    `batch`, interval 0) through a mock provider answering after `latency_ms`: the rate
    from the first claim to the last "batch finished", the leader's memory, every
    process's CPU, and whether each message reached the provider exactly once (and, at
    concurrency 1, in FIFO order)."""
    mock, mock_url = start_mock(latency_ms)
    os.environ["SMS_API_URL"] = mock_url + "/send"
    reset_queue()
    redis_cli("FLUSHDB")
    seed(n)
    extra = {"BATCH_SIZE": str(batch), "PROCESSING_INTERVAL": "0s",
             "SEND_CONCURRENCY": str(concurrency)}
    mock_pid = mock.pid
    ticks0 = {"mock": cpu_ticks(mock_pid), "postgres": postgres_ticks(), "redis": redis_ticks()}
    t0 = time.time()
    replicas = start_replicas(replicas_count, extra)
    timeout = max(600.0, n * latency_ms / 1000 / concurrency * 3 + 120)

    def drained():
        return psql("SELECT count(*) FROM messages WHERE status IN ('pending', 'sending')") == "0"
    wait_until(drained, timeout, 1.0, f"{n} messages to drain")
    t1 = time.time()
    # the last batch's "batch finished" line follows its last mark
    wait_until(lambda: psql("SELECT count(*) FROM messages WHERE status = 'sent'") == str(n), 30, 0.2)
    time.sleep(0.3)
    epoch, holder = leader_row()
    leader = next(r for r in replicas if r.id == holder)
    mem = proc_status(leader.pid)
    replica_ticks = sum(cpu_ticks(r.pid) for r in replicas)
    ticks1 = {"mock": cpu_ticks(mock_pid), "postgres": postgres_ticks(), "redis": redis_ticks()}
    events = []
    for r in replicas:
        events += read_events(r.log, {"batch claimed", "batch finished"})
    claims = [e for e in events if e.get("message") == "batch claimed"]
    finished = [e for e in events if e.get("message") == "batch finished"]
    t_first_claim_db = float(psql("SELECT extract(epoch FROM min(claimed_at)) FROM messages"))
    t_first_claim_log = min(parse_ts(e["timestamp"]) for e in claims)
    t_last_finished = max(parse_ts(e["timestamp"]) for e in finished)
    sent_in_logs = sum(int(e.get("sent", 0)) for e in finished)
    batch_ms = int(statistics.median(int(e.get("elapsed_ms", 0)) for e in finished))
    elapsed = t_last_finished - t_first_claim_db

    # Exactly once: every row sent, the provider saw each id once.
    counts = dict(line.split("|") for line in psql(
        "SELECT status || '|' || count(*) FROM messages GROUP BY status").splitlines())
    stats = http_json(mock_url + "/stats")
    deliveries = http_json(mock_url + "/deliveries", timeout=60)
    # The provider sees each message's delivery key (its Idempotency-Key), not its id.
    id_of_key = {key: int(mid) for key, mid in (line.split("|") for line in psql(
        "SELECT coalesce(delivery_key::text, id::text) || '|' || id FROM messages").splitlines())}
    ids = [id_of_key.get(d["key"], 0) for d in deliveries]
    ok_db = counts == {"sent": str(n)}
    ok_mock = (stats["requests"] == n and stats["accepted"] == n and stats["unique_keys"] == n
               and stats["duplicates"] == 0)
    ok_keys = sorted(ids) == list(range(1, n + 1))
    fifo = None
    if concurrency == 1:
        order = [id_of_key.get(d["key"], 0)
                 for d in sorted(deliveries, key=lambda d: (d["first_seen_us"], id_of_key.get(d["key"], 0)))]
        fifo = order == sorted(order)
    for r in replicas:
        r.stop()
    stop(mock)
    wall = time.time() - t0
    return {
        "latency_ms": latency_ms, "concurrency": concurrency, "n": n, "replicas": replicas_count,
        "elapsed_s": elapsed, "rate": n / elapsed, "batches": len(claims), "batch_ms_median": batch_ms,
        "first_claim_log_minus_db_ms": (t_first_claim_log - t_first_claim_db) * 1000,
        "sent_in_logs": sent_in_logs, "rss": mem["VmRSS"], "hwm": mem["VmHWM"],
        "rss_anon": mem.get("RssAnon", 0), "rss_file": mem.get("RssFile", 0),
        "cpu_replica_s": replica_ticks / CLK_TCK,
        "cpu_mock_s": (ticks1["mock"] - ticks0["mock"]) / CLK_TCK,
        "cpu_postgres_s": (ticks1["postgres"] - ticks0["postgres"]) / CLK_TCK,
        "cpu_redis_s": (ticks1["redis"] - ticks0["redis"]) / CLK_TCK,
        "exactly_once": ok_db and ok_mock and ok_keys, "fifo": fifo, "db_counts": counts,
        "mock_stats": stats, "wall_s": wall, "poll_end_minus_last_finished_s": t1 - t_last_finished,
    }


# ----------------------------------------------------------------------------- output


def fmt_s(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def table(headers: list[str], rows: list[list[object]], title: str = "") -> str:
    cells = [[str(c) for c in headers]] + [["-" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [all(re.fullmatch(r"[-+]?[\d.,]+%?|-|", r[i]) for r in cells[1:]) and len(cells) > 1
               for i in range(len(headers))]

    def line(row):
        return "| " + " | ".join(c.rjust(w) if numeric[i] else c.ljust(w)
                                 for i, (c, w) in enumerate(zip(row, widths))) + " |"
    out = []
    if title:
        out.append(title)
    out.append(line(cells[0]))
    out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    out += [line(r) for r in cells[1:]]
    return "\n".join(out)


def verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("PASS" if ok else "FAIL")


def write_result(name: str, rows: list[dict], extra: dict | None = None) -> None:
    """The benchmark's summary rows (figure, n, value, target, result) as JSON to
    $BENCH_RESULT, from which run.sh makes the result record."""
    path = os.environ.get("BENCH_RESULT")
    if path:
        with open(path, "w") as f:
            json.dump({"bench": name, "rows": rows, **(extra or {})}, f, indent=1)


# ------------------------------------------------- the service's SQL, read from src/


STRING = r'"((?:[^"\\]|\\.)*)"'


def literal(text: str) -> str:
    """A Rust string literal's content: line continuations and escapes undone."""
    text = re.sub(r"\\\n\s*", "", text)
    return text.replace('\\"', '"').replace("\\\\", "\\")


def macro(source: str, name: str) -> str:
    """The text of `name!()`: the first arm of `macro_rules! name`."""
    match = re.search(r"macro_rules! " + name + r" \{\s*\(\) => \{\s*" + STRING, source, re.S)
    if not match:
        sys.exit(f"macro {name} not found in the source")
    return literal(match.group(1))


def constant(source: str, name: str) -> str:
    """The text of `const NAME: &str = "...";` or `= concat!("...", macro!(), ...);`
    (or `pub const`), on one line."""
    match = re.search(r"const " + name + r": &str = (concat!\((.*?)\);|" + STRING + ";)", source, re.S)
    if not match:
        sys.exit(f"{name} not found in the source")
    if match.group(2) is None:
        text = literal(match.group(3))
    else:
        parts = re.findall(STRING + r"|(\w+)!\(\)", match.group(2))
        text = "".join(literal(s) if not m else macro(source, m) for s, m in parts)
    return " ".join(text.split())


# ------------------------------------------------------------------------------ lanes


def lane_names(count: int) -> list[str]:
    """`default` and count - 1 more: lane-1, lane-2, ..."""
    return ["default"] + [f"lane-{i}" for i in range(1, count)]


def write_lanes_config(path: Path, providers: dict[str, str], lanes: dict[str, str], batch_size: int,
                       interval: str, send_concurrency: int) -> Path:
    """A DISPATCH_CONFIG file (deploy/dispatch.example.toml): `providers` maps a provider
    name to its send URL (each with token_env SMS_API_TOKEN), `lanes` a lane name to the
    provider it sends through; every lane has the same schedule."""
    out = []
    for name, url in providers.items():
        out += ["[[provider]]", f'name = "{name}"', 'kind = "http-json"', f'url = "{url}"',
                'token_env = "SMS_API_TOKEN"', ""]
    for name, provider in lanes.items():
        out += ["[[lane]]", f'name = "{name}"', f"batch_size = {batch_size}", f'interval = "{interval}"',
                'unit = "messages"', f'providers = ["{provider}"]', f"send_concurrency = {send_concurrency}", ""]
    path.write_text("\n".join(out))
    return path


def lanes_view(replicas: list) -> dict[str, dict] | None:
    """GET /api/lanes of the first live replica that answers: per lane, its leader
    (replica id or None), epoch, assignee, pending and sending."""
    for r in replicas:
        if not r.alive():
            continue
        code, body = http(r.url + "/api/lanes", timeout=3)
        if code != 200:
            continue
        out = {}
        for lane in json.loads(body)["lanes"]:
            leader = lane.get("leader") or {}
            out[lane["name"]] = {"leader": leader.get("replica_id"), "epoch": leader.get("epoch"),
                                 "assigned_to": lane.get("assigned_to"), "pending": lane.get("pending"),
                                 "sending": lane.get("sending")}
        return out
    return None


def wait_spread(replicas: list, lanes: list[str], stable_s: float, timeout: float,
                extra_check=None, balanced: bool = True) -> dict[str, dict]:
    """Waits until GET /api/lanes shows every lane of `lanes` with a leader, no replica
    leading more than ceil(lanes / live replicas) (unless `balanced` is false), and the
    same leaders and epochs for `stable_s` seconds (and `extra_check(view)`, if given,
    holds at the end); returns that view."""
    alive = max(1, sum(1 for r in replicas if r.alive()))
    most = -(-len(lanes) // alive)
    since, last = None, None
    deadline = time.time() + timeout
    while True:
        view = lanes_view(replicas)
        ok = view is not None and all(view.get(lane, {}).get("leader") for lane in lanes)
        if ok and balanced:
            per: dict[str, int] = {}
            for lane in lanes:
                per[view[lane]["leader"]] = per.get(view[lane]["leader"], 0) + 1
            ok = max(per.values()) <= most
        key = None if not ok else tuple((lane, view[lane]["leader"], view[lane]["epoch"]) for lane in lanes)
        if key is None or key != last:
            since, last = time.time(), key
        elif time.time() - since >= stable_s and (extra_check is None or extra_check(view)):
            return view
        if time.time() > deadline:
            raise TimeoutError(f"lanes not spread after {timeout:.0f} s: {view}")
        time.sleep(0.25)


def machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs from /proc/stat (idle and iowait count as not busy)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal
    return total - fields[3] - fields[4], total


def socket_ports(pid: int) -> set[int]:
    """Local TCP ports of the sockets process `pid` holds open (/proc/PID/fd and
    /proc/net/tcp{,6}): matched to pg_stat_activity.client_port, they say which
    replica a PostgreSQL session belongs to."""
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    except OSError:
        return set()
    ports = set()
    for table_path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table_path) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    if len(parts) > 9 and parts[9] in inodes:
                        ports.add(int(parts[1].rsplit(":", 1)[1], 16))
        except OSError:
            pass
    return ports


class PoolSampler:
    """Samples, every `every` seconds on a thread of its own, each replica's pool
    sessions in pg_stat_activity (application_name message-dispatcher; the leader's
    fence and watch sessions carry other names): how many there are and how many are
    busy (not idle). A replica whose pool is busy in every session is waiting for
    connections; DB_POOL_SIZE is then a bound. Sessions waiting on a lock are counted too."""

    def __init__(self, replicas: list, db: str, every: float = 0.5):
        import threading
        self.replicas, self.db, self.every = replicas, db, every
        self.samples: dict[str, list[tuple[int, int, int]]] = {r.id: [] for r in replicas}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(10)

    def _run(self):
        while not self._stop.wait(self.every):
            try:
                rows = psql("SELECT client_port || '|' || coalesce(state, '') || '|' || "
                            "coalesce(wait_event_type, '') FROM pg_stat_activity "
                            "WHERE application_name = 'message-dispatcher' AND client_port IS NOT NULL",
                            self.db, timeout=5).splitlines()
            except Exception:  # noqa: BLE001 - a missed sample is no result
                continue
            sessions = [row.split("|") for row in rows if row.count("|") == 2]
            for r in self.replicas:
                if not r.alive():
                    continue
                ports = socket_ports(r.pid)
                mine = [s for s in sessions if int(s[0]) in ports]
                busy = sum(1 for s in mine if s[1] != "idle")
                locked = sum(1 for s in mine if s[2] == "Lock")
                self.samples[r.id].append((len(mine), busy, locked))

    def summary(self, pool_size: int) -> dict[str, dict]:
        out = {}
        for rid, samples in self.samples.items():
            if not samples:
                out[rid] = {"samples": 0}
                continue
            out[rid] = {
                "samples": len(samples),
                "sessions_max": max(s[0] for s in samples),
                "busy_mean": statistics.fmean(s[1] for s in samples),
                "busy_max": max(s[1] for s in samples),
                "all_busy_share": sum(1 for s in samples if s[1] >= pool_size) / len(samples),
                "lock_waits_max": max(s[2] for s in samples),
            }
        return out
