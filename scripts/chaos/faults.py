"""The chaos soak's replicas and faults (scripts/chaos/soak.py): replica processes
behind their own proxies to Redis and PostgreSQL, the faults injected into them and
into the servers, the driver that picks faults at random, and a watchdog for replicas
that die by themselves."""

import os
import signal
import subprocess
import threading
import time
import traceback

from harness import Replica, harness_sh, redis_cli
from settings import (AIM_AT_LEADER, BATCH_SIZE, E, FAULT_GAP_MAX, FAULT_GAP_MIN, INTERVAL_MS, LANE_NAMES, LANES,
                      LOCK_KEY, LONG_STOP_SHARE, MAX_REPLICAS_IN_FAULT, PG_PORT, REDIS_PORT, RESCUE_AFTER_MS,
                      RESIGN_AFTER_MS, RETRY_MS, RNG, SHORT_STOP_SHARE, SHUTDOWN_TIMEOUT_MS, SMS_TIMEOUT_MS,
                      STALL_AFTER_MS, TERM_EXIT_BOUND_S, TTL_MS, WEIGHTS, WORK, current_leader, current_leaders,
                      lane_key, say)
from tcp_proxy import Proxy

# ------------------------------------------------------------------------ replicas --

class ChaosReplica(Replica):
    """A replica whose paths to Redis and PostgreSQL go through proxies of its own, so a
    fault can stall or cut one replica's path while the others keep theirs."""

    def __init__(self, index, port, extra_env=None):
        name = "replica-%d" % index
        self.busy = False          # under a fault right now
        self.redis_path = Proxy(REDIS_PORT, name=name + "-redis")
        self.pg_path = Proxy(PG_PORT, name=name + "-pg")
        super().__init__(index, {
            "DATABASE_URL": "postgres://postgres@127.0.0.1:%d/messages_db" % self.pg_path.port,
            "REDIS_URL": "redis://127.0.0.1:%d" % self.redis_path.port,
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
            "LOG_LEVEL": E.get("REPLICA_LOG_LEVEL", "info"),
            # Not inherited: the creators post without a token, and the URLs above are the
            # replica's only way to its servers.
            "API_TOKEN": None, "DB_HOST": None, "REDIS_HOST": None,
            # LANES > 1: the lanes file soak.py writes (its provider's token variable is
            # required; the mock checks no token).
            "DISPATCH_CONFIG": os.path.join(WORK, "dispatch.toml") if LANES > 1 else None,
            "CHAOS_PROVIDER_TOKEN": "chaos" if LANES > 1 else None,
            # The status webhooks' receiver (scripts/chaos/webhooks.py).
            **(extra_env or {}),
        }, port=port)

    def stop_for_good(self):
        """SIGTERM, and SIGKILL if it is not gone within TERM_EXIT_BOUND_S."""
        if self.proc is not None:
            self.stop(signal.SIGTERM, TERM_EXIT_BOUND_S)


# ------------------------------------------------------------------------- faults --

# Faults on a server rather than on one replica.
SERVER_FAULTS = ("redis", "postgres")

def leading(leader, lanes):
    """How a fault line names the target's leadership: " (leader)", or with lanes
    " (leader of l1, l2)"."""
    if not leader:
        return ""
    return " (leader of %s)" % ", ".join(lanes) if LANES > 1 else " (leader)"


def fault_kill(run, replica, leader, lanes):
    begin = time.time()
    say("FAULT kill     %s%s: SIGKILL" % (replica.id, leading(leader, lanes)))
    replica.kill(signal.SIGKILL)
    replica.wait(10)
    down = RNG.uniform(0.5, 3.0)
    time.sleep(down)
    replica.start()
    say("       kill     %s restarted after %.1fs" % (replica.id, down))
    run.record_fault("kill", replica.id, leader, "down %.1fs" % down, begin, time.time(), lanes)


