#!/usr/bin/env python3
"""Chaos soak driver and checker (issue 5). Started by scripts/chaos.sh, which builds the
binary, starts PostgreSQL, Redis and the mock provider, migrates, installs the audit
triggers (scripts/chaos_audit.sql) and seeds; this program runs the replicas, creates
messages, injects faults, lets the queue settle and checks the result.

Standard library only. Everything it talks to is on 127.0.0.1.

How the rate is checked (check c)
---------------------------------
The contract (SPEC 6, README "Timing rules") is about batch *starts*: the cluster claims
at most BATCH_SIZE rows per batch, and a batch starts only when `last_batch_at +
PROCESSING_INTERVAL` has passed on PostgreSQL's clock. The audit triggers record every
batch start (`last_batch_at`, with the claim transaction's id) and every claimed row
(with the same transaction id), so the contract is checked exactly, with no tolerance:

  c1  every claim transaction moved at most BATCH_SIZE rows to `sending`, set
      `last_batch_at`, and was made under the epoch its replica held;
  c2  consecutive batch starts, cluster-wide, are at least PROCESSING_INTERVAL apart.

What the provider sees is later and spread out: a batch's sends go out one after the
other after its claim (SEND_CONCURRENCY=1), each taking the mock's latency plus the
recording of the previous result, so they arrive within [start, start + S] where S is
the batch's send spread. Two batches start at least I = PROCESSING_INTERVAL apart, so
arrivals of different batches are at least I - S apart, and a window of length
W = I - S can never hold arrivals of two batches, hence never more than BATCH_SIZE:

  c3  every first delivery at the provider (mock `first_seen`, the arrival of the first
      accepted request of a key, on the same host clock as PostgreSQL) follows a claim
      of that message; no window of W = I - T holds more than BATCH_SIZE first
      deliveries, where T = SPREAD_TOLERANCE_MS (default BATCH_SIZE x (latency + 10 ms)
      = 150 ms: 5 sends x (20 ms mock latency + ~10 ms to record the previous result
      and reach the provider)). A batch can still take longer than T: when PostgreSQL
      goes away mid-batch, the leader holds each result until it can record it and only
      then sends the next message, so the rest of that batch and the next (due at once)
      arrive back to back. Such a window is reported as a burst explained by a slow
      batch (its spread is printed); it does not break the contract, which is about
      batch starts, and counts as a violation only with STRICT_RATE=1. A window that no
      slow batch explains is a violation.

Duplicates (check b)
--------------------
The mock counts requests per Idempotency-Key; the dispatcher sets that header to the
message id for every request of a message (src/provider/client.rs), so a key seen twice
is the same message sent twice with the same key, by construction. A repeat is explained
when an earlier claim of the message ended without its result being recorded, in one of
the documented ways: rescued (its replica was killed, frozen or stopped after the
provider accepted and before the result was written; a fault on that replica between
the claim and the rescue is required and printed), or retried after a timeout /
connection error (the answer did not arrive within SMS_API_TIMEOUT). Anything else is
unexplained.
"""

import bisect
import collections
import datetime
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import traceback
import urllib.error
import urllib.request

E = os.environ


def env_int(name, default):
    value = E.get(name, "")
    return int(value) if value.strip() else default


def env_float(name, default):
    value = E.get(name, "")
    return float(value) if value.strip() else default


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORK = E["WORK"]
BIN = E["BIN"]
PG_PORT = int(E["PG_PORT"])
REDIS_PORT = int(E["REDIS_PORT"])
MOCK_PORT = int(E["MOCK_PORT"])
API_PORTS = [int(p) for p in E["API_PORTS"].split()]
DURATION = env_float("DURATION", 300)
SEED = env_int("SEED", random.SystemRandom().randrange(1, 2**31))
BATCH_SIZE = env_int("BATCH_SIZE", 5)
INTERVAL_MS = env_int("PROCESSING_INTERVAL_MS", 300)
TTL_MS = env_int("LOCK_TTL_MS", 2000)
RETRY_MS = env_int("LOCK_RETRY_MS", 250)
SMS_TIMEOUT_MS = env_int("SMS_API_TIMEOUT_MS", 2000)
SHUTDOWN_TIMEOUT_MS = env_int("SHUTDOWN_TIMEOUT_MS", 5000)
FAIL_RATE = env_float("FAIL_RATE", 0.1)
LATENCY_MS = env_int("LATENCY_MS", 20)
SEED_MESSAGES = env_int("SEED_MESSAGES", 150)
CREATE_RATE = env_float("CREATE_RATE", 5.0)
FAULT_GAP_MIN = env_float("FAULT_GAP_MIN", 2.0)
FAULT_GAP_MAX = env_float("FAULT_GAP_MAX", 5.0)
SETTLE_TIMEOUT = env_float("SETTLE_TIMEOUT", 180)
SPREAD_TOLERANCE_MS = env_int("SPREAD_TOLERANCE_MS", BATCH_SIZE * (LATENCY_MS + 10))
STRICT_RATE = E.get("STRICT_RATE", "0") == "1"
# SPEC 6 step 8: a claim is rescued once older than SMS_API_TIMEOUT + TTL + 5 s.
RESCUE_AFTER_MS = SMS_TIMEOUT_MS + TTL_MS + 5000
# Fault mix: relative weights, e.g. FAULTS="kill:3,stop:2,term:2,redis:1,postgres:1".
WEIGHTS = {kind: float(weight) for kind, weight in
           (item.split(":") for item in E.get("FAULTS", "kill:3,stop:2,term:2,redis:1,postgres:1").split(","))}
