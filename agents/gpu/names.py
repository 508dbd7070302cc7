"""The one table of GPU metric names, units, kinds and attributes, and its wiring.

Every GPU source (NVML, dcgm-exporter, the simulator) emits the series listed in
:data:`METRICS` and nothing else under ``gpu.``, so a dashboard or an alert
never needs to know which source fed it. A source builds one
:class:`Readings` per collection cycle; :func:`register_instruments` turns the
table into observable instruments whose callbacks read from that snapshot.

GPU identity attributes (strings): ``gpu.index``, ``gpu.uuid``, ``gpu.model``,
``gpu.pci_bus_id``, ``gpu.device`` (``nvidia0``), ``gpu.source`` and, for a MIG
instance, ``gpu.mig.profile`` and ``gpu.mig.instance``. Host and node names come
from the resource and are never repeated on a series.

Examples:
    >>> METRICS_BY_NAME["gpu.power.draw"].unit, METRICS_BY_NAME["gpu.energy"].kind
    ('W', 'counter')
    >>> sorted(throttle_states(0x48).items())[:3]
    [('applications_clocks_setting', 0), ('display_clock_setting', 0), ('gpu_idle', 0)]
    >>> sorted(r for r, on in throttle_states(0x48).items() if on)
    ['hw_slowdown', 'hw_thermal_slowdown']
    >>> points = Readings()
    >>> points.add("gpu.temperature", 41, {"gpu.index": "0"})
    >>> [o.value for o in points.get("gpu.temperature")], points.get("gpu.utilization")
    ([41], [])
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

from opentelemetry.metrics import CallbackOptions, Meter, Observation
from opentelemetry.util.types import AttributeValue

__all__ = [
    "Attributes",
    "GPU_ATTRIBUTES",
    "InstrumentKind",
    "METRICS",
    "METRICS_BY_NAME",
    "MetricSpec",
    "Readings",
    "SnapshotCache",
    "THROTTLE_REASONS",
    "register_instruments",
    "throttle_states",
    # attribute keys
    "CONTAINER_ID", "ECC_TYPE", "GPU_DEVICE", "GPU_INDEX", "GPU_MODEL", "GPU_PCI_BUS_ID",
    "GPU_UUID", "IO_DIRECTION", "K8S_CONTAINER_NAME", "K8S_NAMESPACE_NAME", "K8S_POD_NAME",
    "K8S_POD_UID", "MIG_INSTANCE", "MIG_PROFILE", "PROCESS_PID", "REMAP_TYPE",
    "RETIREMENT_CAUSE", "SIMULATED", "SOURCE", "THROTTLE_REASON", "XID",
]

_log = logging.getLogger(__name__)

InstrumentKind = Literal["gauge", "counter"]
"""``gauge`` is an observable gauge; ``counter`` an observable monotonic counter."""

Attributes = Mapping[str, AttributeValue]

# -- attribute keys ---------------------------------------------------------------

GPU_INDEX = "gpu.index"
GPU_UUID = "gpu.uuid"
GPU_MODEL = "gpu.model"
GPU_PCI_BUS_ID = "gpu.pci_bus_id"
GPU_DEVICE = "gpu.device"
MIG_PROFILE = "gpu.mig.profile"
MIG_INSTANCE = "gpu.mig.instance"
SOURCE = "gpu.source"
SIMULATED = "stethoscope.simulated"
THROTTLE_REASON = "gpu.throttle.reason"
ECC_TYPE = "gpu.ecc.type"
RETIREMENT_CAUSE = "gpu.retired_pages.cause"
REMAP_TYPE = "gpu.remapped_rows.type"
IO_DIRECTION = "gpu.io.direction"
XID = "gpu.xid"
PROCESS_PID = "process.pid"
CONTAINER_ID = "container.id"
K8S_POD_UID = "k8s.pod.uid"
K8S_POD_NAME = "k8s.pod.name"
K8S_NAMESPACE_NAME = "k8s.namespace.name"
K8S_CONTAINER_NAME = "k8s.container.name"

GPU_ATTRIBUTES: tuple[str, ...] = (GPU_INDEX, GPU_UUID, GPU_MODEL, GPU_PCI_BUS_ID, GPU_DEVICE, SOURCE)
"""Identity attributes on every GPU series (MIG series add the two ``gpu.mig.*`` keys)."""

THROTTLE_REASONS: tuple[tuple[int, str], ...] = (
    (0x001, "gpu_idle"),
    (0x002, "applications_clocks_setting"),
    (0x004, "sw_power_cap"),
    (0x008, "hw_slowdown"),
    (0x010, "sync_boost"),
    (0x020, "sw_thermal_slowdown"),
    (0x040, "hw_thermal_slowdown"),
    (0x080, "hw_power_brake_slowdown"),
    (0x100, "display_clock_setting"),
)
"""Clock-event bit (NVML ``nvmlClocksEventReason*``, DCGM ``CLOCKS_EVENT_REASONS``) -> reason."""


def throttle_states(mask: int) -> dict[str, int]:
    """Split a clock-event bitmask into one 0/1 value per reason in :data:`THROTTLE_REASONS`."""
    return {reason: int(bool(mask & bit)) for bit, reason in THROTTLE_REASONS}


# -- the table ----------------------------------------------------------------------


@dataclass(frozen=True)
class MetricSpec:
    """One GPU metric: what it is called, measured in, and read from."""

    name: str
    unit: str
    kind: InstrumentKind
    description: str
    attributes: tuple[str, ...] = ()
    """Keys beyond the GPU identity attributes."""
    nvml: str = ""
    """The NVML call it comes from ("" when NVML has none)."""
    dcgm: str = ""
    """The dcgm-exporter field(s) it comes from ("" when dcgm-exporter has none)."""


def _m(name: str, unit: str, kind: InstrumentKind, description: str, attributes: tuple[str, ...] = (),
       nvml: str = "", dcgm: str = "") -> MetricSpec:
    return MetricSpec(name, unit, kind, description, attributes, nvml, dcgm)


METRICS: tuple[MetricSpec, ...] = (
    _m("gpu.utilization", "1", "gauge", "Fraction of the last sample period a kernel was running.",
       nvml="nvmlDeviceGetUtilizationRates .gpu / 100", dcgm="DCGM_FI_DEV_GPU_UTIL / 100"),
    _m("gpu.memory_controller.utilization", "1", "gauge",
       "Fraction of the last sample period device memory was read or written.",
       nvml="nvmlDeviceGetUtilizationRates .memory / 100", dcgm="DCGM_FI_DEV_MEM_COPY_UTIL / 100"),
    _m("gpu.encoder.utilization", "1", "gauge", "Video encoder utilization.",
       nvml="nvmlDeviceGetEncoderUtilization / 100", dcgm="DCGM_FI_DEV_ENC_UTIL / 100"),
    _m("gpu.decoder.utilization", "1", "gauge", "Video decoder utilization.",
       nvml="nvmlDeviceGetDecoderUtilization / 100", dcgm="DCGM_FI_DEV_DEC_UTIL / 100"),
    _m("gpu.memory.used", "By", "gauge", "Device memory in use, driver-reserved memory included.",
       nvml="nvmlDeviceGetMemoryInfo .used", dcgm="(DCGM_FI_DEV_FB_USED + DCGM_FI_DEV_FB_RESERVED) MiB"),
    _m("gpu.memory.free", "By", "gauge", "Device memory free.",
       nvml="nvmlDeviceGetMemoryInfo .free", dcgm="DCGM_FI_DEV_FB_FREE MiB"),
    _m("gpu.memory.total", "By", "gauge", "Device memory installed.",
       nvml="nvmlDeviceGetMemoryInfo .total",
       dcgm="DCGM_FI_DEV_FB_TOTAL MiB, else FB_USED + FB_FREE + FB_RESERVED"),
    _m("gpu.temperature", "Cel", "gauge", "GPU die temperature.",
       nvml="nvmlDeviceGetTemperature(NVML_TEMPERATURE_GPU)", dcgm="DCGM_FI_DEV_GPU_TEMP"),
    _m("gpu.memory.temperature", "Cel", "gauge", "HBM temperature.",
       nvml="nvmlDeviceGetFieldValues(NVML_FI_DEV_MEMORY_TEMP)", dcgm="DCGM_FI_DEV_MEMORY_TEMP"),
    _m("gpu.power.draw", "W", "gauge", "Board power draw.",
       nvml="nvmlDeviceGetPowerUsage mW / 1000", dcgm="DCGM_FI_DEV_POWER_USAGE"),
    _m("gpu.power.limit", "W", "gauge", "Power limit the driver enforces.",
       nvml="nvmlDeviceGetEnforcedPowerLimit mW / 1000", dcgm="DCGM_FI_DEV_ENFORCED_POWER_LIMIT"),
    _m("gpu.energy", "J", "counter", "Energy consumed since the driver loaded.",
       nvml="nvmlDeviceGetTotalEnergyConsumption mJ / 1000",
       dcgm="DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION mJ / 1000"),
    _m("gpu.clock.sm", "MHz", "gauge", "SM clock.",
       nvml="nvmlDeviceGetClockInfo(NVML_CLOCK_SM)", dcgm="DCGM_FI_DEV_SM_CLOCK"),
    _m("gpu.clock.memory", "MHz", "gauge", "Memory clock.",
       nvml="nvmlDeviceGetClockInfo(NVML_CLOCK_MEM)", dcgm="DCGM_FI_DEV_MEM_CLOCK"),
    _m("gpu.throttle", "1", "gauge", "1 while this clock-event reason holds clocks down, else 0.",
       (THROTTLE_REASON,), nvml="nvmlDeviceGetCurrentClocksEventReasons bitmask",
       dcgm="DCGM_FI_DEV_CLOCKS_EVENT_REASONS (or DCGM_FI_DEV_CLOCK_THROTTLE_REASONS) bitmask"),
    _m("gpu.ecc.errors", "{error}", "counter", "ECC errors since the driver loaded (volatile).",
       (ECC_TYPE,), nvml="nvmlDeviceGetTotalEccErrors(type, NVML_VOLATILE_ECC)",
       dcgm="DCGM_FI_DEV_ECC_SBE_VOL_TOTAL (corrected), DCGM_FI_DEV_ECC_DBE_VOL_TOTAL (uncorrected)"),
    _m("gpu.retired_pages", "{page}", "counter", "Memory pages retired (pre-Ampere).",
       (RETIREMENT_CAUSE,), nvml="len(nvmlDeviceGetRetiredPages(cause))",
       dcgm="DCGM_FI_DEV_RETIRED_SBE (multiple_single_bit_ecc), DCGM_FI_DEV_RETIRED_DBE (double_bit_ecc)"),
    _m("gpu.remapped_rows", "{row}", "counter", "Memory rows remapped (Ampere and later).",
       (REMAP_TYPE,), nvml="nvmlDeviceGetRemappedRows [0] correctable, [1] uncorrectable",
       dcgm="DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS, DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS"),
    _m("gpu.row_remap.pending", "1", "gauge", "1 when a row remap waits for a GPU reset.",
       nvml="nvmlDeviceGetRemappedRows [2]", dcgm="DCGM_FI_DEV_ROW_REMAP_PENDING"),
    _m("gpu.row_remap.failure", "1", "gauge", "1 when a row remap has failed (the GPU needs service).",
       nvml="nvmlDeviceGetRemappedRows [3]", dcgm="DCGM_FI_DEV_ROW_REMAP_FAILURE"),
    _m("gpu.pcie.throughput", "By/s", "gauge", "PCIe bytes per second, by direction.",
       (IO_DIRECTION,), nvml="nvmlDeviceGetPcieThroughput(NVML_PCIE_UTIL_TX_BYTES/RX) KiB/s * 1024",
       dcgm="DCGM_FI_PROF_PCIE_TX_BYTES, DCGM_FI_PROF_PCIE_RX_BYTES"),
    _m("gpu.pcie.replay", "{replay}", "counter", "PCIe link replays.",
       nvml="nvmlDeviceGetPcieReplayCounter", dcgm="DCGM_FI_DEV_PCIE_REPLAY_COUNTER"),
    _m("gpu.nvlink.throughput", "By/s", "gauge", "NVLink data bytes per second, all links, by direction.",
       (IO_DIRECTION,),
       nvml="nvmlDeviceGetFieldValues(NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX/RX) KiB, rate between cycles",
       dcgm="DCGM_FI_PROF_NVLINK_TX_BYTES, DCGM_FI_PROF_NVLINK_RX_BYTES"),
    _m("gpu.process.memory.used", "By", "gauge", "Device memory used by one process.",
       (PROCESS_PID, CONTAINER_ID, K8S_POD_UID),
       nvml="nvmlDeviceGetComputeRunningProcesses + nvmlDeviceGetGraphicsRunningProcesses"),
    _m("gpu.xid.errors", "{error}", "counter", "XID errors, one count per event, by XID code.",
       (XID,), nvml="nvmlEventSetWait_v2 on nvmlEventTypeXidCriticalError"),
    _m("gpu.xid.last", "{xid}", "gauge", "The most recent XID code (0: none seen).",
       nvml="last event from nvmlEventSetWait_v2", dcgm="DCGM_FI_DEV_XID_ERRORS"),
    _m("gpu.sm.activity", "1", "gauge", "Fraction of SMs busy.",
       nvml="nvmlGpmMetricsGet(NVML_GPM_METRIC_SM_UTIL) / 100", dcgm="DCGM_FI_PROF_SM_ACTIVE"),
    _m("gpu.sm.occupancy", "1", "gauge", "Resident warps as a fraction of the maximum.",
       nvml="nvmlGpmMetricsGet(NVML_GPM_METRIC_SM_OCCUPANCY) / 100", dcgm="DCGM_FI_PROF_SM_OCCUPANCY"),
    _m("gpu.tensor.activity", "1", "gauge", "Fraction of time tensor cores were busy.",
       nvml="nvmlGpmMetricsGet(NVML_GPM_METRIC_ANY_TENSOR_UTIL) / 100",
       dcgm="DCGM_FI_PROF_PIPE_TENSOR_ACTIVE"),
    _m("gpu.dram.activity", "1", "gauge", "Fraction of peak device-memory bandwidth used.",
       nvml="nvmlGpmMetricsGet(NVML_GPM_METRIC_DRAM_BW_UTIL) / 100", dcgm="DCGM_FI_PROF_DRAM_ACTIVE"),
    _m("gpu.graphics_engine.activity", "1", "gauge", "Fraction of time the graphics/compute engine was busy.",
       nvml="nvmlGpmMetricsGet(NVML_GPM_METRIC_GRAPHICS_UTIL) / 100", dcgm="DCGM_FI_PROF_GR_ENGINE_ACTIVE"),
)
"""Every GPU metric any source emits."""

METRICS_BY_NAME: Mapping[str, MetricSpec] = MappingProxyType({m.name: m for m in METRICS})


# -- wiring -------------------------------------------------------------------------


class Readings:
    """Observations of one collection cycle, grouped by metric name."""

    __slots__ = ("_points",)

    def __init__(self) -> None:
        self._points: dict[str, list[Observation]] = {}

    def add(self, name: str, value: float, attributes: Attributes) -> None:
        """Record one point of ``name``."""
        self._points.setdefault(name, []).append(Observation(value, dict(attributes)))

    def get(self, name: str) -> list[Observation]:
        """The points of ``name`` (empty if none)."""
        return self._points.get(name, [])

    def names(self) -> list[str]:
        """Metric names with at least one point."""
        return list(self._points)


#: How far a signal must move between two snapshots for the agent to collect fast:
#: (metric, absolute change). Memory is judged as a share of the GPU's total.
FAST_THRESHOLDS: tuple[tuple[str, float], ...] = (
    ("gpu.temperature", 3.0),
    ("gpu.utilization", 0.3),
    ("gpu.power.draw", 100.0),
    ("gpu.throttle", 0.5),
    ("gpu.xid.last", 0.5),
)
FAST_MEMORY_SHARE = 0.02


def _key(attributes) -> tuple:
    return tuple(sorted((attributes or {}).items()))


def moving(previous: Readings | None, current: Readings) -> bool:
    """Whether a GPU signal moved fast enough between two snapshots to sample faster.

    >>> a, b = Readings(), Readings()
    >>> a.add("gpu.temperature", 60.0, {"gpu.index": "0"})
    >>> b.add("gpu.temperature", 64.5, {"gpu.index": "0"})
    >>> moving(a, b), moving(a, a), moving(None, b)
    (True, False, False)
    """
    if previous is None:
        return False
    for name, threshold in FAST_THRESHOLDS:
        before = {_key(o.attributes): o.value for o in previous.get(name)}
        for o in current.get(name):
            old = before.get(_key(o.attributes))
            if old is not None and abs(o.value - old) >= threshold:
                return True
    totals = {(o.attributes or {}).get(GPU_UUID): o.value for o in current.get("gpu.memory.total")}
    before = {_key(o.attributes): o.value for o in previous.get("gpu.memory.used")}
    for o in current.get("gpu.memory.used"):
        old, total = before.get(_key(o.attributes)), totals.get((o.attributes or {}).get(GPU_UUID))
        if old is not None and total and abs(o.value - old) >= FAST_MEMORY_SHARE * total:
            return True
    return False


class SnapshotCache:
    """Reads a source at most once per ``max_age_s``, so each instrument callback is O(1).

    After each fresh read, :attr:`moving` says whether a signal moved fast since the
    previous read (see :func:`moving`); collectors turn it into ``wants_fast()``.

    ``read`` must not raise; the age runs from the end of the last read, so a slow
    read is not repeated within one collection cycle.

    >>> calls = []
    >>> cache = SnapshotCache(lambda: calls.append(1) or Readings(), max_age_s=60)
    >>> _ = cache.get(); _ = cache.get(); len(calls)
    1
    """

    def __init__(self, read: Callable[[], Readings], *, max_age_s: float = 0.5,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._read, self._max_age_s, self._clock = read, max_age_s, clock
        self._lock = threading.Lock()
        self._snapshot: Readings | None = None
        self._taken_at = 0.0
        self.moving = False

    def get(self) -> Readings:
        """The current snapshot, refreshed when older than ``max_age_s``."""
        with self._lock:
            age = self._clock() - self._taken_at
            if self._snapshot is None or not 0 <= age < self._max_age_s:  # stale, or the clock went back
                previous, self._snapshot = self._snapshot, self._read()
                self._taken_at = self._clock()
                try:
                    self.moving = moving(previous, self._snapshot)
                except (TypeError, ValueError):  # a malformed reading must not break collection
                    self.moving = False
            return self._snapshot

    def clear(self) -> None:
        """Forget the snapshot; the next :meth:`get` reads the source."""
        with self._lock:
            self._snapshot = None


def register_instruments(meter: Meter, read: Callable[[], Readings], *,
                         specs: Iterable[MetricSpec] = METRICS) -> None:
    """Create one observable instrument per spec; each callback returns ``read().get(name)``.

    Callbacks never raise: a failing ``read`` is logged once and yields no points.
    """
    failed: list[bool] = []

    def make(name: str) -> Callable[[CallbackOptions], list[Observation]]:
        def callback(options: CallbackOptions) -> list[Observation]:
            try:
                return read().get(name)
            except Exception as exc:  # a callback must never raise
                if not failed:
                    failed.append(True)
                    _log.warning("GPU snapshot failed, points dropped (logged once): %r", exc)
                return []

        return callback

    for spec in specs:
        create = meter.create_observable_counter if spec.kind == "counter" else meter.create_observable_gauge
        create(spec.name, callbacks=[make(spec.name)], unit=spec.unit, description=spec.description)
