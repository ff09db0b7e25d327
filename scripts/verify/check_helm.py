#!/usr/bin/env python3
"""Render the Helm chart in several configurations and check every object.

    check_helm.py CHART_DIR [--kube-versions 1.25.0,1.33.0] [--out DIR]

For each scenario it runs scripts/verify/helm_tool.py template (Helm's own code),
validates every rendered object strictly (unknown fields rejected) with
kubernetes-validate's offline schemas, and asserts what the chart promises:
hardening, probes, grace period, checksums, hooks, the ServiceMonitor /
pod-annotation exclusivity, the image name, the alert rules' grouping and runbook
links (scripts/verify/check_alerts.py), the lanes (with dispatchConfig.lanes the
DISPATCH_CONFIG file is a TOML that tomllib reads back as the values gave it, mounted
read-only where DISPATCH_CONFIG points, the pods roll on its checksum and the
migration Job does not read it; without lanes no DISPATCH_CONFIG anywhere), that the
unpublished default image is refused with a pointer to docs/operations.md, and that
invalid values files are refused.
Exit status 1 if anything fails.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib

import kubernetes_validate
import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from check_alerts import github_anchors, rule_problems, runbook_entries  # noqa: E402

HELM_TOOL = os.path.join(HERE, "helm_tool.py")
IMAGE_REFUSED = ("image.registry/image.repository must name an image you built and pushed: "
                 "see docs/operations.md#building-and-pushing-the-image")
CRD_GROUPS = ("monitoring.coreos.com/",)  # no built-in schema: asserted, not validated
PROM_ANNOTATION = "prometheus.io/scrape"
DISPATCH_KEY = "dispatch.toml"

failures: list[str] = []


def check(ok: bool, what: str) -> bool:
    if not ok:
        print(f"    FAIL {what}")
        failures.append(what)
    return ok


def render(chart: str, files: list[str], api_versions: list[str]) -> tuple[int, str, str]:
    cmd = [sys.executable, HELM_TOOL, "template", chart, "--name", "md", "--namespace", "dispatch"]
    for f in files:
        cmd += ["-f", f]
    for api in api_versions:
        cmd += ["--api-versions", api]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    return proc.returncode, proc.stdout, proc.stderr


def seconds(text: str) -> float:
    units = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}
    if str(text) == "0":
        return 0.0
    return sum(float(n) * units[u] for n, u in re.findall(r"([0-9.]+)(ns|us|µs|ms|s|m|h)", str(text)))


def by_kind(objs: list[dict], kind: str, hook: bool | None = None) -> list[dict]:
    out = []
    for o in objs:
        if o.get("kind") != kind:
            continue
        is_hook = "helm.sh/hook" in ((o.get("metadata") or {}).get("annotations") or {})
        if hook is None or hook == is_hook:
            out.append(o)
    return out


def validate_objects(objs: list[dict], versions: list[str]) -> int:
    count = 0
    for o in objs:
        api = o.get("apiVersion", "")
        name = f"{o.get('kind')}/{(o.get('metadata') or {}).get('name')}"
        if api.startswith(CRD_GROUPS):
            continue
        for version in versions:
            try:
                kubernetes_validate.validate(o, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                path = "/".join(str(p) for p in exc.path)
                check(False, f"{name} invalid for Kubernetes {version} at {path}: {exc.message}")
            except (kubernetes_validate.SchemaNotFoundError, kubernetes_validate.InvalidSchemaError) as exc:
                check(False, f"{name}: no schema for Kubernetes {version}: {getattr(exc, 'message', exc)}")
            else:
                count += 1
    return count


def promtool_accepts(spec: dict) -> bool:
    """promtool check rules on a PrometheusRule's spec (the same shape as a rule file)."""
    if shutil.which("promtool") is None:
        print("  (promtool not installed: rule syntax not checked)")
        return True
    with tempfile.NamedTemporaryFile("w", suffix=".yml", delete=False) as fh:
        yaml.safe_dump(spec, fh)
    proc = subprocess.run(["promtool", "check", "rules", fh.name], capture_output=True, text=True, check=False)
    os.unlink(fh.name)
    if proc.returncode != 0:
        print(proc.stdout + proc.stderr)
    return proc.returncode == 0


