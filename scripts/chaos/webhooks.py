"""Status webhooks in the chaos soak (docs/design.md#status-webhooks): a receiver on
127.0.0.1 that refuses a share of the posts with a 500 (WEBHOOK_FAIL_RATE), checks
every signature with the Standard Webhooks algorithm written out here (not the
replica's code), and records what it accepted. The replicas post to it while they are
killed, frozen and cut off like the rest of the soak; once the queue and the events
have settled, the checks are:

  w1  every message in a final status has its event (`message.<status>`) in
      webhook_events: the triggers write it in the transaction of the change, so no
      crash can lose it;
  w2  every event was delivered: none still pending, none a dead letter;
  w3  every delivered event reached the receiver, which answered 2xx, with the body
      stored for it: no event lost between the database and the receiver;
  w4  every post carried a valid signature.

An event the receiver accepted more than once (its replica died between the answer and
the record) is at-least-once delivery, counted, not a violation. WEBHOOKS=0 turns all of
this off. Standard library only."""

import base64
import collections
import hashlib
import hmac
import json
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from harness import env_float, env_int, psql, psql_json
from settings import RNG, iso, say

WEBHOOKS = env_int("WEBHOOKS", 1) == 1
FAIL_RATE = env_float("WEBHOOK_FAIL_RATE", 0.2)
# Retries start at 5 s and double; a killed replica's lease ends after 60 s.
SETTLE_TIMEOUT = env_float("WEBHOOK_SETTLE_TIMEOUT", 300)
SECRET_BYTES = bytes(RNG.getrandbits(8) for _ in range(32))
SECRET = "whsec_" + base64.b64encode(SECRET_BYTES).decode()
FINAL = ("sent", "failed", "expired", "cancelled", "blocked")


class Receiver:
    def __init__(self):
        self.lock = threading.Lock()
        self.accepted = collections.Counter()   # webhook-id -> times answered 200
        self.bodies = {}                         # webhook-id -> the JSON body
        self.refused = 0
        self.bad_signatures = []
        self.random = random.Random(RNG.getrandbits(32))
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                wid = self.headers.get("webhook-id", "")
                ts = self.headers.get("webhook-timestamp", "")
                signatures = self.headers.get("webhook-signature", "").split()
                signed = "%s.%s.%s" % (wid, ts, body.decode("utf-8", "replace"))
                expected = "v1," + base64.b64encode(
                    hmac.new(SECRET_BYTES, signed.encode(), hashlib.sha256).digest()).decode()
                with receiver.lock:
                    if expected not in signatures:
                        receiver.bad_signatures.append(wid)
                        status = 400
                    elif receiver.random.random() < FAIL_RATE:
                        receiver.refused += 1
                        status = 500
                    else:
                        receiver.accepted[wid] += 1
                        receiver.bodies[wid] = json.loads(body)
                        status = 200
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *_args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = "http://127.0.0.1:%d/hooks" % self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


def replica_env(receiver):
    """What each replica needs to post to `receiver` (nothing with WEBHOOKS=0)."""
    if receiver is None:
        return {}
    return {"STATUS_WEBHOOK_URL": receiver.url, "STATUS_WEBHOOK_SECRET": SECRET}


def settle(run):
    """Waits until no event is pending (the replicas are all running by now)."""
    started, last = time.time(), None
    while time.time() - started < SETTLE_TIMEOUT:
        try:
            pending = int(psql("SELECT count(*) FROM webhook_events WHERE status = 'pending'", timeout=5))
        except Exception:
            time.sleep(1)
            continue
        if pending != last:
            say("webhooks settling: %d events pending" % pending)
            last = pending
        if pending == 0:
            return time.time() - started
        time.sleep(1)
    run.violation("the webhook events did not settle within %.0fs: %s pending" % (SETTLE_TIMEOUT, last))
    return time.time() - started


def check(run, receiver, report):
    """w1 to w4 (see the module's docstring); adds the summary's lines to `report`."""
    events = psql_json("SELECT webhook_id, message_id, type, status, payload FROM webhook_events")
    finals = psql_json("SELECT id, status FROM messages WHERE status IN (%s)"
                       % ", ".join("'%s'" % s for s in FINAL))
    have = {(e["message_id"], e["type"]) for e in events}
    missing = [m for m in finals if (m["id"], "message." + m["status"]) not in have]
    if missing:
        run.violation("w1: %d messages in a final status have no event, e.g. %s"
                      % (len(missing), ", ".join("%d %s" % (m["id"], m["status"]) for m in missing[:5])))
    undelivered = [e for e in events if e["status"] != "delivered"]
    if undelivered:
        run.violation("w2: %d events not delivered, e.g. %s"
                      % (len(undelivered), ", ".join("%s %s" % (e["webhook_id"], e["status"]) for e in undelivered[:5])))
    lost = [e for e in events if e["status"] == "delivered" and e["webhook_id"] not in receiver.accepted]
    if lost:
        run.violation("w3: %d events recorded as delivered never reached the receiver, e.g. %s"
                      % (len(lost), ", ".join(e["webhook_id"] for e in lost[:5])))
    changed = [e["webhook_id"] for e in events
               if e["webhook_id"] in receiver.bodies and receiver.bodies[e["webhook_id"]] != e["payload"]]
    if changed:
        run.violation("w3: %d events reached the receiver with another body than stored, e.g. %s"
                      % (len(changed), ", ".join(changed[:5])))
    unknown = [wid for wid in receiver.accepted if wid not in {e["webhook_id"] for e in events}]
    if unknown:
        run.violation("w3: the receiver accepted %d webhook-ids the database does not hold" % len(unknown))
    if receiver.bad_signatures:
        run.violation("w4: %d posts with a bad signature, e.g. %s"
                      % (len(receiver.bad_signatures), ", ".join(receiver.bad_signatures[:5])))
    types = collections.Counter(e["type"] for e in events)
    report["webhook events"] = "%d for %d final messages (%s); all delivered: %s" % (
        len(events), len(finals), ", ".join("%s %d" % (t, n) for t, n in sorted(types.items())),
        "yes" if not undelivered else "NO")
    repeats = sum(n - 1 for n in receiver.accepted.values() if n > 1)
    report["webhook posts"] = "%d accepted (%d events twice or more: at-least-once), %d refused with 500 on purpose" % (
        sum(receiver.accepted.values()), sum(1 for n in receiver.accepted.values() if n > 1), receiver.refused)
    if repeats:
        say("webhooks: %d repeated posts of an accepted event (a replica died between the answer and its record)"
            % repeats)


def start():
    """The receiver, or None with WEBHOOKS=0."""
    if not WEBHOOKS:
        return None
    receiver = Receiver()
    say("webhook receiver %s (refuses %.0f%% with 500) at %s" % (receiver.url, FAIL_RATE * 100, iso()))
    return receiver

