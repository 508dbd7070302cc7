"""TLS (and mutual TLS) on every listener of ``up``, with a CA and certificates made here.

The certificates come from the ``openssl`` binary (the ``cryptography`` package
is not a dependency); the clients are the real ones: the OpenTelemetry OTLP
exporter, the agent's spool sender, the SDK's ``Delivery``, urllib and
``clickhouse-connect``.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import urllib.error
import urllib.request

import clickhouse_connect
import pytest
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, MetricExportResult
from opentelemetry.sdk.resources import Resource

from conftest import make_service
from stethoscope.agents.delivery import Sender
from stethoscope.agents.sdk.export import Delivery
from stethoscope.agents.spool import Spool
from stethoscope.errors import ConfigError
from test_auth import TOKENS, metrics_body, write_tokens

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="the openssl binary makes the test certificates")


def _openssl(*args: str, cwd) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server certificate for 127.0.0.1/localhost, a client certificate, and a stranger CA."""
    d = tmp_path_factory.mktemp("pki")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    ca_ext = ["-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"]
    for ca in ("ca", "stranger"):
        _openssl("req", "-x509", *ec, "-keyout", f"{ca}.key", "-out", f"{ca}.pem", "-days", "2",
                 "-subj", f"/CN=Stethoscope test {ca}", *ca_ext, cwd=d)
    (d / "server.ext").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"
    )
    (d / "client.ext").write_text(
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"
    )
    for leaf in ("server", "client"):
        _openssl("req", *ec, "-keyout", f"{leaf}.key", "-out", f"{leaf}.csr", "-subj", f"/CN={leaf}", cwd=d)
        _openssl("x509", "-req", "-in", f"{leaf}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{leaf}.pem", "-days", "2", "-extfile", f"{leaf}.ext", cwd=d)
    return {name: str(d / name) for name in ("ca.pem", "stranger.pem", "server.pem", "server.key", "client.pem", "client.key")}


@pytest.fixture
def tls_service(tmp_path, pki):
    svc = make_service(tmp_path, **{"tls.cert_file": pki["server.pem"], "tls.key_file": pki["server.key"]})
    yield svc
    svc.stop()


def https(svc, path="/v1/metrics", port=None) -> str:
    return f"https://127.0.0.1:{port or svc.otlp.port}{path}"


def get(url, context, data=None, headers=None):
    req = urllib.request.Request(url, data=data, headers=headers or {}, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=30, context=context) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()


def client_context(ca, cert=None, key=None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca)
    if cert:
        ctx.load_cert_chain(cert, key)
    return ctx


def count_sum(svc, ctx, name) -> str:
    query = f"SELECT sum(Value) FROM otel_metrics_sum WHERE MetricName = '{name}'".encode()
    status, body = get(https(svc, "/", svc.sql.port), ctx, data=query)
    assert status == 200, body
    return body.decode().strip()


def test_otel_exporter_over_tls(tls_service, pki, monkeypatch):
    # requests lets these variables override the exporter's certificate_file (see docs/security.md)
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    reader = InMemoryMetricReader()
    provider = MeterProvider(resource=Resource.create({"service.name": "tls"}), metric_readers=[reader])
    provider.get_meter("t").create_counter("tls.calls").add(7)
    data = reader.get_metrics_data()
    provider.shutdown()
    exporter = OTLPMetricExporter(endpoint=https(tls_service), certificate_file=pki["ca.pem"], timeout=10)
    try:
        assert exporter.export(data) is MetricExportResult.SUCCESS
    finally:
        exporter.shutdown()
    assert count_sum(tls_service, client_context(pki["ca.pem"]), "tls.calls") == "7"


def test_untrusted_and_plaintext_clients_are_refused(tls_service, pki):
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        get(https(tls_service, "/healthz"), client_context(pki["stranger.pem"]))
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        urllib.request.urlopen(f"http://127.0.0.1:{tls_service.otlp.port}/healthz", timeout=10)
    # TLS 1.0/1.1 clients cannot be built here without deprecation errors; the floor is in the context
    assert tls_service.otlp.tls.minimum_version == ssl.TLSVersion.TLSv1_2
    status, body = get(https(tls_service, "/metrics"), client_context(pki["ca.pem"]))
    assert status == 200 and 'stethoscope_rejects_total{endpoint="otlp",reason="tls_handshake"}' in body.decode()


