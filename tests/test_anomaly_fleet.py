"""GPU fleet detectors: each incident of the simulated fleet found on the right GPU, nothing on clean runs,
the leak warned at least 10 minutes before out-of-memory and never on flat or sawtooth memory."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
from stethoscope.analytics import fleet, scenarios_fleet
from stethoscope.analytics.fleet import (
    CRITICAL_XIDS,
    GpuBusyNotWorking,
    GpuHealth,
    GpuTemperature,
    GpuThrottle,
    GpuUnderutilized,
    MemoryLeakForecast,
    PriceTable,
    attribute_throttle,
    theil_sen,
)
from stethoscope.analytics.scenarios import evaluate
from stethoscope.analytics.scenarios_fleet import detectors_for, gpu_fleet_run, replay

from stethoscope.errors import ConfigError

GiB = 1 << 30


def _alarms(findings):
    return [f for f in findings if f.severity != "info"]


def test_doctests():
    assert doctest.testmod(fleet).failed == 0
    assert doctest.testmod(scenarios_fleet).failed == 0


@pytest.mark.parametrize("kind", ["thermal", "xid", "ecc", "leak", "underutilized", "busy_not_working"])
def test_each_simulated_incident_is_found_on_its_gpu_and_nothing_else(kind):
    run = gpu_fleet_run(kind, seed=11, duration_s=3600, gpus=2)
    found = replay(run, detectors_for("fleet"))
    ev = evaluate(found, run.incidents, run.duration_s)
    for inc in run.incidents:
        score = ev.kinds[inc.kind]
        assert score.detected == score.incidents == 1, (kind, inc.kind)
    assert ev.false_alarms == 0, [(f.kind, f.subject) for f in _alarms(found)]


@pytest.mark.parametrize("kind", ["clean", "sawtooth"])
def test_clean_fleet_runs_raise_nothing(kind):
    for seed in (1, 2):
        run = gpu_fleet_run(kind, seed=seed, duration_s=3600, gpus=3)
        assert _alarms(replay(run, detectors_for("fleet"))) == []


def test_thermal_details_attribute_the_cause_and_the_end_is_reported():
    run = gpu_fleet_run("thermal", seed=3, duration_s=3600, gpus=2)
    found = replay(run, [GpuTemperature(), GpuThrottle()])
    warn = {f.kind: f for f in found if f.severity == "warning"}
    assert warn["gpu_temperature"].details["cause"] == "thermal" and warn["gpu_temperature"].statistic > 85
    assert set(warn["gpu_throttle"].details["reasons"]) == {"sw_thermal_slowdown", "hw_thermal_slowdown"}
    assert warn["gpu_throttle"].details["clock_sm_mhz"] < 1980
    ended = [f for f in found if f.severity == "info"]
    assert {f.kind for f in ended} == {"gpu_temperature", "gpu_throttle"}  # cooling came back after 10 minutes
    assert all(f.details["ended"] for f in ended)


def test_temperature_is_critical_above_critical_c_and_sustain_filters_blips():
    det = GpuTemperature(threshold_c=85, critical_c=95, sustain_s=30)
    series = [80, 90, 80, 90, 91, 92, 93, 97, 97]  # one-sample blip at 10 s, then a climb
    found = [f for i, temp in enumerate(series)
             for f in det.update({"time": 10.0 * i, "node": "n", "gpu": 0, "temperature": temp})]
    assert [(f.time, f.severity) for f in found] == [(60.0, "warning"), (70.0, "critical")]


def test_throttle_attribution():
    assert attribute_throttle({"hw_thermal_slowdown": 1, "sw_power_cap": 1}, 70.0, 85.0) == "thermal"
    assert attribute_throttle({"hw_power_brake_slowdown": 1}, 70.0, 85.0) == "power"
    assert attribute_throttle({"hw_slowdown": 1}, 90.0, 85.0) == "thermal"
    assert attribute_throttle({"hw_slowdown": 1}, 60.0, 85.0) == "power"
    assert attribute_throttle({"gpu_idle": 1, "applications_clocks_setting": 1}, 40.0, 85.0) is None
    assert attribute_throttle("hot", 40.0, 85.0) is None


def test_xid_severity_and_node_unhealthy_once_per_node():
    det = GpuHealth()
    found = []
    found += det.update({"time": 1.0, "node": "n1", "gpu": 0, "xid": [13]})  # an application fault
    found += det.update({"time": 2.0, "node": "n1", "gpu": 1, "xid": [79, 48]})
    found += det.update({"time": 3.0, "node": "n1", "gpu": 2, "ecc.uncorrectable": 2})
    found += det.update({"time": 4.0, "node": "n2", "gpu": 0, "ecc.uncorrectable": 1})
    assert [(f.kind, f.subject, f.severity) for f in found] == [
        ("gpu_xid", "node=n1 gpu=0", "warning"),
        ("gpu_xid", "node=n1 gpu=1", "critical"), ("gpu_xid", "node=n1 gpu=1", "critical"),
        ("node_unhealthy", "node=n1", "critical"),
        ("gpu_ecc_uncorrectable", "node=n1 gpu=2", "critical"),
        ("gpu_ecc_uncorrectable", "node=n2 gpu=0", "critical"), ("node_unhealthy", "node=n2", "critical"),
    ]
    assert {48, 63, 64, 74, 79, 92, 94, 95} == CRITICAL_XIDS


def test_underutilized_carries_its_cost_and_needs_a_full_window():
    det = GpuUnderutilized(below=0.3, window_s=600, prices=PriceTable({"H100": 3.0}, default=1.0))
    found = []
    for i in range(100):
        found += det.update({"time": 10.0 * i, "node": "n", "gpu": 0, "gpu_model": "H100", "utilization": 0.05})
    (f,) = found
    assert f.time == 540.0  # the first time 90 % of the window is covered
    assert f.details["idle_cost_usd_per_hour"] == pytest.approx(3.0 * 0.95)


def test_busy_not_working_uses_tensor_activity_when_sm_activity_is_missing():
    det = GpuBusyNotWorking(sustain_s=60)
    found = []
    for i in range(20):
        found += det.update({"time": 10.0 * i, "node": "n", "gpu": 3, "utilization": 0.97, "tensor.activity": 0.02})
    assert [(f.time, f.details["activity_source"]) for f in found] == [(60.0, "tensor.activity")]


def _memory(det, used, total=80 * GiB, step=10.0):
    out = []
    for i, u in enumerate(used):
        out += det.update({"time": 10_000 + step * i, "node": "n", "gpu": 0, "memory.used": u, "memory.total": total})
    return out


@pytest.mark.parametrize("rate_mb_s", [5, 10, 20])
def test_leak_is_warned_at_least_ten_minutes_before_oom(rate_mb_s):
    rng = np.random.default_rng(rate_mb_s)
    total = 80 * GiB
    used = []
    for i in range(1100):
        u = 50 * GiB + 64e6 * rng.standard_normal() + (rate_mb_s * 1e6 * (i - 60) * 10 if i > 60 else 0)
        used.append(min(u, total))
    oom = next(i for i, u in enumerate(used) if u >= total) * 10.0 + 10_000
    found = _memory(MemoryLeakForecast(), used)
    warn = [f for f in found if f.severity == "warning"]
    assert len(warn) == 1
    assert oom - warn[0].time >= 600, f"warned only {oom - warn[0].time:.0f} s before OOM"
    # the forecast is within half the time left (right after the onset the fit window still
    # holds flat samples, so a fast leak's first forecast is late, never early by much)
    lead = oom - warn[0].time
    assert -lead / 10 <= warn[0].details["forecast_oom_time"] - oom <= lead / 2


def test_no_leak_warning_on_flat_sawtooth_or_a_single_step():
    rng = np.random.default_rng(0)
    flat = [60 * GiB + 200e6 * rng.standard_normal() for _ in range(720)]
    saw = [30 * GiB + 40 * GiB * ((i % 30) / 30) for i in range(720)]  # 5-minute allocate/free cycles to 70 GiB
    step = [40 * GiB if i < 200 else 70 * GiB for i in range(720)]  # a bigger batch: a step, not a trend
    for used in (flat, saw, step):
        assert _alarms(_memory(MemoryLeakForecast(), used)) == []


def test_a_leak_inside_a_sawtooth_is_found_from_its_peaks():
    # 4-minute allocate/free cycles whose peaks climb 2 GiB per cycle: the peak reaches 80 GiB in cycle 20
    used = [min(20 * GiB + 2 * GiB * (i // 24) + 20 * GiB * ((i % 24) / 24), 80 * GiB) for i in range(720)]
    found = _memory(MemoryLeakForecast(), used)
    warn = [f for f in found if f.severity == "warning"]
    oom = 10_000 + 10.0 * next(i for i, u in enumerate(used) if u >= 80 * GiB)
    assert len(warn) == 1 and warn[0].method == "theil_sen_peaks"
    assert oom - warn[0].time >= 600


def test_theil_sen_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(4)
    t = np.sort(rng.uniform(0, 600, 50))
    y = 3 * t + rng.normal(0, 200, 50)
    slope, _, low, tau = theil_sen(t, y, 0.99)
    ref = stats.theilslopes(y, t, alpha=0.99)
    assert slope == pytest.approx(ref.slope) and low == pytest.approx(ref.low_slope)
    assert tau == pytest.approx(stats.kendalltau(t, y).statistic)


def test_bad_settings_are_all_named():
    with pytest.raises(ConfigError) as info:
        GpuTemperature(threshold_c=90, critical_c=80, sustain_s=-1)
    assert len(info.value.problems) == 2
    with pytest.raises(ConfigError) as info:
        MemoryLeakForecast(horizon_s=0, min_points=2, min_tau=1.5)
    assert len(info.value.problems) == 3
    with pytest.raises(ConfigError, match="gpu price 'H100'"):
        PriceTable.parse(["H100"])
    with pytest.raises(ConfigError, match="below"):
        GpuUnderutilized(below=0)
