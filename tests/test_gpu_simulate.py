"""The simulated GPU collector: realistic bounds, determinism, and each incident on time."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from stethoscope.agents.gpu.names import GPU_ATTRIBUTES, METRICS_BY_NAME
from stethoscope.agents.gpu.simulate import (
    H100,
    IdleWaitingOnInput,
    MemoryLeak,
    SimulatedGpuCollector,
    ThermalThrottle,
    Xid,
)
from stethoscope.errors import ConfigError

GiB = 1 << 30


class Sim:
    """A simulator on a fake clock that starts at 1000 s; ``at(t)`` collects t seconds in."""

    def __init__(self, **kwargs) -> None:
        self.now = 1000.0
        self.reader = InMemoryMetricReader()
        self.provider = MeterProvider(metric_readers=[self.reader], shutdown_on_exit=False)
        self.collector = SimulatedGpuCollector(clock=lambda: self.now, **kwargs)
        self.collector.register(self.provider.get_meter("test"))

    def at(self, t: float) -> dict[str, list[tuple[dict, float]]]:
        self.now = 1000.0 + t
        out: dict[str, list[tuple[dict, float]]] = {}
        for rm in self.reader.get_metrics_data().resource_metrics:
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    out.setdefault(metric.name, []).extend(
                        (dict(p.attributes), p.value) for p in metric.data.data_points)
        return out

    def close(self) -> None:
        self.collector.close()
        self.provider.shutdown()


def of(pts, name: str, gpu: int, **attrs) -> float:
    want = {"gpu.index": str(gpu), **{k.replace("_", "."): v for k, v in attrs.items()}}
    found = [v for a, v in pts.get(name, []) if all(a.get(k) == w for k, w in want.items())]
    assert len(found) == 1, (name, want)
    return found[0]


def throttled(pts, gpu: int) -> set[str]:
    return {a["gpu.throttle.reason"] for a, v in pts["gpu.throttle"] if a["gpu.index"] == str(gpu) and v}


@pytest.fixture
def sim(request):
    made: list[Sim] = []

    def make(**kwargs) -> Sim:
        made.append(Sim(**kwargs))
        return made[-1]

    yield make
    for s in made:
        s.close()


def test_values_stay_within_realistic_bounds(sim):
    s = sim(gpus=8, seed=3)
    energy = {g: 0.0 for g in range(8)}
    for t in range(0, 1400, 11):
        pts = s.at(t)
        per_gpu = {(name, a["gpu.index"]): v for name, series in pts.items() for a, v in series}
        for g in range(8):

            def get(name: str, g: int = g, per_gpu: dict = per_gpu) -> float:
                return per_gpu[(name, str(g))]

            assert 0.0 <= get("gpu.utilization") <= 1.0
            used, free, total = get("gpu.memory.used"), get("gpu.memory.free"), get("gpu.memory.total")
            assert total == H100.memory_bytes and used + free == total and 0 < used < total
            assert 30.0 <= get("gpu.temperature") <= 85.0
            assert 30.0 <= get("gpu.memory.temperature") <= 85.0
            assert 0.0 < get("gpu.power.draw") <= 700.0
            assert 345 <= get("gpu.clock.sm") <= 1980
            assert get("gpu.energy") >= energy[g]
            energy[g] = get("gpu.energy")
            assert get("gpu.xid.last") == 0
            for name in ("gpu.sm.activity", "gpu.sm.occupancy", "gpu.tensor.activity", "gpu.dram.activity"):
                assert 0.0 <= get(name) <= 1.0
        assert {a["gpu.throttle.reason"] for a, v in pts["gpu.throttle"] if v} <= {"gpu_idle"}
        assert "gpu.xid.errors" not in pts
    pts = s.at(100)  # training
    assert min(of(pts, "gpu.utilization", g) for g in range(8)) > 0.9
    assert min(of(pts, "gpu.memory.used", g) for g in range(8)) > 60 * GiB
    assert min(of(pts, "gpu.power.draw", g) for g in range(8)) > 550
    pts = s.at(30 + 300 - 5)  # the checkpoint dip, on every GPU at once
    assert max(of(pts, "gpu.utilization", g) for g in range(8)) < 0.15
    assert of(pts, "gpu.pcie.throughput", 0, gpu_io_direction="tx") > 1e9


def test_every_series_is_marked_simulated_and_uses_the_table(sim):
    pts = sim(gpus=2).at(100)
    assert set(pts) <= set(METRICS_BY_NAME)
    for series in pts.values():
        for attrs, _ in series:
            assert attrs["gpu.source"] == "simulated" and attrs["stethoscope.simulated"] == "true"
            assert set(GPU_ATTRIBUTES) <= set(attrs)
    attrs = pts["gpu.temperature"][0][0]
    assert attrs["gpu.model"] == "NVIDIA H100 80GB HBM3" and attrs["gpu.uuid"].startswith("GPU-")
    assert len({a["gpu.uuid"] for a, _ in pts["gpu.temperature"]}) == 2


def test_deterministic_given_seed_and_clock(sim):
    a, b, c = sim(gpus=4, seed=7), sim(gpus=4, seed=7), sim(gpus=4, seed=8)
    for t in (5, 64, 300, 333.5):
        assert a.at(t) == b.at(t)
    assert a.at(400) != c.at(400)


def test_thermal_throttle(sim):
    s = sim(gpus=4, incidents=[ThermalThrottle(gpu=2, start_s=100, duration_s=60)])
    before, during, after = s.at(95), s.at(130), s.at(175)
    assert of(before, "gpu.temperature", 2) < 85 and throttled(before, 2) == set()
    assert of(during, "gpu.temperature", 2) > 85
    assert throttled(during, 2) == {"hw_thermal_slowdown", "sw_thermal_slowdown"}
    assert of(during, "gpu.clock.sm", 2) < of(during, "gpu.clock.sm", 1) == 1980
    assert of(during, "gpu.temperature", 1) < 85 and throttled(during, 1) == set()
    assert of(after, "gpu.temperature", 2) < 85 and throttled(after, 2) == set()
    assert of(after, "gpu.clock.sm", 2) == 1980


def test_xid_events_are_counted_at_their_time(sim):
    s = sim(gpus=4, incidents=[Xid(gpu=3, at_s=50), Xid(gpu=3, at_s=80), Xid(gpu=3, at_s=90, code=48)])
    pts = s.at(40)
    assert "gpu.xid.errors" not in pts and of(pts, "gpu.xid.last", 3) == 0
    pts = s.at(60)
    assert of(pts, "gpu.xid.errors", 3, gpu_xid="79") == 1 and of(pts, "gpu.xid.last", 3) == 79
    pts = s.at(100)
    assert of(pts, "gpu.xid.errors", 3, gpu_xid="79") == 2
    assert of(pts, "gpu.xid.errors", 3, gpu_xid="48") == 1
    assert of(pts, "gpu.xid.last", 3) == 48 and of(pts, "gpu.xid.last", 2) == 0
    assert {a["gpu.index"] for a, _ in pts["gpu.xid.errors"]} == {"3"}


def test_memory_leak_grows_until_nearly_full(sim):
    s = sim(gpus=2, incidents=[MemoryLeak(gpu=0, start_s=60, bytes_per_s=1 * GiB)])
    base = of(s.at(55), "gpu.memory.used", 0)
    grown = of(s.at(70), "gpu.memory.used", 0)
    assert grown - base == pytest.approx(10 * GiB, abs=256 << 20)
    full = s.at(5000)
    assert H100.memory_bytes - of(full, "gpu.memory.used", 0) == 300 << 20
    assert of(full, "gpu.memory.free", 0) > 0
    assert of(full, "gpu.memory.used", 1) == pytest.approx(of(s.at(55), "gpu.memory.used", 1), abs=256 << 20)


def test_idle_waiting_on_input(sim):
    s = sim(gpus=2, incidents=[IdleWaitingOnInput(gpu=1, start_s=100, duration_s=50)])
    busy = s.at(90)
    idle = s.at(120)
    back = s.at(160)
    assert of(busy, "gpu.utilization", 1) > 0.9
    assert of(idle, "gpu.utilization", 1) < 0.03 and of(idle, "gpu.tensor.activity", 1) < 0.03
    assert of(idle, "gpu.memory.used", 1) == pytest.approx(of(busy, "gpu.memory.used", 1), abs=256 << 20)
    assert of(idle, "gpu.memory.used", 1) > 60 * GiB
    assert of(idle, "gpu.power.draw", 1) < 100 and throttled(idle, 1) == {"gpu_idle"}
    assert of(idle, "gpu.utilization", 0) > 0.9
    assert of(back, "gpu.utilization", 1) > 0.9


def test_energy_integrates_power(sim):
    s = sim(gpus=1)
    e0 = of(s.at(100), "gpu.energy", 0)
    e1 = of(s.at(110), "gpu.energy", 0)
    assert 10 * 550 < e1 - e0 < 10 * 700


def test_bad_configuration_lists_every_problem():
    with pytest.raises(ConfigError) as info:
        SimulatedGpuCollector(gpus=2, incidents=[ThermalThrottle(gpu=5, start_s=-1, duration_s=0),
                                                 Xid(gpu=0, at_s=1, code=0), "overheat"])
    assert len(info.value.problems) == 5
    with pytest.raises(ConfigError, match="gpus"):
        SimulatedGpuCollector(gpus=0)


def test_a_thermal_incident_asks_the_agent_to_collect_fast():
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from stethoscope.agents.gpu.detect import GpuCollector
    from stethoscope.agents.gpu.simulate import SimulatedGpuCollector, ThermalThrottle

    now = [0.0]
    sim = SimulatedGpuCollector(gpus=2, incidents=(ThermalThrottle(gpu=1, start_s=300, duration_s=300),),
                                clock=lambda: now[0])
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    try:
        sim.register(provider.get_meter("t"))
        seen = []
        for t in (10, 20, 30, 40, 190, 200, 210, 220, 230, 310, 320, 330, 340):
            now[0] = float(t)
            reader.get_metrics_data()
            seen.append(sim.wants_fast())
        assert any(seen[:4])  # the job starting: memory fills, utilization jumps
        assert seen[5:9] == [False] * 4  # steady training load: base interval
        assert any(seen[9:])  # the GPU heats past 85 °C: collect fast
    finally:
        provider.shutdown()
        sim.close()
    assert GpuCollector(simulate_gpus=0).wants_fast() is False  # undecided source: no hint
