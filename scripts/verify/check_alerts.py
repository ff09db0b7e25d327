#!/usr/bin/env python3
"""Check the alert rules' scoping and runbook links.

    check_alerts.py ALERTS_YML RUNBOOK_MD [--group-by namespace,job]

- every rule aggregates by the grouping labels (each sum/max/min/count/... carries
  `by (namespace, job, ...)`), joins only `on (namespace, job)`, and never uses
  `without` or `ignoring`, so two installs on one Prometheus never alert as one;
- every aggregation over a per-lane series whose lanes must not be added together
  (dispatcher_is_leader, dispatcher_leader_epoch, dispatcher_configured_rate_per_second:
  each lane has a leader and a rate of its own) keeps `lane` in its `by (...)`, so
  three healthy lanes are not three leaders;
- every alert carries a `runbook_url` annotation `<page>#<alert name in lower case>`,
  all on one page whose path ends in RUNBOOK_MD's path (docs/operations.md), and
  that anchor is a heading of RUNBOOK_MD's "Runbook" section under GitHub's anchor
  rules; every heading there names an alert, and every `](#anchor)` link in
  RUNBOOK_MD reaches a heading.

scripts/verify/check_helm.py reuses grouping_problems() on the chart's PrometheusRule.
Exit status 1 if anything fails.
"""

from __future__ import annotations

import argparse
import re
import sys

import yaml

AGGREGATIONS = ("sum", "min", "max", "avg", "group", "stddev", "stdvar", "count",
                "count_values", "bottomk", "topk", "quantile")
AGGREGATION = re.compile(r"\b(" + "|".join(AGGREGATIONS) + r")\b\s*(by|without)?\s*\(")
JOIN = re.compile(r"\b(on|ignoring)\s*\(([^)]*)\)")
QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
# Per-lane series that mean nothing summed over lanes (docs/operations.md, "Lanes").
PER_LANE = ("dispatcher_is_leader", "dispatcher_leader_epoch", "dispatcher_configured_rate_per_second")


def argument(text: str, start: int) -> str:
    """The parenthesised argument that begins at or after `start` (empty: none)."""
    open_at = text.find("(", start)
    if open_at < 0:
        return ""
    depth = 0
    for i in range(open_at, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return text[open_at + 1:i]
    return text[open_at + 1:]


def grouping_problems(expr: str, group_by: list[str]) -> list[str]:
    """What keeps `expr` from being judged per install (empty: nothing)."""
    text = QUOTED.sub('""', " ".join(str(expr).split()))
    problems = []
    aggregations = 0
    for m in AGGREGATION.finditer(text):
        aggregations += 1
        op, clause = m.group(1), m.group(2)
        if clause != "by":
            problems.append(f"{op}(...) without `by ({', '.join(group_by)})`")
            continue
        labels = [label.strip() for label in text[m.end():].split(")", 1)[0].split(",")]
        if labels[:len(group_by)] != group_by:
            problems.append(f"{op} by ({', '.join(labels)}) does not start with ({', '.join(group_by)})")
        over = [name for name in PER_LANE
                if re.search(rf"\b{name}\b", argument(text, text.index(")", m.end()) + 1))]
        if over and "lane" not in labels:
            problems.append(f"{op} by ({', '.join(labels)}) merges the lanes of {', '.join(over)}: "
                            "keep `lane` (each lane has its own leader and rate)")
    if aggregations == 0:
        problems.append(f"no aggregation by ({', '.join(group_by)})")
    for m in JOIN.finditer(text):
        labels = [label.strip() for label in m.group(2).split(",") if label.strip()]
        if m.group(1) != "on" or labels != group_by:
            problems.append(f"{m.group(0)} instead of on ({', '.join(group_by)})")
    return problems


def github_anchors(markdown: str) -> list[tuple[int, str, str]]:
    """(level, heading text, anchor) of every heading outside code fences, with GitHub's
    rules: lower case, punctuation dropped, spaces to '-', repeats suffixed -1, -2."""
    out: list[tuple[int, str, str]] = []
    seen: dict[str, int] = {}
    fence = None
    for line in markdown.splitlines():
        stripped = line.lstrip()
        marker = re.match(r"(`{3,}|~{3,})", stripped)
        if marker:
            if fence is None:
                fence = marker.group(1)[0]
            elif stripped.startswith(fence * 3):
                fence = None
            continue
        if fence is not None:
            continue
        m = re.match(r"(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        text = m.group(2)
        slug = re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.append((len(m.group(1)), text, slug if n == 0 else f"{slug}-{n}"))
    return out


def runbook_entries(markdown: str) -> dict[str, str]:
    """anchor -> heading of the headings inside the "Runbook" section."""
    entries: dict[str, str] = {}
    inside = None
    for level, text, anchor in github_anchors(markdown):
        if inside is None:
            if text == "Runbook":
                inside = level
            continue
        if level <= inside:
            break
        entries[anchor] = text
    return entries


def rule_problems(rules: list[dict], group_by: list[str], base: str, entries: dict[str, str]) -> list[str]:
    problems = []
    for rule in rules:
        name = rule.get("alert")
        if not name:
            continue
        for p in grouping_problems(rule["expr"], group_by):
            problems.append(f"{name}: {p}")
        url = str((rule.get("annotations") or {}).get("runbook_url", ""))
        if url != f"{base}#{name.lower()}":
            problems.append(f"{name}: runbook_url {url!r} is not {base}#{name.lower()}")
        if name.lower() not in entries:
            problems.append(f"{name}: no heading `### {name}` (anchor #{name.lower()}) in the Runbook section")
    return problems


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("alerts")
    ap.add_argument("runbook")
    ap.add_argument("--group-by", default="namespace,job")
    ap.add_argument("--page-suffix", default="/docs/operations.md",
                    help="what the runbook_url's page must end with")
    args = ap.parse_args()
    group_by = args.group_by.split(",")
    with open(args.alerts, encoding="utf-8") as fh:
        rules = [r for g in yaml.safe_load(fh)["groups"] for r in g["rules"]]
    with open(args.runbook, encoding="utf-8") as fh:
        markdown = fh.read()
    entries = runbook_entries(markdown)

    failures = []
    anchors = {anchor for _, _, anchor in github_anchors(markdown)}
    for link in sorted(set(re.findall(r"\]\(#([^)]*)\)", markdown)) - anchors):
        failures.append(f"{args.runbook}: link to #{link}, which is no heading there")
    urls = {str((r.get("annotations") or {}).get("runbook_url", "")).split("#", 1)[0] for r in rules if r.get("alert")}
    base = sorted(urls)[0] if urls else ""
    if len(urls) != 1 or not base.endswith(args.page_suffix):
        failures.append(f"runbook_url pages {sorted(urls)}: expected one page ending in {args.page_suffix}")
    if not entries:
        failures.append(f"{args.runbook}: no \"Runbook\" section with headings")
    failures += rule_problems(rules, group_by, base, entries)
    alerts = {r["alert"].lower() for r in rules if r.get("alert")}
    for anchor, text in entries.items():
        if anchor not in alerts:
            failures.append(f"{args.runbook}: Runbook heading {text!r} names no alert of {args.alerts}")

    for f in failures:
        print(f"  FAIL {f}")
    names = sorted(r["alert"] for r in rules if r.get("alert"))
    if failures:
        print(f"{len(failures)} alert check(s) failed")
        return 1
    print(f"  ok   {len(names)} alerts aggregate by ({', '.join(group_by)}) and join only on it; per-lane series keep `lane`")
    print(f"  ok   each has runbook_url {base}#<name>, a heading of the Runbook section: {', '.join(names)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
