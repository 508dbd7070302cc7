"""Shared fixtures: free ports, an embedded store, and a running ``up`` service."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator

import pytest

from stethoscope._net import free_port  # noqa: F401 - the tests import it from here
from stethoscope.config import load_config
from stethoscope.exporters.chdb_store import ChdbStore
from stethoscope.exporters.service import Service



@pytest.fixture
def store(tmp_path) -> Iterator[ChdbStore]:
    """An embedded store with the schema created (chDB: one open directory per process)."""
    st = ChdbStore(tmp_path / "data")
    st.ensure_schema()
    yield st
    st.close()


def make_service(tmp_path, **settings) -> Service:
    overrides = {
        "store.data_dir": str(tmp_path / "data"),
        "collector.otlp_http_port": free_port(),
        "sql.port": free_port(),
        "store.flush_interval": "20ms",
    }
    overrides.update(settings)
    svc = Service(load_config(environ={}, overrides=overrides))
    svc.start()
    return svc


@pytest.fixture(params=["native", "python"])
def decoder(request) -> str:
    """Every test that ingests runs with the C kernel and with its pure-Python twin."""
    return request.param


@pytest.fixture
def service(tmp_path) -> Iterator[Service]:
    """A running in-process ``up`` on free loopback ports, read-only SQL."""
    svc = make_service(tmp_path)
    yield svc
    svc.stop()


@pytest.fixture
def writable_service(tmp_path) -> Iterator[Service]:
    svc = make_service(tmp_path, **{"sql.writable": True})
    yield svc
    svc.stop()


def otlp_url(svc: Service, path: str = "/v1/metrics") -> str:
    return f"http://127.0.0.1:{svc.otlp.port}{path}"


def sql_url(svc: Service) -> str:
    return f"http://127.0.0.1:{svc.sql.port}/"


def sql(svc: Service, query: str, fmt: str = "TabSeparated") -> str:
    """Run ``query`` through the service's SQL endpoint; return the body text."""
    req = urllib.request.Request(
        sql_url(svc) + f"?default_format={fmt}", data=query.encode(), method="POST"
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        return resp.read().decode()


@pytest.fixture(autouse=True)
def kernel_implementation(request, monkeypatch):
    """The SDK tests run once with the C kernels and once with their NumPy twins."""
    impl = getattr(request, "param", None)
    if impl is not None:
        from stethoscope.native import PURE_ENV

        monkeypatch.setenv(PURE_ENV, "1" if impl == "python" else "0")
    return impl


def pytest_generate_tests(metafunc):
    module = metafunc.module.__name__.rsplit(".", 1)[-1]
    if module.startswith("test_sdk_") and "kernel_implementation" in metafunc.fixturenames:
        metafunc.parametrize("kernel_implementation", ["native", "python"], indirect=True)