def check_pod_spec(spec: dict, where: str) -> None:
    psc = spec.get("securityContext") or {}
    check(psc.get("runAsNonRoot") is True, f"{where}: pod runAsNonRoot")
    check(psc.get("runAsUser") == 10001, f"{where}: pod runAsUser 10001")
    check((psc.get("seccompProfile") or {}).get("type") == "RuntimeDefault", f"{where}: pod seccomp RuntimeDefault")
    for c in spec.get("containers") or []:
        sc = c.get("securityContext") or {}
        cw = f"{where}/{c.get('name')}"
        check(sc.get("runAsNonRoot") is True, f"{cw}: runAsNonRoot")
        check(sc.get("runAsUser") == 10001, f"{cw}: runAsUser 10001")
        check(sc.get("readOnlyRootFilesystem") is True, f"{cw}: readOnlyRootFilesystem")
        check(sc.get("allowPrivilegeEscalation") is False, f"{cw}: allowPrivilegeEscalation false")
        check((sc.get("capabilities") or {}).get("drop") == ["ALL"], f"{cw}: capabilities drop ALL")
        check((sc.get("seccompProfile") or {}).get("type") == "RuntimeDefault", f"{cw}: seccomp RuntimeDefault")
        check(bool((c.get("resources") or {}).get("requests")), f"{cw}: resource requests")


