"""ModelMonitor: the public surface, the hot path's robustness, and what it exports."""

from __future__ import annotations

import logging
import threading

import numpy as np
import pytest
from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter
from opentelemetry.sdk.metrics.export import AggregationTemporality

import stethoscope.agents.sdk as sdk
from stethoscope.agents.sdk import InMemoryExporter, ModelMonitor, SamplingConfig
from stethoscope.agents.sdk.sketch import sketch_kernels
from stethoscope.errors import ConfigError


def _monitor(**kw) -> ModelMonitor:
    kw.setdefault("feature_names", ["a", "b", "c"])
    kw.setdefault("sampling", SamplingConfig(remote=False))
    return ModelMonitor("m", "1", start=False, metric_exporter=InMemoryExporter(),
                        log_exporter=kw.pop("logs", InMemoryLogRecordExporter()), **kw)


@pytest.fixture
def mon():
    m = _monitor()
    yield m
    m.close()


def test_every_public_name_is_exported():
    for name in sdk.__all__:
        assert getattr(sdk, name) is not None


def test_configuration_problems_are_reported_together():
    with pytest.raises(ConfigError) as exc:
        ModelMonitor("", endpoint="ftp://x", feature_names=["a", "a"], export_interval_s=0, buffer_rows=0,
                     latency_bounds_ms=[5, 1], sampling=SamplingConfig(target_rows_per_s=-1), start=False)
    assert len(exc.value.problems) == 7


BAD_CALLS = [
    (("not numbers", 1.0), {}, "wrong_type"),
    (({"a": 1}, 1.0), {}, "wrong_type"),
    ((None, 1.0), {}, "wrong_type"),
    ((np.array(["x", "y", "z"]), 1.0), {}, "wrong_type"),
    ((np.array([1, 2, None], dtype=object), 1.0), {}, "wrong_type"),
    (([1.0, 2.0], 1.0), {}, "wrong_shape"),
    ((np.ones((3, 1)), 1.0), {}, "wrong_shape"),
    ((np.float64(1.0), 1.0), {}, "wrong_shape"),
    ((np.array(2.0), 1.0), {}, "wrong_shape"),
    ((np.arange(4), 1.0), {}, "wrong_shape"),
    (((1.0, 2.0, 3.0, 4.0), 1.0), {}, "wrong_shape"),
    (([1.0, None, 3.0], 1.0), {}, "wrong_type"),
    (([1.0, "2", 3.0], 1.0), {}, "wrong_type"),
    ((iter([1.0, 2.0, 3.0]), 1.0), {}, "wrong_type"),
    (([1.0, 2.0, 3.0], object()), {}, "wrong_type"),
    (([1.0, 2.0, 3.0], [1, 2]), {}, "wrong_type"),
]


@pytest.mark.parametrize("args,kwargs,reason", BAD_CALLS)
def test_bad_rows_are_counted_and_dropped(mon, args, kwargs, reason):
    assert mon.record(*args, **kwargs) is False
    assert dict(mon.dropped) == {reason: 1}


def test_bad_values_are_left_out_but_the_row_is_kept(mon):
    assert mon.record([np.nan, np.inf, 1.0], float("inf"), confidence=1.5, latency_ms=-3) is True
    assert mon.record([1.0, 2.0, 3.0], 0.5, confidence="high", latency_ms="slow") is True
    assert mon.record([1.0, 2.0, 3.0], 0.5, confidence=[0.2, np.nan]) is True
    assert dict(mon.dropped) == {"nonfinite_feature": 2, "nonfinite_prediction": 1, "bad_confidence": 3,
                                 "bad_latency": 2}
    assert mon.flush()
    pts = {p.attributes["stethoscope.feature.name"]: p.count
           for p in mon.metric_exporter.points("stethoscope.model.feature")}
    assert pts == {"a": 2, "b": 2, "c": 3}
    assert sum(p.value for p in mon.metric_exporter.points("stethoscope.model.requests")) == 3


