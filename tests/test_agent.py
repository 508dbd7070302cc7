"""Tests for the node agent: host collector values, resource, plugins, OTLP export."""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from importlib.metadata import EntryPoint
from types import SimpleNamespace
from typing import Any

import psutil
import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

import stethoscope.agents as agents
from stethoscope.agents import Agent, Collector, HostCollector, build_resource, load_collectors
from stethoscope.agents import collector as collector_mod
from stethoscope.agents import host as host_mod
from stethoscope.errors import ConfigError, PluginError

LINUX = sys.platform.startswith("linux")


# -- helpers -------------------------------------------------------------------------


class Scrape:
    """A host collector registered on a private provider with an in-memory reader."""

    def __init__(self, collector: Any) -> None:
        self.reader = InMemoryMetricReader()
        self.provider = MeterProvider(metric_readers=[self.reader], shutdown_on_exit=False)
        self.collector = collector
        collector.register(self.provider.get_meter("test"))

    def collect(self) -> dict[str, list[tuple[dict[str, Any], float]]]:
        """One collection: metric name -> [(attributes, value)]."""
        out: dict[str, list[tuple[dict[str, Any], float]]] = {}
        data = self.reader.get_metrics_data()
        for rm in data.resource_metrics if data else ():
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    out[metric.name] = [(dict(p.attributes or {}), p.value) for p in metric.data.data_points]
        return out


@pytest.fixture
def scrape() -> Iterator[Scrape]:
    s = Scrape(HostCollector())
    yield s
    s.provider.shutdown()
    s.collector.close()


def by(points: list[tuple[dict[str, Any], float]], key: str) -> dict[Any, float]:
    return {attrs[key]: value for attrs, value in points}


# -- public surface and plugins ----------------------------------------------------------


def test_every_public_name_imports() -> None:
    for name in agents.__all__:
        assert getattr(agents, name) is not None, name


def test_host_entry_point_loads() -> None:
    (host,) = load_collectors(["host", "host"])  # duplicates collapse
    assert isinstance(host, HostCollector)
    assert isinstance(host, Collector)
    assert host.name == "host"


def test_unknown_collector_names_it_and_lists_available() -> None:
    with pytest.raises(PluginError, match=r"unknown collector 'gpu-typo'; available: .*\bhost\b"):
        load_collectors(["host", "gpu-typo"])


def test_broken_entry_point_is_named_and_chained(monkeypatch: pytest.MonkeyPatch) -> None:
    broken = EntryPoint("broken", "no_such_module_for_stethoscope:Thing", collector_mod.COLLECTOR_GROUP)
    monkeypatch.setattr(collector_mod, "entry_points", lambda group: [broken])
    with pytest.raises(PluginError, match="collector 'broken'.*no_such_module_for_stethoscope:Thing") as info:
        load_collectors(["broken"])
    assert isinstance(info.value.__cause__, ImportError)


def test_entry_point_that_is_not_a_collector(monkeypatch: pytest.MonkeyPatch) -> None:
    odd = EntryPoint("odd", "builtins:object", collector_mod.COLLECTOR_GROUP)
    monkeypatch.setattr(collector_mod, "entry_points", lambda group: [odd])
    with pytest.raises(PluginError, match="collector 'odd'.*lacks name/register/close"):
        load_collectors(["odd"])


# -- host collector values ------------------------------------------------------------------


def test_cpu_time_per_mode_is_real(scrape: Scrape) -> None:
    before = psutil.cpu_times()
    modes = by(scrape.collect()["system.cpu.time"], "cpu.mode")
    after = psutil.cpu_times()
    assert {"user", "system", "idle"} <= set(modes) <= set(host_mod.CPU_MODES.values())
    assert "guest" not in modes
    for mode in ("user", "system", "idle"):
        assert getattr(before, mode) <= modes[mode] <= getattr(after, mode)
    if LINUX:
        assert {"iowait", "interrupt", "softirq", "steal", "nice"} <= set(modes)
        assert modes["interrupt"] == pytest.approx(after.irq, abs=1.0)


def test_cpu_utilization_absent_first_then_fractions(scrape: Scrape) -> None:
    assert "system.cpu.utilization" not in scrape.collect()
    points: list[tuple[dict[str, Any], float]] = []
    for _ in range(500):  # wait for the CPU clocks to tick (10 ms granularity); no fixed sleep
        points = scrape.collect().get("system.cpu.utilization", [])
        if points:
            break
        time.sleep(0.01)
    fractions = by(points, "cpu.mode")
    assert {"user", "system", "idle"} <= set(fractions)
    assert all(0.0 <= f <= 1.0 for f in fractions.values())
    assert math.fsum(fractions.values()) == pytest.approx(1.0)


