#!/usr/bin/env python3
"""Structural checks of docker-compose.multi.yml and its Prometheus config.

    check_compose.py COMPOSE_FILE [PROMETHEUS_YML]

COMPOSE_FILE may be the file itself or `docker-compose config` output (both
are checked by scripts/verify/deploy.sh). Prints one line per check and
exits 1 if any fails.

Lanes: the replicas (and only they) get DISPATCH_CONFIG pointing at the example file
deploy/dispatch.example.toml, mounted read-only; the file parses, names a lane
"default", its providers' URLs reach a compose service on the port it listens on, and
every token_env it names is set in the replicas' environment. Written
${DISPATCH_CONFIG-...}, so DISPATCH_CONFIG= (set, empty) runs without lanes.
"""

from __future__ import annotations

import os
import re
import sys
import tomllib
import urllib.parse

import yaml

EXPECTED_SERVICES = {"postgres", "redis", "migrate", "mock-provider", "dispatcher", "lb", "prometheus", "grafana"}
ONE_SHOT = {"migrate"}
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = "deploy/dispatch.example.toml"
DISPATCHER_IMAGE = "message-dispatcher:local"
# DISTRIBUTED_LOCK_TTL (15s) + SHUTDOWN_TIMEOUT (30s)
MIN_GRACE_SECONDS = 45

failures: list[str] = []


def check(ok: bool, what: str) -> bool:
    print(f"  {'ok  ' if ok else 'FAIL'} {what}")
    if not ok:
        failures.append(what)
    return ok


def seconds(value) -> float:
    """Compose durations: '60s', '1m30s', '500ms', or a bare number of seconds."""
    if isinstance(value, (int, float)):
        return float(value)
    text = str(value).strip()
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6, "ns": 1e-9}
    parts = re.findall(r"([0-9.]+)(ms|us|ns|h|m|s)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a duration: {value!r}")
    return sum(float(n) * units[u] for n, u in parts)


def env_of(service: dict) -> dict:
    env = service.get("environment") or {}
    if isinstance(env, list):
        out = {}
        for item in env:
            key, _, val = str(item).partition("=")
            out[key] = val if "=" in str(item) else None
        return out
    return dict(env)


def depends(service: dict) -> dict:
    dep = service.get("depends_on") or {}
    if isinstance(dep, list):  # short form: no conditions at all
        return {name: None for name in dep}
    return {name: (spec or {}).get("condition") for name, spec in dep.items()}


def mounts(service: dict) -> list[tuple[str, str, bool]]:
    """(source, target, read-only) of each bind mount, short or long syntax."""
    out = []
    for vol in service.get("volumes") or []:
        if isinstance(vol, dict):
            out.append((str(vol.get("source", "")), str(vol.get("target", "")), bool(vol.get("read_only"))))
        else:
            parts = str(vol).split(":")
            if len(parts) >= 2:
                out.append((parts[0], parts[1], len(parts) > 2 and "ro" in parts[2].split(",")))
    return out


def check_lanes(services: dict, env: dict) -> None:
    disp = services.get("dispatcher", {})
    value = str(env.get("DISPATCH_CONFIG") or "")
    raw = re.fullmatch(r"\$\{DISPATCH_CONFIG-([^}]+)\}", value)
    path = raw.group(1) if raw else value
    check(bool(path) and "$" not in path and (raw is not None or not value.startswith("${")),
          f"replicas get DISPATCH_CONFIG, as ${{DISPATCH_CONFIG-<path>}} in the file (empty: no lanes) (got {value!r})")
    check("DISPATCH_CONFIG" not in env_of(services.get("migrate", {})),
          "migrate gets no DISPATCH_CONFIG (it mounts no file)")
    found = [(src, ro) for src, target, ro in mounts(disp) if target == path]
    source = found[0][0] if found else ""
    if source and not os.path.isabs(source):
        source = os.path.join(ROOT, source)
    check(len(found) == 1 and os.path.normpath(source) == os.path.join(ROOT, EXAMPLE) and found[0][1],
          f"replicas mount {EXAMPLE} read-only at {path} (got {found})")
    try:
        with open(os.path.join(ROOT, EXAMPLE), "rb") as fh:
            plan = tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        check(False, f"{EXAMPLE} is TOML ({exc})")
        return
    check(any(lane.get("name") == "default" for lane in plan.get("lane", [])), f"{EXAMPLE} has a lane named default")
    ports = {}
    for name, svc in services.items():
        cmd = svc.get("command")
        cmd = cmd if isinstance(cmd, list) else str(cmd or "").split()
        if "--port" in cmd and cmd.index("--port") + 1 < len(cmd):
            ports[name] = str(cmd[cmd.index("--port") + 1])
    for provider in plan.get("provider", []):
        url = urllib.parse.urlsplit(str(provider.get("url", "")))
        check(url.hostname in services and ports.get(url.hostname) == str(url.port),
              f"{EXAMPLE}: provider {provider.get('name')} reaches {url.hostname}:{url.port}, "
              f"a compose service listening there ({ports})")
        var = provider.get("token_env")
        check(env.get(var) not in (None, ""),
              f"{EXAMPLE}: token_env {var} of provider {provider.get('name')} is set in the replicas' environment")


