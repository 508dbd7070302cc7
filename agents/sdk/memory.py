"""An in-memory metric exporter, for tests and for looking at what a monitor would send.

Examples:
    >>> exporter = InMemoryExporter()
    >>> exporter.metrics()
    []
"""

from __future__ import annotations

import threading
from typing import Any

from opentelemetry.sdk.metrics.export import Metric, MetricExporter, MetricExportResult, MetricsData

__all__ = ["InMemoryExporter"]


class InMemoryExporter(MetricExporter):
    """Keeps every exported ``MetricsData``; :meth:`metrics` flattens them."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self.collections: list[MetricsData] = []

    def export(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any) -> MetricExportResult:
        with self._lock:
            self.collections.append(metrics_data)
        return MetricExportResult.SUCCESS

    def metrics(self, name: str | None = None) -> list[Metric]:
        """Every metric exported so far (optionally only those called ``name``), oldest first."""
        with self._lock:
            return [m for md in self.collections for rm in md.resource_metrics for sm in rm.scope_metrics
                    for m in sm.metrics if name is None or m.name == name]

    def points(self, name: str) -> list[Any]:
        """Every data point of the metric ``name``, oldest first."""
        return [p for m in self.metrics(name) for p in m.data.data_points]

    def clear(self) -> None:
        with self._lock:
            self.collections.clear()

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        pass
