"""The frozen, validated configuration of a :class:`~.model.ModelMonitor`.

Examples:
    >>> ModelMonitorSettings(model="m", export_interval_s=0, buffer_rows=0).problems()
    ['export_interval_s: must be a finite number > 0, got 0', 'buffer_rows: must be a positive integer, got 0']
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from ..daemon import DEFAULT_ENDPOINT
from .sampling import SamplingConfig

__all__ = ["DEFAULT_LATENCY_BOUNDS_MS", "ModelMonitorSettings", "finite_number"]

DEFAULT_LATENCY_BOUNDS_MS = (0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0)
"""Explicit bucket bounds of ``stethoscope.model.latency``, in ms."""
MiB = 1024 * 1024


def finite_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class ModelMonitorSettings:
    """Everything a :class:`ModelMonitor` is built from; :meth:`problems` lists every mistake."""

    model: str
    version: str = ""
    endpoint: str = DEFAULT_ENDPOINT
    feature_names: tuple[str, ...] | None = None
    service_name: str | None = None
    export_interval_s: float = 10.0
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    resource_attributes: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    headers: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    timeout_s: float = 10.0
    spool_dir: str | None = None
    spool_max_bytes: int = 64 * MiB
    latency_bounds_ms: tuple[float, ...] = DEFAULT_LATENCY_BOUNDS_MS
    buffer_rows: int = 256
    max_pending_rows: int = 10_000
    cost_per_prediction: float | None = None
    max_names: int = 64
    """Distinct class labels, error kinds and business names kept (more fold into ``other``)."""

    def problems(self) -> list[str]:
        out: list[str] = []
        if not (isinstance(self.model, str) and self.model.strip("/")):
            out.append(f"model: must be a non-empty string, got {self.model!r}")
        if not isinstance(self.version, str):
            out.append(f"version: must be a string, got {self.version!r}")
        if not (isinstance(self.endpoint, str) and self.endpoint.startswith(("http://", "https://"))):
            out.append(f"endpoint: must be an http(s) base URL, got {self.endpoint!r}")
        names = self.feature_names
        if names is not None:
            if not names or not all(isinstance(n, str) and n for n in names):
                out.append("feature_names: must be non-empty strings (or give the number of features)")
            elif len(set(names)) != len(names):
                out.append("feature_names: must be unique")
        if self.service_name is not None and not (isinstance(self.service_name, str) and self.service_name):
            out.append(f"service_name: must be a non-empty string, got {self.service_name!r}")
        for name in ("export_interval_s", "timeout_s"):
            if not (finite_number(getattr(self, name)) and getattr(self, name) > 0):
                out.append(f"{name}: must be a finite number > 0, got {getattr(self, name)!r}")
        if not isinstance(self.sampling, SamplingConfig):
            out.append(f"sampling: must be a SamplingConfig, got {type(self.sampling).__name__}")
        else:
            out += self.sampling.problems()
        bounds = self.latency_bounds_ms
        if not (bounds and all(finite_number(b) for b in bounds) and list(bounds) == sorted(set(bounds))):
            out.append("latency_bounds_ms: must be finite, strictly increasing numbers")
        for name in ("buffer_rows", "max_pending_rows", "max_names", "spool_max_bytes"):
            v = getattr(self, name)
            if not (isinstance(v, int) and not isinstance(v, bool) and v > 0):
                out.append(f"{name}: must be a positive integer, got {v!r}")
        if self.cost_per_prediction is not None and not finite_number(self.cost_per_prediction):
            out.append(f"cost_per_prediction: must be a finite number, got {self.cost_per_prediction!r}")
        for what in ("resource_attributes", "headers"):
            m = getattr(self, what)
            if not (isinstance(m, Mapping) and all(isinstance(k, str) and isinstance(v, str) for k, v in m.items())):
                out.append(f"{what}: must map strings to strings")
        return out
