#!/usr/bin/env python3
"""Chaos soak driver. Started by scripts/chaos/run.sh, which builds the binary, starts
PostgreSQL, Redis and the mock provider, migrates, installs the audit triggers
(scripts/chaos/audit.sql) and seeds; this program runs the replicas, creates messages,
injects faults, lets the queue settle and checks the result.

Modules: settings (settings, log, the soak's clients), faults (replicas behind their
own proxies to Redis and PostgreSQL, the faults, the driver), checks (the checks),
webhooks (the status webhooks' receiver and checks w1 to w4: no event lost), and from
scripts/lib: harness (processes, replicas, clients) and tcp_proxy (the pausable,
cuttable proxy). Standard library only. Everything it talks to is on 127.0.0.1.

How the rate is checked (check c)
---------------------------------
The contract (docs/design.md) is about batch *starts*: the cluster claims
at most BATCH_SIZE rows per batch, and a batch starts only when `last_batch_at +
PROCESSING_INTERVAL` has passed on PostgreSQL's clock. The audit triggers record every
batch start (`last_batch_at`, with the claim transaction's id) and every claimed row
(with the same transaction id), so the contract is checked exactly, with no tolerance:

  c1  every claim transaction moved at most BATCH_SIZE rows to `sending`, set
      `last_batch_at`, and was made under the epoch its replica held;
  c2  consecutive batch starts, cluster-wide, are at least PROCESSING_INTERVAL apart.

The same limit holds for what the provider sees, with no tolerance but the jitter
between a send starting and its request arriving (RATE_JITTER_MS, 50 ms by default, as
docs/design.md documents). Every send starts only when the leader's pacer allows it: no
send starts less than PROCESSING_INTERVAL after the send BATCH_SIZE places before it,
in this replica or, across a handover, in the one before (the fence row records the
newest start times). So:

  c3  every request at the provider (mock `/requests`: accepted, failed or rejected, at
      its arrival) follows a claim of its message, and no window of
      PROCESSING_INTERVAL - RATE_JITTER_MS holds more than BATCH_SIZE requests. The
      one exception docs/design.md documents: a sender frozen (SIGSTOP) after its send
      started and before its request left; its request arrives when it thaws. Such a
      burst is printed with the fault that explains it; any other burst is a
      violation. STRICT_RATE=0 turns every burst into a warning.

Duplicates (check b)
--------------------
The mock counts requests per Idempotency-Key; the dispatcher sets that header to the
message's delivery key for every request of a message (src/provider/client.rs), so a key seen twice
is the same message sent twice with the same key, by construction. A repeat is explained
when an earlier claim of the message ended without its result being recorded, in one of
the documented ways: rescued (its replica was killed, frozen or stopped after the
provider accepted and before the result was written; a fault on that replica between
the claim and the rescue is required and printed), or retried after a timeout /
connection error (the answer did not arrive within SMS_API_TIMEOUT). A replica cut off
from PostgreSQL while holding a result (pgpath) explains a repeat too, when the
delivery cache entry that lets the rescue record the message as sent was lost (a Redis
restart). Anything else is unexplained: in particular a key loss (keyloss) must never
cause a repeat, because PostgreSQL fences every send.

Lanes (LANES > 1)
-----------------
Each lane (docs/design.md#lanes) is its own rate domain with its own leader, fence row
and epochs, so every check above holds per lane: the audit records each fence row's
lane, c1 and c2 group the batch starts and claims by it (a claim must take only its own
lane's rows, under its own lane's batch, and epochs are compared within a lane), and c3
groups the provider's requests by their message's lane (delivery key -> id -> lane)
against the lane's own batch size and interval. Duplicates, losses and stuck rows are
counted per lane in the summary. The replica faults aim at the leader of a lane picked
at random (the fence rows say who holds which), a key loss deletes the lease keys of
the lanes its target leads, and a share of the SIGSTOPs is shorter than the stall
detection (2 W), which must move no lane.

A stalled leader
----------------
A SIGSTOPped leader keeps its PostgreSQL session, and is replaced once its fence
session and its Redis beat have stood still for 2 W (about 1.6 s after the SIGSTOP in
all, docs/design.md#a-stalled-leader): the summary measures, for each lane the frozen
replica led, the time to the lane's next term, and warns when a freeze longer than
that bound was not answered within it, or when a freeze shorter than 2 W moved a lane.
"""

import collections
import json
import os
import random
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))
import webhooks  # noqa: E402
from checks import analyse  # noqa: E402
from faults import ChaosReplica, fault_driver, watchdog  # noqa: E402
from harness import decoded, psql, request  # noqa: E402
from settings import (API_PORTS, BATCH_SIZE, CREATE_RATE, DURATION, FAIL_RATE, INTERVAL_MS, LANE_BATCH,  # noqa: E402
                      LANE_INTERVAL_MS, LANE_NAMES, LANES, LATENCY_MS, RETRY_MS, RUN_ID, SEED, SETTLE_TIMEOUT,
                      SLOW_MS, SLOW_RATE, SMS_TIMEOUT_MS, T0, TERM_EXIT_BOUND_S, TTL_MS, WORK, current_leader,
                      current_leaders, dispatch_config_text, mock, say)

