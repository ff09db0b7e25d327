#!/usr/bin/env python3
"""The measuring half of scripts/bench-*.sh (standard library only).

The bash scripts install what is missing, build the binary, start PostgreSQL and
Redis under a temporary directory and register a cleanup trap; then they call one of
the subcommands below, which start the replicas and the mock provider themselves,
measure, verify and print a table:

    bench_lib.py failover     kill/terminate the leader of 3 replicas, time the handover
    bench_lib.py throughput   drain N messages; pgbench reference of the same SQL
    bench_lib.py footprint    idle RSS/CPU of leader and follower; RSS after a drain
    bench_lib.py api          wrk against four endpoints of one replica
    bench_lib.py peers        ours against graphile-worker and pg-boss (bench_peers.py)
    bench_lib.py combine F..  one table out of the result files of the others
    bench_lib.py machine      date, CPU, memory, binary version (one line each)

Environment from bench_lib.sh: BIN, BENCH_DIR, PG_BIN, PG_PORT, REDIS_PORT,
DATABASE_URL, REDIS_URL. Every process started here inherits MD_BENCH_DIR (the
cleanup trap kills only processes that carry it) and is listed in $BENCH_DIR/pids.
A subcommand writes its summary rows as JSON to $BENCH_RESULT when that is set
(bench-all.sh combines them).
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import datetime
from pathlib import Path

MIB = 1024 * 1024
CLK_TCK = os.sysconf("SC_CLK_TCK")
SCRIPTS = Path(__file__).resolve().parent


def env(name: str, default: str | None = None) -> str:
    value = os.environ.get(name, "")
    if value == "":
        if default is None:
            sys.exit(f"bench_lib.py: {name} is not set")
        return default
    return value


def env_int(name: str, default: int) -> int:
    return int(env(name, str(default)))


def env_float(name: str, default: float) -> float:
    return float(env(name, str(default)))


def parse_duration(text: str) -> float:
    """'15s', '200ms', '2m' -> seconds."""
    total, rest = 0.0, text.strip()
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", rest):
        total += float(number) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
    if total == 0 and rest not in ("0", "0s", "0ms"):
        raise ValueError(f"not a duration: {text}")
    return total


def note(msg: str) -> None:
    print(f"\033[1m==>\033[0m {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- processes


BIN = os.environ.get("BIN", "")
BENCH_DIR = Path(os.environ.get("BENCH_DIR", "/nonexistent"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(name: str, args: list[str], extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    """Starts the binary with `args`, output appended to logs/<name>.log."""
    log = open(BENCH_DIR / "logs" / f"{name}.log", "ab")
    child_env = dict(os.environ)
    child_env["MD_BENCH_DIR"] = str(BENCH_DIR)
    child_env.update(extra_env or {})
    proc = subprocess.Popen([BIN, *args], stdout=log, stderr=subprocess.STDOUT, env=child_env)
    log.close()
    with open(BENCH_DIR / "pids", "a") as f:
        f.write(f"{proc.pid}\n")
    return proc


def run_child(cmd: list[str]) -> subprocess.CompletedProcess:
    """subprocess.run for the long-running tools (wrk, pgbench): the pid is recorded so
    the cleanup trap can stop it if the benchmark is interrupted."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "MD_BENCH_DIR": str(BENCH_DIR)})
    with open(BENCH_DIR / "pids", "a") as f:
        f.write(f"{proc.pid}\n")
    out, err = proc.communicate()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def stop(proc: subprocess.Popen | None, sig: int = signal.SIGTERM, timeout: float = 40) -> float:
    """Signals `proc` (ours: a Popen child) and waits; returns seconds until it exited."""
    if proc is None or proc.poll() is not None:
        return 0.0
    started = time.time()
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    return time.time() - started


def http(url: str, method: str = "GET", body: object | None = None, timeout: float = 5) -> tuple[int, bytes]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("content-type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()
    except (urllib.error.URLError, ConnectionError, TimeoutError, socket.timeout):
        return 0, b""


def http_json(url: str, **kw) -> object:
    code, body = http(url, **kw)
    if code == 0:
        raise RuntimeError(f"no answer from {url}")
    return json.loads(body)


def wait_until(predicate, timeout: float, step: float = 0.1, what: str = "condition"):
    deadline = time.time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.time() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(step)


def psql(sql: str, db: str = "messages_db") -> str:
    out = subprocess.run(
        ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", env("PG_PORT"),
         "-U", "postgres", "-d", db, "-tAc", sql],
        check=True, capture_output=True, text=True)
    return out.stdout.strip()


