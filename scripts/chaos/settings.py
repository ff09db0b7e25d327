"""Settings of the chaos soak (scripts/chaos/soak.py), from the environment run.sh
exported, the fence's windows derived from them, the run's log, and the clients the
soak adds to scripts/lib/harness.py's (the mock provider, the current leader).
Standard library only."""

import datetime
import json
import os
import random
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))
from harness import WORK, env_float, env_int, http, leader_row  # noqa: E402

E = os.environ

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
# The rate at the provider is checked on every request (accepted or not): no window of
# PROCESSING_INTERVAL - RATE_JITTER_MS holds more than BATCH_SIZE arrivals. The jitter
# is the documented gap between a send starting and its request arriving
# (docs/design.md).
RATE_JITTER_MS = env_int("RATE_JITTER_MS", 50)
# STRICT_RATE=0 reports bursts that a slow batch explains as warnings, not violations.
STRICT_RATE = E.get("STRICT_RATE", "1") == "1"
# The fence (src/leadership/fence.rs): a confirmation lets sends start for a window of
# TTL/3 (100 ms to 1 s); a new leader rescues an older epoch's rows after the window +
# SMS_API_TIMEOUT + 100 ms grace + 2 s margin; a leader without PostgreSQL resigns after
# 2 x TTL.
FENCE_WINDOW_MS = min(max(TTL_MS // 3, 100), 1000)
RESCUE_AFTER_MS = FENCE_WINDOW_MS + SMS_TIMEOUT_MS + 100 + 2000
RESIGN_AFTER_MS = 2 * TTL_MS
LOCK_KEY = "message-dispatcher:lock"
# Fault mix: relative weights. keyloss: the leader's Redis path stalls and the lock key
# is deleted (a failover to a lagging Redis replica); redispath / pgpath: one replica's
# path to Redis / PostgreSQL is paused or cut for a while, through a proxy.
FAULT_KINDS = ("kill", "stop", "term", "redis", "postgres", "keyloss", "redispath", "pgpath")
WEIGHTS = {kind: float(weight) for kind, weight in
           (item.split(":") for item in E.get(
               "FAULTS", "kill:3,stop:2,term:2,redis:1,postgres:1,keyloss:1,redispath:1,pgpath:1").split(","))}
assert set(WEIGHTS) <= set(FAULT_KINDS), "FAULTS: unknown fault kind"
# The mock provider's latency mix (set by run.sh): a share of slow sends makes long
# batches, which open the windows the fence closes.
SLOW_RATE = env_float("SLOW_RATE", 0.03)
SLOW_MS = env_int("SLOW_MS", 1200)
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


# ---------------------------------------------------------------------------- clients --

def mock(path):
    """GET `path` of the mock provider, as JSON."""
    status, body = http("http://127.0.0.1:%d%s" % (MOCK_PORT, path), timeout=10)
    if status != 200:
        raise RuntimeError("mock provider %s answered %s" % (path, status))
    return json.loads(body)


def current_leader():
    """The fence row's holder (the replica that last won the lock), or None."""
    try:
        return leader_row(timeout=2)[1]
    except Exception:
        return None
