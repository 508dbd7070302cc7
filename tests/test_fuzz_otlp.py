"""Hostile input on the OTLP/HTTP receiver (property-based, hypothesis).

Random but well-formed OTLP messages (random names, deeply nested AnyValues,
NaN and infinities, timestamps at both ends of uint64, histograms whose
buckets disagree with their bounds), raw random bytes, truncated bodies,
random JSON, JSON of the right shape with the wrong types, deep nesting, huge
attribute maps. Whatever arrives, the receiver answers 200 or a 4xx with a
reason (never a 5xx), counts every refusal in ``/metrics``, and keeps serving.
Every test runs against the C decoding kernel and its pure-Python twin; the
example counts are small so the module takes seconds.
"""

from __future__ import annotations

import gzip
import json
import re
import urllib.error
import urllib.request

import pytest
from google.rpc import status_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue, KeyValueList

from conftest import make_service, otlp_url

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)

PB = "application/x-protobuf"
JSON = "application/json"
U64 = st.integers(0, 2**64 - 1)
ANY_FLOAT = st.floats(allow_nan=True, allow_infinity=True)


@pytest.fixture(scope="module", params=["native", "python"])
def svc(request, tmp_path_factory):
    service = make_service(tmp_path_factory.mktemp(request.param),
                           **{"collector.decoder": request.param, "collector.max_body_bytes": 4 * 1024 * 1024})
    yield service
    service.stop()


def post(svc, body: bytes, ctype: str = PB, path: str = "/v1/metrics", headers=None):
    req = urllib.request.Request(otlp_url(svc, path), data=body, method="POST",
                                 headers={"Content-Type": ctype, **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()


def rejects(svc) -> float:
    with urllib.request.urlopen(otlp_url(svc, "/metrics"), timeout=30) as resp:
        text = resp.read().decode()
    return sum(float(v) for v in re.findall(r'^stethoscope_rejects_total\{endpoint="otlp",[^}]*\} (\S+)$', text, re.M))


def check_answer(status: int, body: bytes, ctype: str) -> None:
    """200, or a 4xx whose body says why (google.rpc.Status or its JSON form)."""
    assert status == 200 or 400 <= status < 500, (status, body[:300])
    if status != 200:
        message = json.loads(body)["message"] if ctype == JSON else status_pb2.Status.FromString(body).message
        assert message.strip()


class Tally:
    """Counts 4xx answers so a test can compare them with the rejects counter."""

    def __init__(self, svc):
        self.svc, self.refused, self.accepted, self.before = svc, 0, 0, rejects(svc)

    def send(self, body: bytes, ctype: str = PB, path: str = "/v1/metrics", headers=None) -> int:
        status, resp = post(self.svc, body, ctype, path, headers)
        check_answer(status, resp, ctype)
        self.refused += status != 200
        self.accepted += status == 200
        return status

    def done(self) -> None:
        assert rejects(self.svc) - self.before == self.refused
        assert post(self.svc, b"")[0] == 200  # still serving


# --- strategies -------------------------------------------------------------------

_scalar = st.one_of(
    st.text(max_size=20).map(lambda s: AnyValue(string_value=s)),
    st.integers(-(2**63), 2**63 - 1).map(lambda i: AnyValue(int_value=i)),
    ANY_FLOAT.map(lambda f: AnyValue(double_value=f)),
    st.booleans().map(lambda b: AnyValue(bool_value=b)),
    st.binary(max_size=20).map(lambda b: AnyValue(bytes_value=b)),
    st.just(AnyValue()),
)


def _kv(pairs) -> list[KeyValue]:
    return [KeyValue(key=k, value=v) for k, v in pairs]


any_values = st.recursive(
    _scalar,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4).map(lambda xs: AnyValue(array_value=ArrayValue(values=xs))),
        st.lists(st.tuples(st.text(max_size=8), inner), max_size=4).map(
            lambda kvs: AnyValue(kvlist_value=KeyValueList(values=_kv(kvs)))),
    ),
    max_leaves=12,
)
attributes = st.lists(st.tuples(st.text(max_size=12), any_values), max_size=6).map(_kv)