def redis_cli(*args: str) -> str:
    out = subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", env("REDIS_PORT"), *args],
                         check=True, capture_output=True, text=True)
    return out.stdout.strip()


def seed(count: int, db: str = "messages_db") -> None:
    url = f"postgres://postgres@127.0.0.1:{env('PG_PORT')}/{db}"
    subprocess.run([BIN, "seed", "--count", str(count)], check=True, stdout=subprocess.DEVNULL,
                   env={**os.environ, "DATABASE_URL": url, "LOG_FORMAT": "json"})
    psql("VACUUM ANALYZE messages", db)
    psql("CHECKPOINT", db)


def reset_queue(db: str = "messages_db") -> None:
    psql("TRUNCATE messages RESTART IDENTITY; UPDATE dispatcher_leader SET last_batch_at = NULL", db)


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
    pidfile = BENCH_DIR / "postgres" / "data" / "postmaster.pid"
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
        return cpu_ticks(int((BENCH_DIR / "redis" / "redis.pid").read_text().strip()))
    except OSError:
        return 0


# ------------------------------------------------------------------------------- logs


def parse_ts(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


class LogTail:
    """Reads the JSON lines appended to a log file since the last call."""

    def __init__(self, path: Path):
        self.path, self.offset, self.partial = path, 0, b""

    def new_events(self) -> list[dict]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        data = self.partial + data
        lines = data.split(b"\n")
        self.partial = lines.pop()
        events = []
        for line in lines:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                events.append(event)
        return events


def span_field(event: dict, field: str):
    for span in event.get("spans", []):
        if field in span:
            return span[field]
    return event.get(field)


def read_events(path: Path, messages: set[str]) -> list[dict]:
    """Events whose message is in `messages` (substring test first: logs are large)."""
    out = []
    needles = [f'"message":"{m}"'.encode() for m in messages]
    with open(path, "rb") as f:
        for line in f:
            if any(n in line for n in needles):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
    return out


# ---------------------------------------------------------------------------- replicas


class Replica:
    """One `message-dispatcher serve` process (restartable under the same id)."""

    def __init__(self, index: int, extra_env: dict[str, str]):
        self.index, self.id, self.extra_env = index, f"replica-{index}", extra_env
        self.proc: subprocess.Popen | None = None
        self.incarnation = 0
        self.port = 0
        self.log: Path | None = None
        self.tail: LogTail | None = None
        self.ready_at = 0.0

    def start(self) -> None:
        self.incarnation += 1
        self.port = free_port()
        name = f"{self.id}.{self.incarnation}"
        while (BENCH_DIR / "logs" / f"{name}.log").exists():  # a later run, same index
            name += "+"
        self.log = BENCH_DIR / "logs" / f"{name}.log"
        self.tail = LogTail(self.log)
        self.proc = spawn(name, ["serve"], {
            "SERVER_PORT": str(self.port), "REPLICA_ID": self.id, "LOG_FORMAT": "json",
            **self.extra_env})

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout: float = 60, step: float = 0.05) -> None:
        def ready():
            if not self.alive():
                raise RuntimeError(f"{self.id} exited (see {self.log})")
            return http(self.url + "/health/ready")[0] == 200
        wait_until(ready, timeout, step, f"{self.id} ready")
        self.ready_at = time.time()

    def stop(self, sig: int = signal.SIGTERM) -> float:
        return stop(self.proc, sig)


def start_replicas(count: int, extra_env: dict[str, str]) -> list[Replica]:
    replicas = [Replica(i + 1, extra_env) for i in range(count)]
    for r in replicas:
        r.start()
    for r in replicas:
        r.wait_ready()
    return replicas


def leader_row_parsed() -> tuple[int, str | None]:
    text = psql("SELECT epoch::text || ',' || coalesce(holder, '') FROM dispatcher_leader WHERE id = 1")
    epoch, holder = text.split(",", 1)
    return int(epoch), holder or None


def start_mock(latency_ms: int = 0) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = spawn(f"mock-provider.{port}", ["mock-provider", "--port", str(port),
                                           "--latency-ms", str(latency_ms)])
    base = f"http://127.0.0.1:{port}"
    wait_until(lambda: http(base + "/health")[0] == 200, 20, 0.05, "mock provider")
    return proc, base