# -------------------------------------------------------------------------- state --

class Run:
    def __init__(self, receiver=None):
        self.receiver = receiver     # the status webhooks' receiver; None with WEBHOOKS=0
        self.replicas = [ChaosReplica(i + 1, port, webhooks.replica_env(receiver))
                         for i, port in enumerate(API_PORTS)]
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

    def record_fault(self, kind, target, leader, detail, begin, end, lanes=(), **extra):
        """`lanes`: the lanes the target led when the fault began (fence rows)."""
        fault = {"kind": kind, "target": target, "leader": leader, "detail": detail,
                 "begin": begin, "end": end, "lanes": list(lanes), **extra}
        with self.lock:
            self.faults.append(fault)
        with open(os.path.join(WORK, "faults.jsonl"), "a") as f:
            f.write(json.dumps(fault) + "\n")


RUN = None


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
            if LANES > 1:
                items[-1]["lane"] = rng.choice(LANE_NAMES)
        body = items[0] if batch == 1 else items
        port = rng.choice(API_PORTS)
        try:
            status, raw = request("http://127.0.0.1:%d/api/messages" % port, "POST", body, timeout=3.0)
            answer = decoded(raw)
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
        lanes = ""
        if LANES > 1:
            try:
                waiting = psql("SELECT lane || ' ' || count(*) FROM messages WHERE status IN ('pending', 'sending') "
                               "GROUP BY lane ORDER BY lane", timeout=2).split("\n")
                leaders = current_leaders()
                lanes = "; waiting per lane %s; leaders %s" % (
                    ", ".join(w for w in waiting if w) or "none",
                    ", ".join("%s %s" % (lane, leaders.get(lane, "-")) for lane in LANE_NAMES))
            except Exception:
                pass
        say("progress: created via API %d, delivered %s, queue %s, faults %d%s"
            % (len(run.created_ids), delivered, counts, len(run.faults), lanes))


# ------------------------------------------------------------------------- settle --

def settle(run):
    """All replicas running, dependencies up; waits until nothing is pending or sending."""
    started = time.time()
    for r in run.replicas:
        if not r.alive():
            r.start()
        r.kill(signal.SIGCONT)
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


# --------------------------------------------------------------------------- main --

def main():
    global RUN
    if LANES > 1:
        # The lanes file the replicas read (DISPATCH_CONFIG), and the seeded messages
        # spread over the lanes, before any replica runs (as if created in those lanes).
        with open(os.path.join(WORK, "dispatch.toml"), "w") as f:
            f.write(dispatch_config_text())
        psql("UPDATE messages SET lane = (ARRAY[%s])[1 + id %% %d]"
             % (", ".join("'%s'" % lane for lane in LANE_NAMES), LANES), timeout=30)
    run = RUN = Run(webhooks.start())
    say("chaos soak: %ds of faults, seed %d, %d replicas, BATCH_SIZE %d, PROCESSING_INTERVAL %dms, "
        "TTL %dms, retry %dms, SMS_API_TIMEOUT %dms, mock fail-rate %.2f latency %dms (%.0f%% at %dms)"
        % (DURATION, SEED, len(API_PORTS), BATCH_SIZE, INTERVAL_MS, TTL_MS, RETRY_MS, SMS_TIMEOUT_MS,
           FAIL_RATE, LATENCY_MS, SLOW_RATE * 100, SLOW_MS))
    if LANES > 1:
        say("%d lanes (DISPATCH_CONFIG %s/dispatch.toml): %s" % (LANES, WORK, ", ".join(
            "%s %d per %d ms" % (lane, LANE_BATCH[lane], LANE_INTERVAL_MS[lane]) for lane in LANE_NAMES)))
    for r in run.replicas:
        r.start()
    for r in run.replicas:
        try:
            r.wait_ready(60, 0.2)
        except (RuntimeError, TimeoutError):
            say("%s did not become ready; see %s" % (r.id, r.log))
            return 2
    if LANES == 1:
        say("replicas ready; leader: %s" % current_leader())
    else:
        say("replicas ready; leaders: %s" % ", ".join(
            "%s %s" % (lane, holder) for lane, holder in sorted(current_leaders().items())))

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
    if run.receiver is not None:
        settle_seconds += webhooks.settle(run)
    say("settled; checking")
    try:
        report, dup_lines, lane_table = analyse(run, settle_seconds)
        if run.receiver is not None:
            webhooks.check(run, run.receiver, report)
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
          "lock retry %d ms, SMS_API_TIMEOUT %d ms, mock fail-rate %.0f%% latency %d ms (%.0f%% at %d ms)"
          % ("run", DURATION, SEED, len(API_PORTS), BATCH_SIZE, INTERVAL_MS, TTL_MS, RETRY_MS, SMS_TIMEOUT_MS,
             FAIL_RATE * 100, LATENCY_MS, SLOW_RATE * 100, SLOW_MS))
    for key, value in report.items():
        print("%-26s %s" % (key, value))
    print("%-26s %.0fs" % ("wall time", time.time() - T0))
    if lane_table:
        print("\nper lane:")
        print("\n".join(lane_table))
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
