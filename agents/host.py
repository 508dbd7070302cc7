"""The host collector: CPU, memory, disk, network and filesystem metrics via psutil.

Names, units and attributes follow the OpenTelemetry semantic conventions for
system metrics, as the Collector's ``hostmetrics`` receiver emits them, so the
same dashboards work whichever agent a node runs. CPU figures are aggregated
over all logical CPUs.

On Linux it also reads ``/proc`` directly (the root is injectable, for tests
and for agents that see the host's ``/proc`` elsewhere):

* ``system.pressure.stall``: pressure stall information from
  ``pressure/{cpu,memory,io}``, the ``total=`` microseconds as seconds, by
  ``system.pressure.resource`` and ``system.pressure.scope`` (``some``,
  ``full``); created only where the kernel has PSI, and a resource whose file
  is missing or unreadable (PSI disabled at boot) is skipped silently;
* ``system.filesystem.fd.allocated`` and ``system.filesystem.fd.max`` from
  ``sys/fs/file-nr``, and ``process.unix.file_descriptor.count``: the agent's
  own open descriptors (``self/fd``).

``system.disk.operation_time`` (seconds spent on reads and writes, by device
and direction) comes from psutil on every platform.

Every callback reads its source when the SDK collects and never raises: a
failing source is logged once (WARNING) and its points are dropped; the number
of drops per source is in :attr:`HostCollector.dropped`.

Examples:
    >>> from opentelemetry.sdk.metrics import MeterProvider
    >>> from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    >>> reader = InMemoryMetricReader()
    >>> provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    >>> host = HostCollector()
    >>> host.register(provider.get_meter("doctest"))
    >>> names = {m.name for rm in reader.get_metrics_data().resource_metrics
    ...          for sm in rm.scope_metrics for m in sm.metrics}
    >>> {"system.cpu.time", "system.memory.usage"} <= names
    True
    >>> host.dropped
    {}
    >>> provider.shutdown()
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import psutil
from opentelemetry.metrics import CallbackOptions, Meter, Observation

__all__ = ["HostCollector", "CPU_MODES", "PRESSURE_RESOURCES"]

_log = logging.getLogger(__name__)

CPU_MODES: Mapping[str, str] = {
    "user": "user",
    "nice": "nice",
    "system": "system",
    "idle": "idle",
    "iowait": "iowait",
    "irq": "interrupt",  # Linux name
    "interrupt": "interrupt",  # Windows name
    "softirq": "softirq",
    "steal": "steal",
}
"""psutil ``cpu_times()`` field -> ``cpu.mode`` value.

