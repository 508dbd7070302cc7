"""The Kubernetes client against a loopback server that checks what the real API server expects.

:class:`FakeApi` plays the parts of the Kubernetes API (scale subresource, nodes), the
Argo server, the Kubeflow Pipelines API and a signed webhook receiver. It answers only
the exact method, path, headers and body each real API takes, and records every
request, so a test can also prove that nothing was called. Other test modules import it.
"""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from stethoscope.alerts.k8s import SA_CA_FILE, KubeClient, KubeError, valid_name
from stethoscope.alerts.signing import ReplayCache, SignatureError, verify
from stethoscope.errors import ConfigError

TOKEN = "k8s-token-123"


class FakeApi:
    """One loopback server for every API an action calls; see the module docstring."""

    def __init__(self, *, token: str = TOKEN, tls: tuple[str, str] | None = None, webhook_secret: str = "whs") -> None:
        self.token, self.webhook_secret = token, webhook_secret
        self.argo_token, self.kfp_token = "argo-tok", "kfp-tok"  # each API has its own bearer token
        self.requests: list[dict[str, Any]] = []
        self.scales: dict[tuple[str, str, str], int] = {}
        self.nodes: dict[str, dict[str, Any]] = {}
        self.fail_next: int = 0  # answer the next N requests with 500
        self._lock = threading.Lock()
        self._replays = ReplayCache()
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a: Any) -> None:
                pass

            def _reply(self, status: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n) if n else b""
                req = {"method": self.command, "path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()},
                       "raw": raw, "body": json.loads(raw) if raw else None}
                with api._lock:
                    api.requests.append(req)
                    if api.fail_next > 0:
                        api.fail_next -= 1
                        return self._reply(500, {"kind": "Status", "message": "injected failure"})
                    status, body = api.route(req)
                self._reply(status, body)

            do_GET = do_POST = do_PATCH = _handle  # noqa: N815

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        scheme = "http"
        if tls:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(*tls)
            self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
            scheme = "https"
        self.url = f"{scheme}://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)

    @staticmethod
    def status(code: int, message: str) -> tuple[int, dict[str, Any]]:
        return code, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message, "code": code}

    def route(self, req: dict[str, Any]) -> tuple[int, Any]:
        method, path, h, body = req["method"], req["path"], req["headers"], req["body"]
        if path.startswith("/hook"):
            try:
                verify(self.webhook_secret, h, req["raw"], now=__import__("time").time(), seen=self._replays)
            except SignatureError as exc:
                return 401, {"error": str(exc)}
            if method != "POST" or h.get("content-type") != "application/json" or not h.get("idempotency-key"):
                return 400, {"error": "bad webhook request"}
            return 200, {"ok": True}
        parts = path.strip("/").split("/")
        want = self.argo_token if parts[:3] == ["api", "v1", "workflows"] else \
            self.kfp_token if parts[:2] == ["apis", "v2beta1"] else self.token
        if h.get("authorization") != f"Bearer {want}":
            return self.status(401, "Unauthorized")
        # /apis/apps/v1/namespaces/{ns}/{deployments|statefulsets}/{name}/scale
        if parts[:3] == ["apis", "apps", "v1"] and len(parts) == 8 and parts[3] == "namespaces" and parts[7] == "scale":
            key = (parts[5], parts[4], parts[6])
            if parts[5] not in ("deployments", "statefulsets"):
                return self.status(404, f"the server could not find the requested resource {parts[5]}")
            if key not in self.scales:
                return self.status(404, f'{parts[5]}.apps "{parts[6]}" not found')
            if method == "PATCH":
                if h.get("content-type") != "application/merge-patch+json":
                    return self.status(415, f"the body of the request was in an unknown format - {h.get('content-type')}")
                reps = (body or {}).get("spec", {}).get("replicas")
                if set(body) != {"spec"} or set(body["spec"]) != {"replicas"} or type(reps) is not int or reps < 0:
                    return self.status(422, f"invalid scale patch {body!r}")
                self.scales[key] = reps
            elif method != "GET":
                return self.status(405, "method not allowed")
            r = self.scales[key]
            return 200, {"kind": "Scale", "apiVersion": "autoscaling/v1",
                         "metadata": {"name": parts[6], "namespace": parts[4]},
                         "spec": {"replicas": r}, "status": {"replicas": r}}
        if parts[:3] == ["api", "v1", "nodes"] and len(parts) == 4:
            node = self.nodes.get(parts[3])
            if node is None:
                return self.status(404, f'nodes "{parts[3]}" not found')
            if method == "PATCH":
                if h.get("content-type") not in ("application/strategic-merge-patch+json", "application/merge-patch+json"):
                    return self.status(415, "unknown patch format")
                if body != {"spec": {"unschedulable": True}}:
                    return self.status(422, f"unexpected node patch {body!r}")
                node["unschedulable"] = True
            return 200, {"kind": "Node", "metadata": {"name": parts[3]}, "spec": {"unschedulable": node["unschedulable"]}}
        # Argo Workflows: POST /api/v1/workflows/{namespace}/submit (WorkflowSubmitRequest)
        if method == "POST" and parts[:3] == ["api", "v1", "workflows"] and len(parts) == 5 and parts[4] == "submit":
            want = {"namespace", "resourceKind", "resourceName", "submitOptions"}
            if h.get("content-type") != "application/json" or set(body) != want or body["namespace"] != parts[3] \
                    or body["resourceKind"] != "WorkflowTemplate" \
                    or not all(isinstance(p, str) and "=" in p for p in body["submitOptions"].get("parameters", [])):
                return 400, {"code": 3, "message": f"bad submit request {body!r}"}
            return 200, {"metadata": {"name": body["resourceName"] + "-x7k2p", "namespace": parts[3]},
                         "spec": {"workflowTemplateRef": {"name": body["resourceName"]}}}
        # Kubeflow Pipelines v2beta1: POST /apis/v2beta1/runs
        if method == "POST" and path == "/apis/v2beta1/runs":
            ref = (body or {}).get("pipeline_version_reference", {})
            if not body.get("display_name") or not ref.get("pipeline_id") or not ref.get("pipeline_version_id") \
                    or not isinstance(body.get("runtime_config", {}).get("parameters"), dict):
                return 400, {"error": f"bad run {body!r}"}
            return 200, {"run_id": "run-0001", "display_name": body["display_name"], "state": "PENDING"}
        return self.status(404, f"no route for {method} {path}")


