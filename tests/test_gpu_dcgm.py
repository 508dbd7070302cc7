"""The dcgm-exporter collector against captures served from a local HTTP server."""

from __future__ import annotations

import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from stethoscope.agents.gpu.dcgm import DcgmCollector, to_readings
from stethoscope.agents.gpu.names import METRICS_BY_NAME
from stethoscope.errors import ConfigError, PluginError

FIXTURES = Path(__file__).parent / "fixtures" / "dcgm"
MiB = 1 << 20


class Exporter:
    """A stand-in dcgm-exporter: serves ``body`` with ``status`` on 127.0.0.1."""

    def __init__(self) -> None:
        self.body, self.status, self.requests = b"", 200, 0
        exporter = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                exporter.requests += 1
                self.send_response(exporter.status)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(exporter.body)))
                self.end_headers()
                self.wfile.write(exporter.body)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/metrics"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def serve(self, fixture: str, status: int = 200) -> None:
        self.body, self.status = (FIXTURES / fixture).read_bytes(), status

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


class Clock:
    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def exporter():
    server = Exporter()
    yield server
    server.stop()


@pytest.fixture
def rig(exporter):
    clock = Clock()
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    collector = DcgmCollector(url=exporter.url, timeout_s=2.0, clock=clock)
    collector.register(provider.get_meter("test"))
    yield exporter, clock, reader, collector
    collector.close()
    provider.shutdown()


def collect(clock: Clock, reader: InMemoryMetricReader) -> dict[str, list[tuple[dict, float]]]:
    clock.now += 1.0
    out: dict[str, list[tuple[dict, float]]] = {}
    data = reader.get_metrics_data()
    for rm in data.resource_metrics if data else []:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                out.setdefault(metric.name, []).extend(
                    (dict(p.attributes), p.value) for p in metric.data.data_points)
    return out


def one(pts, name: str, **attrs) -> float:
    want = {k if "." in k else k.replace("_", "."): v for k, v in attrs.items()}
    found = [v for a, v in pts.get(name, []) if all(a.get(k) == w for k, w in want.items())]
    assert len(found) == 1, (name, want, pts.get(name))
    return found[0]


def test_current_format_maps_values_units_and_attributes(rig):
    exporter, clock, reader, collector = rig
    exporter.serve("current.txt")
    pts = collect(clock, reader)
    assert one(pts, "gpu.clock.sm", gpu_index="0") == 1980
    assert one(pts, "gpu.temperature", gpu_index="0") == 64
    assert one(pts, "gpu.memory.temperature", gpu_index="1") == 50
    assert one(pts, "gpu.power.draw", gpu_index="0") == pytest.approx(512.345)
    assert one(pts, "gpu.energy", gpu_index="0") == pytest.approx(123_456.789)  # mJ -> J
    assert one(pts, "gpu.utilization", gpu_index="0") == pytest.approx(0.87)  # % -> ratio
    assert one(pts, "gpu.decoder.utilization", gpu_index="0") == pytest.approx(0.12)
    assert one(pts, "gpu.memory.used", gpu_index="0") == (58832 + 1727) * MiB  # reserved counts as used
    assert one(pts, "gpu.memory.free", gpu_index="0") == 21000 * MiB
    assert one(pts, "gpu.memory.total", gpu_index="0") == (58832 + 21000 + 1727) * MiB
    assert one(pts, "gpu.pcie.throughput", gpu_index="0", gpu_io_direction="rx") == 256_000_000
    assert one(pts, "gpu.tensor.activity", gpu_index="0") == pytest.approx(0.555)
    assert one(pts, "gpu.remapped_rows", gpu_index="1", **{"gpu.remapped_rows.type": "uncorrectable"}) == 1
    assert one(pts, "gpu.xid.last", gpu_index="1") == 48
    assert "gpu.xid.errors" not in pts  # dcgm-exporter has no per-event XID count
    on = {a["gpu.throttle.reason"] for a, v in pts["gpu.throttle"] if a["gpu.index"] == "0" and v}
    assert on == {"sw_thermal_slowdown", "hw_thermal_slowdown"}
    assert len([a for a, _ in pts["gpu.throttle"] if a["gpu.index"] == "0"]) == 9

    attrs = {a["gpu.index"]: a for a, _ in pts["gpu.temperature"]}
    assert attrs["0"] == {
        "gpu.index": "0", "gpu.uuid": "GPU-7d3e1f0a-2b4c-4e5f-8a9b-0c1d2e3f4a5b",
        "gpu.pci_bus_id": "00000000:18:00.0", "gpu.device": "nvidia0", "gpu.model": "NVIDIA H100 80GB HBM3",
        "k8s.container.name": "trainer", "k8s.namespace.name": "ml-train", "k8s.pod.name": "llama-ft-0",
        "gpu.source": "dcgm"}
    assert attrs["1"]["gpu.mig.profile"] == "3g.40gb" and attrs["1"]["gpu.mig.instance"] == "1"
    assert "k8s.pod.name" not in attrs["1"]  # empty labels are dropped
    assert collector.scrape_errors == 0


