"""deploy/: the image, the compose stack and the Kubernetes manifests agree with the code.

Docker, Compose and a cluster are not available where the suite runs, so these tests
check what can be checked without them: every file parses; ports, paths and setting
names match ``stethoscope.config``; the settings files load through ``load_config``
(so a bad value fails here, not at start); the Grafana datasource and Alertmanager
point at services the stack defines; Alertmanager accepts its configuration
(``amtool check-config``) and, run for real, delivers to the webhook sink; Kubernetes
objects are structurally sound for the kinds used; RBAC is exactly the minimum; and
``kubectl kustomize`` builds the kustomization when kubectl is installed.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
import tomllib
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from stethoscope.agents.prometheus import DEFAULT_PORT as AGENT_METRICS_PORT

from stethoscope.config import AlertsConfig, CollectorConfig, SqlConfig, describe, load_config

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE_DIR = DEPLOY / "compose"
K8S = DEPLOY / "kubernetes"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"

OTLP_PORT = CollectorConfig().otlp_http_port
SQL_PORT = SqlConfig().port
ALERTMANAGER_PORT = 9093  # Alertmanager's default --web.listen-address
CLICKHOUSE_HTTP_PORT = 8123  # ClickHouse server's default http_port
KNOWN_ENV = {env for _, env, _, _ in describe()}
# Variables the code reads by a configurable name: the webhook secret's default name.
INDIRECT_ENV = {AlertsConfig().webhook_secret_env}


def load_yaml(path: Path) -> list[Any]:
    with open(path) as fh:
        return [d for d in yaml.safe_load_all(fh) if d is not None]


def stethoscope_env_names(env: dict[str, Any] | list[Any]) -> set[str]:
    names = env.keys() if isinstance(env, dict) else [e["name"] for e in env]
    return {n for n in names if n.startswith("STETHOSCOPE_")}


# -- every YAML file -------------------------------------------------------------------------


def all_yaml() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


def test_every_yaml_file_parses() -> None:
    files = all_yaml()
    assert len(files) >= 9, files
    for path in files:
        docs = load_yaml(path)
        assert docs, f"{path} holds no YAML document"
        assert all(isinstance(d, dict) for d in docs), path


# -- Dockerfile ------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def readme_main_extra() -> str:
    readme = (ROOT / "README.md").read_text()
    main = re.search(r"```sh\n(python3 -m venv[^\n]+)\n```", readme)
    assert main, "README has no main command"
    (extra,) = re.findall(r"\.\[(\w+)\]", main.group(1))
    return extra


def test_dockerfile_installs_the_readme_extra_as_non_root() -> None:
    ins = dockerfile_instructions()
    froms = [a for i, a in ins if i == "FROM"]
    assert froms[-1] == "python:3.11-slim" and all(f.startswith("python:3.11-slim") for f in froms)
    final = ins[max(k for k, (i, _) in enumerate(ins) if i == "FROM"):]
    installs = [a for i, a in final if i == "RUN" and "pip install" in a]
    assert len(installs) == 1
    assert f"[{readme_main_extra()}]" in installs[0]
    (user,) = [a for i, a in final if i == "USER"]
    assert user.split(":")[0] not in ("0", "root")
    entry = json.loads(next(a for i, a in final if i == "ENTRYPOINT"))
    assert entry == ["stethoscope"]
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "stethoscope" in pyproject["project"]["scripts"]
    assert json.loads(next(a for i, a in final if i == "CMD")) == ["up"]


def test_dockerfile_ports_env_and_healthcheck_match_the_code() -> None:
    ins = dockerfile_instructions()
    exposed = {int(p) for i, a in ins if i == "EXPOSE" for p in a.split()}
    assert exposed == {OTLP_PORT, SQL_PORT, AGENT_METRICS_PORT}
    env_names = {m for i, a in ins if i == "ENV" for m in re.findall(r"(\w+)=", a)}
    assert stethoscope_env_names(dict.fromkeys(env_names)) <= KNOWN_ENV
    # The ENV lines bind the listeners everywhere: load_config accepts the values.
    env = {k: v for i, a in ins if i == "ENV" for k, v in re.findall(r"(\w+)=(\S+)", a)}
    cfg = load_config(environ={k: v for k, v in env.items() if k in KNOWN_ENV})
    assert cfg.collector.host == cfg.sql.host == "0.0.0.0"
    (health,) = [a for i, a in ins if i == "HEALTHCHECK"]
    assert f"http://127.0.0.1:{SQL_PORT}/healthz" in health


def test_build_context_holds_what_the_wheel_needs() -> None:
    """The .dockerignore is an allowlist: everything out, then the package folders back in."""
    lines = [ln.strip() for ln in (DEPLOY / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*"
    included = {ln[1:] for ln in lines if ln.startswith("!")}
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    folders = {d.split("/")[0] for d in pyproject["tool"]["setuptools"]["package-dir"].values()}
    sources = {s.split("/")[0] for ext in pyproject["tool"]["setuptools"]["ext-modules"] for s in ext["sources"]}
    assert included == folders | sources | {"pyproject.toml", pyproject["project"]["readme"]}
    assert all((ROOT / name).exists() for name in included)


# -- compose ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    (doc,) = load_yaml(COMPOSE_DIR / "docker-compose.yaml")
    return doc


def mounts(service: dict[str, Any]) -> dict[str, Path | str]:
    """container path -> host path (resolved against the compose folder) or volume name."""
    out = {}
    for v in service.get("volumes", []):
        src, dst = v.split(":")[:2]
        out[dst] = (COMPOSE_DIR / src).resolve() if src.startswith(".") else src
    return out


def container_ports(service: dict[str, Any]) -> set[int]:
    return {int(str(p).rsplit(":", 1)[-1]) for p in service.get("ports", [])}


def compose_toml(compose: dict[str, Any]) -> tuple[Path, list[str]]:
    svc = compose["services"]["stethoscope"]
    cmd = svc["command"]
    target = cmd[cmd.index("--config") + 1]
    host_path = mounts(svc)[target]
    assert isinstance(host_path, Path) and host_path.is_file()
    return host_path, cmd


def test_compose_services_and_images(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"clickhouse", "stethoscope", "agent", "grafana", "alertmanager", "webhook-sink"}
    assert services["clickhouse"]["image"].startswith("clickhouse/clickhouse-server:")
    assert services["grafana"]["image"].startswith("grafana/grafana:")
    assert services["alertmanager"]["image"].startswith("prom/alertmanager:")
    assert "grafana-clickhouse-datasource" in services["grafana"]["environment"]["GF_INSTALL_PLUGINS"].split(",")
    for name, svc in services.items():
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown service {dep}"
        if "build" in svc:
            context = (COMPOSE_DIR / svc["build"]["context"]).resolve()
            assert context == ROOT and (context / svc["build"]["dockerfile"]).resolve() == DOCKERFILE
        for dst, src in mounts(svc).items():
            if isinstance(src, Path):
                assert src.exists(), f"{name}: {src} (mounted at {dst}) does not exist"
            else:
                assert src in compose["volumes"], f"{name}: volume {src} is not declared"


def test_compose_collector_config_loads_and_matches_defaults(compose: dict[str, Any]) -> None:
    services = compose["services"]
    path, cmd = compose_toml(compose)
    assert cmd[0] == "up"
    svc = services["stethoscope"]
    env = {k: str(v) for k, v in svc.get("environment", {}).items()}
    assert set(env) - KNOWN_ENV <= INDIRECT_ENV
    cfg = load_config(path, environ={k: v for k, v in env.items() if k in KNOWN_ENV})
    assert (cfg.collector.otlp_http_port, cfg.sql.port) == (OTLP_PORT, SQL_PORT)
    assert container_ports(svc) == {OTLP_PORT, SQL_PORT}
    assert cfg.collector.host == cfg.sql.host == "0.0.0.0"
    assert cfg.analytics.enabled and cfg.alerts.enabled
    assert f"http://127.0.0.1:{SQL_PORT}/healthz" in " ".join(svc["healthcheck"]["test"])
    # up starts with this configuration: listeners on 0.0.0.0 are allowed open explicitly,
    # and only the host's loopback publishes them.
    from stethoscope.exporters.auth import listener_security

    assert cfg.auth.allow_unauthenticated and listener_security(cfg) == (None, None)
    assert all(str(p).startswith("127.0.0.1:") for s in services.values() for p in s.get("ports", []))

    # The store is the clickhouse service, with the user, password and database it creates.
    ch = urlsplit(cfg.store.clickhouse_url)
    ch_env = services["clickhouse"]["environment"]
    assert ch.hostname == "clickhouse" and ch.port == CLICKHOUSE_HTTP_PORT
    assert (ch.username, ch.password) == (ch_env["CLICKHOUSE_USER"], ch_env["CLICKHOUSE_PASSWORD"])
    assert cfg.store.database == ch_env["CLICKHOUSE_DB"]
    assert f"{CLICKHOUSE_HTTP_PORT}/ping" in " ".join(services["clickhouse"]["healthcheck"]["test"])

    # Notifications go to services of the stack; the signing secret is set where it is read.
    am = urlsplit(cfg.alerts.alertmanager_url)
    assert am.hostname in services and am.port == ALERTMANAGER_PORT
    hook = urlsplit(cfg.alerts.webhook_url)
    sink = services[hook.hostname]
    assert hook.port == int(sink["entrypoint"][sink["entrypoint"].index("--port") + 1])
    assert cfg.alerts.webhook_secret_env in env
    assert cfg.alerts.webhook_secret_env in sink["environment"]
    assert container_ports(services["alertmanager"]) == {ALERTMANAGER_PORT}


def test_compose_agent_simulates_gpus_and_sends_to_the_collector(compose: dict[str, Any]) -> None:
    agent = compose["services"]["agent"]
    assert agent["command"] == ["agent"]
    env = {k: str(v) for k, v in agent["environment"].items()}
    assert stethoscope_env_names(env) <= KNOWN_ENV
    cfg = load_config(environ={k: v for k, v in env.items() if k in KNOWN_ENV})
    assert cfg.agent.simulate_gpus > 0 and "gpu" in cfg.agent.collectors
    endpoint = urlsplit(cfg.agent.endpoint)
    assert endpoint.hostname == "stethoscope" and endpoint.port == OTLP_PORT
    assert cfg.agent.prometheus_port == AGENT_METRICS_PORT and cfg.agent.prometheus_host == "0.0.0.0"
    assert f"127.0.0.1:{AGENT_METRICS_PORT}/metrics" in " ".join(agent["healthcheck"]["test"])
    spool_mount = next(dst for dst in mounts(agent) if cfg.agent.spool_dir.startswith(dst))
    assert mounts(agent)[spool_mount] in compose["volumes"]


def test_grafana_provisioning_points_at_the_sql_service(compose: dict[str, Any]) -> None:
    services = compose["services"]
    m = mounts(services["grafana"])
    ds_dir = m["/etc/grafana/provisioning/datasources"]
    (ds_file,) = sorted(Path(ds_dir).glob("*.yaml"))
    (ds,) = load_yaml(ds_file)[0]["datasources"]
    assert ds["type"] == "grafana-clickhouse-datasource"
    host, port = ds["jsonData"]["host"], int(ds["jsonData"]["port"])
    assert ds["jsonData"]["protocol"] == "http"
    # The host is the compose service serving the ClickHouse HTTP interface on that port.
    assert host in services and port in container_ports(services[host]) | {SQL_PORT}
    path, _ = compose_toml(compose)
    cfg = load_config(path, environ={})
    assert host == "stethoscope" and port == cfg.sql.port
    assert ds["jsonData"]["defaultDatabase"] == cfg.store.database

    (prov_file,) = sorted(Path(m["/etc/grafana/provisioning/dashboards"]).glob("*.yaml"))
    (provider,) = load_yaml(prov_file)[0]["providers"]
    json_dir = m[provider["options"]["path"]]
    assert isinstance(json_dir, Path) and len(list(json_dir.glob("*.json"))) >= 6


# -- Alertmanager and the webhook sink -------------------------------------------------------

AM_CONFIG = COMPOSE_DIR / "alertmanager" / "alertmanager.yml"
SINK = COMPOSE_DIR / "webhook-sink" / "sink.py"
AMTOOL = shutil.which("amtool")
ALERTMANAGER = Path("/usr/bin/prometheus-alertmanager")


def test_alertmanager_config_routes_to_a_compose_service(compose: dict[str, Any]) -> None:
    (cfg,) = load_yaml(AM_CONFIG)
    receivers = {r["name"]: r for r in cfg["receivers"]}
    assert cfg["route"]["receiver"] in receivers
    mount = mounts(compose["services"]["alertmanager"])
    assert mount["/etc/alertmanager/alertmanager.yml"] == AM_CONFIG.resolve()
    assert "--config.file=/etc/alertmanager/alertmanager.yml" in compose["services"]["alertmanager"]["command"]
    (hook,) = receivers[cfg["route"]["receiver"]]["webhook_configs"]
    url = urlsplit(hook["url"])
    sink = compose["services"][url.hostname]
    assert url.port == int(sink["entrypoint"][sink["entrypoint"].index("--port") + 1])


@pytest.mark.skipif(AMTOOL is None, reason="amtool is not installed (apt-get install prometheus-alertmanager)")
def test_amtool_accepts_the_alertmanager_config() -> None:
    out = subprocess.run([AMTOOL, "check-config", str(AM_CONFIG)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


class Sink:
    """deploy/compose/webhook-sink/sink.py as a subprocess on a free loopback port."""

    def __init__(self, tmp_path: Path, secret: str) -> None:
        from tests.conftest import free_port

        self.port = free_port()
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        self.proc = subprocess.Popen(
            [sys.executable, str(SINK), "--host", "127.0.0.1", "--port", str(self.port)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            env={**os.environ, "STETHOSCOPE_WEBHOOK_SECRET": secret}, cwd=tmp_path,
        )
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + 15
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=1):
                    break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(json.loads(line))

    def next(self, timeout: float = 15.0) -> dict[str, Any]:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"the webhook sink printed nothing within {timeout}s")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def sink(tmp_path):
    s = Sink(tmp_path, secret="s3cret")
    yield s
    s.stop()


def test_webhook_sink_prints_and_checks_signatures(sink: Sink) -> None:
    from stethoscope.alerts.notifiers import WebhookNotifier
    from stethoscope.alerts.signing import sign_headers
    from stethoscope.alerts.state import Notification

    n = Notification(status="firing", reason="new", fingerprint="f1", group_key="g", rule="GpuXidCritical",
                     severity="critical", labels={"node": "n1"}, annotations={"summary": "XID 79"},
                     subject="gpu=GPU-1", starts_at=time.time(), ends_at=None)
    assert WebhookNotifier(f"{sink.url}/stethoscope", "s3cret", timeout=5).send(n).ok
    line = sink.next()
    assert line["path"] == "/stethoscope" and line["signature"] == "valid"
    assert line["payload"]["labels"]["node"] == "n1"

    body = b'{"status":"firing"}'
    headers = sign_headers("s3cret", body, time.time())
    req = urllib.request.Request(f"{sink.url}/stethoscope", data=body + b" ", headers=headers, method="POST")
    with urllib.request.urlopen(req, timeout=5) as r:
        assert r.status == 200
    assert sink.next()["signature"].startswith("invalid")

    req = urllib.request.Request(f"{sink.url}/other", data=b"not json", method="POST")
    with urllib.request.urlopen(req, timeout=5):
        pass
    assert sink.next() == {"path": "/other", "signature": "absent", "payload": "not json"}


@pytest.fixture
def alertmanager(tmp_path, sink: Sink):
    """A real Alertmanager with the compose configuration: the sink's address made local, group_wait 0s."""
    if not ALERTMANAGER.exists():
        pytest.skip("prometheus-alertmanager is not installed (apt-get install prometheus-alertmanager)")
    from tests.conftest import free_port

    (cfg,) = load_yaml(AM_CONFIG)
    (hook,) = cfg["receivers"][0]["webhook_configs"]
    hook["url"] = sink.url + urlsplit(hook["url"]).path
    cfg["route"]["group_wait"] = "0s"
    (tmp_path / "am").mkdir()
    (tmp_path / "am" / "alertmanager.yml").write_text(yaml.safe_dump(cfg))
    port = free_port()
    log_path = tmp_path / "alertmanager.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [str(ALERTMANAGER), f"--config.file={tmp_path / 'am' / 'alertmanager.yml'}",
             f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address=",
             f"--storage.path={tmp_path / 'am'}"],
            stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, env={**os.environ, "HOME": str(tmp_path)},
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                with urllib.request.urlopen(base + "/-/ready", timeout=1):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("alertmanager did not start:\n" + log_path.read_text()[-2000:])
                time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.mark.e2e
