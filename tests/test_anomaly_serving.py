"""Serving detectors on labelled replica runs: each incident found once on the right subject, clean
runs quiet, SLA per model, and quantiles from the same estimate the dashboards use."""

from __future__ import annotations

import doctest
import math

import pytest
from stethoscope.analytics import serving
from stethoscope.analytics.scenarios import evaluate
from stethoscope.analytics.scenarios_fleet import (
    SERVING_KINDS,
    detectors_for,
    replay,
    serving_run,
)
from stethoscope.analytics.serving import (
    Capacity,
    ErrorRate,
    LatencySla,
    LoadImbalance,
    QueueTime,
    wilson_lower,
)
from stethoscope.dashboards.histogram import bucket_quantile

from stethoscope.errors import ConfigError


def test_doctests():
    assert doctest.testmod(serving).failed == 0


@pytest.mark.parametrize("kind", [k for k in SERVING_KINDS if k != "clean"])
def test_each_incident_is_found_and_nothing_else(kind):
    for seed in (0, 1):
        run = serving_run(kind, seed=seed, duration_s=2400)
        found = replay(run, detectors_for("serving"))
        ev = evaluate(found, run.incidents, run.duration_s)
        (inc,) = run.incidents
        assert ev.kinds[inc.kind].detected == 1, (kind, seed)
        assert ev.kinds[inc.kind].delays_s[0] <= 120  # within two minutes of the onset
        assert ev.false_alarms == 0, [(f.kind, f.subject, f.time) for f in found if f.severity != "info"]
        assert any(f.kind == inc.kind and f.severity == "info" and f.details["ended"] for f in found)


def test_clean_runs_are_quiet():
    for seed in range(4):
        run = serving_run("clean", seed=seed, duration_s=3600)
        assert [f for f in replay(run, detectors_for("serving")) if f.severity != "info"] == []


def _hist(t, counts, model="m", replica="r0", bounds=(50.0, 100.0, 250.0, 500.0)):
    return {"time": t, "model": model, "version": "1", "replica": replica, "requests": sum(counts),
            "latency": {"bounds": list(bounds), "counts": list(counts)}}


def test_latency_quantiles_merge_replicas_and_match_the_dashboard_estimate():
    det = LatencySla(sla_ms=100, window_s=60, consecutive=1)
    a = [900, 100, 0, 0, 0]  # replica r0 alone is within the SLA
    b = [100, 200, 300, 300, 100]
    assert det.update(_hist(1.0, a, replica="r0")) == []
    (f,) = det.update(_hist(1.0, b, replica="r1"))
    merged = [x + y for x, y in zip(a, b)]
    bounds = [50.0, 100.0, 250.0, 500.0]
    for q in (0.5, 0.9, 0.99):
        assert f.details[f"p{int(q * 100)}"] == pytest.approx(bucket_quantile(q, merged, bounds))
    assert f.subject == "model=m version=1" and f.statistic == f.details["p99"]


def test_per_model_sla_and_quantile_only_observations():
    det = LatencySla(sla_ms=250, slas={"fast": 20}, window_s=30, min_requests=10, consecutive=1)
    fast = det.update({"time": 1.0, "model": "fast", "version": "2", "requests": 100, "latency": {"p99": 35.0}})
    slow = det.update({"time": 1.0, "model": "slow", "version": "2", "requests": 100, "latency": {"p99": 35.0}})
    assert [(f.subject, f.threshold) for f in fast] == [("model=fast version=2", 20.0)] and slow == []


def test_error_rate_needs_evidence_not_just_a_ratio():
    det = ErrorRate(threshold=0.01, window_s=60, min_requests=100)
    # 2 errors in 120 requests is 1.7 %, but not significantly above 1 %
    assert det.update({"time": 1.0, "model": "m", "requests": 120, "errors": 2}) == []
    (f,) = det.update({"time": 2.0, "model": "m", "requests": 1000, "errors": 40})
    assert f.statistic == pytest.approx(42 / 1120) and f.details["wilson_lower"] > 0.01
    assert wilson_lower(10, 1000) < 0.01 < 10 / 1000 + 0.001


def test_queue_time_names_the_replica():
    det = QueueTime(threshold_ms=100, sustain_s=20)
    found = []
    for i in range(6):
        found += det.update({"time": 10.0 * i, "model": "m", "version": "1", "replica": "pod-b", "queue_ms": 250.0})
    assert [(f.subject, f.time) for f in found] == [("model=m version=1 replica=pod-b", 20.0)]


def test_capacity_reports_desired_replicas():
    det = Capacity(capacity_rps=100, target=0.8, window_s=60)
    found = []
    for i in range(6):
        for r in range(2):
            found += det.update({"time": 10.0 * i + r * 0.01, "model": "m", "version": "1", "replica": f"r{r}",
                                 "requests": 950, "interval_s": 10.0})
    (f,) = found
    assert f.details["throughput_rps"] == pytest.approx(190.0) and f.details["replicas"] == 2
    assert f.details["desired_replicas"] == math.ceil(190 / 80)


def test_load_imbalance_needs_two_replicas_and_traffic():
    det = LoadImbalance(window_s=60, min_mean_requests=100)
    assert det.update({"time": 1.0, "model": "m", "replica": "a", "requests": 5000}) == []  # one replica
    det = LoadImbalance(window_s=60, min_mean_requests=100)
    assert det.update({"time": 1.0, "model": "m", "replica": "a", "requests": 90}) == []
    assert det.update({"time": 1.0, "model": "m", "replica": "b", "requests": 10}) == []  # too little traffic


def test_bad_settings_are_all_named():
    with pytest.raises(ConfigError) as info:
        LatencySla(sla_ms=-1, slas={"m": 0}, consecutive=0)
    assert len(info.value.problems) == 3
    with pytest.raises(ConfigError, match="ratio"):
        LoadImbalance(ratio=1.0)
    with pytest.raises(ConfigError, match="threshold"):
        ErrorRate(threshold=1.5)
