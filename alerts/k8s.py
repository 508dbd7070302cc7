"""A small Kubernetes API client for remediation: the scale subresource and node cordon.

Only what the actions need, over ``urllib``: a bearer token (re-read from its file on
every request, since projected service-account tokens rotate), TLS verified against a
CA file, a timeout, and errors that say what failed. In a pod the defaults are the
service account's files and ``KUBERNETES_SERVICE_HOST``/``KUBERNETES_SERVICE_PORT``;
outside one, pass ``url``, ``token``/``token_file`` and ``ca_file``.

Paths and patches follow the Kubernetes API reference:

* scale subresource: ``GET``/``PATCH /apis/apps/v1/namespaces/{ns}/{deployments|statefulsets}/{name}/scale``,
  patched with ``{"spec": {"replicas": N}}`` as ``application/merge-patch+json``;
* cordon: ``PATCH /api/v1/nodes/{name}`` with ``{"spec": {"unschedulable": true}}`` as
  ``application/strategic-merge-patch+json`` (what ``kubectl cordon`` sends).

Examples
--------
>>> c = KubeClient("https://10.0.0.1:443", token="t")
>>> c.scale_path("deployment", "prod", "ranker")
'/apis/apps/v1/namespaces/prod/deployments/ranker/scale'
>>> KubeClient("http://127.0.0.1:9", token="t", timeout=0.5).get_replicas("deployment", "ns", "x")
Traceback (most recent call last):
...
stethoscope.alerts.k8s.KubeError: GET /apis/apps/v1/namespaces/ns/deployments/x/scale: cannot reach http://127.0.0.1:9: ...
"""

from __future__ import annotations

import json
import os
import re
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import ConfigError, StethoscopeError

__all__ = [
    "KubeClient", "KubeError", "SA_TOKEN_FILE", "SA_CA_FILE", "SCALE_KINDS", "MERGE_PATCH", "STRATEGIC_MERGE_PATCH",
    "valid_name",
]

SA_TOKEN_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/token"
SA_CA_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"
#: Workload kinds whose scale subresource we patch, and their resource names.
SCALE_KINDS = {"deployment": "deployments", "statefulset": "statefulsets"}

_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def valid_name(name: str, *, label: bool = False) -> bool:
    """Whether ``name`` is a DNS-1123 subdomain (or label): the only names we put in a path.

    >>> valid_name("gpu-node-7.example"), valid_name("../etc"), valid_name("prod", label=True)
    (True, False, True)
    """
    return bool((_DNS_LABEL if label else _DNS_SUBDOMAIN).match(name))


class KubeError(StethoscopeError):
    """A Kubernetes API call failed; ``status`` is the HTTP status (0 when there was no answer)."""

    def __init__(self, message: str, *, status: int = 0) -> None:
        self.status = status
        super().__init__(message)


