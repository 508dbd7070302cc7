"""One export window of a :class:`~.model.ModelMonitor` and the OTLP metrics made from it.

Everything is **delta** temporality: a point covers exactly its window
(``start_ns`` to the export time).

Examples:
    >>> import numpy as np
    >>> w = Window(n_bounds=2, start_ns=0)
    >>> w.requests, w.errors["timeout"] = 3, 1
    >>> [m.name for m in window_metrics(w, {"stethoscope.model": "m"}, np.array([1.0, 2.0]), 10, {}, {})]
    ['stethoscope.model.requests', 'stethoscope.model.errors']
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    ExponentialHistogram,
    Gauge,
    Histogram,
    HistogramDataPoint,
    Metric,
    NumberDataPoint,
    Sum,
)

__all__ = ["Window", "exp_metric", "window_metrics", "without_attribute"]

_DELTA = AggregationTemporality.DELTA


class Window:
    """What the hot path accumulates between two exports (replaced whole at export)."""

    __slots__ = ("requests", "classes", "errors", "business", "sampled", "lat_counts", "lat_sum", "lat_n",
                 "lat_min", "lat_max", "start_ns")

    def __init__(self, n_bounds: int, start_ns: int) -> None:
        self.requests = 0
        self.classes: dict[str, int] = {}
        self.errors: dict[str, int] = {}
        self.business: dict[str, float] = {}
        self.sampled: dict[str, int] = {}
        self.lat_counts = np.zeros(n_bounds + 1, dtype=np.int64)
        self.lat_sum = 0.0
        self.lat_n = 0
        self.lat_min = math.inf
        self.lat_max = -math.inf
        self.start_ns = start_ns


def window_metrics(w: Window, base: Mapping[str, Any], bounds: np.ndarray, now: int,
                   probs: Mapping[str, float], dropped: Mapping[str, int]) -> list[Metric]:
    """Latency histogram, sums and the sampling-probability gauge of a closed window."""
    start = w.start_ns
    base = dict(base)
    metrics: list[Metric] = []
    if w.lat_n:
        metrics.append(Metric(
            name="stethoscope.model.latency", description="Prediction latency", unit="ms",
            data=Histogram(data_points=[HistogramDataPoint(
                attributes=base, start_time_unix_nano=start, time_unix_nano=now, count=w.lat_n,
                sum=w.lat_sum, bucket_counts=w.lat_counts.tolist(), explicit_bounds=bounds.tolist(),
                min=w.lat_min, max=w.lat_max, exemplars=[])], aggregation_temporality=_DELTA)))
    sums = [
        ("stethoscope.model.requests", "Predictions recorded", "{prediction}", True,
         {None: w.requests} if w.requests else {}, None),
        ("stethoscope.model.prediction.class", "Predictions by class label", "{prediction}", True,
         w.classes, "stethoscope.prediction.class"),
        ("stethoscope.model.errors", "Errors by kind", "{error}", True, w.errors, "stethoscope.error.kind"),
        ("stethoscope.model.business", "Business values by name", "1", False, w.business,
         "stethoscope.business.name"),
        ("stethoscope.model.sampled", "Rows sampled for export", "{row}", True, w.sampled, "stethoscope.stream"),
        ("stethoscope.sdk.dropped", "Values dropped by the SDK, by reason", "{value}", True, dropped,
         "stethoscope.reason"),
    ]
    for name, desc, unit, monotonic, table, key in sums:
        if table:
            metrics.append(Metric(name=name, description=desc, unit=unit, data=Sum(
                data_points=[NumberDataPoint(
                    attributes={**base, key: k} if key else base, start_time_unix_nano=start,
                    time_unix_nano=now, value=v) for k, v in table.items()],
                aggregation_temporality=_DELTA, is_monotonic=monotonic)))
    if probs:
        metrics.append(Metric(
            name="stethoscope.model.sampling.probability", description="Row sampling probability", unit="1",
            data=Gauge(data_points=[NumberDataPoint(
                attributes={**base, "stethoscope.stream": k}, start_time_unix_nano=start, time_unix_nano=now,
                value=float(v)) for k, v in probs.items()])))
    return metrics


def exp_metric(name: str, description: str, unit: str, points: list) -> Metric:
    """An exponential-histogram metric (delta) from sketch points."""
    return Metric(name=name, description=description, unit=unit,
                  data=ExponentialHistogram(data_points=points, aggregation_temporality=_DELTA))


def without_attribute(point: Any, key: str) -> Any:
    """``point`` with attribute ``key`` removed."""
    return replace(point, attributes={k: v for k, v in point.attributes.items() if k != key})