@st.composite
def metrics_requests(draw) -> ExportMetricsServiceRequest:
    req = ExportMetricsServiceRequest()
    for _ in range(draw(st.integers(1, 2))):
        rm = req.resource_metrics.add()
        rm.resource.attributes.extend(draw(attributes))
        rm.schema_url = draw(st.text(max_size=10))
        sm = rm.scope_metrics.add()
        sm.scope.name = draw(st.text(max_size=10))
        sm.scope.attributes.extend(draw(attributes))
        for _ in range(draw(st.integers(0, 3))):
            m = sm.metrics.add()
            m.name, m.unit, m.description = draw(st.text(max_size=30)), draw(st.text(max_size=5)), draw(st.text(max_size=10))
            kind = draw(st.sampled_from(["gauge", "sum", "histogram", "exponential_histogram", "summary", "none"]))
            for _ in range(draw(st.integers(0, 3))):
                if kind == "none":
                    break
                dp = getattr(m, kind).data_points.add()
                dp.attributes.extend(draw(attributes))
                dp.start_time_unix_nano, dp.time_unix_nano = draw(U64), draw(U64)
                dp.flags = draw(st.integers(0, 2**32 - 1))
                if kind in ("gauge", "sum"):
                    if draw(st.booleans()):
                        dp.as_double = draw(ANY_FLOAT)
                    else:
                        dp.as_int = draw(st.integers(-(2**63), 2**63 - 1))
                    if kind == "sum":
                        m.sum.is_monotonic = draw(st.booleans())
                        m.sum.aggregation_temporality = draw(st.integers(-5, 5))
                    for _ in range(draw(st.integers(0, 2))):
                        ex = dp.exemplars.add()
                        ex.as_double = draw(ANY_FLOAT)
                        ex.trace_id = draw(st.binary(max_size=20))  # wrong lengths too
                        ex.span_id = draw(st.binary(max_size=10))
                        ex.filtered_attributes.extend(draw(attributes))
                elif kind == "histogram":
                    dp.count = draw(U64)
                    dp.bucket_counts.extend(draw(st.lists(U64, max_size=6)))  # may disagree with the bounds
                    dp.explicit_bounds.extend(draw(st.lists(ANY_FLOAT, max_size=6)))
                    for field in ("sum", "min", "max"):
                        if draw(st.booleans()):
                            setattr(dp, field, draw(ANY_FLOAT))
                elif kind == "exponential_histogram":
                    dp.count, dp.zero_count = draw(U64), draw(U64)
                    dp.scale = draw(st.integers(-(2**31), 2**31 - 1))
                    dp.positive.offset = draw(st.integers(-(2**31), 2**31 - 1))
                    dp.positive.bucket_counts.extend(draw(st.lists(U64, max_size=6)))
                    dp.negative.bucket_counts.extend(draw(st.lists(U64, max_size=3)))
                    if draw(st.booleans()):
                        dp.sum = draw(ANY_FLOAT)
                else:
                    dp.count, dp.sum = draw(U64), draw(ANY_FLOAT)
                    for _ in range(draw(st.integers(0, 3))):
                        q = dp.quantile_values.add()
                        q.quantile, q.value = draw(ANY_FLOAT), draw(ANY_FLOAT)
    return req


@st.composite
def logs_requests(draw) -> ExportLogsServiceRequest:
    req = ExportLogsServiceRequest()
    rl = req.resource_logs.add()
    rl.resource.attributes.extend(draw(attributes))
    sl = rl.scope_logs.add()
    for _ in range(draw(st.integers(0, 4))):
        rec = sl.log_records.add()
        rec.time_unix_nano, rec.observed_time_unix_nano = draw(U64), draw(U64)
        rec.severity_number = draw(st.integers(-(2**31), 2**31 - 1))
        rec.severity_text = draw(st.text(max_size=8))
        rec.body.CopyFrom(draw(any_values))
        rec.trace_id, rec.span_id = draw(st.binary(max_size=20)), draw(st.binary(max_size=10))
        rec.flags = draw(st.integers(0, 2**32 - 1))
        rec.event_name = draw(st.sampled_from(["", "stethoscope.sample", "stethoscope.label", "other"]))
        rec.attributes.extend(draw(attributes))
    return req


