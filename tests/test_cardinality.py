"""Per-metric cardinality limits with OpenTelemetry's overflow attribute."""

from __future__ import annotations

import doctest
import json
import threading
import urllib.request

import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

from conftest import make_service, otlp_url, sql
from stethoscope.errors import ConfigError, DecodeError
from stethoscope.exporters import cardinality
from stethoscope.exporters.cardinality import OVERFLOW_KEY, CardinalityLimiter
from stethoscope.exporters.selfmetrics import SelfMetrics
from stethoscope.native import implementation


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


def folded(req: ExportMetricsServiceRequest, points) -> ExportMetricsServiceRequest:
    """A copy of ``req`` whose data points number ``points`` (counted across metrics) carry the overflow set."""
    out = ExportMetricsServiceRequest()
    out.CopyFrom(req)
    i = 0
    for rm in out.resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                for dp in getattr(m, m.WhichOneof("data")).data_points:
                    if i in points:
                        del dp.attributes[:]
                        kv = dp.attributes.add()
                        kv.key, kv.value.bool_value = OVERFLOW_KEY, True
                    i += 1
    return out


def plain(req: ExportMetricsServiceRequest, impl: str) -> dict:
    """What the encoder makes of ``req`` without a limit."""
    return implementation(impl).encode_metrics(req.SerializeToString())


IMPLS = pytest.mark.parametrize("impl", ["native", "python"])


def test_doctests():
    assert doctest.testmod(cardinality).failed == 0


@IMPLS
def test_limit_counts_the_overflow_series_and_keeps_known_sets(impl):
    limiter = CardinalityLimiter(4)
    first = request("m", [f"u{i}" for i in range(6)])
    assert limiter.encode(first.SerializeToString(), impl) == plain(folded(first, {3, 4, 5}), impl)
    again = request("m", ["u2", "u0", "u9"])
    assert limiter.encode(again.SerializeToString(), impl) == plain(folded(again, {2}), impl)
    assert limiter.overflowed_points == 4 and limiter.series == 3  # limit 4 = 3 sets + the overflow series


@IMPLS
def test_attribute_order_and_repeated_keys_do_not_make_a_new_set_and_metrics_are_separate(impl):
    limiter = CardinalityLimiter(2)
    a = request("m", ["u"], extra=[("region", "eu")])  # user, region
    reordered = request("m", [])  # region, user, user again (the first value wins)
    p = reordered.resource_metrics[0].scope_metrics[0].metrics[0].sum.data_points.add()
    for key, value in (("region", "eu"), ("user", "u"), ("user", "other")):
        kv = p.attributes.add()
        kv.key, kv.value.string_value = key, value
    limiter.encode(a.SerializeToString(), impl)
    assert limiter.encode(reordered.SerializeToString(), impl) == plain(reordered, impl)  # nothing folded
    other = request("other", ["x", "y"])
    assert limiter.encode(other.SerializeToString(), impl) == plain(folded(other, {1}), impl)
    assert limiter.overflowed_points == 1 and limiter.series == 2


@IMPLS
def test_window_forgets_and_memory_is_bounded(impl, caplog):
    now = [0.0]
    metrics = SelfMetrics()
    limiter = CardinalityLimiter(2, window_s=60, max_metrics=2, metrics=metrics, clock=lambda: now[0])
    limiter.encode(request("a", ["1", "2"]).SerializeToString(), impl)
    limiter.encode(request("a", ["3"]).SerializeToString(), impl)
    limiter.encode(request("b", ["1"]).SerializeToString(), impl)
    third = request("c", [str(i) for i in range(50)])
    assert limiter.encode(third.SerializeToString(), impl) == plain(third, impl)  # third name: not tracked
    assert limiter.untracked_points == 50
    assert [r.getMessage().split()[1] for r in caplog.records] == ["'a'"]  # once per metric and window
    now[0] = 61.0
    again = request("a", ["2", "3"])
    assert limiter.encode(again.SerializeToString(), impl) == plain(folded(again, {1}), impl)
    assert len(caplog.records) == 2  # a new window warns again
    text = metrics.exposition()[0].decode()
    assert "stethoscope_cardinality_overflow_points_total 3.0" in text
    assert "stethoscope_cardinality_untracked_points_total 50.0" in text
    assert "stethoscope_cardinality_series 1.0" in text