def test_fields_mapped_like_nvml_share_its_units():
    readings = to_readings((FIXTURES / "current.txt").read_text())
    mapped = [name for name in readings.names() if name.startswith("gpu.")]
    assert set(mapped) <= set(METRICS_BY_NAME)
    assert sorted(n for n in readings.names() if not n.startswith("gpu.")) == [
        "dcgm.fi.dev.nvlink.bandwidth.total", "dcgm.fi.dev.vgpu.license.status"]


def test_unknown_fields_pass_through_from_the_next_cycle(rig):
    exporter, clock, reader, collector = rig
    exporter.serve("current.txt")
    assert "dcgm.fi.dev.vgpu.license.status" not in collect(clock, reader)
    deadline = time.monotonic() + 5
    wanted = {"dcgm.fi.dev.vgpu.license.status", "dcgm.fi.dev.nvlink.bandwidth.total"}
    while not wanted <= set(pts := collect(clock, reader)):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert one(pts, "dcgm.fi.dev.nvlink.bandwidth.total", gpu_index="0") == 123456
    a, _ = [p for p in pts["dcgm.fi.dev.vgpu.license.status"] if p[0]["gpu.index"] == "0"][0]
    assert a["gpu.uuid"] == "GPU-7d3e1f0a-2b4c-4e5f-8a9b-0c1d2e3f4a5b" and a["gpu.source"] == "dcgm"


def test_old_and_new_formats_give_identical_series_names(rig):
    exporter, clock, reader, collector = rig
    exporter.serve("old-hostname.txt")
    old = collect(clock, reader)
    exporter.serve("current.txt")
    new = collect(clock, reader)
    gpu_names = lambda pts: {name for name in pts if name.startswith("gpu.")}  # noqa: E731
    assert gpu_names(old) == gpu_names(new)
    assert {"gpu.throttle", "gpu.memory.used", "gpu.memory.total"} <= gpu_names(old)
    assert one(old, "gpu.memory.used") == 186 * MiB  # no FB_RESERVED in the old exporter
    assert one(old, "gpu.memory.total") == (186 + 14923) * MiB
    assert {a["gpu.throttle.reason"] for a, v in old["gpu.throttle"] if v} == {"gpu_idle"}
    old_attrs = old["gpu.temperature"][0][0]
    assert old_attrs == {"gpu.index": "0", "gpu.uuid": "GPU-5fd4b3c2-9f1e-2a0d-7b6c-e5f4a3b2c1d0",
                         "gpu.device": "nvidia0", "gpu.model": "Tesla T4", "gpu.source": "dcgm"}


def test_one_scrape_per_collection(rig):
    exporter, clock, reader, collector = rig
    exporter.serve("current.txt")
    collect(clock, reader)
    assert exporter.requests == 1
    collect(clock, reader)
    assert exporter.requests == 2


@pytest.mark.parametrize("fixture, status", [("garbage.txt", 200), ("current.txt", 500)])
def test_bad_scrapes_give_no_points_and_are_counted(rig, caplog, fixture, status):
    exporter, clock, reader, collector = rig
    exporter.serve(fixture, status)
    with caplog.at_level(logging.WARNING, logger="stethoscope.agents.gpu.dcgm"):
        assert collect(clock, reader) == {}
        assert collect(clock, reader) == {}
        clock.now += 60
        assert collect(clock, reader) == {}
    assert collector.scrape_errors == 3
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == 2  # rate-limited: once a minute
    assert ("unparseable" if status == 200 else "HTTP 500") in logged[0]
    exporter.serve("current.txt")
    assert "gpu.temperature" in collect(clock, reader)  # recovers on the next good scrape


def test_an_unreachable_exporter_never_raises():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    clock, reader = Clock(), InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    collector = DcgmCollector(url=f"http://127.0.0.1:{port}/metrics", clock=clock)
    collector.register(provider.get_meter("test"))
    assert collect(clock, reader) == {}
    assert collector.scrape_errors == 1
    with pytest.raises(PluginError, match="connection refused"):
        collector.probe()
    collector.close()
    provider.shutdown()


def test_probe_reasons(exporter):
    collector = DcgmCollector(url=exporter.url)
    exporter.serve("current.txt")
    collector.probe()
    exporter.serve("current.txt", 500)
    with pytest.raises(PluginError, match="HTTP 500"):
        collector.probe()
    exporter.serve("garbage.txt")
    with pytest.raises(PluginError, match="unparseable"):
        collector.probe()


def test_configuration_is_validated_all_at_once():
    with pytest.raises(ConfigError) as info:
        DcgmCollector(url="127.0.0.1:9400", timeout_s=0)
    assert len(info.value.problems) == 2


def test_a_scrape_with_no_dcgm_fields_is_an_error():
    with pytest.raises(ValueError, match="no DCGM_"):
        to_readings("# TYPE go_goroutines gauge\ngo_goroutines 12\n")


def test_every_mapped_field_lands_in_the_table():
    from stethoscope.agents.gpu.dcgm import FIELDS

    for field_name, spec in FIELDS.items():
        assert spec.metric in METRICS_BY_NAME, field_name
        assert set(spec.attributes) <= set(METRICS_BY_NAME[spec.metric].attributes), field_name