# ------------------------------------------------------------------------------ output


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


def write_result(name: str, rows: list[dict], extra: dict | None = None) -> None:
    path = os.environ.get("BENCH_RESULT")
    if path:
        with open(path, "w") as f:
            json.dump({"bench": name, "rows": rows, **(extra or {})}, f, indent=1)


def verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("PASS" if ok else "FAIL")


# ---------------------------------------------------------------------------- failover


def cmd_failover() -> int:
    kills, terms, stops = env_int("KILLS", 10), env_int("TERMS", 10), env_int("STOPS", 3)
    ttl, retry = parse_duration(env("TTL", "15s")), parse_duration(env("RETRY", "2s"))
    interval = env("INTERVAL", "20ms")
    settle = env_float("SETTLE", 2.0)
    bound = ttl + retry
    extra = {
        "DISTRIBUTED_LOCK_TTL": env("TTL", "15s"), "LOCK_RETRY_INTERVAL": env("RETRY", "2s"),
        "BATCH_SIZE": env("FAILOVER_BATCH_SIZE", "2"), "PROCESSING_INTERVAL": interval,
        "SHUTDOWN_TIMEOUT": env("SHUTDOWN_TIMEOUT", "30s"), "SEND_CONCURRENCY": "1",
    }
    mock, mock_url = start_mock(0)
    os.environ["SMS_API_URL"] = mock_url + "/send"
    seed(env_int("FAILOVER_SEED", 50_000))
    note(f"3 replicas, TTL {env('TTL', '15s')}, retry {env('RETRY', '2s')}, "
         f"BATCH_SIZE {extra['BATCH_SIZE']}, PROCESSING_INTERVAL {interval}")
    replicas = start_replicas(3, extra)
    by_id = {r.id: r for r in replicas}

    def scan(replica: Replica, events_seen: dict) -> None:
        """Records each replica's "became leader" and first "batch claimed" (with the
        claimed ids) per epoch."""
        for ev in replica.tail.new_events():
            msg = ev.get("message")
            if msg == "became leader":
                events_seen.setdefault(("became", replica.id, ev.get("epoch")), parse_ts(ev["timestamp"]))
            elif msg == "batch claimed":
                key = ("claim", replica.id, span_field(ev, "epoch"))
                if key not in events_seen:
                    ids = [int(x) for x in re.findall(r"\d+", str(span_field(ev, "ids") or ""))]
                    events_seen[key] = (parse_ts(ev["timestamp"]), ids)

    events: dict = {}

    def steady_leader(timeout: float) -> tuple[int, Replica]:
        """The current leader once it has claimed a batch in its term."""
        def check():
            for r in replicas:
                scan(r, events)
            epoch, holder = leader_row_parsed()
            r = by_id.get(holder or "")
            if r and r.alive() and ("claim", r.id, epoch) in events:
                return epoch, r
            return None
        return wait_until(check, timeout, 0.1, "a leader that claims")

    def first_send(ids: list[int]) -> float | None:
        """When the provider received the first of `ids` (wall clock seconds)."""
        wanted = {str(i) for i in ids}
        arrivals = [r["at_us"] for r in http_json(mock_url + "/requests") if r["key"] in wanted]
        return min(arrivals) / 1e6 if arrivals else None

    plan = []
    for i in range(max(kills, terms, stops)):
        if i < kills:
            plan.append("SIGKILL")
        if i < terms:
            plan.append("SIGTERM")
        if i < stops:
            plan.append("SIGSTOP")
    results: list[dict] = []
    for n, kind in enumerate(plan, 1):
        for r in replicas:
            if not r.alive():
                raise RuntimeError(f"{r.id} died unexpectedly (see {r.log})")
        newest_ready = max(r.ready_at for r in replicas)
        time.sleep(max(0.0, newest_ready + settle - time.time()))
        epoch, leader = steady_leader(bound * 2 + 30)
        # A random point of the lease's extension cycle (TTL/3), so kills do not line
        # up with extensions.
        time.sleep(random.uniform(0, ttl / 3))
        epoch_now, holder_now = leader_row_parsed()
        if (epoch_now, holder_now) != (epoch, leader.id):
            epoch, leader = steady_leader(bound * 2 + 30)
        for r in replicas:  # drop what was logged before the kill
            scan(r, events)
        sig = {"SIGKILL": signal.SIGKILL, "SIGTERM": signal.SIGTERM, "SIGSTOP": signal.SIGSTOP}[kind]
        t_kill = time.time()
        os.kill(leader.pid, sig)
        others = [r for r in replicas if r is not leader]
        row = {"round": n, "kind": kind, "old": leader.id, "old_epoch": epoch, "new": None,
               "elected": None, "claim": None, "send": None, "exit": None}
        deadline = t_kill + bound * 2 + 20
        while time.time() < deadline:
            for r in others:
                scan(r, events)
            became = [(k[1], k[2], t) for k, t in events.items()
                      if k[0] == "became" and k[2] is not None and k[2] > epoch and t >= t_kill - 1]
            if became:
                new_id, new_epoch, t_became = min(became, key=lambda b: b[1])
                row.update(new=new_id, new_epoch=new_epoch, elected=t_became - t_kill)
                claimed = events.get(("claim", new_id, new_epoch))
                if claimed is not None:
                    row["claim"] = claimed[0] - t_kill
                    t_send = first_send(claimed[1])
                    if t_send is not None:
                        row["send"] = t_send - t_kill
                        break
            if row["exit"] is None and kind != "SIGSTOP" and leader.proc.poll() is not None:
                row["exit"] = time.time() - t_kill
            time.sleep(0.01)
        if kind == "SIGSTOP":
            # Thawed, it finds its deadlines passed and its epoch fenced out; then a
            # SIGTERM returns it to the pool as a new process, like the others.
            os.kill(leader.pid, signal.SIGCONT)
            time.sleep(1.0)
            os.kill(leader.pid, signal.SIGTERM)
        leader.proc.wait(60)
        if row["exit"] is None:
            row["exit"] = time.time() - t_kill
        results.append(row)
        note(f"round {n:2d} {kind}: {row['old']} (epoch {epoch}) -> {row['new']}: elected "
             f"{fmt_s(row['elected'])} s, first claim {fmt_s(row['claim'])} s, next send {fmt_s(row['send'])} s")
        leader.start()
        leader.wait_ready()

    stats = http_json(mock_url + "/stats")
    counts = dict(line.split("|") for line in psql(
        "SELECT status || '|' || count(*) FROM messages GROUP BY status").splitlines())
    for r in replicas:
        r.stop()
    stop(mock)

    detail = table(
        ["round", "signal", "killed", "epoch", "new leader", "kill->elected s", "kill->first claim s",
         "kill->next send s", "old exited s"],
        [[r["round"], r["kind"], r["old"], r["old_epoch"], r["new"] or "TIMEOUT", fmt_s(r["elected"]),
          fmt_s(r["claim"]), fmt_s(r["send"]), fmt_s(r["exit"]) if r["kind"] == "SIGTERM" else "-"]
         for r in results],
        "Failover rounds")
    summary_rows, json_rows = [], []
    for kind in ("SIGKILL", "SIGTERM", "SIGSTOP"):
        rows = [r for r in results if r["kind"] == kind]
        if not rows:
            continue
        for what, key in (("kill -> new leader elected", "elected"), ("kill -> first claim", "claim"),
                          ("kill -> next send", "send")):
            values = [r[key] for r in rows if r[key] is not None]
            missing = len(rows) - len(values)
            lo = min(values) if values else None
            med = statistics.median(values) if values else None
            hi = max(values) if values else None
            target, ok = "-", None
            if key == "send" and kind == "SIGKILL":
                target = "median <= 1 s, max <= 2 s"
                ok = missing == 0 and med is not None and med <= 1.0 and hi <= 2.0
            elif key == "send" and kind == "SIGTERM":
                target = "median <= 0.1 s"
                ok = missing == 0 and med is not None and med <= 0.1
            elif key == "send" and kind == "SIGSTOP":
                target = f"every run <= {bound + 1:g} s (TTL + retry + 1 s)"
                ok = missing == 0 and hi is not None and hi <= bound + 1
            summary_rows.append([kind, what, len(values), fmt_s(lo), fmt_s(med), fmt_s(hi),
                                 target, verdict(ok) if missing == 0 else f"FAIL ({missing} timed out)"])
            json_rows.append({"figure": f"failover {kind}: {what}", "n": len(values),
                              "value": f"min {fmt_s(lo)} / med {fmt_s(med)} / max {fmt_s(hi)} s",
                              "target": target, "result": verdict(ok)})
    summary = table(["signal", "measure", "n", "min s", "median s", "max s", "target", "result"], summary_rows,
                    f"Failover: 3 replicas, TTL {env('TTL', '15s')}, retry {env('RETRY', '2s')}, "
                    f"BATCH_SIZE {extra['BATCH_SIZE']}, PROCESSING_INTERVAL {interval}. SIGKILL: the leader's "
                    f"PostgreSQL session ends, a follower takes over after one fence window; SIGTERM: the lock is "
                    f"handed over and announced; SIGSTOP: the paused leader keeps its session, so only its lease "
                    f"expiry (TTL + one retry) deposes it")
    dups = int(stats["duplicates"])
    tail = (f"messages: sent {counts.get('sent', 0)}, sending {counts.get('sending', 0)}, "
            f"pending {counts.get('pending', 0)}; provider: requests {stats['requests']}, unique keys "
            f"{stats['unique_keys']}, duplicates {dups} (at most one per SIGKILL: a send the provider "
            f"accepted just before the kill, resent with the same key, is the documented crash window)")
    ok_dups = dups <= kills
    print()
    print(detail)
    print()
    print(summary)
    print(tail)
    json_rows.append({"figure": "failover: duplicate keys", "n": len(results), "value": str(dups),
                      "target": f"<= {kills} (SIGKILL rounds)", "result": verdict(ok_dups)})
    write_result("failover", json_rows)
    return 0


