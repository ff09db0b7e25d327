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
from harness import WORK, env_float, env_int, http, leader_row, psql  # noqa: E402

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
# The fence (src/leadership/fence.rs): a confirmation lets sends start for a window W of
# TTL/3 (100 ms to 500 ms, FenceTiming::for_lease); a new leader rescues an older epoch's
# rows after the window + SMS_API_TIMEOUT + 100 ms grace + 2 s margin; a leader without
# PostgreSQL resigns after 2 x TTL.
FENCE_WINDOW_MS = min(max(TTL_MS // 3, 100), 500)
RESCUE_AFTER_MS = FENCE_WINDOW_MS + SMS_TIMEOUT_MS + 100 + 2000
RESIGN_AFTER_MS = 2 * TTL_MS
# A stalled leader (docs/design.md#a-stalled-leader, src/leadership/takeover.rs): its
# followers read its fence session's last statement and its Redis beat every W/2 and
# replace it once both stood still for 2 W. From the SIGSTOP: up to W/4 since its last
# confirmation, W/2 to the first reading that sees it, 2 W, W/2 to the reading that
# acts, then the bump: about 1.6 s with W = 500 ms. STALL_SLACK_MS is added for a busy
# machine. A freeze shorter than 2 W moves nothing.
STALL_AFTER_MS = 2 * FENCE_WINDOW_MS
STALL_SLACK_MS = env_int("STALL_SLACK_MS", 500)
STALL_TAKEOVER_BOUND_MS = FENCE_WINDOW_MS // 4 + FENCE_WINDOW_MS // 2 + STALL_AFTER_MS + FENCE_WINDOW_MS // 2 \
    + STALL_SLACK_MS
LOCK_KEY = "message-dispatcher:lock"

# Lanes (docs/design.md#lanes). LANES=1 (the default) runs the soak as it always ran:
# no DISPATCH_CONFIG, one lane "default" made from BATCH_SIZE and PROCESSING_INTERVAL.
# LANES=n writes a DISPATCH_CONFIG with the lanes default, l1 .. l(n-1), each with its
# own batch size and interval (LANE_BATCH_SIZES / LANE_INTERVALS_MS, comma lists,
# cycled; by default BATCH_SIZE, BATCH_SIZE - 2, BATCH_SIZE + 3 and PROCESSING_INTERVAL
# for all, so each lane's window has its own limit), all through the mock provider; the
# soak spreads the messages over the lanes and checks the rate, the batches and the
# duplicates per lane.
LANES = env_int("LANES", 1)
assert 1 <= LANES <= 64, "LANES: 1 to 64"
LANE_NAMES = ["default"] + ["l%d" % i for i in range(1, LANES)]


def _lane_list(name, default):
    text = E.get(name, "").strip()
    values = [int(v) for v in text.split(",")] if text else default
    return [values[i % len(values)] for i in range(LANES)]


LANE_BATCH = dict(zip(LANE_NAMES, _lane_list(
    "LANE_BATCH_SIZES", [BATCH_SIZE, max(1, BATCH_SIZE - 2), BATCH_SIZE + 3])))
LANE_INTERVAL_MS = dict(zip(LANE_NAMES, _lane_list("LANE_INTERVALS_MS", [INTERVAL_MS])))
if LANES == 1:
    LANE_BATCH, LANE_INTERVAL_MS = {"default": BATCH_SIZE}, {"default": INTERVAL_MS}
# With lanes: a share of SIGSTOPs shorter than the stall detection (0.2 to 0.6 x 2 W),
# which must move nothing.
SHORT_STOP_SHARE = env_float("SHORT_STOP_SHARE", 0.2) if LANES > 1 else 0.0


def lane_key(lane):
    """The Redis key of a lane's lease (src/leadership/campaign.rs, lane_lock_key)."""
    return LOCK_KEY if lane == "default" else "%s:lane:%s" % (LOCK_KEY, lane)


def dispatch_config_text():
    """The DISPATCH_CONFIG of a lanes run: one provider (the mock, with the soak's
    SMS_API_TIMEOUT: the rescue wait is built on it) and the lanes."""
    lines = ["# Written by scripts/chaos/soak.py for one run (LANES=%d)." % LANES, "",
             "[[provider]]", 'name = "mock"', 'kind = "http-json"', 'url = "%s"' % E["SMS_API_URL"],
             'token_env = "CHAOS_PROVIDER_TOKEN"', 'timeout = "%dms"' % SMS_TIMEOUT_MS]
    for lane in LANE_NAMES:
        lines += ["", "[[lane]]", 'name = "%s"' % lane, "batch_size = %d" % LANE_BATCH[lane],
                  'interval = "%dms"' % LANE_INTERVAL_MS[lane], 'unit = "messages"', 'providers = ["mock"]',
                  "send_concurrency = 1"]
    return "\n".join(lines) + "\n"
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


def current_leaders():
    """{lane: holder} from the fence rows (the replica that last won each lane's lock;
    a lane nobody won yet is absent); {} if PostgreSQL does not answer."""
    try:
        rows = psql("SELECT lane || '|' || holder FROM dispatcher_leader WHERE holder IS NOT NULL AND epoch > 0",
                    timeout=2)
    except Exception:
        return {}
    return dict(line.split("|", 1) for line in rows.split("\n") if "|" in line)
