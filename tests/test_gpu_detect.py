"""Choosing a GPU source, the public surface of ``stethoscope.agents.gpu``, and its doctests."""

from __future__ import annotations

import ctypes.util
import doctest
import importlib
import logging
import socket

import pynvml as real
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from test_gpu_dcgm import Exporter
from test_gpu_nvml import FakeNvml

import stethoscope.agents.gpu as gpu
from stethoscope.agents.collector import Collector
from stethoscope.agents.gpu import DcgmCollector, GpuCollector, NvmlCollector, SimulatedGpuCollector
from stethoscope.errors import ConfigError

GPU_MODULES = ["stethoscope.agents.gpu"] + [f"stethoscope.agents.gpu.{m}"
                                            for m in ("names", "nvml", "dcgm", "simulate", "detect")]
LOGGER = "stethoscope.agents.gpu.detect"


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/metrics"


@pytest.fixture
def meter():
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    yield provider.get_meter("test"), reader
    provider.shutdown()


@pytest.fixture
def exporter():
    server = Exporter()
    yield server
    server.stop()


def sources(reader: InMemoryMetricReader) -> set[str]:
    data = reader.get_metrics_data()
    return {dict(p.attributes)["gpu.source"] for rm in (data.resource_metrics if data else [])
            for sm in rm.scope_metrics for m in sm.metrics for p in m.data.data_points}


def register(collector: GpuCollector, meter, caplog) -> list[str]:
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        collector.register(meter)
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


def test_simulator_when_asked(meter, caplog):
    m, reader = meter
    collector = GpuCollector(simulate_gpus=2, nvml=FakeNvml())  # simulation wins even with a GPU
    assert register(collector, m, caplog) == ["GPU source: simulated (simulate_gpus=2)"]
    assert collector.source == "simulated" and sources(reader) == {"simulated"}
    collector.close()


def test_nvml_when_it_initialises(meter, caplog, exporter):
    m, reader = meter
    exporter.serve("current.txt")
    collector = GpuCollector(nvml=FakeNvml(), dcgm_url=exporter.url)
    assert register(collector, m, caplog) == ["GPU source: nvml (NVML initialised, 2 GPUs)"]
    assert sources(reader) == {"nvml"} and exporter.requests == 0
    collector.close()
    collector.close()


def test_dcgm_when_nvml_fails(meter, caplog, exporter):
    m, reader = meter
    exporter.serve("current.txt")
    collector = GpuCollector(nvml=FakeNvml(init_error=real.NVML_ERROR_LIB_RM_VERSION_MISMATCH),
                             dcgm_url=exporter.url)
    lines = register(collector, m, caplog)
    assert lines == [f"GPU source: dcgm (NVML: RM has detected an NVML/RM version mismatch.; "
                     f"dcgm-exporter at {exporter.url} answered)"]
    assert isinstance(collector.detection.collector, DcgmCollector)
    assert sources(reader) == {"dcgm"}
    collector.close()


def test_none_on_a_node_without_gpus(meter, caplog):
    m, reader = meter
    url = closed_port_url()
    collector = GpuCollector(nvml=FakeNvml(init_error=real.NVML_ERROR_LIBRARY_NOT_FOUND), dcgm_url=url)
    lines = register(collector, m, caplog)
    assert lines == [f"GPU source: none (NVML: NVML Shared Library Not Found; "
                     f"dcgm-exporter at {url}: connection refused)"]
    assert [r.levelno for r in caplog.records if r.name == LOGGER] == [logging.INFO]
    assert collector.source == "none" and collector.detection.collector is None
    assert sources(reader) == set()
    collector.close()


def test_none_when_the_url_answers_without_dcgm_metrics(meter, caplog, exporter):
    m, _ = meter
    exporter.serve("garbage.txt")
    collector = GpuCollector(nvml=FakeNvml(gpus=[]), dcgm_url=exporter.url)
    (line,) = register(collector, m, caplog)
    assert line.startswith("GPU source: none (NVML: NVML initialised but found no usable GPU (count 0); ")
    assert "unparseable scrape" in line


def test_a_crashing_nvml_binding_is_only_a_reason(meter, caplog):
    m, _ = meter

    class Broken(FakeNvml):
        def nvmlInit(self):
            raise OSError("libnvidia-ml.so.1: cannot open shared object file")

    collector = GpuCollector(nvml=Broken(), dcgm_url=closed_port_url())
    (line,) = register(collector, m, caplog)
    assert "NVML: libnvidia-ml.so.1: cannot open shared object file" in line
    assert collector.source == "none"


@pytest.mark.skipif(ctypes.util.find_library("nvidia-ml") is not None, reason="this machine has an NVIDIA driver")
def test_the_real_default_on_this_gpu_less_machine(meter, caplog):
    m, _ = meter
    collector = GpuCollector(dcgm_url=closed_port_url())
    (line,) = register(collector, m, caplog)
    assert line.startswith("GPU source: none (NVML: NVML Shared Library Not Found; dcgm-exporter at ")


def test_configuration_mistakes_fail_at_build_time():
    with pytest.raises(ConfigError, match="simulate_gpus"):
        GpuCollector(simulate_gpus=-1)
    with pytest.raises(ConfigError, match="dcgm.url"):
        GpuCollector(dcgm_url="localhost:9400")


@pytest.mark.parametrize("factory", [NvmlCollector, DcgmCollector, SimulatedGpuCollector, GpuCollector])
def test_entry_point_targets_build_with_keywords_only(factory):
    collector = factory()
    assert isinstance(collector, Collector)
    assert collector.name == {NvmlCollector: "nvml", DcgmCollector: "dcgm",
                              SimulatedGpuCollector: "simulate", GpuCollector: "gpu"}[factory]
    assert factory(name="renamed").name == "renamed"
    with pytest.raises(TypeError):
        factory("positional")
    collector.close()


@pytest.mark.parametrize("name", GPU_MODULES)
def test_public_names_exist(name):
    module = importlib.import_module(name)
    assert module.__doc__
    for public in module.__all__:
        assert hasattr(module, public), f"{name}.__all__ lists {public!r}"


@pytest.mark.parametrize("name", GPU_MODULES)
def test_docstring_examples_run(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0


def test_package_reexports_the_collectors():
    assert gpu.NvmlCollector is NvmlCollector and gpu.GpuCollector is GpuCollector


def test_the_docs_table_matches_the_code():
    from pathlib import Path

    from stethoscope.agents.gpu.names import METRICS

    text = (Path(__file__).parent.parent / "docs" / "gpu-metrics.md").read_text()
    for spec in METRICS:
        assert f"| `{spec.name}` | `{spec.unit}` | {spec.kind} |" in text, spec.name
