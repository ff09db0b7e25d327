#!/usr/bin/env python3
"""Driver of scripts/verify/upgrade.sh: a rolling upgrade from the previous release
(docs/design.md#upgrading-to-lanes), checked. upgrade.sh builds both binaries, starts
PostgreSQL, Redis and the mock provider and exports PREVIOUS_BIN, BIN, WORK, PG_PORT,
REDIS_PORT, MOCK_PORT and API_PORTS (six: three old replicas, three new).

1. Three replicas of the previous release (old-1..3) start on an empty database and
   migrate it (AUTO_MIGRATE). Messages are created at CREATE_RATE through the API of
   whichever replica is up (round robin; a connection error or a 503 moves the same
   request to the next replica).
2. Three times: SIGTERM an old replica, wait for its exit, start a replica of this
   release (new-1..3) in its place, wait until it is ready, let it run STEP_WAIT. The
   first replacement is a follower (a new replica beside an old leader), the second
   the leader if an old one leads (the lease goes from an old leader to a mixed
   cluster), the third the last old one. new-1 applies migration 0014 while the other
   two old replicas keep running.
3. The stream stops, the queue drains, the checks run.

Every 200 ms every live replica is asked whether it leads (`GET /health`, field
`leader`, in both releases) and the fence row (id 1) is read. Asking three processes
one after the other is not one instant: a handover between two of the requests can
show two leaders in one sample without any overlap. So a sample with two leaders is
printed, and the run fails only when two samples in a row show two leaders. The hard
guarantees are checked from the provider's side at the end: every message delivered
exactly once (same Idempotency-Key, the message's delivery key, never twice), nothing
pending or sending, and no window of PROCESSING_INTERVAL - RATE_JITTER_MS holding more
than BATCH_SIZE requests (every request at the mock, accepted or not, at its arrival,
as scripts/chaos/checks.py counts them).

Standard library only; processes, clients and replicas from scripts/lib/harness.py.
"""

import bisect
import collections
import datetime
import json
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))
from harness import (WORK, Replica, decoded, env, env_float, env_int, http, leader_row,  # noqa: E402
                     psql, psql_json, read_events, request, wait_until)

NEW_BIN = env("BIN")
OLD_BIN = env("PREVIOUS_BIN")
MOCK = "http://127.0.0.1:%d" % env_int("MOCK_PORT", 0)
PORTS = [int(p) for p in env("API_PORTS").split()]
BATCH_SIZE = 5
INTERVAL_MS = 200
RATE_JITTER_MS = env_int("RATE_JITTER_MS", 50)
CREATE_RATE = env_float("CREATE_RATE", 20)
WARMUP = env_float("WARMUP", 6)
STEP_WAIT = env_float("STEP_WAIT", 8)
TAIL = env_float("TAIL", 4)
DRAIN_TIMEOUT = env_float("DRAIN_TIMEOUT", 90)
SAMPLE_EVERY = 0.2
TERM_BOUND = 40  # seconds a SIGTERMed replica may take to exit (SHUTDOWN_TIMEOUT is 5 s)

REPLICA_ENV = {
    "BATCH_SIZE": str(BATCH_SIZE),
    "PROCESSING_INTERVAL": "%dms" % INTERVAL_MS,
    "DISTRIBUTED_LOCK_TTL": "3s",
    "LOCK_RETRY_INTERVAL": "500ms",
    "SHUTDOWN_TIMEOUT": "5s",
    "SMS_API_TIMEOUT": "2s",
    "RETRY_BACKOFF_BASE": "200ms",
    "RETRY_BACKOFF_MAX": "1s",
    "MAX_ATTEMPTS": "0",
    "SEND_CONCURRENCY": "1",
    "AUTO_START": "true",
    "AUTO_MIGRATE": "true",
    "LOG_LEVEL": "info",
    # The single lane `default`; the creators post without a token.
    "DISPATCH_CONFIG": None, "API_TOKEN": None, "LEADER_ELIGIBLE": None,
    "DB_HOST": None, "REDIS_HOST": None,
}