def check_compose(path: str) -> dict:
    with open(path, encoding="utf-8") as fh:
        doc = yaml.safe_load(fh)
    services = doc.get("services") or {}
    print(f"compose file {path}: services {sorted(services)}")
    check(set(services) == EXPECTED_SERVICES,
          f"service set is {sorted(EXPECTED_SERVICES)}")

    disp = services.get("dispatcher", {})
    replicas = (disp.get("deploy") or {}).get("replicas")
    check(replicas == 3, f"dispatcher deploy.replicas == 3 (got {replicas!r})")
    check("container_name" not in disp, "dispatcher has no container_name (so --scale works)")
    check(not disp.get("ports"), "dispatcher publishes no host ports (replicas would clash; the lb does)")

    for name in ("dispatcher", "migrate", "mock-provider"):
        svc = services.get(name, {})
        check(svc.get("image") == DISPATCHER_IMAGE and bool(svc.get("build")),
              f"{name} uses build: . with image {DISPATCHER_IMAGE}")
    check((services.get("postgres", {}).get("image") or "").startswith("postgres:15"),
          "postgres runs postgres:15")
    check((services.get("redis", {}).get("image") or "").startswith("redis:7"), "redis runs redis:7")

    cmd = services.get("migrate", {}).get("command")
    cmd = cmd if isinstance(cmd, list) else str(cmd or "").split()
    check(cmd[:1] == ["migrate"], f"migrate runs `migrate` (got {cmd})")
    check(str(services.get("migrate", {}).get("restart")) == "no", 'migrate has restart: "no"')
    mcmd = services.get("mock-provider", {}).get("command")
    mcmd = mcmd if isinstance(mcmd, list) else str(mcmd or "").split()
    check(mcmd[:3] == ["mock-provider", "--port", "3001"], f"mock-provider runs `mock-provider --port 3001` (got {mcmd[:3]})")

    for name, svc in sorted(services.items()):
        if name in ONE_SHOT:
            continue
        hc = svc.get("healthcheck") or {}
        check(bool(hc.get("test")) and not hc.get("disable"), f"{name} has a healthcheck")
    dhc = disp.get("healthcheck") or {}
    check("healthcheck" in " ".join(map(str, dhc.get("test") or [])),
          "dispatcher healthcheck uses the `healthcheck` subcommand")

    deps = depends(disp)
    check(deps.get("migrate") == "service_completed_successfully",
          "dispatcher waits for migrate: service_completed_successfully")
    for dep in ("postgres", "redis"):
        check(deps.get(dep) == "service_healthy", f"dispatcher waits for {dep}: service_healthy")
    check(depends(services.get("migrate", {})).get("postgres") == "service_healthy",
          "migrate waits for postgres: service_healthy")
    for name, svc in sorted(services.items()):
        for dep, cond in depends(svc).items():
            check(dep in services, f"{name} depends on existing service {dep}")
            check(cond in ("service_healthy", "service_completed_successfully", "service_started"),
                  f"{name} -> {dep} has an explicit condition ({cond})")
            if dep in services and cond == "service_healthy":
                check(bool((services[dep].get("healthcheck") or {}).get("test")),
                      f"{name} -> {dep}: service_healthy needs a healthcheck on {dep}")

    grace = disp.get("stop_grace_period")
    check(grace is not None and seconds(grace) > MIN_GRACE_SECONDS,
          f"dispatcher stop_grace_period {grace} > {MIN_GRACE_SECONDS}s (LOCK_TTL + SHUTDOWN_TIMEOUT)")

    env = env_of(disp)
    ttl = seconds(env.get("DISTRIBUTED_LOCK_TTL") or "15s")
    shutdown = seconds(env.get("SHUTDOWN_TIMEOUT") or "30s")
    check(grace is not None and seconds(grace) > ttl + shutdown,
          f"stop_grace_period > DISTRIBUTED_LOCK_TTL + SHUTDOWN_TIMEOUT from the env ({ttl + shutdown:g}s)")
    check(str(env.get("AUTO_MIGRATE")).lower() == "false", "replicas run with AUTO_MIGRATE=false")
    check(env.get("SMS_API_URL") == "http://mock-provider:3001/send",
          "SMS_API_URL points at the mock provider")
    check(env.get("DB_HOST") == "postgres" or "@postgres" in str(env.get("DATABASE_URL")),
          "replicas reach PostgreSQL at the postgres service")
    check(env.get("REDIS_HOST") == "redis" or "redis://redis" in str(env.get("REDIS_URL")),
          "replicas reach Redis at the redis service")
    check(env.get("SERVER_PORT") in (None, "8080", 8080), "replicas listen on 8080")
    check_lanes(services, env)

    check((services.get("dispatcher", {}).get("deploy") or {}).get("mode") == "replicated",
          "dispatcher deploy.mode is replicated (podman-compose needs it for replicas)")
    lb_volumes = " ".join(map(str, services.get("lb", {}).get("volumes") or []))
    check("deploy/nginx/nginx.conf" in lb_volumes, "lb mounts deploy/nginx/nginx.conf")
    prom_volumes = " ".join(map(str, services.get("prometheus", {}).get("volumes") or []))
    check("deploy/prometheus/prometheus.yml" in prom_volumes,
          "prometheus mounts deploy/prometheus/prometheus.yml")
    check("deploy/prometheus/alerts.yml" in prom_volumes,
          "prometheus mounts deploy/prometheus/alerts.yml")
    graf_volumes = " ".join(map(str, services.get("grafana", {}).get("volumes") or []))
    check("deploy/grafana/provisioning" in graf_volumes
          and "deploy/grafana/message-dispatcher.json" in graf_volumes,
          "grafana mounts its provisioning and the dashboard")
    return doc


