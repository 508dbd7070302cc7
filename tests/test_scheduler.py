"""The drift scheduler: windows of ``samples`` in, findings out (run_once with explicit times)."""

from __future__ import annotations

import json
import logging
import time

import numpy as np
import pytest
from conftest import make_service, sql
from stethoscope.analytics.scheduler import DriftScheduler

from stethoscope.errors import ConfigError, StoreError

NOW = 1_718_000_000.0
HOUR = 3600.0
COLUMNS = ["Timestamp", "Model", "ModelVersion", "Stream", "Features", "FeatureNames", "Confidence", "AdjustedCount",
           "RequestId", "Prediction", "PredictionLabel"]


def put(store, start: float, end: float, n: int, *, seed: int, shift: float = 0.0, model: str = "fraud",
        version: str = "3", stream: str = "default", conf=(20, 2), d: int = 3, ids=None, predictions=None) -> None:
    """``n`` sampled rows spread over ``[start, end)``; feature ``age`` is shifted by ``shift``.

    ``ids``: request ids (default none); ``predictions``: numbers (``Prediction``) or
    strings (``PredictionLabel``), default 0.0 for every row.
    """
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(n, d))
    feats[:, 1] += shift
    confidence = rng.beta(*conf, n) if conf else np.full(n, np.nan)
    lines = []
    for i, t in enumerate(np.linspace(start, end, n, endpoint=False)):
        row = {
            "Timestamp": f"{t:.3f}", "Model": model, "ModelVersion": version, "Stream": stream,
            "Features": feats[i].tolist(), "FeatureNames": ["amount", "age", "hour"][:d],
            "Confidence": "nan" if np.isnan(confidence[i]) else float(confidence[i]),  # NaN: none sent
            "AdjustedCount": 10.0, "RequestId": "" if ids is None else str(ids[i]),
        }
        if predictions is not None:
            p = predictions[i]
            if isinstance(p, str):
                row["PredictionLabel"], row["Prediction"] = p, "nan"
            else:
                row["Prediction"] = float(p)
        lines.append(json.dumps(row))
    store.insert("samples", COLUMNS, ("\n".join(lines) + "\n").encode(), fmt="JSONEachRow")


def put_labels(store, ids, labels, *, t: float = NOW, model: str = "fraud") -> None:
    """Ground truth for ``ids``: numbers go to ``Label``, strings to ``LabelText``."""
    lines = []
    for rid, y in zip(ids, labels):
        row = {"Timestamp": f"{t:.3f}", "Model": model, "RequestId": str(rid)}
        if isinstance(y, str):
            row.update(LabelText=y, Label="nan")
        else:
            row["Label"] = float(y)
        lines.append(json.dumps(row))
    store.insert("labels", ["Timestamp", "Model", "RequestId", "Label", "LabelText"],
                 ("\n".join(lines) + "\n").encode(), fmt="JSONEachRow")


def by_kind(findings, kind):
    return [f for f in findings if f.kind == kind]


def test_identical_distributions_give_no_drifted_feature(store):
    put(store, NOW - 2 * HOUR, NOW - HOUR, 600, seed=1)
    put(store, NOW - HOUR, NOW, 600, seed=2)
    found = DriftScheduler(store).run_once(NOW)
    features = by_kind(found, "feature_drift")
    assert [f.feature for f in features] == ["amount", "age", "hour"]
    assert not any(f.drifted for f in features) and {f.severity for f in features} == {"info"}
    (summary,) = by_kind(found, "dataset_drift")
    assert not summary.drifted and summary.details["n_current"] == 600 and summary.details["n_reference"] == 600
    assert (summary.window_start, summary.window_end) == (NOW - HOUR, NOW)


def test_a_shifted_feature_gives_a_warning_naming_it(store):
    put(store, NOW - 2 * HOUR, NOW - HOUR, 600, seed=1)
    put(store, NOW - HOUR, NOW, 600, seed=2, shift=1.0)
    found = DriftScheduler(store).run_once(NOW)
    drifted = [f for f in by_kind(found, "feature_drift") if f.drifted]
    assert [f.feature for f in drifted] == ["age"]
    (age,) = drifted
    assert age.severity == "warning" and age.p_value < 1e-6 and age.effect > 0.2 and age.method == "ks"
    assert age.subject == "model=fraud version=3 stream=default feature=age"
    assert age.labels == {"stream": "default"}


def test_confidence_cv_finding(store):
    put(store, NOW - 2 * HOUR, NOW - HOUR, 300, seed=1)
    put(store, NOW - HOUR, NOW, 300, seed=2, conf=(2, 2))  # confidences spread out
    (cv,) = by_kind(DriftScheduler(store).run_once(NOW), "confidence_cv")
    assert cv.drifted and cv.severity == "warning" and cv.statistic > 0.2
    assert cv.details["cv_reference"] < 0.2


