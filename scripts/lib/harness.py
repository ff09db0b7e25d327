"""The Python harness of every script under scripts/ (standard library only): settings
from the environment, free ports, processes started under a work directory and tracked
for the cleanup, the replicas and the mock provider, clients for HTTP, PostgreSQL
(psql) and Redis (redis-cli), and the replicas' JSON logs. Its bash counterpart is
scripts/lib/harness.sh, which sets up what this module reads from the environment:

    BIN       the message-dispatcher binary
    WORK      the run's work directory (work_init): logs/ and the pid list
    PG_PORT   the run's PostgreSQL on 127.0.0.1, database messages_db
    REDIS_PORT

Every process started here carries MD_WORK=$WORK in its environment and is listed in
$WORK/pids, as harness.sh's track does: its cleanup stops exactly those.

As a program: `harness.py free-port [PREFERRED]` prints a free port (harness.sh's
free_port).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HARNESS_SH = ROOT / "scripts" / "lib" / "harness.sh"
BIN = os.environ.get("BIN", "")
WORK = Path(os.environ.get("WORK", "/nonexistent"))


# --------------------------------------------------------------------------- settings


def env(name: str, default: str | None = None) -> str:
    """The variable's value; `default` when it is unset or blank (none: the run stops)."""
    value = os.environ.get(name, "")
    if value.strip() == "":
        if default is None:
            sys.exit(f"{Path(sys.argv[0]).name}: {name} is not set")
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


# ------------------------------------------------------------------------------ ports


def free_port(preferred: int = 0) -> int:
    """The preferred port if free, else any free port. Checked with SO_REUSEADDR, as
    every server here binds: a port whose last connections linger in TIME_WAIT after a
    stop is free for them, so a restart keeps its ports."""
    for port in ([preferred] if preferred else []) + [0]:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise OSError("no free port")


# -------------------------------------------------------------------------- processes


def child_env(extra: dict[str, str | None] | None = None) -> dict[str, str]:
    """This process's environment with the work directory's marker, plus `extra` (a
    None value removes the variable)."""
    out = {**os.environ, "MD_WORK": str(WORK)}
    for name, value in (extra or {}).items():
        if value is None:
            out.pop(name, None)
        else:
            out[name] = value
    return out


def track(pid: int) -> None:
    with open(WORK / "pids", "a") as f:
        f.write(f"{pid}\n")


def spawn(cmd: list[str], name: str, extra_env: dict[str, str | None] | None = None,
          **popen) -> subprocess.Popen:
    """Starts `cmd`, tracked, in a session of its own (a Ctrl-C at the terminal reaches
    the script, which stops its processes itself; a replica sees only the signals the
    run chooses). Its output is appended to logs/<name>.log unless `popen` redirects
    stdout, in which case stderr alone goes there."""
    with open(WORK / "logs" / f"{name}.log", "ab") as log:
        popen.setdefault("stdin", subprocess.DEVNULL)
        if popen.setdefault("stdout", log) is log:
            popen.setdefault("stderr", subprocess.STDOUT)
        else:
            popen.setdefault("stderr", log)
        proc = subprocess.Popen(cmd, env=child_env(extra_env), start_new_session=True, **popen)
    track(proc.pid)
    return proc


def run_child(cmd: list[str]) -> subprocess.CompletedProcess:
    """subprocess.run for the long-running tools (wrk, pgbench), tracked so that the
    cleanup stops it if the run is interrupted."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())
    track(proc.pid)
    out, err = proc.communicate()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def stop(proc: subprocess.Popen | None, sig: int = signal.SIGTERM, timeout: float = 40) -> float:
    """Sends `sig` to `proc` (after a SIGCONT: a stopped process acts on nothing else),
    waits up to `timeout`, then SIGKILLs it; returns the seconds until it exited."""
    if proc is None or proc.poll() is not None:
        return 0.0
    started = time.time()
    proc.send_signal(signal.SIGCONT)
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    return time.time() - started


def harness_sh(function: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Runs a function of harness.sh (start_postgres, stop_redis, ...)."""
    script = 'source "$1"; f="$2"; shift 2; "$f" "$@"'
    return subprocess.run(["bash", "-c", script, "_", str(HARNESS_SH), function, *args],
                          capture_output=True, text=True, timeout=timeout)


def wait_until(predicate, timeout: float, step: float = 0.1, what: str = "condition"):
    deadline = time.time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.time() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(step)


# ---------------------------------------------------------------------------- clients


