"""The chaos soak's checks (scripts/chaos/soak.py), run once the queue has settled:
what the provider received against what the database holds and what the audit
triggers recorded (see the docstring of soak.py for the reasoning behind each check).
With lanes (LANES > 1) every rate check runs per lane, against the lane's own batch
size and interval, and the summary has a line per lane."""

import bisect
import collections
import json
import time

from harness import psql_json, span_field
from settings import (LANE_BATCH, LANE_INTERVAL_MS, LANE_NAMES, LANES, RATE_JITTER_MS, SEED_MESSAGES,
                      STALL_AFTER_MS, STALL_TAKEOVER_BOUND_MS, STRICT_RATE, WEIGHTS, iso, mock)

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


def tag(lane):
    """A report key's or a violation's lane: nothing without lanes."""
    return " [%s]" % lane if LANES > 1 else ""


def analyse(run, settle_seconds):
    report = collections.OrderedDict()
    messages = psql_json("SELECT id, phone_number, content, status, attempts, provider_message_id, last_error, "
                         "coalesce(delivery_key::text, id::text) AS delivery_key, lane FROM messages ORDER BY id")
    transitions = psql_json(
        "SELECT seq, (extract(epoch FROM at) * 1000000)::bigint AS at_us, txid, message_id, old_status, "
        "new_status, old_attempts, new_attempts, claim_epoch, claimed_by, last_error, lane, claim_lane "
        "FROM chaos_audit_transitions ORDER BY seq")
    leader_rows = psql_json(
        "SELECT seq, (extract(epoch FROM at) * 1000000)::bigint AS at_us, txid, kind, lane, epoch, holder, "
        "(extract(epoch FROM last_batch_at) * 1000000)::bigint AS batch_us FROM chaos_audit_leader ORDER BY seq")
    deliveries = mock("/deliveries")
    stats = mock("/stats")

    by_id = {m["id"]: m for m in messages}
    lane_of = {m["id"]: m["lane"] for m in messages}
    # The provider sees each message's delivery key (its Idempotency-Key), not its id.
    id_of_key = {m["delivery_key"]: m["id"] for m in messages}
    delivered = {}
    phantom = []
    for d in deliveries:
        if d["key"] in id_of_key:
            delivered[id_of_key[d["key"]]] = d
        else:
            phantom.append(d["key"])
    # Per lane figures for the summary: lane -> column -> value.
    per_lane = collections.defaultdict(dict)
    unknown_lanes = sorted({m["lane"] for m in messages} - set(LANE_NAMES))
    if unknown_lanes:
        run.violation("messages in lanes the soak did not configure: %s" % unknown_lanes)

    # (a) delivery ------------------------------------------------------------------
    missing = sorted(set(by_id) - set(delivered))
    phantom += sorted(set(delivered) - set(by_id))
    lost_acked = sorted(set(run.created_ids) - set(by_id))
    wrong_payload = [i for i, d in delivered.items() if i in by_id and
                     (d["to"] != by_id[i]["phone_number"] or d["content"] != by_id[i]["content"])]
    wrong_pmid = [i for i, m in by_id.items() if m["status"] == "sent" and i in delivered and
                  m["provider_message_id"] != delivered[i]["message_id"]]
    if missing:
        run.violation("%d messages never reached the provider: %s%s" % (
            len(missing), missing[:20],
            (" (lanes: %s)" % ", ".join("%s %d" % kv for kv in sorted(
                collections.Counter(lane_of[i] for i in missing).items()))) if LANES > 1 else ""))
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
    for lane in LANE_NAMES:
        ids = [i for i in by_id if lane_of[i] == lane]
        per_lane[lane]["messages"] = len(ids)
        per_lane[lane]["delivered"] = sum(1 for i in ids if i in delivered)
        per_lane[lane]["missing"] = sum(1 for i in missing if lane_of[i] == lane)

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
            # claim_lane NULL: a claim by a release without lanes, which counts as default's.
            claim = {"message_id": mid, "txid": t["txid"], "epoch": t["claim_epoch"], "by": t["claimed_by"],
                     "at_us": t["at_us"], "end": end, "outcome": classify_end(end),
                     "lane": t["claim_lane"] or "default", "message_lane": t["lane"]}
            claims[mid].append(claim)
            claims_by_tx[t["txid"]].append(claim)
    batches = {row["txid"]: row for row in leader_rows if row["kind"] == "batch"}
    # Epochs are per lane: two lanes may both have an epoch 7.
    epochs = {(row["lane"], row["epoch"]): row for row in leader_rows if row["kind"] == "epoch"}

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
        lane = lane_of[mid]
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
        row = per_lane[lane]
        row["dup keys"] = row.get("dup keys", 0) + 1
        row["extra"] = row.get("extra", 0) + d["times_seen"] - 1
        if ok:
            explained += 1
            for c, hits in candidates[:d["times_seen"] - 1]:
                kinds = sorted({h["kind"] for h in hits}) or ["none"]
                causes["%s after %s" % (c["outcome"], "/".join(kinds))] += 1
        else:
            unexplained += 1
            row["unexplained"] = row.get("unexplained", 0) + 1
        lines = ["  key %s%s: times_seen %d, %s, same Idempotency-Key (the message's delivery key) on every request"
                 % (d["key"], (" (message %d, lane %s)" % (mid, lane)) if LANES > 1 else "", d["times_seen"],
                    "explained" if ok else "UNEXPLAINED")]
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
            run.violation("key %s%s reached the provider %d times and no crash/freeze window explains it"
                          % (d["key"], (" (message %d, lane %s)" % (mid, lane)) if LANES > 1 else "",
                             d["times_seen"]))
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

    # (c) rate, per lane ------------------------------------------------------------------
    no_batch = [tx for tx in claims_by_tx if tx not in batches]
    if no_batch:
        run.violation("%d claim transactions did not set last_batch_at" % len(no_batch))
    # A lane's claim takes only its own lane's rows, under its own fence row.
    cross = [c for cs in claims_by_tx.values() for c in cs
             if c["lane"] != c["message_lane"] or (c["txid"] in batches and batches[c["txid"]]["lane"] != c["lane"])]
    if cross:
        run.violation("%d claims crossed lanes (claim lane / message lane / batch lane): %s" % (
            len(cross), ["%d %s/%s/%s" % (c["message_id"], c["lane"], c["message_lane"],
                                          batches.get(c["txid"], {}).get("lane")) for c in cross[:10]]))
    requests = mock("/requests")
    for lane in LANE_NAMES:
        rate_checks(run, report, per_lane[lane], lane,
                    {tx: row for tx, row in batches.items() if row["lane"] == lane},
                    {tx: cs for tx, cs in claims_by_tx.items()
                     if (batches[tx]["lane"] if tx in batches else cs[0]["lane"]) == lane},
                    {e: row for (ln, e), row in epochs.items() if ln == lane},
                    [r for r in requests if lane_of.get(id_of_key.get(r["key"])) == lane],
                    claims, id_of_key)

    # (d) rows ----------------------------------------------------------------------------
    status_counts = collections.Counter(m["status"] for m in messages)
    for status in ("pending", "sending", "failed"):
        if status_counts.get(status):
            ids = [m["id"] for m in messages if m["status"] == status][:20]
            run.violation("%d rows left %s: %s%s" % (
                status_counts[status], status, ids,
                (" (lanes: %s)" % ", ".join("%s %d" % kv for kv in sorted(collections.Counter(
                    m["lane"] for m in messages if m["status"] == status).items()))) if LANES > 1 else ""))
    report["rows by status"] = ", ".join("%s %d" % (s, status_counts.get(s, 0))
                                         for s in ("sent", "pending", "sending", "failed"))
    for lane in LANE_NAMES:
        per_lane[lane]["left"] = sum(1 for m in messages if m["lane"] == lane and m["status"] != "sent")
    outcomes = collections.Counter(c["outcome"] for cs in claims.values() for c in cs)
    report["claims"] = ", ".join("%s %d" % kv for kv in sorted(outcomes.items()))
    report["provider stats"] = ", ".join("%s %s" % kv for kv in stats.items())
    # The mock logs an arrival for /requests only once it has answered (src/provider/
    # mock.rs): a request whose sender hung up first (killed, or timed out during the
    # injected latency) is counted in /stats and missing from /requests, so check c3
    # cannot see it. Say how many, so the blind spot is measured.
    unlogged = stats["requests"] - len(requests)
    report["provider stats"] += "; %d of them missing from /requests (sender gone before the answer: " \
        "not seen by the provider-side rate check)" % unlogged

    # (e) processes -----------------------------------------------------------------------
    panics = 0
    errors = collections.Counter()
    stall_takeovers = collections.Counter()
    for path in (log for r in run.replicas for log in r.logs):
        with open(path, "rb") as f:
            for line in f:
                if b"panicked" in line:
                    panics += 1
                if b"took the lock over from a stalled leader" in line:
                    try:
                        stall_takeovers[span_field(json.loads(line), "lane") or "default"] += 1
                    except ValueError:
                        stall_takeovers["?"] += 1
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
    report["faults injected"] = "%d: %s; %d of the replica faults hit the leader%s" % (
        len(run.faults), ", ".join("%s %d" % (k, kinds.get(k, 0)) for k in WEIGHTS), on_leader,
        " of a lane" if LANES > 1 else "")
    report["stalled leaders"] = stall_check(run, leader_rows, stall_takeovers)
    slowest = max((t for _, _, t in run.term_exits), default=0)
    report["replicas"] = "%d starts; SIGTERM exits %d (slowest %.2fs, non-zero %d); died by themselves %d; panics %d" % (
        sum(r.incarnation for r in run.replicas), len(run.term_exits), slowest,
        sum(1 for _, c, _ in run.term_exits if c != 0), len(run.unexpected_exits), panics)
    report["ERROR log lines"] = ("; ".join("%s x%d" % kv for kv in errors.most_common(6))) or "none"
    report["settle"] = "%.1fs after the last fault" % settle_seconds

    lane_table = []
    if LANES > 1:
        lane_table.append("  %-8s %-14s %8s %9s %7s %6s %13s %7s %8s %9s %-14s %-12s %7s" % (
            "lane", "limit", "messages", "delivered", "missing", "left", "dup keys/xtra", "unexpl",
            "batches", "terms", "largest batch", "min gap ms", "max/win"))
        for lane in LANE_NAMES:
            row = per_lane[lane]
            lane_table.append("  %-8s %-14s %8d %9d %7d %6d %13s %7d %8d %9d %-14s %-12s %7s" % (
                lane, "%d / %d ms" % (LANE_BATCH[lane], LANE_INTERVAL_MS[lane]), row["messages"], row["delivered"],
                row["missing"], row["left"], "%d/%d" % (row.get("dup keys", 0), row.get("extra", 0)),
                row.get("unexplained", 0), row["batches"], row["terms"],
                "%d (<= %d)" % (row["largest"], LANE_BATCH[lane]), "%.1f (>= %d)" % (row["min gap"], LANE_INTERVAL_MS[lane]),
                "%d/%d" % (row["max in window"], LANE_BATCH[lane])))
        lane_table.append("  (max/win: most requests the provider saw in any window of the lane's interval - %d ms "
                          "jitter, against its batch size; bursts over it: %s)" % (
                              RATE_JITTER_MS, ", ".join("%s %d" % (lane, per_lane[lane]["bursts"]) for lane in LANE_NAMES)))
    return report, dup_lines, lane_table


