"""Bearer tokens on the OTLP receiver, the sampling endpoint and the SQL endpoint.

Every request goes over real HTTP to an in-process ``up``; clients are the
OpenTelemetry SDK exporter, the agent's spool sender, ``clickhouse-connect``
and urllib.
"""

from __future__ import annotations

import base64
import doctest
import json
import logging
import time
import urllib.error
import urllib.request

import clickhouse_connect
import pytest
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, MetricExportResult
from opentelemetry.sdk.resources import Resource

from conftest import free_port, make_service, otlp_url, sql_url
from stethoscope.agents import delivery
from stethoscope.agents.delivery import Sender
from stethoscope.agents.spool import Spool
from stethoscope.errors import ConfigError
from stethoscope.exporters import auth
from stethoscope.exporters.auth import TokenSet, hash_token

TOKENS = {
    "agent": ("tok-agent-6b1f0c", ["ingest"]),
    "reader": ("tok-reader-93ad77", ["read"]),
    "writer": ("tok-writer-0c2e9b", ["read", "write"]),
    "admin": ("tok-admin-51fe08", ["sampling_admin"]),
}


def write_tokens(path, tokens=TOKENS) -> str:
    lines = []
    for name, (secret, perms) in tokens.items():
        lines += ["[[tokens]]", f'name = "{name}"', f'sha256 = "{hash_token(secret)}"',
                  f"permissions = {json.dumps(perms)}", ""]
    path.write_text("\n".join(lines))
    return str(path)


@pytest.fixture
def secured(tmp_path):
    svc = make_service(tmp_path, **{"auth.tokens_file": write_tokens(tmp_path / "tokens.toml"), "sql.writable": True})
    yield svc
    svc.stop()