def test_no_confidences_no_confidence_finding(store):
    put(store, NOW - 2 * HOUR, NOW - HOUR, 300, seed=1, conf=None)
    put(store, NOW - HOUR, NOW, 300, seed=2, conf=None)
    assert by_kind(DriftScheduler(store).run_once(NOW), "confidence_cv") == []


def test_too_few_rows_gives_an_insufficient_data_finding(store):
    put(store, NOW - 2 * HOUR, NOW - HOUR, 50, seed=1)
    put(store, NOW - HOUR, NOW, 300, seed=2)
    (only,) = DriftScheduler(store, min_rows=200).run_once(NOW)
    assert (only.kind, only.method, only.severity, only.drifted) == ("dataset_drift", "insufficient_data", "info", False)
    assert only.details["reason"] == "insufficient data" and only.details["n_reference"] == 50


def test_first_reference_and_streams_are_separate(store):
    put(store, NOW - 5 * HOUR, NOW - 4 * HOUR, 300, seed=1)  # the first hour of version 3
    put(store, NOW - 2 * HOUR, NOW - HOUR, 300, seed=3, shift=1.0)  # "previous" would see no change
    put(store, NOW - HOUR, NOW, 300, seed=2, shift=1.0)
    put(store, NOW - HOUR, NOW, 300, seed=4, stream="eu")  # no reference at all
    found = DriftScheduler(store, reference="first").run_once(NOW)
    default = [f for f in found if f.labels["stream"] == "default"]
    assert [f.feature for f in by_kind(default, "feature_drift") if f.drifted] == ["age"]
    (summary,) = by_kind(default, "dataset_drift")
    assert summary.details["reference_start"] == NOW - 5 * HOUR
    (eu,) = [f for f in found if f.labels["stream"] == "eu"]
    assert eu.method == "insufficient_data" and eu.details["n_reference"] == 0


def test_rows_of_another_width_are_left_out_and_counted(store):
    put(store, NOW - 2 * HOUR, NOW - HOUR, 300, seed=1)
    put(store, NOW - HOUR, NOW - HOUR / 2, 300, seed=2)
    put(store, NOW - HOUR / 2, NOW, 10, seed=5, d=2)
    (summary,) = by_kind(DriftScheduler(store).run_once(NOW), "dataset_drift")
    assert summary.details["n_current"] == 300 and summary.details["dropped_rows"]["current"] == 10


def test_settings_are_checked_together(store):
    with pytest.raises(ConfigError) as info:
        DriftScheduler(store, interval_s=0, reference="last", min_rows=1)
    assert len(info.value.problems) == 3


class _Broken:
    def query(self, *a, **k):
        raise StoreError("store is down")


def test_the_thread_survives_errors_and_stops_promptly(caplog):
    sched = DriftScheduler(_Broken(), interval_s=0.01)
    with caplog.at_level(logging.WARNING, logger="stethoscope.analytics.scheduler"):
        sched.start()
        deadline = time.monotonic() + 10
        while sched.errors.get("StoreError", 0) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        t0 = time.monotonic()
        sched.stop()
    assert time.monotonic() - t0 < 2
    assert sched.errors["StoreError"] >= 3
    assert len([r for r in caplog.records if "drift run failed" in r.getMessage()]) == 1  # logged once


def test_service_runs_the_scheduler_and_findings_are_queryable(tmp_path):
    svc = make_service(tmp_path)
    try:
        assert svc.scheduler is not None and svc.scheduler.window_s == 3600
        put(svc.store, NOW - 2 * HOUR, NOW - HOUR, 300, seed=1)
        put(svc.store, NOW - HOUR, NOW, 300, seed=2, shift=1.0)
        svc.scheduler.run_once(NOW)
        out = sql(svc, "SELECT Feature, Severity, Drifted FROM findings WHERE Kind = 'feature_drift' ORDER BY Feature")
        assert out.splitlines() == ["age\twarning\ttrue", "amount\tinfo\tfalse", "hour\tinfo\tfalse"]
    finally:
        svc.stop()
    assert svc.scheduler._thread is None


def test_service_without_analytics(tmp_path):
    svc = make_service(tmp_path, **{"analytics.enabled": False})
    try:
        assert svc.scheduler is None
    finally:
        svc.stop()


# --- prediction drift, realized performance, shadows ------------------------------------


