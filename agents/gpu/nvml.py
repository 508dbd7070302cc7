"""The NVML collector: every GPU on the node read through ``pynvml`` (nvidia-ml-py).

NVML is loaded when the collector is opened (``register`` opens it); a node
without a driver, or with a driver and library that disagree, gets a
:class:`~stethoscope.errors.PluginError` there and nothing afterwards. All
GPUs are read once per collection cycle into one snapshot (see
:class:`~stethoscope.agents.gpu.names.SnapshotCache`) that every instrument
callback shares. Per call:

* ``NVML_ERROR_NOT_SUPPORTED``: that series is skipped from then on for that GPU
  (noted once at DEBUG, listed in :attr:`NvmlCollector.unsupported`);
* ``NVML_ERROR_GPU_IS_LOST``: the GPU is marked lost (logged once at ERROR,
  listed in :attr:`NvmlCollector.lost`); the other GPUs are still served;
* any other error is counted in :attr:`NvmlCollector.errors` by call name.

XID errors are counted per event by a daemon thread waiting on an NVML event set.
Process memory is attributed to a container and pod by :func:`parse_cgroup`.

Examples:
    >>> parse_cgroup("0::/system.slice/docker-" + "ab" * 32 + ".scope").container_id[:8]
    'abababab'
    >>> NvmlCollector().name
    'nvml'
"""

from __future__ import annotations

import ctypes
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from opentelemetry.metrics import Meter

from stethoscope.errors import PluginError

from . import names as n
from .names import Readings, SnapshotCache, register_instruments, throttle_states

__all__ = ["NvmlCollector", "ProcessContainer", "parse_cgroup"]

_log = logging.getLogger(__name__)

# -- containers from /proc/<pid>/cgroup ---------------------------------------------

_CONTAINER_ID = re.compile(r"(?<![0-9a-f])[0-9a-f]{64}(?![0-9a-f])")
_POD_UID = re.compile(r"pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})")


@dataclass(frozen=True)
class ProcessContainer:
    """The container and Kubernetes pod a process runs in, where its cgroup says so."""

    container_id: str | None = None
    pod_uid: str | None = None

    def attributes(self) -> dict[str, str]:
        """``container.id`` and ``k8s.pod.uid``, only those that are known."""
        out: dict[str, str] = {}
        if self.container_id:
            out[n.CONTAINER_ID] = self.container_id
        if self.pod_uid:
            out[n.K8S_POD_UID] = self.pod_uid
        return out


def parse_cgroup(text: str) -> ProcessContainer:
    """Container id and pod UID from the text of ``/proc/<pid>/cgroup``.

    Handles cgroup v1 (``N:controller:/path``) and v2 (``0::/path``) lines, and
    the path shapes of Docker (``/docker/ID``, ``docker-ID.scope``), containerd
    (``cri-containerd-ID.scope``, ``/kubepods/.../podUID/ID``), CRI-O
    (``crio-ID.scope``) and Podman (``libpod-ID.scope``), with the kubelet's
    cgroupfs (``pod1b2c-...``) or systemd (``pod1b2c_...slice``) pod naming.

    >>> uid = "4f1c2a9e_77b0_4c1d_9a55_0e2b6f3d8c11"
    >>> parse_cgroup("0::/kubepods.slice/kubepods-burstable.slice/"
    ...              f"kubepods-burstable-pod{uid}.slice/crio-{'c' * 64}.scope").pod_uid
    '4f1c2a9e-77b0-4c1d-9a55-0e2b6f3d8c11'
    >>> parse_cgroup("0::/user.slice/session-3.scope")
    ProcessContainer(container_id=None, pod_uid=None)
    """
    container: str | None = None
    pod: str | None = None
    for line in text.splitlines():
        parts = line.strip().split(":", 2)
        if len(parts) != 3:
            continue
        path = parts[2].lower()
        if container is None:
            ids = _CONTAINER_ID.findall(path)
            if ids:
                container = ids[-1]  # the innermost scope, not a parent slice
        if pod is None:
            match = _POD_UID.search(path)
            if match:
                pod = match.group(1).replace("_", "-")
        if container and pod:
            break
    return ProcessContainer(container, pod)


