"""Sampled model rows and labels: OTLP log records routed into ``samples`` and ``labels``."""

from __future__ import annotations

import array
import json
import math
import urllib.error
import urllib.request

import pytest
from google.protobuf import json_format
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.logs.v1 import logs_pb2

from conftest import otlp_url, sql
from stethoscope.exporters.otlp import decode_logs
from stethoscope.exporters.samples import REJECT_REASONS

T0 = 1_718_000_000_123_456_789


def any_value(v) -> common_pb2.AnyValue:
    if isinstance(v, bool):
        return common_pb2.AnyValue(bool_value=v)
    if isinstance(v, int):
        return common_pb2.AnyValue(int_value=v)
    if isinstance(v, float):
        return common_pb2.AnyValue(double_value=v)
    if isinstance(v, str):
        return common_pb2.AnyValue(string_value=v)
    if isinstance(v, list):
        return common_pb2.AnyValue(array_value=common_pb2.ArrayValue(values=[any_value(x) for x in v]))
    raise TypeError(v)


def record(event: str | None, attrs: dict, *, ts: int = T0, body: str = "", as_attribute: bool = False) -> logs_pb2.LogRecord:
    rec = logs_pb2.LogRecord(time_unix_nano=ts)
    if body:
        rec.body.string_value = body
    if event and as_attribute:
        rec.attributes.add(key="event.name", value=any_value(event))
    elif event:
        rec.event_name = event
    for k, v in attrs.items():
        rec.attributes.add(key=k, value=any_value(v))
    return rec


def sample(model="fraud", request_id="r1", features=(0.1, 2.5, -3.0), **extra) -> dict:
    attrs = {
        "stethoscope.model": model,
        "stethoscope.request_id": request_id,
        "stethoscope.features": None if features is None else list(features),
        "stethoscope.adjusted_count": 10.0,
    }
    attrs.update(extra)
    return {k: v for k, v in attrs.items() if v is not None}


def request(*records, service="scorer", resource=None) -> logs_service_pb2.ExportLogsServiceRequest:
    req = logs_service_pb2.ExportLogsServiceRequest()
    rl = req.resource_logs.add()
    rl.resource.attributes.add(key="service.name", value=any_value(service))
    for k, v in (resource or {}).items():
        rl.resource.attributes.add(key=k, value=any_value(v))
    rl.scope_logs.add().log_records.extend(records)
    return req


def post(svc, body: bytes, ctype: str = "application/x-protobuf"):
    req = urllib.request.Request(otlp_url(svc, "/v1/logs"), data=body, method="POST", headers={"Content-Type": ctype})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()


def rows(svc, query: str) -> list[dict]:
    return [json.loads(line) for line in sql(svc, query, "JSONEachRow").splitlines()]


def f32(values) -> list[float]:
    return list(array.array("f", values))


# --------------------------------------------------------------------------
# Through a running collector


