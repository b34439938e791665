#!/usr/bin/env python3
"""Checks of the deployment files, offline.

Renders every kustomize overlay (k8s/overlays/{dev,prod} and their migrate/
kustomizations) with `kubectl kustomize` and checks the properties a
deployment relies on; reads docker-compose.yml, deploy/otel-collector.yaml
and the Dockerfile and checks their structure. Schema validation is
scripts/check-deploy.sh's job (kubernetes-validate, docker compose config,
hadolint).

    python3 tests/deploy/test_manifests.py        # or: python3 -m unittest ...

Needs kubectl (kustomize is built in) and PyYAML; nothing else, no cluster.
DATAGATE_DEPLOY_ROOT points the checks at another copy of the repository.

Each check is a function that raises AssertionError with a message. The
class ChecksCanFail breaks a copy of the real rendered output in one way per
assertion and expects the check to fail, so no check passes vacuously.
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
import tomllib
import unittest
from pathlib import Path

import yaml

ROOT = Path(os.environ.get("DATAGATE_DEPLOY_ROOT") or Path(__file__).resolve().parents[2])
ENVIRONMENTS = {
    # namespace, HPA min (the replica count), HPA max
    # client_auth: None for TLS off, else the mTLS mode it must have.
    "dev": {"namespace": "datagate-dev", "min": 1, "max": 2, "redis_mode": "single", "client_auth": "none"},
    "prod": {"namespace": "datagate", "min": 3, "max": 12, "redis_mode": "cluster", "client_auth": "required"},
}
GRPC_PORT = 50051
METRICS_PORT = 9090
# Seconds the grace period must leave after readiness delay + drain (+ preStop
# sleep): after the drain the service waits up to 10 s for the search log to
# be written out (SEARCH_LOG_CLOSE_TIMEOUT in service/startup.rs), then
# exports its last spans.
GRACE_MARGIN = 10
SECRET_KEYS = (
    "DATAGATE__DATABASE__URL",
    "DATAGATE__DATABASE__READ_URL",
    "DATAGATE__PAGINATION__TOKEN_SECRET",
    "DATAGATE__AUTH__TOKENS",
    "DATAGATE__REDIS__URL",
    "DATAGATE__MONGODB__URL",
)

_rendered: dict[str, list[dict]] = {}


def render(path: str) -> list[dict]:
    """`kubectl kustomize ROOT/path`, parsed (cached per run)."""
    if path not in _rendered:
        result = subprocess.run(
            ["kubectl", "kustomize", str(ROOT / path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if result.returncode != 0:
            raise AssertionError(f"kubectl kustomize {path} failed:\n{result.stderr}")
        _rendered[path] = [d for d in yaml.safe_load_all(result.stdout) if d]
    return copy.deepcopy(_rendered[path])


def load_yaml(path: str) -> dict:
    return yaml.safe_load((ROOT / path).read_text())


def find(docs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [
        d
        for d in docs
        if d.get("kind") == kind and (name is None or d["metadata"]["name"] == name)
    ]


def the(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def pod_specs(docs: list[dict]) -> list[tuple[str, dict]]:
    """(owner, pod spec) of every Deployment and Job."""
    return [
        (f"{d['kind']}/{d['metadata']['name']}", d["spec"]["template"]["spec"])
        for d in docs
        if d.get("kind") in ("Deployment", "Job")
    ]


def containers(spec: dict) -> list[dict]:
    return spec.get("initContainers", []) + spec.get("containers", [])


def app_container(docs: list[dict]) -> dict:
    spec = the(docs, "Deployment", "datagate")["spec"]["template"]["spec"]
    found = [c for c in spec["containers"] if c["name"] == "datagate"]
    assert len(found) == 1, "the Deployment has no container named datagate"
    return found[0]


def duration_seconds(text: str) -> float:
    """humantime durations as used in the configuration: 5s, 500ms, 1m30s."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h)", text)
    assert parts and "".join(n + u for n, u in parts) == text.replace(" ", ""), (
        f"not a duration: {text!r}"
    )
    return sum(float(n) * units[u] for n, u in parts)


def compiled_defaults() -> dict:
    return tomllib.loads((ROOT / "config/default.toml").read_text())


def effective_env(docs: list[dict], container: dict) -> dict[str, str]:
    """The DATAGATE__* variables the container gets from ConfigMaps and env."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            cm = the(docs, "ConfigMap", source["configMapRef"]["name"])
            env.update({k: str(v) for k, v in cm.get("data", {}).items()})
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = str(var["value"])
    return env


def setting(docs: list[dict], section: str, key: str) -> float:
    """A duration setting in seconds: environment first, then the defaults."""
    env = effective_env(docs, app_container(docs))
    name = f"DATAGATE__{section.upper()}__{key.upper()}"
    value = env.get(name, compiled_defaults()[section][key])
    return duration_seconds(str(value))


def pod_labels(docs: list[dict]) -> dict:
    return the(docs, "Deployment", "datagate")["spec"]["template"]["metadata"]["labels"]


def selects(selector: dict, labels: dict) -> bool:
    """A label selector (matchLabels / matchExpressions) against labels."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        value, op = labels.get(expr["key"]), expr["operator"]
        if op == "In" and value not in expr["values"]:
            return False
        if op == "NotIn" and value in expr["values"]:
            return False
        if op == "Exists" and value is None:
            return False
        if op == "DoesNotExist" and value is not None:
            return False
    return True


# --- checks of a rendered service overlay ------------------------------------


def tls_enabled(docs: list[dict]) -> bool:
    env = effective_env(docs, app_container(docs))
    default = str(compiled_defaults()["server"]["tls"]["enabled"])
    return env.get("DATAGATE__SERVER__TLS__ENABLED", default).lower() == "true"


def health_port(docs: list[dict]) -> int:
    """The plaintext health port the pod serves; 0 where it serves none
    (unset in the defaults means none)."""
    env = effective_env(docs, app_container(docs))
    default = compiled_defaults()["server"].get("health_port", 0)
    return int(env.get("DATAGATE__SERVER__HEALTH_PORT", default))


def probe_port(docs: list[dict]) -> int:
    """The port the kubelet's gRPC probes must ask: they cannot speak TLS,
    so with TLS on, the plaintext health port."""
    if not tls_enabled(docs):
        return GRPC_PORT
    port = health_port(docs)
    assert port not in (0, GRPC_PORT), (
        f"TLS is on but the health port is {port}: the kubelet's gRPC probes cannot speak TLS "
        "(set DATAGATE__SERVER__HEALTH_PORT)"
    )
    return port


