"""Remediation actions: plugins, the guarded runner, its audit table and its small HTTP API.

A rule's ``actions`` may hold, beside notifier names, action mappings (see
:mod:`.rules`). When an alert starts firing (a ``firing``/``new`` notification),
:meth:`ActionRunner.handle` renders each action's target, asks the guards
(:mod:`.guards`), then executes it, dry-runs it (the default: it is audited with what
would have been done and nothing is called), holds it for approval, or skips it - and
writes one row per decision to the ``actions`` table. The guards' state is rebuilt
from that table on start, so cooldowns, hourly counts, idempotency keys and pending
approvals survive a restart.

Actions are plugins in the entry-point group ``stethoscope.actions``; each is a class
built with an :class:`ActionContext` that offers ``validate`` (at rule-load time),
``default_target``, ``check_target``, ``plan`` (what a dry run records) and ``execute``:

* ``retrain`` - a signed webhook, an Argo Workflows submit from a WorkflowTemplate, or a
  Kubeflow Pipelines v2 run;
* ``scale`` - the Kubernetes scale subresource of a Deployment/StatefulSet, or a
  desired-replica value served for KEDA's ``metrics-api`` scaler;
* ``cordon`` - mark a Kubernetes node unschedulable;
* ``webhook`` - a signed JSON POST anywhere.

Examples
--------
>>> from stethoscope.alerts.rules import ActionSpec, Rule, Match
>>> from stethoscope.alerts.state import Notification
>>> rule = Rule("GpuXid", "critical", match=Match(("gpu_xid",)), annotations={"summary": "XID"},
...             remediations=(ActionSpec("cordon", "{{ labels.node }}"),))
>>> runner = ActionRunner([rule], ActionContext())          # dry-run by default, audit kept in memory
>>> n = Notification("firing", "new", "fp1", "", "GpuXid", "critical", {"node": "gpu-7"}, {}, "gpu=0", 100.0, None)
>>> [(d.decision, d.target, d.result["request"]["path"]) for d in runner.handle([n], now=100.0)]
[('dry_run', 'gpu-7', '/api/v1/nodes/gpu-7')]
>>> [d.decision for d in runner.handle([n], now=101.0)]     # the same firing instance: never twice
['skipped']
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import ssl
import struct
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, PluginError, StethoscopeError
from .guards import (
    DECISIONS,
    Decision,
    Ledger,
    Limits,
    Request,
    bound_replicas,
    parse_change,
)
from .k8s import SCALE_KINDS, KubeClient, valid_name
from .rules import ActionSpec, Rule, render_template
from .signing import sign_headers

if TYPE_CHECKING:
    from ..config import Config

__all__ = [
    "ENTRY_POINT_GROUP", "COLUMNS", "ActionError", "ActionContext", "AlertInfo", "Outcome", "Action",
    "RetrainAction", "ScaleAction", "CordonAction", "WebhookAction", "KedaBoard", "MemoryAudit", "StoreAudit",
    "ActionRunner", "RemediationApi", "action_classes", "validate_action", "action_runner_from_config",
    "Decision", "DECISIONS", "add_cli", "run_cli",
]

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "stethoscope.actions"
#: Columns of the ``actions`` table, in :class:`~.guards.Decision` order.
COLUMNS = ("Time", "ActionId", "Action", "Target", "Rule", "Fingerprint", "Decision", "Reason", "DryRun", "Params",
           "Result", "IdempotencyKey")
#: How far back the guard state is rebuilt from the audit table (idempotency keys included).
LOOKBACK_S = 7 * 86400.0

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_KEDA_TARGET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,252}$")


class ActionError(StethoscopeError):
    """An action could not be carried out; the message says what failed (it goes in the audit row)."""


@dataclass(frozen=True)
class AlertInfo:
    """The alert an action is taken for, and the action's own ids."""

    action_id: str
    rule: str
    fingerprint: str
    labels: Mapping[str, str]
    subject: str
    severity: str
    key: str  # idempotency key
    starts_at: float


@dataclass(frozen=True)
class Outcome:
    """What ``execute`` did: ``result`` goes in the audit row; ``skipped`` says why nothing changed."""

    result: Mapping[str, Any] = field(default_factory=dict)
    skipped: str = ""


class KedaBoard:
    """Desired replica counts served to KEDA's ``metrics-api`` scaler (``valueLocation: desiredReplicas``)."""

    def __init__(self) -> None:
        self._values: dict[str, int] = {}
        self._lock = threading.Lock()

    def get(self, target: str) -> int | None:
        with self._lock:
            return self._values.get(target)

    def set(self, target: str, replicas: int) -> None:
        with self._lock:
            self._values[target] = int(replicas)

    def items(self) -> dict[str, int]:
        with self._lock:
            return dict(self._values)


@dataclass
class ActionContext:
    """What actions may use: a Kubernetes client (built on first use), the KEDA board, secrets' environment."""

    kube_factory: Callable[[], KubeClient] | None = None
    keda: KedaBoard = field(default_factory=KedaBoard)
    environ: Mapping[str, str] | None = None
    timeout_s: float = 10.0
    _kube: KubeClient | None = field(default=None, repr=False)

    def kube(self) -> KubeClient:
        if self._kube is None:
            if self.kube_factory is None:
                raise ActionError("no Kubernetes API configured ([remediation] kube_api_url, or run in a pod)")
            self._kube = self.kube_factory()
        return self._kube

    def secret(self, env_name: str, what: str) -> str:
        value = (os.environ if self.environ is None else self.environ).get(env_name, "")
        if not value:
            raise ActionError(f"{what}: environment variable {env_name} is empty or unset")
        return value


# --- HTTP for the non-Kubernetes backends ----------------------------------------------------


