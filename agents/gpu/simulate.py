"""A simulated GPU node: realistic H100 series, and scripted incidents, without a GPU.

Each simulated GPU behaves like an H100 SXM (80 GB HBM3, 700 W cap) running a
data-parallel training job: a 30 s loading phase, then ~95 % utilization with a
15 s checkpoint dip every 5 minutes. Values are a pure function of the seed and
the time since :meth:`SimulatedGpuCollector.register` (read from ``clock``), except
``gpu.energy``, which integrates power between collections. The series carry the
same names and attributes as NVML's, plus ``gpu.source = "simulated"`` and
``stethoscope.simulated = "true"``.

Incidents are small frozen dataclasses with times relative to the start:
:class:`ThermalThrottle`, :class:`Xid`, :class:`MemoryLeak` and
:class:`IdleWaitingOnInput`.

Examples:
    >>> from opentelemetry.sdk.metrics import MeterProvider
    >>> from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    >>> now = [0.0]
    >>> sim = SimulatedGpuCollector(gpus=2, incidents=[Xid(gpu=1, at_s=60)], clock=lambda: now[0])
    >>> reader = InMemoryMetricReader()
    >>> provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    >>> sim.register(provider.get_meter("doctest"))
    >>> now[0] = 120.0
    >>> xids = [(dict(p.attributes)["gpu.index"], dict(p.attributes)["gpu.xid"], p.value)
    ...         for rm in reader.get_metrics_data().resource_metrics for sm in rm.scope_metrics
    ...         for m in sm.metrics if m.name == "gpu.xid.errors" for p in m.data.data_points]
    >>> xids
    [('1', '79', 1)]
    >>> provider.shutdown()
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from opentelemetry.metrics import Meter

from stethoscope.errors import ConfigError

from . import names as n
from .names import Readings, SnapshotCache, register_instruments, throttle_states

__all__ = [
    "H100",
    "GpuProfile",
    "IdleWaitingOnInput",
    "Incident",
    "MemoryLeak",
    "SimulatedGpuCollector",
    "ThermalThrottle",
    "Xid",
]

_MiB = 1 << 20
_GiB = 1 << 30


@dataclass(frozen=True)
class GpuProfile:
    """The board a simulated GPU imitates."""

    model: str
    memory_bytes: int
    power_cap_w: float
    idle_power_w: float
    sm_clock_mhz: int
    idle_sm_clock_mhz: int
    memory_clock_mhz: int
    reserved_bytes: int


H100 = GpuProfile(model="NVIDIA H100 80GB HBM3", memory_bytes=81559 * _MiB, power_cap_w=700.0,
                  idle_power_w=72.0, sm_clock_mhz=1980, idle_sm_clock_mhz=345, memory_clock_mhz=2619,
                  reserved_bytes=539 * _MiB)
"""An H100 SXM5 as NVML reports it."""


# -- incidents ----------------------------------------------------------------------


@dataclass(frozen=True)
class ThermalThrottle:
    """Cooling fails: temperature climbs past 85 °C, thermal slowdown pulls the SM clock down."""

    gpu: int
    start_s: float
    duration_s: float

    def active(self, t: float) -> bool:
        return self.start_s <= t < self.start_s + self.duration_s


@dataclass(frozen=True)
class Xid:
    """One XID error event (79: the GPU has fallen off the bus)."""

    gpu: int
    at_s: float
    code: int = 79


@dataclass(frozen=True)
class MemoryLeak:
    """Memory in use grows by ``bytes_per_s`` from ``start_s`` until the GPU is nearly full."""

    gpu: int
    start_s: float
    bytes_per_s: float


@dataclass(frozen=True)
class IdleWaitingOnInput:
    """The job starves for input: utilization near zero while its memory stays allocated."""

    gpu: int
    start_s: float
    duration_s: float

    def active(self, t: float) -> bool:
        return self.start_s <= t < self.start_s + self.duration_s


Incident = ThermalThrottle | Xid | MemoryLeak | IdleWaitingOnInput


def _problems(gpus: object, incidents: Sequence[object]) -> list[str]:
    problems: list[str] = []
    if not isinstance(gpus, int) or isinstance(gpus, bool) or not 1 <= gpus <= 1024:
        problems.append(f"simulate.gpus: must be an integer 1..1024, got {gpus!r}")
        gpus = 1 << 30
    for i, inc in enumerate(incidents):
        where = f"simulate.incidents[{i}]"
        if not isinstance(inc, (ThermalThrottle, Xid, MemoryLeak, IdleWaitingOnInput)):
            problems.append(f"{where}: not an incident: {inc!r}")
            continue
        if not 0 <= inc.gpu < gpus:  # type: ignore[operator]
            problems.append(f"{where}: gpu {inc.gpu} is not one of the simulated GPUs")
        start = inc.at_s if isinstance(inc, Xid) else inc.start_s
        if not start >= 0:
            problems.append(f"{where}: time must be >= 0 s, got {start!r}")
        if isinstance(inc, (ThermalThrottle, IdleWaitingOnInput)) and not inc.duration_s > 0:
            problems.append(f"{where}: duration_s must be > 0, got {inc.duration_s!r}")
        if isinstance(inc, MemoryLeak) and not inc.bytes_per_s > 0:
            problems.append(f"{where}: bytes_per_s must be > 0, got {inc.bytes_per_s!r}")
        if isinstance(inc, Xid) and not 0 < inc.code < 1 << 16:
            problems.append(f"{where}: XID code must be 1..65535, got {inc.code!r}")
    return problems


# -- deterministic noise --------------------------------------------------------------

_MASK = (1 << 64) - 1


def _mix(*parts: int) -> int:
    """splitmix64 over ``parts``: the same inputs give the same 64 bits on every run."""
    x = 0x9E3779B97F4A7C15
    for part in parts:
        x = (x + (part & _MASK) + 0x9E3779B97F4A7C15) & _MASK
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
        x ^= x >> 31
    return x


def _jitter(seed: int, gpu: int, key: int, t: float) -> float:
    """Noise in [-1, 1), constant within each second."""
    return _mix(seed, gpu, key, int(t)) / float(1 << 63) - 1.0


_HGX_BUSES = (0x18, 0x2A, 0x3A, 0x5D, 0x9A, 0xAB, 0xBA, 0xDB)
_LOADING_S, _PERIOD_S, _CHECKPOINT_S = 30.0, 300.0, 15.0


class SimulatedGpuCollector:
    """Simulated GPU metrics; registered as the ``simulate`` collector.

    ``gpus`` simulated boards (indexes 0..gpus-1), noise from ``seed``, time from
    ``clock`` (seconds; the start is taken at :meth:`register`).
    """

    def __init__(self, *, name: str = "simulate", gpus: int = 8, seed: int = 0,
                 incidents: Iterable[Incident] = (), clock: Callable[[], float] = time.monotonic,
                 profile: GpuProfile = H100) -> None:
        incidents = tuple(incidents)
        problems = _problems(gpus, incidents)
        if problems:
            raise ConfigError(problems)
        self.name, self.gpus, self.seed, self.incidents = name, gpus, seed, incidents
        self.profile = profile
        self._clock = clock
        self._lock = threading.Lock()
        self._start: float | None = None
        self._energy_j = [1.0e6 + 5.0e4 * (_mix(seed, g, 7) % 1000) for g in range(gpus)]
        self._last_t: float | None = None
        self._attrs = [self._identity(g) for g in range(gpus)]
        self._job_bytes = [60 * _GiB + (_mix(seed, g, 11) % (6 * 1024)) * _MiB for g in range(gpus)]
        self._cache = SnapshotCache(self._snapshot, clock=clock)

    def _identity(self, g: int) -> dict[str, str]:
        h = f"{_mix(self.seed, g, 1):016x}{_mix(self.seed, g, 2):016x}"
        bus = _HGX_BUSES[g] if g < len(_HGX_BUSES) else 0xE0 + g % 0x1F
        return {n.GPU_INDEX: str(g), n.GPU_UUID: f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}",
                n.GPU_MODEL: self.profile.model, n.GPU_PCI_BUS_ID: f"00000000:{bus:02X}:00.0",
                n.GPU_DEVICE: f"nvidia{g}", n.SOURCE: "simulated", n.SIMULATED: "true"}

    def register(self, meter: Meter) -> None:
        """Start the simulated clock and create the GPU instruments on ``meter``."""
        with self._lock:
            if self._start is None:
                self._start = self._clock()
        register_instruments(meter, self._cache.get)

    def wants_fast(self) -> bool:
        """True while a GPU signal moves fast; the agent then collects at its fast interval."""
        return self._cache.moving

    def close(self) -> None:
        """Nothing to release; idempotent."""
        self._cache.clear()

    # -- the model ---------------------------------------------------------------------

    def _of(self, kind: type, g: int) -> list:
        return [i for i in self.incidents if isinstance(i, kind) and i.gpu == g]

    def _snapshot(self) -> Readings:
        out = Readings()
        with self._lock:
            if self._start is None:
                return out
            t = max(self._clock() - self._start, 0.0)
            dt = 0.0 if self._last_t is None else max(t - self._last_t, 0.0)
            self._last_t = t
            for g in range(self.gpus):
                self._gpu(g, t, dt, out)
        return out

    def _gpu(self, g: int, t: float, dt: float, out: Readings) -> None:
        p, a, seed = self.profile, self._attrs[g], self.seed
        noise = lambda key: _jitter(seed, g, key, t)  # noqa: E731

        if t < _LOADING_S:
            phase, util = "loading", 0.05 + 0.03 * noise(1)
        elif (t - _LOADING_S) % _PERIOD_S >= _PERIOD_S - _CHECKPOINT_S:
            phase, util = "checkpoint", 0.08 + 0.03 * noise(1)
        else:
            phase, util = "training", 0.95 + 0.03 * noise(1)
        idle = any(i.active(t) for i in self._of(IdleWaitingOnInput, g))
        if idle:
            util = 0.01 + 0.01 * noise(1)
        util = min(max(util, 0.0), 1.0)
        busy = util > 0.2

        throttles = [i for i in self._of(ThermalThrottle, g) if i.active(t)]
        reasons = 0
        sm_clock = p.sm_clock_mhz if busy else p.idle_sm_clock_mhz
        power = p.idle_power_w + (p.power_cap_w - p.idle_power_w - 40.0) * util + 8.0 * noise(2)
        temperature = 32.0 + 45.0 * util + 1.5 * noise(3)
        if not busy:
            reasons |= 0x001  # gpu_idle
        if throttles:
            ramp = min((t - throttles[0].start_s) / 20.0, 1.0)
            temperature = 86.0 + 6.0 * ramp + 0.5 * noise(3)
            sm_clock = int(p.sm_clock_mhz - 700 * min((t - throttles[0].start_s) / 10.0, 1.0)) if busy \
                else p.idle_sm_clock_mhz
            power *= 0.7
            reasons |= 0x020 | 0x040  # sw_thermal_slowdown, hw_thermal_slowdown
        power = min(max(power, p.idle_power_w * 0.9), p.power_cap_w)
        memory_temperature = min(temperature + 4.0 + noise(4), 84.0) if not throttles else temperature + 5.0

        job = self._job_bytes[g] * (min(t / _LOADING_S, 1.0) if phase == "loading" else 1.0)
        job += 64 * _MiB * noise(5)
        for leak in self._of(MemoryLeak, g):
            if t > leak.start_s:
                job += leak.bytes_per_s * (t - leak.start_s)
        used = int(min(p.reserved_bytes + max(job, 0.0), p.memory_bytes - 300 * _MiB))
        self._energy_j[g] += power * dt

        out.add("gpu.utilization", round(util, 4), a)
        out.add("gpu.memory_controller.utilization", round(util * 0.55, 4), a)
        out.add("gpu.decoder.utilization", 0.0, a)
        out.add("gpu.memory.used", used, a)
        out.add("gpu.memory.free", p.memory_bytes - used, a)
        out.add("gpu.memory.total", p.memory_bytes, a)
        out.add("gpu.temperature", round(temperature, 1), a)
        out.add("gpu.memory.temperature", round(memory_temperature, 1), a)
        out.add("gpu.power.draw", round(power, 3), a)
        out.add("gpu.power.limit", p.power_cap_w, a)
        out.add("gpu.energy", round(self._energy_j[g], 3), a)
        out.add("gpu.clock.sm", sm_clock, a)
        out.add("gpu.clock.memory", p.memory_clock_mhz, a)
        for reason, on in throttle_states(reasons).items():
            out.add("gpu.throttle", on, {**a, n.THROTTLE_REASON: reason})
        for kind in ("corrected", "uncorrected"):
            out.add("gpu.ecc.errors", 0, {**a, n.ECC_TYPE: kind})
        for kind in ("correctable", "uncorrectable"):
            out.add("gpu.remapped_rows", 0, {**a, n.REMAP_TYPE: kind})
        out.add("gpu.row_remap.pending", 0, a)
        out.add("gpu.row_remap.failure", 0, a)
        rx = (2.0e9 * util + 0.2e9 * noise(6)) if phase == "training" else 0.05e9
        tx = 9.0e9 if phase == "checkpoint" else 0.3e9 * util
        out.add("gpu.pcie.throughput", max(tx, 0.0), {**a, n.IO_DIRECTION: "tx"})
        out.add("gpu.pcie.throughput", max(rx, 0.0), {**a, n.IO_DIRECTION: "rx"})
        out.add("gpu.pcie.replay", 0, a)
        nvlink = max(180.0e9 * util + 5.0e9 * noise(7), 0.0) if phase == "training" and not idle else 0.0
        out.add("gpu.nvlink.throughput", nvlink, {**a, n.IO_DIRECTION: "tx"})
        out.add("gpu.nvlink.throughput", nvlink, {**a, n.IO_DIRECTION: "rx"})
        out.add("gpu.sm.activity", round(util * 0.85, 4), a)
        out.add("gpu.sm.occupancy", round(util * 0.45, 4), a)
        out.add("gpu.tensor.activity", round(util * 0.6, 4), a)
        out.add("gpu.dram.activity", round(util * 0.5, 4), a)
        out.add("gpu.graphics_engine.activity", round(min(util * 1.02, 1.0), 4), a)
        out.add("gpu.process.memory.used", int(max(used - p.reserved_bytes, 0)),
                {**a, n.PROCESS_PID: 4100 + g, n.CONTAINER_ID: f"{_mix(seed, 99):016x}" * 4,
                 n.K8S_POD_UID: self._pod_uid()})

        happened = sorted((x for x in self._of(Xid, g) if x.at_s <= t), key=lambda x: x.at_s)
        out.add("gpu.xid.last", happened[-1].code if happened else 0, a)
        counts: dict[int, int] = {}
        for x in happened:
            counts[x.code] = counts.get(x.code, 0) + 1
        for code, count in sorted(counts.items()):
            out.add("gpu.xid.errors", count, {**a, n.XID: str(code)})

    def _pod_uid(self) -> str:
        h = f"{_mix(self.seed, 98):016x}{_mix(self.seed, 97):016x}"
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"
