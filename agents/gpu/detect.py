"""Pick the GPU source a node can use, and say which and why in one log line.

Order: the simulator when ``simulate_gpus > 0``; else NVML if it initialises;
else dcgm-exporter if its URL answers with DCGM metrics; else no GPU metrics at
all. A node without GPUs is normal, not an error: :class:`GpuCollector` never
raises for one, it logs one INFO line such as::

    GPU source: none (NVML: NVML Shared Library Not Found; dcgm-exporter at
    http://127.0.0.1:9400/metrics: connection refused)

Examples:
    >>> found = detect_gpu_collector(simulate_gpus=2)
    >>> found.source, found.reason
    ('simulated', 'simulate_gpus=2')
    >>> GpuCollector().name
    'gpu'
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Literal

from opentelemetry.metrics import Meter

from stethoscope.errors import ConfigError, PluginError

from ..collector import Collector
from .dcgm import DEFAULT_URL, DcgmCollector
from .nvml import NvmlCollector
from .simulate import SimulatedGpuCollector

__all__ = ["GpuCollector", "GpuDetection", "GpuSource", "detect_gpu_collector"]

_log = logging.getLogger(__name__)

GpuSource = Literal["simulated", "nvml", "dcgm", "none"]


@dataclass(frozen=True)
class GpuDetection:
    """What :func:`detect_gpu_collector` chose, why, and the collector (None for ``none``)."""

    source: GpuSource
    reason: str
    collector: Collector | None = field(default=None, compare=False, repr=False)

    def line(self) -> str:
        """The one log line that reports the choice."""
        return f"GPU source: {self.source} ({self.reason})"


def _why(exc: BaseException) -> str:
    cause = exc.__cause__ if isinstance(exc, PluginError) and exc.__cause__ is not None else exc
    if isinstance(cause, ImportError):
        return "pynvml (nvidia-ml-py) is not installed"
    return str(cause) or type(cause).__name__


def detect_gpu_collector(*, dcgm_url: str = DEFAULT_URL, simulate_gpus: int = 0, timeout_s: float = 2.0,
                         nvml: ModuleType | Any | None = None) -> GpuDetection:
    """Choose a GPU source; never raises for a node without GPUs.

    ``nvml`` is the ``pynvml`` module to try (tests pass a fake). An NVML
    collector returned here is already open; register or close it.
    """
    if simulate_gpus > 0:
        return GpuDetection("simulated", f"simulate_gpus={simulate_gpus}",
                            SimulatedGpuCollector(gpus=simulate_gpus))
    nvml_collector = NvmlCollector(nvml=nvml)
    try:
        nvml_collector.open()
        gpus = nvml_collector.gpu_count
        return GpuDetection("nvml", f"NVML initialised, {gpus} GPU{'s' if gpus != 1 else ''}", nvml_collector)
    except Exception as exc:  # any failure means "not this source", never a crash
        nvml_collector.close()
        nvml_reason = _why(exc)
    dcgm = DcgmCollector(url=dcgm_url, timeout_s=timeout_s)
    try:
        dcgm.probe()
        return GpuDetection("dcgm", f"NVML: {nvml_reason}; dcgm-exporter at {dcgm_url} answered", dcgm)
    except PluginError as exc:  # its message is already the short reason
        dcgm_reason = str(exc)
    except Exception as exc:
        dcgm_reason = _why(exc)
    return GpuDetection("none", f"NVML: {nvml_reason}; dcgm-exporter at {dcgm_url}: {dcgm_reason}")


class GpuCollector:
    """Whatever GPU source the node has; registered as the ``gpu`` collector.

    Detection runs in :meth:`register`; :attr:`detection` says what was chosen.
    Configuration mistakes (a negative ``simulate_gpus``, a malformed URL) raise
    :class:`~stethoscope.errors.ConfigError` when the collector is built.
    """

    def __init__(self, *, name: str = "gpu", dcgm_url: str = DEFAULT_URL, simulate_gpus: int = 0,
                 timeout_s: float = 2.0, nvml: ModuleType | Any | None = None) -> None:
        if not isinstance(simulate_gpus, int) or isinstance(simulate_gpus, bool) or not 0 <= simulate_gpus <= 1024:
            raise ConfigError(f"gpu.simulate_gpus: must be an integer 0..1024, got {simulate_gpus!r}")
        DcgmCollector(url=dcgm_url, timeout_s=timeout_s)  # validates url and timeout, no I/O
        self.name = name
        self._options = {"dcgm_url": dcgm_url, "simulate_gpus": simulate_gpus, "timeout_s": timeout_s,
                         "nvml": nvml}
        self.detection: GpuDetection | None = None

    @property
    def source(self) -> str:
        """``simulated``, ``nvml``, ``dcgm`` or ``none``; ``undecided`` before :meth:`register`."""
        return self.detection.source if self.detection else "undecided"

    def register(self, meter: Meter) -> None:
        """Detect the source, log the choice once, and register its instruments."""
        if self.detection is not None:
            return
        detection = detect_gpu_collector(**self._options)
        inner = detection.collector
        if inner is not None:
            try:
                inner.register(meter)
            except Exception as exc:  # e.g. the meter refused an instrument: run without GPU metrics
                inner.close()
                detection = GpuDetection("none", f"{detection.source} failed to register: {_why(exc)}")
        self.detection = detection
        _log.info("%s", detection.line())

    def wants_fast(self) -> bool:
        """The chosen source's :meth:`wants_fast` (False with no source)."""
        inner = self.detection.collector if self.detection is not None else None
        hint = getattr(inner, "wants_fast", None)
        return bool(hint()) if hint is not None else False

    def close(self) -> None:
        """Close the chosen collector; idempotent."""
        if self.detection is not None and self.detection.collector is not None:
            self.detection.collector.close()