def test_real_alertmanager_with_the_compose_config_delivers_to_the_sink(alertmanager: str, sink: Sink) -> None:
    alert = [{"labels": {"alertname": "FeatureDrift", "model": "fraud", "severity": "warning"},
              "annotations": {"summary": "amount drifted"}}]
    req = urllib.request.Request(alertmanager + "/api/v2/alerts", data=json.dumps(alert).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=5) as r:
        assert r.status == 200
    line = sink.next(timeout=20)
    assert line["path"] == "/alertmanager" and line["signature"] == "absent"
    doc = line["payload"]
    assert doc["receiver"] == "webhook-sink" and doc["status"] == "firing"
    assert doc["groupLabels"] == {"alertname": "FeatureDrift", "model": "fraud"}
    assert doc["alerts"][0]["annotations"]["summary"] == "amount drifted"


@pytest.mark.e2e
def test_compose_alert_path_end_to_end(tmp_path, monkeypatch, alertmanager: str, sink: Sink,
                                       compose: dict[str, Any]) -> None:
    """up with the compose stethoscope.toml (chDB for the server, loopback for the hosts): a critical
    XID finding reaches the sink twice, through Alertmanager and through the signed webhook."""
    from stethoscope.analytics.findings import Finding, FindingsWriter
    from stethoscope.exporters.service import Service
    from tests.conftest import free_port

    path, _ = compose_toml(compose)
    compose_cfg = load_config(path, environ={})
    monkeypatch.setenv(compose_cfg.alerts.webhook_secret_env, "s3cret")  # the sink's secret
    cfg = load_config(path, environ={}, overrides={
        "store.clickhouse_url": "", "store.data_dir": str(tmp_path / "data"), "store.flush_interval": "20ms",
        "collector.host": "127.0.0.1", "sql.host": "127.0.0.1",
        "collector.otlp_http_port": free_port(), "sql.port": free_port(),
        "alerts.alertmanager_url": alertmanager,
        "alerts.webhook_url": sink.url + urlsplit(compose_cfg.alerts.webhook_url).path,
        "analytics.enabled": False, "anomaly.enabled": False,
    })
    svc = Service(cfg)
    svc.start()
    try:
        xid = Finding(time=time.time(), kind="gpu_xid", subject="node=gpu-node-3 gpu=GPU-1", severity="critical",
                      labels={"node": "gpu-node-3", "gpu": "GPU-1"})
        assert FindingsWriter(svc.store).write([xid]) == 1
        got = {}
        deadline = time.monotonic() + 60
        while set(got) != {"/stethoscope", "/alertmanager"} and time.monotonic() < deadline:
            line = sink.next(timeout=max(1.0, deadline - time.monotonic()))
            got.setdefault(line["path"], line)
    finally:
        svc.stop()
    signed = got["/stethoscope"]
    assert signed["signature"] == "valid" and signed["payload"]["rule"] == "GpuXidCritical"
    assert signed["payload"]["labels"]["node"] == "gpu-node-3"
    routed = got["/alertmanager"]["payload"]
    assert routed["receiver"] == "webhook-sink"
    assert routed["alerts"][0]["labels"]["alertname"] == "GpuXidCritical"


