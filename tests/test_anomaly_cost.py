"""Cost detectors: GPU cost per hour from the price table, idle-GPU cost, cost per 1,000 predictions
attributed through the nodes a model runs on, and spikes against the moving average."""

from __future__ import annotations

import doctest

import pytest
from stethoscope.analytics import cost
from stethoscope.analytics.cost import FleetCost, PredictionCost
from stethoscope.analytics.fleet import PriceTable
from stethoscope.analytics.scenarios import evaluate
from stethoscope.analytics.scenarios_fleet import cost_run, detectors_for, replay

from stethoscope.errors import ConfigError

H100, A100 = "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB"
PRICES = PriceTable({H100: 3.0, A100: 1.8}, default=1.0)


def test_doctests():
    assert doctest.testmod(cost).failed == 0


def test_gpu_cost_per_node_and_model_from_the_price_table():
    det = FleetCost(prices=PRICES, bucket_s=60, report_s=60)
    found = []
    for t in (0.0, 30.0, 60.0):
        for g in range(4):
            found += det.update({"time": t, "node": "a", "gpu": g, "gpu_model": H100, "utilization": 0.9})
        for g in range(2):
            found += det.update({"time": t, "node": "b", "gpu": g, "gpu_model": A100, "utilization": 0.9})
        found += det.update({"time": t, "node": "b", "gpu": 9, "gpu_model": "Tesla T4", "utilization": 0.9})
    by = {f.subject: f for f in found if f.kind == "gpu_cost"}
    assert by["node=a"].statistic == pytest.approx(12.0)
    assert by["node=b"].statistic == pytest.approx(2 * 1.8 + 1.0)  # the T4 at the default price
    assert by["node=b"].details["by_model"][A100] == {"gpus": 2, "usd_per_hour": pytest.approx(3.6)}


@pytest.mark.parametrize("kind", ["fleet_spike", "prediction_spike"])
def test_cost_incidents_are_found_and_clean_runs_are_quiet(kind):
    for seed in (0, 1):
        run = cost_run(kind, seed=seed)
        found = replay(run, detectors_for("cost"))
        ev = evaluate(found, run.incidents, run.duration_s, max_delay_s=1800)
        for inc in run.incidents:
            assert ev.kinds[inc.kind].detected == 1, (kind, seed, inc.kind)
        assert ev.false_alarms == 0
        clean = cost_run("clean", seed=seed)
        assert [f for f in replay(clean, detectors_for("cost")) if f.severity != "info"] == []


def test_cost_per_prediction_splits_a_shared_node_by_requests():
    det = PredictionCost(prices=PRICES, bucket_s=3600, min_requests=1)
    found = []
    for t in (0.0, 1800.0, 3600.0):
        for g in range(8):  # one 8-GPU H100 node: 24 $/h
            found += det.update({"time": t, "node": "a", "gpu": g, "gpu_model": H100})
        found += det.update({"time": t + 1, "model": "big", "version": "1", "node": "a", "requests": 30_000})
        found += det.update({"time": t + 1, "model": "small", "version": "1", "node": "a", "requests": 10_000})
    per = {f.subject: f for f in found if f.kind == "cost_per_prediction"}
    # the first hour: 60,000 + 20,000 predictions share 24 $ -> 0.3 $ per 1,000 for both
    assert per["model=big version=1"].statistic == pytest.approx(0.3)
    assert per["model=small version=1"].details["usd"] == pytest.approx(6.0)


def test_reported_cost_is_used_when_the_sdk_sends_it():
    det = PredictionCost(prices=PRICES, bucket_s=60, min_requests=1)
    found = det.update({"time": 0.0, "model": "m", "version": "1", "requests": 1000, "cost": 0.5})
    found += det.update({"time": 61.0, "model": "m", "version": "1", "requests": 1, "cost": 0.0})
    (f,) = found
    assert f.method == "reported_cost" and f.statistic == pytest.approx(0.5)


def test_observations_before_the_open_bucket_are_ignored_and_counted():
    det = FleetCost(bucket_s=60)
    det.update({"time": 130.0, "node": "a", "gpu": 0, "gpu_model": H100, "utilization": 0.5})
    assert det.update({"time": 10.0, "node": "a", "gpu": 0, "gpu_model": H100, "utilization": 0.5}) == []
    assert det.n_ignored == 1


def test_bad_settings_are_all_named():
    with pytest.raises(ConfigError) as info:
        FleetCost(bucket_s=0, ratio=1.0, idle_share=2, warmup=0)
    assert len(info.value.problems) == 4
    with pytest.raises(ConfigError, match="default price"):
        PriceTable({}, default=-1)
