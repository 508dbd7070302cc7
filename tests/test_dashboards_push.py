"""Exporting to disk, and pushing to a fake Grafana that checks what the real HTTP API expects."""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self

import pytest
from stethoscope.dashboards import (
    DASHBOARDS,
    DashboardError,
    export,
    push,
    render_files,
)

from stethoscope.errors import MissingExtraError

pytest.importorskip("grafana_client")


class FakeGrafana:
    """Folders and dashboards in memory; every request is recorded as (method, path, body)."""

    def __init__(self, *, existing_folder: bool = False, fail_dashboards: bool = False) -> None:
        self.requests: list[tuple[str, str, object]] = []
        self.folders: dict[str, dict] = {"stethoscope": {"uid": "stethoscope", "title": "Stethoscope"}} \
            if existing_folder else {}
        self.dashboards: dict[str, dict] = {}
        self.fail_dashboards = fail_dashboards
        self.auth: set[str] = set()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _reply(self, status: int, body: object) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> object:
                n = int(self.headers.get("Content-Length") or 0)
                return json.loads(self.rfile.read(n)) if n else None

            def do_GET(self):
                fake.requests.append(("GET", self.path, None))
                fake.auth.add(self.headers.get("Authorization", ""))
                if self.path.startswith("/api/folders/"):
                    uid = self.path.rsplit("/", 1)[1]
                    if uid in fake.folders:
                        return self._reply(200, fake.folders[uid])
                    return self._reply(404, {"message": "folder not found"})
                return self._reply(404, {"message": "not found"})

            def do_POST(self):
                body = self._body()
                fake.requests.append(("POST", self.path, body))
                if self.headers.get("Content-Type", "").split(";")[0] != "application/json":
                    return self._reply(415, {"message": "json only"})
                if self.path == "/api/folders":
                    if not isinstance(body, dict) or not body.get("title") or "uid" not in body:
                        return self._reply(400, {"message": "bad folder"})
                    if body["uid"] in fake.folders:
                        return self._reply(412, {"message": "exists"})
                    fake.folders[body["uid"]] = body
                    return self._reply(200, {"uid": body["uid"], "title": body["title"], "id": 7})
                if self.path == "/api/dashboards/db":
                    if fake.fail_dashboards:
                        return self._reply(500, {"message": "database is locked"})
                    ok = (isinstance(body, dict) and set(body) == {"dashboard", "folderUid", "overwrite"}
                          and body["overwrite"] is True and body["folderUid"] in fake.folders
                          and body["dashboard"].get("uid") and body["dashboard"].get("id") is None)
                    if not ok:
                        return self._reply(400, {"message": "bad dashboard payload"})
                    uid = body["dashboard"]["uid"]
                    fake.dashboards[uid] = body
                    return self._reply(200, {"status": "success", "uid": uid, "url": f"/d/{uid}/x", "version": 1})
                return self._reply(404, {"message": "not found"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://admin:secret@127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def test_push_creates_the_folder_then_upserts_every_dashboard():
    with FakeGrafana() as grafana:
        result = push(grafana.url)
    assert result.folder_created and result.folder_uid == "stethoscope"
    calls = [(m, p) for m, p, _ in grafana.requests]
    assert calls[:2] == [("GET", "/api/folders/stethoscope"), ("POST", "/api/folders")]
    assert calls[2:] == [("POST", "/api/dashboards/db")] * len(DASHBOARDS)
    assert grafana.requests[1][2] == {"title": "Stethoscope", "uid": "stethoscope"}
    assert list(grafana.dashboards) == [make()["uid"] for make in DASHBOARDS.values()]
    for uid, body in grafana.dashboards.items():
        assert body["folderUid"] == "stethoscope" and body["overwrite"] is True
        assert body["dashboard"]["uid"] == uid
    assert [u for u, _ in result.dashboards] == list(grafana.dashboards)
    assert result.dashboards[0][1] == "/d/stethoscope-fleet/x"
    assert grafana.auth == {"Basic " + base64.b64encode(b"admin:secret").decode()}


def test_push_reuses_an_existing_folder_and_is_idempotent():
    with FakeGrafana(existing_folder=True) as grafana:
        first = push(grafana.url, folder="Ignored title")
        second = push(grafana.url)
    assert not first.folder_created and not second.folder_created
    assert [p for m, p, _ in grafana.requests if m == "POST"] == ["/api/dashboards/db"] * (2 * len(DASHBOARDS))
    assert len(grafana.dashboards) == len(DASHBOARDS)


def test_grafana_errors_become_dashboard_errors_without_the_password():
    with FakeGrafana(fail_dashboards=True) as grafana, pytest.raises(DashboardError) as info:
        push(grafana.url, timeout_s=5)
    assert "secret" not in str(info.value) and "127.0.0.1" in str(info.value)


def test_push_names_the_extra_when_grafana_client_is_missing(monkeypatch):
    import importlib

    real = importlib.import_module

    def fake(name, *a, **k):
        if name == "grafana_client":
            raise ModuleNotFoundError("No module named 'grafana_client'", name="grafana_client")
        return real(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", fake)
    with pytest.raises(MissingExtraError, match=r"stethoscope\[dashboards\]"):
        push("http://127.0.0.1:9")


def test_export_writes_what_the_repository_holds(tmp_path):
    written = export(tmp_path / "out")
    rel = sorted(str(p.relative_to(tmp_path / "out")) for p in written)
    assert rel == sorted(render_files())
    for r in rel:
        assert (tmp_path / "out" / r).read_text(encoding="utf-8") == render_files()[r]
        if r.endswith(".json"):
            assert json.loads((tmp_path / "out" / r).read_text())["id"] is None


def test_cli_actions(tmp_path, monkeypatch):
    import argparse
    import io

    from stethoscope.dashboards import cli

    parser = cli.add_arguments(argparse.ArgumentParser())
    out = io.StringIO()
    assert cli.run(parser.parse_args(["export", str(tmp_path)]), out=out) == 0
    assert (tmp_path / "json" / "fleet.json").exists() and "provisioning" in out.getvalue()
    monkeypatch.delenv("GRAFANA_TOKEN", raising=False)
    with FakeGrafana() as grafana:
        out = io.StringIO()
        assert cli.run(parser.parse_args(["push", "--grafana-url", grafana.url]), out=out) == 0
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("created folder 'Stethoscope'") and len(lines) == 1 + len(DASHBOARDS)