def test_bad_batches_never_raise(mon):
    assert mon.record_batch("junk", [1]) == 0
    assert mon.record_batch(np.ones((4, 2)), np.ones(4)) == 0
    assert mon.record_batch(np.ones(3), np.ones(3)) == 0
    assert mon.record_batch(np.ones((4, 3)), np.ones(5)) == 0
    assert mon.record_batch(np.ones((4, 3)), np.ones(4), confidences=np.ones(2), latencies_ms=["a"] * 4,
                            request_ids=[1, 2]) == 4
    X = np.ones((4, 3))
    X[0, 0] = np.nan
    assert mon.record_batch(X, [1.0, np.nan, 2.0, 3.0], latencies_ms=[1.0, -1.0, np.inf, 2.0]) == 4
    assert dict(mon.dropped) == {"wrong_type": 1, "wrong_shape": 4 + 1 + 4, "bad_confidence": 4, "bad_latency": 4 + 2,
                                 "bad_request_ids": 1, "nonfinite_feature": 1, "nonfinite_prediction": 1}


def test_calls_after_close_are_dropped_not_raised():
    m = _monitor()
    m.close()
    m.close()
    assert m.record([1.0, 2.0, 3.0], 1.0) is False
    assert m.record_batch(np.ones((2, 3)), np.ones(2)) == 0
    assert m.record_label("r", 1.0) is False
    assert m.flush() is False
    assert m.dropped["closed"] == 3


def test_the_hot_path_survives_internal_errors(mon, monkeypatch):
    monkeypatch.setattr(mon, "_keep", None)  # a bug on the sampled-row path
    mon.sampler.stream("default").set_probability(1.0)
    assert mon.record([1.0, 2.0, 3.0], 1.0) is False
    assert mon.record_batch(np.ones((2, 3)), np.ones(2)) == 0
    assert mon.dropped["internal_error"] == 2


def test_drop_logging_is_rate_limited(mon, caplog):
    with caplog.at_level(logging.WARNING, logger="stethoscope.agents.sdk"):
        for _ in range(1000):
            mon.record("bad", 1.0)
            mon.record([1.0], 1.0)
    assert len(caplog.records) == 2
    assert dict(mon.dropped) == {"wrong_type": 1000, "wrong_shape": 1000}


def test_feature_sketches_match_the_kernel_and_are_delta(mon):
    rng = np.random.default_rng(1)
    X = rng.normal(size=(500, 3)) * [1.0, 100.0, 1e-3]
    for row in X[:100]:
        mon.record(row, 0.5)
    mon.record_batch(X[100:], np.full(400, 0.5))
    assert mon.flush()
    k = sketch_kernels()
    want = k.state_type(3)
    k.update(X, want)
    metric = mon.metric_exporter.metrics("stethoscope.model.feature")[0]
    assert metric.data.aggregation_temporality == AggregationTemporality.DELTA
    for p in metric.data.data_points:
        b = want.buckets(p.attributes["stethoscope.feature.index"])
        assert (p.count, p.scale, p.zero_count, list(p.positive.bucket_counts), p.positive.offset) == (
            b.count, b.scale, b.zero_count, list(b.pos_counts), b.pos_offset)
        assert p.sum == pytest.approx(b.sum) and (p.min, p.max) == (b.min, b.max)
        assert p.attributes["stethoscope.model"] == "m" and p.attributes["stethoscope.model.version"] == "1"
    mon.metric_exporter.clear()
    mon.record([1.0, 1.0, 1.0], 0.5)
    assert mon.flush()
    pts = mon.metric_exporter.points("stethoscope.model.feature")
    assert [p.count for p in pts] == [1, 1, 1]  # the next window starts empty
    assert pts[0].start_time_unix_nano == metric.data.data_points[0].time_unix_nano  # windows tile