T0 = time.time()
PRINT_LOCK = threading.Lock()


def iso(ts):
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).isoformat(timespec="milliseconds")[11:23]


def say(msg):
    line = "[%s +%6.1fs] %s" % (iso(time.time()), time.time() - T0, msg)
    with PRINT_LOCK:
        print(line, flush=True)
        with open(WORK / "upgrade.log", "a") as f:
            f.write(line + "\n")


def mock(path):
    status, body = http(MOCK + path, timeout=10)
    if status != 200:
        raise RuntimeError("mock provider %s answered %s" % (path, status))
    return json.loads(body)


def release(r):
    return "old" if r.bin == OLD_BIN else "new"


class Run:
    def __init__(self):
        self.lock = threading.Lock()
        self.stop_creating = threading.Event()
        self.stop_sampling = threading.Event()
        self.members = []            # the replicas in the cluster now (started, not yet stopped by us)
        self.stopping = set()        # ids SIGTERMed by the run
        self.all = []
        self.samples = []            # (t, composition, {id: True/False/None}, (epoch, holder) or None)
        self.created = {}            # id -> time the API answered 201
        self.answers = collections.Counter()
        self.violations = []
        self.warnings = []
        self.steps = []              # dicts, one per replacement
        self.unexpected_exits = []
        self.term_exits = []         # (id, exit code, seconds)
        self.versions = {}

    def violation(self, text):
        with self.lock:
            self.violations.append(text)
        say("FAIL: " + text)

    def warn(self, text):
        with self.lock:
            self.warnings.append(text)
        say("warning: " + text)

    def composition(self, members):
        old = sum(1 for r in members if release(r) == "old")
        new = len(members) - old
        return " + ".join(p for p in ("%d old" % old if old else "", "%d new" % new if new else "") if p) or "none"

    def latest_leaders(self):
        with self.lock:
            sample = self.samples[-1] if self.samples else None
        return [rid for rid, lead in sample[2].items() if lead] if sample else []


RUN = Run()


# ---------------------------------------------------------------------------- stream --

def creator(run, worker, rate):
    n = 0
    turn = worker
    next_at = time.time()
    while not run.stop_creating.is_set():
        n += 1
        body = {"phone_number": "+90555%03d%04d" % (worker, n % 10000),
                "content": "upgrade w%d #%d" % (worker, n)}
        sent = False
        for _ in range(12):
            with run.lock:
                targets = [r for r in run.members if r.alive()]
            if not targets:
                time.sleep(0.1)
                continue
            r = targets[turn % len(targets)]
            turn += 1
            try:
                status, raw = request(r.url + "/api/messages", "POST", body, timeout=3)
            except Exception as err:
                with run.lock:
                    run.answers["no answer (%s)" % type(err).__name__] += 1
                continue
            with run.lock:
                run.answers[str(status)] += 1
            if status == 201:
                answer = decoded(raw)
                with run.lock:
                    run.created[int(answer["id"])] = time.time()
                sent = True
                break
            if status == 503:
                continue
            run.violation("POST /api/messages on %s (%s) answered %s: %s"
                          % (r.id, release(r), status, str(decoded(raw))[:200]))
            break
        if not sent:
            with run.lock:
                run.answers["given up"] += 1
        next_at += 1.0 / rate
        delay = next_at - time.time()
        if delay > 0:
            run.stop_creating.wait(delay)
        else:
            next_at = time.time()


# --------------------------------------------------------------------------- sampler --