def _http_json(method: str, url: str, body: Any, headers: Mapping[str, str], timeout: float,
               ok: Iterable[int] = range(200, 300), ca_file: str = "") -> Any:
    data = body if isinstance(body, bytes) else json.dumps(body, separators=(",", ":")).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", "Accept": "application/json", **headers})
    ctx = ssl.create_default_context(cafile=ca_file or None) if url.startswith("https:") else None
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=ctx) as resp:
            status, text = resp.status, resp.read(1 << 20).decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        text = exc.read(65536).decode("utf-8", "replace") if exc.fp else ""
        raise ActionError(f"{method} {url}: HTTP {exc.code}: {text.strip()[:300] or exc.reason}") from exc
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise ActionError(f"{method} {url}: cannot reach it: {getattr(exc, 'reason', exc)}") from exc
    if status not in set(ok):
        raise ActionError(f"{method} {url}: unexpected HTTP {status}: {text.strip()[:300]}")
    try:
        return json.loads(text) if text.strip() else {}
    except ValueError:
        return {"body": text[:1000]}


# --- plugins ---------------------------------------------------------------------------------


Problems = list[tuple[str, str]]  # (key of the action mapping, message)


def _http_url(v: Any) -> bool:
    if not isinstance(v, str):
        return False
    p = urllib.parse.urlsplit(v)
    return p.scheme in ("http", "https") and bool(p.hostname)


def _templated(v: Any) -> bool:
    return isinstance(v, str) and "{{" in v


class Action(ABC):
    """Base of the built-in actions: a ``name``, the mapping ``keys`` it takes, and the five hooks."""

    name = ""
    keys: frozenset[str] = frozenset()
    required: frozenset[str] = frozenset()

    def __init__(self, ctx: ActionContext) -> None:
        self.ctx = ctx

    @classmethod
    def validate(cls, target: str, params: Mapping[str, Any]) -> Problems:
        """Problems in a rule's mapping (``target`` may still hold placeholders)."""
        out: Problems = [(k, f"unknown key {k!r} (allowed: {', '.join(sorted(cls.keys | {'action', 'target', 'cooldown', 'max_per_hour', 'approval', 'dry_run'}))})")
                         for k in params if k not in cls.keys]
        out += [("", f"{k!r} is required") for k in sorted(cls.required) if k not in params]
        return out

    def default_target(self, params: Mapping[str, Any]) -> str:
        return ""

    def check_target(self, target: str, params: Mapping[str, Any]) -> str | None:
        """Why a rendered ``target`` is unusable (it may come from telemetry labels), or ``None``."""
        return None if target else "empty target"

    @abstractmethod
    def plan(self, target: str, params: Mapping[str, Any], info: AlertInfo) -> dict[str, Any]:
        """What ``execute`` would do, without doing anything (recorded by a dry run)."""

    @abstractmethod
    def execute(self, target: str, params: Mapping[str, Any], info: AlertInfo) -> Outcome:
        """Do it; the :class:`Outcome` says what happened (or why it was skipped)."""


def _check_url_and_env(params: Mapping[str, Any], *, url_key: str = "url", secret: str = "", token: str = "") -> Problems:
    out: Problems = []
    if url_key in params and not _http_url(params[url_key]):
        out.append((url_key, f"{url_key} must be an http:// or https:// URL, got {params[url_key]!r}"))
    for k in (secret, token):
        if k and k in params and not (isinstance(params[k], str) and _ENV_NAME.match(params[k])):
            out.append((k, f"{k} must name an environment variable, got {params[k]!r}"))
    return out


def _signed_body(info: AlertInfo, action: str, target: str, extra: Mapping[str, Any]) -> bytes:
    body = {"version": "1", "action": action, "action_id": info.action_id, "idempotency_key": info.key,
            "rule": info.rule, "fingerprint": info.fingerprint, "target": target, "labels": dict(info.labels),
            "subject": info.subject, "severity": info.severity, **extra}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


class WebhookAction(Action):
    """POST a JSON body signed like the alert webhook (:mod:`.signing`) to ``url``, with ``Idempotency-Key``.

    Keys: ``url``, ``secret_env`` (the variable holding the signing secret), ``payload``
    (extra JSON fields, placeholders allowed), ``ca_file``.
    """

    name = "webhook"
    keys = frozenset({"url", "secret_env", "payload", "ca_file"})
    required = frozenset({"url", "secret_env"})

    @classmethod
    def validate(cls, target: str, params: Mapping[str, Any]) -> Problems:
        out = super().validate(target, params) + _check_url_and_env(params, secret="secret_env")
        if "payload" in params and not isinstance(params["payload"], dict):
            out.append(("payload", "payload must be a mapping"))
        return out

    def default_target(self, params: Mapping[str, Any]) -> str:
        return str(params.get("url", ""))

    def _request(self, target: str, params: Mapping[str, Any], info: AlertInfo) -> tuple[str, bytes]:
        extra = {"payload": params.get("payload", {})}
        return str(params["url"]), _signed_body(info, self.name, target, extra)

    def plan(self, target: str, params: Mapping[str, Any], info: AlertInfo) -> dict[str, Any]:
        url, body = self._request(target, params, info)
        return {"request": {"method": "POST", "url": url, "body": json.loads(body), "signed": True}}

    def execute(self, target: str, params: Mapping[str, Any], info: AlertInfo) -> Outcome:
        url, body = self._request(target, params, info)
        secret = self.ctx.secret(str(params["secret_env"]), f"{self.name} signing secret")
        headers = {**sign_headers(secret, body, time.time()), "Idempotency-Key": info.key}
        answer = _http_json("POST", url, body, headers, self.ctx.timeout_s, ca_file=str(params.get("ca_file", "")))
        return Outcome({"url": url, "answer": answer})


