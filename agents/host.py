"""The host collector: CPU, memory, disk, network and filesystem metrics via psutil.

Names, units and attributes follow the OpenTelemetry semantic conventions for
system metrics, as the Collector's ``hostmetrics`` receiver emits them, so the
same dashboards work whichever agent a node runs. CPU figures are aggregated
over all logical CPUs.

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
import sys
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import psutil
from opentelemetry.metrics import CallbackOptions, Meter, Observation

__all__ = ["HostCollector", "CPU_MODES"]

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


def _memory_states(vm: Any) -> dict[str, int]:
    """States that partition total memory (their sum is the total on Linux)."""
    buffers = getattr(vm, "buffers", None)
    cached = getattr(vm, "cached", None)
    if buffers is None or cached is None:
        return {"used": int(vm.used), "free": int(vm.free)}
    used = max(int(vm.total) - int(vm.free) - int(buffers) - int(cached), 0)
    return {"used": used, "free": int(vm.free), "buffers": int(buffers), "cached": int(cached)}


class HostCollector:
    """Host metrics from psutil; registered as the ``host`` collector.

    Built with no arguments. :meth:`register` creates the observable
    instruments; :attr:`dropped` maps a source name (``cpu``, ``load``,
    ``memory``, ``disk``, ``network``, ``filesystem``) to how many times reading
    it failed.
    """

    name = "host"

    def __init__(self) -> None:
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
        if sys.platform.startswith("linux"):
            instruments.append((updown, "system.memory.linux.available", "By",
                                "Memory available for new work without swapping (MemAvailable).",
                                g("memory", self._memory_available)))
        for create, name, unit, description, callback in instruments:
            create(name, callbacks=[callback], unit=unit, description=description)

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