# -- Kubernetes ------------------------------------------------------------------------------

CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding"}
WORKLOADS = {"Deployment", "DaemonSet", "StatefulSet"}


@pytest.fixture(scope="module")
def kustomization() -> dict[str, Any]:
    (doc,) = load_yaml(K8S / "kustomization.yaml")
    return doc


@pytest.fixture(scope="module")
def objects(kustomization) -> list[dict[str, Any]]:
    out = []
    for name in kustomization["resources"]:
        out += load_yaml(K8S / name)
    return out


def by_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    return workload["spec"]["template"]["spec"]["containers"]


def test_kustomization_lists_every_manifest(kustomization, objects) -> None:
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == on_disk
    patches = [p["path"] for p in kustomization["patches"]]
    assert sorted(patches) == sorted(str(p.relative_to(K8S)) for p in (K8S / "patches").glob("*.yaml"))
    for path in patches:
        (patch,) = load_yaml(K8S / path)
        target = [o for o in objects if (o["kind"], o["metadata"]["name"], o["metadata"].get("namespace")) == (
            patch["kind"], patch["metadata"]["name"], patch["metadata"].get("namespace"))]
        assert target, f"{path} patches no object of the kustomization"
        for c in patch["spec"]["template"]["spec"]["containers"]:
            assert c["name"] in {x["name"] for x in containers(target[0])}