def test_samples_land_typed_in_the_samples_table(service):
    req = request(
        record("stethoscope.sample", sample(
            request_id="r1",
            features=[0.1, 2.5, -3.0, 1e-8],
            **{
                "stethoscope.feature_names": ["amount", "age", "delta", "tiny"],
                "stethoscope.model.version": "v7",
                "stethoscope.stream": "eu",
                "stethoscope.prediction": 0.87,
                "stethoscope.confidence": 0.6,
                "stethoscope.adjusted_count": 250.0,
                "stethoscope.sampling.threshold": "fc",
                "stethoscope.uncertainty": True,
                "tenant": "acme",
                "retries": 2,
            },
        )),
        record("stethoscope.sample", sample(request_id="r2", features=[1.0, 2.0], **{"stethoscope.prediction": "fraud"}), ts=T0 + 1),
        resource={"host.name": "gpu-3"},
    )
    status, body = post(service, req.SerializeToString())
    assert (status, body) == (200, b"")  # nothing rejected: no partial_success
    got = rows(service, "SELECT toString(toUnixTimestamp64Nano(Timestamp)) AS ts, ServiceName, Model, ModelVersion, Stream, "
               "RequestId, arrayMap(x -> toFloat64(x), Features) AS feats, FeatureNames, Prediction, PredictionLabel, "
               "Confidence, isNaN(Prediction) AS pnan, isNaN(Confidence) AS cnan, AdjustedCount, SamplingThreshold, "
               "Uncertain, Attributes, ResourceAttributes['host.name'] AS host, toTypeName(Features) AS ftype "
               "FROM samples ORDER BY RequestId")
    assert len(got) == 2
    first, second = got
    assert int(first["ts"]) == T0 and int(second["ts"]) == T0 + 1
    assert (first["ServiceName"], first["Model"], first["ModelVersion"], first["Stream"], first["RequestId"]) == (
        "scorer", "fraud", "v7", "eu", "r1")
    assert first["ftype"] == "Array(Float32)"
    assert first["feats"] == f32([0.1, 2.5, -3.0, 1e-8])  # exactly the Float32 rounding of what was sent
    assert first["FeatureNames"] == ["amount", "age", "delta", "tiny"]
    assert (first["Prediction"], first["PredictionLabel"], first["Confidence"], first["AdjustedCount"]) == (0.87, "", 0.6, 250)
    assert (first["SamplingThreshold"], first["Uncertain"]) == ("fc", True)
    assert first["Attributes"] == {"retries": "2", "tenant": "acme"}  # contract keys are columns, not attributes
    assert first["host"] == "gpu-3"
    # defaults: version "", stream "default", confidence NaN, class label with NaN prediction
    assert (second["ModelVersion"], second["Stream"], second["FeatureNames"], second["Uncertain"]) == ("", "default", [], False)
    assert second["PredictionLabel"] == "fraud"
    assert (first["pnan"], first["cnan"], second["pnan"], second["cnan"]) == (0, 0, 1, 1)
    assert sql(service, "SELECT count() FROM otel_logs").strip() == "0"


def test_labels_join_samples_by_request_id(service):
    req = request(
        record("stethoscope.sample", sample(request_id="a", **{"stethoscope.prediction": 0.9, "stethoscope.adjusted_count": 4.0})),
        record("stethoscope.sample", sample(request_id="b", **{"stethoscope.prediction": 0.2, "stethoscope.adjusted_count": 4.0})),
        record("stethoscope.sample", sample(request_id="c", **{"stethoscope.prediction": "cat"})),
    )
    assert post(service, req.SerializeToString())[0] == 200
    labels = request(
        record("stethoscope.label", {"stethoscope.model": "fraud", "stethoscope.request_id": "a", "stethoscope.label": 1.0,
                                     "stethoscope.model.version": "v7", "source": "chargeback"}, ts=T0 + 86_400 * 10**9),
        record("stethoscope.label", {"stethoscope.model": "fraud", "stethoscope.request_id": "b", "stethoscope.label": 0}),
        record("stethoscope.label", {"stethoscope.model": "fraud", "stethoscope.request_id": "c", "stethoscope.label": "dog"}),
        service="labeller",
    )
    assert post(service, labels.SerializeToString())[0] == 200
    joined = rows(service, """
        SELECT s.RequestId AS id, toString(s.Prediction) AS p, s.PredictionLabel AS pl, toString(l.Label) AS y,
               l.LabelText AS yt, l.ServiceName AS svc, l.Attributes AS attrs, s.AdjustedCount AS w
        FROM samples AS s INNER JOIN labels AS l ON s.Model = l.Model AND s.RequestId = l.RequestId
        ORDER BY id""")
    assert [(r["id"], r["p"], r["pl"], r["y"], r["yt"]) for r in joined] == [
        ("a", "0.9", "", "1", ""), ("b", "0.2", "", "0", ""), ("c", "nan", "cat", "nan", "dog")]
    assert {r["svc"] for r in joined} == {"labeller"}
    assert joined[0]["attrs"] == {"source": "chargeback", "stethoscope.model.version": "v7"}  # not a labels column
    # the weighted error estimate analytics computes: sum(w * |p - y|) / sum(w)
    err = sql(service, "SELECT sum(s.AdjustedCount * abs(s.Prediction - l.Label)) / sum(s.AdjustedCount) FROM samples s "
              "JOIN labels l USING (Model, RequestId) WHERE l.LabelText = ''")
    assert float(err) == pytest.approx((4 * 0.1 + 4 * 0.2) / 8)


