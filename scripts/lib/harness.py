"""The benchmarks' shared harness (standard library only): settings from the
environment, processes, CPU and memory from /proc, log parsing, replicas, the mock
provider, one drain, and tables. The measurements are in bench_<name>.py, run through
scripts/bench.py.

Environment from bench_lib.sh: BIN, BENCH_DIR, PG_BIN, PG_PORT, REDIS_PORT,
DATABASE_URL, REDIS_URL. Every process started here inherits MD_BENCH_DIR (the
cleanup trap kills only processes that carry it) and is listed in $BENCH_DIR/pids.
A benchmark writes its summary rows as JSON to $BENCH_RESULT when that is set
(bench-all.sh combines them).
"""

from __future__ import annotations

import json
import os
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