class RetrainAction(Action):
    """Start a retraining run.

    ``backend: webhook`` - a signed POST (keys as :class:`WebhookAction`) carrying ``parameters``.

    ``backend: argo`` - ``POST {url}/api/v1/workflows/{namespace}/submit`` with
    ``{"namespace", "resourceKind": "WorkflowTemplate", "resourceName": template,
    "submitOptions": {"parameters": ["k=v", ...], "generateName", "labels"}}`` (Argo
    Workflows' ``WorkflowSubmitRequest``); ``token_env`` names the variable with the
    argo-server bearer token.

    ``backend: kubeflow`` - ``POST {url}/apis/v2beta1/runs`` with ``{"display_name",
    "pipeline_version_reference": {"pipeline_id", "pipeline_version_id"},
    "runtime_config": {"parameters": {...}}}`` and ``experiment_id`` when given
    (Kubeflow Pipelines API v2beta1); ``token_env`` as for Argo.
    """

    name = "retrain"
    keys = frozenset({"backend", "url", "secret_env", "token_env", "parameters", "namespace", "template",
                      "pipeline_id", "pipeline_version_id", "experiment_id", "display_name", "ca_file"})
    required = frozenset({"backend", "url"})
    _BACKEND_KEYS = {
        "webhook": ({"secret_env"}, set()),
        "argo": ({"namespace", "template"}, {"token_env"}),
        "kubeflow": ({"pipeline_id", "pipeline_version_id"}, {"token_env", "experiment_id", "display_name"}),
    }

    @classmethod
    def validate(cls, target: str, params: Mapping[str, Any]) -> Problems:
        out = super().validate(target, params) + _check_url_and_env(params, secret="secret_env", token="token_env")
        backend = params.get("backend")
        if backend not in cls._BACKEND_KEYS:
            return out + [("backend", f"backend must be one of {', '.join(cls._BACKEND_KEYS)}, got {backend!r}")]
        need, may = cls._BACKEND_KEYS[backend]
        common = {"backend", "url", "parameters", "ca_file"}
        out += [("", f"backend {backend}: {k!r} is required") for k in sorted(need) if k not in params]
        out += [(k, f"backend {backend} does not take {k!r}") for k in params if k not in need | may | common]
        for k in need | may:
            if k in params and k != "parameters" and not (isinstance(params[k], str) and params[k]):
                out.append((k, f"{k} must be a non-empty string"))
        ns = params.get("namespace")
        if backend == "argo" and isinstance(ns, str) and not _templated(ns) and not valid_name(ns, label=True):
            out.append(("namespace", f"namespace must be a DNS-1123 label, got {ns!r}"))
        p = params.get("parameters", {})
        if not isinstance(p, dict) or not all(isinstance(k, str) and isinstance(v, (str, int, float, bool))
                                              for k, v in p.items()):
            out.append(("parameters", "parameters must map names to strings or numbers"))
        return out

    def default_target(self, params: Mapping[str, Any]) -> str:
        b = params.get("backend")
        if b == "argo":
            return f"argo/{params.get('namespace')}/{params.get('template')}"
        if b == "kubeflow":
            return f"kubeflow/{params.get('pipeline_id')}/{params.get('pipeline_version_id')}"
        return str(params.get("url", ""))

    def _request(self, target: str, params: Mapping[str, Any], info: AlertInfo) -> tuple[str, Any]:
        base, b = str(params["url"]).rstrip("/"), params["backend"]
        parameters = {str(k): v for k, v in dict(params.get("parameters", {})).items()}
        if b == "argo":
            ns, template = str(params["namespace"]), str(params["template"])
            if not valid_name(ns, label=True):
                raise ActionError(f"argo: not a valid namespace {ns!r}")
            body = {"namespace": ns, "resourceKind": "WorkflowTemplate", "resourceName": template,
                    "submitOptions": {"parameters": [f"{k}={_scalar(v)}" for k, v in sorted(parameters.items())],
                                      "generateName": f"{template}-",
                                      "labels": f"stethoscope.io/action-id={info.action_id}"}}
            return f"{base}/api/v1/workflows/{urllib.parse.quote(ns)}/submit", body
        if b == "kubeflow":
            body = {"display_name": str(params.get("display_name") or f"stethoscope {info.rule} {info.action_id}"),
                    "pipeline_version_reference": {"pipeline_id": str(params["pipeline_id"]),
                                                   "pipeline_version_id": str(params["pipeline_version_id"])},
                    "runtime_config": {"parameters": parameters}}
            if params.get("experiment_id"):
                body["experiment_id"] = str(params["experiment_id"])
            return f"{base}/apis/v2beta1/runs", body
        return base, json.loads(_signed_body(info, self.name, target, {"parameters": parameters}))

    def plan(self, target: str, params: Mapping[str, Any], info: AlertInfo) -> dict[str, Any]:
        url, body = self._request(target, params, info)
        return {"request": {"method": "POST", "url": url, "body": body}, "backend": params["backend"]}

    def execute(self, target: str, params: Mapping[str, Any], info: AlertInfo) -> Outcome:
        url, body = self._request(target, params, info)
        ca = str(params.get("ca_file", ""))
        if params["backend"] == "webhook":
            raw = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
            secret = self.ctx.secret(str(params["secret_env"]), "retrain webhook signing secret")
            headers = {**sign_headers(secret, raw, time.time()), "Idempotency-Key": info.key}
            return Outcome({"url": url, "answer": _http_json("POST", url, raw, headers, self.ctx.timeout_s, ca_file=ca)})
        headers = {}
        if params.get("token_env"):
            headers["Authorization"] = "Bearer " + self.ctx.secret(str(params["token_env"]), f"{params['backend']} token")
        answer = _http_json("POST", url, body, headers, self.ctx.timeout_s, ca_file=ca)
        meta = answer.get("metadata", {}) if isinstance(answer, dict) else {}
        ref = {"workflow": meta.get("name")} if params["backend"] == "argo" else {"run_id": (answer or {}).get("run_id")}
        return Outcome({"url": url, **ref})


def _scalar(v: Any) -> str:
    return ("true" if v else "false") if isinstance(v, bool) else str(v)