def sampler(run):
    while not run.stop_sampling.is_set():
        t = time.time()
        with run.lock:
            members = list(run.members)
        leads = {}
        for r in members:
            if not r.alive():
                if r.id not in run.stopping:
                    with run.lock:
                        first = r.id not in [x[0] for x in run.unexpected_exits]
                        if first:
                            run.unexpected_exits.append((r.id, r.proc.returncode))
                    if first:
                        run.violation("%s (%s) exited by itself with %s (see %s)"
                                      % (r.id, release(r), r.proc.returncode, r.log))
                continue
            code, raw = http(r.url + "/health", timeout=0.5)
            body = decoded(raw) if code else None
            leads[r.id] = bool(body.get("leader")) if isinstance(body, dict) else None
        try:
            fence = leader_row(timeout=1)
        except Exception:
            fence = None
        with run.lock:
            run.samples.append((t, run.composition(members), leads, fence))
        leaders = [rid for rid, lead in leads.items() if lead]
        if len(leaders) > 1:
            say("sample with %d leaders: %s (fence row: epoch %s, holder %s)"
                % (len(leaders), ", ".join(leaders), *(fence or ("?", "?"))))
        run.stop_sampling.wait(max(0.0, t + SAMPLE_EVERY - time.time()))


# ----------------------------------------------------------------------------- steps --

def note_version(run, r):
    """The commit the replica's /health names, printed with its readiness."""
    body = decoded(http(r.url + "/health")[1])
    version = body.get("version") if isinstance(body, dict) else None
    run.versions[r.id] = version.get("commit", "?") if isinstance(version, dict) else str(version)
    say("%s (%s release, commit %s) ready on :%d" % (r.id, release(r), run.versions[r.id], r.port))


def start_replica(run, r):
    r.start()
    with run.lock:
        run.members.append(r)
        run.all.append(r)
    r.wait_ready(90)
    note_version(run, r)


def leader_now(run, timeout=30):
    """The one replica the latest sample shows leading (waits for one)."""
    def one():
        leaders = run.latest_leaders()
        return leaders[0] if len(leaders) == 1 else None
    return wait_until(one, timeout, 0.1, "a leader")


def replace(run, k):
    with run.lock:
        old = [r for r in run.members if release(r) == "old"]
    leader = leader_now(run)
    if k == 1:
        pick = [r for r in old if r.id != leader] or old
    elif k == 2:
        pick = [r for r in old if r.id == leader] or old
    else:
        pick = old
    target = pick[0]
    was_leader = target.id == leader
    step = {"k": k, "target": target.id, "was_leader": was_leader, "leader_before": leader}
    say("step %d: SIGTERM %s%s" % (k, target.id, " (the leader)" if was_leader else " (a follower; leader %s)" % leader))
    with run.lock:
        run.stopping.add(target.id)
    step["term_at"] = time.time()
    target.kill(signal.SIGTERM)
    code = target.wait(TERM_BOUND)
    step["exit_at"] = time.time()
    if code is None:
        run.violation("%s did not exit within %ds of SIGTERM; SIGKILLed" % (target.id, TERM_BOUND))
        target.stop(signal.SIGKILL, 10)
        code = target.proc.returncode
    elif code != 0:
        run.violation("%s exited with %s after SIGTERM (see %s)" % (target.id, code, target.log))
    run.term_exits.append((target.id, code, step["exit_at"] - step["term_at"]))
    with run.lock:
        run.members.remove(target)
    say("step %d: %s exited %s after %.2fs" % (k, target.id, code, step["exit_at"] - step["term_at"]))
    new = Replica(3 + k, REPLICA_ENV, port=PORTS[2 + k], bin=NEW_BIN, replica_id="new-%d" % k)
    step["new"] = new.id
    step["start_at"] = time.time()
    start_replica(run, new)
    step["ready_at"] = new.ready_at
    run.steps.append(step)
    time.sleep(STEP_WAIT)


# ---------------------------------------------------------------------------- checks --

def drain(run):
    started = time.time()
    last = None
    while time.time() - started < DRAIN_TIMEOUT:
        row = psql("SELECT count(*) FILTER (WHERE status = 'pending'), count(*) FILTER (WHERE status = 'sending') "
                   "FROM messages", timeout=5)
        pending, sending = (int(x) for x in row.split("|"))
        if (pending, sending) != last:
            say("draining: %d pending, %d sending" % (pending, sending))
            last = (pending, sending)
        if pending == 0 and sending == 0:
            before = mock("/stats")["requests"]
            time.sleep(2)
            after = mock("/stats")["requests"]
            if after != before:
                run.violation("the provider received %d requests after the queue was empty" % (after - before))
            return time.time() - started
        time.sleep(0.5)
    run.violation("the queue did not drain within %.0fs: %s pending, %s sending" % (DRAIN_TIMEOUT, *last))
    return time.time() - started