def check_nginx(path: str) -> None:
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    print(f"nginx config {path}")
    check(re.search(r"^\s*resolver\s", text, re.M) is None
          and re.search(r"^\s*include\s+/tmp/nginx-resolver\*\.conf;", text, re.M) is not None,
          "nginx takes its resolver from start.sh (no engine-specific address)")
    start = os.path.join(os.path.dirname(path), "start.sh")
    check(os.path.isfile(start) and "/etc/resolv.conf" in open(start, encoding="utf-8").read(),
          "start.sh writes the resolver from /etc/resolv.conf")
    check(re.search(r"location = /lb-health \{[^}]*proxy_pass", text, re.S) is not None,
          "the lb health check goes through an upstream")
    timeouts = re.findall(r"proxy_connect_timeout\s+(\d+)ms;", text)
    check(bool(timeouts) and all(int(t) < 1000 for t in timeouts), "proxy_connect_timeout well under 1 s")
    check(re.search(r"set\s+\$\w+\s+http://dispatcher:8080", text) is not None
          and re.search(r"proxy_pass\s+\$\w+", text) is not None,
          "nginx proxies to dispatcher:8080 through a variable (re-resolved per request)")


def check_prometheus(path: str) -> None:
    with open(path, encoding="utf-8") as fh:
        prom = yaml.safe_load(fh)
    print(f"prometheus config {path}")
    found = False
    for job in prom.get("scrape_configs") or []:
        for sd in job.get("dns_sd_configs") or []:
            if "dispatcher" in (sd.get("names") or []) and sd.get("type") == "A" \
                    and int(sd.get("port", 0)) == 8080:
                found = True
                check(job.get("metrics_path", "/metrics") == "/metrics",
                      f"job {job.get('job_name')} scrapes /metrics")
    check(found, "a scrape job uses dns_sd_configs {names: [dispatcher], type: A, port: 8080}")
    check("alerts.yml" in (prom.get("rule_files") or []), "rule_files loads alerts.yml")


def main() -> int:
    if len(sys.argv) not in (2, 3):
        print(__doc__, file=sys.stderr)
        return 2
    check_compose(sys.argv[1])
    if len(sys.argv) == 3:
        check_prometheus(sys.argv[2])
        nginx = sys.argv[2].replace("prometheus/prometheus.yml", "nginx/nginx.conf")
        if nginx != sys.argv[2]:
            check_nginx(nginx)
    if failures:
        print(f"{len(failures)} compose check(s) failed")
        return 1
    print("all compose checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
