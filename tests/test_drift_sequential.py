"""Stream change detectors: behaviour, bad values, ERT calibration and detection delay."""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest

from stethoscope.analytics import calibrate_ert, sequential
from stethoscope.analytics.detector import SequentialDetector
from stethoscope.analytics.sequential import (
    ADWIN,
    CUSUM,
    STREAM_REGISTRY,
    PageHinkley,
    WindowedKS,
    WindowedMeanShift,
    detection_delay,
)
from stethoscope.errors import ConfigError

BAD = [None, math.nan, math.inf, -math.inf, "not a number", object(), [1.0]]


def test_docstring_examples_run() -> None:
    for mod in (sequential, calibrate_ert):
        res = doctest.testmod(mod)
        assert res.attempted > 0 and res.failed == 0, mod.__name__


def test_registry_builds_every_detector_with_defaults() -> None:
    assert set(STREAM_REGISTRY) == {"cusum", "page_hinkley", "adwin", "mean_window", "ks_window"}
    for name, factory in STREAM_REGISTRY.items():
        det = factory()
        assert isinstance(det, SequentialDetector)
        assert det.name == name and det.drift_detected is False and det.n_seen == 0


@pytest.mark.parametrize("name", sorted(STREAM_REGISTRY))
def test_bad_values_are_counted_and_ignored(name: str) -> None:
    rng = np.random.default_rng(3)
    stream = np.r_[rng.normal(size=1200), rng.normal(3.0, 1.0, size=300)]
    clean, dirty = STREAM_REGISTRY[name](), STREAM_REGISTRY[name]()
    for x in stream:
        clean.update(x)
    for i, x in enumerate(stream):
        if i % 50 == 0:
            for bad in BAD:
                assert dirty.update(bad) is False
        dirty.update(x)
    assert dirty.n_ignored == len(BAD) * math.ceil(len(stream) / 50)
    assert dirty.n_seen == clean.n_seen == len(stream)
    assert dirty.detected_at == clean.detected_at and clean.drift_detected


@pytest.mark.parametrize("name", sorted(STREAM_REGISTRY))
def test_reset_returns_to_a_fresh_state(name: str) -> None:
    det = STREAM_REGISTRY[name]()
    rng = np.random.default_rng(4)
    stream = np.r_[rng.normal(size=1200), rng.normal(4.0, 1.0, size=300)]
    first = [det.update(x) for x in stream]
    det.update(None)
    det.reset()
    assert (det.drift_detected, det.n_seen, det.n_ignored, det.detected_at) == (False, 0, 0, None)
    assert [det.update(x) for x in stream] == first


def test_configuration_problems_are_reported_together() -> None:
    with pytest.raises(ConfigError) as err:
        CUSUM(k=-1, h=0, std=0.0)
    assert len(err.value.problems) == 3
    with pytest.raises(ConfigError) as err:
        ADWIN(delta=2.0, clock=0, max_buckets=1)
    assert len(err.value.problems) == 3
    with pytest.raises(ConfigError) as err:
        PageHinkley(lambda_=0, alpha=2.0, mode="sideways")
    assert len(err.value.problems) == 3
    with pytest.raises(ConfigError) as err:
        WindowedMeanShift([1.0, 2.0], window=1, ert=0.5)
    assert len(err.value.problems) == 2
    with pytest.raises(ConfigError):
        WindowedKS(np.ones(500))


def test_cusum_detects_one_sigma_shift_quickly_and_is_quiet_in_control() -> None:
    delays, run_lengths = [], []
    for seed in range(20):
        rng = np.random.default_rng(seed)
        det = CUSUM(mean=0.0, std=1.0)
        delays.append(detection_delay(det, np.r_[rng.normal(size=100), rng.normal(1.0, 1.0, 500)], 100))
        det.reset()
        for x in rng.normal(size=5000):
            if det.update(x):
                break
        run_lengths.append(det.detected_at or 5000)
    assert all(d is not None for d in delays)
    assert 5 <= float(np.mean(delays)) <= 20  # ARL1 ~10 for k=0.5, h=5
    assert float(np.mean(run_lengths)) > 200  # ARL0 ~465 two-sided


def test_cusum_estimates_reference_from_warmup() -> None:
    rng = np.random.default_rng(0)
    det = CUSUM(warmup=200)
    for x in rng.normal(10.0, 2.0, 200):
        det.update(x)
    assert det.mean == pytest.approx(10.0, abs=0.4) and det.std == pytest.approx(2.0, rel=0.15)
    delay = detection_delay(det, np.r_[rng.normal(10.0, 2.0, 300), rng.normal(12.0, 2.0, 300)], 300)
    assert delay is not None and delay < 40


