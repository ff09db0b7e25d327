#!/usr/bin/env python3
"""The measuring half of scripts/bench-*.sh (standard library only).

The bash scripts install what is missing, build the binary, start PostgreSQL and
Redis under a temporary directory and register a cleanup trap; then they call one of
the subcommands below, which start the replicas and the mock provider themselves,
measure, verify and print a table:

    bench.py failover     kill/terminate the leader of 3 replicas, time the handover
                          (bench_failover.py)
    bench.py throughput   drain N messages; pgbench reference of the same SQL
                          (bench_throughput.py)
    bench.py footprint    idle RSS/CPU of leader and follower; RSS after a drain
                          (bench_footprint.py)
    bench.py api          wrk against four endpoints of one replica (bench_api.py)
    bench.py peers        ours against graphile-worker and pg-boss (bench_peers.py)
    bench.py combine F..  one table out of the result files of the others
    bench.py machine      date, CPU, memory, binary version (one line each)

The shared harness is bench_lib.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import bench_lib
from bench_lib import machine_lines, table


def cmd_failover() -> int:
    import bench_failover
    return bench_failover.cmd_failover()


def cmd_throughput() -> int:
    import bench_throughput
    return bench_throughput.cmd_throughput()


def cmd_footprint() -> int:
    import bench_footprint
    return bench_footprint.cmd_footprint()


def cmd_api() -> int:
    import bench_api
    return bench_api.cmd_api()


def cmd_peers() -> int:
    """The same job through ours, graphile-worker and pg-boss, alternating; the code is in
    scripts/bench_peers.py, which is handed the harness module."""
    import bench_peers
    return bench_peers.cmd_peers(bench_lib)


def cmd_machine() -> int:
    print("\n".join(machine_lines()))
    return 0


def cmd_combine(paths: list[str]) -> int:
    rows = []
    for p in paths:
        try:
            data = json.loads(Path(p).read_text())
        except (OSError, ValueError):
            rows.append([Path(p).stem, "(no result: the benchmark failed)", "-", "-", "-", "FAIL"])
            continue
        for row in data["rows"]:
            rows.append([data["bench"], row["figure"], row["n"], row["value"], row["target"], row["result"]])
    print("\n".join(machine_lines()))
    print()
    print(table(["bench", "figure", "n", "value", "target", "result"], rows, "All benchmarks"))
    return 0


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    cmd, args = sys.argv[1], sys.argv[2:]
    commands = {"failover": cmd_failover, "throughput": cmd_throughput, "footprint": cmd_footprint,
                "api": cmd_api, "peers": cmd_peers, "machine": cmd_machine}
    if cmd == "combine":
        return cmd_combine(args)
    if cmd not in commands:
        print(__doc__, file=sys.stderr)
        return 2
    return commands[cmd]()


if __name__ == "__main__":
    sys.exit(main())
