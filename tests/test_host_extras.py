"""The host collector's /proc extras: pressure stall, file descriptors, disk operation time."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psutil
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from stethoscope.agents import host as host_mod
from stethoscope.agents.host import PRESSURE_RESOURCES, HostCollector

LINUX = sys.platform.startswith("linux")
EXTRAS = ("system.pressure.stall", "system.filesystem.fd.allocated", "system.filesystem.fd.max",
          "process.unix.file_descriptor.count")


class Harness:
    def __init__(self, collector: HostCollector) -> None:
        self.collector = collector
        self.reader = InMemoryMetricReader()
        self.provider = MeterProvider(metric_readers=[self.reader], shutdown_on_exit=False)
        collector.register(self.provider.get_meter("test"))

    def collect(self) -> dict[str, Any]:
        data = self.reader.get_metrics_data()
        return {m.name: m for rm in (data.resource_metrics if data else ()) for sm in rm.scope_metrics
                for m in sm.metrics}


@pytest.fixture
def harness_for() -> Iterator[Any]:
    made: list[Harness] = []

    def build(proc_root: Path | str) -> Harness:
        made.append(Harness(HostCollector(proc_root=proc_root)))
        return made[-1]

    yield build
    for h in made:
        h.provider.shutdown()
        h.collector.close()


def values(metric: Any) -> dict[tuple[tuple[str, Any], ...], float]:
    return {tuple(sorted(p.attributes.items())): p.value for p in metric.data.data_points}


def fake_proc(root: Path, *, pressure: dict[str, str] | None = None, file_nr: str | None = None,
              fds: int | None = None) -> Path:
    if pressure is not None:
        (root / "pressure").mkdir(parents=True)
        for name, text in pressure.items():
            (root / "pressure" / name).write_text(text)
    if file_nr is not None:
        (root / "sys" / "fs").mkdir(parents=True)
        (root / "sys" / "fs" / "file-nr").write_text(file_nr)
    if fds is not None:
        (root / "self" / "fd").mkdir(parents=True)
        for i in range(fds):
            (root / "self" / "fd" / str(i)).write_text("")
    return root


CPU = "some avg10=1.09 avg60=1.38 avg300=2.63 total=42358417\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"
IO = "some avg10=0.47 avg60=0.91 avg300=0.70 total=10842103\nfull avg10=0.37 avg60=0.68 avg300=0.54 total=9718846\n"
OLD_KERNEL_CPU = "some avg10=0.00 avg60=0.00 avg300=0.00 total=2500000\n"  # before 5.13: no cpu "full"


def test_pressure_stall_from_fake_proc(tmp_path: Path, harness_for: Any) -> None:
    h = harness_for(fake_proc(tmp_path, pressure={"cpu": CPU, "io": IO}))
    stall = h.collect()["system.pressure.stall"]
    assert stall.unit == "s" and stall.data.is_monotonic
    assert values(stall) == {
        (("system.pressure.resource", "cpu"), ("system.pressure.scope", "some")): 42.358417,
        (("system.pressure.resource", "cpu"), ("system.pressure.scope", "full")): 0.0,
        (("system.pressure.resource", "io"), ("system.pressure.scope", "some")): 10.842103,
        (("system.pressure.resource", "io"), ("system.pressure.scope", "full")): 9.718846,
    }  # memory is missing: skipped silently
    assert h.collector.dropped == {}


def test_pressure_without_full_line_and_unreadable_file(tmp_path: Path, harness_for: Any) -> None:
    root = fake_proc(tmp_path, pressure={"cpu": OLD_KERNEL_CPU})
    (root / "pressure" / "memory").mkdir()  # reading it fails like a PSI-disabled kernel's EOPNOTSUPP
    h = harness_for(root)
    assert values(h.collect()["system.pressure.stall"]) == {
        (("system.pressure.resource", "cpu"), ("system.pressure.scope", "some")): 2.5}
    assert h.collector.dropped == {}


def test_garbled_pressure_file_is_dropped_and_counted(tmp_path: Path, harness_for: Any,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="stethoscope.agents.host")
    h = harness_for(fake_proc(tmp_path, pressure={"cpu": "some total=lots\n"}))
    got = h.collect()
    assert "system.pressure.stall" not in got
    h.collect()
    assert h.collector.dropped == {"pressure": 2}
    assert len([r for r in caplog.records if "pressure" in r.getMessage()]) == 1


def test_no_pressure_directory_means_no_instrument(tmp_path: Path, harness_for: Any) -> None:
    got = harness_for(tmp_path).collect()
    assert not set(EXTRAS) & set(got)
    assert "system.cpu.time" in got  # the psutil side is unaffected by the fake root


def test_file_descriptors_from_fake_proc(tmp_path: Path, harness_for: Any) -> None:
    h = harness_for(fake_proc(tmp_path, file_nr="3360\t0\t9223372036854775807\n", fds=7))
    got = h.collect()
    assert values(got["system.filesystem.fd.allocated"]) == {(): 3360}
    assert values(got["system.filesystem.fd.max"]) == {(): 9223372036854775807}
    assert got["system.filesystem.fd.max"].unit == "{file}"
    assert values(got["process.unix.file_descriptor.count"]) == {(): 7}


def test_disk_operation_time_in_seconds_by_direction(harness_for: Any, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    disks = {"nvme0n1": SimpleNamespace(read_bytes=1, write_bytes=2, read_count=3, write_count=4,
                                        read_time=1500, write_time=250, busy_time=900),
             "sda": SimpleNamespace(read_bytes=1, write_bytes=2, read_count=3, write_count=4,
                                    read_time=0, write_time=42)}
    monkeypatch.setattr(host_mod.psutil, "disk_io_counters", lambda perdisk: disks)
    op = harness_for(tmp_path).collect()["system.disk.operation_time"]
    assert op.unit == "s" and op.data.is_monotonic
    assert values(op) == {
        (("disk.io.direction", "read"), ("system.device", "nvme0n1")): 1.5,
        (("disk.io.direction", "write"), ("system.device", "nvme0n1")): 0.25,
        (("disk.io.direction", "read"), ("system.device", "sda")): 0.0,
        (("disk.io.direction", "write"), ("system.device", "sda")): 0.042,
    }


@pytest.mark.skipif(not LINUX, reason="reads the real /proc")
def test_real_proc_values_are_sane(harness_for: Any) -> None:
    h = harness_for("/proc")
    got = h.collect()
    if os.path.isdir("/proc/pressure") and "system.pressure.stall" in got:
        stall = values(got["system.pressure.stall"])
        resources = {dict(k)["system.pressure.resource"] for k in stall}
        assert resources <= set(PRESSURE_RESOURCES) and resources
        assert all(v >= 0 for v in stall.values())
    allocated = values(got["system.filesystem.fd.allocated"])[()]
    maximum = values(got["system.filesystem.fd.max"])[()]
    assert 0 < allocated <= maximum
    own = values(got["process.unix.file_descriptor.count"])[()]
    assert 3 <= own <= psutil.Process().num_fds() + 16
    for (attrs, seconds) in values(got.get("system.disk.operation_time", SimpleNamespace(
            data=SimpleNamespace(data_points=[])))).items():
        assert seconds >= 0 and dict(attrs)["disk.io.direction"] in ("read", "write")
    assert h.collector.dropped == {}