def test_outputs_latency_classes_errors_and_business(mon):
    mon2 = _monitor(cost_per_prediction=0.5, latency_bounds_ms=[1, 10, 100])
    try:
        mon2.record_batch(np.ones((4, 3)), ["cat", "dog", "cat", "cat"], confidences=[0.9, 0.8, 0.7, 0.6],
                          latencies_ms=[0.5, 1.0, 50.0, 500.0])
        mon2.record([1, 1, 1], "dog", confidence=[0.1, 0.9], latency_ms=5)
        mon2.error("timeout")
        mon2.error("timeout", 2)
        mon2.business("revenue", 1.25)
        mon2.business("revenue", -0.25)
        mon2.business("bad", float("nan"))
        mon2.error(3)
        assert mon2.flush()
        ex = mon2.metric_exporter
        assert {p.attributes["stethoscope.prediction.class"]: p.value
                for p in ex.points("stethoscope.model.prediction.class")} == {"cat": 3, "dog": 2}
        (lat,) = ex.points("stethoscope.model.latency")
        assert list(lat.bucket_counts) == [2, 1, 1, 1] and lat.count == 5 and lat.max == 500.0
        (conf,) = ex.points("stethoscope.model.confidence")
        assert conf.count == 5 and conf.max == 0.9
        assert not ex.points("stethoscope.model.prediction")  # labels only: no numeric distribution
        assert [p.value for p in ex.points("stethoscope.model.errors")] == [3]
        business = {p.attributes["stethoscope.business.name"]: p.value for p in ex.points("stethoscope.model.business")}
        assert business == {"revenue": 1.0, "cost": 2.5}
        assert not ex.metrics("stethoscope.model.business")[0].data.is_monotonic
        dropped = {p.attributes["stethoscope.reason"]: p.value for p in ex.points("stethoscope.sdk.dropped")}
        assert dropped == {"bad_business": 1, "bad_error_kind": 1}
    finally:
        mon2.close()


def test_feature_count_is_fixed_by_the_first_row():
    m = _monitor(feature_names=None)
    try:
        assert m.record([1.0, 2.0], 0.1)
        assert m.feature_names == ("f0", "f1")
        assert m.record([1.0, 2.0, 3.0], 0.1) is False
        assert m.record_batch(np.ones((3, 2)), np.ones(3)) == 3
    finally:
        m.close()


def test_sampled_rows_follow_contract_b():
    logs = InMemoryLogRecordExporter()
    m = _monitor(logs=logs, sampling=SamplingConfig(fixed_probability=1.0, remote=False))
    try:
        m.record(np.array([1.0, 2.0, 3.0]), 0.7, confidence=0.7, latency_ms=3.0, request_id=42, stream="eu",
                 customer="acme", tags=["x"], weird=object())
        m.record_label("42", "fraud")
        m.record_label(None, 1.0)
        assert m.flush()
        sample, label = [r.log_record for r in logs.get_finished_logs()]
        assert sample.event_name == "stethoscope.sample" and label.event_name == "stethoscope.label"
        a = dict(sample.attributes)
        assert a["stethoscope.model"] == "m" and a["stethoscope.model.version"] == "1"
        assert a["stethoscope.stream"] == "eu" and a["stethoscope.request_id"] == "42"
        assert list(a["stethoscope.features"]) == [1.0, 2.0, 3.0]
        assert list(a["stethoscope.feature_names"]) == ["a", "b", "c"]
        assert a["stethoscope.prediction"] == 0.7 and a["stethoscope.confidence"] == 0.7
        assert a["stethoscope.adjusted_count"] == 1.0 and a["stethoscope.sampling.threshold"] == "0"
        assert "stethoscope.uncertainty" not in a
        assert a["customer"] == "acme" and list(a["tags"]) == ["x"] and a["weird"].startswith("<object")
        assert sample.timestamp > 0
        assert dict(label.attributes) == {"stethoscope.model": "m", "stethoscope.model.version": "1",
                                          "stethoscope.request_id": "42", "stethoscope.label": "fraud"}
        assert m.dropped["bad_label"] == 1
    finally:
        m.close()


def test_pending_rows_are_bounded():
    m = _monitor(sampling=SamplingConfig(fixed_probability=1.0, remote=False), max_pending_rows=10)
    try:
        m.record_batch(np.ones((25, 3)), np.ones(25))
        assert m.dropped["row_queue_full"] == 15
    finally:
        m.close()