def test_clickhouse_connect_over_tls(tls_service, pki):
    import urllib3

    # our own pool (verifying with the test CA): closing a pool clickhouse-connect built itself
    # trips over the urllib3 flavour installed here
    pool = urllib3.PoolManager(cert_reqs="CERT_REQUIRED", ca_certs=pki["ca.pem"])
    client = clickhouse_connect.get_client(host="127.0.0.1", port=tls_service.sql.port, secure=True, pool_mgr=pool)
    try:
        assert client.command("SELECT 40 + 2") == 42
    finally:
        client.close()
        pool.clear()
    stranger = urllib3.PoolManager(cert_reqs="CERT_REQUIRED", ca_certs=pki["stranger.pem"], retries=False)
    try:
        with pytest.raises(clickhouse_connect.driver.exceptions.OperationalError):
            clickhouse_connect.get_client(host="127.0.0.1", port=tls_service.sql.port, secure=True, pool_mgr=stranger)
    finally:
        stranger.clear()


def test_agent_sender_and_sdk_delivery_verify_with_a_ca_file(tls_service, pki, tmp_path):
    spool = Spool(tmp_path / "spool")
    spool.append(metrics_body(), weight=1)
    sender = Sender(spool, https(tls_service), ca_file=pki["ca.pem"], environ={})
    sender.start()
    assert sender.wait_drained(20)
    sender.shutdown()
    spool.close()
    # the standard variable works as well, as for the OTel exporter
    spool = Spool(tmp_path / "spool2")
    spool.append(metrics_body(), weight=1)
    sender = Sender(spool, https(tls_service), environ={"OTEL_EXPORTER_OTLP_CERTIFICATE": pki["ca.pem"]})
    sender.start()
    assert sender.wait_drained(20)
    sender.shutdown()
    spool.close()
    ctx = client_context(pki["ca.pem"])
    assert count_sum(tls_service, ctx, "auth.requests") == "6"

    from opentelemetry.sdk.metrics.export import Metric, NumberDataPoint, Sum, AggregationTemporality

    point = NumberDataPoint(attributes={}, start_time_unix_nano=1, time_unix_nano=2, value=5)
    metric = Metric("sdk.tls", None, "", Sum([point], AggregationTemporality.CUMULATIVE, True))
    delivery = Delivery(f"https://127.0.0.1:{tls_service.otlp.port}", Resource.create({"service.name": "m"}),
                        ca_file=pki["ca.pem"])
    try:
        assert delivery.export_metrics([metric])
    finally:
        delivery.shutdown()
    assert count_sum(tls_service, ctx, "sdk.tls") == "5"


def test_mutual_tls_with_tokens(tmp_path, pki):
    svc = make_service(tmp_path, **{
        "tls.cert_file": pki["server.pem"], "tls.key_file": pki["server.key"], "tls.client_ca_file": pki["ca.pem"],
        "auth.tokens_file": write_tokens(tmp_path / "tokens.toml"),
    })
    try:
        with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
            get(https(svc, "/healthz"), client_context(pki["ca.pem"]))  # no client certificate
        mtls = client_context(pki["ca.pem"], pki["client.pem"], pki["client.key"])
        assert get(https(svc, "/healthz"), mtls)[0] == 200
        pb = {"Content-Type": "application/x-protobuf"}
        assert get(https(svc), mtls, data=metrics_body(), headers=pb)[0] == 401  # TLS alone is not a token
        spool = Spool(tmp_path / "spool")
        spool.append(metrics_body(), weight=1)
        sender = Sender(spool, https(svc), token=TOKENS["agent"][0], ca_file=pki["ca.pem"],
                        client_cert_file=pki["client.pem"], client_key_file=pki["client.key"], environ={})
        sender.start()
        assert sender.wait_drained(20)
        sender.shutdown()
        spool.close()
        query = b"SELECT sum(Value) FROM otel_metrics_sum"
        assert get(https(svc, "/", svc.sql.port), mtls, data=query,
                   headers={"Authorization": f"Bearer {TOKENS['reader'][0]}"}) == (200, b"3\n")
    finally:
        svc.stop()


def test_a_slow_handshake_does_not_block_other_clients(tls_service, pki):
    idle = socket.create_connection(("127.0.0.1", tls_service.otlp.port))  # connects, never says hello
    try:
        assert get(https(tls_service, "/healthz"), client_context(pki["ca.pem"]))[0] == 200
    finally:
        idle.close()


def test_bad_tls_settings_are_config_errors(tmp_path, pki):
    with pytest.raises(ConfigError, match="must be set together"):
        make_service(tmp_path, **{"tls.cert_file": pki["server.pem"]})
    with pytest.raises(ConfigError, match="tls.key_file: .* is not a readable file"):
        make_service(tmp_path, **{"tls.cert_file": pki["server.pem"], "tls.key_file": str(tmp_path / "nope.key")})
    with pytest.raises(ConfigError, match="cannot load the certificate and key"):
        make_service(tmp_path, **{"tls.cert_file": pki["server.pem"], "tls.key_file": pki["client.key"]})
