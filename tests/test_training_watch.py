"""TrainingWatch end to end: a TrainingMonitor sends real OTLP to ``up``; the watch reads the store and finds
the injected loss spike and NaN, once each, and a rank that went silent."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from conftest import otlp_url, sql
from stethoscope.agents.sdk import TrainingMonitor
from stethoscope.analytics.training_analysis import TrainingAnalyzer, TrainingWatch

from stethoscope.errors import ConfigError

pytestmark = pytest.mark.e2e

T0 = 1_700_000_000.0
STEP = 0.5  # seconds between steps, on the fake clocks


class _Clock:
    """perf_counter and time_ns fakes that advance together, one step at a time."""

    def __init__(self) -> None:
        self.t = 0.0

    def perf(self) -> float:
        return self.t

    def wall_ns(self) -> int:
        return int(round((T0 + self.t) * 1e9))


def _monitor(svc, clock: _Clock, rank: int) -> TrainingMonitor:
    return TrainingMonitor("llm", rank=rank, world_size=2, node=f"n{rank}", gpu=rank, endpoint=otlp_url(svc, ""),
                           start=False, clock=clock.perf, wall_clock=clock.wall_ns, max_steps_per_s=None,
                           export_interval_s=60)


def _wait_points(svc, want: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    n = 0
    while time.monotonic() < deadline:
        n = int(sql(svc, "SELECT count() FROM otel_metrics_gauge WHERE MetricName = 'stethoscope.train.step'").strip()
                or 0)
        if n >= want:
            return
        time.sleep(0.05)
    raise AssertionError(f"wanted {want} step points, got {n}")


def _train(monitors, clock: _Clock, steps: range, rng, spike_at: int | None = None, nan_at: int | None = None,
           silent_rank: int | None = None) -> None:
    for s in steps:
        clock.t += STEP
        for r, tm in enumerate(monitors):
            if r == silent_rank:
                continue
            loss = 3.0 - 0.0005 * s + rng.normal(0.0, 0.01)
            if spike_at is not None and r == 1 and spike_at <= s < spike_at + 3:
                loss = 3.0 - 0.0005 * s + 0.5  # ~50 sigma
            if nan_at is not None and r == 0 and s == nan_at:
                loss = math.nan
            tm.step(loss=loss, grad_norm=1.0 + rng.normal(0.0, 0.02), tokens=4096, step_time=STEP,
                    data_wait=0.02)


def test_watch_finds_spike_and_nan_from_real_otlp(service):
    rng = np.random.default_rng(11)
    clock = _Clock()
    monitors = [_monitor(service, clock, r) for r in range(2)]
    watch = TrainingWatch(grace_s=5.0)
    try:
        _train(monitors, clock, range(150), rng)
        for tm in monitors:
            assert tm.flush(timeout_s=10)
        _wait_points(service, 300)
        first = watch.run(service.store, now=T0 + clock.t + 1)
        assert [f for f in first if f.severity != "info"] == []

        _train(monitors, clock, range(150, 200), rng, spike_at=170, nan_at=185)
        for tm in monitors:
            assert tm.flush(timeout_s=10)
        _wait_points(service, 400)
        found = watch.run(service.store, now=T0 + clock.t + 1)
        # a second run over the same data finds nothing new (dedupe by job, rank, step)
        again = watch.run(service.store, now=T0 + clock.t + 2)
    finally:
        for tm in monitors:
            tm.close(timeout_s=5)
    alarms = [(f.kind, f.subject, f.details["step"]) for f in found if f.severity != "info"]
    # the SDK counts steps from 1: loop step s is SDK step s + 1
    assert ("loss_spike", "job=llm", 171) in alarms  # one finding per job, naming the rank in details
    nan = [a for a in alarms if a[0] == "training_nan"]
    assert len(nan) == 1 and nan[0][1] == "job=llm"
    assert 186 <= nan[0][2] <= 200  # the SDK counts NaNs per export: the step lies within that export
    assert len(alarms) == 2, alarms
    assert [f for f in again if f.severity != "info"] == []


def test_watch_flags_a_silent_rank_on_tick(service):
    rng = np.random.default_rng(5)
    clock = _Clock()
    monitors = [_monitor(service, clock, r) for r in range(2)]
    watch = TrainingWatch(TrainingAnalyzer(["job_hung"], {"job_hung": {"min_silence_s": 5.0}}))
    try:
        _train(monitors, clock, range(40), rng)
        _train(monitors, clock, range(40, 60), rng, silent_rank=1)  # rank 1 stops at step 40
        for tm in monitors:
            assert tm.flush(timeout_s=10)
        _wait_points(service, 100)
        found = watch.run(service.store, now=T0 + clock.t)
    finally:
        for tm in monitors:
            tm.close(timeout_s=5)
    assert [(f.kind, f.subject, f.severity, f.details["step"]) for f in found] == [
        ("job_hung", "job=llm rank=1 node=n1 gpu=1", "critical", 40)]


def test_watch_settings_are_checked():
    with pytest.raises(ConfigError) as e:
        TrainingWatch(lookback_s=-1, grace_s=math.nan)
    assert len(e.value.problems) == 2


def test_late_steps_within_grace_are_processed_once(service):
    """Rank 1 exports late: its steps are older than the watermark rank 0 set, but within the grace."""
    rng = np.random.default_rng(8)
    clock = _Clock()
    monitors = [_monitor(service, clock, r) for r in range(2)]
    watch = TrainingWatch(TrainingAnalyzer(["loss_spike"]), grace_s=30.0)
    try:
        _train(monitors, clock, range(100), rng)
        for tm in monitors:
            assert tm.flush(timeout_s=10)
        _wait_points(service, 200)
        assert watch.run(service.store, now=T0 + clock.t + 1) == []
        _train(monitors, clock, range(100, 130), rng, spike_at=110)  # the spike is on rank 1
        assert monitors[0].flush(timeout_s=10)  # rank 0 first: the watermark moves past rank 1's steps
        _wait_points(service, 230)
        assert watch.run(service.store, now=T0 + clock.t + 1) == []
        assert monitors[1].flush(timeout_s=10)  # rank 1's steps 101..130 arrive late (< 30 s behind)
        _wait_points(service, 260)
        late = watch.run(service.store, now=T0 + clock.t + 2)
        again = watch.run(service.store, now=T0 + clock.t + 3)
    finally:
        for tm in monitors:
            tm.close(timeout_s=5)
    # the step waited for rank 1 across the two runs, then was judged on both ranks' losses
    assert [(f.kind, f.subject, f.details["step"], f.details["first_rank_subject"], f.details["ranks"])
            for f in late] == [("loss_spike", "job=llm", 111, "job=llm rank=1 node=n1 gpu=1", 2)]
    assert again == []