def test_page_hinkley_detects_increase_and_decrease_not_constant() -> None:
    for sign in (1.0, -1.0):
        rng = np.random.default_rng(1)
        stream = np.r_[rng.normal(0.0, 0.1, 500), rng.normal(sign, 0.1, 300)]
        delay = detection_delay(PageHinkley(), stream, 500)
        assert delay is not None and delay < 100
    up_only = PageHinkley(mode="up", lambda_=10.0)
    for x in np.r_[np.zeros(100), -np.ones(100)]:
        up_only.update(x)
    assert not up_only.drift_detected
    quiet = PageHinkley()
    for x in np.full(5000, 3.0):
        quiet.update(x)
    assert not quiet.drift_detected


@pytest.mark.parametrize("kind", ["gauss", "bernoulli"])
def test_adwin_detects_abrupt_change_with_bounded_delay(kind: str) -> None:
    delays = []
    for seed in range(10):
        rng = np.random.default_rng(seed)
        if kind == "gauss":
            stream = np.r_[rng.normal(0.0, 1.0, 2000), rng.normal(1.0, 1.0, 1000)]
        else:
            stream = np.r_[rng.random(2000) < 0.2, rng.random(1000) < 0.6].astype(float)
        delays.append(detection_delay(ADWIN(), stream, 2000))
    assert all(d is not None for d in delays)
    assert max(delays) < 250 and float(np.mean(delays)) < 150


def test_adwin_quiet_on_long_stationary_streams_and_memory_is_logarithmic() -> None:
    false_alarms = 0
    for seed in range(6):
        rng = np.random.default_rng(100 + seed)
        for stream in (rng.normal(0.0, 1.0, 20_000), (rng.random(20_000) < 0.3).astype(float)):
            det = ADWIN()
            for x in stream:
                det.update(x)
            false_alarms += det.drift_detected
            assert det.n_buckets <= det.max_buckets * (math.log2(det.width) + 1)
            if not det.drift_detected:
                assert det.width == 20_000
                assert det.mean == pytest.approx(float(np.mean(stream)))
    # delta=0.002 bounds each check's false-positive chance; 12 streams x 625 checks.
    assert false_alarms <= 1


def _measured_ert(cls, ert: float, window: int, streams: int, seed: int) -> float:
    rng = np.random.default_rng(seed)
    det = cls(rng.normal(size=5000), window=window, ert=ert, seed=seed)
    cap = int(20 * ert)
    lengths = []
    for _ in range(streams):
        det.reset()
        for x in rng.normal(size=cap):
            if det.update(x):
                break
        lengths.append(det.n_seen - window + 1 if det.drift_detected else cap)
    return float(np.mean(lengths))


@pytest.mark.parametrize("cls", [WindowedMeanShift, WindowedKS])
def test_calibrated_windows_hit_the_target_ert(cls) -> None:
    target = 400.0
    measured = _measured_ert(cls, target, window=30, streams=150, seed=7)
    assert 0.5 * target <= measured <= 2.0 * target, measured


@pytest.mark.parametrize("cls", [WindowedMeanShift, WindowedKS])
def test_calibration_gives_a_finite_threshold_for_a_large_reference(cls) -> None:
    # How long calibration takes is a benchmark figure (benchmarks.drift_mmd, docs/benchmarks.md), not a test.
    rng = np.random.default_rng(0)
    det = cls(rng.normal(size=5000), window=50, ert=10_000)
    assert math.isfinite(det.threshold) and det.threshold > 0


@pytest.mark.parametrize("cls,scale", [(WindowedMeanShift, 1.0), (WindowedKS, 1.0)])
def test_one_sigma_shift_delay_is_bounded(cls, scale: float) -> None:
    window = 50
    delays = []
    for seed in range(8):
        rng = np.random.default_rng(seed)
        det = cls(rng.normal(size=5000), window=window, ert=1000, seed=seed)
        stream = np.r_[rng.normal(size=400), rng.normal(scale, 1.0, size=400)]
        delays.append(detection_delay(det, stream, 400))
    assert all(d is not None for d in delays)
    # a full window of shifted values gives z = sqrt(50) ~ 7, far over h ~ 3
    assert 1 <= float(np.mean(delays)) <= window and max(delays) <= 2 * window


def test_windowed_detector_learns_reference_from_warmup() -> None:
    rng = np.random.default_rng(2)
    det = WindowedMeanShift(window=20, ert=500, warmup=1000)
    stream = np.r_[rng.normal(5.0, 2.0, 1300), rng.normal(7.0, 2.0, 200)]
    assert detection_delay(det, stream, 1300) is not None
    assert math.isfinite(det.threshold)


def test_upcrossing_threshold_on_independent_paths_matches_tail() -> None:
    # With i.i.d. statistics every exceedance is a crossing: h is the 1 - 1/ERT quantile.
    rng = np.random.default_rng(0)
    paths = rng.random((100, 10_000))
    h = calibrate_ert.upcrossing_threshold(paths, 1000.0)
    assert h == pytest.approx(1.0 - 1e-3, abs=2e-4)