``guest`` and ``guest_nice`` are left out on purpose: Linux already counts them
inside ``user`` and ``nice``, so reporting them would count that time twice and
push the utilization sum above 1.
"""

PRESSURE_RESOURCES = ("cpu", "memory", "io")
"""The ``/proc/pressure`` files read, as ``system.pressure.resource`` values."""

# Filesystems that hold no user data; psutil's physical-only listing already
# drops most "nodev" ones on Linux, this catches the rest on any platform.
_PSEUDO_FS = frozenset(
    {"", "autofs", "binfmt_misc", "bpf", "cgroup", "cgroup2", "configfs", "debugfs", "devfs",
     "devpts", "devtmpfs", "fusectl", "hugetlbfs", "iso9660", "mqueue", "nsfs", "overlay",
     "proc", "pstore", "ramfs", "securityfs", "squashfs", "sysfs", "tmpfs", "tracefs", "udf"}
)

_Read = Callable[[], Iterable[Observation]]


def _cpu_modes(times: Any) -> dict[str, float]:
    modes: dict[str, float] = {}
    for field, mode in CPU_MODES.items():
        value = getattr(times, field, None)
        if value is not None:
            modes[mode] = modes.get(mode, 0.0) + float(value)
    return modes


def _pressure_totals(text: str) -> dict[str, float]:
    """``some``/``full`` -> stalled seconds, from one ``/proc/pressure`` file.

    >>> _pressure_totals("some avg10=0.00 avg60=0.00 avg300=0.00 total=1500000\\nfull total=250")
    {'some': 1.5, 'full': 0.00025}
    """
    totals: dict[str, float] = {}
    for line in text.splitlines():
        scope, *fields = line.split() or [""]
        for item in fields:
            key, _, value = item.partition("=")
            if key == "total" and scope in ("some", "full"):
                totals[scope] = int(value) / 1e6
    return totals


def _memory_states(vm: Any) -> dict[str, int]:
    """States that partition total memory (their sum is the total on Linux)."""
    buffers = getattr(vm, "buffers", None)
    cached = getattr(vm, "cached", None)
    if buffers is None or cached is None:
        return {"used": int(vm.used), "free": int(vm.free)}
    used = max(int(vm.total) - int(vm.free) - int(buffers) - int(cached), 0)
    return {"used": used, "free": int(vm.free), "buffers": int(buffers), "cached": int(cached)}


class HostCollector:
    """Host metrics from psutil and ``/proc``; registered as the ``host`` collector.

    Built with no arguments; ``proc_root`` points at another ``/proc`` (a fake
    one in tests, the host's in a container that mounts it). :meth:`register`
    creates the observable instruments; :attr:`dropped` maps a source name
    (``cpu``, ``load``, ``memory``, ``disk``, ``network``, ``filesystem``,
    ``pressure``, ``fd``) to how many times reading it failed.
    """

    name = "host"

    def __init__(self, *, proc_root: str | os.PathLike[str] = "/proc") -> None:
        self._proc = Path(proc_root)
        self._lock = threading.Lock()
        self._dropped: dict[str, int] = {}
        self._warned: set[str] = set()
        self._prev_cpu: dict[str, float] | None = None

    @property
    def dropped(self) -> dict[str, int]:
        """Failed reads per source since construction (a copy)."""
        with self._lock:
            return dict(self._dropped)

    def close(self) -> None:
        """Forget the CPU baseline; psutil holds nothing to release."""
        with self._lock:
            self._prev_cpu = None

    # -- plumbing ---------------------------------------------------------------

    def _drop(self, source: str, exc: BaseException) -> None:
        with self._lock:
            self._dropped[source] = self._dropped.get(source, 0) + 1
            first = source not in self._warned
            self._warned.add(source)
        if first:
            _log.warning("host collector: reading %s failed, its points are dropped "
                         "(logged once per source): %r", source, exc)

    def _guard(self, source: str, read: _Read) -> Callable[[CallbackOptions], list[Observation]]:
        def callback(options: CallbackOptions) -> list[Observation]:
            try:
                return list(read())
            except Exception as exc:  # a callback must never raise
                self._drop(source, exc)
                return []

        return callback

    def register(self, meter: Meter) -> None:
        """Create every host instrument on ``meter``."""
        g = self._guard
        counter, updown, gauge = (meter.create_observable_counter,
                                  meter.create_observable_up_down_counter,
                                  meter.create_observable_gauge)
        instruments = [
            (counter, "system.cpu.time", "s", "Seconds each cpu.mode has been active, all CPUs.",
             g("cpu", self._cpu_time)),
            (gauge, "system.cpu.utilization", "1", "Fraction of CPU time per cpu.mode since the last collection.",
             g("cpu", self._cpu_utilization)),
            (updown, "system.cpu.logical.count", "{cpu}", "Logical CPUs.", g("cpu", self._cpu_count)),
            (updown, "system.memory.usage", "By", "Memory in use by state.", g("memory", self._memory_usage)),
            (gauge, "system.memory.utilization", "1", "Fraction of memory by state.",
             g("memory", self._memory_utilization)),
            (updown, "system.memory.limit", "By", "Total memory.", g("memory", self._memory_limit)),
            (counter, "system.disk.io", "By", "Disk bytes transferred.",
             g("disk", self._disk(("read_bytes", "write_bytes")))),
            (counter, "system.disk.operations", "{operation}", "Disk operations.",
             g("disk", self._disk(("read_count", "write_count")))),
            (counter, "system.disk.io_time", "s", "Time the disk spent busy.", g("disk", self._disk_io_time)),
            (counter, "system.network.io", "By", "Network bytes transferred.",
             g("network", self._net(("bytes_recv", "bytes_sent")))),
            (counter, "system.network.packets", "{packet}", "Network packets transferred.",
             g("network", self._net(("packets_recv", "packets_sent")))),
            (counter, "system.network.errors", "{error}", "Network errors.",
             g("network", self._net(("errin", "errout")))),
            (counter, "system.network.dropped", "{packet}", "Network packets dropped.",
             g("network", self._net(("dropin", "dropout")))),
            (updown, "system.filesystem.usage", "By", "Filesystem space by state.",
             g("filesystem", self._filesystem(utilization=False))),
            (gauge, "system.filesystem.utilization", "1", "Fraction of filesystem space used.",
             g("filesystem", self._filesystem(utilization=True))),
        ]
        for window, index in (("1m", 0), ("5m", 1), ("15m", 2)):
            instruments.append((gauge, f"system.cpu.load_average.{window}", "{thread}",
                                f"Load average over {window}.", g("load", self._load(index))))
        instruments.append((counter, "system.disk.operation_time", "s",
                            "Time spent on disk operations, by direction (sums over parallel requests).",
                            g("disk", self._disk_operation_time)))
        if sys.platform.startswith("linux"):
            instruments.append((updown, "system.memory.linux.available", "By",
                                "Memory available for new work without swapping (MemAvailable).",
                                g("memory", self._memory_available)))
        instruments.extend(self._proc_instruments(counter, updown))
        for create, name, unit, description, callback in instruments:
            create(name, callbacks=[callback], unit=unit, description=description)

    def _proc_instruments(self, counter: Any, updown: Any) -> list[tuple[Any, str, str, str, Any]]:
        """Instruments read straight from ``/proc``, for the files this kernel has."""
        g, out = self._guard, []
        if (self._proc / "pressure").is_dir():
            out.append((counter, "system.pressure.stall", "s",
                        "Time some or all non-idle tasks were stalled on a resource (PSI total).",
                        g("pressure", self._pressure)))
        if (self._proc / "sys" / "fs" / "file-nr").is_file():
            out.append((updown, "system.filesystem.fd.allocated", "{file}", "File handles allocated, host-wide.",
                        g("fd", self._file_nr(0))))
            out.append((updown, "system.filesystem.fd.max", "{file}", "Most file handles the kernel allocates.",
                        g("fd", self._file_nr(2))))
        if (self._proc / "self" / "fd").is_dir():
            out.append((updown, "process.unix.file_descriptor.count", "{file_descriptor}",
                        "File descriptors the agent process holds open.", g("fd", self._own_fds)))
        return out

    # -- sources ----------------------------------------------------------------

    def _cpu_time(self) -> Iterable[Observation]:
        for mode, seconds in _cpu_modes(psutil.cpu_times()).items():
            yield Observation(seconds, {"cpu.mode": mode})

    def _cpu_utilization(self) -> Iterable[Observation]:
        current = _cpu_modes(psutil.cpu_times())
        with self._lock:
            previous = self._prev_cpu
            deltas = {m: max(v - (previous or {}).get(m, v), 0.0) for m, v in current.items()}
            total = sum(deltas.values())
            if previous is not None and total <= 0:
                return []  # no tick since last time: keep the older baseline
            self._prev_cpu = current
        if previous is None:
            return []
        return [Observation(min(d / total, 1.0), {"cpu.mode": m}) for m, d in deltas.items()]

    def _cpu_count(self) -> Iterable[Observation]:
        count = psutil.cpu_count(logical=True)
        return [Observation(count)] if count else []

    def _load(self, index: int) -> _Read:
        return lambda: [Observation(float(psutil.getloadavg()[index]))]

    def _memory_usage(self) -> Iterable[Observation]:
        states = _memory_states(psutil.virtual_memory())
        return [Observation(v, {"system.memory.state": s}) for s, v in states.items()]

    def _memory_utilization(self) -> Iterable[Observation]:
        vm = psutil.virtual_memory()
        if not vm.total:
            return []
        return [Observation(v / vm.total, {"system.memory.state": s}) for s, v in _memory_states(vm).items()]

    def _memory_limit(self) -> Iterable[Observation]:
        return [Observation(int(psutil.virtual_memory().total))]

    def _memory_available(self) -> Iterable[Observation]:
        return [Observation(int(psutil.virtual_memory().available))]

    def _disk(self, fields: tuple[str, str]) -> _Read:
        def read() -> Iterable[Observation]:
            for device, c in (psutil.disk_io_counters(perdisk=True) or {}).items():
                for direction, field in zip(("read", "write"), fields):
                    yield Observation(getattr(c, field), {"system.device": device, "disk.io.direction": direction})

        return read

    def _disk_io_time(self) -> Iterable[Observation]:
        for device, c in (psutil.disk_io_counters(perdisk=True) or {}).items():
            busy_ms = getattr(c, "busy_time", None)  # Linux and FreeBSD only
            if busy_ms is not None:
                yield Observation(busy_ms / 1000.0, {"system.device": device})

    def _disk_operation_time(self) -> Iterable[Observation]:
        for device, c in (psutil.disk_io_counters(perdisk=True) or {}).items():
            for direction, field in (("read", "read_time"), ("write", "write_time")):
                ms = getattr(c, field, None)
                if ms is not None:
                    yield Observation(ms / 1000.0, {"system.device": device, "disk.io.direction": direction})

    def _pressure(self) -> Iterable[Observation]:
        for resource in PRESSURE_RESOURCES:
            try:
                text = (self._proc / "pressure" / resource).read_text()
            except OSError:
                continue  # this resource is missing, or PSI is off (psi=0): nothing to report
            for scope, seconds in _pressure_totals(text).items():
                yield Observation(seconds, {"system.pressure.resource": resource, "system.pressure.scope": scope})

    def _file_nr(self, index: int) -> _Read:
        def read() -> Iterable[Observation]:
            fields = (self._proc / "sys" / "fs" / "file-nr").read_text().split()
            return [Observation(int(fields[index]))]

        return read

    def _own_fds(self) -> Iterable[Observation]:
        # counts the descriptor the listing itself holds, as psutil's num_fds() does
        return [Observation(len(os.listdir(self._proc / "self" / "fd")))]

    def _net(self, fields: tuple[str, str]) -> _Read:
        def read() -> Iterable[Observation]:
            for nic, c in (psutil.net_io_counters(pernic=True) or {}).items():
                for direction, field in zip(("receive", "transmit"), fields):
                    yield Observation(getattr(c, field),
                                      {"network.interface.name": nic, "network.io.direction": direction})

        return read

    def _filesystem(self, *, utilization: bool) -> _Read:
        def read() -> Iterable[Observation]:
            seen: set[tuple[str, str]] = set()
            for part in psutil.disk_partitions(all=False):
                if part.fstype in _PSEUDO_FS or (part.device, part.mountpoint) in seen:
                    continue
                seen.add((part.device, part.mountpoint))
                try:
                    usage = psutil.disk_usage(part.mountpoint)
                except Exception as exc:  # one unreadable mount must not hide the others
                    self._drop("filesystem", exc)
                    continue
                attrs = {
                    "system.device": part.device,
                    "system.filesystem.mountpoint": part.mountpoint,
                    "system.filesystem.type": part.fstype,
                    "system.filesystem.mode": "ro" if "ro" in part.opts.split(",") else "rw",
                }
                if utilization:
                    if usage.total:
                        yield Observation(usage.used / usage.total, attrs)
                    continue
                reserved = max(usage.total - usage.used - usage.free, 0)
                for state, value in (("used", usage.used), ("free", usage.free), ("reserved", reserved)):
                    yield Observation(value, {**attrs, "system.filesystem.state": state})

        return read
