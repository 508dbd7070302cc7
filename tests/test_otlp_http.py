"""The OTLP/HTTP receiver, driven by the official OpenTelemetry SDK exporters."""

from __future__ import annotations

import gzip
import json
import urllib.error
import urllib.request

import pytest
from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.metrics.v1 import metrics_pb2
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import SimpleLogRecordProcessor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource

from conftest import make_service, otlp_url, sql


@pytest.fixture
def service(tmp_path, decoder):
    """Here every test runs twice: with the C decoding kernel and with its Python twin."""
    svc = make_service(tmp_path, **{"collector.decoder": decoder})
    yield svc
    svc.stop()


def post(url: str, body: bytes, ctype: str = "application/x-protobuf", headers=None):
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": ctype, **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read(), dict(exc.headers)


def sdk_export(svc, fill) -> None:
    reader = PeriodicExportingMetricReader(
        OTLPMetricExporter(endpoint=otlp_url(svc)), export_interval_millis=3_600_000
    )
    provider = MeterProvider(
        resource=Resource.create({"service.name": "trainer", "host.name": "node-7"}), metric_readers=[reader]
    )
    fill(provider.get_meter("test.scope", "1.2"))
    provider.shutdown()  # collects and exports exactly once


def test_sdk_metrics_land_in_every_metric_table(service):
    def fill(meter):
        meter.create_counter("tokens", unit="{token}").add(512, {"rank": 3})
        meter.create_histogram("step.time", unit="s").record(0.25, {"rank": 3})
        meter.create_up_down_counter("queue.depth").add(-2)
        meter.create_gauge("gpu.temperature", unit="Cel").set(71.5, {"gpu.index": 0, "throttled": False})

    sdk_export(service, fill)
    gauge = json.loads(sql(service, "SELECT ServiceName, ScopeName, ScopeVersion, MetricUnit, Attributes, Value, "
                       "ResourceAttributes['host.name'] AS host FROM otel_metrics_gauge", "JSONEachRow"))
    assert gauge["ServiceName"] == "trainer" and gauge["host"] == "node-7"
    assert (gauge["ScopeName"], gauge["ScopeVersion"], gauge["MetricUnit"]) == ("test.scope", "1.2", "Cel")
    assert gauge["Attributes"] == {"gpu.index": "0", "throttled": "false"}
    assert gauge["Value"] == 71.5
    sums = sql(service, "SELECT MetricName, Value, IsMonotonic, AggregationTemporality FROM otel_metrics_sum ORDER BY MetricName")
    assert sums.splitlines() == ["queue.depth\t-2\tfalse\t2", "tokens\t512\ttrue\t2"]
    hist = json.loads(sql(service, "SELECT Count, Sum, Min, Max, length(BucketCounts) = length(ExplicitBounds) + 1 AS ok "
                      "FROM otel_metrics_histogram", "JSONEachRow"))
    assert hist == {"Count": 1, "Sum": 0.25, "Min": 0.25, "Max": 0.25, "ok": 1}


def test_sdk_logs_land_in_otel_logs(service):
    from opentelemetry._logs import LogRecord, SeverityNumber

    provider = LoggerProvider(resource=Resource.create({"service.name": "server"}))
    provider.add_log_record_processor(SimpleLogRecordProcessor(OTLPLogExporter(endpoint=otlp_url(service, "/v1/logs"))))
    try:
        provider.get_logger("test.logs").emit(
            LogRecord(
                severity_text="WARN",
                severity_number=SeverityNumber.WARN,
                body="prediction drift on model-a",
                attributes={"model": "model-a"},
            )
        )
    finally:
        provider.shutdown()
    row = json.loads(sql(service, "SELECT ServiceName, SeverityText, SeverityNumber, Body, LogAttributes['model'] AS m, "
                     "TimestampTime > now() - 600 AS recent FROM otel_logs", "JSONEachRow"))
    assert row == {"ServiceName": "server", "SeverityText": "WARN", "SeverityNumber": 13,
                   "Body": "prediction drift on model-a", "m": "model-a", "recent": 1}