def test_numeric_prediction_drift(store):
    rng = np.random.default_rng(7)
    put(store, NOW - 2 * HOUR, NOW - HOUR, 400, seed=1, predictions=rng.normal(0.0, 1.0, 400))
    put(store, NOW - HOUR, NOW, 400, seed=2, predictions=rng.normal(0.0, 1.0, 400), stream="same")
    put(store, NOW - 2 * HOUR, NOW - HOUR, 400, seed=3, predictions=rng.normal(0.0, 1.0, 400), stream="same")
    put(store, NOW - HOUR, NOW, 400, seed=4, predictions=rng.normal(0.6, 1.0, 400))
    found = by_kind(DriftScheduler(store).run_once(NOW), "prediction_drift")
    by_stream = {f.labels["stream"]: f for f in found}
    moved, same = by_stream["default"], by_stream["same"]
    assert moved.drifted and moved.severity == "warning" and moved.details["test"] == "ks" and moved.p_value < 1e-6
    assert not same.drifted and same.severity == "info" and same.details["test"] == "ks"
    assert moved.subject == "model=fraud version=3 stream=default"


def test_class_prediction_drift_from_labels_and_from_integers(store):
    rng = np.random.default_rng(8)
    put(store, NOW - 2 * HOUR, NOW - HOUR, 500, seed=1, predictions=list(rng.choice(["ok", "fraud"], 500, p=[0.9, 0.1])))
    put(store, NOW - HOUR, NOW, 500, seed=2, predictions=list(rng.choice(["ok", "fraud"], 500, p=[0.7, 0.3])))
    put(store, NOW - 2 * HOUR, NOW - HOUR, 500, seed=3, stream="int", predictions=rng.integers(0, 3, 500))
    put(store, NOW - HOUR, NOW, 500, seed=4, stream="int", predictions=rng.integers(0, 3, 500))
    found = {f.labels["stream"]: f for f in by_kind(DriftScheduler(store).run_once(NOW), "prediction_drift")}
    assert found["default"].drifted and found["default"].details["test"] == "chi2"
    assert found["default"].effect == pytest.approx(0.2, abs=0.06)  # total variation of the class shares
    assert not found["int"].drifted and found["int"].details["test"] == "chi2"  # integral: read as classes


def _labelled_window(store, start, end, n, *, seed, error_rate, prefix, version="3", stream="default"):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    pred = np.where(rng.random(n) < error_rate, 1 - y, y)
    ids = [f"{prefix}-{i}" for i in range(n)]
    put(store, start, end, n, seed=seed, ids=ids, predictions=pred, version=version, stream=stream)
    put_labels(store, ids, y)
    return ids, y, pred


def test_accuracy_drop_once_labels_arrive(store):
    _labelled_window(store, NOW - 2 * HOUR, NOW - HOUR, 600, seed=1, error_rate=0.1, prefix="r")
    ids, y, pred = _labelled_window(store, NOW - HOUR, NOW, 600, seed=2, error_rate=0.3, prefix="c")
    put_labels(store, ids[:5], 1 - y[:5], t=NOW - 10)  # superseded by the later labels above
    (acc,) = by_kind(DriftScheduler(store).run_once(NOW), "accuracy_drop")
    assert acc.drifted and acc.severity == "warning" and acc.method == "performance_drop"
    assert acc.details["metric"] == "accuracy" and acc.details["task"] == "classification"
    assert acc.details["current_metric"] == pytest.approx(float(np.mean(y == pred)))
    assert acc.details["reference_metric"] == pytest.approx(0.9, abs=0.04)
    assert acc.effect > 0.05 and acc.threshold == 0.05 and acc.p_value < 0.05
    assert acc.details["n_labelled_current"] == 600 and 0 < acc.details["f1_macro_current"] < 0.8


def test_no_accuracy_drop_when_performance_holds_or_labels_are_few(store):
    _labelled_window(store, NOW - 2 * HOUR, NOW - HOUR, 600, seed=1, error_rate=0.1, prefix="r")
    _labelled_window(store, NOW - HOUR, NOW, 600, seed=2, error_rate=0.1, prefix="c")
    _labelled_window(store, NOW - 2 * HOUR, NOW - HOUR, 300, seed=3, error_rate=0.1, prefix="er", stream="eu")
    _labelled_window(store, NOW - HOUR, NOW, 300, seed=4, error_rate=0.1, prefix="ec", stream="eu")
    found = by_kind(DriftScheduler(store, min_labels=400).run_once(NOW), "accuracy_drop")
    (acc,) = found  # the eu stream has 300 labelled rows per window: below min_labels, no finding
    assert acc.labels == {"stream": "default"} and not acc.drifted and acc.severity == "info"