def test_mixed_request_routes_each_record_and_reports_partial_success(service):
    req = request(
        record(None, {"model": "fraud"}, body="plain log line"),
        record("some.other.event", {}, body="another event"),
        record("stethoscope.sample", sample(request_id="ok-1")),
        record("stethoscope.sample", sample(request_id="ok-2"), as_attribute=True),
        record("stethoscope.label", {"stethoscope.model": "fraud", "stethoscope.request_id": "ok-1", "stethoscope.label": 1.0}),
        record("stethoscope.sample", sample(model=None)),
        record("stethoscope.sample", sample(features=[1.0, "x"])),
        record("stethoscope.sample", sample(**{"stethoscope.adjusted_count": 0.5})),
        record("stethoscope.label", {"stethoscope.model": "fraud", "stethoscope.label": 1.0}),
    )
    status, body = post(service, req.SerializeToString())
    assert status == 200
    resp = logs_service_pb2.ExportLogsServiceResponse.FromString(body)
    assert resp.partial_success.rejected_log_records == 4
    msg = resp.partial_success.error_message
    for reason in ("missing_model", "bad_features", "bad_adjusted_count", "missing_request_id"):
        assert reason in msg
    assert "stethoscope.features[1] must be a number" in msg
    assert sql(service, "SELECT Body, EventName FROM otel_logs ORDER BY Body").splitlines() == [
        "another event\tsome.other.event", "plain log line\t"]
    assert sql(service, "SELECT RequestId FROM samples ORDER BY RequestId").split() == ["ok-1", "ok-2"]
    assert sql(service, "SELECT RequestId FROM labels").split() == ["ok-1"]
    assert service.rejected_records.counts() == {
        "missing_model": 1, "bad_features": 1, "bad_adjusted_count": 1, "missing_request_id": 1}
    with urllib.request.urlopen(otlp_url(service, "/metrics"), timeout=10) as r:
        text = r.read().decode()
    assert 'stethoscope_points_received_total{signal="samples"} 2.0' in text
    assert 'stethoscope_points_received_total{signal="labels"} 1.0' in text
    assert 'stethoscope_points_received_total{signal="logs"} 2.0' in text


def test_a_request_of_only_invalid_records_still_succeeds(service):
    req = request(record("stethoscope.sample", sample(features=None)), record("stethoscope.sample", sample(features=None)))
    status, body = post(service, req.SerializeToString())
    assert status == 200
    resp = logs_service_pb2.ExportLogsServiceResponse.FromString(body)
    assert resp.partial_success.rejected_log_records == 2
    assert resp.partial_success.error_message.startswith("2 sample/label records rejected: missing_features: 2")
    assert sql(service, "SELECT (SELECT count() FROM samples) + (SELECT count() FROM otel_logs)").strip() == "0"


def test_json_body_with_partial_success(service):
    req = request(
        record("stethoscope.sample", sample(request_id="j1", features=[0.5, 1.5], **{"stethoscope.confidence": 0.75})),
        record("stethoscope.sample", sample(**{"stethoscope.adjusted_count": float("nan")})),
        record("stethoscope.label", {"stethoscope.model": "fraud", "stethoscope.request_id": "j1", "stethoscope.label": 1}),
    )
    doc = json_format.MessageToDict(req)
    assert doc["resourceLogs"][0]["scopeLogs"][0]["logRecords"][0]["eventName"] == "stethoscope.sample"
    status, body = post(service, json.dumps(doc).encode(), "application/json")
    assert status == 200
    answer = json.loads(body)
    assert answer["partialSuccess"]["rejectedLogRecords"] in ("1", 1)
    assert "bad_adjusted_count" in answer["partialSuccess"]["errorMessage"]
    got = rows(service, "SELECT arrayMap(x -> toFloat64(x), Features) AS Features, Confidence, AdjustedCount FROM samples")
    assert got == [{"Features": [0.5, 1.5], "Confidence": 0.75, "AdjustedCount": 10}]
    assert sql(service, "SELECT Label FROM labels WHERE RequestId = 'j1'").strip() == "1"


