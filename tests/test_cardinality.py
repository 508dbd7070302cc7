"""Per-metric cardinality limits with OpenTelemetry's overflow attribute."""

from __future__ import annotations

import doctest
import json
import urllib.request

import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

from conftest import make_service, otlp_url, sql
from stethoscope.errors import ConfigError, DecodeError
from stethoscope.exporters import cardinality
from stethoscope.exporters.cardinality import OVERFLOW_KEY, CardinalityLimiter
from stethoscope.exporters.selfmetrics import SelfMetrics


def request(name: str, users, *, kind: str = "sum", extra=None) -> ExportMetricsServiceRequest:
    req = ExportMetricsServiceRequest()
    rm = req.resource_metrics.add()
    kv = rm.resource.attributes.add()
    kv.key, kv.value.string_value = "service.name", "api"
    m = rm.scope_metrics.add().metrics.add()
    m.name = name
    for i, user in enumerate(users):
        dp = getattr(m, kind).data_points.add()
        dp.time_unix_nano = 1_700_000_000_000_000_000 + i
        if kind in ("sum", "gauge"):
            dp.as_int = 1
        else:
            dp.count, dp.sum = 1, 1.0
        for key, value in (("user", user), *(extra or ())):
            a = dp.attributes.add()
            a.key, a.value.string_value = key, value
    return req


def attr_sets(body: bytes) -> list[dict]:
    out = []
    for rm in ExportMetricsServiceRequest.FromString(body).resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                for dp in getattr(m, m.WhichOneof("data")).data_points:
                    out.append({a.key: getattr(a.value, a.value.WhichOneof("value")) for a in dp.attributes})
    return out


def test_doctests():
    assert doctest.testmod(cardinality).failed == 0


def test_limit_counts_the_overflow_series_and_keeps_known_sets():
    limiter = CardinalityLimiter(4)
    out = attr_sets(limiter.apply(request("m", [f"u{i}" for i in range(6)]).SerializeToString()))
    assert out[:3] == [{"user": "u0"}, {"user": "u1"}, {"user": "u2"}]
    assert out[3:] == [{OVERFLOW_KEY: True}] * 3  # limit 4 = 3 sets + the overflow series
    again = attr_sets(limiter.apply(request("m", ["u2", "u0", "u9"]).SerializeToString()))
    assert again == [{"user": "u2"}, {"user": "u0"}, {OVERFLOW_KEY: True}]
    assert limiter.overflowed_points == 4 and limiter.series == 3


def test_attribute_order_does_not_make_a_new_set_and_metrics_are_separate():
    limiter = CardinalityLimiter(2)
    a = request("m", ["u"], extra=[("region", "eu")])  # user, region
    reordered = request("m", [])  # region, user
    p = reordered.resource_metrics[0].scope_metrics[0].metrics[0].sum.data_points.add()
    for key, value in (("region", "eu"), ("user", "u")):
        kv = p.attributes.add()
        kv.key, kv.value.string_value = key, value
    limiter.apply(a.SerializeToString())
    body = reordered.SerializeToString()
    assert limiter.apply(body) is body  # same set in another order: nothing folded
    other = request("other", ["x", "y"]).SerializeToString()
    assert attr_sets(limiter.apply(other)) == [{"user": "x"}, {OVERFLOW_KEY: True}]


def test_window_forgets_and_memory_is_bounded():
    now = [0.0]
    metrics = SelfMetrics()
    limiter = CardinalityLimiter(2, window_s=60, max_metrics=2, metrics=metrics, clock=lambda: now[0])
    limiter.apply(request("a", ["1", "2"]).SerializeToString())
    limiter.apply(request("b", ["1"]).SerializeToString())
    body = request("c", [str(i) for i in range(50)]).SerializeToString()
    assert limiter.apply(body) is body and limiter.untracked_points == 50  # third name: not tracked
    now[0] = 61.0
    assert attr_sets(limiter.apply(request("a", ["2", "3"]).SerializeToString())) == [{"user": "2"}, {OVERFLOW_KEY: True}]
    text = metrics.exposition()[0].decode()
    assert "stethoscope_cardinality_overflow_points_total 2.0" in text
    assert "stethoscope_cardinality_untracked_points_total 50.0" in text
    assert "stethoscope_cardinality_series 1.0" in text


def test_histograms_and_existing_overflow_points():
    limiter = CardinalityLimiter(2)
    req = request("h", ["a", "b"], kind="histogram")
    dp = req.resource_metrics[0].scope_metrics[0].metrics[0].histogram.data_points.add()
    kv = dp.attributes.add()
    kv.key, kv.value.bool_value = OVERFLOW_KEY, True
    assert attr_sets(limiter.apply(req.SerializeToString())) == [{"user": "a"}, {OVERFLOW_KEY: True}, {OVERFLOW_KEY: True}]


def test_bad_input():
    with pytest.raises(DecodeError):
        CardinalityLimiter(10).apply(b"\x0a\xff\xff\xff\xff\x0f")
    with pytest.raises(ValueError):
        CardinalityLimiter(1)
    with pytest.raises(ConfigError, match="cardinality_limit"):
        from stethoscope.config import load_config

        load_config(environ={"STETHOSCOPE_COLLECTOR_CARDINALITY_LIMIT": "1"})


def _post(svc, body: bytes, ctype: str) -> int:
    req = urllib.request.Request(otlp_url(svc), data=body, method="POST", headers={"Content-Type": ctype})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return resp.status


@pytest.mark.parametrize("decoder", ["native", "python"])
def test_collector_folds_a_label_flood(tmp_path, decoder):
    from google.protobuf import json_format

    svc = make_service(tmp_path, **{"collector.cardinality_limit": 5, "collector.decoder": decoder})
    try:
        assert _post(svc, request("http.requests", [f"user-{i}" for i in range(20)]).SerializeToString(),
                     "application/x-protobuf") == 200
        flood = json_format.MessageToDict(request("http.requests", [f"user-{i}" for i in range(20, 30)]))
        assert _post(svc, json.dumps(flood).encode(), "application/json") == 200
        assert _post(svc, request("calm", ["a", "b"]).SerializeToString(), "application/x-protobuf") == 200
        rows = sql(svc, "SELECT Attributes, count(), sum(Value) FROM otel_metrics_sum "
                        "WHERE MetricName = 'http.requests' GROUP BY Attributes ORDER BY count()", "JSONCompactEachRow")
        groups = [json.loads(line) for line in rows.splitlines()]
        assert len(groups) == 5  # 4 user series + the overflow series
        assert groups[-1] == [{OVERFLOW_KEY: "true"}, 26, 26]  # 30 - 4 points folded; totals stay right
        assert sql(svc, "SELECT count() FROM otel_metrics_sum WHERE MetricName = 'calm'").strip() == "2"
        with urllib.request.urlopen(otlp_url(svc, "/metrics"), timeout=30) as resp:
            assert "stethoscope_cardinality_overflow_points_total 26.0" in resp.read().decode()
    finally:
        svc.stop()


def test_limit_off(tmp_path):
    svc = make_service(tmp_path, **{"collector.cardinality_limit": 0})
    try:
        assert svc.otlp.context["metrics_decoder"].limiter is None
        assert _post(svc, request("m", [str(i) for i in range(50)]).SerializeToString(), "application/x-protobuf") == 200
        assert sql(svc, "SELECT uniqExact(Attributes) FROM otel_metrics_sum").strip() == "50"
    finally:
        svc.stop()