assert set(WEIGHTS) <= {"kill", "stop", "term", "redis", "postgres"}, "FAULTS: unknown fault kind"
# Share of SIGSTOPs that last past the rescue delay (a frozen sender's claim is rescued).
LONG_STOP_SHARE = env_float("LONG_STOP_SHARE", 0.2)
# Share of replica faults aimed at the current leader (the rest hit a random replica).
AIM_AT_LEADER = env_float("AIM_AT_LEADER", 0.6)
MAX_REPLICAS_IN_FAULT = max(1, len(API_PORTS) - 1)
# SIGTERM: the replica must be gone within this (in-flight sends get SHUTDOWN_TIMEOUT;
# handing back claims may wait for PostgreSQL if it is restarting at that moment).
TERM_EXIT_BOUND_S = SHUTDOWN_TIMEOUT_MS / 1000 + 30

RNG = random.Random(SEED)
PRINT_LOCK = threading.Lock()
RUN_ID = "%08x" % RNG.getrandbits(32)
T0 = time.time()


def iso(ts=None):
    ts = time.time() if ts is None else ts
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).isoformat(timespec="milliseconds")


def say(message):
    line = "[%s +%6.1fs] %s" % (iso()[11:23], time.time() - T0, message)
    with PRINT_LOCK:
        print(line, flush=True)
        with open(os.path.join(WORK, "chaos.log"), "a") as f:
            f.write(line + "\n")


# ----------------------------------------------------------------------------- I/O --