def _json_values():
    leaves = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=10))
    return st.recursive(leaves, lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)), max_leaves=15)


# --- the properties ---------------------------------------------------------------


def test_random_otlp_messages(svc):
    tally = Tally(svc)

    @FUZZ
    @given(metrics_requests(), logs_requests(), st.booleans())
    def run(metrics, logs, gz):
        for body, path in ((metrics.SerializeToString(), "/v1/metrics"), (logs.SerializeToString(), "/v1/logs")):
            headers = {"Content-Encoding": "gzip"} if gz else None
            tally.send(gzip.compress(body) if gz else body, path=path, headers=headers)

    run()
    tally.done()
    assert tally.accepted > tally.refused  # well-formed messages are mostly taken


def test_the_same_messages_as_json(svc):
    from google.protobuf import json_format

    tally = Tally(svc)

    @FUZZ
    @given(metrics_requests(), logs_requests())
    def run(metrics, logs):
        for msg, path in ((metrics, "/v1/metrics"), (logs, "/v1/logs")):
            doc = json_format.MessageToDict(msg)  # NaN and Infinity come out as the strings OTLP/JSON uses
            tally.send(json.dumps(doc).encode(), JSON, path)

    run()
    tally.done()


def test_raw_bytes_and_truncated_bodies(svc):
    tally = Tally(svc)

    @FUZZ
    @given(st.binary(max_size=3000), metrics_requests(), st.data())
    def run(raw, metrics, data):
        tally.send(raw)
        tally.send(raw, path="/v1/logs")
        whole = metrics.SerializeToString()
        cut = data.draw(st.integers(0, max(0, len(whole) - 1)))
        tally.send(whole[:cut])
        tally.send(gzip.compress(whole)[: data.draw(st.integers(0, 40))], headers={"Content-Encoding": "gzip"})

    run()
    tally.done()
    assert tally.refused > 0 and tally.accepted > 0


def test_random_json_and_wrong_types(svc):
    tally = Tally(svc)
    shapes = [
        lambda v: {"resourceMetrics": v},
        lambda v: {"resourceMetrics": [{"scopeMetrics": [{"metrics": [{"name": v, "gauge": {"dataPoints": [{}]}}]}]}]},
        lambda v: {"resourceMetrics": [{"scopeMetrics": [{"metrics": [{"name": "x", "sum": {"dataPoints": [
            {"asInt": v, "timeUnixNano": v, "attributes": [{"key": "k", "value": {"kvlistValue": v}}]}]}}]}]}]},
        lambda v: {"resourceMetrics": [{"scopeMetrics": [{"metrics": [{"name": "x", "histogram": {"dataPoints": [
            {"count": v, "bucketCounts": [v], "explicitBounds": v}]}}]}]}]},
        lambda v: {"resourceLogs": [{"scopeLogs": [{"logRecords": [{"body": v, "severityNumber": v, "traceId": v}]}]}]},
    ]

    @FUZZ
    @given(_json_values(), st.sampled_from(range(len(shapes))), st.sampled_from(["/v1/metrics", "/v1/logs"]))
    def run(value, shape, path):
        tally.send(json.dumps(value).encode(), JSON, path)
        tally.send(json.dumps(shapes[shape](value)).encode(), JSON, path)

    run()
    tally.done()


@pytest.mark.parametrize("text", ['"-5"', '"18446744073709551616"', '"NaN"', "1e400", '"0x10"', "-1"])
def test_negative_and_out_of_range_counts_in_json_are_400(svc, text):
    body = ('{"resourceMetrics": [{"scopeMetrics": [{"metrics": [{"name": "h", "histogram": {"dataPoints": '
            '[{"count": %s, "bucketCounts": [%s]}]}}]}]}]}' % (text, text)).encode()
    tally = Tally(svc)
    status = tally.send(body, JSON)
    assert status == 400
    tally.done()