def _request(points: int = 3) -> bytes:
    req = ExportMetricsServiceRequest()
    rm = req.resource_metrics.add()
    m = rm.scope_metrics.add().metrics.add()
    m.name = "x"
    for i in range(points):
        dp = m.gauge.data_points.add()
        dp.time_unix_nano = 1_700_000_000_000_000_000 + i
        dp.as_double = float(i)
        ex = dp.exemplars.add()
        ex.trace_id = bytes(range(16))
        ex.span_id = bytes(range(8))
    return req.SerializeToString()


def test_json_body_with_hex_ids_and_gzip(service):
    body = {
        "resourceMetrics": [{
            "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "svc"}}]},
            "scopeMetrics": [{"metrics": [{
                "name": "latency", "unit": "ms",
                "gauge": {"dataPoints": [{
                    "timeUnixNano": "1700000000000000001", "asInt": "42",
                    "attributes": [{"key": "model", "value": {"stringValue": "m1"}}],
                    "exemplars": [{"asDouble": 1.5, "traceId": "5b8efff798038103d269b633813fc60c", "spanId": "eee19b7ec3c1b174"}],
                }]},
            }]}],
        }]
    }
    status, resp, headers = post(otlp_url(service), gzip.compress(json.dumps(body).encode()), "application/json",
                                 {"Content-Encoding": "gzip"})
    assert status == 200 and json.loads(resp) == {}
    assert headers["Content-Type"] == "application/json"
    row = sql(service, "SELECT ServiceName, Value, Exemplars.TraceId[1], Exemplars.SpanId[1], toUnixTimestamp64Nano(TimeUnix) "
              "FROM otel_metrics_gauge WHERE MetricName = 'latency'")
    assert row.split() == ["svc", "42", "5b8efff798038103d269b633813fc60c", "eee19b7ec3c1b174", "1700000000000000001"]


@pytest.mark.parametrize(
    ("body", "ctype", "headers", "status", "reason", "needle"),
    [
        (b"\x0a\xff\xff\xff\xff\x0f", "application/x-protobuf", {}, 400, "malformed", "invalid"),
        (b"{not json", "application/json", {}, 400, "malformed", "not valid JSON"),
        (b'{"resourceMetrics": 3}', "application/json", {}, 400, "malformed", "resourceMetrics"),
        (b'{"resourceMetrics": [{"scopeMetrics": [{"metrics": [{"gauge": {"dataPoints": [{"exemplars": [{"traceId": "zz"}]}]}}]}]}]}',
         "application/json", {}, 400, "malformed", "hex"),
        (_request(), "text/plain", {}, 415, "content_type", "Content-Type"),
        (b"not gzip at all", "application/x-protobuf", {"Content-Encoding": "gzip"}, 400, "bad_encoding", "gzip"),
        (_request(), "application/x-protobuf", {"Content-Encoding": "br"}, 415, "bad_encoding", "br"),
    ],
)
def test_bad_requests_get_a_reason_and_are_counted(service, body, ctype, headers, status, reason, needle):
    before = service.metrics.rejects.labels(endpoint="otlp", reason=reason)._value.get()
    got, resp, _ = post(otlp_url(service), body, ctype, headers)
    assert got == status
    assert needle.encode() in resp
    assert service.metrics.rejects.labels(endpoint="otlp", reason=reason)._value.get() == before + 1
    assert sql(service, "SELECT count() FROM otel_metrics_gauge").strip() == "0"


def test_body_over_the_limit_is_refused_before_reading(tmp_path):
    svc = make_service(tmp_path, **{"collector.max_body_bytes": 1000})
    try:
        status, resp, _ = post(otlp_url(svc), _request(200))
        assert status == 413 and b"exceeds the limit of 1000 bytes" in resp
        bomb = gzip.compress(b"\x00" * 100_000)  # small on the wire, big inflated
        status, resp, _ = post(otlp_url(svc), bomb, headers={"Content-Encoding": "gzip"})
        assert status == 413 and b"decompressed body exceeds" in resp
        status, _, _ = post(otlp_url(svc), _request(3))
        assert status == 200
    finally:
        svc.stop()


