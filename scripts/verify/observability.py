#!/usr/bin/env python3
"""The checks of scripts/verify/observability.sh, against a running Prometheus that
scrapes a local two-replica cluster and loads deploy/prometheus/alerts.yml."""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import time
import urllib.parse
import urllib.request

failures: list[str] = []


def check(ok: bool, what: str) -> bool:
    print(f"  {'ok  ' if ok else 'FAIL'} {what}", flush=True)
    if not ok:
        failures.append(what)
    return ok


def api(base: str, path: str, **params) -> dict:
    url = f"{base}{path}"
    if params:
        url += "?" + urllib.parse.urlencode(params, doseq=True)
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.load(resp)


def query(base: str, expr: str) -> tuple[str | None, list]:
    """(error or None, result vector)."""
    try:
        body = api(base, "/api/v1/query", query=expr)
    except urllib.error.HTTPError as exc:
        try:
            return json.load(exc).get("error", str(exc)), []
        except ValueError:
            return str(exc), []
    if body.get("status") != "success":
        return body.get("error", "status " + str(body.get("status"))), []
    return None, body["data"]["result"]


def wait_for(what: str, predicate, timeout: float, step: float = 0.5):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(step)
    check(False, f"{what} (within {timeout:.0f} s; last seen: {last!r})")
    return None


def dashboard_queries(path: str) -> list[tuple[str, str]]:
    with open(path, encoding="utf-8") as fh:
        dash = json.load(fh)
    out = [(p.get("title", "?"), t["expr"]) for p in dash["panels"] for t in p.get("targets", [])]
    out += [(f"annotation {a['name']}", a["expr"]) for a in dash["annotations"]["list"] if a.get("expr")]
    variables = [v for v in dash["templating"]["list"] if v.get("type") == "query"]
    return out, variables


# The value each dashboard variable takes here: the local cluster runs without a
# DISPATCH_CONFIG file, so its one lane is "default".
VARIABLES = {"job": "message-dispatcher", "lane": "default"}


def grafana_to_promql(expr: str) -> str:
    expr = expr.replace("$__rate_interval", "1m")
    for name, value in VARIABLES.items():
        expr = expr.replace("${" + name + "}", value).replace("$" + name, value)
    return expr


def alerts(base: str) -> list[dict]:
    return api(base, "/api/v1/alerts")["data"]["alerts"]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prometheus", required=True)
    ap.add_argument("--dashboard", required=True)
    ap.add_argument("--alerts", required=True)
    ap.add_argument("--redis-pid", type=int, required=True)
    args = ap.parse_args()
    base = args.prometheus

    print("targets and leadership")
    up = wait_for("both replicas scraped (up == 1)",
                  lambda: (lambda r: len(r) == 2 and all(s["value"][1] == "1" for s in r))(
                      query(base, 'up{job="message-dispatcher"}')[1]), 60)
    if up:
        check(True, "both replicas scraped (up == 1)")
    leader = wait_for("sum(dispatcher_is_leader) reads 1",
                      lambda: [s["value"][1] for s in query(base, "sum(dispatcher_is_leader)")[1]] == ["1"], 60)
    if leader:
        check(True, "sum(dispatcher_is_leader) reads 1")
    # Enough samples for rate(...[1m]) over a few scrapes and some sends.
    wait_for("messages sent (dispatcher_messages_sent_total > 0)",
             lambda: query(base, "sum(dispatcher_messages_sent_total) > 0")[1], 60)
    time.sleep(5)

    print("dashboard queries")
    exprs, variables = dashboard_queries(args.dashboard)
    for title, expr in exprs:
        promql = grafana_to_promql(expr)
        err, result = query(base, promql)
        if err:
            check(False, f"{title}: {promql} -> error {err}")
        elif not result and not title.startswith("annotation"):
            check(False, f"{title}: {promql} -> no data")
        else:
            check(True, f"{title}: {promql} -> {len(result)} series")
    for var in variables:
        q = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        m = re.fullmatch(r"label_values\((\w+(?:\{[^}]*\})?), (\w+)\)", q)
        if not check(m is not None, f"variable {var['name']}: {q} is label_values(metric[{{...}}], label)"):
            continue
        match = grafana_to_promql(m.group(1))
        values = api(base, f"/api/v1/label/{m.group(2)}/values", **{"match[]": match})["data"]
        want = VARIABLES.get(var["name"], "?")
        check(want in values, f"variable {var['name']}: {q} -> {values} (holds {want!r})")

    print("alert rules")
    with open(args.alerts, encoding="utf-8") as fh:
        names = re.findall(r"^\s*- alert:\s*(\w+)", fh.read(), re.M)

    def evaluated_rules():
        groups = api(base, "/api/v1/rules")["data"]["groups"]
        rules = [r for g in groups for r in g["rules"] if r["type"] == "alerting"]
        done = [r for r in rules if not r.get("lastEvaluation", "").startswith("0001")]
        return rules if rules and len(done) == len(rules) else None

    rules = wait_for("every rule evaluated at least once", evaluated_rules, 30) or []
    loaded = {r["name"] for r in rules}
    check(set(names) == loaded and len(names) >= 10,
          f"Prometheus loaded the {len(names)} alerts of alerts.yml ({sorted(loaded)})")
    for rule in rules:
        check(rule.get("health") == "ok" and not rule.get("lastError"),
              f"{rule['name']} evaluates ({rule.get('health')}{': ' + rule['lastError'] if rule.get('lastError') else ''})")
        err, _ = query(base, rule["query"])
        if err:
            check(False, f"{rule['name']}: its expression fails through the query API: {err}")
        url = (rule.get("annotations") or {}).get("runbook_url", "")
        if not url.endswith("/docs/operations.md#" + rule["name"].lower()):
            check(False, f"{rule['name']}: runbook_url {url!r} is not .../docs/operations.md#{rule['name'].lower()}")
    # An alert on a metric no replica exports never fires: every dispatcher_* name the
    # rules read must be scraped (a labelled gauge must be exported at 0 from the start).
    scraped = set(api(base, "/api/v1/label/__name__/values")["data"])
    wanted = {m for r in rules for m in re.findall(r"\b(dispatcher_[a-z0-9_]+)", r["query"])}
    missing = sorted(wanted - scraped)
    check(not missing, f"the replicas export every metric the alerts read ({len(wanted)}; missing: {missing})")
    time.sleep(5)
    active = [(a["labels"]["alertname"], a["state"]) for a in alerts(base)]
    check(not active, f"no alert pending or firing on the healthy cluster ({active})")

    print("Redis stopped")
    os.kill(args.redis_pid, signal.SIGTERM)

    def redis_alert():
        return [a["state"] for a in alerts(base)
                if a["labels"]["alertname"] == "DispatcherDependencyDown"
                and a["labels"].get("dependency") == "redis"]
    states = wait_for("DispatcherDependencyDown{dependency=\"redis\"} pending", redis_alert, 60)
    if states:
        check(True, f"DispatcherDependencyDown{{dependency=\"redis\"}} is {sorted(set(states))} "
                    f"for {len(states)} replica(s)")
        # Grouped by (namespace, job): the alert names the install (here the job alone,
        # the local targets carry no namespace) and the replica.
        labels = [a["labels"] for a in alerts(base) if a["labels"]["alertname"] == "DispatcherDependencyDown"]
        check(bool(labels) and all(l.get("job") == "message-dispatcher" and l.get("instance") for l in labels),
              f"DispatcherDependencyDown carries the job and instance labels ({labels})")

    print(f"{len(failures)} observability check(s) failed" if failures else "all observability checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
