#!/usr/bin/env python3
"""The checks of scripts/verify/compose.sh against docker-compose.multi.yml running on
podman (standard library only). Every check waits for a final state with a generous
bound; only the failover's 1 s bounds are acceptance criteria, and they are measured
and printed, not waited for.

    compose.py cluster    --lb URL --replicas N            one leader, N live replicas
    compose.py leader-container --lb URL CONTAINER...      the leader's container name
    compose.py deliveries --mock URL --expect N            N delivered, each once
    compose.py prometheus --prom URL --targets N           N targets up, one leader
    compose.py failover   --lb URL --container C           stop the leader, measure

Options common to all: --timeout SECONDS (bound for the waits), --summary FILE (one
line of figures appended for the shell's summary). Exit status 1 on a failed check.
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))
from harness import http, parse_ts  # noqa: E402
from observability import check, failures, query  # noqa: E402

STATUS = "/api/messaging/status"


def get_json(url: str, timeout: float = 5) -> dict | None:
    code, body = http(url, timeout=timeout)
    if code != 200:
        return None
    try:
        return json.loads(body)
    except ValueError:
        return None


def wait_for(what: str, predicate, timeout: float, step: float = 0.5):
    """predicate() -> (done, last seen); returns the last seen value when done, else None."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        done, last = predicate()
        if done:
            return last
        if time.monotonic() > deadline:
            check(False, f"{what} (within {timeout:.0f} s; last seen: {last!r})")
            return None
        time.sleep(step)


def summary(args, line: str) -> None:
    print(f"  {line}", flush=True)
    if args.summary:
        with open(args.summary, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")


def live_view(status: dict) -> tuple[str | None, int | None, set[str]]:
    leader = status.get("leader") or {}
    alive = leader.get("alive", True) and leader.get("replica_id")
    return (leader.get("replica_id") if alive else None, leader.get("epoch"),
            {r["replica_id"] for r in status.get("replicas", [])})


# --------------------------------------------------------------------------- cluster


def cmd_cluster(args) -> None:
    """Through nginx: the status names one live leader among exactly N live replicas, and
    /health, asked repeatedly, reaches all N replicas with leader=true on that one only."""
    def settled():
        status = get_json(args.lb + STATUS)
        if status is None:
            return False, "no answer"
        leader, epoch, replicas = live_view(status)
        return (leader is not None and leader in replicas and len(replicas) == args.replicas,
                {"leader": leader, "epoch": epoch, "replicas": sorted(replicas)})

    seen = wait_for(f"status through nginx: a leader and {args.replicas} live replicas",
                    settled, args.timeout)
    if seen is None:
        return
    check(True, f"status through nginx: leader {seen['leader']} (epoch {seen['epoch']}), "
                f"{len(seen['replicas'])} live replicas")
    answers: dict[str, set[bool]] = {}
    deadline = time.monotonic() + args.timeout
    asked = 0
    while len(answers) < args.replicas and time.monotonic() < deadline:
        health = get_json(args.lb + "/health")
        asked += 1
        if health is not None:
            answers.setdefault(health["replica_id"], set()).add(bool(health["leader"]))
        time.sleep(0.05)
    leaders = sorted(r for r, flags in answers.items() if True in flags)
    check(set(answers) == set(seen["replicas"]),
          f"/health through nginx reached {len(answers)} distinct replicas in {asked} requests "
          f"(the live ones: {set(answers) == set(seen['replicas'])})")
    check(leaders == [seen["leader"]] and all(len(f) == 1 for f in answers.values()),
          f"/health says leader=true on exactly one replica ({leaders})")
    # The console's own page posts with its Origin: nginx must pass the host and port
    # the browser used, or the replicas take it for another site (403).
    origin = args.lb.rstrip("/")
    request = urllib.request.Request(args.lb + "/api/messaging/start", method="POST",
                                     headers={"Origin": origin})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            code = response.status
    except urllib.error.HTTPError as err:
        code = err.code
    except OSError as err:
        code = str(err)
    check(code == 200, f"a POST through nginx with the page's Origin {origin}: {code} (200: "
                       "nginx passes the host and port the browser used)")


def leader_container(lb: str, podman: list[str], containers: list[str]) -> tuple[str, str]:
    status = get_json(lb + STATUS)
    leader, _, _ = live_view(status or {})
    if leader is None:
        raise SystemExit("no live leader in the status")
    # REPLICA_ID defaults to the hostname (podman: the short container id) plus a suffix.
    for name in containers:
        host = subprocess.run([*podman, "inspect", "--format", "{{.Config.Hostname}}", name],
                              check=True, capture_output=True, text=True).stdout.strip()
        if leader.startswith(host + "-"):
            return name, leader
    raise SystemExit(f"no container's hostname matches the leader {leader}")


def cmd_leader_container(args) -> None:
    name, _ = leader_container(args.lb, shlex.split(args.podman), args.containers)
    print(name)


# ------------------------------------------------------------------------ deliveries


def cmd_deliveries(args) -> None:
    def arrived():
        stats = get_json(args.mock + "/stats")
        return (stats is not None and stats["unique_keys"] >= args.expect), stats

    started = time.monotonic()
    stats = wait_for(f"{args.expect} unique messages at the mock provider", arrived, args.timeout)
    if stats is None:
        return
    waited = time.monotonic() - started
    # Anything resent would arrive with the same key: give stragglers a moment.
    time.sleep(2)
    stats = get_json(args.mock + "/stats") or stats
    check(stats["unique_keys"] == args.expect,
          f"mock /stats: {stats['unique_keys']} unique keys, expected {args.expect}")
    check(stats["duplicates"] == 0 and stats["requests"] == args.expect,
          f"each delivered once: {stats['requests']} requests, {stats['duplicates']} duplicates")
    summary(args, f"deliveries: {stats['requests']} requests, {stats['unique_keys']} unique, "
                  f"{stats['duplicates']} duplicates (waited {waited:.1f} s)")


# ------------------------------------------------------------------------ prometheus


def cmd_prometheus(args) -> None:
    def scraped():
        body = get_json(args.prom + "/api/v1/targets?state=active")
        if body is None:
            return False, "no answer"
        targets = [t for t in body["data"]["activeTargets"]
                   if t["labels"].get("job") == "message-dispatcher"]
        health = sorted(f"{t['labels']['instance']}={t['health']}" for t in targets)
        err, result = query(args.prom, "sum(dispatcher_is_leader)")
        leaders = None if err or not result else float(result[0]["value"][1])
        up = [t for t in targets if t["health"] == "up"]
        return (len(targets) == len(up) == args.targets and leaders == 1,
                {"targets": health, "sum(dispatcher_is_leader)": leaders})

    seen = wait_for(f"Prometheus: {args.targets} dispatcher targets up, "
                    "sum(dispatcher_is_leader) = 1", scraped, args.timeout, step=1)
    if seen is not None:
        check(True, f"Prometheus: targets {', '.join(seen['targets'])}; "
                    f"sum(dispatcher_is_leader) = {seen['sum(dispatcher_is_leader)']:g}")


# -------------------------------------------------------------------------- failover


class Poller:
    """Threads that GET the status through nginx back to back, recording each request's
    start, latency, HTTP status and the leader it names."""

    def __init__(self, url: str, threads: int, timeout: float):
        self.url, self.timeout = url, timeout
        self.records: list[tuple[float, float, int, str | None]] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(threads)]

    def run(self) -> None:
        while not self.stopping.is_set():
            start = time.monotonic()
            code, body = http(self.url, timeout=self.timeout)
            latency = time.monotonic() - start
            leader = None
            if code == 200:
                try:
                    leader, _, _ = live_view(json.loads(body))
                except ValueError:
                    code = -1
            with self.lock:
                self.records.append((start, latency, code, leader))
            time.sleep(0.01)

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stopping.set()
        for t in self.threads:
            t.join(self.timeout + 1)

    def snapshot(self) -> list[tuple[float, float, int, str | None]]:
        with self.lock:
            return list(self.records)


