"""The chaos soak's checks (scripts/chaos/soak.py), run once the queue has settled:
what the provider received against what the database holds and what the audit
triggers recorded (see the docstring of soak.py for the reasoning behind each check)."""

import bisect
import collections
import json
import time

from harness import psql_json
from settings import BATCH_SIZE, INTERVAL_MS, RATE_JITTER_MS, SEED_MESSAGES, STRICT_RATE, WEIGHTS, iso, mock

# Faults on the replica holding a claim that can explain a resend of its message: it
# died, froze or stopped after the provider accepted and before the result was
# written, or it was cut off from PostgreSQL while holding the result (the rescue then
# records the message as sent from the delivery cache, unless that entry was lost
# too, for instance by a Redis restart).
EXPLAINING_FAULTS = ("kill", "stop", "term", "pgpath")

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
    messages = psql_json("SELECT id, phone_number, content, status, attempts, provider_message_id, last_error, "
                         "coalesce(delivery_key::text, id::text) AS delivery_key FROM messages ORDER BY id")
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
    # The provider sees each message's delivery key (its Idempotency-Key), not its id.
    id_of_key = {m["delivery_key"]: m["id"] for m in messages}
    delivered = {}
    phantom = []
    for d in deliveries:
        if d["key"] in id_of_key:
            delivered[id_of_key[d["key"]]] = d
        else:
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
    dups = sorted((d for d in deliveries if d["times_seen"] > 1), key=lambda d: id_of_key.get(d["key"], 0))
    explained, unexplained, dup_lines = 0, 0, []
    causes = collections.Counter()
    for d in dups:
        mid = id_of_key.get(d["key"])
        if mid is None:
            continue
        cs = claims.get(mid, [])
        candidates = []
        for c in cs:
            if c["outcome"] not in ("rescued", "retry-noanswer"):
                continue
            until = (c["end"]["at_us"] / US) if c["end"] else time.time()
            hits = [f for f in faults_by_target.get(c["by"], []) if f["kind"] in EXPLAINING_FAULTS
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
        lines = ["  key %s: times_seen %d, %s, same Idempotency-Key (the message's delivery key) on every request"
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
    # Group commit widens the crash window (results waiting for their group die with the
    # process): the figure to watch is extra deliveries per crash of a leader.
    leader_kills = sum(1 for f in run.faults if f["kind"] == "kill" and f.get("leader"))
    report["duplicates per leader crash"] = "%d extra deliveries / %d SIGKILLs of the leader = %s" % (
        extra, leader_kills, ("%.2f" % (extra / leader_kills)) if leader_kills else "n/a")

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

    # provider side: every request (accepted or not) counts against the limit. Attribute
    # each arrival to the latest claim of its message whose batch started before it
    # arrived, to know who sent it and when its batch began.
    requests = mock("/requests")
    window_us = interval_us - RATE_JITTER_MS * 1000
    arrivals = []   # (arrival us, id, batch start us, batch txid, sender)
    unclaimed = []
    for r in requests:
        mid = id_of_key.get(r["key"])
        if mid is None:
            continue
        t = r["at_us"]
        best = None
        for c in claims.get(mid, []):
            b = batches.get(c["txid"])
            start = b["batch_us"] if b else c["at_us"]
            if start <= t and (best is None or start > best[0]):
                best = (start, c["txid"], c["by"])
        if best is None:
            unclaimed.append(mid)
            continue
        arrivals.append((t, mid, best[0], best[1], best[2]))
    if unclaimed:
        run.violation("%d requests arrived before any claim of their message: %s"
                      % (len(unclaimed), sorted(set(unclaimed))[:20]))
    arrivals.sort()
    times = [a[0] for a in arrivals]
    spreads = sorted(a[0] - a[2] for a in arrivals)

    def frozen_after_permit(arrival):
        """The one documented exception: the sender was frozen (SIGSTOP) after its send
        had started and before its request left; the request arrives when it thaws."""
        t, _, start, _, sender = arrival
        return [f for f in run.faults if f["kind"] == "stop" and f["target"] == sender
                and f["begin"] * US >= start and f["end"] * US - 50_000 <= t <= f["end"] * US + 1_000_000]

    def max_in_window(width):
        best = 0
        for i, t in enumerate(times):
            best = max(best, bisect.bisect_left(times, t + width, i) - i)
        return best

    bursts, i = [], 0
    while i < len(times):
        j = bisect.bisect_left(times, times[i] + window_us, i)
        if j - i > BATCH_SIZE:
            bursts.append(arrivals[i:j])
            i = j   # report each burst once
        else:
            i += 1
    explained_bursts = 0
    for group in bursts:
        thawed = [(a, frozen_after_permit(a)) for a in group]
        thawed = [(a, f) for a, f in thawed if f]
        text = "%d requests within %.0f ms from %s (senders %s)" % (
            len(group), (group[-1][0] - group[0][0]) / 1000, iso(group[0][0] / US)[11:23],
            ", ".join(sorted({a[4] for a in group})))
        if thawed:
            a, f = thawed[0]
            explained_bursts += 1
            run.warn("rate burst at the provider explained by a sender frozen after its send started: %s; "
                     "message %d from %s arrived %.0f ms after SIGCONT (frozen %s)"
                     % (text, a[1], a[4], (a[0] - f[0]["end"] * US) / 1000, f[0]["detail"]))
        elif STRICT_RATE:
            run.violation("rate at the provider: " + text)
        else:
            run.warn("rate burst at the provider: " + text)
    # Report the tightest span of BATCH_SIZE + 1 consecutive requests, so the margin is
    # measured, not just counted.
    tightest = min(((times[k + BATCH_SIZE] - times[k], k) for k in range(len(times) - BATCH_SIZE)),
                   default=None)
    if tightest is not None:
        span, k = tightest
        group = arrivals[k:k + BATCH_SIZE + 1]
        report["tightest span"] = "%d consecutive requests within %.1f ms (interval %d ms, jitter allowed %d ms) " \
            "at %s; senders %s" % (BATCH_SIZE + 1, span / 1000, INTERVAL_MS, RATE_JITTER_MS,
                                   iso(group[0][0] / US)[11:23], ", ".join(sorted({a[4] for a in group})))
    pct = lambda p: spreads[min(len(spreads) - 1, int(p * len(spreads)))] / 1000 if spreads else float("nan")
    report["rate (provider)"] = "%d requests; max %d in any %d ms window (limit %d; window = %d ms interval - " \
        "%d ms jitter); bursts over the limit: %d, of them explained by a sender frozen mid-send %d; " \
        "max in a full %d ms window %d" % (
            len(arrivals), max_in_window(window_us), window_us // 1000, BATCH_SIZE, INTERVAL_MS, RATE_JITTER_MS,
            len(bursts), explained_bursts, INTERVAL_MS, max_in_window(interval_us))
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
    for path in (log for r in run.replicas for log in r.logs):
        with open(path, "rb") as f:
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
        sum(r.incarnation for r in run.replicas), len(run.term_exits), slowest,
        sum(1 for _, c, _ in run.term_exits if c != 0), len(run.unexpected_exits), panics)
    report["ERROR log lines"] = ("; ".join("%s x%d" % kv for kv in errors.most_common(6))) or "none"
    report["settle"] = "%.1fs after the last fault" % settle_seconds
    return report, dup_lines

