"""``stethoscope agent --once --dry-run``: print a collection as JSON lines instead of sending it.

One line per data point, with the metric's name, kind, unit and scope, the
point's attributes and time, its value (or histogram fields) and the resource
attributes, so an install can be checked without a collector.

Examples:
    >>> import io
    >>> from opentelemetry.sdk.metrics import MeterProvider
    >>> from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    >>> reader = InMemoryMetricReader()
    >>> provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    >>> provider.get_meter("demo").create_counter("demo.count", unit="1").add(3, {"gpu": "0"})
    >>> out = io.StringIO()
    >>> _ = DryRunExporter(out).export(reader.get_metrics_data())
    >>> line = json.loads(out.getvalue())
    >>> line["metric"], line["kind"], line["attributes"], line["value"], line["monotonic"]
    ('demo.count', 'sum', {'gpu': '0'}, 3, True)
    >>> provider.shutdown()
"""

from __future__ import annotations

import datetime as dt
import json
import threading
from collections.abc import Iterator, Mapping
from typing import Any, TextIO

from opentelemetry.sdk.metrics.export import (
    ExponentialHistogram,
    Gauge,
    Histogram,
    MetricExporter,
    MetricExportResult,
    MetricsData,
    Sum,
)

__all__ = ["DryRunExporter", "point_records"]


def _attrs(attributes: Mapping[str, Any] | None) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in (attributes or {}).items()}


def _iso(ns: int) -> str:
    return dt.datetime.fromtimestamp(ns / 1e9, dt.timezone.utc).isoformat(timespec="microseconds")


def point_records(metrics_data: MetricsData) -> Iterator[dict[str, Any]]:
    """One plain dict per data point in ``metrics_data``."""
    for rm in metrics_data.resource_metrics:
        resource = _attrs(rm.resource.attributes)
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                data = metric.data
                kind = {Sum: "sum", Gauge: "gauge", Histogram: "histogram",
                        ExponentialHistogram: "exponential_histogram"}.get(type(data), type(data).__name__)
                for point in data.data_points:
                    row: dict[str, Any] = {
                        "metric": metric.name,
                        "kind": kind,
                        "unit": metric.unit or "",
                        "scope": sm.scope.name,
                        "attributes": _attrs(point.attributes),
                        "time": _iso(point.time_unix_nano),
                        "time_unix_nano": point.time_unix_nano,
                    }
                    if isinstance(data, Sum):
                        row["monotonic"] = data.is_monotonic
                        row["temporality"] = data.aggregation_temporality.name.lower()
                    if kind in ("sum", "gauge"):
                        row["value"] = point.value
                    elif isinstance(data, Histogram):
                        row.update(count=point.count, sum=point.sum, min=point.min, max=point.max,
                                   bucket_counts=list(point.bucket_counts),
                                   explicit_bounds=list(point.explicit_bounds))
                    elif isinstance(data, ExponentialHistogram):
                        row.update(count=point.count, sum=point.sum, min=point.min, max=point.max,
                                   scale=point.scale, zero_count=point.zero_count,
                                   positive={"offset": point.positive.offset,
                                             "bucket_counts": list(point.positive.bucket_counts)},
                                   negative={"offset": point.negative.offset,
                                             "bucket_counts": list(point.negative.bucket_counts)})
                    row["resource"] = resource
                    yield row


class DryRunExporter(MetricExporter):
    """Writes each exported collection to ``stream`` as JSON lines; sends nothing."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__()
        self.stream = stream
        self.points = 0
        self._lock = threading.Lock()

    def export(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any) -> MetricExportResult:
        try:
            lines = [json.dumps(row, default=str, sort_keys=False) for row in point_records(metrics_data)]
            with self._lock:
                for line in lines:
                    self.stream.write(line + "\n")
                self.stream.flush()
                self.points += len(lines)
        except (OSError, ValueError):  # a closed or broken stream
            return MetricExportResult.FAILURE
        return MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        pass