def check_common(objs: list[dict], scenario: str) -> dict:
    """Invariants for every valid configuration; returns facts for the scenario checks."""
    facts: dict = {}
    deps = by_kind(objs, "Deployment")
    if not check(len(deps) == 1, f"{scenario}: exactly one Deployment"):
        return facts
    dep = deps[0]
    tpl = dep["spec"]["template"]
    spec = tpl["spec"]
    ann = (tpl.get("metadata") or {}).get("annotations") or {}
    facts["replicas"] = dep["spec"].get("replicas")
    facts["pod_annotations"] = ann
    check_pod_spec(spec, f"{scenario}: Deployment")

    (c,) = spec["containers"]
    check(c.get("args") == ["serve"], f"{scenario}: container runs `serve`")
    check(c["livenessProbe"]["httpGet"]["path"] == "/health/live", f"{scenario}: liveness on /health/live")
    check(c["readinessProbe"]["httpGet"]["path"] == "/health/ready", f"{scenario}: readiness on /health/ready")
    check(any(p.get("name") == "http" and p.get("containerPort") for p in c.get("ports") or []),
          f"{scenario}: named http port")
    check(re.fullmatch(r"[0-9a-f]{64}", str(ann.get("checksum/config", ""))) is not None,
          f"{scenario}: checksum/config annotation")
    check(re.fullmatch(r"[0-9a-f]{64}", str(ann.get("checksum/secret", ""))) is not None,
          f"{scenario}: checksum/secret annotation")

    facts["env"] = {e["name"]: e for e in c.get("env") or []}
    facts["container"] = c
    facts["volumes"] = {v["name"]: v for v in spec.get("volumes") or []}

    env_from = c.get("envFrom") or []
    cm_refs = [e["configMapRef"]["name"] for e in env_from if "configMapRef" in e]
    secret_refs = [e["secretRef"]["name"] for e in env_from if "secretRef" in e]
    facts["secret_ref"] = secret_refs[0] if secret_refs else None
    check(len(cm_refs) == 1 and len(secret_refs) == 1, f"{scenario}: envFrom one ConfigMap and one Secret")
    cms = {o["metadata"]["name"]: o for o in by_kind(objs, "ConfigMap", hook=False)}
    check(cm_refs[:1] and cm_refs[0] in cms, f"{scenario}: envFrom ConfigMap is rendered by the release")
    config = (cms.get(cm_refs[0]) if cm_refs else None) or {}
    config = config.get("data") or {}
    facts["config"] = config

    ttl = seconds(config.get("DISTRIBUTED_LOCK_TTL", "15s"))
    shutdown = seconds(config.get("SHUTDOWN_TIMEOUT", "30s"))
    grace = spec.get("terminationGracePeriodSeconds")
    facts["grace"] = grace
    check(isinstance(grace, int) and grace > ttl + shutdown,
          f"{scenario}: terminationGracePeriodSeconds {grace} > TTL + SHUTDOWN_TIMEOUT ({ttl + shutdown:g})")
    check(config.get("SERVER_PORT") == str(c["ports"][0]["containerPort"]), f"{scenario}: SERVER_PORT matches containerPort")
    for key in ("DB_PASSWORD", "REDIS_PASSWORD", "SMS_API_TOKEN", "API_TOKEN", "DLR_TOKEN", "DATABASE_URL", "REDIS_URL"):
        check(key not in config, f"{scenario}: no credential {key} in the ConfigMap")

    svc = by_kind(objs, "Service")
    check(len(svc) == 1, f"{scenario}: one Service")
    if svc:
        sel = svc[0]["spec"]["selector"]
        pod_labels = tpl["metadata"]["labels"]
        check(all(pod_labels.get(k) == v for k, v in sel.items()), f"{scenario}: Service selects the dispatcher pods")
        for job in by_kind(objs, "Job") + by_kind(objs, "Pod"):
            jl = (job["spec"].get("template", {}).get("metadata", {}) if job["kind"] == "Job" else job["metadata"]).get("labels") or {}
            check(not all(jl.get(k) == v for k, v in sel.items()),
                  f"{scenario}: Service does not select {job['kind']}/{job['metadata']['name']}")

    # ServiceMonitor and prometheus.io annotations: never both.
    sms = by_kind(objs, "ServiceMonitor")
    facts["servicemonitor"] = bool(sms)
    check(not (sms and PROM_ANNOTATION in ann),
          f"{scenario}: ServiceMonitor and prometheus.io annotations are not both present")

    # helm test Pod.
    tests = [o for o in by_kind(objs, "Pod") if (o["metadata"].get("annotations") or {}).get("helm.sh/hook") == "test"]
    if check(len(tests) == 1, f"{scenario}: one helm test Pod"):
        t = tests[0]
        check_pod_spec(t["spec"], f"{scenario}: test Pod")
        args = t["spec"]["containers"][0].get("args") or []
        svc_name = svc[0]["metadata"]["name"] if svc else "?"
        check(args[:2] == ["healthcheck", "--url"] and args[2].startswith(f"http://{svc_name}:")
              and args[2].endswith("/health/ready"), f"{scenario}: test Pod runs healthcheck --url http://{svc_name}:<port>/health/ready")
        check(t["spec"]["containers"][0]["image"] == c["image"], f"{scenario}: test Pod uses the dispatcher image")

    # Migration hook.
    jobs = by_kind(objs, "Job")
    facts["migration"] = bool(jobs)
    for job in jobs:
        a = job["metadata"].get("annotations") or {}
        hooks = set((a.get("helm.sh/hook") or "").split(","))
        check(hooks == {"pre-install", "pre-upgrade"}, f"{scenario}: Job is a pre-install,pre-upgrade hook")
        jspec = job["spec"]["template"]["spec"]
        check_pod_spec(jspec, f"{scenario}: migration Job")
        check(jspec["containers"][0].get("args") == ["migrate"], f"{scenario}: Job runs `migrate`")
        check(jspec.get("restartPolicy") in ("Never", "OnFailure"), f"{scenario}: Job restartPolicy")
        weight = int(a.get("helm.sh/hook-weight", "0"))
        # Everything the hook reads must exist before it: hook objects with a lower weight,
        # or objects that are not part of the release (existingSecret).
        release_objs = {(o["kind"], o["metadata"]["name"]) for o in objs
                        if "helm.sh/hook" not in (o["metadata"].get("annotations") or {})}
        hook_objs = {(o["kind"], o["metadata"]["name"]): o for o in objs
                     if set((o["metadata"].get("annotations") or {}).get("helm.sh/hook", "").split(",")) & hooks
                     and o is not job}
        sa = jspec.get("serviceAccountName")
        check(sa is None or ("ServiceAccount", sa) not in release_objs,
              f"{scenario}: hook Job does not use the release's own ServiceAccount/{sa} (created after pre-install hooks)")
        for ref in jspec["containers"][0].get("envFrom") or []:
            kind, name = ("ConfigMap", ref["configMapRef"]["name"]) if "configMapRef" in ref else ("Secret", ref["secretRef"]["name"])
            check((kind, name) not in release_objs,
                  f"{scenario}: hook Job does not read the release's own {kind}/{name} (created after pre-install hooks)")
            if (kind, name) in hook_objs:
                hw = int(hook_objs[(kind, name)]["metadata"]["annotations"].get("helm.sh/hook-weight", "0"))
                check(hw < weight, f"{scenario}: hook {kind}/{name} weight {hw} < Job weight {weight}")
            else:
                check(kind == "Secret" and name == facts.get("secret_ref") and (kind, name) not in release_objs,
                      f"{scenario}: hook Job's {kind}/{name} is an existing Secret")
    return facts