def check_probes(docs: list[dict]) -> None:
    c = app_container(docs)
    grpc_ports = [p["containerPort"] for p in c.get("ports", []) if p.get("name") == "grpc"]
    assert grpc_ports == [GRPC_PORT], f"the container's grpc port is {grpc_ports}"
    port = probe_port(docs)
    if port != GRPC_PORT:
        health = [p["containerPort"] for p in c.get("ports", []) if p.get("name") == "health"]
        assert health == [port], f"the container's health port is {health}, the setting {port}"
    for kind, service in (
        ("readinessProbe", ""),
        ("livenessProbe", "liveness"),
        ("startupProbe", "liveness"),
    ):
        probe = c.get(kind)
        assert probe, f"{kind} is missing"
        assert set(probe) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"grpc"}, (
            f"{kind} must be a native grpc probe, is {sorted(probe)}"
        )
        assert probe["grpc"].get("port") == port, (
            f"{kind} probes port {probe['grpc'].get('port')}, not {port} "
            f"({'the plaintext health port: TLS is on' if port != GRPC_PORT else 'the gRPC port'})"
        )
        assert probe["grpc"].get("service", "") == service, (
            f"{kind} asks for health service {probe['grpc'].get('service', '')!r}, "
            f"expected {service!r}"
        )


def check_termination_grace(docs: list[dict]) -> None:
    spec = the(docs, "Deployment", "datagate")["spec"]["template"]["spec"]
    c = app_container(docs)
    grace = spec.get("terminationGracePeriodSeconds", 30)
    delay = setting(docs, "server", "shutdown_readiness_delay")
    drain = setting(docs, "server", "drain_timeout")
    pre_stop = c.get("lifecycle", {}).get("preStop")
    sleep = 0
    if pre_stop:
        assert "exec" not in pre_stop, "preStop must not exec a command: the image has no shell"
        sleep = pre_stop.get("sleep", {}).get("seconds", 0)
    assert delay > 0 or sleep > 0, (
        "neither a shutdown readiness delay nor a preStop sleep: endpoints would be "
        "removed only after the listener closed"
    )
    needed = delay + drain + sleep + GRACE_MARGIN
    assert grace >= needed, (
        f"terminationGracePeriodSeconds {grace} < readiness delay {delay} + drain "
        f"{drain} + preStop sleep {sleep} + margin {GRACE_MARGIN}"
    )


def check_resources(docs: list[dict]) -> None:
    specs = pod_specs(docs)
    assert specs, "no pod templates"
    for owner, spec in specs:
        for c in containers(spec):
            res = c.get("resources", {})
            for part in ("requests", "limits"):
                for what in ("cpu", "memory"):
                    assert res.get(part, {}).get(what), (
                        f"{owner} container {c['name']}: resources.{part}.{what} missing"
                    )


def check_security(docs: list[dict]) -> None:
    for owner, spec in pod_specs(docs):
        pod = spec.get("securityContext", {})
        assert pod.get("runAsNonRoot") is True, f"{owner}: pod runAsNonRoot is not true"
        assert pod.get("seccompProfile", {}).get("type") == "RuntimeDefault", (
            f"{owner}: seccompProfile is not RuntimeDefault"
        )
        assert spec.get("automountServiceAccountToken") is False, (
            f"{owner}: the service account token is mounted"
        )
        for c in containers(spec):
            sc = c.get("securityContext", {})
            where = f"{owner} container {c['name']}"
            uid = sc.get("runAsUser", pod.get("runAsUser"))
            assert isinstance(uid, int) and uid != 0, f"{where}: runAsUser {uid} is not a non-root UID"
            assert sc.get("runAsNonRoot", pod.get("runAsNonRoot")) is True, f"{where}: runAsNonRoot"
            assert sc.get("readOnlyRootFilesystem") is True, f"{where}: root filesystem is writable"
            assert sc.get("allowPrivilegeEscalation") is False, f"{where}: privilege escalation allowed"
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], f"{where}: capabilities not dropped"
            assert not sc.get("privileged"), f"{where}: privileged"


def check_metrics_annotations(docs: list[dict]) -> None:
    template = the(docs, "Deployment", "datagate")["spec"]["template"]
    ann = template["metadata"].get("annotations", {})
    ports = [p["containerPort"] for p in app_container(docs).get("ports", []) if p.get("name") == "metrics"]
    assert ports == [METRICS_PORT], f"the container's metrics port is {ports}"
    assert ann.get("prometheus.io/scrape") == "true", "prometheus.io/scrape is not \"true\""
    assert ann.get("prometheus.io/port") == str(METRICS_PORT), (
        f"prometheus.io/port is {ann.get('prometheus.io/port')!r}, the metrics port is {METRICS_PORT}"
    )
    assert ann.get("prometheus.io/path") == "/metrics", "prometheus.io/path is not /metrics"


def _ports(rule: dict) -> set[tuple[str, int]]:
    return {(p.get("protocol", "TCP"), p.get("port")) for p in rule.get("ports", [])}


def check_network_policy(docs: list[dict]) -> None:
    policy = the(docs, "NetworkPolicy", "datagate")["spec"]
    assert set(policy.get("policyTypes", [])) == {"Ingress", "Egress"}, (
        f"policyTypes {policy.get('policyTypes')}: both Ingress and Egress are needed"
    )
    assert selects(policy["podSelector"], pod_labels(docs)), "the policy does not select the datagate pods"
    ingress = policy.get("ingress", [])
    assert all(rule.get("from") and rule.get("ports") for rule in ingress), (
        "an ingress rule without `from` or `ports` admits everyone or every port"
    )
    client = [
        r
        for r in ingress
        if ("TCP", GRPC_PORT) in _ports(r)
        and any(
            "namespaceSelector" in peer
            and peer.get("podSelector", {}).get("matchLabels", {}).get("datagate.io/client") == "true"
            for peer in r["from"]
        )
    ]
    assert client, "no ingress rule admits pods labelled datagate.io/client=true to the gRPC port"
    scrape = [
        r
        for r in ingress
        if ("TCP", METRICS_PORT) in _ports(r)
        and any(
            peer.get("namespaceSelector", {}).get("matchLabels", {}).get("kubernetes.io/metadata.name")
            == "monitoring"
            for peer in r["from"]
        )
    ]
    assert scrape, "no ingress rule admits the monitoring namespace to the metrics port"
    egress = policy.get("egress", [])
    assert all(rule.get("to") and rule.get("ports") for rule in egress), (
        "an egress rule without `to` or `ports` allows everything"
    )
    allowed = set().union(*(_ports(r) for r in egress)) if egress else set()
    for need, what in (
        (("UDP", 53), "DNS over UDP"),
        (("TCP", 53), "DNS over TCP"),
        (("TCP", 5432), "PostgreSQL"),
        (("TCP", 6379), "Redis"),
        (("TCP", 27017), "MongoDB"),
        (("TCP", 4317), "the OTLP collector"),
    ):
        assert need in allowed, f"egress to {what} ({need[0]} {need[1]}) is not allowed"


def check_hpa(docs: list[dict], env: str) -> None:
    hpa = the(docs, "HorizontalPodAutoscaler", "datagate")
    assert hpa["apiVersion"] == "autoscaling/v2", f"HPA apiVersion {hpa['apiVersion']}"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target.get("apiVersion"), target.get("kind"), target.get("name")) == (
        "apps/v1",
        "Deployment",
        "datagate",
    ), f"the HPA targets {target}, not the Deployment"
    metrics = [
        m["resource"]
        for m in hpa["spec"].get("metrics", [])
        if m.get("type") == "Resource" and m["resource"]["name"] == "cpu"
    ]
    assert metrics and metrics[0]["target"]["type"] == "Utilization", "no CPU utilization target"
    down = hpa["spec"].get("behavior", {}).get("scaleDown", {})
    assert down.get("stabilizationWindowSeconds", 0) > 0, "no scale-down stabilization window"
    want = ENVIRONMENTS[env]
    got = (hpa["spec"].get("minReplicas"), hpa["spec"]["maxReplicas"])
    assert got == (want["min"], want["max"]), f"{env}: HPA bounds {got}, expected {(want['min'], want['max'])}"
    replicas = the(docs, "Deployment", "datagate")["spec"].get("replicas")
    assert replicas is None, (
        f"the Deployment sets replicas={replicas}: every apply would fight the HPA"
    )