def test_objects_are_well_formed(objects) -> None:
    seen = set()
    for o in objects:
        assert {"apiVersion", "kind", "metadata"} <= o.keys(), o
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", o["metadata"]["name"]), o["metadata"]
        key = (o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"])
        assert key not in seen, f"duplicate {key}"
        seen.add(key)
        if o["kind"] in CLUSTER_SCOPED:
            assert "namespace" not in o["metadata"], key
        else:
            assert o["metadata"]["namespace"] == "stethoscope", key
    api = {"Namespace": "v1", "ConfigMap": "v1", "Service": "v1", "ServiceAccount": "v1",
           "Deployment": "apps/v1", "DaemonSet": "apps/v1",
           "ClusterRole": "rbac.authorization.k8s.io/v1", "ClusterRoleBinding": "rbac.authorization.k8s.io/v1"}
    for o in objects:
        assert api[o["kind"]] == o["apiVersion"], o["kind"]


def test_workloads_are_consistent(objects) -> None:
    accounts = by_kind(objects, "ServiceAccount")
    configmaps = by_kind(objects, "ConfigMap")
    workloads = [o for o in objects if o["kind"] in WORKLOADS]
    assert {w["metadata"]["name"] for w in workloads} == {
        "stethoscope-collector", "stethoscope-analytics", "stethoscope-agent"}
    for w in workloads:
        name = w["metadata"]["name"]
        pod = w["spec"]["template"]["spec"]
        assert w["spec"]["selector"]["matchLabels"].items() <= w["spec"]["template"]["metadata"]["labels"].items()
        assert pod["serviceAccountName"] in accounts, name
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for v in volumes.values():
            if "configMap" in v:
                assert v["configMap"]["name"] in configmaps, name
        for c in containers(w):
            assert c["name"] and c["image"].startswith("registry.example.com/stethoscope:")
            ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
            assert all(isinstance(p, int) for p in ports.values())
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                if probe in c:
                    get = c[probe]["httpGet"]
                    assert get["port"] in ports, f"{name} {probe} uses unknown port {get['port']}"
                    assert get["path"] in ("/healthz", "/metrics")
            for m in c.get("volumeMounts", []):
                assert m["name"] in volumes, f"{name} mounts unknown volume {m['name']}"
            for e in c.get("env", []):
                assert ("value" in e) != ("valueFrom" in e), e
                assert isinstance(e.get("value", ""), str), e
            assert stethoscope_env_names(c.get("env", [])) <= KNOWN_ENV | INDIRECT_ENV
            assert c["securityContext"]["allowPrivilegeEscalation"] is False


def config_for(workload: dict[str, Any], configmaps: dict[str, dict[str, Any]], tmp_path: Path):
    """The configuration a container would load: its --config file from the ConfigMap, then its env."""
    (c,) = containers(workload)
    args = c["args"]
    assert args[0] == "up"
    target = Path(args[args.index("--config") + 1])
    pod = workload["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    (mount,) = [m for m in c["volumeMounts"] if Path(m["mountPath"]) == target.parent]
    data = configmaps[volumes[mount["name"]]["configMap"]["name"]]["data"][target.name]
    path = tmp_path / target.name
    path.write_text(data)
    env = {e["name"]: e["value"] for e in c["env"] if "value" in e and e["name"] in KNOWN_ENV}
    # Secrets hold the ClickHouse URL; stand in a well-formed one to load the rest.
    if any(e["name"] == "STETHOSCOPE_STORE_CLICKHOUSE_URL" for e in c["env"]):
        env["STETHOSCOPE_STORE_CLICKHOUSE_URL"] = "http://u:p@clickhouse.clickhouse.svc:8123"
    return c, load_config(path, environ=env)


def test_collector_and_analytics_split(objects, tmp_path) -> None:
    deployments = by_kind(objects, "Deployment")
    configmaps = by_kind(objects, "ConfigMap")
    collector, ccfg = config_for(deployments["stethoscope-collector"], configmaps, tmp_path)
    analytics, acfg = config_for(deployments["stethoscope-analytics"], configmaps, tmp_path)
    for c, cfg in ((collector, ccfg), (analytics, acfg)):
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports == {"otlp-http": cfg.collector.otlp_http_port, "sql": cfg.sql.port}
        assert (cfg.collector.otlp_http_port, cfg.sql.port) == (OTLP_PORT, SQL_PORT)
        assert cfg.collector.host == cfg.sql.host == "0.0.0.0"
        (url,) = [e for e in c["env"] if e["name"] == "STETHOSCOPE_STORE_CLICKHOUSE_URL"]
        assert url["valueFrom"]["secretKeyRef"] == {"name": "stethoscope-clickhouse", "key": "url"}
    # Every background job a section switches with `enabled` is off in the collectors, on in analytics.
    switches = [key.split(".")[0] for key, *_ in describe() if key.endswith(".enabled")]
    assert {"analytics", "alerts"} <= set(switches)
    for section in switches:
        assert getattr(ccfg, section).enabled is False, f"collector replicas run {section}"
        assert getattr(acfg, section).enabled is True, f"the analytics pod does not run {section}"
    spec = deployments["stethoscope-analytics"]["spec"]
    assert spec["replicas"] == 1 and spec["strategy"]["type"] == "Recreate"
    assert deployments["stethoscope-collector"]["spec"]["replicas"] >= 1
    secret_env = [e for e in analytics["env"] if e["name"] == acfg.alerts.webhook_secret_env]
    assert secret_env and secret_env[0]["valueFrom"]["secretKeyRef"]["optional"] is True


def test_analytics_loads_the_rules_configmap(objects, tmp_path) -> None:
    """alerts.rules names a mounted ConfigMap whose files pass `stethoscope alerts check` with the default pack."""
    from stethoscope.alerts import DEFAULT_RULES, check

    deployments = by_kind(objects, "Deployment")
    configmaps = by_kind(objects, "ConfigMap")
    c, cfg = config_for(deployments["stethoscope-analytics"], configmaps, tmp_path)
    (rules_dir,) = cfg.alerts.rules
    pod = deployments["stethoscope-analytics"]["spec"]["template"]["spec"]
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == rules_dir]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    files = configmaps[volume["configMap"]["name"]]["data"]
    assert files and all(name.endswith(".yaml") for name in files)
    folder = tmp_path / "rules"
    folder.mkdir()
    for name, text in files.items():
        (folder / name).write_text(text)
    assert check([DEFAULT_RULES, folder]) == []
    _, collector_cfg = config_for(deployments["stethoscope-collector"], configmaps, tmp_path)
    assert collector_cfg.alerts.rules == ()  # alerts are off there anyway


def test_collector_and_analytics_require_tokens(objects, tmp_path) -> None:
    """Listeners on 0.0.0.0 need tokens: each pod mounts them where auth.tokens_file says, and up accepts them."""
    import dataclasses

    from stethoscope.exporters.auth import hash_token, listener_security

    from stethoscope.errors import ConfigError

    deployments = by_kind(objects, "Deployment")
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(f'[[tokens]]\nname = "agents"\nsha256 = "{hash_token("t0ken")}"\npermissions = ["ingest"]\n')
    for name in ("stethoscope-collector", "stethoscope-analytics"):
        c, cfg = config_for(deployments[name], by_kind(objects, "ConfigMap"), tmp_path)
        assert not cfg.auth.allow_unauthenticated
        pod = deployments[name]["spec"]["template"]["spec"]
        (mount,) = [m for m in c["volumeMounts"] if Path(m["mountPath"]) == Path(cfg.auth.tokens_file).parent]
        (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        assert volume["secret"]["secretName"] == "stethoscope-tokens"
        assert [i["path"] for i in volume["secret"]["items"]] == [Path(cfg.auth.tokens_file).name]
        found, _ = listener_security(dataclasses.replace(cfg, auth=dataclasses.replace(cfg.auth, tokens_file=str(tokens))))
        assert found is not None and found.names == ("agents",)
        with pytest.raises(ConfigError, match="not a loopback address"):
            listener_security(dataclasses.replace(cfg, auth=dataclasses.replace(cfg.auth, tokens_file="")))


def test_services_match_container_ports(objects) -> None:
    services = by_kind(objects, "Service")
    workloads = [o for o in objects if o["kind"] in WORKLOADS]
    assert set(services) == {"stethoscope-collector"}
    for name, svc in services.items():
        selector = svc["spec"]["selector"]
        (target,) = [w for w in workloads if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert target["metadata"]["name"] == name
        ports = {p["name"]: p["containerPort"] for c in containers(target) for p in c.get("ports", [])}
        for p in svc["spec"]["ports"]:
            assert p["targetPort"] in ports, f"{name}: targetPort {p['targetPort']} is no container port"
            assert p["port"] == ports[p["targetPort"]] and p.get("protocol", "TCP") == "TCP"
        assert {p["port"] for p in svc["spec"]["ports"]} == {OTLP_PORT, SQL_PORT}


def test_agent_daemonset_is_the_source_and_reaches_the_collector_service(objects) -> None:
    sys.path.insert(0, str(K8S))
    try:
        import sync_agent
    finally:
        sys.path.remove(str(K8S))
    source_text = (ROOT / "agents" / "deploy" / "daemonset.yaml").read_text()
    copy = K8S / "agent-daemonset.yaml"
    assert copy.read_text() == sync_agent.render(source_text), "run python deploy/kubernetes/sync_agent.py"
    source = [d for d in yaml.safe_load_all(source_text) if d]
    assert [d for d in source if d["kind"] != "Namespace"] == load_yaml(copy)
    (ns,) = [d for d in source if d["kind"] == "Namespace"]
    assert load_yaml(K8S / "namespace.yaml") == [ns]

    (ds,) = by_kind(objects, "DaemonSet").values()
    (c,) = containers(ds)
    env = {e["name"]: e.get("value") for e in c["env"]}
    endpoint = urlsplit(env["STETHOSCOPE_AGENT_ENDPOINT"])
    svc_name, ns_name, *_ = endpoint.hostname.split(".")
    svc = by_kind(objects, "Service")[svc_name]
    assert svc["metadata"]["namespace"] == ns_name
    assert endpoint.port in {p["port"] for p in svc["spec"]["ports"]} and endpoint.port == OTLP_PORT


def test_rbac_is_exactly_scale_and_cordon(objects) -> None:
    (role,) = by_kind(objects, "ClusterRole").values()
    rules = {(tuple(r["apiGroups"]), tuple(sorted(r["resources"])), tuple(sorted(r["verbs"]))) for r in role["rules"]}
    assert rules == {
        (("apps",), ("deployments/scale", "statefulsets/scale"), ("get", "patch")),
        (("",), ("nodes",), ("patch",)),
    }
    assert all("resourceNames" not in r and "nonResourceURLs" not in r for r in role["rules"])
    assert not by_kind(objects, "Role") and not by_kind(objects, "RoleBinding")
    (binding,) = by_kind(objects, "ClusterRoleBinding").values()
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": role["metadata"]["name"]}
    (subject,) = binding["subjects"]
    assert subject["kind"] == "ServiceAccount"
    deployments = by_kind(objects, "Deployment")
    assert deployments["stethoscope-analytics"]["spec"]["template"]["spec"]["serviceAccountName"] == subject["name"]
    assert subject["namespace"] == "stethoscope"
    # Only the analytics pod gets an API token.
    for w in [o for o in objects if o["kind"] in WORKLOADS]:
        pod = w["spec"]["template"]["spec"]
        wants_token = pod["serviceAccountName"] == subject["name"]
        assert pod.get("automountServiceAccountToken", True) is wants_token, w["metadata"]["name"]


def test_kustomization_images_cover_every_container(kustomization, objects) -> None:
    names = {i["name"] for i in kustomization["images"]}
    for w in [o for o in objects if o["kind"] in WORKLOADS]:
        for c in containers(w):
            assert c["image"].rsplit(":", 1)[0] in names


KUBECTL = shutil.which("kubectl")


@pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed")
def test_kubectl_kustomize_builds(objects) -> None:
    out = subprocess.run([KUBECTL, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    built = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert sorted((d["kind"], d["metadata"]["name"]) for d in built) == sorted(
        (o["kind"], o["metadata"]["name"]) for o in objects)
    for d in built:
        assert d["metadata"]["labels"]["app.kubernetes.io/part-of"] == "stethoscope"
    (ds,) = [d for d in built if d["kind"] == "DaemonSet"]
    env = {e["name"]: e for e in containers(ds)[0]["env"]}
    assert env["OTEL_EXPORTER_OTLP_HEADERS"]["valueFrom"]["secretKeyRef"] == {
        "name": "stethoscope-agent-token", "key": "headers"}
    assert "STETHOSCOPE_AGENT_ENDPOINT" in env  # the patch added to the source's env, replacing nothing
