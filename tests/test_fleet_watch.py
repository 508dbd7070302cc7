"""End to end: the real node agent (simulated GPUs with incidents) and ``ModelMonitor`` replicas send
OTLP to a running ``up``; the fleet, serving and cost watches read the store and find the incidents.

Points are stamped on a simulated clock (see ``sim_clock``), so a quarter of an hour of
telemetry takes seconds and every detector runs with its default settings.
"""

from __future__ import annotations

import doctest
import time

import pytest
from conftest import otlp_url, sql
from stethoscope.agents.daemon import Agent
from stethoscope.agents.gpu.simulate import (
    IdleWaitingOnInput,
    MemoryLeak,
    SimulatedGpuCollector,
    ThermalThrottle,
    Xid,
)
from stethoscope.agents.resource import build_resource
from stethoscope.agents.sdk import ModelMonitor, SamplingConfig
from stethoscope.analytics import fleet_watch
from stethoscope.analytics.cost import FleetCost
from stethoscope.analytics.findings import FindingsWriter
from stethoscope.analytics.fleet import GpuTemperature, GpuUnderutilized, PriceTable
from stethoscope.analytics.fleet_watch import (
    CostWatch,
    FleetWatch,
    ServingWatch,
    _Counters,
    watches_from_config,
)
from stethoscope.analytics.serving import LatencySla

from stethoscope.config import load_config
from stethoscope.errors import ConfigError

pytestmark = pytest.mark.e2e