def check_pdb(docs: list[dict]) -> None:
    pdb = the(docs, "PodDisruptionBudget", "datagate")
    assert pdb["apiVersion"] == "policy/v1", f"PDB apiVersion {pdb['apiVersion']}"
    assert selects(pdb["spec"]["selector"], pod_labels(docs)), "the PDB selector does not match the pod labels"
    spec = pdb["spec"]
    assert ("minAvailable" in spec) != ("maxUnavailable" in spec), "set one of minAvailable / maxUnavailable"
    if "maxUnavailable" in spec:
        assert spec["maxUnavailable"] not in (0, "0%"), "maxUnavailable 0 blocks every drain"


def check_services(docs: list[dict]) -> None:
    labels = pod_labels(docs)
    regular = the(docs, "Service", "datagate")["spec"]
    headless = the(docs, "Service", "datagate-headless")["spec"]
    assert regular.get("clusterIP") != "None", "Service datagate must have a cluster IP"
    assert headless.get("clusterIP") == "None", "Service datagate-headless is not headless"
    for name, spec in (("datagate", regular), ("datagate-headless", headless)):
        assert selects({"matchLabels": spec["selector"]}, labels), f"Service {name} selects no datagate pod"
        grpc = [p for p in spec["ports"] if p.get("name") == "grpc"]
        assert grpc and grpc[0]["port"] == GRPC_PORT, f"Service {name} has no grpc port {GRPC_PORT}"
        assert grpc[0].get("appProtocol") == "grpc", f"Service {name}: the grpc port lacks appProtocol: grpc"
    assert any(p["port"] == METRICS_PORT for p in regular["ports"]), "Service datagate has no metrics port"
    health = health_port(docs)
    if health:
        for service in find(docs, "Service"):
            exposed = [
                p for p in service["spec"]["ports"]
                if health in (p.get("port"), p.get("targetPort")) or p.get("targetPort") == "health"
            ]
            assert not exposed, (
                f"Service {service['metadata']['name']} exposes the plaintext health port {health}: "
                "only the kubelet may reach it"
            )


def check_tls(docs: list[dict], env: str) -> None:
    """TLS as the environment wants it, its files from a Secret volume the
    kubelet updates in place (read-only, no subPath)."""
    want = ENVIRONMENTS[env]["client_auth"]
    if want is None:
        assert not tls_enabled(docs), f"{env} is meant to run without TLS"
        return
    assert tls_enabled(docs), f"TLS is off in {env}"
    vars_ = effective_env(docs, app_container(docs))
    mode = vars_.get("DATAGATE__SERVER__TLS__CLIENT_AUTH", compiled_defaults()["server"]["tls"]["client_auth"])
    assert mode == want, f"{env}: server.tls.client_auth is {mode!r}, not {want!r}"
    c = app_container(docs)
    spec = the(docs, "Deployment", "datagate")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    files = ("CERT_FILE", "KEY_FILE") + (("CLIENT_CA_FILE",) if want != "none" else ())
    for key in files:
        path = vars_.get(f"DATAGATE__SERVER__TLS__{key}", "")
        assert path, f"DATAGATE__SERVER__TLS__{key} is not set"
        mounts = [m for m in c.get("volumeMounts", []) if path.startswith(m["mountPath"].rstrip("/") + "/")]
        assert mounts, f"{path} is on no volume mount"
        mount = mounts[0]
        assert mount.get("readOnly") is True, f"the mount of {path} is writable"
        assert not mount.get("subPath"), f"{path} is mounted with subPath: a rotated Secret never reaches it"
        assert "secret" in volumes.get(mount["name"], {}), f"{path} does not come from a Secret volume"


def check_config_and_image(docs: list[dict]) -> None:
    c = app_container(docs)
    config_maps = {d["metadata"]["name"] for d in find(docs, "ConfigMap")}
    refs = c.get("envFrom", [])
    cm_refs = [r["configMapRef"]["name"] for r in refs if "configMapRef" in r]
    assert cm_refs and all(n in config_maps for n in cm_refs), (
        f"envFrom ConfigMaps {cm_refs} are not among the rendered {sorted(config_maps)}"
    )
    secret_refs = [r["secretRef"]["name"] for r in refs if "secretRef" in r]
    assert secret_refs == ["datagate"], f"envFrom Secrets {secret_refs}, expected ['datagate']"
    env = effective_env(docs, c)
    assert env.get("DATAGATE__TELEMETRY__LOG_FORMAT") == "json", "logs are not JSON"
    assert env.get("DATAGATE__TELEMETRY__OTLP_ENDPOINT", "").endswith(":4317"), "no OTLP/gRPC endpoint"
    image = c["image"]
    assert "@sha256:" in image or re.search(r":[\w.-]+$", image.rsplit("/", 1)[-1]), (
        f"image {image!r} has neither a tag nor a digest"
    )
    assert not image.endswith(":latest"), f"image {image!r} uses latest"


def check_no_secrets(docs: list[dict]) -> None:
    secrets = find(docs, "Secret")
    assert not secrets, (
        f"rendered output contains Secrets {[s['metadata']['name'] for s in secrets]}: "
        "secrets are made outside the repository"
    )
    for cm in find(docs, "ConfigMap"):
        for key, value in cm.get("data", {}).items():
            assert key not in SECRET_KEYS, f"ConfigMap {cm['metadata']['name']} holds the secret {key}"
            assert not re.search(r"://[^/@\s]+:[^/@\s]+@", str(value)), (
                f"ConfigMap {cm['metadata']['name']}: {key} holds a URL with a password"
            )
            assert not re.search(r"\b[0-9a-f]{64}\b", str(value)), (
                f"ConfigMap {cm['metadata']['name']}: {key} holds what looks like a token hash"
            )


def check_redis_mode(docs: list[dict], env: str) -> None:
    env_vars = effective_env(docs, app_container(docs))
    mode = env_vars.get("DATAGATE__REDIS__MODE", compiled_defaults()["redis"]["mode"])
    want = ENVIRONMENTS[env]["redis_mode"]
    assert mode == want, f"redis mode is {mode!r} in {env}, not {want!r}"


def check_environment(docs: list[dict], env: str) -> None:
    want = ENVIRONMENTS[env]["namespace"]
    for d in docs:
        assert d["metadata"].get("namespace") == want, (
            f"{d['kind']}/{d['metadata']['name']} is in namespace {d['metadata'].get('namespace')}, not {want}"
        )


# --- checks of a rendered migration overlay ----------------------------------