def leader_changes(samples):
    """[(t, from, to, gap seconds)]: each change of the single leader the samples show;
    the gap runs from the last sample that showed the old one to the first that shows
    the new one."""
    out, current, last_seen = [], None, None
    for t, _, leads, _ in samples:
        leaders = [rid for rid, lead in leads.items() if lead]
        if len(leaders) != 1:
            continue
        if leaders[0] != current:
            if current is not None:
                out.append((t, current, leaders[0], t - last_seen))
            current = leaders[0]
        last_seen = t
    return out


def check_leaders(run, report):
    with run.lock:
        samples = list(run.samples)
    doubles = [s for s in samples if sum(1 for v in s[2].values() if v) > 1]
    in_a_row = [(a, b) for a, b in zip(samples, samples[1:])
                if sum(1 for v in a[2].values() if v) > 1 and sum(1 for v in b[2].values() if v) > 1]
    for a, b in in_a_row:
        run.violation("two samples in a row with more than one leader: %s %s, %s %s" % (
            iso(a[0]), sorted(k for k, v in a[2].items() if v), iso(b[0]), sorted(k for k, v in b[2].items() if v)))
    phases = collections.OrderedDict()
    for t, comp, leads, fence in samples:
        p = phases.setdefault(comp, {"samples": 0, "leaders": collections.Counter(), "none": 0, "double": 0,
                                     "from": t, "to": t})
        p["samples"] += 1
        p["to"] = t
        leaders = [rid for rid, lead in leads.items() if lead]
        for rid in leaders:
            p["leaders"][rid] += 1
        if not leaders:
            p["none"] += 1
        if len(leaders) > 1:
            p["double"] += 1
    report.append(("leader samples", "%d, every %d ms from every live replica; with two leaders %d (%s), "
                   "two in a row %d" % (len(samples), SAMPLE_EVERY * 1000, len(doubles),
                                        ", ".join(iso(s[0]) for s in doubles[:8]) or "none", len(in_a_row))))
    for comp, p in phases.items():
        report.append(("  phase %s" % comp, "%4.1fs..%5.1fs: leaders %s; samples without a leader %d, with two %d"
                       % (p["from"] - T0, p["to"] - T0,
                          ", ".join("%s x%d" % kv for kv in p["leaders"].items()) or "none", p["none"], p["double"])))
    changes = leader_changes(samples)
    report.append(("leader changes", "; ".join("%s %s -> %s (gap %.2fs)" % (iso(t), a, b, gap)
                                               for t, a, b, gap in changes) or "none"))
    epochs, seen = [], set()
    for t, _, _, fence in samples:
        if fence and fence not in seen:
            seen.add(fence)
            epochs.append("%s epoch %d %s" % (iso(t), fence[0], fence[1]))
    report.append(("fence row (id 1)", "; ".join(epochs) or "never read"))
    return samples


def check_steps(run, report, samples, arrivals_us):
    for s in run.steps:
        after = [x for x in samples if x[0] >= s["term_at"]]
        taken = next((x for x in after if any(v for rid, v in x[2].items() if v and rid != s["target"])), None)
        line = "SIGTERM %s (%s) -> exit %.2fs; %s ready %.2fs after the exit" % (
            s["target"], "leader" if s["was_leader"] else "follower", s["exit_at"] - s["term_at"], s["new"],
            s["ready_at"] - s["exit_at"])
        if s["was_leader"]:
            if taken:
                who = [rid for rid, v in taken[2].items() if v and rid != s["target"]]
                line += "; next leader %s seen %.2fs after the SIGTERM" % (",".join(who), taken[0] - s["term_at"])
            else:
                line += "; no other leader seen afterwards"
                run.violation("after %s (the leader) was stopped no other replica led" % s["target"])
            lo = bisect.bisect_left(arrivals_us, s["term_at"] * 1e6 - 2e6)
            hi = bisect.bisect_left(arrivals_us, s["term_at"] * 1e6 + 15e6)
            window = arrivals_us[lo:hi]
            gaps = [b - a for a, b in zip(window, window[1:])]
            if gaps:
                line += "; longest pause at the provider around it %.2fs" % (max(gaps) / 1e6)
        report.append(("  step %d" % s["k"], line))