def fault_stop(run, replica, leader, lanes):
    begin = time.time()
    # Longer than the lease (and than the 2 W after which a stalled leader is replaced,
    # within about 1.6 s: the checks measure it); one time in five past the rescue
    # delay too, so that a frozen sender's accepted-but-unrecorded message is rescued
    # and resent. With lanes, a share shorter than the stall detection, which must
    # move no lane.
    draw = RNG.random()
    if draw < LONG_STOP_SHARE:
        frozen = RESCUE_AFTER_MS / 1000 + RNG.uniform(1.0, 4.0)
    elif draw < LONG_STOP_SHARE + SHORT_STOP_SHARE:
        frozen = STALL_AFTER_MS / 1000 * RNG.uniform(0.2, 0.6)
    else:
        frozen = TTL_MS / 1000 + RNG.uniform(0.5, 4.0)
    say("FAULT stop     %s%s: SIGSTOP for %.1fs" % (replica.id, leading(leader, lanes), frozen))
    replica.kill(signal.SIGSTOP)
    time.sleep(frozen)
    replica.kill(signal.SIGCONT)
    say("       stop     %s: SIGCONT" % replica.id)
    run.record_fault("stop", replica.id, leader, "frozen %.1fs" % frozen, begin, time.time(), lanes,
                     frozen=frozen)


def fault_term(run, replica, leader, lanes):
    begin = time.time()
    say("FAULT term     %s%s: SIGTERM" % (replica.id, leading(leader, lanes)))
    replica.kill(signal.SIGTERM)
    code = replica.wait(TERM_EXIT_BOUND_S)
    took = time.time() - begin
    if code is None:
        run.violation("%s did not exit within %.0fs of SIGTERM (killed)" % (replica.id, TERM_EXIT_BOUND_S))
        replica.kill(signal.SIGKILL)
        replica.wait(10)
    else:
        run.term_exits.append((replica.id, code, took))
        if code != 0:
            run.violation("%s exited with status %s after SIGTERM" % (replica.id, code))
    down = RNG.uniform(0.5, 2.0)
    time.sleep(down)
    replica.start()
    say("       term     %s exited in %.2fs (status %s), restarted after %.1fs" % (replica.id, took, code, down))
    run.record_fault("term", replica.id, leader, "exit %s in %.2fs, down %.1fs" % (code, took, down), begin, time.time(),
                     lanes)


def fault_redis(run):
    begin = time.time()
    say("FAULT redis    stop")
    harness_sh("stop_redis", os.path.join(WORK, "redis"))
    # stop_redis sends SIGTERM; wait until the port is closed
    for _ in range(100):
        if subprocess.run(["redis-cli", "-p", str(REDIS_PORT), "ping"], capture_output=True).returncode != 0:
            break
        time.sleep(0.05)
    down = RNG.uniform(1.0, 4.0)
    time.sleep(down)
    for attempt in range(5):
        out = harness_sh("start_redis", os.path.join(WORK, "redis"), str(REDIS_PORT))
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
    harness_sh("stop_postgres", os.path.join(WORK, "postgres"), timeout=120)
    down = RNG.uniform(1.0, 4.0)
    time.sleep(down)
    for attempt in range(5):
        out = harness_sh("start_postgres", os.path.join(WORK, "postgres"), str(PG_PORT), timeout=120)
        if out.returncode == 0:
            break
        time.sleep(1)
    else:
        raise RuntimeError("PostgreSQL did not restart: " + out.stderr)
    say("       postgres started again after %.1fs down" % down)
    run.record_fault("postgres", "postgres", None, "down %.1fs" % down, begin, time.time())


def fault_keyloss(run, replica, leader, lanes, aimed):
    """Redis loses the lease key while the leader's path to Redis stalls (a failover to
    a lagging Redis replica): another replica acquires while the old leader, mid-batch,
    has not heard of it. PostgreSQL's fence must stop the old leader's sends. With
    lanes: the keys of every lane the target leads (else of the lane aimed at)."""
    begin = time.time()
    stalled = RNG.uniform(1.0, 5.0)
    keys = [LOCK_KEY] if LANES == 1 else [lane_key(lane) for lane in (lanes or [aimed])]
    say("FAULT keyloss  %s%s: Redis path paused, lock key%s deleted, for %.1fs"
        % (replica.id, leading(leader, lanes), "" if LANES == 1 else " of " + ", ".join(lanes or [aimed]),
           stalled))
    replica.redis_path.pause()
    deleted = redis_cli("DEL", *keys, check=False)
    time.sleep(stalled)
    replica.redis_path.resume()
    say("       keyloss  %s: Redis path open again (DEL answered %s)" % (replica.id, deleted or "nothing"))
    run.record_fault("keyloss", replica.id, leader, "stalled %.1fs, DEL %s" % (stalled, deleted or "?"),
                     begin, time.time(), lanes)