def check_migration_job(job_docs: list[dict], app_docs: list[dict]) -> None:
    job = the(job_docs, "Job", "datagate-migrate")
    spec = job["spec"]
    for field in ("backoffLimit", "ttlSecondsAfterFinished", "activeDeadlineSeconds"):
        assert isinstance(spec.get(field), int), f"Job {field} is not set"
    pod = spec["template"]["spec"]
    assert pod.get("restartPolicy") in ("Never", "OnFailure"), "Job restartPolicy"
    migrate = [c for c in containers(pod) if c.get("args") == ["migrate", "up"]]
    assert len(migrate) == 1, "no container runs `datagate migrate up`"
    migrate = migrate[0]
    assert "command" not in migrate, "the migrate container overrides the image's entrypoint"
    assert migrate["image"] == app_container(app_docs)["image"], (
        f"the Job migrates with {migrate['image']}, the Deployment runs {app_container(app_docs)['image']}"
    )
    secrets = [r["secretRef"]["name"] for r in migrate.get("envFrom", []) if "secretRef" in r]
    assert secrets == ["datagate-migrations"], (
        f"the migration reads Secrets {secrets}: it must use the migration role's Secret only"
    )
    # The Job's pods are not the service's: no Service, PDB or HPA counts them.
    labels = spec["template"]["metadata"]["labels"]
    deployment = the(app_docs, "Deployment", "datagate")
    assert not selects(deployment["spec"]["selector"], labels), "the Deployment's selector matches the Job's pods"
    post = [c for c in pod.get("containers", []) if c["name"] == "grants"]
    assert post, "no container runs post-migrate.sql"
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    config_maps = {d["metadata"]["name"]: d for d in find(job_docs, "ConfigMap")}
    mounted = [
        volumes[m["name"]]["configMap"]["name"]
        for m in post[0].get("volumeMounts", [])
        if "configMap" in volumes.get(m["name"], {})
    ]
    assert mounted and all(
        "post-migrate.sql" in config_maps.get(name, {}).get("data", {}) for name in mounted
    ), "the grants container does not mount post-migrate.sql"
    # After the migration, not beside it.
    assert migrate in pod.get("initContainers", []), "migrate up must be an init container"


# --- docker-compose.yml, the collector, the Dockerfile, the templates ---------


def check_compose(compose: dict, collector: dict) -> None:
    services = compose.get("services", {})
    for name in ("postgres", "redis", "mongo", "otel-collector", "migrate", "datagate"):
        assert name in services, f"compose: service {name} missing"
    for name, image in (("postgres", "postgres:16"), ("redis", "redis:7"), ("mongo", "mongo:7")):
        assert str(services[name].get("image", "")).startswith(image), f"compose: {name} is not {image}"
    for name, word in (("postgres", "pg_isready"), ("redis", "redis-cli"), ("mongo", "mongosh")):
        test = services[name].get("healthcheck", {}).get("test", [])
        assert word in " ".join(map(str, test)), f"compose: {name}'s healthcheck does not use {word}"
    app, migrate = services["datagate"], services["migrate"]
    for name, svc in (("datagate", app), ("migrate", migrate)):
        build = svc.get("build")
        context = build.get("context") if isinstance(build, dict) else build
        assert context == ".", f"compose: {name} is not built from the Dockerfile in ."
    test = app.get("healthcheck", {}).get("test", [])
    assert isinstance(test, list) and test[:1] == ["CMD"] and "healthcheck" in test, (
        f"compose: datagate's healthcheck {test!r} must be the exec form of `datagate healthcheck`"
    )
    assert migrate.get("command") == ["migrate", "up"], "compose: migrate does not run `migrate up`"
    conditions = {
        (owner, dep): (cond.get("condition") if isinstance(cond, dict) else None)
        for owner in ("datagate", "migrate")
        for dep, cond in (services[owner].get("depends_on") or {}).items()
    }
    for (owner, dep), want in (
        (("migrate", "postgres"), "service_healthy"),
        (("datagate", "migrate"), "service_completed_successfully"),
        (("datagate", "postgres"), "service_healthy"),
        (("datagate", "redis"), "service_healthy"),
        (("datagate", "mongo"), "service_healthy"),
    ):
        assert conditions.get((owner, dep)) == want, (
            f"compose: {owner} must depend on {dep} with condition {want}, has {conditions.get((owner, dep))}"
        )
    env = app.get("environment", {})
    mig_env = migrate.get("environment", {})
    assert "datagate_app" in env.get("DATAGATE__DATABASE__URL", ""), "compose: datagate must use the app role"
    assert "datagate_migrator" in mig_env.get("DATAGATE__DATABASE__URL", ""), (
        "compose: migrate must use the migration role"
    )
    assert "dev-only" in env.get("DATAGATE__PAGINATION__TOKEN_SECRET", ""), (
        "compose: the page token secret is not labelled dev-only"
    )
    assert len(env.get("DATAGATE__PAGINATION__TOKEN_SECRET", "")) >= 32, "compose: token secret under 32 bytes"
    assert "DATAGATE__AUTH__TOKENS" not in env, (
        "compose: DATAGATE__AUTH__TOKENS belongs in .env (an empty value is a configuration error)"
    )
    endpoint = env.get("DATAGATE__TELEMETRY__OTLP_ENDPOINT", "")
    host = re.sub(r"^https?://", "", endpoint).split(":")[0]
    assert host in services, f"compose: the OTLP endpoint {endpoint!r} is no compose service"
    grace = duration_seconds(str(app.get("stop_grace_period", "10s")))
    drain = duration_seconds(env.get("DATAGATE__SERVER__DRAIN_TIMEOUT", compiled_defaults()["server"]["drain_timeout"]))
    delay = duration_seconds(
        env.get("DATAGATE__SERVER__SHUTDOWN_READINESS_DELAY", compiled_defaults()["server"]["shutdown_readiness_delay"])
    )
    assert grace >= delay + drain + GRACE_MARGIN, (
        f"compose: stop_grace_period {grace}s < readiness delay {delay}s + drain {drain}s + margin {GRACE_MARGIN}s"
    )
    for mount in services["postgres"].get("volumes", []):
        source = str(mount).split(":")[0]
        if source.startswith("./"):
            assert (ROOT / source).exists(), f"compose: {source} does not exist"
    pipelines = collector["service"]["pipelines"]
    for pipeline in pipelines.values():
        for kind in ("receivers", "processors", "exporters"):
            for component in pipeline.get(kind, []):
                assert component in collector.get(kind, {}), (
                    f"otel-collector.yaml: pipeline uses undefined {kind[:-1]} {component}"
                )
    assert "traces" in pipelines, "otel-collector.yaml: no traces pipeline"


def dockerfile_stages(text: str) -> list[list[str]]:
    """Instructions (continuations joined, comments dropped) per stage."""
    lines, current = [], ""
    for raw in text.splitlines():
        if raw.lstrip().startswith("#") and not current:
            continue
        current += raw.rstrip("\\").strip() + " " if raw.endswith("\\") else raw.strip()
        if not raw.endswith("\\"):
            if current.strip():
                lines.append(current.strip())
            current = ""
    stages: list[list[str]] = []
    for line in lines:
        if line.upper().startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(line)
    return stages