@pytest.mark.parametrize("use_event_name", [True, False], ids=["event_name", "event.name attribute"])
def test_official_sdk_exporter(service, use_event_name):
    from opentelemetry._logs import LogRecord
    from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
    from opentelemetry.sdk._logs import LoggerProvider
    from opentelemetry.sdk._logs.export import SimpleLogRecordProcessor
    from opentelemetry.sdk.resources import Resource

    provider = LoggerProvider(resource=Resource.create({"service.name": "ranker"}))
    provider.add_log_record_processor(SimpleLogRecordProcessor(OTLPLogExporter(endpoint=otlp_url(service, "/v1/logs"))))
    features = [0.1 * i for i in range(200)]  # over 127 elements: multi-byte lengths
    attrs = {
        "stethoscope.model": "ranker-v2",
        "stethoscope.stream": "search",
        "stethoscope.request_id": "q-17",
        "stethoscope.features": features,
        "stethoscope.prediction": 3.25,
        "stethoscope.adjusted_count": 1.0,
        "stethoscope.uncertainty": False,
    }
    event = "stethoscope.sample" if use_event_name else None
    if not use_event_name:
        attrs["event.name"] = "stethoscope.sample"
    try:
        logger = provider.get_logger("stethoscope.sdk")
        logger.emit(LogRecord(timestamp=T0, event_name=event, attributes=attrs))
        logger.emit(LogRecord(timestamp=T0, event_name="stethoscope.label", attributes={
            "stethoscope.model": "ranker-v2", "stethoscope.request_id": "q-17", "stethoscope.label": 4}))
        logger.emit(LogRecord(timestamp=T0, body="an ordinary log record"))
    finally:
        provider.shutdown()
    got = rows(service, "SELECT ServiceName, Stream, arrayMap(x -> toFloat64(x), Features) AS Features, Prediction, "
               "AdjustedCount, Uncertain, Attributes, toString(toUnixTimestamp64Nano(Timestamp)) AS ts FROM samples")
    assert len(got) == 1
    row = got[0]
    assert (row["ServiceName"], row["Stream"], row["Prediction"], row["AdjustedCount"], row["Uncertain"]) == (
        "ranker", "search", 3.25, 1, False)
    assert row["Features"] == f32(features)
    assert row["Attributes"] == {}  # event.name is the marker, not an attribute
    assert int(row["ts"]) == T0
    assert sql(service, "SELECT Label FROM labels").strip() == "4"
    assert sql(service, "SELECT Body FROM otel_logs").strip() == "an ordinary log record"


# --------------------------------------------------------------------------
# The decoder alone


def only_part(decoded, table: str) -> tuple[int, bytes]:
    return next((n, data) for t, n, data in decoded.parts if t == table)


@pytest.mark.parametrize(
    ("attrs", "reason"),
    [
        (sample(model=None), "missing_model"),
        (sample(model=""), "missing_model"),
        (sample(model=3), "bad_model"),
        (sample(features=None), "missing_features"),
        (sample(**{"stethoscope.features": "1,2,3"}), "bad_features"),
        (sample(features=[1.0, True]), "bad_features"),
        (sample(features=[1.0, [2.0]]), "bad_features"),
        (sample(**{"stethoscope.feature_names": ["a"]}), "bad_feature_names"),
        (sample(**{"stethoscope.feature_names": ["a", "b", 3]}), "bad_feature_names"),
        (sample(**{"stethoscope.feature_names": "a,b,c"}), "bad_feature_names"),
        (sample(**{"stethoscope.prediction": [1.0]}), "bad_prediction"),
        (sample(**{"stethoscope.prediction": True}), "bad_prediction"),
        (sample(**{"stethoscope.confidence": "high"}), "bad_confidence"),
        (sample(**{"stethoscope.adjusted_count": None}), "missing_adjusted_count"),
        (sample(**{"stethoscope.adjusted_count": 0.99}), "bad_adjusted_count"),
        (sample(**{"stethoscope.adjusted_count": float("nan")}), "bad_adjusted_count"),
        (sample(**{"stethoscope.adjusted_count": float("inf")}), "bad_adjusted_count"),
        (sample(**{"stethoscope.adjusted_count": "10"}), "bad_adjusted_count"),
        (sample(**{"stethoscope.sampling.threshold": "xyz"}), "bad_sampling_threshold"),
        (sample(**{"stethoscope.sampling.threshold": "0" * 15}), "bad_sampling_threshold"),
        (sample(**{"stethoscope.uncertainty": "yes"}), "bad_uncertainty"),
        (sample(**{"stethoscope.stream": 5}), "bad_stream"),
        (sample(**{"stethoscope.model.version": 2.0}), "bad_model_version"),
        (sample(request_id=7), "bad_request_id"),
    ],
)
def test_each_contract_violation_has_its_reason(attrs, reason):
    assert reason in REJECT_REASONS
    good = record("stethoscope.sample", sample(request_id="fine"))
    decoded = decode_logs(request(good, record("stethoscope.sample", attrs)).SerializeToString())
    assert decoded.rejected == {reason: 1}
    assert decoded.samples == 1 and decoded.logs == 0
    assert reason in decoded.rejected_message