def test_regression_accuracy_drop_uses_mae(store):
    rng = np.random.default_rng(5)
    for start, noise, prefix in ((NOW - 2 * HOUR, 0.5, "r"), (NOW - HOUR, 0.8, "c")):
        y = rng.normal(10.0, 3.0, 500)
        ids = [f"{prefix}-{i}" for i in range(500)]
        put(store, start, start + HOUR, 500, seed=1, ids=ids, predictions=y + rng.normal(0, noise, 500))
        put_labels(store, ids, y)
    (acc,) = by_kind(DriftScheduler(store).run_once(NOW), "accuracy_drop")
    assert acc.details["metric"] == "mae" and acc.details["task"] == "regression"
    assert acc.drifted and acc.effect == pytest.approx(0.6, abs=0.2)  # MAE grows ~0.8/0.5 - 1


def test_shadow_versions_on_the_same_requests(store):
    rng = np.random.default_rng(9)
    ids = [f"q-{i}" for i in range(400)]
    primary = rng.integers(0, 3, 400)
    shadow = primary.copy()
    flip = rng.random(400) < 0.2
    shadow[flip] = (primary[flip] + 1) % 3
    put(store, NOW - HOUR, NOW, 400, seed=1, version="3", ids=ids, predictions=primary)
    put(store, NOW - HOUR, NOW, 100, seed=1, version="3", ids=[f"only-{i}" for i in range(100)],
        predictions=np.zeros(100))
    put(store, NOW - HOUR, NOW, 400, seed=2, version="4", ids=ids[::-1], predictions=shadow[::-1])
    put(store, NOW - HOUR, NOW, 300, seed=3, version="5", ids=[f"other-{i}" for i in range(300)],
        predictions=np.zeros(300))  # shares no request: no finding
    (f,) = by_kind(DriftScheduler(store).run_once(NOW), "shadow_disagreement")
    assert f.model_version == "4" and f.details["primary_version"] == "3" and f.details["joined"] == 400
    assert f.statistic == pytest.approx(1 - flip.mean()) and f.drifted and f.severity == "warning"
    assert f.subject == "model=fraud version=4 stream=default"


def test_rows_moved_per_window_are_capped(store):
    put(store, NOW - 2 * HOUR, NOW - HOUR, 600, seed=1, ids=[f"r{i}" for i in range(600)])
    put(store, NOW - HOUR, NOW, 900, seed=2, ids=[f"c{i}" for i in range(900)])
    found = DriftScheduler(store, max_rows=500).run_once(NOW)
    (summary,) = by_kind(found, "dataset_drift")
    assert summary.details["n_current"] == 500 and summary.details["n_window_current"] == 900
    assert summary.details["n_reference"] == 500 and summary.details["n_window_reference"] == 600
    age = next(f for f in by_kind(found, "feature_drift") if f.feature == "age")
    full = age.details["full_window_ks"]  # ClickHouse's KS over all 600 + 900 rows
    assert (full["n_reference"], full["n_current"]) == (600, 900) and 0 <= full["statistic"] <= 1
    assert "full_window_ks" not in by_kind(DriftScheduler(store).run_once(NOW), "feature_drift")[0].details


def test_new_settings_are_checked(store):
    with pytest.raises(ConfigError) as info:
        DriftScheduler(store, max_rows=1, min_labels=0, metric="r2", max_drop=2.0, min_agreement=-1)
    assert len(info.value.problems) == 5


def test_from_config_reads_the_analytics_section(store):
    from stethoscope.config import load_config

    cfg = load_config(environ={}, overrides={"analytics.max_rows": 1234, "analytics.performance_metric": "f1",
                                             "analytics.sketch_reference": "fixed:golden", "analytics.window": "30m"})
    sched = DriftScheduler.from_config(store, cfg.analytics)
    assert (sched.max_rows, sched.metric, sched.sketch_reference, sched.window_s) == (1234, "f1", "fixed:golden", 1800)
    assert sched.max_drop == 0.05 and sched.min_agreement == 0.95 and sched.sketch_metrics
    with pytest.raises(ConfigError):
        load_config(environ={}, overrides={"analytics.sketch_reference": "fixed:"})


def test_accuracy_drop_with_binary_f1(store):
    _labelled_window(store, NOW - 2 * HOUR, NOW - HOUR, 600, seed=1, error_rate=0.05, prefix="r")
    _labelled_window(store, NOW - HOUR, NOW, 600, seed=2, error_rate=0.3, prefix="c")
    (acc,) = by_kind(DriftScheduler(store, metric="f1").run_once(NOW), "accuracy_drop")
    assert acc.details["metric"] == "f1" and acc.drifted
    assert acc.details["reference_metric"] == pytest.approx(0.95, abs=0.03)