class ScaleAction(Action):
    """Scale a workload within bounds.

    ``target: deployment/NAMESPACE/NAME`` (or ``statefulset/...``) with ``via:
    kubernetes`` (the default) reads and patches the scale subresource; with ``via:
    keda`` the target is any name and the new count is served at
    ``/v1/keda/TARGET`` as ``{"desiredReplicas": N}`` for KEDA's ``metrics-api``
    scaler. ``replicas`` is ``+N``, ``-N`` or ``N``; ``min`` (default 1) and ``max``
    bound the result and ``max_step`` limits one change (:func:`~.guards.bound_replicas`).
    """

    name = "scale"
    keys = frozenset({"replicas", "min", "max", "max_step", "via"})
    required = frozenset({"replicas", "max"})

    @classmethod
    def validate(cls, target: str, params: Mapping[str, Any]) -> Problems:
        out = super().validate(target, params)
        via = params.get("via", "kubernetes")
        if via not in ("kubernetes", "keda"):
            out.append(("via", f"via must be kubernetes or keda, got {via!r}"))
        if not target:
            out.append(("", "target is required (deployment/NAMESPACE/NAME, statefulset/..., or a KEDA name)"))
        elif via == "kubernetes" and not _templated(target):
            why = _parse_workload(target)[1]
            if why:
                out.append(("target", why))
        if "replicas" in params:
            try:
                parse_change(params["replicas"])
            except ValueError as exc:
                out.append(("replicas", str(exc)))
        ints = {}
        for k, lo in (("min", 0), ("max", 0), ("max_step", 1)):
            if k in params:
                v = params[k]
                if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                    out.append((k, f"{k} must be an integer of {lo} or more, got {v!r}"))
                else:
                    ints[k] = v
        if "max" in ints and ints.get("min", 1) > ints["max"]:
            out.append(("max", f"max {ints['max']} is below min {ints.get('min', 1)}"))
        return out

    def check_target(self, target: str, params: Mapping[str, Any]) -> str | None:
        if params.get("via", "kubernetes") == "keda":
            return None if _KEDA_TARGET.match(target) else f"not a usable KEDA target name: {target!r}"
        return _parse_workload(target)[1] or None

    def _bounds(self, params: Mapping[str, Any]) -> tuple[int, int, int | None]:
        return int(params.get("min", 1)), int(params["max"]), (int(params["max_step"]) if "max_step" in params else None)

    def plan(self, target: str, params: Mapping[str, Any], info: AlertInfo) -> dict[str, Any]:
        lo, hi, step = self._bounds(params)
        out: dict[str, Any] = {"replicas": str(params["replicas"]), "min": lo, "max": hi, "max_step": step}
        if params.get("via") == "keda":
            current = self.ctx.keda.get(target)
            current = lo if current is None else current
            out.update(keda=True, current=current, would_publish=bound_replicas(current, params["replicas"], lo=lo, hi=hi,
                                                                                  max_step=step)[0])
            return out
        (kind, ns, name), _ = _parse_workload(target)
        path = KubeClient.scale_path(kind, ns, name)
        out["request"] = {"method": "PATCH", "path": path, "content_type": "application/merge-patch+json",
                          "body": {"spec": {"replicas": f"current {params['replicas']} within [{lo}, {hi}]"}}}
        return out

    def execute(self, target: str, params: Mapping[str, Any], info: AlertInfo) -> Outcome:
        lo, hi, step = self._bounds(params)
        if params.get("via") == "keda":
            current = self.ctx.keda.get(target)
            current = lo if current is None else current
            want, why = bound_replicas(current, params["replicas"], lo=lo, hi=hi, max_step=step)
            if want is None:
                return Outcome({"keda": True, "current": current}, skipped=why)
            self.ctx.keda.set(target, want)
            return Outcome({"keda": True, "from": current, "to": want})
        (kind, ns, name), _ = _parse_workload(target)
        kube = self.ctx.kube()
        current = kube.get_replicas(kind, ns, name)
        want, why = bound_replicas(current, params["replicas"], lo=lo, hi=hi, max_step=step)
        if want is None:
            return Outcome({"current": current}, skipped=why)
        scale = kube.patch_replicas(kind, ns, name, want)
        return Outcome({"from": current, "to": want, "replicas": scale.get("spec", {}).get("replicas")})


def _parse_workload(target: str) -> tuple[tuple[str, str, str], str]:
    parts = target.split("/")
    if len(parts) != 3 or parts[0] not in SCALE_KINDS:
        return ("", "", ""), f"target must be deployment/NAMESPACE/NAME or statefulset/NAMESPACE/NAME, got {target!r}"
    kind, ns, name = parts
    if not valid_name(ns, label=True) or not valid_name(name):
        return ("", "", ""), f"target {target!r}: namespace and name must be DNS-1123 names"
    return (kind, ns, name), ""


class CordonAction(Action):
    """Mark the node ``target`` unschedulable (``PATCH /api/v1/nodes/NAME``); pods already there keep running."""

    name = "cordon"

    @classmethod
    def validate(cls, target: str, params: Mapping[str, Any]) -> Problems:
        out = super().validate(target, params)
        if not target:
            out.append(("", "target is required: the node name, e.g. \"{{ labels.node }}\""))
        elif not _templated(target) and not valid_name(target):
            out.append(("target", f"target must be a node name (DNS-1123), got {target!r}"))
        return out

    def check_target(self, target: str, params: Mapping[str, Any]) -> str | None:
        return None if valid_name(target) else f"not a valid node name: {target!r}"

    def plan(self, target: str, params: Mapping[str, Any], info: AlertInfo) -> dict[str, Any]:
        return {"request": {"method": "PATCH", "path": f"/api/v1/nodes/{target}",
                            "content_type": "application/strategic-merge-patch+json",
                            "body": {"spec": {"unschedulable": True}}}}

    def execute(self, target: str, params: Mapping[str, Any], info: AlertInfo) -> Outcome:
        node = self.ctx.kube().cordon(target)
        return Outcome({"node": target, "unschedulable": bool(node.get("spec", {}).get("unschedulable"))})


