"""Quantiles from explicit-bucket histograms, in ClickHouse SQL and in Python.

An OpenTelemetry histogram point has ``n`` bounds and ``n + 1`` bucket counts: bucket
``i`` counts values in ``(bounds[i-1], bounds[i]]``, the last one everything above
the last bound. The estimate is Prometheus' ``histogram_quantile``: find the bucket
holding rank ``q * total`` and interpolate linearly inside it; the lowest bucket
starts at 0 (or at its own bound when that is not positive); a rank in the open top
bucket answers the highest finite bound. No observations give NaN.

Examples:
    >>> bucket_quantile(0.5, [10, 10, 10, 10], [10.0, 20.0, 30.0])
    20.0
    >>> bucket_quantile(0.99, [10, 10, 10, 10], [10.0, 20.0, 30.0])
    30.0
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["bucket_quantile", "bucket_quantile_sql"]


def bucket_quantile(q: float, counts: Sequence[int], bounds: Sequence[float]) -> float:
    """The reference the SQL expression is tested against."""
    total = sum(counts)
    if total == 0:
        return math.nan
    rank = q * total
    cum = 0
    for i, c in enumerate(counts):
        if c > 0 and cum + c >= rank:
            if i >= len(bounds):
                return float(bounds[-1]) if bounds else math.nan
            upper = float(bounds[i])
            lower = min(0.0, upper) if i == 0 else float(bounds[i - 1])
            return lower + (upper - lower) * (rank - cum) / c
        cum += c
    return math.nan  # unreachable for q <= 1


def bucket_quantile_sql(q: float, counts: str = "counts", bounds: str = "bounds") -> str:
    """A ClickHouse expression for :func:`bucket_quantile` over two array expressions.

    ``counts`` and ``bounds`` should be column names (each is repeated). The bucket
    index is bound once through ``arrayMap`` over a one-element array.

    >>> "arrayCumSum(counts)" in bucket_quantile_sql(0.9)
    True
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {q}")
    rank = f"({q!r} * arraySum({counts}))"
    lower = f"if(i = 1, least(0, {bounds}[1]), {bounds}[i - 1])"
    below = f"if(i = 1, 0, arrayCumSum({counts})[i - 1])"
    inside = (f"{lower} + ({bounds}[i] - {lower}) * ({rank} - {below}) / {counts}[i]")
    pick = (f"if(i = 0, nan, if(i > length({bounds}), if(length({bounds}) = 0, nan, {bounds}[length({bounds})]), "
            f"{inside}))")
    index = f"arrayFirstIndex(c -> c > 0 AND c >= {rank}, arrayCumSum({counts}))"
    return f"arrayMap(i -> {pick}, [{index}])[1]"