def run_scenario(chart: str, name: str, files: list[str], api_versions: list[str], versions: list[str],
                 out_dir: str | None, expect) -> None:
    rc, out, err = render(chart, files, api_versions)
    if not check(rc == 0, f"{name}: renders ({err.strip()[:400]})"):
        print(f"  FAIL {name}")
        return
    if out_dir:
        with open(os.path.join(out_dir, f"{name}.yaml"), "w", encoding="utf-8") as fh:
            fh.write(out)
    objs = [d for d in yaml.safe_load_all(out) if d]
    before = len(failures)
    n = validate_objects(objs, versions)
    facts = check_common(objs, name)
    expect(objs, facts)
    kinds = sorted(f"{o['kind']}" for o in objs)
    status = "ok  " if len(failures) == before else "FAIL"
    print(f"  {status} {name}: {len(objs)} objects ({', '.join(kinds)}); {n} schema validations passed")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("chart")
    ap.add_argument("--kube-versions", default="1.25.0,1.33.0",
                    help="Kubernetes versions to validate against (kubernetes-validate ships the schemas)")
    ap.add_argument("--out", default=None, help="write each scenario's rendered YAML here")
    args = ap.parse_args()
    chart = args.chart
    ci = os.path.join(chart, "ci")
    versions = args.kube_versions.split(",")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
    print(f"rendering {chart}; validating against Kubernetes {', '.join(versions)} (strict)")

    def image_of(objs) -> str:
        return by_kind(objs, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["image"]

    def expect_image(objs, scenario: str, want: str) -> None:
        check(image_of(objs) == want, f"{scenario}: image {want} (got {image_of(objs)})")
        for job in by_kind(objs, "Job"):
            check(job["spec"]["template"]["spec"]["containers"][0]["image"] == want,
                  f"{scenario}: migration Job runs image {want}")

    def expect_default(objs, f):
        expect_no_extras(objs, f)
        expect_image(objs, "default", "registry.example.com/platform/message-dispatcher:0.1.0")
        check(f.get("replicas") == 3, "default: replicas 3")
        check(len(by_kind(objs, "PodDisruptionBudget")) == 1, "default: PDB rendered")
        check(len(by_kind(objs, "Secret", hook=False)) == 1, "default: chart Secret rendered")
        check(not f.get("servicemonitor"), "default: no ServiceMonitor without the CRD API")
        check(f["pod_annotations"].get(PROM_ANNOTATION) == "true", "default: prometheus.io annotations on the pod")
        check(f.get("migration"), "default: migration Job rendered")
        check(f.get("grace") == 60, f"default: grace period 15s + 30s + 15s = 60 (got {f.get('grace')})")
        check(f["config"].get("AUTO_MIGRATE") == "false", "default: AUTO_MIGRATE false (the Job migrates)")

    def expect_existing(objs, f):
        check(not by_kind(objs, "Secret"), "existing-secret: the chart renders no Secret at all")
        check(f.get("secret_ref") == "message-dispatcher-credentials", "existing-secret: pods read the existing Secret")
        sa = by_kind(objs, "ServiceAccount")
        dep = by_kind(objs, "Deployment")[0]
        check(len(sa) == 1 and dep["spec"]["template"]["spec"]["serviceAccountName"] == sa[0]["metadata"]["name"],
              "existing-secret: ServiceAccount created and used")
        expect_image(objs, "existing-secret", "registry.example.com/platform/message-dispatcher:0.1.0")
        pull = [{"name": "regcred"}]
        check(dep["spec"]["template"]["spec"].get("imagePullSecrets") == pull
              and all(j["spec"]["template"]["spec"].get("imagePullSecrets") == pull for j in by_kind(objs, "Job"))
              and all(p["spec"].get("imagePullSecrets") == pull for p in by_kind(objs, "Pod")),
              "existing-secret: imagePullSecrets on the Deployment, the migration Job and the test Pod")
        check(f["config"].get("BATCH_SIZE") == "10", "existing-secret: integer BATCH_SIZE rendered as string")

    def expect_sm(objs, f):
        expect_image(objs, "servicemonitor", "registry.example.com/platform/message-dispatcher:0.1.0")
        sms = by_kind(objs, "ServiceMonitor")
        check(len(sms) == 1, "servicemonitor: ServiceMonitor rendered with monitoring.coreos.com/v1 available")
        check(PROM_ANNOTATION not in f["pod_annotations"], "servicemonitor: no prometheus.io annotations")
        if sms:
            sm = sms[0]
            check(sm["apiVersion"] == "monitoring.coreos.com/v1", "servicemonitor: apiVersion monitoring.coreos.com/v1")
            ep = sm["spec"]["endpoints"][0]
            check(ep.get("port") == "http" and ep.get("path") == "/metrics", "servicemonitor: scrapes http /metrics")
            check(sm["metadata"]["labels"].get("release") == "kube-prometheus-stack", "servicemonitor: extra labels")
            svc = by_kind(objs, "Service")[0]
            check(all(svc["metadata"]["labels"].get(k) == v for k, v in sm["spec"]["selector"]["matchLabels"].items()),
                  "servicemonitor: selector matches the Service")
        check(f.get("grace") == 75, f"servicemonitor: grace period 20s + 40s + 15s = 75 (got {f.get('grace')})")
        secret = by_kind(objs, "Secret", hook=False)[0]
        check(set(secret.get("data") or {}) == {"DB_PASSWORD", "SMS_API_TOKEN", "API_TOKEN"},
              "servicemonitor: Secret holds exactly the non-empty credentials")

    def expect_sm_no_crd(objs, f):
        check(not f.get("servicemonitor"), "servicemonitor-without-crd: no ServiceMonitor when the API is absent")
        check(f["pod_annotations"].get(PROM_ANNOTATION) == "true",
              "servicemonitor-without-crd: falls back to prometheus.io annotations")

    def expect_single(objs, f):
        check(f.get("replicas") == 1, "single-replica: replicas 1")
        expect_image(objs, "single-replica", "registry.internal:5000/message-dispatcher@sha256:"
                     "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef")
        check(not by_kind(objs, "PodDisruptionBudget"), "single-replica: no PDB")
        check(not f.get("migration"), "single-replica: no migration Job")
        check(f["config"].get("AUTO_MIGRATE") == "true", "single-replica: AUTO_MIGRATE true without the Job")
        check(f.get("grace") == 90, "single-replica: explicit grace period kept")
        dep = by_kind(objs, "Deployment")[0]
        check("topologySpreadConstraints" not in dep["spec"]["template"]["spec"], "single-replica: no spread constraint")

    def expect_sentinel(objs, f):
        check(f["config"].get("REDIS_SENTINELS", "").count(":26379") == 3, "sentinel: REDIS_SENTINELS in the ConfigMap")
        check(f["config"].get("REDIS_SENTINEL_SERVICE") == "mymaster", "sentinel: REDIS_SENTINEL_SERVICE in the ConfigMap")
        secret = by_kind(objs, "Secret", hook=False)[0]
        check("REDIS_SENTINEL_PASSWORD" in (secret.get("data") or {}), "sentinel: the sentinels' password in the Secret")
        check("REDIS_SENTINEL_PASSWORD" not in f["config"], "sentinel: no password in the ConfigMap")

    def dispatch_maps(objs) -> list[dict]:
        return [o for o in by_kind(objs, "ConfigMap") if DISPATCH_KEY in (o.get("data") or {})]

    def expect_no_lanes(objs, f, scenario: str) -> None:
        """Without dispatchConfig.lanes: no file, no DISPATCH_CONFIG anywhere (one lane, as before)."""
        check("DISPATCH_CONFIG" not in f.get("env", {}), f"{scenario}: no DISPATCH_CONFIG in the container's env")
        check("DISPATCH_CONFIG" not in f.get("config", {}), f"{scenario}: no DISPATCH_CONFIG in the ConfigMap")
        check(not dispatch_maps(objs), f"{scenario}: no ConfigMap holds {DISPATCH_KEY}")
        check("checksum/dispatch-config" not in f.get("pod_annotations", {}), f"{scenario}: no checksum/dispatch-config")
        for job in by_kind(objs, "Job"):
            env = job["spec"]["template"]["spec"]["containers"][0].get("env") or []
            check(all(e["name"] != "DISPATCH_CONFIG" for e in env), f"{scenario}: no DISPATCH_CONFIG in the migration Job")

    def expect_lanes(objs, f):
        with open(os.path.join(ci, "lanes-values.yaml"), encoding="utf-8") as fh:
            given = yaml.safe_load(fh)["dispatchConfig"]
        maps = dispatch_maps(objs)
        if not check(len(maps) == 1, f"lanes: one ConfigMap holds {DISPATCH_KEY} (got {len(maps)})"):
            return
        cm = maps[0]
        try:
            plan = tomllib.loads(cm["data"][DISPATCH_KEY])
        except tomllib.TOMLDecodeError as exc:
            check(False, f"lanes: {DISPATCH_KEY} is TOML that tomllib reads ({exc})")
            return
        check([lane["name"] for lane in plan.get("lane", [])] == ["default", "otp", "tr"],
              f"lanes: {DISPATCH_KEY} holds the lanes default, otp, tr (got {[l.get('name') for l in plan.get('lane', [])]})")
        want = {"provider": given["providers"], "lane": given["lanes"], "route": given["routes"]}
        check(plan == want, f"lanes: {DISPATCH_KEY} reads back as dispatchConfig gave it"
              + ("" if plan == want else f" (got {plan}, want {want})"))
        path = (f["env"].get("DISPATCH_CONFIG") or {}).get("value")
        check(path == "/etc/message-dispatcher/dispatch.toml",
              f"lanes: DISPATCH_CONFIG is /etc/message-dispatcher/dispatch.toml (got {path!r})")
        mounted = False
        for m in f["container"].get("volumeMounts") or []:
            vol = f["volumes"].get(m["name"]) or {}
            ref = vol.get("configMap") or {}
            if ref.get("name") != cm["metadata"]["name"]:
                continue
            items = {i["key"]: i["path"] for i in ref.get("items") or []} or {k: k for k in cm["data"]}
            file = (m["mountPath"] if m.get("subPath") == items.get(DISPATCH_KEY)
                    else f"{m['mountPath'].rstrip('/')}/{items.get(DISPATCH_KEY)}")
            check(m.get("readOnly") is True, f"lanes: {cm['metadata']['name']} is mounted read-only")
            mounted = mounted or file == path
        check(mounted, f"lanes: the ConfigMap's {DISPATCH_KEY} is mounted at DISPATCH_CONFIG ({path})")
        check(re.fullmatch(r"[0-9a-f]{64}", str(f["pod_annotations"].get("checksum/dispatch-config", ""))) is not None,
              "lanes: checksum/dispatch-config annotation (the pods roll when the lanes change)")
        check("DISPATCH_CONFIG" not in f["config"] and DISPATCH_KEY not in f["config"],
              "lanes: the envFrom ConfigMap carries neither DISPATCH_CONFIG nor the file")
        for job in by_kind(objs, "Job"):
            jc = job["spec"]["template"]["spec"]["containers"][0]
            check(all(e["name"] != "DISPATCH_CONFIG" for e in jc.get("env") or []) and not jc.get("volumeMounts"),
                  "lanes: the migration Job neither reads DISPATCH_CONFIG nor mounts the file")
        # Every token_env is set in the pods: the chart's Secret or extraEnv here.
        secret = by_kind(objs, "Secret", hook=False)
        keys = set((secret[0].get("data") or {}) if secret else ())
        for provider in plan.get("provider", []):
            var = provider["token_env"]
            check(var in keys or var in f["env"], f"lanes: token_env {var} of provider {provider['name']} is set in the pods")

    repo = os.path.join(os.path.dirname(os.path.abspath(chart)), "..")
    alerts_file = os.path.join(repo, "deploy", "prometheus", "alerts.yml")
    with open(alerts_file, encoding="utf-8") as fh:
        alerts_doc = yaml.safe_load(fh)
    with open(os.path.join(repo, "docs", "operations.md"), encoding="utf-8") as fh:
        operations_md = fh.read()
    runbook = runbook_entries(operations_md)

    def scoped(rules: list[dict], scenario: str, group_by: list[str], base: str) -> None:
        """Every rule grouped and joined by group_by; runbook_url base#<alert> with an anchor in docs/operations.md."""
        for problem in rule_problems(rules, group_by, base, runbook):
            check(False, f"{scenario}: {problem}")

    def rendered_rules(objs) -> list[dict]:
        rules = by_kind(objs, "PrometheusRule")
        if not check(len(rules) == 1, "a PrometheusRule is rendered"):
            return []
        check(promtool_accepts(rules[0]["spec"]), "promtool check rules accepts the PrometheusRule's groups")
        return rules[0]["spec"]["groups"][0]["rules"]

    def normal(rule: dict) -> dict:
        out = dict(rule)
        out["expr"] = " ".join(str(rule["expr"]).split())
        out["annotations"] = {k: " ".join(v.split()) for k, v in rule["annotations"].items()}
        return out

    def expect_rules(objs, f):
        got = [normal(r) for r in rendered_rules(objs)]
        want = [normal(r) for r in alerts_doc["groups"][0]["rules"]]
        check(got == want, "prometheusrule: with default thresholds the rules equal deploy/prometheus/alerts.yml"
              + ("" if got == want else f" (first difference: {next((g, w) for g, w in zip(got + [None] * 99, want + [None] * 99) if g != w)})"))
        scoped(got, "prometheusrule", ["namespace", "job"],
               "https://github.com/message-dispatcher/message-dispatcher/blob/main/docs/operations.md")
        rule = by_kind(objs, "PrometheusRule")
        check(bool(rule) and rule[0]["metadata"]["labels"].get("release") == "kube-prometheus-stack",
              "prometheusrule: extra labels")
        boards = [c for c in by_kind(objs, "ConfigMap") if (c["metadata"].get("labels") or {}).get("grafana_dashboard") == "1"]
        dashboard = os.path.join(os.path.dirname(alerts_file), "..", "grafana", "message-dispatcher.json")
        with open(dashboard, encoding="utf-8") as fh:
            want_board = json.load(fh)
        check(len(boards) == 1 and json.loads(boards[0]["data"]["message-dispatcher.json"]) == want_board,
              "prometheusrule: the dashboard ConfigMap (grafana_dashboard: \"1\") holds deploy/grafana/message-dispatcher.json")

    def expect_no_extras(objs, f):
        check(not by_kind(objs, "PrometheusRule"), "default: no PrometheusRule unless enabled")
        check(not any((c["metadata"].get("labels") or {}).get("grafana_dashboard") for c in by_kind(objs, "ConfigMap")),
              "default: no dashboard ConfigMap unless enabled")

    def expect_thresholds(objs, f):
        rendered = rendered_rules(objs)
        rules = {r["alert"]: r for r in rendered}
        scoped(rendered, "prometheusrule-thresholds", ["cluster", "namespace", "job"],
               "https://wiki.example.com/runbooks/message-dispatcher")
        check("by (cluster, namespace, job, instance, dependency)" in str(rules.get("DispatcherDependencyDown", {}).get("expr")),
              "prometheusrule-thresholds: DispatcherDependencyDown keeps instance and dependency after the grouping labels")
        want = {"DispatcherNoLeader": ("for", "2m"), "DispatcherSplitLeadership": ("for", "45s"),
                "DispatcherBacklogGrowing": ("expr", "> 1800"), "DispatcherProviderErrors": ("expr", "> 0.25"),
                "DispatcherMessagesFailing": ("expr", "> 0.02"), "DispatcherRateBelowConfigured": ("expr", "0.3 *"),
                "DispatcherTargetDown": ("expr", 'job="md-message-dispatcher"')}
        for alert, (field, text) in want.items():
            check(text in str(rules.get(alert, {}).get(field, "")), f"prometheusrule-thresholds: {alert} {field} has {text!r}")

    scenarios = [
        ("default", [os.path.join(ci, "default-values.yaml")], [], expect_default),
        ("existing-secret", [os.path.join(ci, "existing-secret-values.yaml")], [], expect_existing),
        ("servicemonitor", [os.path.join(ci, "servicemonitor-values.yaml")], ["monitoring.coreos.com/v1"], expect_sm),
        ("servicemonitor-without-crd", [os.path.join(ci, "servicemonitor-values.yaml")], [], expect_sm_no_crd),
        ("single-replica", [os.path.join(ci, "single-replica-values.yaml")], [], expect_single),
        ("sentinel", [os.path.join(ci, "sentinel-values.yaml")], [], expect_sentinel),
        ("prometheusrule", [os.path.join(ci, "prometheusrule-values.yaml")], ["monitoring.coreos.com/v1"],
         expect_rules),
        ("prometheusrule-thresholds", [os.path.join(ci, "prometheusrule-thresholds-values.yaml")],
         ["monitoring.coreos.com/v1"], expect_thresholds),
    ]

    def without_lanes(name, expect):
        def both(objs, f):
            expect(objs, f)
            expect_no_lanes(objs, f, name)
        return both

    scenarios = [(name, files, apis, without_lanes(name, expect)) for name, files, apis, expect in scenarios]
    scenarios.append(("lanes", [os.path.join(ci, "lanes-values.yaml")], [], expect_lanes))
    ci_files = sorted(f for f in os.listdir(ci) if f.endswith(".yaml"))
    covered = {os.path.basename(f) for _, files, _, _ in scenarios for f in files}
    check(set(ci_files) <= covered, f"every ci/*.yaml has a scenario (uncovered: {sorted(set(ci_files) - covered)})")
    for name, files, apis, expect in scenarios:
        run_scenario(chart, name, files, apis, versions, args.out, expect)

    # The chart's own defaults name an image no registry carries: refused, with a pointer
    # to the section that says how to build and push one (which must exist).
    rc, out, err = render(chart, [], [])
    ok = check(rc != 0 and IMAGE_REFUSED in err,
               f"default values: refused with {IMAGE_REFUSED!r} (exit {rc}: {err.strip()[-300:]})")
    anchor = IMAGE_REFUSED.rsplit("#", 1)[1]
    ok = check(anchor in {a for _, _, a in github_anchors(operations_md)},
               f"docs/operations.md has a heading with the anchor #{anchor}") and ok
    print(f"  {'ok  ' if ok else 'FAIL'} default values (no image set): {'refused' if rc else 'ACCEPTED'}: "
          f"{next((l.strip() for l in err.splitlines() if 'image.registry' in l), err.strip()[:160])}")

    # Values that must be refused: by the schema, or by the chart's own render-time checks.
    invalid_dir = os.path.join(ci, "invalid")
    must_mention = {
        "replica-count-string.yaml": "replicaCount",
        "unknown-config-key.yaml": "BATCHSIZE",
        "secret-in-config.yaml": "DB_PASSWORD",
        "bad-duration.yaml": "PROCESSING_INTERVAL",
        "short-grace-period.yaml": "terminationGracePeriodSeconds",
        "lock-ttl-too-short.yaml": "DISTRIBUTED_LOCK_TTL",
        "lockless-multi-replica.yaml": "DISTRIBUTED_LOCK_ENABLED",
        "bad-sentinels.yaml": "REDIS_SENTINELS",
        "lanes-without-default.yaml": 'no lane is named "default"',
        "lanes-token-unset.yaml": "token_env OTP_SMS_TOKEN is set by nothing",
        "bad-lane.yaml": "/dispatchConfig/lanes/1/name",
        "twilio-without-account-sid.yaml": "account_sid",
    }
    check(sorted(os.listdir(invalid_dir)) == sorted(must_mention),
          f"ci/invalid holds exactly the expected files ({sorted(os.listdir(invalid_dir))})")
    for fname, needle in sorted(must_mention.items()):
        rc, out, err = render(chart, [os.path.join(invalid_dir, fname)], [])
        ok = check(rc != 0 and needle in err, f"invalid/{fname}: refused, naming {needle}")
        first = next((l.strip() for l in err.splitlines() if needle in l), err.strip()[:120])
        print(f"  {'ok  ' if ok else 'FAIL'} invalid/{fname}: {'refused' if rc else 'ACCEPTED'}: {first}")

    if failures:
        print(f"{len(failures)} helm check(s) failed")
        return 1
    print("all helm checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
