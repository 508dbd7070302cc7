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
COLUMNS = ["Timestamp", "Model", "ModelVersion", "Stream", "Features", "FeatureNames", "Confidence", "AdjustedCount"]


def put(store, start: float, end: float, n: int, *, seed: int, shift: float = 0.0, model: str = "fraud",
        version: str = "3", stream: str = "default", conf=(20, 2), d: int = 3) -> None:
    """``n`` sampled rows spread over ``[start, end)``; feature ``age`` is shifted by ``shift``."""
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(n, d))
    feats[:, 1] += shift
    confidence = rng.beta(*conf, n) if conf else np.full(n, np.nan)
    lines = []
    for i, t in enumerate(np.linspace(start, end, n, endpoint=False)):
        lines.append(json.dumps({
            "Timestamp": f"{t:.3f}", "Model": model, "ModelVersion": version, "Stream": stream,
            "Features": feats[i].tolist(), "FeatureNames": ["amount", "age", "hour"][:d],
            "Confidence": "nan" if np.isnan(confidence[i]) else float(confidence[i]),  # NaN: none sent "AdjustedCount": 10.0,
        }))
    store.insert("samples", COLUMNS, ("\n".join(lines) + "\n").encode(), fmt="JSONEachRow")


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