def rate_checks(run, report, row, lane, batches, claims_by_tx, epochs, requests, claims, id_of_key):
    """Check (c) for one lane: its batches (claim transactions that set its fence row's
    last_batch_at), its terms, and the requests of its messages at the provider, against
    its own batch size and interval. Without lanes, the one lane is `default` and the
    report lines are those the soak always printed."""
    batch_size, interval_ms = LANE_BATCH[lane], LANE_INTERVAL_MS[lane]
    interval_us = interval_ms * 1000
    oversize = {tx: len(cs) for tx, cs in claims_by_tx.items() if len(cs) > batch_size}
    foreign_epoch = [c for cs in claims_by_tx.values() for c in cs
                     if c["txid"] in batches and c["epoch"] != batches[c["txid"]]["epoch"]]
    wrong_holder = [c for cs in claims_by_tx.values() for c in cs
                    if c["epoch"] in epochs and epochs[c["epoch"]]["holder"] != c["by"]]
    starts = sorted(b["batch_us"] for b in batches.values())
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    short_gaps = [(a, b) for a, b in zip(starts, starts[1:]) if b - a < interval_us]
    if oversize:
        run.violation("batches%s over BATCH_SIZE=%d: %s" % (tag(lane), batch_size, sorted(oversize.values())[-5:]))
    if foreign_epoch or wrong_holder:
        run.violation("%d claims%s under an epoch that was not the claiming replica's"
                      % (len(foreign_epoch) + len(wrong_holder), tag(lane)))
    for a, b in short_gaps[:10]:
        run.violation("batch starts%s %s and %s are only %.1f ms apart (PROCESSING_INTERVAL %d ms)"
                      % (tag(lane), iso(a / US)[11:23], iso(b / US)[11:23], (b - a) / 1000, interval_ms))
    sizes = collections.Counter(len(cs) for cs in claims_by_tx.values())
    report["batches (DB)" + tag(lane)] = "%d batches, %d leadership terms; largest batch %d (limit %d); " \
        "shortest gap between batch starts %.1f ms (limit %d ms)" % (
            len(batches), len(epochs), max(sizes) if sizes else 0, batch_size,
            (min(gaps) / 1000) if gaps else float("nan"), interval_ms)
    row.update({"batches": len(batches), "terms": len(epochs), "largest": max(sizes) if sizes else 0,
                "min gap": (min(gaps) / 1000) if gaps else float("nan")})

    # provider side: every request (accepted or not) counts against the limit. Attribute
    # each arrival to the latest claim of its message whose batch started before it
    # arrived, to know who sent it and when its batch began.
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
        run.violation("%d requests%s arrived before any claim of their message: %s"
                      % (len(unclaimed), tag(lane), sorted(set(unclaimed))[:20]))
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
        if j - i > batch_size:
            bursts.append(arrivals[i:j])
            i = j   # report each burst once
        else:
            i += 1
    explained_bursts = 0
    for group in bursts:
        thawed = [(a, frozen_after_permit(a)) for a in group]
        thawed = [(a, f) for a, f in thawed if f]
        text = "%d requests within %.0f ms from %s (senders %s%s)" % (
            len(group), (group[-1][0] - group[0][0]) / 1000, iso(group[0][0] / US)[11:23],
            ", ".join(sorted({a[4] for a in group})),
            ("; lane %s, limit %d per %d ms; messages %s" % (lane, batch_size, interval_ms,
                                                             [a[1] for a in group])) if LANES > 1 else "")
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
    # Report the tightest span of batch_size + 1 consecutive requests, so the margin is
    # measured, not just counted.
    tightest = min(((times[k + batch_size] - times[k], k) for k in range(len(times) - batch_size)),
                   default=None)
    if tightest is not None:
        span, k = tightest
        group = arrivals[k:k + batch_size + 1]
        report["tightest span" + tag(lane)] = "%d consecutive requests within %.1f ms (interval %d ms, jitter " \
            "allowed %d ms) at %s; senders %s" % (batch_size + 1, span / 1000, interval_ms, RATE_JITTER_MS,
                                                  iso(group[0][0] / US)[11:23], ", ".join(sorted({a[4] for a in group})))
    pct = lambda p: spreads[min(len(spreads) - 1, int(p * len(spreads)))] / 1000 if spreads else float("nan")
    report["rate (provider)" + tag(lane)] = "%d requests; max %d in any %d ms window (limit %d; window = %d ms " \
        "interval - %d ms jitter); bursts over the limit: %d, of them explained by a sender frozen mid-send %d; " \
        "max in a full %d ms window %d" % (
            len(arrivals), max_in_window(window_us), window_us // 1000, batch_size, interval_ms, RATE_JITTER_MS,
            len(bursts), explained_bursts, interval_ms, max_in_window(interval_us))
    report["send spread" + tag(lane)] = "batch start -> provider arrival: p50 %.0f ms, p99 %.0f ms, max %.0f ms" % (
        pct(0.5), pct(0.99), pct(1.0) if spreads else float("nan"))
    row.update({"max in window": max_in_window(window_us), "bursts": len(bursts)})


