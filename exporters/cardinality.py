"""Per-metric cardinality limits in the collector, with OpenTelemetry's overflow attribute.

The OpenTelemetry metrics SDK caps the distinct attribute sets of a metric
stream (2000 by default) and folds every measurement beyond the cap into one
series whose only attribute is ``otel.metric.overflow = true``, so totals stay
right while per-attribute breakdowns undercount (OpenTelemetry specification,
Metrics SDK, "Cardinality limits"; the OpenTelemetry blog post "Metric
cardinality limits in OpenTelemetry: a practical guide", 2026). The collector
applies the same rule to what it receives, so one misbehaving client that puts
a request id or a user id in an attribute cannot grow the tables without bound.

Per metric name, the first ``limit - 1`` distinct attribute sets seen in a time
window keep their attributes; points with any other set get the overflow
attribute set instead (so at most ``limit`` series per name, the overflow
series included, as in the SDK). Memory is bounded: a 64-bit hash per
attribute set, at most ``max_metrics`` metric names per window, everything
forgotten when the window ends. Names beyond ``max_metrics`` in one window
pass through unlimited and are counted (``stethoscope_cardinality_untracked_points``).

Examples
--------
>>> from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
>>> req = ExportMetricsServiceRequest()
>>> m = req.resource_metrics.add().scope_metrics.add().metrics.add()
>>> m.name = "requests"
>>> for i in range(4):
...     dp = m.sum.data_points.add()
...     kv = dp.attributes.add()
...     kv.key, kv.value.string_value = "user", f"u{i}"
>>> limiter = CardinalityLimiter(limit=3)
>>> out = ExportMetricsServiceRequest.FromString(limiter.apply(req.SerializeToString()))
>>> [[(a.key, a.value.WhichOneof("value")) for a in p.attributes]
...  for p in out.resource_metrics[0].scope_metrics[0].metrics[0].sum.data_points]  # doctest: +NORMALIZE_WHITESPACE
[[('user', 'string_value')], [('user', 'string_value')],
 [('otel.metric.overflow', 'bool_value')], [('otel.metric.overflow', 'bool_value')]]
>>> limiter.overflowed_points
2
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from stethoscope.errors import DecodeError

from .selfmetrics import SelfMetrics

__all__ = ["CardinalityLimiter", "OVERFLOW_KEY", "DEFAULT_LIMIT"]

log = logging.getLogger(__name__)

#: The attribute OpenTelemetry puts on the series that collects overflowed points.
OVERFLOW_KEY = "otel.metric.overflow"
#: The OpenTelemetry SDK's default cardinality limit per metric stream.
DEFAULT_LIMIT = 2000

_POINT_KINDS = ("gauge", "sum", "histogram", "exponential_histogram", "summary")


class CardinalityLimiter:
    """Folds attribute sets beyond ``limit`` per metric name and window into the overflow set (thread-safe)."""

    def __init__(
        self,
        limit: int = DEFAULT_LIMIT,
        *,
        window_s: float = 3600.0,
        max_metrics: int = 1000,
        metrics: SelfMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if limit < 2:
            raise ValueError(f"cardinality limit must be 2 or more (0 turns the limiter off), got {limit}")
        self.limit = limit
        self.window_s = window_s
        self.max_metrics = max_metrics
        self._metrics = metrics
        self._clock = clock
        self._lock = threading.Lock()
        self._seen: dict[str, set[int]] = {}
        self._warned: set[str] = set()
        self._series = 0
        self._window_start = clock()
        self.overflowed_points = 0
        self.untracked_points = 0

    @property
    def series(self) -> int:
        """Distinct attribute sets tracked in the current window, all names together."""
        with self._lock:
            return self._series

    def apply(self, body: bytes) -> bytes:
        """``body`` (an ``ExportMetricsServiceRequest``) with overflowing points' attributes replaced.

        Returns ``body`` itself when nothing overflowed. Raises
        :class:`~stethoscope.errors.DecodeError` for bytes that are not a valid request.
        """
        from google.protobuf.message import DecodeError as ProtobufDecodeError
        from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

        try:
            req = ExportMetricsServiceRequest.FromString(body)
        except (ProtobufDecodeError, RecursionError) as exc:
            raise DecodeError(f"invalid OTLP metrics protobuf: {exc}") from exc
        folded = untracked = 0
        with self._lock:
            now = self._clock()
            if now - self._window_start >= self.window_s:
                self._seen.clear()
                self._warned.clear()
                self._series = 0
                self._window_start = now
            for rm in req.resource_metrics:
                for sm in rm.scope_metrics:
                    for metric in sm.metrics:
                        kind = metric.WhichOneof("data")
                        if kind not in _POINT_KINDS:
                            continue
                        points = getattr(metric, kind).data_points
                        seen = self._seen.get(metric.name)
                        if seen is None:
                            if len(self._seen) >= self.max_metrics:
                                untracked += len(points)
                                continue
                            seen = self._seen[metric.name] = set()
                        n = self._fold(points, seen)
                        if n and metric.name not in self._warned:
                            self._warned.add(metric.name)
                            log.warning(
                                "metric %r has more than %d attribute sets this window; further ones are stored "
                                "with %s=true only (logged once per metric and window)",
                                metric.name[:200], self.limit - 1, OVERFLOW_KEY,
                            )
                        folded += n
            self.overflowed_points += folded
            self.untracked_points += untracked
            series = self._series
        if self._metrics is not None:
            if folded:
                self._metrics.cardinality_overflow.inc(folded)
            if untracked:
                self._metrics.cardinality_untracked.inc(untracked)
            self._metrics.cardinality_series.set(series)
        return req.SerializeToString() if folded else body

    def _fold(self, points, seen: set[int]) -> int:
        folded = 0
        room = self.limit - 1
        before = len(seen)
        for dp in points:
            attrs = dp.attributes
            if len(attrs) == 1 and attrs[0].key == OVERFLOW_KEY:
                continue  # already an overflow point (from an SDK)
            key = hash(tuple(sorted(kv.SerializeToString(deterministic=True) for kv in attrs)))
            if key in seen:
                continue
            if len(seen) < room:
                seen.add(key)
                continue
            del attrs[:]
            kv = attrs.add()
            kv.key = OVERFLOW_KEY
            kv.value.bool_value = True
            folded += 1
        self._series += len(seen) - before
        return folded