def log_time(podman: list[str], container: str, message: str) -> float | None:
    """Wall-clock time of the first JSON log line of the container with this message."""
    out = subprocess.run([*podman, "logs", container], capture_output=True, text=True).stdout
    for line in out.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("message") == message and "timestamp" in event:
            return parse_ts(event["timestamp"])
    return None


def cmd_failover(args) -> None:
    podman = shlex.split(args.podman)
    old_container, old_leader = leader_container(args.lb, podman, args.containers)
    others = [c for c in args.containers if c != old_container]
    print(f"  leader {old_leader} runs in {old_container}", flush=True)
    bound = args.bound
    with Poller(args.lb + STATUS, args.threads, args.request_timeout) as poller:
        time.sleep(args.baseline)
        before = get_json(args.mock + "/stats") if args.mock else None
        wall_stop, t_stop = time.time(), time.monotonic()
        stop = subprocess.run([*podman, "stop", "-t", str(args.stop_timeout), old_container],
                              capture_output=True, text=True)
        t_stopped = time.monotonic()

        def new_leader():
            for start, latency, code, leader in poller.snapshot():
                if start >= t_stop and code == 200 and leader not in (None, old_leader):
                    return True, (start + latency, leader)
            return False, None

        seen = wait_for("a new leader named through nginx", new_leader, args.timeout, step=0.02)
        # Keep polling past nginx's DNS cache (resolver valid=5s), so that requests it
        # routes to the stopped container's old address are part of the measurement.
        settle_until = max(t_stopped, seen[0] if seen else t_stopped) + args.after
        while time.monotonic() < settle_until:
            time.sleep(0.1)
    records = poller.snapshot()
    check(stop.returncode == 0, f"podman stop -t {args.stop_timeout} {old_container}: "
                                f"exit {stop.returncode} after {t_stopped - t_stop:.3f} s")
    if stop.returncode != 0:
        print(stop.stderr)
    at_stop = "" if before is None else f"; {before['unique_keys']} messages delivered at the stop"
    if before is not None:
        print(f"  the mock provider had received {before['unique_keys']} unique messages when "
              "the stop was issued", flush=True)

    during = [r for r in records if r[0] + r[1] >= t_stop]
    failed = [r for r in during if r[2] != 200]
    latencies = sorted(r[1] for r in during)
    slow = [r for r in during if r[1] > bound]
    worst = max(during, key=lambda r: r[1]) if during else None
    p99 = latencies[int(0.99 * (len(latencies) - 1))] if latencies else float("nan")
    print(f"  {len(records)} status requests through nginx, {len(during)} of them from the stop "
          f"on ({args.threads} clients back to back, {args.request_timeout:.0f} s client timeout)")
    if failed:
        for start, latency, code, _ in failed[:10]:
            print(f"    failed: t={start - t_stop:+.3f} s status {code or 'no answer'} "
                  f"after {latency:.3f} s")
    for start, latency, code, _ in slow[:10]:
        print(f"    slow: t={start - t_stop:+.3f} s status {code} took {latency:.3f} s")
    waited = sorted(r[0] - t_stop for r in during if r[1] > 0.25)
    if waited:
        print(f"  {len(waited)} requests took over 0.25 s, sent between t={waited[0]:+.3f} s and "
              f"t={waited[-1]:+.3f} s (consistent with nginx's 300 ms proxy_connect_timeout to the "
              "stopped container's address, still in its 5 s DNS cache, before the next replica)")
    check(bool(during) and not failed,
          f"no request through nginx failed during the failover ({len(failed)} of {len(during)})")
    check(bool(during) and not slow,
          f"no request through nginx took over {bound:g} s: max {latencies[-1] if latencies else 0:.3f} s "
          f"(t={worst[0] - t_stop:+.3f} s after the stop), p99 {p99:.3f} s, "
          f"median {statistics.median(latencies) if latencies else 0:.3f} s")

    if seen is None:
        return
    t_new, new = seen
    observed = t_new - t_stop
    check(observed <= bound,
          f"new leader {new} named through nginx {observed:.3f} s after `podman stop` was "
          f"issued (bound {bound:g} s; podman stop returned after {t_stopped - t_stop:.3f} s)")

    # The product's own view, from the JSON logs (informational: wall clocks of one host).
    term = log_time(podman, old_container, "shutdown requested; finishing in-flight work")
    released = log_time(podman, old_container, "released the leader lock")
    became = None
    for name in others:
        if new.startswith(subprocess.run([*podman, "inspect", "--format", "{{.Config.Hostname}}",
                                          name], capture_output=True, text=True).stdout.strip()):
            became = log_time(podman, name, "became leader")

    def ms(a: float | None, b: float | None) -> str:
        return "n/a" if a is None or b is None else f"{(b - a) * 1000:.0f} ms"

    print(f"  from the logs: stop issued -> SIGTERM handled {ms(wall_stop, term)}, "
          f"-> lock released {ms(wall_stop, released)}, released -> new leader's "
          f"\"became leader\" {ms(released, became)}")
    summary(args, f"failover: new leader {observed * 1000:.0f} ms after podman stop was issued "
                  f"(stop returned after {(t_stopped - t_stop) * 1000:.0f} ms; lock released -> "
                  f"became leader {ms(released, became)}); {len(during)} requests through nginx "
                  f"from the stop on, {len(failed)} failed, max latency "
                  f"{(latencies[-1] if latencies else 0) * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms"
                  f"{at_stop}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)

    def command(name: str, func, **urls):
        p = sub.add_parser(name)
        for opt in urls:
            p.add_argument(f"--{opt}", required=True)
        p.add_argument("--timeout", type=float, default=90)
        p.add_argument("--summary")
        p.set_defaults(func=func)
        return p

    command("cluster", cmd_cluster, lb=1).add_argument("--replicas", type=int, required=True)
    p = command("leader-container", cmd_leader_container, lb=1)
    p.add_argument("--podman", default="podman")
    p.add_argument("containers", nargs="+")
    command("deliveries", cmd_deliveries, mock=1).add_argument("--expect", type=int, required=True)
    command("prometheus", cmd_prometheus, prom=1).add_argument("--targets", type=int, required=True)
    p = command("failover", cmd_failover, lb=1)
    p.add_argument("--podman", default="podman")
    p.add_argument("--mock", help="mock provider URL: how many had arrived at the stop")
    p.add_argument("--bound", type=float, default=1.0, help="seconds: the acceptance bound")
    p.add_argument("--stop-timeout", type=int, default=60, help="podman stop -t (compose: 60 s)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--request-timeout", type=float, default=5)
    p.add_argument("--baseline", type=float, default=2, help="seconds polled before the stop")
    p.add_argument("--after", type=float, default=7,
                   help="seconds polled after the new leader (nginx caches DNS for 5 s)")
    p.add_argument("containers", nargs="+")
    args = ap.parse_args()
    args.lb = getattr(args, "lb", "").rstrip("/")
    args.func(args)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