@pytest.fixture
def api():
    srv = FakeApi()
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 (also its own CA), made with the openssl CLI."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl binary is missing: cannot make a test certificate")
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    return str(cert), str(key)


def test_scale_get_and_merge_patch(api):
    api.scales[("deployments", "prod", "ranker")] = 3
    c = KubeClient(api.url, token=TOKEN, timeout=5)
    assert c.get_replicas("deployment", "prod", "ranker") == 3
    out = c.patch_replicas("deployment", "prod", "ranker", 5)
    assert out["spec"]["replicas"] == 5 and api.scales[("deployments", "prod", "ranker")] == 5
    get, patch = api.requests
    assert (get["method"], get["path"]) == ("GET", "/apis/apps/v1/namespaces/prod/deployments/ranker/scale")
    assert get["headers"]["authorization"] == f"Bearer {TOKEN}" and get["body"] is None
    assert (patch["method"], patch["path"]) == ("PATCH", "/apis/apps/v1/namespaces/prod/deployments/ranker/scale")
    assert patch["headers"]["content-type"] == "application/merge-patch+json"
    assert patch["body"] == {"spec": {"replicas": 5}}


def test_statefulset_and_cordon(api):
    api.scales[("statefulsets", "ml", "db")] = 1
    api.nodes["gpu-node-7"] = {"unschedulable": False}
    c = KubeClient(api.url, token=TOKEN)
    assert c.patch_replicas("statefulset", "ml", "db", 2)["spec"]["replicas"] == 2
    assert c.cordon("gpu-node-7")["spec"]["unschedulable"] is True
    node = api.requests[-1]
    assert (node["method"], node["path"]) == ("PATCH", "/api/v1/nodes/gpu-node-7")
    assert node["headers"]["content-type"] == "application/strategic-merge-patch+json"
    assert node["body"] == {"spec": {"unschedulable": True}}