@IMPLS
def test_histograms_and_existing_overflow_points(impl):
    limiter = CardinalityLimiter(2)
    req = request("h", ["a", "b"], kind="histogram")
    points = req.resource_metrics[0].scope_metrics[0].metrics[0].histogram.data_points
    kv = points.add().attributes.add()
    kv.key, kv.value.bool_value = OVERFLOW_KEY, True  # an SDK's overflow series: passes, takes no room
    kv = points.add().attributes.add()
    kv.key, kv.value.string_value = OVERFLOW_KEY, "id-1"  # not the overflow series: an ordinary set
    assert limiter.encode(req.SerializeToString(), impl) == plain(folded(req, {1, 2, 3}), impl)
    assert limiter.overflowed_points == 2 and limiter.series == 1


@IMPLS
@pytest.mark.parametrize("users", [
    [f"user-{i}-" + "x" * 40 for i in range(6)],  # every map longer than the overflow map: rewritten in place
    ["a", "user-1-" + "x" * 40, "b", "c" * 30, "d", "e"],  # some shorter: rewritten through a copy
])
def test_folded_rows_whatever_the_length_of_the_maps_they_replace(impl, users):
    limiter = CardinalityLimiter(3)
    first, second = request("m", users), request("other", ["o"])
    assert limiter.encode(first.SerializeToString(), impl) == plain(folded(first, {2, 3, 4, 5}), impl)
    assert limiter.encode(second.SerializeToString(), impl) == plain(second, impl)


def test_threads_share_one_limit():
    limiter = CardinalityLimiter(50)
    bodies = [request("m", [f"t{t}-u{i}" for i in range(300)]).SerializeToString() for t in range(8)]
    results: list[dict] = []

    def work(body):
        results.append(limiter.encode(body, "native"))

    threads = [threading.Thread(target=work, args=(b,)) for b in bodies]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    overflow_rows = sum(r["sum"][1].count(OVERFLOW_KEY.encode()) for r in results)
    assert limiter.series == 49 and limiter.overflowed_points == overflow_rows == 8 * 300 - 49


def test_bad_input():
    with pytest.raises(DecodeError):
        CardinalityLimiter(10).encode(b"\x0a\xff\xff\xff\xff\x0f")
    with pytest.raises(ValueError, match="2 or more"):
        CardinalityLimiter(1)
    with pytest.raises(ValueError, match="max_metrics"):
        CardinalityLimiter(10, max_metrics=0)
    for impl in ("native", "python"):
        with pytest.raises(TypeError, match="CardinalityState"):
            implementation(impl).encode_metrics(b"", object())
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


def test_a_stale_kernel_without_the_limit_is_a_configuration_error(monkeypatch):
    import types

    from stethoscope.exporters import otlp

    stale = types.ModuleType("stethoscope._native")
    stale.encode_metrics = implementation("native").encode_metrics  # the encoder alone, as built before
    monkeypatch.setattr(otlp, "implementation", lambda impl: stale)
    with pytest.raises(ConfigError, match="rebuild"):
        otlp.MetricsDecoder("native", limiter=CardinalityLimiter())
    assert otlp.MetricsDecoder("native").implementation == "stethoscope._native"  # fine without a limit


def test_limit_on_by_default(tmp_path):
    svc = make_service(tmp_path)
    try:
        limiter = svc.otlp.context["metrics_decoder"].limiter
        assert limiter is not None and limiter.limit == 2000 == cardinality.DEFAULT_LIMIT
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