def fault_path(run, replica, leader, lanes, kind):
    """One replica's path to Redis (redispath) or PostgreSQL (pgpath) is paused or cut
    for a while; sometimes past the time after which a leader without PostgreSQL
    resigns."""
    begin = time.time()
    proxy = replica.redis_path if kind == "redispath" else replica.pg_path
    how = RNG.choice(("pause", "cut"))
    longest = (RESIGN_AFTER_MS / 1000 + 3.0) if kind == "pgpath" else 5.0
    down = RNG.uniform(1.0, longest)
    say("FAULT %-9s %s%s: %s for %.1fs" % (kind, replica.id, leading(leader, lanes), how, down))
    getattr(proxy, how)()
    time.sleep(down)
    proxy.resume()
    say("       %-9s %s: open again" % (kind, replica.id))
    run.record_fault(kind, replica.id, leader, "%s %.1fs" % (how, down), begin, time.time(), lanes)


def run_fault(run, kind, replica=None, leader=False, lanes=(), aimed=None):
    lanes = list(lanes)
    try:
        if kind == "kill":
            fault_kill(run, replica, leader, lanes)
        elif kind == "stop":
            fault_stop(run, replica, leader, lanes)
        elif kind == "term":
            fault_term(run, replica, leader, lanes)
        elif kind == "redis":
            fault_redis(run)
        elif kind == "postgres":
            fault_postgres(run)
        elif kind == "keyloss":
            fault_keyloss(run, replica, leader, lanes, aimed)
        elif kind in ("redispath", "pgpath"):
            fault_path(run, replica, leader, lanes, kind)
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
        replica, leader, lanes, aimed = None, False, [], None
        with run.lock:
            if kind in SERVER_FAULTS:
                if run.infra_busy:
                    continue
                run.infra_busy = True
            else:
                free = [r for r in run.replicas if not r.busy and r.alive()]
                in_fault = sum(1 for r in run.replicas if r.busy)
                if not free or in_fault >= MAX_REPLICAS_IN_FAULT:
                    continue
        if kind not in SERVER_FAULTS and LANES == 1:
            holder = current_leader()
            with run.lock:
                free = [r for r in run.replicas if not r.busy and r.alive()]
                if not free:
                    continue
                leaders = [r for r in free if r.id == holder]
                # Aim at the leader more often than not: that is where the windows are.
                # A key loss is about the leader; the others hit it more often than not.
                aim = kind == "keyloss" or RNG.random() < AIM_AT_LEADER
                replica = leaders[0] if leaders and aim else RNG.choice(free)
                leader = replica.id == holder
                lanes = ["default"] if leader else []
                replica.busy = True
        elif kind not in SERVER_FAULTS:
            # With lanes: aim at the leader of a lane picked at random (the fence rows say
            # who holds each lane), as often as at the one leader without lanes.
            holders = current_leaders()
            with run.lock:
                free = [r for r in run.replicas if not r.busy and r.alive()]
                if not free:
                    continue
                aimed = RNG.choice(LANE_NAMES)
                aim = kind == "keyloss" or RNG.random() < AIM_AT_LEADER
                leaders = [r for r in free if r.id == holders.get(aimed)]
                replica = leaders[0] if leaders and aim else RNG.choice(free)
                lanes = sorted(lane for lane, holder in holders.items() if holder == replica.id)
                leader = bool(lanes)
                replica.busy = True
        thread = threading.Thread(target=run_fault, args=(run, kind, replica, leader, lanes, aimed), daemon=True)
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
            r.wait(1)
            run.unexpected_exits.append((r.id, code, time.time()))
            run.violation("%s exited by itself with status %s; restarting it" % (r.id, code))
            r.start()
            with run.lock:
                r.busy = False