def test_protobuf_error_body_is_a_google_rpc_status(service):
    from google.rpc import status_pb2

    status, resp, headers = post(otlp_url(service), b"\x0a\x05abc")
    assert status == 400 and headers["Content-Type"] == "application/x-protobuf"
    st = status_pb2.Status.FromString(resp)
    assert st.code == 3 and "invalid OTLP metrics protobuf" in st.message


def test_unknown_path_and_get(service):
    assert post(otlp_url(service, "/v1/traces"), _request())[0] == 404
    with urllib.request.urlopen(otlp_url(service, "/healthz"), timeout=10) as resp:
        assert json.loads(resp.read())["status"] == "ok"


def test_self_metrics_count_points_and_rows(service):
    assert post(otlp_url(service), _request(5))[0] == 200
    with urllib.request.urlopen(otlp_url(service, "/metrics"), timeout=10) as resp:
        text = resp.read().decode()
    assert 'stethoscope_points_received_total{signal="metrics"} 5.0' in text
    assert 'stethoscope_rows_written_total{table="otel_metrics_gauge"} 5.0' in text
    assert 'stethoscope_batches_total{outcome="ok",table="otel_metrics_gauge"} 1.0' in text
    assert "stethoscope_insert_duration_seconds_count" in text
    assert "stethoscope_queue_rows 0.0" in text


def test_a_request_sent_again_under_its_idempotency_key_is_stored_once(service):
    body = _request(4)
    key = {"Idempotency-Key": "0123abcd:5-9"}
    assert post(otlp_url(service), body, headers=key)[:2] == (200, b"")
    assert post(otlp_url(service), body, headers=key)[:2] == (200, b"")  # answered, not stored
    assert post(otlp_url(service), body, headers={"Idempotency-Key": "0123abcd:10-12"})[0] == 200
    assert post(otlp_url(service), body)[0] == 200  # no key: every request is new data
    assert sql(service, "SELECT count() FROM otel_metrics_gauge").strip() == "12"
    # JSON answers a replay in kind, and a logs key is not a metrics key
    assert post(otlp_url(service), b"{}", "application/json", key)[:2] == (200, b"{}")
    status, resp, _ = post(otlp_url(service, "/v1/logs"), b"", headers=key)
    assert status == 200
    with urllib.request.urlopen(otlp_url(service, "/metrics"), timeout=10) as r:
        text = r.read().decode()
    assert "stethoscope_duplicate_requests_total 2.0" in text  # the protobuf and the JSON replay
    assert 'stethoscope_points_received_total{signal="metrics"} 12.0' in text


def test_an_empty_request_is_fine(service):
    status, resp, _ = post(otlp_url(service), b"")
    assert status == 200 and resp == b""


def test_concurrent_requests_are_all_stored(service):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda _: post(otlp_url(service), _request(100))[0], range(40)))
    assert statuses == [200] * 40
    assert sql(service, "SELECT count() FROM otel_metrics_gauge").strip() == "4000"


def test_metric_without_data_is_skipped(service):
    req = ExportMetricsServiceRequest()
    req.resource_metrics.add().scope_metrics.add().metrics.add(name="empty")
    m = req.resource_metrics[0].scope_metrics[0].metrics.add(name="s")
    m.summary.data_points.add(count=2, sum=3.0).quantile_values.add(quantile=0.5, value=1.5)
    assert post(otlp_url(service), req.SerializeToString())[0] == 200
    assert sql(service, "SELECT MetricName, Count, ValueAtQuantiles.Value FROM otel_metrics_summary").split() == ["s", "2", "[1.5]"]
    assert metrics_pb2.Metric.DESCRIPTOR.fields_by_name["summary"].number == 11