_BUILTINS: dict[str, type[Action]] = {c.name: c for c in (RetrainAction, ScaleAction, CordonAction, WebhookAction)}


def action_classes() -> dict[str, type[Action]]:
    """Every action plugin by name: the entry-point group, falling back to the built-ins."""
    out = dict(_BUILTINS)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            cls = ep.load()
        except Exception as exc:  # a broken third-party plugin must say which one
            raise PluginError(f"action plugin {ep.name!r} ({ep.value}) failed to load: {exc}") from exc
        if not isinstance(cls, type) or not callable(getattr(cls, "execute", None)):
            raise PluginError(f"action plugin {ep.name!r} ({ep.value}) is not an action class")
        out[ep.name] = cls
    return out


def validate_action(name: str, target: str, params: Mapping[str, Any]) -> Problems:
    """Problems in one action mapping of a rule, as ``(key, message)``; used by :mod:`.rules`."""
    classes = action_classes()
    if name not in classes:
        return [("action", f"unknown action {name!r} (known: {', '.join(sorted(classes))})")]
    return list(classes[name].validate(target, params))


# --- the audit --------------------------------------------------------------------------------


class MemoryAudit:
    """Audit rows kept in a list (tests, and ``ActionRunner`` without a store)."""

    def __init__(self) -> None:
        self.rows: list[Decision] = []

    def write(self, decisions: Sequence[Decision]) -> None:
        self.rows.extend(decisions)

    def read(self, since: float) -> list[Decision]:
        return [d for d in self.rows if d.time >= since]


class StoreAudit:
    """The ``actions`` table of a :class:`~stethoscope.exporters.store.Store`."""

    def __init__(self, store: Any, table: str = "actions") -> None:
        self.store, self.table = store, table

    def write(self, decisions: Sequence[Decision]) -> None:
        data = b"".join(_row_binary(d.row()) for d in decisions)
        token = "actions-" + hashlib.sha256(data).hexdigest()[:32]  # a retried batch is stored once
        self.store.insert(self.table, COLUMNS, data, fmt="RowBinary", token=token)

    def read(self, since: float) -> list[Decision]:
        cols = ", ".join(c for c in COLUMNS if c != "Time")
        data = self.store.query(
            f"SELECT toUnixTimestamp64Milli(Time) AS Time, {cols} FROM {self.table} "
            f"WHERE Time >= fromUnixTimestamp64Milli(toInt64({int(since * 1000)})) ORDER BY Time",
            "JSONEachRow",
        ).data
        return [Decision.from_row(json.loads(line)) for line in data.splitlines() if line.strip()]


def _row_binary(row: Mapping[str, Any]) -> bytes:
    """One ``actions`` row in ClickHouse RowBinary (Int64 ms, varint-prefixed strings, UInt8 bool)."""
    out = bytearray()
    for c in COLUMNS:
        v = row[c]
        if c == "Time":
            out += struct.pack("<q", int(v))
        elif c == "DryRun":
            out.append(1 if v else 0)
        else:
            b = str(v).encode("utf-8")
            n = len(b)
            while n >= 0x80:
                out.append((n & 0x7F) | 0x80)
                n >>= 7
            out.append(n)
            out += b
    return bytes(out)


# --- the runner -------------------------------------------------------------------------------

_ORDER = {"pending_approval": 0, "approved": 1}