def call(url, *, method="GET", body=None, token=None, headers=None):
    hdrs = dict(headers or {})
    if token:
        hdrs["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=body, method=method, headers=hdrs)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read(), resp.headers
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read(), exc.headers


def metrics_body() -> bytes:
    from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics

    reader = InMemoryMetricReader()
    provider = MeterProvider(resource=Resource.create({"service.name": "authed"}), metric_readers=[reader])
    provider.get_meter("t").create_counter("auth.requests").add(3, {"k": "v"})
    data = reader.get_metrics_data()
    provider.shutdown()
    return encode_metrics(data).SerializeToString()


def query(svc, text, token=TOKENS["reader"][0]):
    status, body, _ = call(sql_url(svc) + "?default_format=TabSeparated", method="POST", body=text.encode(), token=token)
    assert status == 200, body
    return body.decode()


def test_module_doctests():
    assert doctest.testmod(auth).failed == 0
    assert doctest.testmod(delivery).failed == 0


def test_otlp_needs_an_ingest_token(secured):
    pb = {"Content-Type": "application/x-protobuf"}
    status, _, headers = call(otlp_url(secured), method="POST", body=metrics_body(), headers=pb)
    assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
    status, _, headers = call(otlp_url(secured), method="POST", body=metrics_body(), headers=pb, token="nope")
    assert status == 401 and 'error="invalid_token"' in headers["WWW-Authenticate"]
    status, body, _ = call(otlp_url(secured), method="POST", body=metrics_body(), headers=pb, token=TOKENS["reader"][0])
    assert status == 403 and b"ingest" in body
    status, body, _ = call(otlp_url(secured), method="POST", body=metrics_body(), headers=pb, token=TOKENS["agent"][0])
    assert status == 200, body
    assert query(secured, "SELECT sum(Value) FROM otel_metrics_sum WHERE MetricName = 'auth.requests'").strip() == "3"


def test_json_refusal_is_json(secured):
    status, body, _ = call(otlp_url(secured), method="POST", body=b"{}", headers={"Content-Type": "application/json"})
    assert status == 401 and json.loads(body)["code"] == 16  # UNAUTHENTICATED


def test_sdk_exporter_with_and_without_token(secured):
    def export(headers):
        reader = InMemoryMetricReader()
        provider = MeterProvider(resource=Resource.create({"service.name": "sdk"}), metric_readers=[reader])
        provider.get_meter("t").create_counter("sdk.calls").add(1)
        data = reader.get_metrics_data()
        provider.shutdown()
        exporter = OTLPMetricExporter(endpoint=otlp_url(secured), headers=headers, timeout=10)
        try:
            return exporter.export(data)
        finally:
            exporter.shutdown()

    assert export({"Authorization": "Bearer wrong"}) is MetricExportResult.FAILURE
    assert export({"Authorization": f"Bearer {TOKENS['agent'][0]}"}) is MetricExportResult.SUCCESS
    assert query(secured, "SELECT count() FROM otel_metrics_sum WHERE MetricName = 'sdk.calls'").strip() == "1"


def test_agent_sender_keeps_data_spooled_until_the_token_is_right(secured, tmp_path):
    body = metrics_body()
    spool = Spool(tmp_path / "spool-bad")
    spool.append(body, weight=1)
    bad = Sender(spool, otlp_url(secured), token="wrong-token", backoff_initial_s=0.05, backoff_max_s=0.05, environ={})
    bad.start()
    deadline = time.monotonic() + 20
    while bad.stats().requests < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    bad.shutdown(drain_timeout_s=0)
    assert bad.stats().requests >= 2 and "401" in (bad.stats().last_error or "")
    assert spool.pending == 1 and not bad.stats().dropped  # retried, never dropped
    spool.close()
    spool = Spool(tmp_path / "spool-bad")  # as after an agent restart with the token fixed
    good = Sender(spool, otlp_url(secured), environ={"OTEL_EXPORTER_OTLP_HEADERS": f"Authorization=Bearer%20{TOKENS['agent'][0]}"})
    good.start()
    assert good.wait_drained(20)
    good.shutdown()
    spool.close()
    assert query(secured, "SELECT sum(Value) FROM otel_metrics_sum WHERE MetricName = 'auth.requests'").strip() == "3"


def test_sql_permissions(secured):
    url = sql_url(secured)
    status, body, headers = call(url + "?query=SELECT%201")
    assert status == 401 and headers["X-ClickHouse-Exception-Code"] == "516" and "Bearer" in headers["WWW-Authenticate"]
    assert query(secured, "SELECT 1").strip() == "1"
    basic = base64.b64encode(f"default:{TOKENS['reader'][0]}".encode()).decode()
    assert call(url + "?query=SELECT%202", headers={"Authorization": f"Basic {basic}"})[1] == b"2\n"
    assert call(url + "?query=SELECT%203", headers={"X-ClickHouse-Key": TOKENS["reader"][0]})[1] == b"3\n"
    status, body, headers = call(url + "?query=SELECT%201", token=TOKENS["agent"][0])
    assert status == 403 and headers["X-ClickHouse-Exception-Code"] == "497"
    insert = "INSERT INTO otel_logs (Body) VALUES ('from-writer')"
    status, body, headers = call(url, method="POST", body=insert.encode(), token=TOKENS["reader"][0])
    assert status == 403 and headers["X-ClickHouse-Exception-Code"] == "497" and b"write permission" in body
    status, body, _ = call(url, method="POST", body=insert.encode(), token=TOKENS["writer"][0])
    assert status == 200, body
    assert query(secured, "SELECT count() FROM otel_logs WHERE Body = 'from-writer'").strip() == "1"
    assert call(url + "ping")[0] == 200 and call(url + "healthz")[0] == 200  # probes stay open


def test_write_token_on_a_read_only_endpoint_still_cannot_write(tmp_path):
    svc = make_service(tmp_path, **{"auth.tokens_file": write_tokens(tmp_path / "tokens.toml")})
    try:
        status, _, headers = call(sql_url(svc), method="POST", body=b"DROP TABLE otel_logs", token=TOKENS["writer"][0])
        assert status == 403 and headers["X-ClickHouse-Exception-Code"] == "164"
    finally:
        svc.stop()


def test_clickhouse_connect_with_access_token(secured):
    client = clickhouse_connect.get_client(host="127.0.0.1", port=secured.sql.port, access_token=TOKENS["reader"][0])
    try:
        assert client.command("SELECT 40 + 2") == 42
    finally:
        client.close()
    with pytest.raises(clickhouse_connect.driver.exceptions.DatabaseError, match="516"):
        clickhouse_connect.get_client(host="127.0.0.1", port=secured.sql.port, access_token="wrong")


def test_sampling_endpoint_permissions(secured):
    url = otlp_url(secured, "/v1/sampling")
    assert call(url)[0] == 401
    assert call(url, token=TOKENS["agent"][0])[0] == 200  # SDKs poll with their ingest token
    assert call(url, token=TOKENS["reader"][0])[0] == 200
    body = json.dumps({"target_rows_per_s": 5, "ttl_s": 3600, "reason": "auth test"}).encode()
    put = {"Content-Type": "application/json"}
    assert call(url + "/m/s", method="PUT", body=body, headers=put, token=TOKENS["agent"][0])[0] == 403
    assert call(url + "/m/s", method="PUT", body=body, headers=put)[0] == 401
    status, reply, _ = call(url + "/m/s", method="PUT", body=body, headers=put, token=TOKENS["admin"][0])
    assert status == 200, reply
    assert call(url + "/m/s", method="DELETE", token=TOKENS["admin"][0])[0] == 204


def test_metrics_page_needs_read_and_counts_refusals(secured):
    call(otlp_url(secured), method="POST", body=b"", headers={"Content-Type": "application/x-protobuf"})
    call(otlp_url(secured), method="POST", body=b"", headers={"Content-Type": "application/x-protobuf"}, token="bad")
    assert call(otlp_url(secured, "/metrics"))[0] == 401
    status, body, _ = call(otlp_url(secured, "/metrics"), token=TOKENS["reader"][0])
    text = body.decode()
    assert status == 200
    assert 'stethoscope_rejects_total{endpoint="otlp",reason="unauthenticated"}' in text
    assert 'stethoscope_rejects_total{endpoint="otlp",reason="invalid_token"}' in text
    assert call(otlp_url(secured, "/healthz"))[0] == 200


def test_tokens_never_reach_the_logs(secured, caplog):
    secret = "leaky-secret-token-0123456789"
    caplog.set_level(logging.DEBUG)
    pb = {"Content-Type": "application/x-protobuf"}
    call(otlp_url(secured), method="POST", body=metrics_body(), headers=pb, token=secret)
    call(otlp_url(secured), method="POST", body=metrics_body(), headers=pb, token=TOKENS["reader"][0])
    call(sql_url(secured) + "?query=SELECT%201", token=secret)
    call(sql_url(secured) + "?query=SELECT%201", headers={"X-ClickHouse-Key": secret})
    call(otlp_url(secured, "/v1/sampling/m/s"), method="DELETE", token=TOKENS["agent"][0])
    text = caplog.text
    assert "refused" in text  # the refusals were logged ...
    for value in (secret, hash_token(secret), *(t for t, _ in TOKENS.values()), *(hash_token(t) for t, _ in TOKENS.values())):
        assert value not in text  # ... without any token or hash


def test_up_refuses_an_open_non_loopback_listener(tmp_path):
    with pytest.raises(ConfigError, match="collector.host = 0.0.0.0 is not a loopback address"):
        make_service(tmp_path, **{"collector.host": "0.0.0.0"})
    svc = make_service(tmp_path, **{"collector.host": "0.0.0.0", "auth.allow_unauthenticated": True})
    svc.stop()
    svc = make_service(tmp_path, **{"sql.host": "0.0.0.0", "auth.tokens_file": write_tokens(tmp_path / "t.toml")})
    try:
        assert call(f"http://127.0.0.1:{svc.sql.port}/?query=SELECT%201")[0] == 401
    finally:
        svc.stop()


def test_tokens_file_problems_are_reported_together(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[[tokens]]\nname = "a"\ntoken = "pl41n-s3cr3t"\nsha256 = "abc"\npermissions = ["ingest", "root"]\n'
        '[[tokens]]\nname = "a"\nsha256 = "' + "0" * 64 + '"\npermissions = []\n'
    )
    with pytest.raises(ConfigError) as err:
        TokenSet.from_file(bad)
    text = str(err.value)
    for needle in ("unknown keys token", "sha256 must be 64 hex digits", "unknown permissions root",
                   "name 'a' is used twice", "permissions must be a non-empty list"):
        assert needle in text
    assert "pl41n-s3cr3t" not in text
    with pytest.raises(ConfigError, match="cannot be read"):
        make_service(tmp_path, **{"auth.tokens_file": str(tmp_path / "missing.toml"), "sql.port": free_port()})


def test_yaml_tokens_file(tmp_path):
    path = tmp_path / "tokens.yaml"
    path.write_text(f"tokens:\n  - name: ci\n    sha256: {hash_token('ci-token')}\n    permissions: [read]\n")
    tokens = TokenSet.from_file(path)
    assert tokens.authenticate("ci-token").permissions == frozenset({"read"})
    assert tokens.authenticate("ci-token ") is None and "sha256" not in repr(tokens.authenticate("ci-token"))
