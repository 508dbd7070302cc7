"""The sampling configuration the SDKs poll: ``GET/PUT/DELETE /v1/sampling`` on the OTLP port."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from conftest import make_service, otlp_url, sql
from stethoscope.errors import ConfigError
from stethoscope.exporters.sampling_config import SamplingConfig


def call(svc, method: str, path: str, body=None, headers=None):
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    req = urllib.request.Request(otlp_url(svc, path), data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read(), dict(exc.headers)


def document(svc, service: str = "scorer") -> dict:
    status, body, headers = call(svc, "GET", f"/v1/sampling?service={service}")
    assert status == 200 and headers["Content-Type"] == "application/json"
    return json.loads(body)


def test_defaults_before_any_override(service):
    assert document(service) == {
        "version": 0,
        "streams": {},
        "global_budget_rows_per_s": 100.0,
        "default_target_rows_per_s": 1.0,
        "poll_interval_s": 30,
    }


def test_put_then_get_shows_the_override(service):
    status, body, _ = call(service, "PUT", "/v1/sampling/fraud/eu",
                           {"target_rows_per_s": 20, "boost": 2.5, "ttl_s": 3600, "reason": "drift alert 42"})
    assert status == 200
    written = json.loads(body)
    assert written["stream"] == "fraud/eu" and written["target_rows_per_s"] == 20.0
    doc = document(service)
    assert doc["version"] == written["version"] > 0
    eu = doc["streams"]["fraud/eu"]
    assert (eu["target_rows_per_s"], eu["boost"], eu["reason"]) == (20.0, 2.5, "drift alert 42")
    assert eu["expires_at"].endswith("Z") and eu["expires_at"] == written["expires_at"]
    # defaults for omitted fields; no ttl_s: never expires; a model name may hold '/'
    assert call(service, "PUT", "/v1/sampling/org/ranker-v2/search", {})[0] == 200
    doc = document(service)
    assert doc["streams"]["org/ranker-v2/search"] == {"target_rows_per_s": 1.0, "boost": 1.0, "expires_at": None, "reason": ""}
    assert doc["version"] > written["version"]
    # a second PUT replaces the first
    assert call(service, "PUT", "/v1/sampling/fraud/eu", {"target_rows_per_s": 5})[0] == 200
    assert document(service)["streams"]["fraud/eu"]["target_rows_per_s"] == 5.0
    stored = sql(service, "SELECT Stream, JSONExtractFloat(Settings, 'target_rows_per_s') FROM sampling_config FINAL ORDER BY Stream")
    assert stored.splitlines() == ["fraud/eu\t5", "org/ranker-v2/search\t1"]


def test_expired_overrides_are_hidden(service, monkeypatch):
    assert call(service, "PUT", "/v1/sampling/fraud/eu", {"target_rows_per_s": 20, "ttl_s": 60})[0] == 200
    assert call(service, "PUT", "/v1/sampling/fraud/us", {"target_rows_per_s": 3, "ttl_s": 7200})[0] == 200
    before = call(service, "GET", "/v1/sampling")
    assert set(json.loads(before[1])["streams"]) == {"fraud/eu", "fraud/us"}
    now = service.sampling.clock()
    monkeypatch.setattr(service.sampling, "clock", lambda: now + 61)
    after = call(service, "GET", "/v1/sampling")
    assert set(json.loads(after[1])["streams"]) == {"fraud/us"}
    assert after[2]["ETag"] != before[2]["ETag"]  # pollers see the expiry


def test_etag_makes_polling_cheap(service):
    status, body, headers = call(service, "GET", "/v1/sampling?service=scorer")
    etag = headers["ETag"]
    assert status == 200 and etag.startswith('"') and headers["Cache-Control"] == "no-cache"
    status, body, headers = call(service, "GET", "/v1/sampling?service=scorer", headers={"If-None-Match": etag})
    assert (status, body, headers["ETag"]) == (304, b"", etag)
    assert call(service, "GET", "/v1/sampling", headers={"If-None-Match": f'W/{etag}'})[0] == 304
    assert call(service, "PUT", "/v1/sampling/fraud/eu", {"boost": 4})[0] == 200
    status, body, headers = call(service, "GET", "/v1/sampling?service=scorer", headers={"If-None-Match": etag})
    assert status == 200 and headers["ETag"] != etag and "fraud/eu" in json.loads(body)["streams"]


def test_bad_puts_are_400_naming_the_field(service):
    cases = [
        ({"target_rows_per_s": "fast"}, "target_rows_per_s"),
        ({"target_rows_per_s": -1}, "target_rows_per_s"),
        ({"target_rows_per_s": True}, "target_rows_per_s"),
        ({"target_rows_per_s": 1e9}, "target_rows_per_s"),
        (b'{"target_rows_per_s": NaN}', "target_rows_per_s"),
        ({"boost": 0}, "boost"),
        ({"boost": [2]}, "boost"),
        ({"ttl_s": -5}, "ttl_s"),
        ({"ttl_s": 10 * 365 * 86400}, "ttl_s"),
        ({"reason": 42}, "reason"),
        ({"reason": "x" * 5000}, "reason"),
        ({"target_rows_per_sec": 5}, "target_rows_per_sec"),
        (b"{not json", "body"),
        (b"[1, 2]", "body"),
    ]
    for body, field in cases:
        status, resp, _ = call(service, "PUT", "/v1/sampling/fraud/eu", body)
        assert status == 400, (body, resp)
        error = json.loads(resp)["error"]
        assert error.startswith("invalid sampling override: ") and f"{field}:" in error, (body, error)
    # every problem at once
    status, resp, _ = call(service, "PUT", "/v1/sampling/fraud/eu", {"boost": -1, "ttl_s": "soon"})
    error = json.loads(resp)["error"]
    assert status == 400 and "boost:" in error and "ttl_s:" in error
    # path problems
    assert "stream:" in json.loads(call(service, "PUT", "/v1/sampling/fraud/", {})[1])["error"]
    assert "path:" in json.loads(call(service, "PUT", "/v1/sampling/fraud", {})[1])["error"]
    assert call(service, "PUT", "/v1/sampling", {})[0] == 405
    assert call(service, "PUT", "/v1/other/x", {})[0] == 404
    assert document(service)["streams"] == {}  # nothing was stored
    assert sql(service, "SELECT count() FROM sampling_config").strip() == "0"


def test_delete_ends_an_override(service):
    assert call(service, "PUT", "/v1/sampling/fraud/eu", {"target_rows_per_s": 9})[0] == 200
    status, _, _ = call(service, "DELETE", "/v1/sampling/fraud/eu")
    assert status == 204
    assert document(service)["streams"] == {}
    assert call(service, "DELETE", "/v1/sampling/fraud/eu")[0] == 404


def test_overrides_survive_a_restart(tmp_path):
    svc = make_service(tmp_path)
    try:
        assert call(svc, "PUT", "/v1/sampling/fraud/eu", {"target_rows_per_s": 20, "reason": "investigating"})[0] == 200
        assert call(svc, "PUT", "/v1/sampling/fraud/us", {"target_rows_per_s": 7})[0] == 200
        assert call(svc, "DELETE", "/v1/sampling/fraud/us")[0] == 204
        before = document(svc)
        _, _, headers = call(svc, "GET", "/v1/sampling")
        etag = headers["ETag"]
    finally:
        svc.stop()
    svc = make_service(tmp_path)  # same data directory, fresh process state
    try:
        assert document(svc) == before
        assert before["streams"]["fraud/eu"]["reason"] == "investigating" and "fraud/us" not in before["streams"]
        assert call(svc, "GET", "/v1/sampling", headers={"If-None-Match": etag})[0] == 304
        assert call(svc, "PUT", "/v1/sampling/fraud/eu", {"target_rows_per_s": 1})[0] == 200
        assert document(svc)["version"] > before["version"]  # versions keep growing across restarts
    finally:
        svc.stop()


def test_settings_are_validated_together(store):
    with pytest.raises(ConfigError) as info:
        SamplingConfig(store, global_budget_rows_per_s=0, default_target_rows_per_s=float("nan"), poll_interval_s=0)
    assert len(info.value.problems) == 3


def test_budget_and_default_target_come_from_the_service(tmp_path):
    from stethoscope.config import load_config
    from stethoscope.exporters.service import Service

    from conftest import free_port

    cfg = load_config(environ={}, overrides={
        "store.data_dir": str(tmp_path / "data"), "collector.otlp_http_port": free_port(), "sql.port": free_port()})
    svc = Service(cfg, sampling_budget=250.0, sampling_default_target=0.5)
    svc.start()
    try:
        doc = document(svc)
        assert (doc["global_budget_rows_per_s"], doc["default_target_rows_per_s"]) == (250.0, 0.5)
    finally:
        svc.stop()


def test_collectors_sharing_a_store_converge(store):
    """Two collectors on one ClickHouse: each reloads the other's writes, newest version wins."""
    clock = [1_700_000_000.0]
    a = SamplingConfig(store, refresh_s=0, clock=lambda: clock[0])
    b = SamplingConfig(store, refresh_s=0, clock=lambda: clock[0])
    a.load()
    b.load()
    a.put("fraud", "eu", b'{"target_rows_per_s": 20}')
    assert b.overrides()["fraud/eu"].target_rows_per_s == 20.0
    clock[0] += 1
    b.put("fraud", "eu", b'{"target_rows_per_s": 3}')
    assert a.overrides()["fraud/eu"].target_rows_per_s == 3.0
    assert a.document()[1] == b.document()[1]  # same ETag on both
    clock[0] += 1
    assert a.delete("fraud", "eu")
    assert b.overrides() == {}


def test_an_unreachable_store_keeps_the_last_known_overrides(store, monkeypatch):
    from stethoscope.errors import StoreError

    cfg = SamplingConfig(store, refresh_s=0)
    cfg.load()
    cfg.put("fraud", "eu", b'{"target_rows_per_s": 20}')

    def down(*args, **kwargs):
        raise StoreError("connection refused")

    monkeypatch.setattr(store, "query", down)
    assert cfg.overrides()["fraud/eu"].target_rows_per_s == 20.0