class KubeClient:
    """Calls the Kubernetes API at ``url`` with a bearer token, verifying TLS with ``ca_file``.

    ``token`` wins over ``token_file``; the file is read on every request. With an
    ``https`` URL and no ``ca_file``, the system trust store is used.
    """

    def __init__(self, url: str, *, token: str = "", token_file: str = "", ca_file: str = "",
                 timeout: float = 10.0) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError([f"kubernetes API URL: expected http(s)://host[:port], got {url!r}"])
        if not token and not token_file:
            raise ConfigError(["kubernetes API: needs a token or a token file"])
        if ca_file and not Path(ca_file).is_file():
            raise ConfigError([f"kubernetes API: CA file {ca_file} does not exist"])
        self.url, self.token, self.token_file, self.ca_file, self.timeout = url.rstrip("/"), token, token_file, ca_file, timeout
        self._ssl = ssl.create_default_context(cafile=ca_file or None) if parts.scheme == "https" else None

    @classmethod
    def from_settings(cls, url: str = "", *, token_file: str = SA_TOKEN_FILE, ca_file: str = SA_CA_FILE,
                      timeout: float = 10.0, environ: Mapping[str, str] | None = None) -> KubeClient:
        """The client for ``url``, or in-cluster (``KUBERNETES_SERVICE_HOST``/``_PORT``) when ``url`` is empty.

        A CA file that does not exist is ignored only when ``url`` is given explicitly.
        """
        env = os.environ if environ is None else environ
        if not url:
            host, port = env.get("KUBERNETES_SERVICE_HOST", ""), env.get("KUBERNETES_SERVICE_PORT", "443")
            if not host:
                raise ConfigError(["remediation.kube_api_url is empty and KUBERNETES_SERVICE_HOST is unset: "
                                   "not in a pod, so set the API URL explicitly"])
            url = f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
        elif ca_file == SA_CA_FILE and not Path(ca_file).is_file():
            ca_file = ""
        return cls(url, token_file=token_file, ca_file=ca_file, timeout=timeout)

    # --- plumbing ------------------------------------------------------------------------

    def _token(self) -> str:
        if self.token:
            return self.token
        try:
            return Path(self.token_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise KubeError(f"cannot read the service-account token {self.token_file}: {exc.strerror or exc}") from exc

    def request(self, method: str, path: str, body: Any = None, *, content_type: str = "application/json") -> dict[str, Any]:
        """``method path`` with an optional JSON ``body``; the decoded JSON answer, or :class:`KubeError`."""
        data = None if body is None else json.dumps(body, separators=(",", ":")).encode()
        headers = {"Authorization": f"Bearer {self._token()}", "Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = content_type
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout, context=self._ssl) as resp:
                text = resp.read(1 << 20).decode("utf-8", "replace")
        except urllib.error.HTTPError as exc:
            raw = exc.read(65536).decode("utf-8", "replace") if exc.fp else ""
            try:  # the API answers errors with a Status object whose message says why
                msg = json.loads(raw).get("message") or raw
            except (ValueError, AttributeError):
                msg = raw
            raise KubeError(f"{method} {path}: HTTP {exc.code}: {str(msg).strip()[:300] or exc.reason}",
                            status=exc.code) from exc
        except ssl.SSLError as exc:
            raise KubeError(f"{method} {path}: TLS to {self.url} failed: {exc.reason or exc}") from exc
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, ssl.SSLError):
                raise KubeError(f"{method} {path}: TLS to {self.url} failed: {reason.reason or reason}") from exc
            raise KubeError(f"{method} {path}: cannot reach {self.url}: {reason}") from exc
        try:
            out = json.loads(text) if text.strip() else {}
        except ValueError as exc:
            raise KubeError(f"{method} {path}: the answer is not JSON: {text[:200]!r}") from exc
        if not isinstance(out, dict):
            raise KubeError(f"{method} {path}: expected a JSON object, got {type(out).__name__}")
        return out

    # --- operations ----------------------------------------------------------------------

    @staticmethod
    def scale_path(kind: str, namespace: str, name: str) -> str:
        if kind not in SCALE_KINDS:
            raise KubeError(f"cannot scale a {kind!r}: expected one of {', '.join(SCALE_KINDS)}")
        if not valid_name(namespace, label=True) or not valid_name(name):
            raise KubeError(f"not a valid namespace/name: {namespace!r}/{name!r}")
        return f"/apis/apps/v1/namespaces/{namespace}/{SCALE_KINDS[kind]}/{name}/scale"

    def get_replicas(self, kind: str, namespace: str, name: str) -> int:
        """``spec.replicas`` of the workload's Scale object."""
        path = self.scale_path(kind, namespace, name)
        scale = self.request("GET", path)
        replicas = scale.get("spec", {}).get("replicas", 0) if isinstance(scale.get("spec"), dict) else None
        if isinstance(replicas, bool) or not isinstance(replicas, int):
            raise KubeError(f"GET {path}: the Scale object has no integer spec.replicas: {scale!r:.200}")
        return replicas

    def patch_replicas(self, kind: str, namespace: str, name: str, replicas: int) -> dict[str, Any]:
        """Set ``spec.replicas`` through the scale subresource (JSON merge patch); the new Scale object."""
        return self.request("PATCH", self.scale_path(kind, namespace, name), {"spec": {"replicas": int(replicas)}},
                            content_type=MERGE_PATCH)

    def cordon(self, node: str, *, unschedulable: bool = True) -> dict[str, Any]:
        """Mark ``node`` unschedulable (or schedulable again); the patched Node."""
        if not valid_name(node):
            raise KubeError(f"not a valid node name: {node!r}")
        return self.request("PATCH", f"/api/v1/nodes/{node}", {"spec": {"unschedulable": unschedulable}},
                            content_type=STRATEGIC_MERGE_PATCH)