def stall_check(run, leader_rows, stall_takeovers):
    """A SIGSTOPped leader (docs/design.md#a-stalled-leader): each lane it led should
    have a new term within STALL_TAKEOVER_BOUND_MS of the SIGSTOP when the freeze lasts
    longer than that, and none while a freeze shorter than the stall detection (2 W)
    lasts. Measured from the fault's start (the driver's clock) to the lane's next
    epoch row (PostgreSQL's clock, the same machine's). A miss is a warning: another
    fault at the same moment can hold a takeover up or move a lane by itself."""
    epoch_rows = collections.defaultdict(list)
    for row in leader_rows:
        if row["kind"] == "epoch":
            epoch_rows[row["lane"]].append(row)
    replaced, short_kept, latencies = 0, 0, []
    expected_moves, short_lanes = 0, 0
    for f in run.faults:
        if f["kind"] != "stop" or not f.get("lanes"):
            continue
        frozen = f.get("frozen", f["end"] - f["begin"])
        for lane in f["lanes"]:
            nxt = next((r for r in epoch_rows[lane] if r["at_us"] >= f["begin"] * US), None)
            after = (nxt["at_us"] / US - f["begin"]) if nxt else None
            others = [g for g in run.faults if g is not f and g["begin"] <= f["end"] and g["end"] >= f["begin"]]
            context = ("; other faults meanwhile: %s" % ", ".join(
                "%s %s" % (g["kind"], g["target"]) for g in others)) if others else ""
            if frozen * 1000 < STALL_AFTER_MS:
                short_lanes += 1
                if after is not None and after <= frozen + 0.5:
                    run.warn("lane %s moved %.2fs into a %.2fs SIGSTOP of its leader %s (shorter than the %d ms "
                             "stall detection), to %s epoch %s%s" % (lane, after, frozen, f["target"], STALL_AFTER_MS,
                                                                     nxt["holder"], nxt["epoch"], context))
                else:
                    short_kept += 1
            elif frozen * 1000 > STALL_TAKEOVER_BOUND_MS:
                expected_moves += 1
                if after is not None and after * 1000 <= STALL_TAKEOVER_BOUND_MS:
                    replaced += 1
                    latencies.append(after)
                else:
                    run.warn("lane %s was not replaced within %d ms of the SIGSTOP of its leader %s (frozen "
                             "%.1fs): %s%s" % (lane, STALL_TAKEOVER_BOUND_MS, f["target"], frozen,
                                              ("next term after %.2fs (%s epoch %s)" % (after, nxt["holder"], nxt["epoch"]))
                                              if nxt else "no new term", context))
                    if after is not None:
                        latencies.append(after)
    latencies.sort()
    return "lanes of a SIGSTOPped leader replaced within %d ms of the SIGSTOP: %d of %d%s; lanes kept through " \
        "a freeze shorter than %d ms: %d of %d; takeovers logged as from a stalled leader: %s" % (
            STALL_TAKEOVER_BOUND_MS, replaced, expected_moves,
            (" (new term after p50 %.2fs, max %.2fs)" % (latencies[len(latencies) // 2], latencies[-1]))
            if latencies else "",
            STALL_AFTER_MS, short_kept, short_lanes,
            ", ".join("%s %d" % kv for kv in sorted(stall_takeovers.items())) or "none")