def _wait(svc, query: str, want: int, timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    n = 0
    while time.monotonic() < deadline:
        n = int(sql(svc, query).strip() or 0)
        if n >= want:
            return n
        time.sleep(0.05)
    raise AssertionError(f"wanted {want} from {query!r}, got {n}")


def _alarms(findings):
    return sorted({(f.kind, f.subject) for f in findings if f.severity != "info"})


def test_doctests():
    assert doctest.testmod(fleet_watch).failed == 0


@pytest.fixture
def sim_clock(monkeypatch):
    """Points stamped on a simulated clock: ``clock[0]`` seconds after an epoch one hour ago.

    The OpenTelemetry SDK reads ``time_ns`` when it collects and ``ModelMonitor`` when it
    closes a window; pointing both at the simulated clock lets one test cover a quarter
    of an hour of telemetry in seconds, with the detectors at their default settings.
    """
    from opentelemetry.sdk.metrics._internal import (
        _view_instrument_match,
        instrument,
        metric_reader_storage,
    )
    from stethoscope.agents.sdk import model

    epoch = float(int(time.time()) - 3600)
    clock = [0.0]
    now_ns = lambda: int((epoch + clock[0]) * 1e9)
    for mod in (instrument, metric_reader_storage, _view_instrument_match):
        monkeypatch.setattr(mod, "time_ns", now_ns)

    class _Time:
        def __getattr__(self, name):
            return getattr(time, name)

        def time_ns(self):
            return now_ns()

    monkeypatch.setattr(model, "time", _Time())
    return epoch, clock


def test_agent_with_simulated_incidents_is_found_and_clean_gpus_are_not(service, sim_clock):
    epoch, clock = sim_clock
    incidents = [ThermalThrottle(gpu=1, start_s=200, duration_s=300), Xid(gpu=2, at_s=250, code=79),
                 MemoryLeak(gpu=3, start_s=200, bytes_per_s=10e6),
                 IdleWaitingOnInput(gpu=4, start_s=200, duration_s=3600)]
    sim = SimulatedGpuCollector(gpus=6, incidents=incidents, clock=lambda: clock[0])
    agent = Agent(endpoint=otlp_url(service, ""), interval_s=60, collectors=[sim], cpu_budget=None,
                  rss_budget_bytes=None, resource=build_resource(environ={}, extra={"host.name": "gpu-node-7"}))
    flushes = 12
    try:
        for i in range(flushes):  # simulated 60 s .. 885 s, one collection every 75 s
            clock[0] = 60.0 + 75.0 * i
            assert agent.flush(timeout_s=10)
    finally:
        agent.shutdown()
    _wait(service, "SELECT count() FROM otel_metrics_gauge WHERE MetricName = 'gpu.temperature'", 6 * flushes)
    _wait(service, "SELECT count() FROM otel_metrics_sum WHERE MetricName = 'gpu.xid.errors'", 1)

    watch = FleetWatch(lookback_s=3600)  # default detectors
    end = epoch + clock[0] + 5
    found = watch.run(service.store, end)
    node = "node=gpu-node-7"
    assert _alarms(found) == sorted({
        ("gpu_temperature", f"{node} gpu=1"), ("gpu_throttle", f"{node} gpu=1"),
        ("gpu_xid", f"{node} gpu=2"), ("node_unhealthy", node),
        ("memory_leak_forecast", f"{node} gpu=3"), ("gpu_underutilized", f"{node} gpu=4"),
    })
    by_kind = {f.kind: f for f in found if f.severity != "info"}
    assert by_kind["gpu_xid"].severity == "critical" and by_kind["gpu_xid"].details["xid"] == 79
    assert by_kind["node_unhealthy"].severity == "critical"
    assert by_kind["gpu_throttle"].details["cause"] == "thermal"
    assert by_kind["gpu_temperature"].details["cause"] == "thermal"
    under = by_kind["gpu_underutilized"]  # an H100 at 3 $/h, idle for most of the window
    assert under.statistic < 0.3 and under.details["idle_cost_usd_per_hour"] == pytest.approx(3 * (1 - under.statistic))
    leak = by_kind["memory_leak_forecast"]
    assert leak.details["forecast_oom_time"] - leak.time >= 600  # warned at least 10 minutes ahead
    assert by_kind["gpu_xid"].time - epoch == pytest.approx(285, abs=1)  # the first collection after it
    assert watch.observations >= 6 * flushes
    # what the scheduler does with them: one batch into the findings table
    FindingsWriter(service.store).write(found)
    assert _wait(service, "SELECT count() FROM findings WHERE Kind = 'memory_leak_forecast'", 1) == 1
    # a second run sees nothing new: the watermark moved, counters are not counted twice
    assert watch.run(service.store, end + 60) == []

    # the same data as cost: six H100s at 3 $/h, one idle from 200 s on
    cost = CostWatch([FleetCost(prices=PriceTable({"NVIDIA H100 80GB HBM3": 3.0}), bucket_s=150, report_s=150,
                                idle_share=0.1, sustain_buckets=2)], lookback_s=3600)
    findings = cost.run(service.store, end)
    gpu_cost = [f for f in findings if f.kind == "gpu_cost"]
    assert gpu_cost and all(f.statistic == pytest.approx(18.0) for f in gpu_cost)
    idle = [f for f in findings if f.kind == "idle_gpu_cost" and f.severity == "warning"]
    assert [f.subject for f in idle] == ["cluster=default"] and idle[0].details["idle_usd_per_hour"] == 3.0
    FindingsWriter(service.store).write(findings)
    assert _wait(service, "SELECT count() FROM findings WHERE Kind IN ('gpu_cost', 'idle_gpu_cost')", 2) >= 2


def _replica(service, name: str) -> ModelMonitor:
    return ModelMonitor("fraud", "3", endpoint=otlp_url(service, ""), feature_names=1, start=False,
                        sampling=SamplingConfig(remote=False), resource_attributes={"service.instance.id": name})


def test_model_monitor_latency_errors_and_imbalance_are_found(service, sim_clock):
    import numpy as np

    epoch, clock = sim_clock
    rng = np.random.default_rng(5)
    a, b = _replica(service, "replica-a"), _replica(service, "replica-b")
    try:
        for i in range(8):  # one export per replica every 10 simulated seconds
            clock[0] = 10.0 * (i + 1)
            for mon, n in ((a, 1200), (b, 300)):  # replica-a takes four times replica-b's traffic
                slow = i >= 5 and mon is a
                lat = rng.lognormal(np.log(400.0 if slow else 20.0), 0.3, n)
                mon.record_batch(np.ones((n, 1)), np.zeros(n), latencies_ms=lat)
                if i >= 5 and mon is b:
                    mon.error("timeout", 75)  # a quarter of replica-b's requests fail: 5 % of all
                assert mon.flush(timeout_s=10)
    finally:
        a.close()
        b.close()
    _wait(service, "SELECT count() FROM otel_metrics_histogram WHERE MetricName = 'stethoscope.model.latency'", 16)
    _wait(service, "SELECT count() FROM otel_metrics_sum WHERE MetricName = 'stethoscope.model.errors'", 3)

    watch = ServingWatch(lookback_s=3600)  # default detectors: SLA 250 ms, 1 % errors, imbalance 1.5
    found = watch.run(service.store, epoch + 200)
    assert _alarms(found) == [("error_rate", "model=fraud version=3"), ("latency_sla", "model=fraud version=3"),
                              ("load_imbalance", "model=fraud version=3")]
    warn = {f.kind: f for f in found if f.severity == "warning"}
    lat = warn["latency_sla"]
    assert lat.statistic > 250 and lat.details["p50"] < lat.details["p99"]
    assert lat.time - epoch == pytest.approx(70, abs=0.5)  # second export of the regression (2 in a row)
    # 60 s window: 0.8 % errors after the first failing export, 1.7 % (significantly above 1 %) after the second
    assert warn["error_rate"].time - epoch == pytest.approx(70, abs=0.5)
    imb = warn["load_imbalance"]
    assert imb.details["busiest"] == "replica-a" and imb.statistic == pytest.approx(1.6, abs=0.05)
    assert imb.time - epoch == pytest.approx(10, abs=0.5)
    FindingsWriter(service.store).write(found)
    assert _wait(service, "SELECT count() FROM findings WHERE Subject = 'model=fraud version=3'", 3) >= 3


def test_counters_handle_cumulative_delta_and_reset():
    c = _Counters()
    c.seed([(("n", "0", "gpu.xid.errors", "79", ""), 2.0)])
    key = ("n", "0", "gpu.xid.errors", "79", "")
    assert c.increase(key, 2.0, 2) == 0.0  # cumulative, unchanged since before the window
    assert c.increase(key, 3.0, 2) == 1.0
    assert c.increase(key, 1.0, 2) == 1.0  # went down: a reset, counts whole
    assert c.increase(("new",), 4.0, 2) == 4.0  # a series first seen later starts from zero
    assert c.increase(key, 5.0, 1) == 5.0  # delta


def test_watches_from_config_use_the_anomaly_section():
    cfg = load_config(environ={"STETHOSCOPE_ANOMALY_MODEL_SLAS": "fraud=80", "STETHOSCOPE_ANOMALY_TEMPERATURE_C": "80",
                               "STETHOSCOPE_ANOMALY_REPLICA_CAPACITY_RPS": "50",
                               "STETHOSCOPE_ANOMALY_GPU_PRICES": "NVIDIA H100 80GB HBM3=4.5,default=1"})
    fleet, serving, cost = watches_from_config(cfg)
    temp = next(d for d in fleet.detectors if isinstance(d, GpuTemperature))
    assert temp.threshold_c == 80.0
    sla = next(d for d in serving.detectors if isinstance(d, LatencySla))
    assert sla.sla_for("fraud") == 80.0 and sla.sla_for("other") == 250.0
    assert any(type(d).__name__ == "Capacity" for d in serving.detectors)
    under = next(d for d in fleet.detectors if isinstance(d, GpuUnderutilized))
    assert under.prices.price("NVIDIA H100 80GB HBM3") == 4.5 and under.prices.price("x") == 1.0
    default_serving = watches_from_config(load_config(environ={}))[1]
    assert not any(type(d).__name__ == "Capacity" for d in default_serving.detectors)  # 0 = off
    assert cost.name == "cost"


def test_bad_anomaly_settings_are_named():
    with pytest.raises(ConfigError) as info:
        load_config(environ={"STETHOSCOPE_ANOMALY_GPU_PRICES": "H100", "STETHOSCOPE_ANOMALY_ERROR_RATE": "2",
                             "STETHOSCOPE_ANOMALY_LEAK_HORIZON": "soon"})
    text = str(info.value)
    assert "anomaly.gpu_prices" in text and "anomaly.error_rate" in text and "anomaly.leak_horizon" in text
    with pytest.raises(ConfigError, match="lookback_s"):
        FleetWatch(lookback_s=0)