# -- per-GPU state ------------------------------------------------------------------


@dataclass
class _Gpu:
    index: str
    handle: Any
    attrs: dict[str, str]
    lost: bool = False
    unsupported: set[str] = field(default_factory=set)
    fields: list[int] = field(default_factory=list)
    nvlink_prev: dict[int, tuple[int, int]] = field(default_factory=dict)  # field id -> (µs, KiB)
    gpm_samples: list[Any] = field(default_factory=list)  # [previous, current]
    gpm_primed: bool = False


def _address(handle: Any) -> int | None:
    try:
        return ctypes.cast(handle, ctypes.c_void_p).value
    except (TypeError, ctypes.ArgumentError):
        return None


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


class NvmlCollector:
    """GPU metrics from NVML; registered as the ``nvml`` collector.

    ``nvml`` is the ``pynvml`` module to use (tests pass a fake); ``max_age_s`` is
    how long one snapshot serves the instrument callbacks; ``event_timeout_ms``
    bounds each XID wait, so :meth:`close` returns within about that long;
    ``proc_root`` is where ``<pid>/cgroup`` files are read; ``clock`` times the
    snapshot's age.
    """

    def __init__(self, *, name: str = "nvml", nvml: ModuleType | Any | None = None,
                 max_age_s: float = 0.5, event_timeout_ms: int = 500, proc_root: str = "/proc",
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self._nv: Any = nvml
        self._event_timeout_ms = int(event_timeout_ms)
        self._proc_root = Path(proc_root)
        self._lock = threading.Lock()
        self._errors: dict[str, int] = {}
        self._warned: set[str] = set()
        self._gpus: list[_Gpu] = []
        self._by_address: dict[int, str] = {}
        self._xid_counts: dict[tuple[str, int], int] = {}
        self._xid_last: dict[str, int] = {}
        self._containers: dict[int, ProcessContainer] = {}
        self._cache = SnapshotCache(self._snapshot, max_age_s=max_age_s, clock=clock)
        self._opened = False
        self._stop = threading.Event()
        self._events: Any = None
        self._thread: threading.Thread | None = None

    # -- public state -----------------------------------------------------------------

    @property
    def errors(self) -> dict[str, int]:
        """Failed reads per NVML call (other than not-supported and GPU-lost), a copy."""
        with self._lock:
            return dict(self._errors)

    @property
    def gpu_count(self) -> int:
        """GPUs found when NVML was opened (0 before)."""
        return len(self._gpus)

    @property
    def lost(self) -> frozenset[str]:
        """``gpu.index`` of every GPU NVML reported lost."""
        return frozenset(g.index for g in self._gpus if g.lost)

    @property
    def unsupported(self) -> frozenset[tuple[str, str]]:
        """``(gpu.index, call)`` pairs NVML answered NOT_SUPPORTED; they are no longer asked."""
        return frozenset((g.index, what) for g in self._gpus for what in g.unsupported)

    @property
    def xid_counts(self) -> dict[tuple[str, int], int]:
        """XID events counted so far per ``(gpu.index, xid)``, a copy."""
        with self._lock:
            return dict(self._xid_counts)

    # -- lifecycle --------------------------------------------------------------------

    def open(self) -> None:
        """Load and initialise NVML and list the GPUs; idempotent.

        Raises :class:`~stethoscope.errors.PluginError` when ``pynvml`` is not
        installed, NVML cannot initialise, or it finds no GPU.
        """
        if self._opened:
            return
        if self._nv is None:
            try:
                import pynvml
            except ImportError as exc:
                raise PluginError("the NVML collector needs the 'nvidia-ml-py' package (import pynvml); "
                                  "install it with: pip install nvidia-ml-py") from exc
            self._nv = pynvml
        nv = self._nv
        try:
            nv.nvmlInit()
        except nv.NVMLError as exc:
            raise PluginError(f"NVML failed to initialise: {exc}") from exc
        try:
            count = nv.nvmlDeviceGetCount()
        except nv.NVMLError as exc:
            self._shutdown_quietly()
            raise PluginError(f"NVML could not list GPUs: {exc}") from exc
        gpus = [g for g in (self._discover(i) for i in range(count)) if g is not None]
        if not gpus:
            self._shutdown_quietly()
            raise PluginError(f"NVML initialised but found no usable GPU (count {count})")
        self._gpus = gpus
        self._by_address = {a: g.index for g in self._gpus if (a := _address(g.handle)) is not None}
        self._opened = True

    def register(self, meter: Meter) -> None:
        """Open NVML, start the XID watcher, and create every GPU instrument on ``meter``."""
        self.open()
        self._start_xid_watch()
        register_instruments(meter, self._cache.get)

    def wants_fast(self) -> bool:
        """True while a GPU signal moves fast; the agent then collects at its fast interval."""
        return self._cache.moving

    def close(self) -> None:
        """Stop the XID watcher, free NVML resources and shut NVML down; idempotent."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=self._event_timeout_ms / 1000 + 5)
        if not self._opened:
            return
        self._opened = False
        nv = self._nv
        if self._events is not None:
            self._quiet(lambda: nv.nvmlEventSetFree(self._events))
            self._events = None
        for g in self._gpus:
            for sample in g.gpm_samples:
                self._quiet(lambda s=sample: nv.nvmlGpmSampleFree(s))
            g.gpm_samples = []
        self._shutdown_quietly()
        self._cache.clear()

    def _shutdown_quietly(self) -> None:
        self._quiet(self._nv.nvmlShutdown)

    def _quiet(self, fn: Callable[[], Any]) -> None:
        try:
            fn()
        except Exception as exc:  # releasing must not fail the agent's shutdown
            _log.debug("nvml collector: release failed: %r", exc)

    # -- discovery --------------------------------------------------------------------

    def _discover(self, i: int) -> _Gpu | None:
        nv = self._nv
        try:
            handle = nv.nvmlDeviceGetHandleByIndex(i)
        except nv.NVMLError as exc:  # e.g. a GPU that fell off the bus before we started
            _log.error("nvml collector: GPU %d cannot be opened and is skipped: %s", i, exc)
            self._count_error("nvmlDeviceGetHandleByIndex", exc)
            return None
        g = _Gpu(index=str(i), handle=handle, attrs={n.GPU_INDEX: str(i), n.SOURCE: "nvml"})
        for key, read in ((n.GPU_UUID, nv.nvmlDeviceGetUUID), (n.GPU_MODEL, nv.nvmlDeviceGetName),
                          (n.GPU_PCI_BUS_ID, lambda h: nv.nvmlDeviceGetPciInfo(h).busId),
                          (n.GPU_DEVICE, lambda h: f"nvidia{nv.nvmlDeviceGetMinorNumber(h)}")):
            value = self._call(g, key, read, handle)
            if value is not None:
                g.attrs[key] = _text(value)
        g.fields = [nv.NVML_FI_DEV_MEMORY_TEMP, nv.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX,
                    nv.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX]
        support = self._call(g, "nvmlGpmQueryDeviceSupport", nv.nvmlGpmQueryDeviceSupport, handle)
        if support is not None and support.isSupportedDevice:
            try:
                g.gpm_samples = [nv.nvmlGpmSampleAlloc(), nv.nvmlGpmSampleAlloc()]
            except nv.NVMLError as exc:
                self._nvml_error(g, "nvmlGpmSampleAlloc", exc)
        return g

    # -- error handling ---------------------------------------------------------------

    def _call(self, g: _Gpu, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)``, or None when it failed or is known not to work on ``g``."""
        if g.lost or what in g.unsupported:
            return None
        try:
            return fn(*args)
        except self._nv.NVMLError as exc:
            self._nvml_error(g, what, exc)
            return None

    def _nvml_error(self, g: _Gpu, what: str, exc: Exception) -> None:
        nv = self._nv
        code = getattr(exc, "value", None)
        if code == nv.NVML_ERROR_NOT_SUPPORTED:
            g.unsupported.add(what)
            _log.debug("nvml collector: GPU %s does not support %s; series skipped", g.index, what)
        elif code == nv.NVML_ERROR_GPU_IS_LOST:
            if not g.lost:
                g.lost = True
                _log.error("nvml collector: GPU %s (%s) is lost (%s failed); its series stop, "
                           "the other GPUs are still read", g.index, g.attrs.get(n.GPU_UUID, "?"), what)
        else:
            self._count_error(what, exc)

    def _count_error(self, what: str, exc: BaseException) -> None:
        with self._lock:
            self._errors[what] = self._errors.get(what, 0) + 1
            first = what not in self._warned
            self._warned.add(what)
        if first:
            _log.warning("nvml collector: %s failed (logged once per call, counted in errors): %s", what, exc)

    # -- the snapshot -----------------------------------------------------------------

    def _snapshot(self) -> Readings:
        out = Readings()
        if not self._opened:
            return out
        seen_pids: set[int] = set()
        for g in self._gpus:
            if g.lost:
                continue
            try:
                self._read_gpu(g, out, seen_pids)
            except Exception as exc:  # one odd GPU or binding must not blank the others
                self._count_error("snapshot", exc)
        for pid in [p for p in self._containers if p not in seen_pids]:
            del self._containers[pid]
        return out

    def _read_gpu(self, g: _Gpu, out: Readings, seen_pids: set[int]) -> None:
        nv, h, a = self._nv, g.handle, g.attrs

        def call(what: str, fn: Callable[..., Any], *args: Any) -> Any:
            return self._call(g, what, fn, h, *args)

        util = call("nvmlDeviceGetUtilizationRates", nv.nvmlDeviceGetUtilizationRates)
        if util is not None:
            out.add("gpu.utilization", util.gpu / 100.0, a)
            out.add("gpu.memory_controller.utilization", util.memory / 100.0, a)
        for metric, what in (("gpu.encoder.utilization", "nvmlDeviceGetEncoderUtilization"),
                             ("gpu.decoder.utilization", "nvmlDeviceGetDecoderUtilization")):
            value = call(what, getattr(nv, what))
            if value is not None:
                out.add(metric, value[0] / 100.0, a)
        self._memory(g, "nvmlDeviceGetMemoryInfo", h, a, out)
        temp = call("nvmlDeviceGetTemperature", nv.nvmlDeviceGetTemperature, nv.NVML_TEMPERATURE_GPU)
        if temp is not None:
            out.add("gpu.temperature", temp, a)
        self._field_values(g, out)
        for metric, what in (("gpu.power.draw", "nvmlDeviceGetPowerUsage"),
                             ("gpu.power.limit", "nvmlDeviceGetEnforcedPowerLimit"),
                             ("gpu.energy", "nvmlDeviceGetTotalEnergyConsumption")):
            value = call(what, getattr(nv, what))
            if value is not None:
                out.add(metric, value / 1000.0, a)  # mW -> W, mJ -> J
        for metric, clock in (("gpu.clock.sm", nv.NVML_CLOCK_SM), ("gpu.clock.memory", nv.NVML_CLOCK_MEM)):
            value = call(f"nvmlDeviceGetClockInfo.{clock}", nv.nvmlDeviceGetClockInfo, clock)
            if value is not None:
                out.add(metric, value, a)
        reasons_fn = getattr(nv, "nvmlDeviceGetCurrentClocksEventReasons", None) \
            or nv.nvmlDeviceGetCurrentClocksThrottleReasons
        mask = call("nvmlDeviceGetCurrentClocksEventReasons", reasons_fn)
        if mask is not None:
            for reason, on in throttle_states(mask).items():
                out.add("gpu.throttle", on, {**a, n.THROTTLE_REASON: reason})
        self._memory_health(g, out)
        for direction, counter in (("tx", nv.NVML_PCIE_UTIL_TX_BYTES), ("rx", nv.NVML_PCIE_UTIL_RX_BYTES)):
            kib = call(f"nvmlDeviceGetPcieThroughput.{direction}", nv.nvmlDeviceGetPcieThroughput, counter)
            if kib is not None:
                out.add("gpu.pcie.throughput", kib * 1024.0, {**a, n.IO_DIRECTION: direction})
        replay = call("nvmlDeviceGetPcieReplayCounter", nv.nvmlDeviceGetPcieReplayCounter)
        if replay is not None:
            out.add("gpu.pcie.replay", replay, a)
        if g.lost:
            return
        mig = self._mig_instances(g)
        for mig_handle, mig_attrs in mig:
            self._memory(g, "nvmlDeviceGetMemoryInfo.mig", mig_handle, mig_attrs, out)
        self._processes(g, mig or [(h, a)], out, seen_pids)
        self._gpm(g, out)
        if self._thread is None:
            return  # no XID watcher: no XID series rather than a misleading 0
        with self._lock:
            out.add("gpu.xid.last", self._xid_last.get(g.index, 0), a)
            for (index, xid), count in self._xid_counts.items():
                if index == g.index:
                    out.add("gpu.xid.errors", count, {**a, n.XID: str(xid)})

    def _memory(self, g: _Gpu, what: str, handle: Any, attrs: n.Attributes, out: Readings) -> None:
        mem = self._call(g, what, self._nv.nvmlDeviceGetMemoryInfo, handle)
        if mem is not None:
            out.add("gpu.memory.used", mem.used, attrs)
            out.add("gpu.memory.free", mem.free, attrs)
            out.add("gpu.memory.total", mem.total, attrs)

    def _field_values(self, g: _Gpu, out: Readings) -> None:
        nv = self._nv
        if not g.fields:
            return
        values = self._call(g, "nvmlDeviceGetFieldValues", nv.nvmlDeviceGetFieldValues, g.handle, list(g.fields))
        if values is None:
            return
        for fv in values:
            fid = int(fv.fieldId)
            if fv.nvmlReturn != nv.NVML_SUCCESS:
                if fv.nvmlReturn == nv.NVML_ERROR_NOT_SUPPORTED and fid in g.fields:
                    g.fields.remove(fid)  # never ask again
                elif fv.nvmlReturn != nv.NVML_ERROR_NOT_SUPPORTED:
                    self._count_error(f"nvmlDeviceGetFieldValues.{fid}", nv.NVMLError(fv.nvmlReturn))
                continue
            value = _field_value(nv, fv)
            if value is None:
                continue
            if fid == nv.NVML_FI_DEV_MEMORY_TEMP:
                out.add("gpu.memory.temperature", value, g.attrs)
                continue
            direction = "tx" if fid == nv.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX else "rx"
            stamp, kib = int(fv.timestamp), int(value)
            previous = g.nvlink_prev.get(fid)
            g.nvlink_prev[fid] = (stamp, kib)
            if previous is not None and stamp > previous[0] and kib >= previous[1]:
                rate = (kib - previous[1]) * 1024.0 / ((stamp - previous[0]) / 1e6)
                out.add("gpu.nvlink.throughput", rate, {**g.attrs, n.IO_DIRECTION: direction})

    def _memory_health(self, g: _Gpu, out: Readings) -> None:
        nv, h, a = self._nv, g.handle, g.attrs
        for kind, error_type in (("corrected", nv.NVML_MEMORY_ERROR_TYPE_CORRECTED),
                                 ("uncorrected", nv.NVML_MEMORY_ERROR_TYPE_UNCORRECTED)):
            count = self._call(g, "nvmlDeviceGetTotalEccErrors", nv.nvmlDeviceGetTotalEccErrors,
                               h, error_type, nv.NVML_VOLATILE_ECC)
            if count is not None:
                out.add("gpu.ecc.errors", count, {**a, n.ECC_TYPE: kind})
        for cause, source in (("multiple_single_bit_ecc", nv.NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS),
                              ("double_bit_ecc", nv.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR)):
            pages = self._call(g, "nvmlDeviceGetRetiredPages", nv.nvmlDeviceGetRetiredPages, h, source)
            if pages is not None:
                out.add("gpu.retired_pages", len(pages), {**a, n.RETIREMENT_CAUSE: cause})
        rows = self._call(g, "nvmlDeviceGetRemappedRows", nv.nvmlDeviceGetRemappedRows, h)
        if rows is not None:
            correctable, uncorrectable, pending, failure = rows
            out.add("gpu.remapped_rows", correctable, {**a, n.REMAP_TYPE: "correctable"})
            out.add("gpu.remapped_rows", uncorrectable, {**a, n.REMAP_TYPE: "uncorrectable"})
            out.add("gpu.row_remap.pending", int(bool(pending)), a)
            out.add("gpu.row_remap.failure", int(bool(failure)), a)

    def _mig_instances(self, g: _Gpu) -> list[tuple[Any, dict[str, str]]]:
        """(MIG device handle, attributes) per MIG instance; empty when MIG is off."""
        nv = self._nv
        mode = self._call(g, "nvmlDeviceGetMigMode", nv.nvmlDeviceGetMigMode, g.handle)
        if mode is None or mode[0] != nv.NVML_DEVICE_MIG_ENABLE:
            return []
        slots = self._call(g, "nvmlDeviceGetMaxMigDeviceCount", nv.nvmlDeviceGetMaxMigDeviceCount, g.handle) or 0
        found: list[tuple[Any, dict[str, str]]] = []
        for slot in range(slots):
            try:
                mig = nv.nvmlDeviceGetMigDeviceHandleByIndex(g.handle, slot)
            except nv.NVMLError as exc:
                if exc.value not in (nv.NVML_ERROR_NOT_FOUND, nv.NVML_ERROR_INVALID_ARGUMENT):
                    self._nvml_error(g, "nvmlDeviceGetMigDeviceHandleByIndex", exc)
                continue  # an empty slot
            instance = self._call(g, "nvmlDeviceGetGpuInstanceId", nv.nvmlDeviceGetGpuInstanceId, mig)
            if instance is None:
                continue
            model = _text(self._call(g, "nvmlDeviceGetName.mig", nv.nvmlDeviceGetName, mig) or "")
            profile = model.rsplit(" MIG ", 1)[1] if " MIG " in model else model
            found.append((mig, {**g.attrs, n.MIG_PROFILE: profile, n.MIG_INSTANCE: str(instance)}))
        return found

    def _processes(self, g: _Gpu, devices: list[tuple[Any, dict[str, str]]], out: Readings,
                   seen_pids: set[int]) -> None:
        """Memory per process on each device (the GPU, or each MIG instance when MIG is on)."""
        for handle, attrs in devices:
            usage: dict[int, int] = {}
            for what in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
                for proc in self._call(g, what, getattr(self._nv, what), handle) or ():
                    used = getattr(proc, "usedGpuMemory", None)
                    if used is None:  # not available (WDDM, or no permission)
                        continue
                    pid = int(proc.pid)
                    usage[pid] = max(usage.get(pid, 0), int(used))  # listed twice: same memory
            for pid, used in usage.items():
                seen_pids.add(pid)
                out.add("gpu.process.memory.used", used,
                        {**attrs, n.PROCESS_PID: pid, **self._container_of(pid).attributes()})

    def _container_of(self, pid: int) -> ProcessContainer:
        found = self._containers.get(pid)
        if found is None:
            try:
                text = (self._proc_root / str(pid) / "cgroup").read_text(errors="replace")
            except OSError:  # gone, or outside our PID namespace
                text = ""
            found = self._containers[pid] = parse_cgroup(text)
        return found

    def _gpm(self, g: _Gpu, out: Readings) -> None:
        if len(g.gpm_samples) != 2 or g.lost:
            return
        nv = self._nv
        previous, current = g.gpm_samples
        if self._call(g, "nvmlGpmSampleGet", nv.nvmlGpmSampleGet, g.handle, current) is None:
            return
        g.gpm_samples = [current, previous]
        if not g.gpm_primed:  # a metric needs two samples
            g.gpm_primed = True
            return
        wanted = ((nv.NVML_GPM_METRIC_SM_UTIL, "gpu.sm.activity"),
                  (nv.NVML_GPM_METRIC_SM_OCCUPANCY, "gpu.sm.occupancy"),
                  (nv.NVML_GPM_METRIC_ANY_TENSOR_UTIL, "gpu.tensor.activity"),
                  (nv.NVML_GPM_METRIC_DRAM_BW_UTIL, "gpu.dram.activity"),
                  (nv.NVML_GPM_METRIC_GRAPHICS_UTIL, "gpu.graphics_engine.activity"))
        request = nv.c_nvmlGpmMetricsGet_t()
        request.version = nv.NVML_GPM_METRICS_GET_VERSION
        request.numMetrics = len(wanted)
        request.sample1, request.sample2 = previous, current
        for i, (metric_id, _) in enumerate(wanted):
            request.metrics[i].metricId = metric_id
        result = self._call(g, "nvmlGpmMetricsGet", nv.nvmlGpmMetricsGet, request)
        if result is None:
            return
        for i, (_, metric) in enumerate(wanted):
            m = result.metrics[i]
            if m.nvmlReturn == nv.NVML_SUCCESS:
                out.add(metric, float(m.value) / 100.0, g.attrs)

    # -- XID events -------------------------------------------------------------------

    def _start_xid_watch(self) -> None:
        if self._thread is not None or self._events is not None:
            return
        nv = self._nv
        try:
            events = nv.nvmlEventSetCreate()
        except nv.NVMLError as exc:
            self._count_error("nvmlEventSetCreate", exc)
            return
        registered = 0
        for g in self._gpus:
            if g.lost:
                continue
            try:
                nv.nvmlDeviceRegisterEvents(g.handle, nv.nvmlEventTypeXidCriticalError, events)
                registered += 1
            except nv.NVMLError as exc:
                self._nvml_error(g, "nvmlDeviceRegisterEvents", exc)
        self._events = events
        if not registered:
            _log.info("nvml collector: no GPU supports XID events; gpu.xid.errors will stay empty")
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch_xids, args=(events,),
                                        name=f"{self.name}-xid", daemon=True)
        self._thread.start()

    def _watch_xids(self, events: Any) -> None:
        nv = self._nv
        wait = getattr(nv, "nvmlEventSetWait_v2", None) or nv.nvmlEventSetWait
        while not self._stop.is_set():
            try:
                data = wait(events, self._event_timeout_ms)
            except nv.NVMLError as exc:
                if getattr(exc, "value", None) != nv.NVML_ERROR_TIMEOUT:
                    self._count_error("nvmlEventSetWait", exc)
                    self._stop.wait(1.0)
                continue
            except Exception as exc:  # the watcher must outlive any odd binding behaviour
                self._count_error("nvmlEventSetWait", exc)
                self._stop.wait(1.0)
                continue
            if int(data.eventType) & nv.nvmlEventTypeXidCriticalError:
                self._record_xid(data)

    def _record_xid(self, data: Any) -> None:
        index = self._by_address.get(_address(data.device) or -1)
        if index is None:
            try:
                index = str(self._nv.nvmlDeviceGetIndex(data.device))
            except Exception as exc:
                self._count_error("xid.device", exc)
                return
        xid = int(data.eventData)
        with self._lock:
            key = (index, xid)
            self._xid_counts[key] = self._xid_counts.get(key, 0) + 1
            self._xid_last[index] = xid
        _log.warning("nvml collector: XID %d on GPU %s", xid, index)


def _field_value(nv: Any, fv: Any) -> float | int | None:
    readers: dict[int, Callable[[Any], float | int]] = {
        nv.NVML_VALUE_TYPE_DOUBLE: lambda v: v.dVal,
        nv.NVML_VALUE_TYPE_UNSIGNED_INT: lambda v: v.uiVal,
        nv.NVML_VALUE_TYPE_UNSIGNED_LONG: lambda v: v.ulVal,
        nv.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG: lambda v: v.ullVal,
        nv.NVML_VALUE_TYPE_SIGNED_LONG_LONG: lambda v: v.sllVal,
        nv.NVML_VALUE_TYPE_SIGNED_INT: lambda v: v.siVal,
        nv.NVML_VALUE_TYPE_UNSIGNED_SHORT: lambda v: v.usVal,
    }
    reader = readers.get(int(fv.valueType))
    return None if reader is None else reader(fv.value)