def check_deliveries(run, report):
    messages = psql_json("SELECT id, status, claimed_by, coalesce(delivery_key::text, id::text) AS key, "
                         "(extract(epoch FROM sent_at))::float8 AS sent_at FROM messages ORDER BY id")
    deliveries = mock("/deliveries")
    stats = mock("/stats")
    requests = mock("/requests")
    by_key = {m["key"]: m for m in messages}
    delivered = {d["key"]: d for d in deliveries}
    missing = sorted(m["id"] for m in messages if m["key"] not in delivered)
    unknown = sorted(k for k in delivered if k not in by_key)
    dups = [d for d in deliveries if d["times_seen"] > 1]
    lost = sorted(set(run.created) - {m["id"] for m in messages})
    if missing:
        run.violation("%d messages never reached the provider: %s" % (len(missing), missing[:20]))
    if unknown:
        run.violation("the provider received %d keys that are no message: %s" % (len(unknown), unknown[:10]))
    if dups or stats["duplicates"]:
        run.violation("%d messages reached the provider more than once (stats duplicates %d): %s" % (
            len(dups), stats["duplicates"],
            ", ".join("%s x%d" % (by_key.get(d["key"], {}).get("id", d["key"]), d["times_seen"]) for d in dups[:20])))
    if lost:
        run.violation("%d messages answered 201 are not in the table: %s" % (len(lost), lost[:20]))
    if stats["unique_keys"] != len(messages):
        run.violation("the provider saw %d unique keys for %d messages" % (stats["unique_keys"], len(messages)))
    status = collections.Counter(m["status"] for m in messages)
    for s in ("pending", "sending", "failed"):
        if status.get(s):
            run.violation("%d messages left %s: %s" % (status[s], s, [m["id"] for m in messages if m["status"] == s][:20]))
    report.append(("messages", "%d in the table (%d answered 201 in %s); delivered %d unique keys, duplicates %d; "
                   "missing %d" % (len(messages), len(run.created), ", ".join(
                       "%s x%d" % kv for kv in sorted(run.answers.items())), stats["unique_keys"],
                       stats["duplicates"], len(missing))))
    report.append(("rows by status", ", ".join("%s %d" % (s, status.get(s, 0))
                                               for s in ("sent", "pending", "sending", "failed"))))
    by_sender = collections.Counter(m["claimed_by"] for m in messages if m["status"] == "sent")
    report.append(("sent by", ", ".join("%s %d" % kv for kv in sorted(by_sender.items(), key=lambda kv: str(kv[0])))))

    # The rate at the provider, as scripts/chaos/checks.py counts it: every request, at
    # its arrival; no window of INTERVAL - JITTER holds more than BATCH_SIZE.
    times = sorted(r["at_us"] for r in requests)
    window = (INTERVAL_MS - RATE_JITTER_MS) * 1000

    def max_in(width):
        return max((bisect.bisect_left(times, t + width, i) - i for i, t in enumerate(times)), default=0)

    bursts, i = [], 0
    while i < len(times):
        j = bisect.bisect_left(times, times[i] + window, i)
        if j - i > BATCH_SIZE:
            bursts.append((times[i], j - i, times[j - 1] - times[i]))
            i = j
        else:
            i += 1
    for start, count, span in bursts[:10]:
        run.violation("rate at the provider: %d requests within %.1f ms from %s (limit %d per %d ms)"
                      % (count, span / 1000, iso(start / 1e6), BATCH_SIZE, window // 1000))
    tightest = min((times[k + BATCH_SIZE] - times[k] for k in range(len(times) - BATCH_SIZE)), default=None)
    report.append(("rate (provider)", "%d requests; max %d in any %d ms window (limit %d), max %d in any full %d ms "
                   "window; tightest %d consecutive within %s ms; bursts %d" % (
                       len(times), max_in(window), window // 1000, BATCH_SIZE, max_in(INTERVAL_MS * 1000),
                       INTERVAL_MS, BATCH_SIZE + 1, "%.1f" % (tightest / 1000) if tightest is not None else "-",
                       len(bursts))))
    return messages, times


def check_migration(run, report, messages):
    rows = psql_json("SELECT version, name, (extract(epoch FROM applied_at))::float8 AS at FROM schema_migrations "
                     "ORDER BY version")
    m14 = next((r for r in rows if r["version"] == 14), None)
    new1 = next((r for r in run.all if r.id == "new-1"), None)
    if m14 is None:
        run.violation("migration 14 is not in schema_migrations: %s" % [r["version"] for r in rows])
        return
    applied_by = [r.id for r in run.all if release(r) == "new" and r.logs and any(
        (e.get("migration") or (e.get("fields") or {}).get("migration")) == "0014_lanes.sql"
        for e in read_events(r.logs[0], {"applied migration"}))]
    if applied_by != ["new-1"]:
        run.violation("migration 0014 should be applied by new-1 alone, applied by %s" % (applied_by or "no new replica"))
    if new1 is not None and not (run.steps[0]["start_at"] - 1 <= m14["at"] <= new1.ready_at + 1):
        run.violation("migration 14 was applied at %s, not while new-1 started" % iso(m14["at"]))
    with run.lock:
        old_alive_then = [r.id for r in run.all if release(r) == "old" and r.id not in
                          {s["target"] for s in run.steps[:1]}]
    old_after = sum(1 for m in messages if m["status"] == "sent" and str(m["claimed_by"]).startswith("old-")
                    and m["sent_at"] and m["sent_at"] > m14["at"])
    report.append(("migration 14", "%s applied at %s by %s, while %s (previous release) ran; messages the previous "
                   "release sent after it: %d" % (m14["name"], iso(m14["at"]), ",".join(applied_by) or "?",
                                                  ", ".join(old_alive_then), old_after)))
    latest = max(r["version"] for r in rows)
    if latest != 14:
        run.warn("schema_migrations goes up to %d (this check was written for 14)" % latest)


def check_lanes(run, report):
    with run.lock:
        news = [r for r in run.members if release(r) == "new" and r.alive()]
    if not news:
        run.violation("no new replica is running at the end")
        return
    code, raw = http(news[0].url + "/api/lanes")
    body = decoded(raw)
    lanes = body.get("lanes") if code == 200 and isinstance(body, dict) else None
    if lanes is None:
        run.violation("GET /api/lanes on %s answered %s: %s" % (news[0].id, code, str(body)[:200]))
        return
    names = [lane.get("name") for lane in lanes]
    default = next((lane for lane in lanes if lane.get("name") == "default"), None)
    leader = (default or {}).get("leader") or {}
    if names != ["default"]:
        run.violation("GET /api/lanes shows lanes %s, expected only default" % names)
    if not leader.get("replica_id"):
        run.violation("GET /api/lanes shows no leader for default: %s" % json.dumps(default)[:300])
    elif leader["replica_id"] not in [r.id for r in news]:
        run.violation("GET /api/lanes names %s as default's leader, not a running new replica" % leader["replica_id"])
    gauges = {}
    for r in news:
        code, raw = http(r.url + "/metrics")
        text = raw.decode("utf-8", "replace") if code == 200 else ""
        line = next((ln for ln in text.splitlines() if ln.startswith('dispatcher_is_leader{lane="default"}')), None)
        gauges[r.id] = line.split()[-1] if line else "?"
    if sum(1 for v in gauges.values() if v == "1") != 1:
        run.violation("dispatcher_is_leader{lane=\"default\"} across the new replicas: %s" % gauges)
    report.append(("GET /api/lanes", "lanes %s; default: leader %s epoch %s; dispatcher_is_leader{lane=\"default\"} %s"
                   % (names, leader.get("replica_id"), leader.get("epoch"),
                      ", ".join("%s=%s" % kv for kv in gauges.items()))))


def check_logs(run, report):
    panics = 0
    errors = collections.Counter()
    for r in run.all:
        for path in r.logs:
            with open(path, "rb") as f:
                for line in f:
                    if b"panicked" in line:
                        panics += 1
                    if b'"level":"ERROR"' in line:
                        try:
                            e = json.loads(line)
                            errors["%s %s: %s" % (r.id, e.get("message", "?")[:60],
                                                  str(e.get("error", (e.get("fields") or {}).get("error", "")))[:80])] += 1
                        except ValueError:
                            errors["%s (unparsable)" % r.id] += 1
    if panics:
        run.violation("%d panic lines in the replica logs" % panics)
    if errors:
        run.warn("ERROR lines in the replica logs: " + "; ".join("%s x%d" % kv for kv in errors.most_common(8)))
    slowest = max((s for _, _, s in run.term_exits), default=0)
    report.append(("replicas", "commits %s; SIGTERM exits %d (non-zero %d, slowest %.2fs); died by themselves %d; panics %d; "
                   "ERROR lines %d" % (", ".join("%s %s" % (rid, v) for rid, v in run.versions.items()),
                                       len(run.term_exits), sum(1 for _, c, _ in run.term_exits if c != 0), slowest,
                                       len(run.unexpected_exits), panics, sum(errors.values()))))


# ------------------------------------------------------------------------------ main --

def main():
    run = RUN
    say("previous release %s, this release %s; CREATE_RATE %.0f/s, BATCH_SIZE %d per %d ms"
        % (OLD_BIN, NEW_BIN, CREATE_RATE, BATCH_SIZE, INTERVAL_MS))
    olds = [Replica(i + 1, REPLICA_ENV, port=PORTS[i], bin=OLD_BIN, replica_id="old-%d" % (i + 1)) for i in range(3)]
    for r in olds:
        r.start()
        with run.lock:
            run.members.append(r)
            run.all.append(r)
    for r in olds:
        r.wait_ready(90)
        note_version(run, r)
    threads = [threading.Thread(target=sampler, args=(run,), daemon=True)]
    threads += [threading.Thread(target=creator, args=(run, w, CREATE_RATE / 2), daemon=True) for w in (1, 2)]
    for t in threads:
        t.start()
    time.sleep(WARMUP)
    for k in (1, 2, 3):
        replace(run, k)
    time.sleep(TAIL)
    run.stop_creating.set()
    for t in threads[1:]:
        t.join(10)
    say("stream stopped: %d messages answered 201" % len(run.created))
    drained = drain(run)
    run.stop_sampling.set()
    threads[0].join(5)

    report = []
    samples = check_leaders(run, report)
    messages, times = check_deliveries(run, report)
    check_steps(run, report, samples, times)
    check_migration(run, report, messages)
    check_lanes(run, report)
    with run.lock:
        members = list(run.members)
        run.stopping.update(r.id for r in members)
    for r in members:
        seconds = r.stop(signal.SIGTERM, TERM_BOUND)
        code = r.proc.returncode
        run.term_exits.append((r.id, code, seconds))
        if code != 0:
            run.violation("%s exited with %s after SIGTERM at the end (see %s)" % (r.id, code, r.log))
    check_logs(run, report)
    report.append(("drain", "%.1fs after the stream stopped; run %.0fs in all" % (drained, time.time() - T0)))

    width = max(len(k) for k, _ in report)
    print("\n==== rolling upgrade: summary")
    for k, v in report:
        print("%-*s  %s" % (width, k, v))
    for w in run.warnings:
        print("warning: " + w)
    if run.violations:
        print("\nFAIL: %d problems" % len(run.violations))
        for v in run.violations:
            print("  - " + v)
        return 1
    print("\nPASS: rolling upgrade from the previous release")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:
        traceback.print_exc()
        sys.exit(2)