@pytest.mark.parametrize(
    ("attrs", "reason"),
    [
        ({"stethoscope.request_id": "r", "stethoscope.label": 1.0}, "missing_model"),
        ({"stethoscope.model": "m", "stethoscope.label": 1.0}, "missing_request_id"),
        ({"stethoscope.model": "m", "stethoscope.request_id": "", "stethoscope.label": 1.0}, "missing_request_id"),
        ({"stethoscope.model": "m", "stethoscope.request_id": "r"}, "missing_label"),
        ({"stethoscope.model": "m", "stethoscope.request_id": "r", "stethoscope.label": [1.0]}, "bad_label"),
    ],
)
def test_each_label_violation_has_its_reason(attrs, reason):
    decoded = decode_logs(request(record("stethoscope.label", attrs)).SerializeToString())
    assert decoded.rejected == {reason: 1} and decoded.parts == []


def test_a_record_without_any_time_is_rejected_but_observed_time_will_do():
    rec = record("stethoscope.sample", sample(), ts=0)
    observed = record("stethoscope.sample", sample(), ts=0)
    observed.observed_time_unix_nano = T0
    too_late = record("stethoscope.sample", sample(), ts=1 << 63)
    decoded = decode_logs(request(rec, observed, too_late).SerializeToString())
    assert decoded.rejected == {"missing_timestamp": 1, "bad_timestamp": 1} and decoded.samples == 1


def test_features_fast_and_slow_paths_agree():
    """Doubles take the bulk path; integers, mixed arrays and huge values the checked one."""
    from stethoscope.exporters.samples import _features

    cases = [
        [0.0, -0.0, 1.5, float("nan"), float("inf")],
        [1, 2, 3],  # integers
        [1.0, 2, 3.5],  # mixed
        [1e300, -1e300],  # beyond Float32: infinities, as a ClickHouse cast gives
        [],
        [0.25] * 1000,
    ]
    for values in cases:
        n, data = _features(any_value([float(x) for x in values]))
        n2, data2 = _features(any_value(values))
        assert n == n2 == len(values)
        assert data == data2 == array.array("f", [float(x) for x in values]).tobytes()
    _, data = _features(any_value([1e300]))
    assert math.isinf(array.array("f", data)[0])


def test_other_log_records_are_encoded_exactly_as_before():
    """Ordinary records keep the otel_logs encoding, whatever else shares the request."""
    plain = record(None, {"a": "b"}, body="hello")
    alone = decode_logs(request(plain).SerializeToString())
    mixed = decode_logs(request(record("stethoscope.sample", sample()), plain).SerializeToString())
    assert alone.parts == [("otel_logs", 1, only_part(mixed, "otel_logs")[1])]
    assert only_part(mixed, "samples")[0] == 1


def test_rejected_sample_records_are_counted_in_prometheus(service):
    from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest

    req = ExportLogsServiceRequest()
    rec = req.resource_logs.add().scope_logs.add().log_records.add()
    rec.event_name = "stethoscope.sample"  # no model, no features: breaks the contract
    rec.time_unix_nano = 1_700_000_000_000_000_000
    body = req.SerializeToString()
    http = urllib.request.Request(otlp_url(service, "/v1/logs"), data=body, method="POST",
                                  headers={"Content-Type": "application/x-protobuf"})
    with urllib.request.urlopen(http, timeout=30) as resp:
        assert resp.status == 200
    with urllib.request.urlopen(otlp_url(service, "/metrics"), timeout=10) as resp:
        text = resp.read().decode()
    assert 'stethoscope_samples_rejected_total{reason="missing_model"} 1.0' in text