def test_many_threads_record_without_losing_counts():
    m = _monitor(buffer_rows=64)
    try:
        def work():
            for i in range(2000):
                m.record([float(i), 1.0, 2.0], 0.1)

        threads = [threading.Thread(target=work) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert m.flush()
        assert [p.count for p in m.metric_exporter.points("stethoscope.model.feature")] == [16_000] * 3
        assert m.sampler.stream("default").events == 16_000
    finally:
        m.close()


def test_background_thread_exports_on_its_own():
    ex = InMemoryExporter()
    m = ModelMonitor("bg", feature_names=1, export_interval_s=0.05, metric_exporter=ex,
                     log_exporter=InMemoryLogRecordExporter(), sampling=SamplingConfig(remote=False))
    try:
        m.record([1.0], 1.0)
        deadline = 0
        import time

        deadline = time.monotonic() + 5
        while not ex.points("stethoscope.model.feature") and time.monotonic() < deadline:
            time.sleep(0.02)
        assert ex.points("stethoscope.model.feature")
    finally:
        m.close()


def test_spool_dir_delivers_durably(tmp_path):
    from conftest import free_port

    m = ModelMonitor("sp", feature_names=1, start=False, endpoint=f"http://127.0.0.1:{free_port()}",
                     spool_dir=tmp_path / "spool", sampling=SamplingConfig(remote=False, fixed_probability=1.0),
                     timeout_s=1)
    m.record([1.0], 1.0)
    assert m.flush(timeout_s=0.5) is False  # nobody listening: it stays on disk
    m.close(timeout_s=0.1)
    assert any((tmp_path / "spool" / "metrics").iterdir()) and any((tmp_path / "spool" / "logs").iterdir())


def test_the_kernels_in_use_follow_the_parametrisation(kernel_implementation):
    from stethoscope.agents.sdk.consistent import sampling_kernel
    from stethoscope.agents.sdk.sketch import sketch_kernels

    twin = kernel_implementation == "python"
    assert (sketch_kernels().module == "stethoscope.native.sketch") is twin
    assert (sampling_kernel().__name__ == "stethoscope.native.sampling") is twin


def test_single_rows_and_batches_give_the_same_exports(kernel_implementation):
    """record() row by row (lists, arrays, tuples) exports what record_batch() does for the same data."""
    rng = np.random.default_rng(7)
    X = rng.normal(size=(300, 3)) * [1.0, 1e4, 1e-4]
    X[::17, 1] = np.nan
    preds, conf, lat = rng.random(300), rng.random(300), rng.random(300) * 300
    single, batch = _monitor(latency_bounds_ms=[1, 10, 100]), _monitor(latency_bounds_ms=[1, 10, 100])
    try:
        for i, row in enumerate(X):
            features = [row.tolist(), row, tuple(row.tolist()), np.repeat(row, 2)[::2]][i % 4]  # the last one strided
            assert single.record(features, float(preds[i]), confidence=float(conf[i]), latency_ms=float(lat[i]))
        assert batch.record_batch(X, preds, confidences=conf, latencies_ms=lat) == 300
        assert dict(single.dropped) == dict(batch.dropped) == {"nonfinite_feature": 18}
        assert single.flush() and batch.flush()

        def exported(m):
            ex = m.metric_exporter
            feats = {p.attributes["stethoscope.feature.name"]: (
                p.count, p.scale, p.zero_count, p.positive.offset, list(p.positive.bucket_counts),
                p.negative.offset, list(p.negative.bucket_counts), p.min, p.max)
                for p in ex.points("stethoscope.model.feature")}
            outs = [(p.count, p.scale, list(p.positive.bucket_counts), p.min, p.max)
                    for name in ("prediction", "confidence") for p in ex.points(f"stethoscope.model.{name}")]
            (latency,) = ex.points("stethoscope.model.latency")
            requests = sum(p.value for p in ex.points("stethoscope.model.requests"))
            return feats, outs, (latency.count, list(latency.bucket_counts), latency.min, latency.max), requests

        assert exported(single) == exported(batch)
        assert exported(single)[3] == 300
        assert single.sampler.stream("default").m_n == 300  # the sampler saw every prediction's signal
    finally:
        single.close()
        batch.close()


def test_single_rows_are_sampled_consistently_by_request_id(kernel_implementation):
    from stethoscope.agents.sdk.consistent import randomness, threshold_for

    logs = InMemoryLogRecordExporter()
    m = _monitor(logs=logs, sampling=SamplingConfig(fixed_probability=0.25, remote=False))
    try:
        ids = [f"user-{i}" for i in range(400)]
        for i, rid in enumerate(ids):
            assert m.record(np.array([float(i), 1.0, 2.0]), 0.5, request_id=rid, stream="eu")
        assert m.flush()
        t = threshold_for(0.25)
        want = {rid for rid in ids if randomness(rid) >= t}
        rows = [dict(r.log_record.attributes) for r in logs.get_finished_logs()]
        assert {a["stethoscope.request_id"] for a in rows} == want
        assert all(a["stethoscope.adjusted_count"] == 4.0 and a["stethoscope.stream"] == "eu" for a in rows)
        st = m.sampler.stream("eu")
        assert (st.events, st.kept, st.expected) == (400, len(want), pytest.approx(100.0))
        sampled = {p.attributes["stethoscope.stream"]: p.value
                   for p in m.metric_exporter.points("stethoscope.model.sampled")}
        assert sampled == {"eu": len(want)}
    finally:
        m.close()


def test_uncertain_single_rows_are_boosted_with_honest_weights(kernel_implementation):
    from stethoscope.agents.sdk import UncertaintyConfig

    logs = InMemoryLogRecordExporter()
    unc = UncertaintyConfig(min_uncertainty=0.5, boost=8.0)
    m = _monitor(logs=logs, sampling=SamplingConfig(fixed_probability=0.05, remote=False, uncertainty=unc))
    try:
        for i in range(2000):
            m.record([1.0, 2.0, 3.0], 1.0, confidence=0.1 if i % 2 else 0.9, request_id=f"r{i}")
        assert m.flush()
        rows = [dict(r.log_record.attributes) for r in logs.get_finished_logs()]
        flagged = [a for a in rows if a.get("stethoscope.uncertainty")]
        plain = [a for a in rows if not a.get("stethoscope.uncertainty")]
        assert all(a["stethoscope.confidence"] == 0.1 for a in flagged)
        assert all(a["stethoscope.confidence"] == 0.9 for a in plain)
        # boosted p = 0.05 * (1 + 7 * 0.9) = 0.365: weights are 1/p_eff, so the estimates stay unbiased
        assert [a["stethoscope.adjusted_count"] for a in flagged] == pytest.approx([1 / 0.365] * len(flagged))
        assert [a["stethoscope.adjusted_count"] for a in plain] == pytest.approx([20.0] * len(plain))
        assert 250 < len(flagged) < 480 and len(plain) < 90
        assert len(m.labeling_queue) + m.labeling_queue.evicted == len(flagged)  # queued for labeling
    finally:
        m.close()


def test_exports_during_single_row_records_lose_nothing(kernel_implementation):
    """Windows swapped while threads record: every row lands in exactly one exported window."""
    m = _monitor()
    stop = threading.Event()

    def exporter():
        while not stop.wait(0.002):
            m.flush()

    def work(k):
        for i in range(1000):
            m.record([float(i), float(k), 1.0] if i % 2 else np.array([float(i), float(k), 1.0]), 0.5,
                     latency_ms=1.0, request_id=f"{k}-{i}")

    flusher = threading.Thread(target=exporter)
    flusher.start()
    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    flusher.join()
    try:
        assert m.flush()
        ex = m.metric_exporter
        assert len(ex.points("stethoscope.model.requests")) > 1  # several windows were exported meanwhile
        assert sum(p.count for p in ex.points("stethoscope.model.feature")) == 3 * 4000
        assert sum(p.count for p in ex.points("stethoscope.model.prediction")) == 4000
        assert sum(p.count for p in ex.points("stethoscope.model.latency")) == 4000
        assert sum(p.value for p in ex.points("stethoscope.model.requests")) == 4000
        assert m.sampler.stream("default").events == 4000
    finally:
        m.close()