# -------------------------------------------------------------------------- throughput


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
    """Statements of src/store/queue.rs that scripts/bench/{claim,mark}.sql do not
    replay verbatim (the claimed_by/sent_at/provider id values aside, which are bound
    from pgbench variables); empty when they match or the source is not here."""
    source = SCRIPTS.parent / "src" / "store" / "queue.rs"
    if not source.exists():
        return []
    rust = source.read_text()
    consts = {m.group(1): _sql_norm(m.group(2))
              for m in re.finditer(r'const ([A-Z_]+): &str =\s*"(.*?)";', rust, re.S)}
    for m in re.finditer(r'"(UPDATE dispatcher_leader SET last_batch_at[^"]*)"', rust):
        consts["SET_LAST_BATCH_AT"] = _sql_norm(m.group(1))
    claim = set(_script_statements(SCRIPTS / "bench" / "claim.sql"))
    mark = set(_script_statements(SCRIPTS / "bench" / "mark.sql"))
    wanted = {"LOCK_FENCE": claim, "READ_SCHEDULE": claim, "EXPIRE_DUE": claim, "CLAIM": claim,
              "SET_LAST_BATCH_AT": claim, "CLOSE_BATCH": claim, "MARK_SENT": mark}
    drift = []
    for name, statements in wanted.items():
        if name in consts and consts[name] not in statements:
            drift.append(name)
        elif name not in consts and name in ("LOCK_FENCE", "CLAIM", "MARK_SENT"):
            drift.append(f"{name} (not found in the source)")
    return drift


