"""Per-column exponential-histogram sketches, as OTLP data points.

The arithmetic lives in the native kernels (``stethoscope.native.sketch``, a C
kernel with a pure-Python twin): :class:`ExpHistogramState` keeps one
OpenTelemetry base-2 exponential histogram per column, and ``exphist_update``
folds an ``n x d`` float array into it (non-finite values are dropped and
counted). This module picks the implementation and turns a state into
``ExponentialHistogramDataPoint`` objects, one per column that saw a value.

A :class:`SketchBank` is double-buffered: :meth:`SketchBank.swap` hands the
filled state to the exporter and puts an empty one in its place in O(1), so
writers never wait for the conversion.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from opentelemetry.sdk.metrics.export import Buckets, ExponentialHistogramDataPoint
from opentelemetry.util.types import Attributes

from stethoscope.native.sketch import (
    ROW_BAD_CONFIDENCE,
    ROW_BAD_LATENCY,
    ROW_BAD_PREDICTION,
    ROW_BOOSTED,
    ROW_KEPT,
    ROW_LABEL,
    ROW_NONFINITE_UNIT,
    ROW_SLOW,
    ROW_WRONG_SHAPE,
    ROW_WRONG_TYPE,
)

__all__ = ["SketchBank", "SketchKernels", "sketch_kernels", "MAX_SIZE", "MAX_SCALE", "ROW_BAD_CONFIDENCE",
           "ROW_BAD_LATENCY", "ROW_BAD_PREDICTION", "ROW_BOOSTED", "ROW_KEPT", "ROW_LABEL", "ROW_NONFINITE_UNIT",
           "ROW_SLOW", "ROW_WRONG_SHAPE", "ROW_WRONG_TYPE"]

MAX_SIZE = 160
"""Buckets per sign per column (the OpenTelemetry SDK default)."""
MAX_SCALE = 20


@dataclass(frozen=True)
class SketchKernels:
    """The entry points of the sketch kernel, from whichever implementation was chosen.

    ``record_row`` is the single-row hot path of ``ModelMonitor.record``
    (features, outputs, latency and the sampling decision in one call) and
    ``row_stats`` the counter block type it writes (``RowStats``).
    """

    state_type: Any
    update: Any
    update_row: Any
    module: str
    record_row: Any = None
    row_stats: Any = None


def _module_for(kernel: str) -> ModuleType:
    from stethoscope import native

    return native.implementation(kernel=kernel)


def sketch_kernels() -> SketchKernels:
    """The sketch kernel in use; raises ``ImportError`` if no implementation is installed."""
    chosen = _module_for("sketch")
    twin: ModuleType | None = None

    def pick(name: str) -> Any:
        nonlocal twin
        found = getattr(chosen, name, None)
        if found is None:  # the C module may carry only the hot loops
            twin = twin or importlib.import_module("stethoscope.native.sketch")
            found = getattr(twin, name)
        return found

    return SketchKernels(pick("ExpHistogramState"), pick("exphist_update"), pick("exphist_update_row"),
                         chosen.__name__, pick("record_row"), pick("RowStats"))


class SketchBank:
    """``d`` column sketches with fixed per-column attributes, double-buffered for export.

    Not thread-safe by itself: the owner serialises :meth:`update` and
    :meth:`swap` (one lock, held for O(1) or kernel-bounded time).
    """

    def __init__(self, kernels: SketchKernels, attributes: Sequence[Attributes], *, max_size: int = MAX_SIZE,
                 max_scale: int = MAX_SCALE) -> None:
        self.kernels = kernels
        self.attributes = tuple(attributes)
        self.d = len(self.attributes)
        self.max_size = max_size
        self._make = lambda: kernels.state_type(self.d, max_size=max_size, max_scale=max_scale)
        self.state = self._make()
        self._spare = self._make()

    def update(self, values_2d: Any) -> int:
        """Fold an ``n x d`` float64 array in; returns how many values were dropped as non-finite."""
        return int(self.kernels.update(values_2d, self.state, max_size=self.max_size) or 0)

    def update_row(self, values_1d: Any) -> None:
        self.kernels.update_row(values_1d, self.state)

    def swap(self) -> Any:
        """Put an empty state in place and return the filled one (give it back with :meth:`recycle`)."""
        filled = self.state
        self.state = self._spare if self._spare is not None else self._make()
        self._spare = None
        return filled

    def recycle(self, state: Any) -> None:
        state.reset()
        self._spare = state

    def points(self, state: Any, start_ns: int, end_ns: int) -> list[ExponentialHistogramDataPoint]:
        """One delta data point per column with at least one value."""
        out = []
        for col, attrs in enumerate(self.attributes):
            (scale, zero_count, pos_offset, pos_counts, neg_offset, neg_counts,
             count, total, lo, hi) = state.buckets(col)
            if not count:
                continue
            out.append(ExponentialHistogramDataPoint(
                attributes=attrs,
                start_time_unix_nano=start_ns,
                time_unix_nano=end_ns,
                count=int(count),
                sum=float(total),
                scale=int(scale),
                zero_count=int(zero_count),
                positive=Buckets(offset=int(pos_offset), bucket_counts=[int(c) for c in pos_counts]),
                negative=Buckets(offset=int(neg_offset), bucket_counts=[int(c) for c in neg_counts]),
                flags=0,
                min=float(lo),
                max=float(hi),
            ))
        return out
