"""The package's public surface, its doctests, its plugins and how light the base install is."""

from __future__ import annotations

import doctest
import importlib
import pkgutil
import subprocess
import sys
from importlib.metadata import entry_points, requires

import pytest

import stethoscope

SUBPACKAGES = ["agents", "exporters", "analytics", "alerts", "dashboards", "native"]


def all_modules() -> list[str]:
    names = ["stethoscope"]
    for info in pkgutil.iter_modules(stethoscope.__path__, "stethoscope."):
        names.append(info.name)
    for sub in SUBPACKAGES:
        pkg = importlib.import_module(f"stethoscope.{sub}")
        names.append(pkg.__name__)
        names += [i.name for i in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".")]
    return sorted(n for n in set(names) if not n.endswith("__main__") and n != "stethoscope._native")


@pytest.mark.parametrize("name", all_modules())
def test_every_public_name_imports(name):
    module = importlib.import_module(name)
    for public in getattr(module, "__all__", []):
        assert hasattr(module, public), f"{name}.__all__ lists {public!r}, which does not exist"


@pytest.mark.parametrize("name", all_modules())
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0


@pytest.mark.parametrize("group", ["stethoscope.collectors", "stethoscope.stores"])
def test_entry_points_load(group):
    eps = entry_points(group=group)
    assert eps, f"nothing registered in {group}"
    for ep in eps:
        assert isinstance(ep.load(), type)


def test_each_folder_is_a_subpackage():
    for sub in SUBPACKAGES:
        assert importlib.import_module(f"stethoscope.{sub}").__doc__


def _closure(reqs: list[str]) -> set[str]:
    from importlib.metadata import PackageNotFoundError
    from packaging.requirements import Requirement

    seen: set[str] = set()
    todo = [Requirement(r) for r in reqs]
    while todo:
        req = todo.pop()
        if req.marker and not req.marker.evaluate({"extra": ""}):
            continue
        name = req.name.lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        try:
            todo += [Requirement(r) for r in (requires(name) or [])]
        except PackageNotFoundError:
            pass
    return seen


def test_base_install_stays_light():
    base = [r for r in requires("stethoscope") if "extra ==" not in r]
    closure = _closure(base)
    heavy = {"chdb", "chdb-core", "scipy", "pandas", "clickhouse-connect", "pyarrow", "torch"}
    assert not closure & heavy, f"the base install pulls {sorted(closure & heavy)}"
    assert {"opentelemetry-sdk", "psutil"} <= closure


def test_agent_and_cli_import_nothing_heavy():
    code = (
        "import sys, stethoscope.cli, stethoscope.agents, stethoscope.config;"
        "heavy = [m for m in ('chdb', 'scipy', 'pandas', 'clickhouse_connect', 'pyarrow') if m in sys.modules];"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


def test_missing_extra_names_it(monkeypatch):
    from stethoscope.errors import MissingExtraError
    from stethoscope.exporters import chdb_store

    real = importlib.import_module

    def fake(name, *a, **k):
        if name == "chdb":
            raise ModuleNotFoundError("No module named 'chdb'", name="chdb")
        return real(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", fake)
    with pytest.raises(MissingExtraError, match=r"pip install 'stethoscope\[server\]'"):
        chdb_store.ChdbStore("/nonexistent/never-created")


def test_without_the_c_kernels_the_twins_take_over_with_one_warning(monkeypatch, caplog):
    from stethoscope import native

    monkeypatch.setattr(native, "native_available", lambda: False)
    monkeypatch.setattr(native, "_warned", False)
    monkeypatch.delenv(native.PURE_ENV, raising=False)
    with caplog.at_level("WARNING", logger="stethoscope.native"):
        first = native.implementation()
        second = native.implementation()
    assert first is second and first.__name__ == "stethoscope.native.otlp_rowbinary"
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1
    assert "C compiler" in caplog.records[0].message
    with pytest.raises(ImportError):
        monkeypatch.setattr(native.importlib, "import_module", _refuse_native)
        native.implementation("native")


def _refuse_native(name, *args, **kwargs):
    if name == "stethoscope._native":
        raise ImportError("not built")
    return importlib.__import__(name)


def test_pure_python_environment_variable_forces_the_twin(monkeypatch):
    from stethoscope import native

    monkeypatch.setenv(native.PURE_ENV, "1")
    assert native.implementation().__name__ == "stethoscope.native.otlp_rowbinary"
    monkeypatch.setenv(native.PURE_ENV, "0")
    assert native.implementation().__name__ == "stethoscope._native"
