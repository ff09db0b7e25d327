#!/usr/bin/env python3
"""`helm lint` and `helm template`, offline, through Helm's own Go code.

Uses the PyPI package helm-python-sdk (Helm v4's SDK compiled into a shared
library and called with ctypes), so no helm binary has to be downloaded.

    helm_tool.py lint CHART [-f values.yaml ...] [--kube-version v1.33.0]
    helm_tool.py template CHART [-f values.yaml ...] [--api-versions G/V ...]
                         [--kube-version v1.33.0] [--name R] [--namespace N]
                         [--notes]

`template` prints the rendered manifests as one YAML stream like
`helm template` (hooks and tests included, NOTES.txt only with --notes) and
validates the values against values.schema.json first, as helm does.
Exit status: 0 ok, 1 lint errors / render or schema failure, 2 usage.
"""

from __future__ import annotations

import argparse
import json
import sys

import yaml

try:
    import helm_python as helm
    from helm_python import _native
except ImportError:  # pragma: no cover - reported to the caller
    sys.exit("helm_tool.py: the PyPI package helm-python-sdk is not installed")

SEVERITY = {0: "UNKNOWN", 1: "INFO", 2: "WARNING", 3: "ERROR"}


def merge(base: dict, override: dict) -> dict:
    """Deep-merge like helm's -f handling (maps merge, everything else replaces)."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def load_values(files: list[str]) -> dict:
    values: dict = {}
    for path in files:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
        if not isinstance(data, dict):
            raise SystemExit(f"{path}: values file must hold a mapping")
        values = merge(values, data)
    return values


def cmd_lint(args: argparse.Namespace) -> int:
    values = load_values(args.values)
    report = helm.lint(args.chart, values or None, strict=args.strict,
                       kube_version=args.kube_version)
    errors = 0
    for msg in report.get("messages") or []:
        sev = SEVERITY.get(msg.get("severity"), "?")
        print(f"[{sev}] {msg.get('path')}: {msg.get('error')}")
        if msg.get("severity") == 3:
            errors += 1
    for err in report.get("errors") or []:
        print(f"[ERROR] {err}")
        errors += 1
    charts = report.get("total_charts_linted", 0)
    print(f"{charts} chart(s) linted, {errors} error(s)")
    return 1 if errors or charts == 0 else 0


def cmd_template(args: argparse.Namespace) -> int:
    values = load_values(args.values)
    with helm.Chart.load(args.chart) as chart:
        try:
            chart.validate_schema(values)
        except helm.HelmError as exc:
            print(f"Error: values don't meet the specifications of the schema(s):\n{exc}",
                  file=sys.stderr)
            return 1
        opts = {
            "name": args.name,
            "namespace": args.namespace,
            "revision": 1,
            "is_install": True,
            "api_versions": args.api_versions,
        }
        if args.kube_version:
            opts["kube_version"] = args.kube_version
        try:
            # Chart.render() exposes no api_versions; the library's options do
            # (the same knob as `helm template --api-versions`).
            rendered = json.loads(_native.call_string(
                "helm_render", chart._raw(), json.dumps(values), json.dumps(opts)))
        except helm.HelmError as exc:
            print(f"Error: {exc}", file=sys.stderr)
            return 1
    out = []
    for path in sorted(rendered):
        text = rendered[path]
        base = path.rsplit("/", 1)[-1]
        if base.startswith("_"):
            continue
        if base == "NOTES.txt":
            if args.notes:
                print(text, file=sys.stderr)
            continue
        if not text.strip():
            continue
        out.append(f"---\n# Source: {path}\n{text.strip()}\n")
    sys.stdout.write("".join(out))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ("lint", "template"):
        p = sub.add_parser(name)
        p.add_argument("chart")
        p.add_argument("-f", "--values", action="append", default=[])
        p.add_argument("--kube-version", default=None)
        if name == "lint":
            p.add_argument("--strict", action="store_true")
        else:
            p.add_argument("--api-versions", action="append", default=[])
            p.add_argument("--name", default="release-name")
            p.add_argument("--namespace", default="default")
            p.add_argument("--notes", action="store_true",
                           help="print the rendered NOTES.txt to stderr")
    args = parser.parse_args()
    return cmd_lint(args) if args.cmd == "lint" else cmd_template(args)


if __name__ == "__main__":
    sys.exit(main())