def test_cpu_utilization_from_deltas(scrape: Scrape, monkeypatch: pytest.MonkeyPatch) -> None:
    now = [SimpleNamespace(user=10.0, system=5.0, idle=85.0, iowait=1.0, guest=4.0)]
    monkeypatch.setattr(host_mod.psutil, "cpu_times", lambda: now[0])
    assert "system.cpu.utilization" not in scrape.collect()

    now[0] = SimpleNamespace(user=30.0, system=15.0, idle=135.0, iowait=1.0, guest=9.0)
    got = scrape.collect()
    assert by(got["system.cpu.utilization"], "cpu.mode") == {"user": 0.25, "system": 0.125, "idle": 0.625, "iowait": 0.0}
    assert by(got["system.cpu.time"], "cpu.mode") == {"user": 30.0, "system": 15.0, "idle": 135.0, "iowait": 1.0}

    assert "system.cpu.utilization" not in scrape.collect()  # no tick since: no points
    now[0] = SimpleNamespace(user=30.0, system=15.0, idle=155.0, iowait=1.0, guest=9.0)
    assert by(scrape.collect()["system.cpu.utilization"], "cpu.mode")["idle"] == 1.0
    assert scrape.collector.dropped == {}


def test_cpu_count_and_load(scrape: Scrape) -> None:
    got = scrape.collect()
    assert got["system.cpu.logical.count"] == [({}, psutil.cpu_count(logical=True))]
    for window in ("1m", "5m", "15m"):
        ((attrs, value),) = got[f"system.cpu.load_average.{window}"]
        assert attrs == {} and value >= 0.0
    if hasattr(os, "getloadavg"):
        assert got["system.cpu.load_average.15m"][0][1] == pytest.approx(os.getloadavg()[2], abs=1.0)


def test_memory_usage_utilization_limit(scrape: Scrape) -> None:
    got = scrape.collect()
    total = psutil.virtual_memory().total
    usage = by(got["system.memory.usage"], "system.memory.state")
    assert usage["used"] > 0 and usage["free"] > 0
    assert got["system.memory.limit"] == [({}, total)]
    if LINUX:
        assert set(usage) == {"used", "free", "buffers", "cached"}
        assert sum(usage.values()) == total  # states partition the total
        ((_, available),) = got["system.memory.linux.available"]
        assert 0 < available <= total
    utilization = by(got["system.memory.utilization"], "system.memory.state")
    assert utilization.keys() == usage.keys()
    for state, fraction in utilization.items():
        assert 0.0 <= fraction <= 1.0
        assert fraction == pytest.approx(usage[state] / total, abs=0.05)


def test_network_and_disk_attributes(scrape: Scrape) -> None:
    nics_before, disks_before = set(psutil.net_io_counters(pernic=True)), set(psutil.disk_io_counters(perdisk=True) or {})
    got = scrape.collect()
    nics_after, disks_after = set(psutil.net_io_counters(pernic=True)), set(psutil.disk_io_counters(perdisk=True) or {})
    for metric in ("system.network.io", "system.network.packets", "system.network.errors",
                   "system.network.dropped"):
        points = got[metric]
        assert {a["network.io.direction"] for a, _ in points} == {"receive", "transmit"}
        assert nics_before & nics_after <= {a["network.interface.name"] for a, _ in points} <= nics_before | nics_after
        assert all(v >= 0 for _, v in points)
    if "lo" in nics_before:
        rx = {(a["network.interface.name"], a["network.io.direction"]): v for a, v in got["system.network.io"]}
        assert rx[("lo", "receive")] <= psutil.net_io_counters(pernic=True)["lo"].bytes_recv
    for metric in ("system.disk.io", "system.disk.operations"):
        points = got.get(metric, [])
        assert disks_before & disks_after <= {a["system.device"] for a, _ in points} <= disks_before | disks_after
        assert all(a["disk.io.direction"] in ("read", "write") and v >= 0 for a, v in points)