def _nested_kvlist(depth: int) -> AnyValue:
    value = AnyValue(string_value="leaf")
    for _ in range(depth):
        value = AnyValue(kvlist_value=KeyValueList(values=[KeyValue(key="k", value=value)]))
    return value


def _gauge_with(attrs: list[KeyValue], name: str = "hostile") -> bytes:
    req = ExportMetricsServiceRequest()
    m = req.resource_metrics.add().scope_metrics.add().metrics.add()
    m.name = name
    dp = m.gauge.data_points.add()
    dp.as_double = 1.0
    dp.attributes.extend(attrs)
    return req.SerializeToString()


def test_deep_nesting(svc):
    tally = Tally(svc)
    assert tally.send(_gauge_with([KeyValue(key="d", value=_nested_kvlist(20))])) == 200
    # far beyond any decoder's nesting limit, hand-built so no serialiser refuses to write it
    inner = b"\x0a\x04leaf"  # AnyValue{string_value}
    for _ in range(5000):
        kv = b"\x0a\x01k" + b"\x12" + _varint(len(inner)) + inner  # KeyValue{key, value}
        kvl = b"\x0a" + _varint(len(kv)) + kv  # KeyValueList{values}
        inner = b"\x32" + _varint(len(kvl)) + kvl  # AnyValue{kvlist_value}
    attr = b"\x0a\x01d\x12" + _varint(len(inner)) + inner
    point = b"\x3a" + _varint(len(attr)) + attr  # NumberDataPoint{attributes = 7}
    gauge = b"\x0a" + _varint(len(point)) + point
    metric = b"\x0a\x01x" + b"\x2a" + _varint(len(gauge)) + gauge  # Metric{name, gauge = 5}
    scope = b"\x12" + _varint(len(metric)) + metric  # ScopeMetrics{metrics = 2}
    rm = b"\x12" + _varint(len(scope)) + scope  # ResourceMetrics{scope_metrics = 2}
    body = b"\x0a" + _varint(len(rm)) + rm
    assert tally.send(body) == 400
    deep_json = ("[" * 100_000 + "]" * 100_000).encode()
    assert tally.send(b'{"resourceMetrics": ' + deep_json + b"}", JSON) == 400
    tally.done()


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def test_huge_attribute_maps_and_oversized_bodies(svc):
    tally = Tally(svc)
    attrs = [KeyValue(key=f"k{i}", value=AnyValue(string_value="v" * 8)) for i in range(20_000)]
    assert tally.send(_gauge_with(attrs, "wide")) == 200
    assert tally.send(b"\x00" * (4 * 1024 * 1024 + 1)) == 413
    assert tally.send(gzip.compress(b"\x0a" * (5 * 1024 * 1024)), headers={"Content-Encoding": "gzip"}) == 413
    tally.done()


def test_extreme_values_are_stored_as_sent(svc):
    from conftest import sql

    req = ExportMetricsServiceRequest()
    m = req.resource_metrics.add().scope_metrics.add().metrics.add()
    m.name = "extreme.values"
    for value, ts in ((float("nan"), 0), (float("inf"), 2**63 - 1), (float("-inf"), 1), (-1e308, 2**64 - 1)):
        dp = m.gauge.data_points.add()
        dp.as_double, dp.time_unix_nano = value, ts
    assert post(svc, req.SerializeToString())[0] == 200
    got = sql(svc, "SELECT toString(Value) FROM otel_metrics_gauge WHERE MetricName = 'extreme.values' ORDER BY Value")
    assert sorted(got.split()) == sorted(["nan", "inf", "-inf", "-1e308"])


def test_5xx_warnings_are_throttled_under_floods():
    from stethoscope.exporters.otlp_http import _Throttle

    now = [0.0]
    throttle = _Throttle(10.0, clock=lambda: now[0])
    assert throttle.due("saturated") == 0  # the first one goes through
    assert [throttle.due("saturated") for _ in range(500)] == [None] * 500
    assert throttle.due("store_error") == 0  # each reason on its own
    now[0] = 10.0
    assert throttle.due("saturated") == 500  # then one line saying how many were held back