def test_errors_name_what_failed(api, tmp_path):
    c = KubeClient(api.url, token="wrong")
    with pytest.raises(KubeError, match=r"GET /apis/apps/v1/namespaces/prod/deployments/x/scale: HTTP 401: Unauthorized") as e:
        c.get_replicas("deployment", "prod", "x")
    assert e.value.status == 401
    c = KubeClient(api.url, token=TOKEN)
    with pytest.raises(KubeError, match=r'HTTP 404: deployments.apps "gone" not found'):
        c.get_replicas("deployment", "prod", "gone")
    with pytest.raises(KubeError, match="not a valid node name"):
        c.cordon("../../api/v1/namespaces")  # a hostile label never reaches a path
    with pytest.raises(KubeError, match="cannot scale a 'daemonset'"):
        c.get_replicas("daemonset", "prod", "x")
    missing = KubeClient(api.url, token_file=str(tmp_path / "nope"))
    with pytest.raises(KubeError, match="cannot read the service-account token"):
        missing.get_replicas("deployment", "prod", "x")
    assert len(api.requests) == 2  # the 401 and the 404; the bad names and the missing token never left


def test_token_file_is_reread_each_call(api, tmp_path):
    api.scales[("deployments", "a", "b")] = 1
    tok = tmp_path / "token"
    tok.write_text("old\n")
    c = KubeClient(api.url, token_file=str(tok))
    with pytest.raises(KubeError, match="401"):
        c.get_replicas("deployment", "a", "b")
    tok.write_text(TOKEN + "\n")  # the kubelet rotated the projected token
    assert c.get_replicas("deployment", "a", "b") == 1


def test_tls_with_a_ca_file(tls_files):
    cert, key = tls_files
    srv = FakeApi(tls=(cert, key))
    try:
        srv.scales[("deployments", "prod", "web")] = 4
        assert srv.url.startswith("https://")
        assert KubeClient(srv.url, token=TOKEN, ca_file=cert).get_replicas("deployment", "prod", "web") == 4
        with pytest.raises(KubeError, match="TLS to https://127.0.0.1:.* failed"):
            KubeClient(srv.url, token=TOKEN).get_replicas("deployment", "prod", "web")  # not in the system store
    finally:
        srv.close()


def test_in_cluster_settings(tmp_path):
    with pytest.raises(ConfigError, match="KUBERNETES_SERVICE_HOST is unset"):
        KubeClient.from_settings("", environ={})
    tok = tmp_path / "token"
    tok.write_text("t")
    ca = tmp_path / "ca.crt"
    ca.write_text("not a certificate")
    with pytest.raises(ssl.SSLError):  # the in-cluster CA file is loaded as given
        KubeClient.from_settings("", token_file=str(tok), ca_file=str(ca),
                                 environ={"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"})
    c = KubeClient.from_settings("", token_file=str(tok), ca_file="",
                                 environ={"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "6443"})
    assert c.url == "https://[fd00::1]:6443"
    # An explicit URL outside a pod: the default service-account CA path is skipped when absent.
    if not Path(SA_CA_FILE).exists():
        assert KubeClient.from_settings("http://127.0.0.1:1", token_file=str(tok)).ca_file == ""
    with pytest.raises(ConfigError, match="expected http"):
        KubeClient("ftp://x", token="t")
    with pytest.raises(ConfigError, match="needs a token"):
        KubeClient("http://127.0.0.1:1")


@pytest.mark.parametrize("name,ok", [("node-1", True), ("a.b-c", True), ("UPPER", False), ("", False),
                                     ("a/b", False), ("-x", False), ("x" * 254, False), ("%2e%2e", False)])
def test_valid_names(name, ok):
    assert valid_name(name) is ok
