"""The NVML collector against a faithful fake of ``pynvml`` (there is no GPU here).

:class:`FakeNvml` implements exactly the NVML functions the collector calls, with
the real signatures, returning the real ``pynvml`` structs and raising the real
``NVMLError`` subclasses. Constants and struct types come from the real module;
any other ``nvml*`` function raises AttributeError, so an unexpected call shows.
GPU 0 is an H100 (GPM, NVLink, no encoder); GPU 1 an A100 in MIG mode with two
instances, whose PCIe replay counter fails with an unknown error.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import queue
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import pynvml as real
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from stethoscope.agents.gpu.nvml import NvmlCollector, ProcessContainer, parse_cgroup
from stethoscope.errors import PluginError

GiB = 1 << 30
POD_UID = "4f1c2a9e-77b0-4c1d-9a55-0e2b6f3d8c11"
CID_A = "3b0f" + "a1" * 30
CID_B = "9c2d" + "e7" * 30


def _err(code: int) -> real.NVMLError:
    return real.NVMLError(code)


def _addr(ptr) -> int:
    return ctypes.cast(ptr, ctypes.c_void_p).value


@dataclass
class FakeMig:
    gi: int
    name: str
    total: int
    used: int
    procs: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class FakeGpu:
    uuid: str
    name: str
    bus_id: str
    minor: int
    total: int
    used: int
    util: tuple[int, int] | None
    decoder: int | None
    temp: int
    mem_temp: int
    power_mw: int
    limit_mw: int
    energy_mj: int
    clocks: tuple[int, int]
    reasons: int
    ecc: tuple[int, int]
    remapped: tuple[int, int, int, int]
    pcie_kb: tuple[int, int]
    replay: int | None  # None: fails with NVML_ERROR_UNKNOWN
    nvlink: bool
    gpm: bool
    compute: list[tuple[int, int]] = field(default_factory=list)
    graphics: list[tuple[int, int]] = field(default_factory=list)
    migs: list[FakeMig] = field(default_factory=list)
    lost: bool = False


def h100() -> FakeGpu:
    return FakeGpu(uuid="GPU-7d3e1f0a-2b4c-4e5f-8a9b-0c1d2e3f4a5b", name="NVIDIA H100 80GB HBM3",
                   bus_id="00000000:18:00.0", minor=0, total=85_520_809_984, used=61_203_283_968,
                   util=(87, 43), decoder=12, temp=64, mem_temp=71, power_mw=512_345, limit_mw=700_000,
                   energy_mj=123_456_789, clocks=(1980, 2619), reasons=0x60, ecc=(3, 0),
                   remapped=(2, 0, 0, 0), pcie_kb=(1_000, 250_000), replay=5, nvlink=True, gpm=True,
                   compute=[(4242, 40 * GiB), (777, 1 * GiB)], graphics=[(777, 1 * GiB)])


def a100_mig() -> FakeGpu:
    return FakeGpu(uuid="GPU-0a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9", name="NVIDIA A100-SXM4-80GB",
                   bus_id="00000000:3B:00.0", minor=1, total=85_899_345_920, used=20 * GiB,
                   util=None, decoder=None, temp=45, mem_temp=50, power_mw=90_000, limit_mw=400_000,
                   energy_mj=5_000, clocks=(1410, 1593), reasons=0x1, ecc=(0, 1),
                   remapped=(0, 1, 1, 0), pcie_kb=(0, 0), replay=None, nvlink=False, gpm=False,
                   migs=[FakeMig(1, "NVIDIA A100-SXM4-80GB MIG 3g.40gb", 40 * GiB, 10 * GiB, [(9001, 8 * GiB)]),
                         FakeMig(5, "NVIDIA A100-SXM4-80GB MIG 1g.10gb", 10 * GiB, 512 << 20)])


class FakeNvml:
    """A stand-in for the ``pynvml`` module: real constants, structs and errors."""

    NVMLError = real.NVMLError

    def __init__(self, gpus: list[FakeGpu] | None = None, *, init_error: int | None = None) -> None:
        self.gpus = gpus if gpus is not None else [h100(), a100_mig()]
        self.init_error = init_error
        self.calls: Counter[str] = Counter()
        self.initialised = False
        self._keep: list[object] = []  # keeps the structs behind handles alive
        self._devices: dict[int, tuple[FakeGpu, FakeMig | None]] = {}
        self._gpu_handles = [self._handle(g, None) for g in self.gpus]
        self._mig_handles = {(i, j): self._handle(g, m) for i, g in enumerate(self.gpus)
                             for j, m in enumerate(g.migs)}
        self._events: dict[int, queue.Queue] = {}
        self._registered_pairs: set[tuple[int, int]] = set()  # (event set, device)
        self._samples: dict[int, tuple[int, int] | None] = {}
        self._sample_seq = 0
        self._nvlink_reads = Counter()

    def __getattr__(self, name: str):
        value = getattr(real, name)
        if name.startswith("nvml") and callable(value):
            raise AttributeError(f"the fake NVML does not implement {name}")
        return value

    # -- plumbing ----------------------------------------------------------------------

    def _handle(self, gpu: FakeGpu, mig: FakeMig | None):
        struct = real.struct_c_nvmlDevice_t()
        self._keep.append(struct)
        handle = real.c_nvmlDevice_t(struct)
        self._devices[_addr(handle)] = (gpu, mig)
        return handle

    def _dev(self, handle, name: str) -> tuple[FakeGpu, FakeMig | None]:
        self.calls[name] += 1
        if not self.initialised:
            raise _err(real.NVML_ERROR_UNINITIALIZED)
        gpu, mig = self._devices[_addr(handle)]
        if gpu.lost:
            raise _err(real.NVML_ERROR_GPU_IS_LOST)
        return gpu, mig

    def _gpu(self, handle, name: str, *, mig_ok: bool = False) -> FakeGpu:
        gpu, mig = self._dev(handle, name)
        if mig is not None and not mig_ok:
            raise _err(real.NVML_ERROR_NOT_SUPPORTED)
        return gpu

    def lose(self, index: int) -> None:
        self.gpus[index].lost = True

    def xid(self, index: int, code: int) -> None:
        """Queue an XID event from GPU ``index`` on every event set it is registered with."""
        handle = self._gpu_handles[index]
        for key, q in self._events.items():
            if (key, _addr(handle)) in self._registered_pairs:
                data = real.c_nvmlEventData_t()
                data.device = handle
                data.eventType = real.nvmlEventTypeXidCriticalError
                data.eventData = code
                data.gpuInstanceId = 0xFFFFFFFF
                data.computeInstanceId = 0xFFFFFFFF
                q.put(data)

    # -- library -----------------------------------------------------------------------

    def nvmlInit(self):
        self.calls["nvmlInit"] += 1
        if self.init_error is not None:
            raise _err(self.init_error)
        self.initialised = True

    def nvmlShutdown(self):
        self.calls["nvmlShutdown"] += 1
        if not self.initialised:
            raise _err(real.NVML_ERROR_UNINITIALIZED)
        self.initialised = False

    def nvmlDeviceGetCount(self):
        self.calls["nvmlDeviceGetCount"] += 1
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index):
        self.calls["nvmlDeviceGetHandleByIndex"] += 1
        if index >= len(self.gpus):
            raise _err(real.NVML_ERROR_INVALID_ARGUMENT)
        return self._gpu_handles[index]

    # -- identity ----------------------------------------------------------------------

    def nvmlDeviceGetUUID(self, handle):
        return self._gpu(handle, "nvmlDeviceGetUUID").uuid

    def nvmlDeviceGetName(self, handle):
        gpu, mig = self._dev(handle, "nvmlDeviceGetName")
        return mig.name if mig else gpu.name

    def nvmlDeviceGetPciInfo(self, handle):
        info = real.nvmlPciInfo_t()
        info.busId = self._gpu(handle, "nvmlDeviceGetPciInfo").bus_id.encode()
        return info

    def nvmlDeviceGetMinorNumber(self, handle):
        return self._gpu(handle, "nvmlDeviceGetMinorNumber").minor

    # -- readings ----------------------------------------------------------------------

    def nvmlDeviceGetUtilizationRates(self, handle):
        gpu = self._gpu(handle, "nvmlDeviceGetUtilizationRates")
        if gpu.util is None:  # MIG mode: not supported on the parent
            raise _err(real.NVML_ERROR_NOT_SUPPORTED)
        util = real.c_nvmlUtilization_t()
        util.gpu, util.memory = gpu.util
        return util

    def nvmlDeviceGetEncoderUtilization(self, handle):
        self._gpu(handle, "nvmlDeviceGetEncoderUtilization")
        raise _err(real.NVML_ERROR_NOT_SUPPORTED)  # neither board has NVENC

    def nvmlDeviceGetDecoderUtilization(self, handle):
        gpu = self._gpu(handle, "nvmlDeviceGetDecoderUtilization")
        if gpu.decoder is None:
            raise _err(real.NVML_ERROR_NOT_SUPPORTED)
        return [gpu.decoder, 167_000]

    def nvmlDeviceGetMemoryInfo(self, handle, version=None):
        gpu, mig = self._dev(handle, "nvmlDeviceGetMemoryInfo")
        assert version is None
        memory = real.c_nvmlMemory_t()
        total, used = (mig.total, mig.used) if mig else (gpu.total, gpu.used)
        memory.total, memory.used, memory.free = total, used, total - used
        return memory

    def nvmlDeviceGetTemperature(self, handle, sensor):
        assert sensor == real.NVML_TEMPERATURE_GPU
        return self._gpu(handle, "nvmlDeviceGetTemperature").temp

    def nvmlDeviceGetFieldValues(self, handle, fieldIds):
        gpu = self._gpu(handle, "nvmlDeviceGetFieldValues")
        values = (real.c_nvmlFieldValue_t * len(fieldIds))()
        n = self._nvlink_reads[gpu.uuid] = self._nvlink_reads[gpu.uuid] + 1
        for v, fid in zip(values, fieldIds, strict=True):
            v.fieldId = fid
            v.timestamp = n * 1_000_000  # one second apart
            if fid == real.NVML_FI_DEV_MEMORY_TEMP:
                v.valueType, v.nvmlReturn = real.NVML_VALUE_TYPE_UNSIGNED_INT, real.NVML_SUCCESS
                v.value.uiVal = gpu.mem_temp
            elif fid in (real.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX, real.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX):
                if not gpu.nvlink:
                    v.nvmlReturn = real.NVML_ERROR_NOT_SUPPORTED
                    continue
                per_s = 500_000 if fid == real.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX else 250_000  # KiB/s
                v.valueType, v.nvmlReturn = real.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG, real.NVML_SUCCESS
                v.value.ullVal = 1_000 + n * per_s
            else:
                v.nvmlReturn = real.NVML_ERROR_INVALID_ARGUMENT
        return values

    def nvmlDeviceGetPowerUsage(self, handle):
        return self._gpu(handle, "nvmlDeviceGetPowerUsage").power_mw

    def nvmlDeviceGetEnforcedPowerLimit(self, handle):
        return self._gpu(handle, "nvmlDeviceGetEnforcedPowerLimit").limit_mw

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        return self._gpu(handle, "nvmlDeviceGetTotalEnergyConsumption").energy_mj

    def nvmlDeviceGetClockInfo(self, handle, type):
        gpu = self._gpu(handle, "nvmlDeviceGetClockInfo")
        return {real.NVML_CLOCK_SM: gpu.clocks[0], real.NVML_CLOCK_MEM: gpu.clocks[1]}[type]

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle):
        return self._gpu(handle, "nvmlDeviceGetCurrentClocksEventReasons").reasons

    def nvmlDeviceGetTotalEccErrors(self, handle, errorType, counterType):
        gpu = self._gpu(handle, "nvmlDeviceGetTotalEccErrors")
        assert counterType == real.NVML_VOLATILE_ECC
        return gpu.ecc[errorType]

    def nvmlDeviceGetRetiredPages(self, device, sourceFilter):
        self._gpu(device, "nvmlDeviceGetRetiredPages")
        raise _err(real.NVML_ERROR_NOT_SUPPORTED)  # Ampere and later remap rows instead

    def nvmlDeviceGetRemappedRows(self, device):
        return self._gpu(device, "nvmlDeviceGetRemappedRows").remapped

    def nvmlDeviceGetPcieThroughput(self, device, counter):
        return self._gpu(device, "nvmlDeviceGetPcieThroughput").pcie_kb[counter]

    def nvmlDeviceGetPcieReplayCounter(self, handle):
        gpu = self._gpu(handle, "nvmlDeviceGetPcieReplayCounter")
        if gpu.replay is None:
            raise _err(real.NVML_ERROR_UNKNOWN)
        return gpu.replay

    def _procs(self, handle, name: str, which: str):
        gpu, mig = self._dev(handle, name)
        if gpu.migs and mig is None:  # aggregate on a MIG parent needs privileges we lack
            raise _err(real.NVML_ERROR_NO_PERMISSION)
        entries = mig.procs if mig else getattr(gpu, which)
        gi = mig.gi if mig else 0xFFFFFFFF
        return [real.nvmlStructToFriendlyObject(real.c_nvmlProcessInfo_v3_t(
            pid=pid, usedGpuMemory=used, gpuInstanceId=gi, computeInstanceId=0)) for pid, used in entries]

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        return self._procs(handle, "nvmlDeviceGetComputeRunningProcesses", "compute")

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle):
        return self._procs(handle, "nvmlDeviceGetGraphicsRunningProcesses", "graphics")

    # -- MIG ---------------------------------------------------------------------------

    def nvmlDeviceGetMigMode(self, device):
        gpu = self._gpu(device, "nvmlDeviceGetMigMode")
        mode = real.NVML_DEVICE_MIG_ENABLE if gpu.migs else real.NVML_DEVICE_MIG_DISABLE
        return [mode, mode]

    def nvmlDeviceGetMaxMigDeviceCount(self, device):
        return 7 if self._gpu(device, "nvmlDeviceGetMaxMigDeviceCount").migs else 0

    def nvmlDeviceGetMigDeviceHandleByIndex(self, device, index):
        gpu = self._gpu(device, "nvmlDeviceGetMigDeviceHandleByIndex")
        i = self.gpus.index(gpu)
        if (i, index) not in self._mig_handles:
            raise _err(real.NVML_ERROR_NOT_FOUND)
        return self._mig_handles[(i, index)]

    def nvmlDeviceGetGpuInstanceId(self, device):
        gpu, mig = self._dev(device, "nvmlDeviceGetGpuInstanceId")
        if mig is None:
            raise _err(real.NVML_ERROR_INVALID_ARGUMENT)
        return mig.gi

    # -- GPM ---------------------------------------------------------------------------

    def nvmlGpmQueryDeviceSupport(self, device):
        gpu = self._gpu(device, "nvmlGpmQueryDeviceSupport")
        support = real.c_nvmlGpmSupport_t()
        support.version = real.NVML_GPM_SUPPORT_VERSION
        support.isSupportedDevice = int(gpu.gpm)
        return support

    def nvmlGpmSampleAlloc(self):
        self.calls["nvmlGpmSampleAlloc"] += 1
        struct = real.struct_c_nvmlGpmSample_t()
        self._keep.append(struct)
        sample = real.c_nvmlGpmSample_t(struct)
        self._samples[_addr(sample)] = None
        return sample

    def nvmlGpmSampleFree(self, gpmSample):
        self.calls["nvmlGpmSampleFree"] += 1
        del self._samples[_addr(gpmSample)]

    def nvmlGpmSampleGet(self, device, gpmSample):
        gpu = self._gpu(device, "nvmlGpmSampleGet")
        if not gpu.gpm:
            raise _err(real.NVML_ERROR_NOT_SUPPORTED)
        self._sample_seq += 1
        self._samples[_addr(gpmSample)] = (self.gpus.index(gpu), self._sample_seq)
        return gpmSample

    def nvmlGpmMetricsGet(self, metricsGet):
        self.calls["nvmlGpmMetricsGet"] += 1
        assert metricsGet.version == real.NVML_GPM_METRICS_GET_VERSION
        first, second = self._samples[_addr(metricsGet.sample1)], self._samples[_addr(metricsGet.sample2)]
        if first is None or second is None or first[0] != second[0] or first[1] >= second[1]:
            raise _err(real.NVML_ERROR_INVALID_ARGUMENT)
        percent = {real.NVML_GPM_METRIC_SM_UTIL: 75.0, real.NVML_GPM_METRIC_SM_OCCUPANCY: 40.0,
                   real.NVML_GPM_METRIC_ANY_TENSOR_UTIL: 55.5, real.NVML_GPM_METRIC_DRAM_BW_UTIL: 33.0,
                   real.NVML_GPM_METRIC_GRAPHICS_UTIL: 90.0}
        for i in range(metricsGet.numMetrics):
            metric = metricsGet.metrics[i]
            metric.nvmlReturn = real.NVML_SUCCESS
            metric.value = percent[metric.metricId]
        return metricsGet

    # -- events ------------------------------------------------------------------------

    def nvmlEventSetCreate(self):
        self.calls["nvmlEventSetCreate"] += 1
        struct = real.struct_c_nvmlEventSet_t()
        self._keep.append(struct)
        event_set = real.c_nvmlEventSet_t(struct)
        self._events[_addr(event_set)] = queue.Queue()
        return event_set

    def nvmlDeviceRegisterEvents(self, handle, eventTypes, eventSet):
        self._gpu(handle, "nvmlDeviceRegisterEvents")
        assert eventTypes == real.nvmlEventTypeXidCriticalError
        self._registered_pairs.add((_addr(eventSet), _addr(handle)))

    def nvmlEventSetWait_v2(self, eventSet, timeoutms):
        self.calls["nvmlEventSetWait_v2"] += 1
        try:
            return self._events[_addr(eventSet)].get(timeout=timeoutms / 1000)
        except queue.Empty:
            raise _err(real.NVML_ERROR_TIMEOUT) from None

    def nvmlEventSetFree(self, eventSet):
        self.calls["nvmlEventSetFree"] += 1
        del self._events[_addr(eventSet)]


# -- helpers -----------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def points(reader: InMemoryMetricReader) -> dict[str, list[tuple[dict, float]]]:
    out: dict[str, list[tuple[dict, float]]] = {}
    data = reader.get_metrics_data()
    for rm in data.resource_metrics if data else []:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                out.setdefault(metric.name, []).extend(
                    (dict(p.attributes), p.value) for p in metric.data.data_points)
    return out


def value(pts, name: str, **attrs) -> float:
    want = {k if "." in k else k.replace("_", "."): v for k, v in attrs.items()}
    found = [v for a, v in pts.get(name, []) if all(a.get(k) == w for k, w in want.items())]
    assert len(found) == 1, (name, want, pts.get(name))
    return found[0]


@pytest.fixture
def proc_root(tmp_path):
    (tmp_path / "4242").mkdir()
    (tmp_path / "4242" / "cgroup").write_text(
        "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod"
        f"{POD_UID.replace('-', '_')}.slice/cri-containerd-{CID_A}.scope\n")
    (tmp_path / "9001").mkdir()
    (tmp_path / "9001" / "cgroup").write_text(
        f"12:memory:/docker/{CID_B}\n11:cpuset:/docker/{CID_B}\n0::/\n")
    return tmp_path


@pytest.fixture
def rig(proc_root):
    fake, clock = FakeNvml(), Clock()
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    collector = NvmlCollector(nvml=fake, event_timeout_ms=20, proc_root=str(proc_root), clock=clock)
    collector.register(provider.get_meter("test"))
    yield fake, clock, reader, collector
    collector.close()
    provider.shutdown()


def next_cycle(clock: Clock, reader: InMemoryMetricReader):
    clock.now += 1.0
    return points(reader)


# -- tests ------------------------------------------------------------------------------


def test_values_are_converted_to_the_table_units(rig):
    fake, clock, reader, collector = rig
    pts = next_cycle(clock, reader)
    assert value(pts, "gpu.utilization", gpu_index="0") == pytest.approx(0.87)
    assert value(pts, "gpu.memory_controller.utilization", gpu_index="0") == pytest.approx(0.43)
    assert value(pts, "gpu.decoder.utilization", gpu_index="0") == pytest.approx(0.12)
    assert value(pts, "gpu.power.draw", gpu_index="0") == pytest.approx(512.345)
    assert value(pts, "gpu.power.limit", gpu_index="0") == pytest.approx(700.0)
    assert value(pts, "gpu.energy", gpu_index="0") == pytest.approx(123_456.789)
    assert value(pts, "gpu.temperature", gpu_index="0") == 64
    assert value(pts, "gpu.memory.temperature", gpu_index="1") == 50
    assert value(pts, "gpu.clock.sm", gpu_index="0") == 1980
    assert value(pts, "gpu.clock.memory", gpu_index="1") == 1593
    assert value(pts, "gpu.pcie.throughput", gpu_index="0", gpu_io_direction="tx") == 1_024_000
    assert value(pts, "gpu.pcie.throughput", gpu_index="0", gpu_io_direction="rx") == 256_000_000
    assert value(pts, "gpu.pcie.replay", gpu_index="0") == 5
    assert value(pts, "gpu.ecc.errors", gpu_index="0", gpu_ecc_type="corrected") == 3
    assert value(pts, "gpu.ecc.errors", gpu_index="1", gpu_ecc_type="uncorrected") == 1
    assert value(pts, "gpu.remapped_rows", gpu_index="0", **{"gpu.remapped_rows.type": "correctable"}) == 2
    assert value(pts, "gpu.row_remap.pending", gpu_index="1") == 1
    used = value(pts, "gpu.memory.used", gpu_index="0", **{"gpu.mig.profile": None})
    free = value(pts, "gpu.memory.free", gpu_index="0")
    assert (used, used + free) == (61_203_283_968, 85_520_809_984)
    assert value(pts, "gpu.memory.total", gpu_index="0") == 85_520_809_984


def test_identity_attributes_and_source(rig):
    fake, clock, reader, collector = rig
    pts = next_cycle(clock, reader)
    attrs = {a["gpu.index"]: a for a, _ in pts["gpu.temperature"]}
    assert attrs["0"] == {"gpu.index": "0", "gpu.uuid": "GPU-7d3e1f0a-2b4c-4e5f-8a9b-0c1d2e3f4a5b",
                          "gpu.model": "NVIDIA H100 80GB HBM3", "gpu.pci_bus_id": "00000000:18:00.0",
                          "gpu.device": "nvidia0", "gpu.source": "nvml"}
    assert attrs["1"]["gpu.device"] == "nvidia1"
    for series in pts.values():
        for a, _ in series:
            assert a["gpu.source"] == "nvml"
            assert "host.name" not in a


def test_throttle_reasons_are_one_series_each(rig):
    fake, clock, reader, collector = rig
    pts = next_cycle(clock, reader)
    gpu0 = {a["gpu.throttle.reason"]: v for a, v in pts["gpu.throttle"] if a["gpu.index"] == "0"}
    assert len(gpu0) == 9
    assert {r for r, v in gpu0.items() if v} == {"sw_thermal_slowdown", "hw_thermal_slowdown"}
    gpu1 = {a["gpu.throttle.reason"]: v for a, v in pts["gpu.throttle"] if a["gpu.index"] == "1"}
    assert {r for r, v in gpu1.items() if v} == {"gpu_idle"}


def test_not_supported_is_skipped_and_not_asked_again(rig):
    fake, clock, reader, collector = rig
    next_cycle(clock, reader)
    pts = next_cycle(clock, reader)
    assert [a["gpu.index"] for a, _ in pts["gpu.utilization"]] == ["0"]  # MIG parent: not supported
    assert "gpu.encoder.utilization" not in pts
    assert "gpu.retired_pages" not in pts
    assert ("1", "nvmlDeviceGetUtilizationRates") in collector.unsupported
    assert fake.calls["nvmlDeviceGetRetiredPages"] == 2  # once per GPU, then never again
    assert fake.calls["nvmlDeviceGetEncoderUtilization"] == 2
    # NVLink: unsupported fields on GPU 1 are dropped; GPU 0 has a rate from the second cycle on
    assert [a["gpu.index"] for a, _ in pts["gpu.nvlink.throughput"]] == ["0", "0"]
    assert value(pts, "gpu.nvlink.throughput", gpu_io_direction="tx") == 500_000 * 1024
    assert value(pts, "gpu.nvlink.throughput", gpu_io_direction="rx") == 250_000 * 1024


def test_other_errors_are_counted(rig):
    fake, clock, reader, collector = rig
    next_cycle(clock, reader)
    pts = next_cycle(clock, reader)
    assert collector.errors == {"nvmlDeviceGetPcieReplayCounter": 2}
    assert [a["gpu.index"] for a, _ in pts["gpu.pcie.replay"]] == ["0"]


def test_one_nvml_read_per_collection(rig):
    fake, clock, reader, collector = rig
    next_cycle(clock, reader)
    assert fake.calls["nvmlDeviceGetPowerUsage"] == 2  # two GPUs, ~30 instruments, one snapshot
    points(reader)  # same cycle (clock unchanged): served from the snapshot
    assert fake.calls["nvmlDeviceGetPowerUsage"] == 2
    next_cycle(clock, reader)
    assert fake.calls["nvmlDeviceGetPowerUsage"] == 4


def test_mig_instances_and_processes(rig):
    fake, clock, reader, collector = rig
    pts = next_cycle(clock, reader)
    mig = {(a["gpu.mig.profile"], a["gpu.mig.instance"]): v for a, v in pts["gpu.memory.used"]
           if "gpu.mig.profile" in a}
    assert mig == {("3g.40gb", "1"): 10 * GiB, ("1g.10gb", "5"): 512 << 20}
    totals = {a["gpu.mig.instance"]: v for a, v in pts["gpu.memory.total"] if "gpu.mig.instance" in a}
    assert totals == {"1": 40 * GiB, "5": 10 * GiB}
    procs = {a["process.pid"]: (a, v) for a, v in pts["gpu.process.memory.used"]}
    assert set(procs) == {4242, 777, 9001}
    a, v = procs[4242]
    assert v == 40 * GiB and a["container.id"] == CID_A and a["k8s.pod.uid"] == POD_UID
    a, v = procs[777]  # in both the compute and graphics lists: counted once; no cgroup file
    assert v == 1 * GiB and "container.id" not in a and a["gpu.index"] == "0"
    a, v = procs[9001]
    assert v == 8 * GiB and a["container.id"] == CID_B and "k8s.pod.uid" not in a
    assert (a["gpu.index"], a["gpu.mig.instance"], a["gpu.mig.profile"]) == ("1", "1", "3g.40gb")
    assert collector.errors == {"nvmlDeviceGetPcieReplayCounter": 1}  # no NO_PERMISSION from the parent


def test_gpm_metrics_from_the_second_cycle(rig):
    fake, clock, reader, collector = rig
    assert "gpu.sm.occupancy" not in next_cycle(clock, reader)
    pts = next_cycle(clock, reader)
    assert value(pts, "gpu.sm.occupancy") == pytest.approx(0.40)
    assert value(pts, "gpu.sm.activity") == pytest.approx(0.75)
    assert value(pts, "gpu.tensor.activity") == pytest.approx(0.555)
    assert value(pts, "gpu.dram.activity") == pytest.approx(0.33)
    assert value(pts, "gpu.graphics_engine.activity") == pytest.approx(0.90)
    assert [a["gpu.index"] for a, _ in pts["gpu.sm.occupancy"]] == ["0"]  # A100: no GPM


def test_a_lost_gpu_does_not_stop_the_others(rig, caplog):
    fake, clock, reader, collector = rig
    assert {a["gpu.index"] for a, _ in next_cycle(clock, reader)["gpu.power.draw"]} == {"0", "1"}
    fake.lose(1)
    with caplog.at_level(logging.ERROR, logger="stethoscope.agents.gpu.nvml"):
        pts = next_cycle(clock, reader)
        pts2 = next_cycle(clock, reader)
    assert collector.lost == {"1"}
    assert [a["gpu.index"] for a, _ in pts2["gpu.power.draw"]] == ["0"]
    assert value(pts2, "gpu.power.draw") == pytest.approx(512.345)
    assert "gpu.utilization" in pts and "gpu.utilization" in pts2
    assert len([r for r in caplog.records if "is lost" in r.message]) == 1
    assert collector.errors == {"nvmlDeviceGetPcieReplayCounter": 1}  # lost is not an error count


def wait_for(predicate, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_xid_events_are_counted_one_by_one(rig):
    fake, clock, reader, collector = rig
    pts = next_cycle(clock, reader)
    assert "gpu.xid.errors" not in pts
    assert {a["gpu.index"]: v for a, v in pts["gpu.xid.last"]} == {"0": 0, "1": 0}
    fake.xid(0, 79)
    fake.xid(0, 79)
    fake.xid(1, 48)
    wait_for(lambda: sum(collector.xid_counts.values()) == 3)
    pts = next_cycle(clock, reader)
    xids = {(a["gpu.index"], a["gpu.xid"]): v for a, v in pts["gpu.xid.errors"]}
    assert xids == {("0", "79"): 2, ("1", "48"): 1}
    assert {a["gpu.index"]: v for a, v in pts["gpu.xid.last"]} == {"0": 79, "1": 48}
    assert [m for m in reader.get_metrics_data().resource_metrics[0].scope_metrics[0].metrics
            if m.name == "gpu.xid.errors"][0].data.is_monotonic


def test_close_stops_the_watcher_and_releases_nvml(proc_root):
    fake = FakeNvml()
    collector = NvmlCollector(nvml=fake, event_timeout_ms=20, proc_root=str(proc_root))
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    collector.register(provider.get_meter("test"))
    watcher = [t for t in threading.enumerate() if t.name == "nvml-xid"]
    assert len(watcher) == 1
    points(reader)
    collector.close()
    collector.close()
    assert not watcher[0].is_alive()
    assert fake.calls["nvmlShutdown"] == 1 and fake.calls["nvmlEventSetFree"] == 1
    assert fake.calls["nvmlGpmSampleFree"] == 2
    assert points(reader) == {}  # callbacks after close: no points, no exception
    provider.shutdown()


@pytest.mark.parametrize("code, text", [
    (real.NVML_ERROR_LIBRARY_NOT_FOUND, "NVML Shared Library Not Found"),
    (real.NVML_ERROR_LIB_RM_VERSION_MISMATCH, "version mismatch"),
    (real.NVML_ERROR_DRIVER_NOT_LOADED, "Driver Not Loaded"),
])
def test_init_failure_is_a_plugin_error(code, text):
    collector = NvmlCollector(nvml=FakeNvml(init_error=code))
    provider = MeterProvider(metric_readers=[InMemoryMetricReader()], shutdown_on_exit=False)
    with pytest.raises(PluginError, match=text) as info:
        collector.register(provider.get_meter("test"))
    assert isinstance(info.value.__cause__, real.NVMLError)
    collector.close()
    provider.shutdown()


def test_no_gpu_is_a_plugin_error():
    fake = FakeNvml(gpus=[])
    with pytest.raises(PluginError, match="no usable GPU"):
        NvmlCollector(nvml=fake).open()
    assert fake.calls["nvmlShutdown"] == 1


def test_missing_pynvml_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    with pytest.raises(PluginError, match="nvidia-ml-py"):
        NvmlCollector().open()


@pytest.mark.skipif(ctypes.util.find_library("nvidia-ml") is not None, reason="this machine has an NVIDIA driver")
def test_the_real_library_is_absent_here():
    """No driver on this machine: the real pynvml fails cleanly, as on a CPU node."""
    with pytest.raises(PluginError, match="NVML"):
        NvmlCollector().open()


def test_a_crashing_binding_never_escapes_a_callback(rig):
    fake, clock, reader, collector = rig

    def broken(handle, sensor):
        raise RuntimeError("binding bug")

    fake.nvmlDeviceGetTemperature = broken
    pts = next_cycle(clock, reader)
    assert "gpu.temperature" not in pts and "gpu.utilization" in pts
    assert collector.errors["snapshot"] == 2


@pytest.mark.parametrize("text, expected", [
    ("0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod"
     f"{POD_UID.replace('-', '_')}.slice/cri-containerd-{CID_A}.scope", (CID_A, POD_UID)),
    (f"0::/kubepods.slice/kubepods-pod{POD_UID.replace('-', '_')}.slice/crio-{CID_B}.scope", (CID_B, POD_UID)),
    ("12:pids:/kubepods/burstable/pod" + POD_UID + "/" + CID_A + "\n"
     "11:memory:/kubepods/burstable/pod" + POD_UID + "/" + CID_A + "\n", (CID_A, POD_UID)),
    (f"4:devices:/kubepods/pod{POD_UID}/{CID_B}", (CID_B, POD_UID)),  # guaranteed QoS, cgroupfs
    (f"11:cpuset:/docker/{CID_A}\n10:memory:/docker/{CID_A}", (CID_A, None)),
    (f"0::/system.slice/docker-{CID_B}.scope", (CID_B, None)),
    (f"0::/machine.slice/libpod-{CID_A}.scope/container", (CID_A, None)),
    (f"0::/default/{CID_A}", (CID_A, None)),  # containerd without Kubernetes
    ("0::/", (None, None)),  # private cgroup namespace
    ("0::/user.slice/user-1000.slice/session-2.scope", (None, None)),
    ("", (None, None)),
    ("garbage without colons", (None, None)),
])
def test_parse_cgroup(text, expected):
    assert parse_cgroup(text) == ProcessContainer(*expected)
