"""The deployment files agree with the code: ports, environment variable names, settings."""

from __future__ import annotations

import configparser
import dataclasses
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from stethoscope.agents.daemon import DEFAULT_ENDPOINT
from stethoscope.agents.prometheus import DEFAULT_PORT
from stethoscope.agents.resource import K8S_ENV
from stethoscope.config import ENV_PREFIX, AgentConfig, CollectorConfig, describe

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "agents" / "deploy"
DOC = ROOT / "docs" / "agent-install.md"

# Agent settings the manifests may use before stethoscope/config.py has them; docs mark them "(new)".
NEW_SETTINGS: set[str] = set()
DOWNWARD = {"k8s.node.name": "spec.nodeName", "k8s.pod.name": "metadata.name",
            "k8s.namespace.name": "metadata.namespace", "k8s.pod.uid": "metadata.uid"}
OTLP_PORT = CollectorConfig().otlp_http_port


def known_env() -> set[str]:
    existing = {env for _, env, _, _ in describe()}
    return existing | {f"{ENV_PREFIX}AGENT_{name}".upper() for name in NEW_SETTINGS}


def load_all(name: str) -> list[dict[str, Any]]:
    with open(DEPLOY / name) as fh:
        return [doc for doc in yaml.safe_load_all(fh) if doc]


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def only(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


def test_defaults_agree() -> None:
    assert DEFAULT_PORT == 9464
    assert OTLP_PORT == 4318 and urlsplit(DEFAULT_ENDPOINT).port == OTLP_PORT
    assert urlsplit(AgentConfig().endpoint).port == OTLP_PORT


# -- DaemonSet ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def daemonset() -> dict[str, Any]:
    docs = load_all("daemonset.yaml")
    assert {d["kind"] for d in docs} == {"Namespace", "ServiceAccount", "DaemonSet"}
    assert only(docs, "Namespace")["metadata"]["name"] == "stethoscope"
    return only(docs, "DaemonSet")


def agent_container(ds: dict[str, Any]) -> dict[str, Any]:
    (container,) = ds["spec"]["template"]["spec"]["containers"]
    return container


def test_daemonset_runs_on_gpu_nodes_with_gpu_access(daemonset: dict[str, Any]) -> None:
    assert daemonset["metadata"]["namespace"] == "stethoscope"
    pod = daemonset["spec"]["template"]["spec"]
    assert daemonset["spec"]["selector"]["matchLabels"].items() <= daemonset["spec"]["template"]["metadata"][
        "labels"].items()
    assert pod["runtimeClassName"] == "nvidia"
    assert pod["hostPID"] is True
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert any(t["key"] == "nvidia.com/gpu" and t["operator"] == "Exists" for t in pod["tolerations"])
    env = env_of(agent_container(daemonset))
    assert env["NVIDIA_VISIBLE_DEVICES"]["value"] == "all"
    assert "nvidia.com/gpu" not in str(agent_container(daemonset)["resources"])  # sees GPUs, takes none


def test_daemonset_passes_identity_the_agent_reads(daemonset: dict[str, Any]) -> None:
    env = env_of(agent_container(daemonset))
    for attribute, field_path in DOWNWARD.items():
        name = K8S_ENV[attribute][0]  # the name the agent looks at first
        assert env[name]["valueFrom"]["fieldRef"]["fieldPath"] == field_path, name
    assert K8S_ENV["k8s.cluster.name"][0] in env


def test_daemonset_ports_probes_and_endpoint(daemonset: dict[str, Any]) -> None:
    container = agent_container(daemonset)
    (port,) = container["ports"]
    assert (port["name"], port["containerPort"]) == ("metrics", DEFAULT_PORT)
    annotations = daemonset["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(DEFAULT_PORT)
    for probe in ("livenessProbe", "startupProbe"):
        assert container[probe]["httpGet"] == {"path": "/metrics", "port": "metrics"}
    env = env_of(container)
    assert urlsplit(env["STETHOSCOPE_AGENT_ENDPOINT"]["value"]).port == OTLP_PORT
    assert env["STETHOSCOPE_AGENT_PROMETHEUS_PORT"]["value"] == str(DEFAULT_PORT)
    assert env["STETHOSCOPE_AGENT_PROMETHEUS_HOST"]["value"] == "0.0.0.0"  # reachable on the pod IP
    unknown = {n for n in env if n.startswith(ENV_PREFIX)} - known_env()
    assert not unknown, f"settings the agent does not know: {unknown}"


def _cpu_millicores(value: str) -> float:
    return float(value[:-1]) if value.endswith("m") else float(value) * 1000


def _mebibytes(value: str) -> float:
    m = re.fullmatch(r"(\d+)(Mi|Gi|M)", value)
    assert m, value
    return int(m.group(1)) * {"Mi": 1, "Gi": 1024, "M": 1e6 / 2**20}[m.group(2)]


def test_daemonset_stays_in_budget(daemonset: dict[str, Any]) -> None:
    resources = agent_container(daemonset)["resources"]
    assert _cpu_millicores(resources["requests"]["cpu"]) <= 10  # 1% of a core
    assert _mebibytes(resources["requests"]["memory"]) <= 64
    assert _cpu_millicores(resources["limits"]["cpu"]) <= 50
    assert _mebibytes(resources["limits"]["memory"]) <= 128


def test_daemonset_spool_and_security(daemonset: dict[str, Any]) -> None:
    pod = daemonset["spec"]["template"]["spec"]
    container = agent_container(daemonset)
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert volumes["spool"]["hostPath"]["path"] == "/var/lib/stethoscope"
    assert mounts["spool"] == "/var/lib/stethoscope"
    spool_dir = env_of(container)["STETHOSCOPE_AGENT_SPOOL_DIR"]["value"]
    assert spool_dir.startswith(mounts["spool"] + "/")
    security = container["securityContext"]
    assert security["capabilities"]["drop"] == ["ALL"]
    assert security["allowPrivilegeEscalation"] is False and security["readOnlyRootFilesystem"] is True
    assert pod["automountServiceAccountToken"] is False


# -- serving pod --------------------------------------------------------------------------------


def test_serving_pod_sends_to_its_node() -> None:
    deployment = only(load_all("serving-pod.yaml"), "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = container["env"]
    names = [e["name"] for e in env]
    by_name = env_of(container)
    assert by_name["HOST_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"
    endpoint = by_name["OTEL_EXPORTER_OTLP_ENDPOINT"]["value"]
    assert endpoint == f"http://$(HOST_IP):{OTLP_PORT}"
    assert by_name["OTEL_EXPORTER_OTLP_PROTOCOL"]["value"] == "http/protobuf"
    # $(VAR) only expands when VAR is defined earlier in the list
    for i, entry in enumerate(env):
        for ref in re.findall(r"\$\((\w+)\)", entry.get("value", "")):
            assert ref in names[:i], f"{entry['name']} uses $({ref}) before it is defined"
    for attribute, field_path in DOWNWARD.items():
        assert by_name[K8S_ENV[attribute][0]]["valueFrom"]["fieldRef"]["fieldPath"] == field_path


# -- systemd ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, comment_prefixes=("#", ";"),
                                       empty_lines_in_values=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    parser.read(DEPLOY / "stethoscope-agent.service")
    return parser


def test_systemd_unit(unit: configparser.ConfigParser) -> None:
    service = unit["Service"]
    assert service["User"] == "stethoscope" and service["User"] != "root"
    assert service["Restart"] == "always"
    assert service["StateDirectory"] == "stethoscope"
    assert service["EnvironmentFile"].lstrip("-") == "/etc/stethoscope/agent.env"
    assert service["ExecStart"].split()[-1] == "agent"
    assert service["NoNewPrivileges"] == "yes" and service["ProtectSystem"] == "strict"
    assert service.get("PrivateDevices", "no") == "no"  # yes would hide /dev/nvidia*
    assert service["DevicePolicy"] == "closed" and service["DeviceAllow"].startswith("char-nvidia")
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_systemd_environment_names_are_settings(unit: configparser.ConfigParser) -> None:
    # configparser keeps the last of repeated keys, so read Environment= lines directly
    text = (DEPLOY / "stethoscope-agent.service").read_text()
    assigned = dict(re.findall(r"^Environment=(\w+)=(\S+)$", text, flags=re.M))
    assert set(assigned) <= known_env()
    assert assigned["STETHOSCOPE_AGENT_SPOOL_DIR"] == "%S/stethoscope/spool"  # inside StateDirectory
    assert assigned["STETHOSCOPE_AGENT_PROMETHEUS_PORT"] == str(DEFAULT_PORT)


def test_example_env_file() -> None:
    lines = (DEPLOY / "agent.env").read_text().splitlines()
    pairs = dict(line.lstrip("#").split("=", 1) for line in lines
                 if re.match(r"^#?[A-Z][A-Z0-9_]*=", line))
    settings = {k for k in pairs if k.startswith(ENV_PREFIX)}
    assert settings <= known_env()
    assert urlsplit(pairs["STETHOSCOPE_AGENT_ENDPOINT"]).port == OTLP_PORT
    assert pairs["STETHOSCOPE_AGENT_PROMETHEUS_PORT"] == str(DEFAULT_PORT)


# -- documentation --------------------------------------------------------------------------------


def test_install_doc_settings_agree_with_config() -> None:
    """Every row of the reference table matches config.py; the settings the manifests use are all there.

    The table need not list settings added later: it links to the generated docs/configuration.md.
    """
    text = DOC.read_text()
    rows = dict(re.findall(r"^\| `(agent\.\w+|log_level)`( \*\*\(new\)\*\*)? \|", text, flags=re.M))
    existing = {f.name for f in dataclasses.fields(AgentConfig)}
    marked_new = {key.removeprefix("agent.") for key, new in rows.items() if new}
    assert NEW_SETTINGS - existing <= marked_new <= NEW_SETTINGS  # (new) until config.py has them
    assert "](configuration.md)" in text
    described = {key: (env, default) for key, env, default, _ in describe()}
    for key, new in rows.items():
        if new:
            continue
        assert key in described, f"{key} is in the docs but not in config.py"
        env, default = described[key]
        shown = ", ".join(default) if isinstance(default, tuple) else default
        cell = f"`{shown}`" if str(shown) != "" else "(empty)"
        assert f"| `{key}` | `{env}` | {cell} |" in text, f"{key}: docs disagree with config.py"
    used = set()
    for name in ("daemonset.yaml", "serving-pod.yaml", "stethoscope-agent.service", "agent.env"):
        used |= set(re.findall(rf"\b{ENV_PREFIX}(AGENT_[A-Z_]+|LOG_LEVEL)\b", (DEPLOY / name).read_text()))
    documented = {described.get(k, (f"{ENV_PREFIX}{k}".upper().replace(".", "_"),))[0] for k in rows}
    assert {ENV_PREFIX + u for u in used} <= documented
    for key in ("agent.endpoint", "agent.interval", "agent.collectors", "agent.prometheus_host",
                "agent.prometheus_port", "agent.scrape_targets", "agent.spool_dir", "log_level"):
        assert key in rows, key
    for names in K8S_ENV.values():
        assert names[0] in text