def test_filesystem_states_sum_to_size(scrape: Scrape) -> None:
    got = scrape.collect()
    if "system.filesystem.usage" not in got:
        pytest.skip("no real filesystem visible here")
    sizes: dict[str, int] = {}
    for attrs, value in got["system.filesystem.usage"]:
        assert attrs["system.filesystem.type"] not in host_mod._PSEUDO_FS
        sizes[attrs["system.filesystem.mountpoint"]] = sizes.get(attrs["system.filesystem.mountpoint"], 0) + value
    for mountpoint, size in sizes.items():
        assert size == pytest.approx(psutil.disk_usage(mountpoint).total, rel=0.01)
    assert all(0.0 <= v <= 1.0 for _, v in got["system.filesystem.utilization"])


def test_failing_source_is_counted_and_logged_once(
    scrape: Scrape, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def boom() -> None:
        raise OSError("/proc/meminfo vanished")

    monkeypatch.setattr(host_mod.psutil, "virtual_memory", boom)
    with caplog.at_level(logging.WARNING, logger=host_mod.__name__):
        first = scrape.collect()
        drops_after_first = scrape.collector.dropped["memory"]
        second = scrape.collect()
    for got in (first, second):
        assert not any(name.startswith("system.memory.") for name in got)
        assert got["system.cpu.time"]  # the other sources still report
    memory_instruments = 4 if LINUX else 3
    assert drops_after_first == memory_instruments
    assert scrape.collector.dropped == {"memory": 2 * memory_instruments}
    warnings = [r for r in caplog.records if r.name == host_mod.__name__]
    assert len(warnings) == 1 and "memory" in warnings[0].getMessage()
    assert "vanished" in warnings[0].getMessage()


# -- resource ---------------------------------------------------------------------------------


def test_resource_from_environment(caplog: pytest.LogCaptureFixture) -> None:
    environ = {
        "NODE_NAME": "gpu-node-7",
        "K8S_POD_NAME": "agent-abc",
        "POD_NAME": "ignored-fallback",
        "POD_NAMESPACE": "observability",
        "K8S_POD_UID": "0f1e",
        "K8S_CLUSTER_NAME": "train-east",
        "OTEL_RESOURCE_ATTRIBUTES": "team=ml%2Cinfra, rack = r%2012 ,malformed,=novalue,k8s.cluster.name=from-otel,"
                                    "note=a%3Db",
    }
    with caplog.at_level(logging.WARNING, logger="stethoscope.agents.resource"):
        attrs = build_resource(extra={"team": "explicit"}, environ=environ).attributes
    assert attrs["k8s.node.name"] == "gpu-node-7"
    assert attrs["k8s.pod.name"] == "agent-abc"
    assert attrs["k8s.namespace.name"] == "observability"
    assert attrs["k8s.pod.uid"] == "0f1e"
    assert attrs["k8s.cluster.name"] == "from-otel"  # OTEL_RESOURCE_ATTRIBUTES over detection
    assert attrs["team"] == "explicit"  # extra over env
    assert attrs["rack"] == "r 12"
    assert attrs["note"] == "a=b"
    assert "malformed" not in attrs and "" not in attrs
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "'malformed'" in messages and "'=novalue'" in messages


def test_resource_defaults_without_environment() -> None:
    import socket

    import stethoscope

    a = build_resource(environ={}).attributes
    b = build_resource(service_name="other", environ={}).attributes
    assert a["host.name"] == socket.gethostname()
    assert a["service.name"] == "stethoscope-agent" and b["service.name"] == "other"
    assert a["service.version"] == stethoscope.__version__
    assert a["os.type"] == ("linux" if LINUX else a["os.type"])
    assert a["host.arch"]
    assert a["service.instance.id"] == b["service.instance.id"]
    assert uuid.UUID(a["service.instance.id"]).version == 4
    assert not any(k.startswith("k8s.") for k in a)


def test_otel_service_name_overrides_resource_attributes() -> None:
    env = {"OTEL_RESOURCE_ATTRIBUTES": "service.name=a", "OTEL_SERVICE_NAME": "b"}
    assert build_resource(environ=env).attributes["service.name"] == "b"
    assert build_resource(environ=env, extra={"service.name": "c"}).attributes["service.name"] == "c"


# -- agent ------------------------------------------------------------------------------------


def test_agent_reports_every_config_problem() -> None:
    with pytest.raises(ConfigError) as info:
        Agent(endpoint="127.0.0.1:4318", interval_s=0, timeout_s=float("nan"),
              collectors=[object()], resource="not a resource")  # type: ignore[list-item, arg-type]
    problems = info.value.problems
    assert len(problems) == 5
    for word in ("endpoint", "interval_s", "timeout_s", "collectors", "resource"):
        assert any(p.startswith(word) for p in problems), word


def test_agent_rejects_signal_path_in_endpoint() -> None:
    with pytest.raises(ConfigError, match="base URL"):
        Agent(endpoint="http://collector:4318/v1/metrics/", collectors=[], resource=build_resource(environ={}))


class _FailingRegister:
    name = "flaky"

    def register(self, meter: Any) -> None:
        raise RuntimeError("no device")

    def close(self) -> None:
        pass


def test_register_failure_is_a_plugin_error() -> None:
    with pytest.raises(PluginError, match="'flaky' failed to register: no device"):
        Agent(endpoint="http://127.0.0.1:9", collectors=[_FailingRegister()], resource=build_resource(environ={}))


class OtlpSink:
    """A loopback HTTP server that records every POST."""

    def __init__(self, status: int = 200) -> None:
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server naming)
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                sink.requests.append((self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                reply = ExportMetricsServiceResponse().SerializeToString()
                self.send_response(status)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()

    def decoded(self, i: int) -> ExportMetricsServiceRequest:
        request = ExportMetricsServiceRequest()
        request.ParseFromString(self.requests[i][2])
        return request


@pytest.fixture
def sink() -> Iterator[OtlpSink]:
    s = OtlpSink()
    yield s
    s.close()


def _agent(endpoint: str, **kw: Any) -> Agent:
    resource = build_resource(environ={"K8S_NODE_NAME": "gpu-node-1"})
    return Agent(endpoint=endpoint + "/", interval_s=60, collectors=[HostCollector()], resource=resource, **kw)


def test_flush_exports_otlp_protobuf(sink: OtlpSink) -> None:
    agent = _agent(sink.endpoint, headers={"x-tenant": "fleet-a"})
    try:
        assert agent.flush(timeout_s=10)
        assert len(sink.requests) == 1
        path, headers, _ = sink.requests[0]
        assert path == "/v1/metrics"
        assert headers["content-type"] == "application/x-protobuf"
        assert headers["x-tenant"] == "fleet-a"
        request = sink.decoded(0)
        (rm,) = request.resource_metrics
        attrs = {kv.key: kv.value.string_value for kv in rm.resource.attributes}
        assert attrs["host.name"] == build_resource(environ={}).attributes["host.name"]
        assert attrs["service.name"] == "stethoscope-agent"
        assert attrs["k8s.node.name"] == "gpu-node-1"
        scopes = {sm.scope.name: sm for sm in rm.scope_metrics}
        assert set(scopes) == {"stethoscope.agents.host", "stethoscope.agent"}  # the agent reports on itself
        sm = scopes["stethoscope.agents.host"]
        assert sm.scope.name == "stethoscope.agents.host"
        metrics = {m.name: m for m in sm.metrics}
        cpu = metrics["system.cpu.time"]
        assert cpu.unit == "s" and cpu.sum.is_monotonic
        modes = {kv.value.string_value for dp in cpu.sum.data_points for kv in dp.attributes if kv.key == "cpu.mode"}
        assert {"user", "system", "idle"} <= modes
        memory = metrics["system.memory.usage"]
        assert memory.unit == "By" and not memory.sum.is_monotonic
        assert all(dp.as_int > 0 for dp in memory.sum.data_points if dp.attributes[0].value.string_value == "used")
    finally:
        agent.shutdown()
    assert agent.closed and not agent.flush()


def test_run_forever_shuts_down_with_one_final_export(sink: OtlpSink) -> None:
    agent = _agent(sink.endpoint)
    stop = threading.Event()
    stop.set()
    agent.run_forever(stop)
    assert agent.closed
    assert len(sink.requests) == 1
    names = {m.name for sm in sink.decoded(0).resource_metrics[0].scope_metrics for m in sm.metrics}
    assert {"system.cpu.time", "system.memory.usage"} <= names
    agent.shutdown()  # idempotent
    assert len(sink.requests) == 1


def test_flush_reports_a_rejected_export() -> None:
    sink = OtlpSink(status=400)  # 4xx is not retried, so this fails fast
    agent = _agent(sink.endpoint, timeout_s=5)
    try:
        assert agent.flush() is False
        assert len(sink.requests) == 1
    finally:
        agent.shutdown()
        sink.close()


def test_flush_to_nobody_returns_false() -> None:
    closed = OtlpSink()
    closed.close()  # the port is now (almost certainly) refusing connections
    agent = _agent(closed.endpoint, timeout_s=0.5)
    try:
        assert agent.flush() is False
    finally:
        agent.shutdown()
