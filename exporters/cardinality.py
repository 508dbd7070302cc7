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
series included, as in the SDK). A point that arrives with exactly
``{otel.metric.overflow: true}`` (an SDK's own overflow series) passes as is
and takes no room. Memory is bounded: a 64-bit hash per attribute set, at most
``max_metrics`` metric names per window, everything forgotten when the window
ends. Names beyond ``max_metrics`` in one window pass through unlimited and are
counted (``stethoscope_cardinality_untracked_points``).

The limit costs little because it is applied inside the metrics encoder
(:mod:`stethoscope.native`, C kernel or Python twin), in the one pass that
already renders every point's attribute map: the encoder hashes the map it has
just written (two spellings of one set, in another key order or with a
repeated key, are one set), and a point past the limit gets the overflow map
in its row directly. The state is a ``CardinalityState`` of the encoder's
module, locked once per metric, so several receiver threads share it; the hash
is seeded per process at random, so colliding attribute sets cannot be
prepared in advance. docs/benchmarks.md ("Cardinality limiter") has its cost.

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
>>> rows, rowbinary = limiter.encode(req.SerializeToString())["sum"]
>>> rows, rowbinary.count(b"otel.metric.overflow"), limiter.overflowed_points, limiter.series
(4, 2, 2, 2)
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
from types import ModuleType

from stethoscope.errors import DecodeError
from stethoscope.native import implementation

from .selfmetrics import SelfMetrics

__all__ = ["CardinalityLimiter", "OVERFLOW_KEY", "DEFAULT_LIMIT"]

log = logging.getLogger(__name__)

#: The attribute OpenTelemetry puts on the series that collects overflowed points.
OVERFLOW_KEY = "otel.metric.overflow"
#: The OpenTelemetry SDK's default cardinality limit per metric stream.
DEFAULT_LIMIT = 2000


class CardinalityLimiter:
    """Folds attribute sets beyond ``limit`` per metric name and window into the overflow set (thread-safe).

    :meth:`encode` replaces the encoder's ``encode_metrics``; the window, the
    counters and the once-per-window warnings live here, the sets in one
    ``CardinalityState`` per encoder module.
    """

    def __init__(
        self,
        limit: int = DEFAULT_LIMIT,
        *,
        window_s: float = 3600.0,
        max_metrics: int = 1000,
        metrics: SelfMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        seed: int | None = None,
    ) -> None:
        if limit < 2:
            raise ValueError(f"cardinality limit must be 2 or more (0 turns the limiter off), got {limit}")
        if not 1 <= max_metrics <= 1 << 24:
            raise ValueError(f"max_metrics must be between 1 and 16777216, got {max_metrics}")
        if window_s <= 0:
            raise ValueError(f"window_s must be positive, got {window_s}")
        self.limit = limit
        self.window_s = window_s
        self.max_metrics = max_metrics
        self._seed = secrets.randbits(64) if seed is None else seed & (2**64 - 1)
        self._metrics = metrics
        self._clock = clock
        self._lock = threading.Lock()
        self._states: dict[str, object] = {}
        self._window_start = clock()
        self._series = 0
        self.overflowed_points = 0
        self.untracked_points = 0

    @property
    def series(self) -> int:
        """Distinct attribute sets tracked in the current window, all names together (as of the last request)."""
        with self._lock:
            return self._series

    def _state(self, module: ModuleType):
        with self._lock:
            now = self._clock()
            if now - self._window_start >= self.window_s:
                for state in self._states.values():
                    state.reset()
                self._window_start = now
                self._series = 0
            state = self._states.get(module.__name__)
            if state is None:
                state = self._states[module.__name__] = module.CardinalityState(
                    self.limit, self.max_metrics, self._seed
                )
            return state

    def encode(self, body: bytes, impl: str | ModuleType = "auto") -> dict[str, tuple[int, bytes]]:
        """``encode_metrics(body)`` of the ``impl`` encoder, with the limit applied.

        ``impl`` is ``"auto"``, ``"native"``, ``"python"`` (see
        :func:`stethoscope.native.implementation`) or the module itself. Raises
        :class:`~stethoscope.errors.DecodeError` for bytes that are not a valid request.
        """
        module = implementation(impl) if isinstance(impl, str) else impl
        state = self._state(module)
        try:
            return module.encode_metrics(body, state)
        except ValueError as exc:
            raise DecodeError(str(exc)) from exc
        finally:
            self._collect(state)

    def _collect(self, state) -> None:
        folded, untracked, series, names = state.take()
        with self._lock:
            self.overflowed_points += folded
            self.untracked_points += untracked
            self._series = series
        for name in names:
            log.warning(
                "metric %r has more than %d attribute sets this window; further ones are stored "
                "with %s=true only (logged once per metric and window)",
                name[:200], self.limit - 1, OVERFLOW_KEY,
            )
        if self._metrics is not None:
            if folded:
                self._metrics.cardinality_overflow.inc(folded)
            if untracked:
                self._metrics.cardinality_untracked.inc(untracked)
            self._metrics.cardinality_series.set(series)