class ActionRunner:
    """Turns new firing notifications into guarded, audited actions (see the module docstring).

    ``rules`` give each rule's :class:`~.rules.ActionSpec` list; ``dry_run`` is the global
    switch (a rule may only make an action *more* careful: ``dry_run: true``). Thread-safe:
    the HTTP API approves from its own thread. Nothing here raises on a failing action
    or store: the failure is audited (or logged) and the next decision goes on.
    """

    def __init__(self, rules: Iterable[Rule], ctx: ActionContext, *, audit: Any = None, dry_run: bool = True,
                 limits: Limits | None = None, actions: Mapping[str, Action] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.specs: dict[str, tuple[ActionSpec, ...]] = {r.name: r.remediations for r in rules if r.remediations}
        self.ctx, self.dry_run, self.limits, self.clock = ctx, dry_run, limits or Limits(), clock
        self.audit = MemoryAudit() if audit is None else audit
        if actions is None:
            actions = {name: cls(ctx) for name, cls in action_classes().items()}
        self.actions = dict(actions)
        self.ledger = Ledger()
        self._lock = threading.RLock()
        self._loaded = False
        self._unsaved: list[Decision] = []
        self._last_ms = -1  # the time of the latest decision, in ms (see _record)
        self.api: RemediationApi | None = None

    # --- state ---------------------------------------------------------------------------

    def load(self, now: float | None = None) -> int:
        """Rebuild the guard state (and KEDA values) from the audit; returns the rows read."""
        now = self.clock() if now is None else now
        with self._lock:
            rows = sorted(self.audit.read(now - max(LOOKBACK_S, self.limits.approval_timeout_s)),
                          key=lambda d: (d.time, _ORDER.get(d.decision, 2)))
            self.ledger = Ledger()
            for d in rows:
                self.ledger.apply(d)
                self._last_ms = max(self._last_ms, int(round(d.time * 1000)))
                if d.action == "scale" and d.decision == "executed" and d.result.get("keda") and "to" in d.result:
                    self.ctx.keda.set(d.target, int(d.result["to"]))
            self._loaded = True
            if rows:
                log.info("remediation state rebuilt from %d audit rows: %d pending approvals",
                         len(rows), len(self.ledger.pending))
            return len(rows)

    def _record(self, d: Decision) -> Decision:
        """Apply ``d`` to the guards now; it is written with the others by :meth:`flush`.

        Decisions get distinct millisecond times in the order they are made (a tie moves
        one millisecond later), so that :meth:`load` replays them in that order: the
        ``actions`` table keeps no other order, and two scale decisions in the same
        millisecond read back in the wrong order would restore the wrong KEDA value.
        """
        ms = int(round(d.time * 1000))
        if ms <= self._last_ms:
            ms = self._last_ms + 1
            d = replace(d, time=ms / 1000)
        self._last_ms = ms
        self.ledger.apply(d)
        self._unsaved.append(d)
        level = logging.WARNING if d.decision == "failed" else logging.INFO
        log.log(level, "remediation %s %s on %s (%s): %s %s", d.decision, d.action, d.target, d.rule, d.action_id, d.reason)
        return d

    def flush(self) -> bool:
        """Write the audit rows not written yet, in one insert; False (rows kept for the next try) on failure."""
        with self._lock:
            if not self._unsaved:
                return True
            try:
                self.audit.write(self._unsaved)
            except (StethoscopeError, OSError) as exc:
                log.warning("cannot write %d remediation audit rows (kept to retry): %s", len(self._unsaved), exc)
                return False
            self._unsaved = []
            return True

    # --- decisions -----------------------------------------------------------------------

    def handle(self, notifications: Iterable[Any], now: float | None = None) -> list[Decision]:
        """Decide every action of every ``firing``/``new`` notification; expire old pending approvals."""
        now = self.clock() if now is None else float(now)
        with self._lock:
            if not self._loaded:
                try:
                    self.load(now)
                except (StethoscopeError, OSError) as exc:
                    log.warning("cannot rebuild remediation state from the audit table: %s", exc)
                    return []  # deciding without the history could repeat an action: try next time
            out = self.expire(now)
            try:
                for n in notifications:
                    if n.status != "firing" or n.reason != "new":
                        continue
                    for spec in self.specs.get(n.rule, ()):
                        try:
                            out += self._decide(n, spec, now)
                        except Exception as exc:  # a plugin bug in a hook before execute: audit it, go on
                            log.exception("remediation %s for %s failed before it ran", spec.action, n.rule)
                            out.append(self._record(Decision(
                                now, uuid.uuid4().hex[:12], spec.action, spec.target, n.rule, n.fingerprint, "failed",
                                f"{type(exc).__name__}: {exc}", self.dry_run or bool(spec.dry_run))))
            finally:
                self.flush()
            return out

    def _decide(self, n: Any, spec: ActionSpec, now: float) -> list[Decision]:
        aid = uuid.uuid4().hex[:12]
        dry = self.dry_run or bool(spec.dry_run)
        base = Decision(now, aid, spec.action, spec.target, n.rule, n.fingerprint, "skipped", "", dry)
        plugin = self.actions.get(spec.action)
        if plugin is None:
            return [self._record(replace(base, reason=f"no action plugin named {spec.action!r}"))]
        ctx = {"labels": dict(n.labels), "subject": n.subject, "rule": n.rule, "severity": n.severity,
               "fingerprint": n.fingerprint}
        try:
            params = _render(spec.params, ctx)
            target = render_template(spec.target, **ctx) if spec.target else plugin.default_target(params)
        except KeyError as exc:
            return [self._record(replace(base, reason=f"template: {exc.args[0]} is absent from the alert"))]
        key = hashlib.sha256(json.dumps([n.rule, n.fingerprint, round(float(n.starts_at), 3), spec.action, target])
                             .encode()).hexdigest()[:24]
        stored = {"params": params, "cooldown_s": spec.cooldown_s, "max_per_hour": spec.max_per_hour,
                  "approval": spec.approval, "alert": {**ctx, "starts_at": n.starts_at}}
        base = replace(base, target=target, params=stored, idempotency_key=key)
        bad = plugin.check_target(target, params)
        if bad:
            return [self._record(replace(base, reason=f"target: {bad}"))]
        req = Request(spec.action, target, n.rule, n.fingerprint, key, dry, spec.cooldown_s, spec.max_per_hour, spec.approval)
        why = self.ledger.check(req, now, self.limits)
        if why:
            return [self._record(replace(base, reason=why))]
        if spec.approval:
            return [self._record(replace(base, decision="pending_approval",
                                         reason=f"waiting for approval (expires after {self.limits.approval_timeout_s:g}s)"))]
        return [self._run(base, plugin, params, n.starts_at, now)]

    def _run(self, base: Decision, plugin: Action, params: Mapping[str, Any], starts_at: float, now: float) -> Decision:
        alert = base.params.get("alert", {})
        info = AlertInfo(base.action_id, base.rule, base.fingerprint, alert.get("labels", {}), alert.get("subject", ""),
                         alert.get("severity", ""), base.idempotency_key, starts_at)
        try:
            if base.dry_run:
                plan = plugin.plan(base.target, params, info)
                return self._record(replace(base, time=now, decision="dry_run", result=plan,
                                            reason="dry run: recorded what would be done, nothing was called"))
            outcome = plugin.execute(base.target, params, info)
        except StethoscopeError as exc:
            return self._record(replace(base, time=now, decision="failed", reason=str(exc)))
        except Exception as exc:  # a plugin bug must not stop the runner; it is audited with its type
            log.exception("action plugin %s raised", base.action)
            return self._record(replace(base, time=now, decision="failed", reason=f"{type(exc).__name__}: {exc}"))
        if outcome.skipped:
            return self._record(replace(base, time=now, decision="skipped", reason=outcome.skipped, result=outcome.result))
        return self._record(replace(base, time=now, decision="executed", reason="done", result=outcome.result))

    # --- approvals -----------------------------------------------------------------------

    def pending(self) -> list[Decision]:
        """The actions waiting for approval, oldest first (reads the audit first after a start)."""
        with self._lock:
            if not self._loaded:
                self.load()
            return sorted(self.ledger.pending.values(), key=lambda d: d.time)

    def expire(self, now: float) -> list[Decision]:
        """Reject every pending approval older than the approval timeout."""
        with self._lock:
            out = [self._record(replace(p, time=now, decision="rejected",
                                        reason=f"approval expired after {self.limits.approval_timeout_s:g}s"))
                   for p in self.ledger.expired(now, self.limits)]
            self.flush()
            return out

    def _pending(self, action_id: str, now: float) -> Decision:
        if not self._loaded:
            self.load(now)
        self.expire(now)
        p = self.ledger.pending.get(action_id)
        if p is None:
            raise ActionError(f"no action {action_id!r} is waiting for approval (unknown, expired or already decided)")
        return p

    def approve(self, action_id: str, *, by: str = "", now: float | None = None) -> list[Decision]:
        """Approve a pending action and carry it out now (guards checked again); its decisions."""
        now = self.clock() if now is None else float(now)
        with self._lock:
            try:
                return self._approve(action_id, by, now)
            finally:
                self.flush()

    def _approve(self, action_id: str, by: str, now: float) -> list[Decision]:
        p = self._pending(action_id, now)
        approved = self._record(replace(p, time=now, decision="approved", reason=f"approved by {by or 'unknown'}"))
        stored = p.params
        req = Request(p.action, p.target, p.rule, p.fingerprint, p.idempotency_key, p.dry_run,
                      stored.get("cooldown_s"), stored.get("max_per_hour"), True)
        why = self.ledger.check(req, now, self.limits, own_id=action_id)
        if why:
            return [approved, self._record(replace(p, time=now, decision="skipped", reason=why))]
        plugin = self.actions.get(p.action)
        if plugin is None:
            return [approved, self._record(replace(p, time=now, reason=f"no action plugin named {p.action!r}",
                                                   decision="skipped"))]
        return [approved, self._run(p, plugin, stored.get("params", {}), stored.get("alert", {}).get("starts_at", 0.0),
                                    now)]

    def reject(self, action_id: str, *, by: str = "", reason: str = "", now: float | None = None) -> Decision:
        now = self.clock() if now is None else float(now)
        with self._lock:
            try:
                p = self._pending(action_id, now)
                why = f"rejected by {by or 'unknown'}" + (f": {reason}" if reason else "")
                return self._record(replace(p, time=now, decision="rejected", reason=why))
            finally:
                self.flush()

    # --- the HTTP API ----------------------------------------------------------------------

    def start(self) -> None:
        """Start the HTTP API when one is configured (``api``)."""
        if self.api is not None:
            self.api.start()

    def stop(self) -> None:
        if self.api is not None:
            self.api.close()


def _render(value: Any, ctx: Mapping[str, Any]) -> Any:
    if isinstance(value, str):
        return render_template(value, **ctx)
    if isinstance(value, dict):
        return {k: _render(v, ctx) for k, v in value.items()}
    if isinstance(value, list):
        return [_render(v, ctx) for v in value]
    return value


def _decision_json(d: Decision) -> dict[str, Any]:
    return {"action_id": d.action_id, "time": d.time, "action": d.action, "target": d.target, "rule": d.rule,
            "fingerprint": d.fingerprint, "decision": d.decision, "reason": d.reason, "dry_run": d.dry_run,
            "params": d.params.get("params", {}), "result": dict(d.result)}


class RemediationApi:
    """A small HTTP API beside ``up``: approvals and the values KEDA reads.

    * ``GET /v1/actions/pending`` - the actions waiting for approval;
    * ``POST /v1/actions/ID/approve`` and ``/reject`` (JSON body ``{"by": ..., "reason": ...}``, optional);
    * ``GET /v1/keda/TARGET`` - ``{"target": ..., "desiredReplicas": N}`` (``valueLocation: desiredReplicas``).

    With a ``token``, every request needs ``Authorization: Bearer TOKEN`` (KEDA's
    ``authMode: bearer``); without one the API only binds to loopback.
    """

    def __init__(self, runner: ActionRunner, host: str = "127.0.0.1", port: int = 0, *, token: str = "") -> None:
        if not token and host not in ("127.0.0.1", "::1", "localhost"):
            raise ConfigError([f"remediation.api_host {host}: the remediation API needs a token "
                               "(remediation.api_token_env) to listen beyond loopback"])
        self.runner, self.token = runner, token
        api = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "stethoscope-remediation"

            def log_message(self, fmt: str, *args: Any) -> None:
                log.debug("remediation api: " + fmt, *args)

            def _send(self, status: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _authorized(self) -> bool:
                if not api.token:
                    return True
                got = self.headers.get("Authorization", "")
                if hmac.compare_digest(got.encode(), f"Bearer {api.token}".encode()):
                    return True
                self._send(401, {"error": "missing or wrong bearer token"})
                return False

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                if not self._authorized():
                    return
                path = urllib.parse.urlsplit(self.path).path
                if path == "/v1/actions/pending":
                    try:
                        pending = api.runner.pending()
                    except StethoscopeError as exc:
                        self._send(503, {"error": f"cannot read the actions table: {exc}"})
                        return
                    self._send(200, {"pending": [_decision_json(d) for d in pending]})
                elif path.startswith("/v1/keda/"):
                    target = urllib.parse.unquote(path[len("/v1/keda/"):])
                    value = api.runner.ctx.keda.get(target)
                    if value is None:
                        self._send(404, {"error": f"no desired replica count for {target!r} yet"})
                    else:
                        self._send(200, {"target": target, "desiredReplicas": value})
                else:
                    self._send(404, {"error": f"no such path {path}"})

            def do_POST(self) -> None:  # noqa: N802
                if not self._authorized():
                    return
                m = re.fullmatch(r"/v1/actions/([0-9a-f]{1,64})/(approve|reject)", urllib.parse.urlsplit(self.path).path)
                if not m:
                    self._send(404, {"error": f"no such path {self.path}"})
                    return
                n = int(self.headers.get("Content-Length") or 0)
                try:
                    body = json.loads(self.rfile.read(min(n, 65536)) or b"{}") if n else {}
                    if not isinstance(body, dict):
                        raise ValueError("expected a JSON object")
                except ValueError as exc:
                    self._send(400, {"error": f"body: {exc}"})
                    return
                by = str(body.get("by", ""))[:200] or self.client_address[0]
                try:
                    if m.group(2) == "approve":
                        out = api.runner.approve(m.group(1), by=by)
                    else:
                        out = [api.runner.reject(m.group(1), by=by, reason=str(body.get("reason", ""))[:500])]
                except ActionError as exc:
                    self._send(404, {"error": str(exc)})
                    return
                except StethoscopeError as exc:  # the audit table cannot be read right now
                    self._send(503, {"error": str(exc)})
                    return
                self._send(200, {"decisions": [_decision_json(d) for d in out]})

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self.host, self.port = host, self._server.server_address[1]
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="stethoscope-remediation-api",
                                        daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(5)
        self._server.server_close()


def action_runner_from_config(cfg: Config, store: Any, environ: Mapping[str, str] | None = None,
                              rules: Sequence[Rule] | None = None) -> ActionRunner:
    """The runner ``[remediation]`` describes, over the rules ``[alerts]`` loads (or ``rules``).

    Its audit goes to ``store``'s ``actions`` table (``store=None`` keeps it in memory).
    Call :meth:`ActionRunner.start` to serve the API when ``remediation.api_port`` is set,
    and :meth:`ActionRunner.handle` with each run's notifications.
    """
    from ..config import parse_duration

    r = cfg.remediation
    env = os.environ if environ is None else environ
    if rules is None:
        from . import DEFAULT_RULES
        from .rules import load_rules

        rules = load_rules([DEFAULT_RULES, *cfg.alerts.rules])
    timeout = float(parse_duration(r.kube_timeout))

    def kube() -> KubeClient:
        return KubeClient.from_settings(r.kube_api_url, token_file=r.kube_token_file, ca_file=r.kube_ca_file,
                                        timeout=timeout, environ=env)

    ctx = ActionContext(kube_factory=kube, environ=env, timeout_s=timeout)
    limits = Limits(max_per_hour=r.max_per_hour, cooldown_s=float(parse_duration(r.cooldown)),
                    approval_timeout_s=float(parse_duration(r.approval_timeout)))
    runner = ActionRunner(rules, ctx, audit=None if store is None else StoreAudit(store), dry_run=r.dry_run,
                          limits=limits)
    if r.api_port:
        token = env.get(r.api_token_env, "") if r.api_token_env else ""
        runner.api = RemediationApi(runner, r.api_host, r.api_port, token=token)
    if not r.dry_run:
        log.warning("remediation is live (remediation.dry_run = false): actions will call out")
    return runner


# --- the command line: stethoscope alerts approve|reject|pending ------------------------------


def add_cli(sub: Any) -> None:
    """Add ``approve``, ``reject`` and ``pending`` to the ``stethoscope alerts`` subcommands."""
    for name, help_ in (("approve", "approve a remediation action waiting for approval (it runs at once)"),
                        ("reject", "reject a remediation action waiting for approval"),
                        ("pending", "list remediation actions waiting for approval")):
        p = sub.add_parser(name, help=help_)
        if name != "pending":
            p.add_argument("action_id", help="the ActionId (from `stethoscope alerts pending` or the actions table)")
            p.add_argument("--by", help="who decides (default: $USER)")
        if name == "reject":
            p.add_argument("--reason", default="", help="why, for the audit row")
        p.add_argument("--config", help="TOML configuration file (for remediation.api_host/api_port/api_token_env)")
        p.add_argument("--url", help="remediation API base URL (default http://{api_host}:{api_port})")
        p.add_argument("--timeout", type=float, default=30.0)
        p.set_defaults(func=run_cli, approval_command=name)


def run_cli(args: Any, environ: Mapping[str, str] | None = None) -> int:
    """``stethoscope alerts approve|reject|pending``: talks to the remediation API of the running ``up``."""
    import sys

    from ..config import load_config

    env = os.environ if environ is None else environ
    r = load_config(getattr(args, "config", None), environ=env).remediation
    url = args.url
    if not url:
        if not r.api_port:
            print("stethoscope alerts: remediation.api_port is 0 (the API is off); set it, or pass --url",
                  file=sys.stderr)
            return 2
        host = "127.0.0.1" if r.api_host in ("0.0.0.0", "::") else r.api_host
        url = f"http://{host}:{r.api_port}"
    headers = {}
    token = env.get(r.api_token_env, "") if r.api_token_env else ""
    if token:
        headers["Authorization"] = f"Bearer {token}"
    base = url.rstrip("/")
    try:
        if args.approval_command == "pending":
            req = urllib.request.Request(base + "/v1/actions/pending", headers=headers)
            with urllib.request.urlopen(req, timeout=args.timeout) as resp:
                pending = json.loads(resp.read())["pending"]
            for d in pending:
                print(f"{d['action_id']}  {d['action']:<8} {d['target']:<40} rule={d['rule']} dry_run={d['dry_run']}")
            if not pending:
                print("no action waits for approval")
            return 0
        body = {"by": args.by or env.get("USER", "") or "cli"}
        if args.approval_command == "reject":
            body["reason"] = args.reason
        answer = _http_json("POST", f"{base}/v1/actions/{urllib.parse.quote(args.action_id)}/{args.approval_command}",
                            body, headers, args.timeout)
    except ActionError as exc:
        print(f"stethoscope alerts {args.approval_command}: {exc}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError, ValueError, KeyError) as exc:
        print(f"stethoscope alerts {args.approval_command}: cannot reach {base}: {getattr(exc, 'reason', exc)} "
              "(is `stethoscope up` running with remediation.api_port set?)", file=sys.stderr)
        return 2
    for d in answer.get("decisions", []):
        print(f"{d['action_id']}  {d['decision']:<16} {d['action']} {d['target']}: {d['reason']}")
    return 0