def pg_reference(concurrency: int, n: int, batch: int, ttl_s: float, timeout_s: float) -> dict:
    """The claim transaction and the per-message mark of src/store/queue.rs, replayed
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
                     "-f", str(SCRIPTS / "bench" / "claim.sql")], db)
    sending = int(psql("SELECT count(*) FROM messages WHERE status = 'sending' AND claim_epoch = 1", db))
    if sending != n:
        raise RuntimeError(f"pgbench claim moved {sending} rows to sending, expected {n}")
    per_client = math.ceil(n / concurrency)
    mark = pgbench(["-c", str(concurrency), "-j", str(min(concurrency, os.cpu_count() or 1)),
                    "-t", str(per_client), "-D", "k=0", "-D", f"nclients={concurrency}",
                    "-D", "first_id=1", "-D", "epoch=1",
                    "-D", f"sent_at={datetime.now().astimezone().isoformat()}",
                    "-D", "provider_id=6f1c2a4e-8b1d-4c55-9d8e-0a7b3c2d1e4f",
                    "-f", str(SCRIPTS / "bench" / "mark.sql")], db)
    sent = int(psql("SELECT count(*) FROM messages WHERE status = 'sent'", db))
    if sent != n:
        raise RuntimeError(f"pgbench mark moved {sent} rows to sent, expected {n}")
    claim_s = 1.0 / claim["tps"]
    marks_per_s = mark["tps"] * n / mark["transactions"]  # transactions past id n update nothing
    limit = batch / (claim_s + batch / marks_per_s)
    reset_queue(db)
    return {"concurrency": concurrency, "claim_ms": claim_s * 1000, "claims_per_s": claim["tps"],
            "marks_per_s": marks_per_s, "limit": limit}


def drain_run(latency_ms: int, concurrency: int, n: int, batch: int, replicas_count: int) -> dict:
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
    epoch, holder = leader_row_parsed()
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
    keys = [d["key"] for d in deliveries]
    ok_db = counts == {"sent": str(n)}
    ok_mock = (stats["requests"] == n and stats["accepted"] == n and stats["unique_keys"] == n
               and stats["duplicates"] == 0)
    ok_keys = sorted(keys, key=int) == [str(i) for i in range(1, n + 1)]
    fifo = None
    if concurrency == 1:
        order = [int(d["key"]) for d in sorted(deliveries, key=lambda d: (d["first_seen_us"], int(d["key"])))]
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


def cmd_throughput() -> int:
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
        msg = (f"scripts/bench/claim.sql or mark.sql no longer replays src/store/queue.rs: "
               f"{', '.join(drift)} changed; update them (ALLOW_SQL_DRIFT=1 runs anyway)")
        if env("ALLOW_SQL_DRIFT", "0") != "1":
            sys.exit("bench_lib.py: " + msg)
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


# --------------------------------------------------------------------------- footprint


def cmd_footprint() -> int:
    idle = env_float("IDLE_SECONDS", 60)
    n = env_int("N", 100_000)
    mock, mock_url = start_mock(0)
    os.environ["SMS_API_URL"] = mock_url + "/send"
    extra = {"SEND_CONCURRENCY": env("SEND_CONCURRENCY", "1")}  # default interval and batch size
    replicas = start_replicas(3, extra)
    epoch, holder = wait_until(lambda: (lambda e_h: e_h if e_h[1] else None)(leader_row_parsed()), 30, 0.2,
                               "a leader")
    time.sleep(env_float("WARMUP", 5))
    epoch, holder = leader_row_parsed()
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
    epoch2, holder2 = leader_row_parsed()
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


# --------------------------------------------------------------------------------- api


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


def cmd_api() -> int:
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
        with open(BENCH_DIR / "logs" / "wrk.log", "a") as f:
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


# ------------------------------------------------------------------------------ peers


def cmd_peers() -> int:
    """The same job through ours, graphile-worker and pg-boss, alternating; the code is in
    scripts/bench_peers.py, which uses this module's helpers."""
    import bench_peers
    return bench_peers.cmd_peers(sys.modules[__name__])