def check_dockerfile(text: str) -> None:
    stages = dockerfile_stages(text)
    assert len(stages) >= 2, "the Dockerfile is not multi-stage"
    builder, runtime = "\n".join(stages[0]), stages[-1]
    assert "SQLX_OFFLINE=true" in builder, "the builder does not set SQLX_OFFLINE=true"
    assert "--mount=type=cache,target=/usr/local/cargo/registry" in builder, "no cargo registry cache mount"
    assert "--locked" in builder, "cargo build without --locked"
    final = "\n".join(runtime)
    assert "distroless" in runtime[0] or "nonroot" in runtime[0], f"runtime base {runtime[0]!r}"
    users = [line.split()[1] for line in runtime if line.upper().startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("0", "root"), f"runtime USER {users}"
    assert re.search(r"^EXPOSE .*\b50051\b", final, re.M) and re.search(r"^EXPOSE .*\b9090\b", final, re.M), (
        "the runtime does not EXPOSE 50051 and 9090"
    )
    assert 'ENTRYPOINT ["/usr/local/bin/datagate"]' in final, "ENTRYPOINT is not the exec form of the binary"
    assert 'CMD ["serve"]' in final, 'CMD is not ["serve"]'
    health = [line for line in runtime if line.upper().startswith("HEALTHCHECK")]
    assert health and re.search(r'CMD \["[^"]*datagate", "healthcheck"', health[0]), (
        "HEALTHCHECK is not the exec form of `datagate healthcheck`"
    )


def check_secret_template(doc: dict) -> None:
    assert doc["kind"] == "Secret", "not a Secret"
    data = doc.get("stringData", {})
    assert not doc.get("data"), "templates use stringData placeholders, not base64 data"
    for key, value in data.items():
        assert "CHANGE-ME" in value, f"{key} is not a CHANGE-ME placeholder"
        assert not re.search(r"\b[0-9a-f]{64}\b", value), f"{key} holds what looks like a real hash"


# --- the test cases -------------------------------------------------------------


class RenderedManifests(unittest.TestCase):
    def test_service_overlays(self) -> None:
        for env in ENVIRONMENTS:
            docs = render(f"k8s/overlays/{env}")
            for check in (
                check_probes,
                check_termination_grace,
                check_resources,
                check_security,
                check_metrics_annotations,
                check_network_policy,
                check_pdb,
                check_services,
                check_config_and_image,
                check_no_secrets,
            ):
                with self.subTest(env=env, check=check.__name__):
                    check(docs)
            with self.subTest(env=env, check="check_hpa"):
                check_hpa(docs, env)
            with self.subTest(env=env, check="check_environment"):
                check_environment(docs, env)
            with self.subTest(env=env, check="check_redis_mode"):
                check_redis_mode(docs, env)
            with self.subTest(env=env, check="check_tls"):
                check_tls(docs, env)

    def test_migration_overlays(self) -> None:
        for env in ENVIRONMENTS:
            job_docs = render(f"k8s/overlays/{env}/migrate")
            app_docs = render(f"k8s/overlays/{env}")
            for name, run in (
                ("check_migration_job", lambda: check_migration_job(job_docs, app_docs)),
                ("check_resources", lambda: check_resources(job_docs)),
                ("check_security", lambda: check_security(job_docs)),
                ("check_no_secrets", lambda: check_no_secrets(job_docs)),
                ("check_environment", lambda: check_environment(job_docs, env)),
            ):
                with self.subTest(env=env, check=name):
                    run()

    def test_secret_templates(self) -> None:
        templates = sorted(ROOT.glob("k8s/**/*secret.example.yaml"))
        self.assertGreaterEqual(len(templates), 3, "expected the base, prod and migration templates")
        for path in templates:
            with self.subTest(template=str(path.relative_to(ROOT))):
                check_secret_template(yaml.safe_load(path.read_text()))
        # No kustomization lists a template (the rendered output has no Secret).
        for kustomization in ROOT.glob("k8s/**/kustomization.yaml"):
            self.assertNotIn("secret.example.yaml", yaml.safe_dump(load_yaml(str(kustomization.relative_to(ROOT)))))
        prod = yaml.safe_load((ROOT / "k8s/overlays/prod/secret.example.yaml").read_text())
        self.assertIn("DATAGATE__DATABASE__READ_URL", prod["stringData"])
        for key in SECRET_KEYS:
            if key != "DATAGATE__DATABASE__READ_URL":
                self.assertIn(key, prod["stringData"])
        # Redis Cluster: seed nodes, comma-separated, over TLS, with the ACL
        # user's password beside them rather than in the URLs.
        seeds = prod["stringData"]["DATAGATE__REDIS__URL"].split(",")
        self.assertGreaterEqual(len(seeds), 2, "prod lists Redis Cluster seed nodes")
        self.assertTrue(all(s.startswith("rediss://") and "@" not in s for s in seeds), seeds)
        self.assertIn("DATAGATE__REDIS__PASSWORD", prod["stringData"])


class Compose(unittest.TestCase):
    def test_compose(self) -> None:
        check_compose(load_yaml("docker-compose.yml"), load_yaml("deploy/otel-collector.yaml"))

    def test_dockerfile(self) -> None:
        check_dockerfile((ROOT / "Dockerfile").read_text())


def _set(path: str, value) -> "callable":
    """A mutation setting a dotted path (list indexes as numbers) in the
    Deployment's pod template, or deleting it for value DELETE."""

    def mutate(docs: list[dict]) -> None:
        node = the(docs, "Deployment", "datagate")["spec"]["template"]
        keys = path.split(".")
        for key in keys[:-1]:
            node = node[int(key)] if key.isdigit() else node.setdefault(key, {})
        last = keys[-1]
        if value is DELETE:
            del node[int(last) if last.isdigit() else last]
        elif last.isdigit() and int(last) == len(node):
            node.append(value)
        else:
            node[int(last) if last.isdigit() else last] = value

    return mutate


DELETE = object()
C = "spec.containers.0"


def _container_port(name: str, port: int) -> "callable":
    """A mutation moving the app container's port `name` to `port`."""

    def mutate(docs: list[dict]) -> None:
        for p in app_container(docs)["ports"]:
            if p.get("name") == name:
                p["containerPort"] = port

    return mutate


def _on(kind: str, name: str, fn) -> "callable":
    def mutate(docs: list[dict]) -> None:
        fn(the(docs, kind, name))

    return mutate


def _config(key: str, value: str) -> "callable":
    def mutate(docs: list[dict]) -> None:
        for cm in find(docs, "ConfigMap"):
            cm.setdefault("data", {})[key] = value

    return mutate


def _netpol(fn) -> "callable":
    return _on("NetworkPolicy", "datagate", lambda d: fn(d["spec"]))


def _drop_egress_port(port: int, protocol: str = "TCP") -> "callable":
    def fn(spec: dict) -> None:
        for rule in spec["egress"]:
            rule["ports"] = [p for p in rule["ports"] if (p.get("protocol", "TCP"), p["port"]) != (protocol, port)]
        spec["egress"] = [r for r in spec["egress"] if r["ports"]]

    return _netpol(fn)


SERVICE_MUTATIONS = {
    check_probes: {
        "readiness missing": _set(f"{C}.readinessProbe", DELETE),
        "readiness over HTTP": _set(f"{C}.readinessProbe", {"httpGet": {"port": 9090, "path": "/"}}),
        "readiness on the metrics port": _set(f"{C}.readinessProbe.grpc.port", METRICS_PORT),
        "readiness asks for liveness": _set(f"{C}.readinessProbe.grpc.service", "liveness"),
        "liveness missing": _set(f"{C}.livenessProbe", DELETE),
        "liveness follows PostgreSQL": _set(f"{C}.livenessProbe.grpc.service", ""),
        "liveness grpc and tcp": _set(f"{C}.livenessProbe.tcpSocket", {"port": GRPC_PORT}),
        "startup on the wrong port": _set(f"{C}.startupProbe.grpc.port", 50053),
        "startup follows PostgreSQL": _set(f"{C}.startupProbe.grpc", {"port": 50052}),
        "no grpc container port": _container_port("grpc", 50053),
        "readiness on the TLS port": _set(f"{C}.readinessProbe.grpc.port", GRPC_PORT),
        "no health port with TLS": _config("DATAGATE__SERVER__HEALTH_PORT", "0"),
        "health container port moved": _container_port("health", 50053),
    },
    check_termination_grace: {
        "grace too short": _set("spec.terminationGracePeriodSeconds", 30),
        "grace unset (30s default)": lambda docs: (
            _set("spec.terminationGracePeriodSeconds", DELETE)(docs),
            _config("DATAGATE__SERVER__DRAIN_TIMEOUT", "25s")(docs),
        ),
        "longer drain in the ConfigMap": _config("DATAGATE__SERVER__DRAIN_TIMEOUT", "1m"),
        "drain set in env": _set(f"{C}.env", [{"name": "DATAGATE__SERVER__DRAIN_TIMEOUT", "value": "40s"}]),
        "preStop sleep not counted": _set(f"{C}.lifecycle", {"preStop": {"sleep": {"seconds": 15}}}),
        "preStop with a shell": _set(f"{C}.lifecycle", {"preStop": {"exec": {"command": ["sh", "-c", "sleep 5"]}}}),
        "no readiness delay": _config("DATAGATE__SERVER__SHUTDOWN_READINESS_DELAY", "0s"),
    },
    check_resources: {
        "no memory limit": _set(f"{C}.resources.limits.memory", DELETE),
        "no cpu request": _set(f"{C}.resources.requests.cpu", DELETE),
        "no resources": _set(f"{C}.resources", DELETE),
        "a sidecar without resources": _set("spec.containers.1", {"name": "sidecar", "image": "busybox"}),
    },
    check_security: {
        "pod may run as root": _set("spec.securityContext.runAsNonRoot", False),
        "no seccomp": _set("spec.securityContext.seccompProfile", DELETE),
        "token mounted": _set("spec.automountServiceAccountToken", True),
        "runs as root": lambda docs: (
            _set("spec.securityContext.runAsUser", 0)(docs),
            _set(f"{C}.securityContext.runAsUser", 0)(docs),
        ),
        "container runAsNonRoot false": _set(f"{C}.securityContext.runAsNonRoot", False),
        "writable root": _set(f"{C}.securityContext.readOnlyRootFilesystem", False),
        "escalation": _set(f"{C}.securityContext.allowPrivilegeEscalation", True),
        "capabilities kept": _set(f"{C}.securityContext.capabilities", {"drop": ["NET_RAW"]}),
        "privileged": _set(f"{C}.securityContext.privileged", True),
    },
    check_metrics_annotations: {
        "no scrape annotation": _on(
            "Deployment", "datagate", lambda d: d["spec"]["template"]["metadata"]["annotations"].pop("prometheus.io/scrape")
        ),
        "wrong port": _set("metadata.annotations", {"prometheus.io/scrape": "true", "prometheus.io/port": "8080", "prometheus.io/path": "/metrics"}),
        "wrong path": _set("metadata.annotations", {"prometheus.io/scrape": "true", "prometheus.io/port": "9090", "prometheus.io/path": "/"}),
        "scrape off": _set("metadata.annotations", {"prometheus.io/scrape": "false", "prometheus.io/port": "9090", "prometheus.io/path": "/metrics"}),
        "metrics port moved": _container_port("metrics", 9091),
    },
    check_network_policy: {
        "ingress only": _netpol(lambda s: s.update(policyTypes=["Ingress"])),
        "selects nothing": _netpol(lambda s: s.update(podSelector={"matchLabels": {"app": "other"}})),
        "open ingress rule": _netpol(lambda s: s["ingress"].append({"ports": [{"port": 1234}]})),
        "no client rule": _netpol(lambda s: s.update(ingress=[r for r in s["ingress"] if ("TCP", GRPC_PORT) not in _ports(r)])),
        "clients without label": _netpol(lambda s: s["ingress"][0]["from"][0].update(podSelector={})),
        "no scrape rule": _netpol(lambda s: s.update(ingress=[r for r in s["ingress"] if ("TCP", METRICS_PORT) not in _ports(r)])),
        "open egress rule": _netpol(lambda s: s["egress"].append({"ports": [{"port": 443}]})),
        "egress without ports": _netpol(lambda s: s["egress"].append({"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]})),
        "no DNS over UDP": _drop_egress_port(53, "UDP"),
        "no DNS over TCP": _drop_egress_port(53, "TCP"),
        "no PostgreSQL": _drop_egress_port(5432),
        "no Redis": _drop_egress_port(6379),
        "no MongoDB": _drop_egress_port(27017),
        "no OTLP": _drop_egress_port(4317),
    },
    check_pdb: {
        "old API": _on("PodDisruptionBudget", "datagate", lambda d: d.update(apiVersion="policy/v1beta1")),
        "selector mismatch": _on(
            "PodDisruptionBudget", "datagate",
            lambda d: d["spec"]["selector"]["matchLabels"].update({"app.kubernetes.io/component": "worker"}),
        ),
        "both bounds": _on("PodDisruptionBudget", "datagate", lambda d: d["spec"].update(minAvailable=1, maxUnavailable=1)),
        "blocks drains": _on(
            "PodDisruptionBudget", "datagate",
            lambda d: (d["spec"].pop("minAvailable", None), d["spec"].update(maxUnavailable=0)),
        ),
    },
    check_services: {
        "headless has an IP": _on("Service", "datagate-headless", lambda d: d["spec"].pop("clusterIP")),
        "regular is headless": _on("Service", "datagate", lambda d: d["spec"].update(clusterIP="None")),
        "selector mismatch": _on("Service", "datagate", lambda d: d["spec"]["selector"].update(app="x")),
        "no appProtocol": _on("Service", "datagate-headless", lambda d: d["spec"]["ports"][0].pop("appProtocol")),
        "grpc port moved": _on("Service", "datagate", lambda d: d["spec"]["ports"][0].update(port=80)),
        "no metrics port": _on("Service", "datagate", lambda d: d["spec"].update(ports=d["spec"]["ports"][:1])),
        "health port in the Service": _on(
            "Service", "datagate",
            lambda d: d["spec"]["ports"].append({"name": "health", "port": 50052, "targetPort": "health"}),
        ),
        "health port in the headless Service": _on(
            "Service", "datagate-headless", lambda d: d["spec"]["ports"].append({"name": "probes", "port": 50052})
        ),
    },
    check_config_and_image: {
        "ConfigMap not rendered": _set(f"{C}.envFrom.0.configMapRef.name", "missing"),
        "no Secret": _on(
            "Deployment", "datagate",
            lambda d: d["spec"]["template"]["spec"]["containers"][0].update(
                envFrom=[r for r in d["spec"]["template"]["spec"]["containers"][0]["envFrom"] if "secretRef" not in r]
            ),
        ),
        "another Secret": _on(
            "Deployment", "datagate",
            lambda d: d["spec"]["template"]["spec"]["containers"][0]["envFrom"].append({"secretRef": {"name": "datagate-migrations"}}),
        ),
        "pretty logs": _config("DATAGATE__TELEMETRY__LOG_FORMAT", "pretty"),
        "no OTLP": _config("DATAGATE__TELEMETRY__OTLP_ENDPOINT", ""),
        "untagged image": _set(f"{C}.image", "registry.example.com/datagate"),
        "latest": _set(f"{C}.image", "registry.example.com/datagate:latest"),
    },
    check_no_secrets: {
        "a Secret": lambda docs: docs.append({"kind": "Secret", "metadata": {"name": "datagate"}, "stringData": {}}),
        "secret key in ConfigMap": _config("DATAGATE__DATABASE__URL", "postgres://h/db"),
        "password in ConfigMap": _config("DATAGATE__TELEMETRY__OTLP_ENDPOINT", "http://u:p4ss@collector:4317"),
        "hash in ConfigMap": _config("DATAGATE__X", "a" * 64),
    },
}


def _job(fn) -> "callable":
    return _on("Job", "datagate-migrate", fn)


def _migrate_container(fn) -> "callable":
    return _job(lambda j: fn(j["spec"]["template"]["spec"]["initContainers"][0]))


JOB_MUTATIONS = {
    "no backoffLimit": _job(lambda j: j["spec"].pop("backoffLimit")),
    "no ttl": _job(lambda j: j["spec"].pop("ttlSecondsAfterFinished")),
    "no deadline": _job(lambda j: j["spec"].pop("activeDeadlineSeconds")),
    "restarts always": _job(lambda j: j["spec"]["template"]["spec"].update(restartPolicy="Always")),
    "migrate down": _migrate_container(lambda c: c.update(args=["migrate", "down"])),
    "own entrypoint": _migrate_container(lambda c: c.update(command=["/bin/sh"])),
    "another image": _migrate_container(lambda c: c.update(image="registry.example.com/datagate:old")),
    "app secret": _migrate_container(lambda c: c.update(envFrom=[{"secretRef": {"name": "datagate"}}])),
    "pods look like the service's": _job(
        lambda j: j["spec"]["template"]["metadata"]["labels"].update({"app.kubernetes.io/component": "server"})
    ),
    "no grants step": _job(lambda j: j["spec"]["template"]["spec"].update(containers=[])),
    "grants without the script": _job(
        lambda j: j["spec"]["template"]["spec"]["containers"][0].update(volumeMounts=[])
    ),
    "migrate beside grants": _job(
        lambda j: (
            j["spec"]["template"]["spec"]["containers"].append(j["spec"]["template"]["spec"]["initContainers"][0]),
            j["spec"]["template"]["spec"].update(initContainers=[]),
        )
    ),
}


def _svc(name: str, fn) -> "callable":
    return lambda c: fn(c["services"][name])


COMPOSE_MUTATIONS = {
    "no mongo": lambda c: c["services"].pop("mongo"),
    "mongo is not MongoDB": _svc("mongo", lambda s: s.update(image="ferretdb/ferretdb:2")),
    "postgres 15": _svc("postgres", lambda s: s.update(image="postgres:15")),
    "redis without healthcheck": _svc("redis", lambda s: s.pop("healthcheck")),
    "datagate shell healthcheck": _svc(
        "datagate", lambda s: s["healthcheck"].update(test=["CMD-SHELL", "datagate healthcheck"])
    ),
    "datagate pulled, not built": _svc("datagate", lambda s: s.pop("build")),
    "migrate runs serve": _svc("migrate", lambda s: s.update(command=["serve"])),
    "migrate before postgres is healthy": _svc(
        "migrate", lambda s: s["depends_on"]["postgres"].update(condition="service_started")
    ),
    "datagate before migrations": _svc("datagate", lambda s: s["depends_on"].pop("migrate")),
    "datagate before redis is healthy": _svc(
        "datagate", lambda s: s["depends_on"].update(redis={"condition": "service_started"})
    ),
    "datagate as the migrator": _svc(
        "datagate",
        lambda s: s["environment"].update(DATAGATE__DATABASE__URL="postgres://datagate_migrator:x@postgres/datagate"),
    ),
    "migrate as the app": _svc(
        "migrate", lambda s: s["environment"].update(DATAGATE__DATABASE__URL="postgres://datagate_app:x@postgres/datagate")
    ),
    "unlabelled secret": _svc(
        "datagate", lambda s: s["environment"].update(DATAGATE__PAGINATION__TOKEN_SECRET="x" * 40)
    ),
    "short secret": _svc(
        "datagate", lambda s: s["environment"].update(DATAGATE__PAGINATION__TOKEN_SECRET="dev-only")
    ),
    "empty tokens": _svc("datagate", lambda s: s["environment"].update(DATAGATE__AUTH__TOKENS="")),
    "OTLP to nowhere": _svc(
        "datagate", lambda s: s["environment"].update(DATAGATE__TELEMETRY__OTLP_ENDPOINT="http://collector:4317")
    ),
    "killed mid-drain": _svc("datagate", lambda s: s.update(stop_grace_period="25s")),
    "init scripts missing": _svc(
        "postgres", lambda s: s.update(volumes=["./deploy/missing:/docker-entrypoint-initdb.d:ro"])
    ),
}

COLLECTOR_MUTATIONS = {
    "undefined exporter": lambda c: c["exporters"].pop("debug"),
    "no traces pipeline": lambda c: c["service"].update(pipelines={"metrics": {"receivers": ["otlp"], "exporters": ["debug"]}}),
}

DOCKERFILE_MUTATIONS = {
    "single stage": lambda t: re.sub(r"\nFROM gcr\.io.*", "", t, flags=re.S),
    "no SQLX_OFFLINE": lambda t: t.replace("SQLX_OFFLINE=true", "SQLX_OFFLINE=false"),
    "no cache mount": lambda t: t.replace("--mount=type=cache,target=/usr/local/cargo/registry", "--mount=type=tmpfs,target=/usr/local/cargo/registry"),
    "unlocked": lambda t: t.replace("--locked", ""),
    "full OS runtime": lambda t: t.replace("gcr.io/distroless/cc-debian12:nonroot", "debian:bookworm-slim"),
    "root": lambda t: t.replace("USER 65532:65532", "USER root"),
    "no metrics port": lambda t: t.replace("EXPOSE 50051 9090", "EXPOSE 50051"),
    "shell entrypoint": lambda t: t.replace('ENTRYPOINT ["/usr/local/bin/datagate"]', "ENTRYPOINT /usr/local/bin/datagate"),
    "no serve": lambda t: t.replace('CMD ["serve"]', 'CMD ["--help"]'),
    "shell healthcheck": lambda t: t.replace('CMD ["/usr/local/bin/datagate", "healthcheck"]', "CMD datagate healthcheck || exit 1"),
}

TEMPLATE_MUTATIONS = {
    "a real-looking value": lambda d: d["stringData"].update(DATAGATE__PAGINATION__TOKEN_SECRET="s3cr3t-value-of-forty-bytes-or-so-123456"),
    "a real hash": lambda d: d["stringData"].update(DATAGATE__AUTH__TOKENS="svc:admin:" + "ab" * 32 + " CHANGE-ME"),
    "base64 data": lambda d: d.update(data={"X": "eA=="}),
}


class ChecksCanFail(unittest.TestCase):
    """Every check fails on output broken the way it guards against."""

    def assert_fails(self, check, broken, label: str) -> None:
        with self.subTest(check=check.__name__, mutation=label):
            with self.assertRaises(AssertionError, msg=label):
                check(broken)

    def test_service_checks_fail(self) -> None:
        clean = render("k8s/overlays/prod")
        for check, mutations in SERVICE_MUTATIONS.items():
            check(copy.deepcopy(clean))  # passes unbroken
            for label, mutate in mutations.items():
                broken = copy.deepcopy(clean)
                mutate(broken)
                self.assert_fails(check, broken, label)

    def test_hpa_and_environment_checks_fail(self) -> None:
        clean = render("k8s/overlays/dev")
        hpa = lambda fn: _on("HorizontalPodAutoscaler", "datagate", fn)  # noqa: E731
        for label, mutate in {
            "v1 API": hpa(lambda d: d.update(apiVersion="autoscaling/v1")),
            "targets something else": hpa(lambda d: d["spec"]["scaleTargetRef"].update(name="other")),
            "no cpu target": hpa(lambda d: d["spec"].update(metrics=[])),
            "no stabilization": hpa(lambda d: d["spec"]["behavior"]["scaleDown"].update(stabilizationWindowSeconds=0)),
            "prod bounds in dev": hpa(lambda d: d["spec"].update(minReplicas=3, maxReplicas=12)),
            "replicas fight the HPA": _on("Deployment", "datagate", lambda d: d["spec"].update(replicas=1)),
        }.items():
            broken = copy.deepcopy(clean)
            mutate(broken)
            self.assert_fails(lambda docs: check_hpa(docs, "dev"), broken, label)
        broken = copy.deepcopy(clean)
        broken[0]["metadata"]["namespace"] = "default"
        self.assert_fails(lambda docs: check_environment(docs, "dev"), broken, "wrong namespace")
        prod = render("k8s/overlays/prod")
        check_redis_mode(copy.deepcopy(prod), "prod")
        broken = copy.deepcopy(prod)
        _config("DATAGATE__REDIS__MODE", "single")(broken)
        self.assert_fails(lambda docs: check_redis_mode(docs, "prod"), broken, "prod on a single Redis")

    def test_tls_checks_fail(self) -> None:
        prod = render("k8s/overlays/prod")
        check_tls(copy.deepcopy(prod), "prod")
        mount = lambda fn: lambda docs: [fn(m) for m in app_container(docs)["volumeMounts"] if m["name"] == "tls"]  # noqa: E731
        for label, mutate in {
            "TLS off": _config("DATAGATE__SERVER__TLS__ENABLED", "false"),
            "mTLS optional": _config("DATAGATE__SERVER__TLS__CLIENT_AUTH", "optional"),
            "no client CA": _config("DATAGATE__SERVER__TLS__CLIENT_CA_FILE", ""),
            "key outside the mount": _config("DATAGATE__SERVER__TLS__KEY_FILE", "/tmp/tls.key"),
            "writable mount": mount(lambda m: m.update(readOnly=False)),
            "subPath mount": mount(lambda m: m.update(subPath="tls.crt")),
            "not a Secret": _on(
                "Deployment", "datagate",
                lambda d: d["spec"]["template"]["spec"].update(
                    volumes=[v if v["name"] != "tls" else {"name": "tls", "emptyDir": {}}
                             for v in d["spec"]["template"]["spec"]["volumes"]]
                ),
            ),
        }.items():
            broken = copy.deepcopy(prod)
            mutate(broken)
            self.assert_fails(lambda docs: check_tls(docs, "prod"), broken, label)
        dev = render("k8s/overlays/dev")
        check_tls(copy.deepcopy(dev), "dev")
        for label, mutate in {
            "TLS off in dev": _config("DATAGATE__SERVER__TLS__ENABLED", "false"),
            "mTLS in dev": _config("DATAGATE__SERVER__TLS__CLIENT_AUTH", "required"),
        }.items():
            broken = copy.deepcopy(dev)
            mutate(broken)
            self.assert_fails(lambda docs: check_tls(docs, "dev"), broken, label)

    def test_job_checks_fail(self) -> None:
        job_docs, app_docs = render("k8s/overlays/prod/migrate"), render("k8s/overlays/prod")
        check_migration_job(copy.deepcopy(job_docs), app_docs)
        for label, mutate in JOB_MUTATIONS.items():
            broken = copy.deepcopy(job_docs)
            mutate(broken)
            self.assert_fails(lambda docs: check_migration_job(docs, app_docs), broken, label)

    def test_compose_checks_fail(self) -> None:
        compose, collector = load_yaml("docker-compose.yml"), load_yaml("deploy/otel-collector.yaml")
        check_compose(copy.deepcopy(compose), copy.deepcopy(collector))
        for label, mutate in COMPOSE_MUTATIONS.items():
            broken = copy.deepcopy(compose)
            mutate(broken)
            self.assert_fails(lambda c: check_compose(c, collector), broken, label)
        for label, mutate in COLLECTOR_MUTATIONS.items():
            broken = copy.deepcopy(collector)
            mutate(broken)
            self.assert_fails(lambda c: check_compose(compose, c), broken, label)

    def test_dockerfile_checks_fail(self) -> None:
        text = (ROOT / "Dockerfile").read_text()
        check_dockerfile(text)
        for label, mutate in DOCKERFILE_MUTATIONS.items():
            broken = mutate(text)
            self.assertNotEqual(broken, text, f"mutation {label!r} changed nothing")
            self.assert_fails(check_dockerfile, broken, label)

    def test_template_checks_fail(self) -> None:
        template = yaml.safe_load((ROOT / "k8s/base/secret.example.yaml").read_text())
        for label, mutate in TEMPLATE_MUTATIONS.items():
            broken = copy.deepcopy(template)
            mutate(broken)
            self.assert_fails(check_secret_template, broken, label)


if __name__ == "__main__":
    unittest.main(verbosity=2 if "-v" in sys.argv else 1)