def psql(sql, timeout=15):
    out = subprocess.run(
        ["psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", str(PG_PORT),
         "-U", "postgres", "-d", "messages_db", "-c", sql],
        capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError("psql: " + out.stderr.strip())
    return out.stdout


def psql_json(select, timeout=30):
    text = psql("SELECT coalesce(json_agg(t), '[]'::json) FROM (%s) t" % select, timeout)
    return json.loads(text)


def http(method, url, body=None, timeout=3.0):
    """(status, parsed JSON or text). Raises OSError-like exceptions on transport errors."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("content-type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode("utf-8", "replace")


def lib_sh(function, *args, timeout=60):
    """Runs a helper of scripts/lib.sh (start_postgres, stop_redis, ...)."""
    script = 'source "$1/scripts/lib.sh"; f="$2"; shift 2; "$f" "$@"'
    return subprocess.run(["bash", "-c", script, "_", ROOT, function, *args],
                          capture_output=True, text=True, timeout=timeout)


def mock(path):
    status, body = http("GET", "http://127.0.0.1:%d%s" % (MOCK_PORT, path), timeout=10)
    if status != 200:
        raise RuntimeError("mock provider %s answered %s" % (path, status))
    return body


# ------------------------------------------------------------------------ replicas --

class Replica:
    def __init__(self, index, port):
        self.name = "replica-%d" % index
        self.port = port
        self.proc = None
        self.busy = False          # under a fault right now
        self.incarnations = 0
        self.env = dict(E)
        self.env.update({
            "SERVER_PORT": str(port),
            "REPLICA_ID": self.name,
            "BATCH_SIZE": str(BATCH_SIZE),
            "PROCESSING_INTERVAL": "%dms" % INTERVAL_MS,
            "DISTRIBUTED_LOCK_TTL": "%dms" % TTL_MS,
            "LOCK_RETRY_INTERVAL": "%dms" % RETRY_MS,
            "SMS_API_TIMEOUT": "%dms" % SMS_TIMEOUT_MS,
            "RETRY_BACKOFF_BASE": "200ms",
            "RETRY_BACKOFF_MAX": "1s",
            "SHUTDOWN_TIMEOUT": "%dms" % SHUTDOWN_TIMEOUT_MS,
            "MAX_ATTEMPTS": "0",
            "SEND_CONCURRENCY": "1",
            "AUTO_START": "true",
            "LOG_FORMAT": "json",
            "LOG_LEVEL": E.get("REPLICA_LOG_LEVEL", "info"),
        })
        for name in ("API_TOKEN", "DB_HOST", "REDIS_HOST"):
            self.env.pop(name, None)

    @property
    def log_path(self):
        return os.path.join(WORK, "logs", self.name + ".log")

    @property
    def pid_path(self):
        return os.path.join(WORK, "pids", self.name + ".pid")

    def start(self):
        self.incarnations += 1
        with open(self.log_path, "ab") as log:
            log.write(("--- chaos: start of incarnation %d at %s\n" % (self.incarnations, iso())).encode())
            self.proc = subprocess.Popen([BIN, "serve"], env=self.env, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        with open(self.pid_path, "w") as f:
            f.write(str(self.proc.pid))

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig):
        if self.alive():
            os.kill(self.proc.pid, sig)

    def reap(self, timeout):
        """Waits for the process to exit; returns its exit code or None on timeout."""
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        try:
            os.unlink(self.pid_path)
        except FileNotFoundError:
            pass
        return code

    def stop_for_good(self):
        if self.proc is None:
            return
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        if self.reap(TERM_EXIT_BOUND_S) is None:
            self.signal(signal.SIGKILL)
            self.reap(10)


# -------------------------------------------------------------------------- state --

class Run:
    def __init__(self):
        self.replicas = [Replica(i + 1, port) for i, port in enumerate(API_PORTS)]
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.faults = []             # dicts: kind, target, begin, end, leader, detail
        self.fault_threads = []
        self.infra_busy = False
        self.violations = []
        self.warnings = []
        self.created_ids = {}        # id -> creation time (API answered 201)
        self.create_requests = collections.Counter()
        self.term_exits = []         # (replica, exit code, seconds)
        self.unexpected_exits = []

    def violation(self, text):
        with self.lock:
            self.violations.append(text)
        say("VIOLATION: " + text)

    def warn(self, text):
        with self.lock:
            self.warnings.append(text)
        say("warning: " + text)

    def record_fault(self, kind, target, leader, detail, begin, end):
        fault = {"kind": kind, "target": target, "leader": leader, "detail": detail,
                 "begin": begin, "end": end}
        with self.lock:
            self.faults.append(fault)
        with open(os.path.join(WORK, "faults.jsonl"), "a") as f:
            f.write(json.dumps(fault) + "\n")


RUN = None


def current_leader():
    """The fence row's holder (the replica that last won the lock), or None."""
    try:
        return psql("SELECT holder FROM dispatcher_leader WHERE id = 1", timeout=2).strip() or None
    except Exception:
        return None


# ------------------------------------------------------------------------- faults --

def fault_kill(run, replica, leader):
    begin = time.time()
    say("FAULT kill     %s%s: SIGKILL" % (replica.name, " (leader)" if leader else ""))
    replica.signal(signal.SIGKILL)
    replica.reap(10)
    down = RNG.uniform(0.5, 3.0)
    time.sleep(down)
    replica.start()
    say("       kill     %s restarted after %.1fs" % (replica.name, down))
    run.record_fault("kill", replica.name, leader, "down %.1fs" % down, begin, time.time())


def fault_stop(run, replica, leader):
    begin = time.time()
    # Longer than the lease; one time in five past the rescue delay too, so that a
    # frozen sender's accepted-but-unrecorded message is rescued and resent.
    if RNG.random() < LONG_STOP_SHARE:
        frozen = RESCUE_AFTER_MS / 1000 + RNG.uniform(1.0, 4.0)
    else:
        frozen = TTL_MS / 1000 + RNG.uniform(0.5, 4.0)
    say("FAULT stop     %s%s: SIGSTOP for %.1fs" % (replica.name, " (leader)" if leader else "", frozen))
    replica.signal(signal.SIGSTOP)
    time.sleep(frozen)
    replica.signal(signal.SIGCONT)
    say("       stop     %s: SIGCONT" % replica.name)
    run.record_fault("stop", replica.name, leader, "frozen %.1fs" % frozen, begin, time.time())


def fault_term(run, replica, leader):
    begin = time.time()
    say("FAULT term     %s%s: SIGTERM" % (replica.name, " (leader)" if leader else ""))
    replica.signal(signal.SIGTERM)
    code = replica.reap(TERM_EXIT_BOUND_S)
    took = time.time() - begin
    if code is None:
        run.violation("%s did not exit within %.0fs of SIGTERM (killed)" % (replica.name, TERM_EXIT_BOUND_S))
        replica.signal(signal.SIGKILL)
        replica.reap(10)
    else:
        run.term_exits.append((replica.name, code, took))
        if code != 0:
            run.violation("%s exited with status %s after SIGTERM" % (replica.name, code))
    down = RNG.uniform(0.5, 2.0)
    time.sleep(down)
    replica.start()
    say("       term     %s exited in %.2fs (status %s), restarted after %.1fs" % (replica.name, took, code, down))
    run.record_fault("term", replica.name, leader, "exit %s in %.2fs, down %.1fs" % (code, took, down), begin, time.time())


def fault_redis(run):
    begin = time.time()
    say("FAULT redis    stop")
    lib_sh("stop_redis", os.path.join(WORK, "redis"))
    # stop_redis sends SIGTERM; wait until the port is closed
    for _ in range(100):
        if subprocess.run(["redis-cli", "-p", str(REDIS_PORT), "ping"], capture_output=True).returncode != 0:
            break
        time.sleep(0.05)
    down = RNG.uniform(1.0, 4.0)
    time.sleep(down)
    for attempt in range(5):
        out = lib_sh("start_redis", os.path.join(WORK, "redis"), str(REDIS_PORT))
        if out.returncode == 0:
            break
        time.sleep(1)
    else:
        raise RuntimeError("Redis did not restart: " + out.stderr)
    say("       redis    started again after %.1fs" % down)
    run.record_fault("redis", "redis", None, "down %.1fs" % down, begin, time.time())


def fault_postgres(run):
    begin = time.time()
    say("FAULT postgres fast shutdown")
    lib_sh("stop_postgres", os.path.join(WORK, "postgres"), timeout=120)
    down = RNG.uniform(1.0, 4.0)
    time.sleep(down)
    for attempt in range(5):
        out = lib_sh("start_postgres", os.path.join(WORK, "postgres"), str(PG_PORT), timeout=120)
        if out.returncode == 0:
            break
        time.sleep(1)
    else:
        raise RuntimeError("PostgreSQL did not restart: " + out.stderr)
    say("       postgres started again after %.1fs down" % down)
    run.record_fault("postgres", "postgres", None, "down %.1fs" % down, begin, time.time())


def run_fault(run, kind, replica=None, leader=False):
    try:
        if kind == "kill":
            fault_kill(run, replica, leader)
        elif kind == "stop":
            fault_stop(run, replica, leader)
        elif kind == "term":
            fault_term(run, replica, leader)
        elif kind == "redis":
            fault_redis(run)
        elif kind == "postgres":
            fault_postgres(run)
    except Exception as err:  # the harness failed, not the service
        run.violation("harness: fault %s failed: %s" % (kind, err))
        traceback.print_exc()
    finally:
        with run.lock:
            if replica is not None:
                replica.busy = False
            else:
                run.infra_busy = False


def fault_driver(run, deadline):
    kinds = list(WEIGHTS)
    weights = [WEIGHTS[k] for k in kinds]
    while True:
        gap = RNG.uniform(FAULT_GAP_MIN, FAULT_GAP_MAX)
        if time.time() + gap >= deadline or run.stop_event.wait(gap):
            break
        kind = RNG.choices(kinds, weights)[0]
        replica, leader = None, False
        with run.lock:
            if kind in ("redis", "postgres"):
                if run.infra_busy:
                    continue
                run.infra_busy = True
            else:
                free = [r for r in run.replicas if not r.busy and r.alive()]
                in_fault = sum(1 for r in run.replicas if r.busy)
                if not free or in_fault >= MAX_REPLICAS_IN_FAULT:
                    continue
        if kind not in ("redis", "postgres"):
            holder = current_leader()
            with run.lock:
                free = [r for r in run.replicas if not r.busy and r.alive()]
                if not free:
                    continue
                leading = [r for r in free if r.name == holder]
                # Aim at the leader more often than not: that is where the windows are.
                replica = leading[0] if leading and RNG.random() < AIM_AT_LEADER else RNG.choice(free)
                leader = replica.name == holder
                replica.busy = True
        thread = threading.Thread(target=run_fault, args=(run, kind, replica, leader), daemon=True)
        thread.start()
        run.fault_threads.append(thread)


def watchdog(run):
    """A replica that exits while no fault is applied to it died by itself."""
    while not run.stop_event.wait(0.5):
        with run.lock:
            dead = [r for r in run.replicas if not r.busy and r.proc is not None and r.proc.poll() is not None]
            for r in dead:
                r.busy = True
        for r in dead:
            code = r.proc.returncode
            r.reap(1)
            run.unexpected_exits.append((r.name, code, time.time()))
            run.violation("%s exited by itself with status %s; restarting it" % (r.name, code))
            r.start()
            with run.lock:
                r.busy = False


# ------------------------------------------------------------------------ creator --

CREATORS = 3


def creator(run, deadline, worker):
    """One of CREATORS clients, each at CREATE_RATE / CREATORS messages per second, so
    that a request stuck on a frozen replica does not stall creation."""
    rng = random.Random(SEED * 31 + worker)
    n = 0
    while time.time() < deadline and not run.stop_event.is_set():
        batch = 1 if rng.random() < 0.85 else rng.randint(2, 5)
        items = []
        for _ in range(batch):
            n += 1
            items.append({"phone_number": "+90555%07d" % rng.randrange(10**7),
                          "content": "chaos %s w%d #%d %s" % (RUN_ID, worker, n, "x" * rng.randrange(0, 40))})
        body = items[0] if batch == 1 else items
        port = rng.choice(API_PORTS)
        try:
            status, answer = http("POST", "http://127.0.0.1:%d/api/messages" % port, body, timeout=3.0)
            with run.lock:
                run.create_requests[str(status)] += 1
            if status == 201:
                rows = answer if isinstance(answer, list) else [answer]
                with run.lock:
                    for row in rows:
                        run.created_ids[int(row["id"])] = time.time()
            elif status >= 500 and status != 503:
                run.violation("POST /api/messages on :%d answered %s: %s" % (port, status, str(answer)[:200]))
        except Exception as err:
            with run.lock:
                run.create_requests["no answer (%s)" % type(err).__name__] += 1
        # 1.375 messages per request on average (85 % single, 15 % arrays of 2-5)
        wait = rng.expovariate(CREATE_RATE / CREATORS / 1.375)
        run.stop_event.wait(min(wait, 5.0))


def progress(run, deadline):
    while not run.stop_event.wait(10):
        if time.time() > deadline:
            return
        try:
            stats = mock("/stats")
            delivered = stats["unique_keys"]
        except Exception:
            delivered = "?"
        try:
            counts = dict(tuple(line.split("|")) for line in psql(
                "SELECT status, count(*) FROM messages GROUP BY status", timeout=2).split())
        except Exception:
            counts = "database down"
        say("progress: created via API %d, delivered %s, queue %s, faults %d"
            % (len(run.created_ids), delivered, counts, len(run.faults)))


# ------------------------------------------------------------------------- settle --

def settle(run):
    """All replicas running, dependencies up; waits until nothing is pending or sending."""
    started = time.time()
    for r in run.replicas:
        if not r.alive():
            r.start()
        r.signal(signal.SIGCONT)
    last = None
    while time.time() - started < SETTLE_TIMEOUT:
        try:
            row = psql("SELECT count(*) FILTER (WHERE status = 'pending'), count(*) FILTER (WHERE status = 'sending') "
                       "FROM messages", timeout=5).strip()
            pending, sending = (int(x) for x in row.split("|"))
        except Exception:
            time.sleep(1)
            continue
        if (pending, sending) != last:
            say("settling: %d pending, %d sending" % (pending, sending))
            last = (pending, sending)
        if pending == 0 and sending == 0:
            # Quiet for a moment: nothing may reach the provider any more.
            before = mock("/stats")
            time.sleep(3)
            after = mock("/stats")
            if after["requests"] != before["requests"]:
                run.violation("the provider still received %d requests after the queue was empty"
                              % (after["requests"] - before["requests"]))
            return time.time() - started
        time.sleep(1)
    run.violation("the queue did not settle within %.0fs: %d pending, %d sending"
                  % (SETTLE_TIMEOUT, last[0] if last else -1, last[1] if last else -1))
    return time.time() - started


# ------------------------------------------------------------------------- checks --

US = 1_000_000


def classify_end(t):
    """How a claim ended, from the transition that took the row out of `sending`."""
    if t is None:
        return "open"
    new, error = t["new_status"], t["last_error"] or ""
    if new == "sent":
        return "sent"
    if new == "failed":
        return "failed"
    if new == "pending":
        if "rescued" in error:
            return "rescued"
        if t["new_attempts"] is not None and t["old_attempts"] is not None and t["new_attempts"] < t["old_attempts"]:
            return "released"
        if error.startswith("HTTP "):
            return "retry-http"
        return "retry-noanswer"   # timeout, connection or TLS error: the answer did not arrive
    return "other"


def analyse(run, settle_seconds):
    report = collections.OrderedDict()
    messages = psql_json("SELECT id, phone_number, content, status, attempts, provider_message_id, last_error "
                         "FROM messages ORDER BY id")
    transitions = psql_json(
        "SELECT seq, (extract(epoch FROM at) * 1000000)::bigint AS at_us, txid, message_id, old_status, "
        "new_status, old_attempts, new_attempts, claim_epoch, claimed_by, last_error "
        "FROM chaos_audit_transitions ORDER BY seq")
    leader_rows = psql_json(
        "SELECT seq, (extract(epoch FROM at) * 1000000)::bigint AS at_us, txid, kind, epoch, holder, "
        "(extract(epoch FROM last_batch_at) * 1000000)::bigint AS batch_us FROM chaos_audit_leader ORDER BY seq")
    deliveries = mock("/deliveries")
    stats = mock("/stats")

    by_id = {m["id"]: m for m in messages}
    delivered = {}
    phantom = []
    for d in deliveries:
        try:
            delivered[int(d["key"])] = d
        except ValueError:
            phantom.append(d["key"])

    # (a) delivery ------------------------------------------------------------------
    missing = sorted(set(by_id) - set(delivered))
    phantom += sorted(set(delivered) - set(by_id))
    lost_acked = sorted(set(run.created_ids) - set(by_id))
    wrong_payload = [i for i, d in delivered.items() if i in by_id and
                     (d["to"] != by_id[i]["phone_number"] or d["content"] != by_id[i]["content"])]
    wrong_pmid = [i for i, m in by_id.items() if m["status"] == "sent" and i in delivered and
                  m["provider_message_id"] != delivered[i]["message_id"]]
    if missing:
        run.violation("%d messages never reached the provider: %s" % (len(missing), missing[:20]))
    if phantom:
        run.violation("the provider received %d keys that are no message: %s" % (len(phantom), phantom[:20]))
    if lost_acked:
        run.violation("%d messages answered 201 by the API are not in the table: %s" % (len(lost_acked), lost_acked[:20]))
    if wrong_payload:
        run.violation("%d deliveries carry another message's number or text: %s" % (len(wrong_payload), wrong_payload[:20]))
    if wrong_pmid:
        run.violation("%d sent rows record a provider messageId other than the provider's: %s"
                      % (len(wrong_pmid), wrong_pmid[:20]))
    report["messages created"] = "%d (seeded %d; created through the API %d in %d requests)" % (
        len(by_id), SEED_MESSAGES, len(run.created_ids), sum(run.create_requests.values()))
    report["API create answers"] = ", ".join("%s x%d" % kv for kv in sorted(run.create_requests.items()))
    report["delivered (unique keys)"] = "%d of %d; missing %d; unknown keys %d; wrong payload %d" % (
        len(set(delivered) & set(by_id)), len(by_id), len(missing), len(phantom), len(wrong_payload))

    # claims, grouped -------------------------------------------------------------------
    history = collections.defaultdict(list)
    for t in transitions:
        history[t["message_id"]].append(t)
    claims = collections.defaultdict(list)        # message id -> [claim dicts]
    claims_by_tx = collections.defaultdict(list)  # txid -> [claim dicts]
    for mid, ts in history.items():
        for i, t in enumerate(ts):
            if t["new_status"] != "sending":
                continue
            end = next((u for u in ts[i + 1:] if u["old_status"] == "sending"), None)
            claim = {"message_id": mid, "txid": t["txid"], "epoch": t["claim_epoch"], "by": t["claimed_by"],
                     "at_us": t["at_us"], "end": end, "outcome": classify_end(end)}
            claims[mid].append(claim)
            claims_by_tx[t["txid"]].append(claim)
    batches = {row["txid"]: row for row in leader_rows if row["kind"] == "batch"}
    epochs = {row["epoch"]: row for row in leader_rows if row["kind"] == "epoch"}

    # (b) duplicates ----------------------------------------------------------------------
    faults_by_target = collections.defaultdict(list)
    for f in run.faults:
        faults_by_target[f["target"]].append(f)
    dups = sorted((d for d in deliveries if d["times_seen"] > 1), key=lambda d: int(d["key"]) if d["key"].isdigit() else 0)
    explained, unexplained, dup_lines = 0, 0, []
    causes = collections.Counter()
    for d in dups:
        try:
            mid = int(d["key"])
        except ValueError:
            continue
        cs = claims.get(mid, [])
        candidates = []
        for c in cs:
            if c["outcome"] not in ("rescued", "retry-noanswer"):
                continue
            until = (c["end"]["at_us"] / US) if c["end"] else time.time()
            hits = [f for f in faults_by_target.get(c["by"], []) if f["kind"] in ("kill", "stop", "term")
                    and f["begin"] <= until and (f["end"] or until) >= c["at_us"] / US - 0.5]
            if c["outcome"] == "rescued" and not hits:
                continue  # a rescue needs a dead or frozen sender to explain a repeat
            candidates.append((c, hits))
        ok = len(candidates) >= d["times_seen"] - 1
        if ok:
            explained += 1
            for c, hits in candidates[:d["times_seen"] - 1]:
                kinds = sorted({h["kind"] for h in hits}) or ["none"]
                causes["%s after %s" % (c["outcome"], "/".join(kinds))] += 1
        else:
            unexplained += 1
        lines = ["  key %s: times_seen %d, %s, same Idempotency-Key (= message id) on every request"
                 % (d["key"], d["times_seen"], "explained" if ok else "UNEXPLAINED")]
        for c in cs:
            end = c["end"]
            lines.append("    claim epoch %s by %s at %s -> %s%s" % (
                c["epoch"], c["by"], iso(c["at_us"] / US)[11:23], c["outcome"],
                (" at %s (%s)" % (iso(end["at_us"] / US)[11:23], (end["last_error"] or "")[:90])) if end else ""))
            for c2, hits in candidates:
                if c2 is c:
                    for h in hits:
                        lines.append("      fault: %s %s %s..%s (%s)" % (h["kind"], h["target"], iso(h["begin"])[11:23],
                                                                      iso(h["end"])[11:23], h["detail"]))
        dup_lines.extend(lines)
        if not ok:
            run.violation("key %s reached the provider %d times and no crash/freeze window explains it"
                          % (d["key"], d["times_seen"]))
    extra = sum(d["times_seen"] - 1 for d in dups)
    if extra != stats["duplicates"]:
        run.violation("mock /stats says %d duplicates, /deliveries adds up to %d" % (stats["duplicates"], extra))
    report["duplicate keys"] = "%d keys, %d extra deliveries: explained %d, unexplained %d%s" % (
        len(dups), extra, explained, unexplained,
        (" (" + ", ".join("%s x%d" % kv for kv in sorted(causes.items())) + ")") if causes else "")

    # (c) rate ----------------------------------------------------------------------------
    interval_us = INTERVAL_MS * 1000
    no_batch = [tx for tx in claims_by_tx if tx not in batches]
    oversize = {tx: len(cs) for tx, cs in claims_by_tx.items() if len(cs) > BATCH_SIZE}
    foreign_epoch = [c for cs in claims_by_tx.values() for c in cs
                     if c["txid"] in batches and c["epoch"] != batches[c["txid"]]["epoch"]]
    wrong_holder = [c for cs in claims_by_tx.values() for c in cs
                    if c["epoch"] in epochs and epochs[c["epoch"]]["holder"] != c["by"]]
    starts = sorted(row["batch_us"] for row in batches.values())
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    short_gaps = [(a, b) for a, b in zip(starts, starts[1:]) if b - a < interval_us]
    if no_batch:
        run.violation("%d claim transactions did not set last_batch_at" % len(no_batch))
    if oversize:
        run.violation("batches over BATCH_SIZE=%d: %s" % (BATCH_SIZE, sorted(oversize.values())[-5:]))
    if foreign_epoch or wrong_holder:
        run.violation("%d claims under an epoch that was not the claiming replica's"
                      % (len(foreign_epoch) + len(wrong_holder)))
    for a, b in short_gaps[:10]:
        run.violation("batch starts %s and %s are only %.1f ms apart (PROCESSING_INTERVAL %d ms)"
                      % (iso(a / US)[11:23], iso(b / US)[11:23], (b - a) / 1000, INTERVAL_MS))
    sizes = collections.Counter(len(cs) for cs in claims_by_tx.values())
    report["batches (DB)"] = "%d batches, %d leadership terms; largest batch %d (limit %d); " \
        "shortest gap between batch starts %.1f ms (limit %d ms)" % (
            len(batches), len(epochs), max(sizes) if sizes else 0, BATCH_SIZE,
            (min(gaps) / 1000) if gaps else float("nan"), INTERVAL_MS)

    # provider side: attribute each first delivery to the latest claim of its message
    # whose batch started before it arrived
    window_us = interval_us - SPREAD_TOLERANCE_MS * 1000
    arrivals = []   # (first_seen_us, id, batch start us, batch txid)
    unclaimed = []
    for mid, d in delivered.items():
        t = d["first_seen_us"]
        best = None
        for c in claims.get(mid, []):
            b = batches.get(c["txid"])
            start = b["batch_us"] if b else c["at_us"]
            if start <= t and (best is None or start > best[0]):
                best = (start, c["txid"])
        if best is None:
            unclaimed.append(mid)
            continue
        arrivals.append((t, mid, best[0], best[1]))
    if unclaimed:
        run.violation("%d first deliveries arrived before any claim of their message: %s"
                      % (len(unclaimed), sorted(unclaimed)[:20]))
    arrivals.sort()
    times = [a[0] for a in arrivals]
    spreads = sorted(a[0] - a[2] for a in arrivals)

    def max_in_window(width):
        best, at = 0, None
        for i, t in enumerate(times):
            j = bisect.bisect_left(times, t + width, i)
            if j - i > best:
                best, at = j - i, i
        return best, at

    over, i = [], 0
    while i < len(times):
        j = bisect.bisect_left(times, times[i] + window_us, i)
        if j - i > BATCH_SIZE:
            group = arrivals[i:j]
            slow = [a for a in group if a[0] - a[2] > SPREAD_TOLERANCE_MS * 1000]
            over.append((group, slow))
            i = j   # report each burst once
        else:
            i += 1
    max_w, _ = max_in_window(window_us)
    max_i, _ = max_in_window(interval_us)
    slow_bursts = [g for g in over if g[1]]
    bad_bursts = [g for g in over if not g[1]]
    def why_slow(arrival):
        """What happened between a batch's start and a late arrival of one of its sends."""
        t, mid, start, tx = arrival
        claim = next((c for c in claims[mid] if c["txid"] == tx), None)
        parts = []
        if claim:
            parts.append("sent by %s under epoch %s" % (claim["by"], claim["epoch"]))
            newer = [e for e in epochs.values() if e["epoch"] > claim["epoch"] and start < e["at_us"] < t]
            if newer:
                parts.append("AFTER epoch %d had begun (%s at %s): a deposed leader's send"
                             % (newer[0]["epoch"], newer[0]["holder"], iso(newer[0]["at_us"] / US)[11:23]))
        overlapping = [f for f in run.faults if f["begin"] <= t / US and f["end"] >= start / US - 0.5]
        parts.append("faults meanwhile: " + (", ".join("%s %s %s..%s" % (
            f["kind"], f["target"], iso(f["begin"])[11:23], iso(f["end"])[11:23]) for f in overlapping) or "none"))
        return "; ".join(parts)

    for group, slow in over:
        worst = max(slow, key=lambda a: a[0] - a[2]) if slow else None
        text = "%d first deliveries within %.0f ms from %s (batches: %s)%s" % (
            len(group), (group[-1][0] - group[0][0]) / 1000, iso(group[0][0] / US)[11:23],
            ", ".join(sorted({"%s(+%dms)" % (iso(b / US)[17:23], (max(a[0] for a in group if a[3] == tx) - b) / 1000)
                              for _, _, b, tx in group})),
            ("; explained by a slow batch: message %d arrived %.0f ms after its batch started (%s)"
             % (worst[1], (worst[0] - worst[2]) / 1000, why_slow(worst))) if worst else "")
        if slow and not STRICT_RATE:
            run.warn("rate burst at the provider: " + text)
        else:
            run.violation("rate at the provider: " + text)
    # The strict form of the limit at the provider: any BATCH_SIZE + 1 consecutive first
    # deliveries span at least one interval. Report the tightest such span and whose
    # sends it holds, so an overshoot is measured, not just counted.
    tightest = min(((times[k + BATCH_SIZE] - times[k], k) for k in range(len(times) - BATCH_SIZE)),
                   default=None)
    if tightest is not None:
        span, k = tightest
        group = arrivals[k:k + BATCH_SIZE + 1]
        report["tightest span"] = "%d consecutive first deliveries within %.1f ms (interval %d ms) at %s; " \
            "batches %s" % (BATCH_SIZE + 1, span / 1000, INTERVAL_MS, iso(group[0][0] / US)[11:23],
                            ", ".join("%s(epoch %s)" % (iso(b / US)[17:23], ep) for b, ep in sorted(
                                {(a[2], next((c["epoch"] for c in claims[a[1]] if c["txid"] == a[3]), "?"))
                                 for a in group})))
    pct = lambda p: spreads[min(len(spreads) - 1, int(p * len(spreads)))] / 1000 if spreads else float("nan")
    report["rate (provider)"] = "max %d first deliveries in any %d ms window (limit %d; window = %d ms interval - %d ms " \
        "send spread); bursts over the limit: %d explained by a slow batch, %d unexplained; " \
        "max in a full %d ms window %d" % (max_w, window_us // 1000, BATCH_SIZE, INTERVAL_MS, SPREAD_TOLERANCE_MS,
                                           len(slow_bursts), len(bad_bursts), INTERVAL_MS, max_i)
    report["send spread"] = "batch start -> provider arrival: p50 %.0f ms, p99 %.0f ms, max %.0f ms" % (
        pct(0.5), pct(0.99), pct(1.0) if spreads else float("nan"))

    # (d) rows ----------------------------------------------------------------------------
    status_counts = collections.Counter(m["status"] for m in messages)
    for status in ("pending", "sending", "failed"):
        if status_counts.get(status):
            ids = [m["id"] for m in messages if m["status"] == status][:20]
            run.violation("%d rows left %s: %s" % (status_counts[status], status, ids))
    report["rows by status"] = ", ".join("%s %d" % (s, status_counts.get(s, 0))
                                         for s in ("sent", "pending", "sending", "failed"))
    outcomes = collections.Counter(c["outcome"] for cs in claims.values() for c in cs)
    report["claims"] = ", ".join("%s %d" % kv for kv in sorted(outcomes.items()))
    report["provider stats"] = ", ".join("%s %s" % kv for kv in stats.items())

    # (e) processes -----------------------------------------------------------------------
    panics = 0
    errors = collections.Counter()
    for r in run.replicas:
        with open(r.log_path, "rb") as f:
            for line in f:
                if b"panicked" in line:
                    panics += 1
                if b'"level":"ERROR"' in line:
                    try:
                        entry = json.loads(line)
                        errors["%s: %s" % (entry.get("message", "?")[:60], str(entry.get("error", ""))[:60])] += 1
                    except ValueError:
                        errors["(unparsable)"] += 1
    if panics:
        run.violation("%d panic lines in the replica logs" % panics)
    kinds = collections.Counter(f["kind"] for f in run.faults)
    on_leader = sum(1 for f in run.faults if f["leader"])
    report["faults injected"] = "%d: %s; %d of the replica faults hit the leader" % (
        len(run.faults), ", ".join("%s %d" % (k, kinds.get(k, 0)) for k in WEIGHTS), on_leader)
    slowest = max((t for _, _, t in run.term_exits), default=0)
    report["replicas"] = "%d starts; SIGTERM exits %d (slowest %.2fs, non-zero %d); died by themselves %d; panics %d" % (
        sum(r.incarnations for r in run.replicas), len(run.term_exits), slowest,
        sum(1 for _, c, _ in run.term_exits if c != 0), len(run.unexpected_exits), panics)
    report["ERROR log lines"] = ("; ".join("%s x%d" % kv for kv in errors.most_common(6))) or "none"
    report["settle"] = "%.1fs after the last fault" % settle_seconds
    return report, dup_lines


# --------------------------------------------------------------------------- main --

def main():
    global RUN
    run = RUN = Run()
    say("chaos soak: %ds of faults, seed %d, run id %s, %d replicas, BATCH_SIZE %d, PROCESSING_INTERVAL %dms, "
        "TTL %dms, retry %dms, SMS_API_TIMEOUT %dms, mock fail-rate %.2f latency %dms"
        % (DURATION, SEED, RUN_ID, len(API_PORTS), BATCH_SIZE, INTERVAL_MS, TTL_MS, RETRY_MS, SMS_TIMEOUT_MS,
           FAIL_RATE, LATENCY_MS))
    for r in run.replicas:
        r.start()
    for r in run.replicas:
        deadline = time.time() + 60
        while True:
            try:
                if http("GET", "http://127.0.0.1:%d/health/ready" % r.port, timeout=1)[0] == 200:
                    break
            except Exception:
                pass
            if time.time() > deadline or not r.alive():
                say("%s did not become ready; see %s" % (r.name, r.log_path))
                return 2
            time.sleep(0.2)
    say("replicas ready; leader: %s" % current_leader())

    started = time.time()
    deadline = started + DURATION
    creators = [threading.Thread(target=creator, args=(run, deadline, w), daemon=True) for w in range(CREATORS)]
    driver = threading.Thread(target=fault_driver, args=(run, deadline), daemon=True)
    others = [threading.Thread(target=progress, args=(run, deadline), daemon=True),
              threading.Thread(target=watchdog, args=(run,), daemon=True)]
    for t in creators + [driver] + others:
        t.start()
    while time.time() < deadline:
        time.sleep(0.5)
    say("fault window over; waiting for faults in progress to finish")
    for t in creators + [driver]:
        t.join(timeout=60)
    for t in list(run.fault_threads):
        t.join(timeout=TERM_EXIT_BOUND_S + 30)
    run.stop_event.set()
    for t in others:
        t.join(timeout=15)
    settle_seconds = settle(run)
    say("settled; checking")
    try:
        report, dup_lines = analyse(run, settle_seconds)
    except Exception as err:
        traceback.print_exc()
        say("the checks could not run: %s" % err)
        return 2
    finally:
        for r in run.replicas:
            r.stop_for_good()

    print()
    print("=" * 24 + " chaos summary " + "=" * 24)
    print("%-26s %ds of faults (seed %d), %d replicas, BATCH_SIZE %d / PROCESSING_INTERVAL %d ms, TTL %d ms, "
          "lock retry %d ms, SMS_API_TIMEOUT %d ms, mock fail-rate %.0f%% latency %d ms"
          % ("run", DURATION, SEED, len(API_PORTS), BATCH_SIZE, INTERVAL_MS, TTL_MS, RETRY_MS, SMS_TIMEOUT_MS,
             FAIL_RATE * 100, LATENCY_MS))
    for key, value in report.items():
        print("%-26s %s" % (key, value))
    print("%-26s %.0fs" % ("wall time", time.time() - T0))
    if dup_lines:
        print("\nkeys the provider saw more than once (claim history from the audit triggers):")
        print("\n".join(dup_lines))
    if run.warnings:
        print("\nwarnings (%d):" % len(run.warnings))
        for w in run.warnings:
            print("  - " + w)
    print("\nfault log: %s/faults.jsonl; replica logs: %s/logs/ (kept on failure or with KEEP_WORK=1)" % (WORK, WORK))
    if run.violations:
        print("\nVIOLATIONS (%d):" % len(run.violations))
        for v in run.violations:
            print("  - " + v)
        print("RESULT: FAIL")
        return 1
    if run.warnings:
        open(os.path.join(WORK, "keep"), "w").close()
    print("violations                 none")
    print("RESULT: PASS")
    return 0


def on_signal(signum, _frame):
    raise KeyboardInterrupt("signal %d" % signum)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, on_signal)
    code = 2
    try:
        code = main()
    except KeyboardInterrupt:
        say("interrupted")
        code = 130
    finally:
        if RUN is not None:
            RUN.stop_event.set()
            for r in RUN.replicas:
                try:
                    r.stop_for_good()
                except Exception:
                    pass
    sys.exit(code)
