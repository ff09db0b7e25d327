#!/usr/bin/env python3
"""Static checks of the Grafana dashboard (run by scripts/verify/deploy.sh).

Usage: check_dashboard.py DASHBOARD.json [CHART_COPY.json]

- valid JSON in a current schema, with the datasource as a variable;
- every panel and every query uses that variable;
- the panels the README promises are there;
- every metric a query names is one the service exports (src/metrics.rs, the
  process collector, or Prometheus' own `up`);
- lanes: a multi-value `lane` variable (label_values of dispatcher_is_leader's lane),
  a row "Lane $lane" repeated by it whose panels each select lane="$lane", and no
  query that merges the lanes of a per-lane series (leader, epoch, configured rate:
  each lane has its own) without selecting or grouping by lane;
- the Helm chart's copy, when given, is identical.

Whether each query evaluates is checked against a live Prometheus by
scripts/verify/observability.sh.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
REQUIRED_PANELS = [
    "Delivery rate", "Provider answers by provider and code", "Queue by status", "Oldest pending message",
    "Leader per replica", "Leader epoch", "Lock operations by result", "Batch duration",
    "Provider latency", "Fencing rejections and rescues", "Dependencies up", "Memory per replica",
    "CPU per replica",
]
# Per-lane series that mean nothing merged over lanes (docs/operations.md, "Lanes").
PER_LANE = ("dispatcher_is_leader", "dispatcher_leader_epoch", "dispatcher_configured_rate_per_second")
failures: list[str] = []


def check(ok: bool, what: str) -> None:
    print(f"  {'ok  ' if ok else 'FAIL'} {what}")
    if not ok:
        failures.append(what)


def exported_metrics() -> set[str]:
    src = (ROOT / "src" / "metrics.rs").read_text(encoding="utf-8")
    names = set(re.findall(r'"(dispatcher_[a-z_]+)"', src))
    for hist in ("dispatcher_batch_duration_seconds", "dispatcher_provider_request_duration_seconds"):
        names |= {f"{hist}_bucket", f"{hist}_sum", f"{hist}_count"}
    names |= {"process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds",
              "process_virtual_memory_bytes", "process_start_time_seconds", "up"}
    return names


def queries(dash: dict) -> list[tuple[str, str]]:
    out = []
    for panel in dash.get("panels", []):
        for target in panel.get("targets", []):
            out.append((panel.get("title", "?"), target.get("expr", "")))
    for ann in dash.get("annotations", {}).get("list", []):
        if ann.get("expr"):
            out.append((f"annotation {ann.get('name')}", ann["expr"]))
    return out


def main() -> int:
    if len(sys.argv) not in (2, 3):
        print(__doc__, file=sys.stderr)
        return 2
    path = Path(sys.argv[1])
    print(f"dashboard {path}")
    try:
        dash = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        check(False, f"readable JSON ({exc})")
        return 1
    check(dash.get("schemaVersion", 0) >= 36, f"schemaVersion {dash.get('schemaVersion')} is a current one (>= 36)")
    variables = {v.get("name"): v for v in dash.get("templating", {}).get("list", [])}
    ds = variables.get("datasource", {})
    check(ds.get("type") == "datasource" and ds.get("query") == "prometheus",
          "a `datasource` variable of type datasource (prometheus)")
    panels = [p for p in dash.get("panels", []) if p.get("type") != "row"]
    titles = {p.get("title") for p in panels}
    missing = [t for t in REQUIRED_PANELS if t not in titles]
    check(not missing, f"every promised panel is there (missing: {missing})")
    wrong_ds = [p.get("title") for p in panels
                if (p.get("datasource") or {}).get("uid") != "${datasource}"
                or any((t.get("datasource") or {}).get("uid") != "${datasource}" for t in p.get("targets", []))]
    check(not wrong_ds, f"every panel and query uses ${{datasource}} (not: {wrong_ds})")
    check(all(p.get("targets") for p in panels), "every panel has a query")
    ids = [p.get("id") for p in dash.get("panels", [])]
    check(len(ids) == len(set(ids)), "panel ids are unique")
    known = exported_metrics()
    unknown = set()
    for title, expr in queries(dash):
        for name in re.findall(r"\b([a-z_]+)\s*(?=\{|\[)", expr):
            if name not in known and name not in ("by", "without", "on", "ignoring"):
                unknown.add(f"{title}: {name}")
    check(not unknown, f"every queried metric is exported (unknown: {sorted(unknown)})")
    check(any(a.get("expr") and "dispatcher_leader_epoch" in a["expr"]
              for a in dash.get("annotations", {}).get("list", [])), "leadership changes are marked (annotation)")

    lane = variables.get("lane", {})
    lane_query = lane.get("query", {})
    lane_query = lane_query.get("query") if isinstance(lane_query, dict) else lane_query
    check(lane.get("type") == "query" and lane.get("multi") is True and lane.get("includeAll") is True
          and re.fullmatch(r"label_values\(dispatcher_is_leader(\{[^}]*\})?, lane\)", str(lane_query)) is not None,
          f"a `lane` variable: label_values(dispatcher_is_leader..., lane), multi, include all (query {lane_query!r})")
    rows = [i for i, p in enumerate(dash.get("panels", [])) if p.get("type") == "row"]
    lane_rows = [i for i in rows if dash["panels"][i].get("repeat") == "lane"]
    one_row = len(lane_rows) == 1 and "$lane" in dash["panels"][lane_rows[0]].get("title", "")
    check(one_row, "one row repeated by lane, with $lane in its title")
    if one_row:
        start = lane_rows[0]
        end = next((i for i in rows if i > start), len(dash["panels"]))
        inside = dash["panels"][start + 1:end]
        unscoped = [p.get("title") for p in inside
                    if not p.get("targets") or any('lane="$lane"' not in t.get("expr", "") for t in p["targets"])]
        check(bool(inside) and not unscoped, f"the lane row holds panels, each query with lane=\"$lane\" (not: {unscoped})")
    merged = [f"{title}: {expr}" for title, expr in queries(dash)
              if any(re.search(rf"\b{m}\b", expr) for m in PER_LANE)
              and not re.search(r'\blane\s*=~?\s*"', expr)
              and not re.search(r"\bby\s*\([^)]*\blane\b", expr)]
    check(not merged, f"no query merges the lanes of a per-lane series (leader, epoch, configured rate) (not: {merged})")
    if len(sys.argv) == 3:
        copy = Path(sys.argv[2])
        check(copy.is_file() and copy.read_bytes() == path.read_bytes(), f"{copy} is identical")
    print(f"{len(failures)} dashboard check(s) failed" if failures else "all dashboard checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