def request(url: str, method: str = "GET", body: object | None = None,
            timeout: float = 5) -> tuple[int, bytes]:
    """(status, body) of one request, JSON `body` if given; raises OSError when no
    answer arrives."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("content-type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def http(url: str, method: str = "GET", body: object | None = None, timeout: float = 5) -> tuple[int, bytes]:
    """request(), with status 0 when no answer arrives."""
    try:
        return request(url, method, body, timeout)
    except (urllib.error.URLError, ConnectionError, TimeoutError, socket.timeout):
        return 0, b""


def http_json(url: str, **kw) -> object:
    code, body = http(url, **kw)
    if code == 0:
        raise RuntimeError(f"no answer from {url}")
    return json.loads(body)


def decoded(raw: bytes) -> object:
    """A body as JSON if it parses, else as text."""
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode("utf-8", "replace")


def psql(sql: str, db: str = "messages_db", timeout: float | None = None) -> str:
    """`sql` on the run's PostgreSQL: unaligned tuples, stripped. Raises RuntimeError
    with psql's message on failure."""
    out = subprocess.run(
        ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", env("PG_PORT"),
         "-U", "postgres", "-d", db, "-tAc", sql],
        capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError("psql: " + out.stderr.strip())
    return out.stdout.strip()


def psql_json(select: str, timeout: float | None = 30) -> list:
    """The rows of `select` as a list of dicts."""
    return json.loads(psql("SELECT coalesce(json_agg(t), '[]'::json) FROM (%s) t" % select, timeout=timeout))


def redis_cli(*args: str, check: bool = True, timeout: float = 5) -> str:
    out = subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", env("REDIS_PORT"), *args],
                         check=check, capture_output=True, text=True, timeout=timeout)
    return out.stdout.strip()


def leader_row(timeout: float | None = None) -> tuple[int, str | None]:
    """(epoch, holder) of the fence row: the replica that last won the lock."""
    text = psql("SELECT epoch::text || ',' || coalesce(holder, '') FROM dispatcher_leader WHERE id = 1",
                timeout=timeout)
    epoch, holder = text.split(",", 1)
    return int(epoch), holder or None


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


# --------------------------------------------------------------------------- replicas


class Replica:
    """One `message-dispatcher serve` under a fixed REPLICA_ID, restartable: each start
    is a new process (an incarnation) logging to logs/<id>.<incarnation>.log.
    `env` is added to the inherited environment (a None value removes a variable);
    `port` 0 takes a free port at every start. `bin` runs another binary than BIN (an
    older release, say) and `replica_id` names it otherwise than replica-N."""

    def __init__(self, index: int, env: dict[str, str | None] | None = None, port: int = 0,
                 bin: str | None = None, replica_id: str | None = None):
        self.index, self.id = index, replica_id or f"replica-{index}"
        self.bin = bin or BIN
        self.env = dict(env or {})
        self.fixed_port = port
        self.port = port
        self.proc: subprocess.Popen | None = None
        self.incarnation = 0
        self.logs: list[Path] = []
        self.tail: LogTail | None = None
        self.ready_at = 0.0

    def start(self) -> None:
        self.incarnation += 1
        self.port = self.fixed_port or free_port()
        name = f"{self.id}.{self.incarnation}"
        while (WORK / "logs" / f"{name}.log").exists():  # a later run, same index
            name += "+"
        self.logs.append(WORK / "logs" / f"{name}.log")
        self.tail = LogTail(self.log)
        self.proc = spawn([self.bin, "serve"], name, {
            "SERVER_PORT": str(self.port), "REPLICA_ID": self.id, "LOG_FORMAT": "json", **self.env})

    @property
    def log(self) -> Path | None:
        """The current incarnation's log."""
        return self.logs[-1] if self.logs else None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, sig: int) -> None:
        """Sends `sig` if the process runs."""
        if self.alive():
            os.kill(self.proc.pid, sig)

    def wait(self, timeout: float) -> int | None:
        """The exit code once the process has exited; None if it still runs after `timeout`."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def wait_ready(self, timeout: float = 60, step: float = 0.05) -> None:
        def ready():
            if not self.alive():
                raise RuntimeError(f"{self.id} exited (see {self.log})")
            return http(self.url + "/health/ready")[0] == 200
        wait_until(ready, timeout, step, f"{self.id} ready")
        self.ready_at = time.time()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 40) -> float:
        return stop(self.proc, sig, timeout)


def start_replicas(count: int, extra_env: dict[str, str]) -> list[Replica]:
    replicas = [Replica(i + 1, extra_env) for i in range(count)]
    for r in replicas:
        r.start()
    for r in replicas:
        r.wait_ready()
    return replicas


def start_mock(latency_ms: int = 0) -> tuple[subprocess.Popen, str]:
    """A mock provider on a free port; (process, base URL)."""
    port = free_port()
    proc = spawn([BIN, "mock-provider", "--port", str(port), "--latency-ms", str(latency_ms)],
                 f"mock-provider.{port}")
    base = f"http://127.0.0.1:{port}"
    wait_until(lambda: http(base + "/health")[0] == 200, 20, 0.05, "mock provider")
    return proc, base


def main() -> int:
    if len(sys.argv) in (2, 3) and sys.argv[1] == "free-port":
        print(free_port(int(sys.argv[2]) if len(sys.argv) == 3 else 0))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