# ---------------------------------------------------------------------------- combine


def machine_lines() -> list[str]:
    model = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kb = int(f.readline().split()[1])
    version = subprocess.run([BIN, "--version"], capture_output=True, text=True).stdout.strip() if BIN else "?"
    return [f"date     {datetime.now().astimezone().isoformat(timespec='seconds')}",
            f"machine  {os.cpu_count()} CPUs ({model}), {mem_kb / 1024 / 1024:.1f} GiB RAM, "
            f"{os.uname().sysname} {os.uname().release}",
            f"binary   {version}"]


def cmd_machine() -> int:
    print("\n".join(machine_lines()))
    return 0


def cmd_combine(paths: list[str]) -> int:
    rows = []
    for p in paths:
        try:
            data = json.loads(Path(p).read_text())
        except (OSError, ValueError):
            rows.append([Path(p).stem, "(no result: the benchmark failed)", "-", "-", "-", "FAIL"])
            continue
        for row in data["rows"]:
            rows.append([data["bench"], row["figure"], row["n"], row["value"], row["target"], row["result"]])
    print("\n".join(machine_lines()))
    print()
    print(table(["bench", "figure", "n", "value", "target", "result"], rows, "All benchmarks"))
    return 0


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    cmd, args = sys.argv[1], sys.argv[2:]
    commands = {"failover": cmd_failover, "throughput": cmd_throughput, "footprint": cmd_footprint,
                "api": cmd_api, "peers": cmd_peers, "machine": cmd_machine}
    if cmd == "combine":
        return cmd_combine(args)
    if cmd not in commands:
        print(__doc__, file=sys.stderr)
        return 2
    return commands[cmd]()


if __name__ == "__main__":
    sys.exit(main())
