"""Sharing a global row budget across streams.

Each stream asks for ``demand = min(target * boost, rate)`` rows/s (no point
allocating more rows than arrive). When the demands fit in the budget, every
stream gets its demand. When they do not, the budget is water-filled in
proportion to a weight::

    weight = target * boost * (1 + drift) * clamp(sigma / mean_sigma, 0.25, 4)

``sigma`` is the stream's recent standard deviation of its prediction (or
confidence), ``mean_sigma`` the mean over streams that report one (a stream
without one counts as average). So a noisy stream or one the drift detector
flags gets more rows -- this is Neyman allocation (rows proportional to spread)
tilted by drift -- but the tilt from spread is bounded to 16x between streams,
so a stream with a constant prediction still gets some rows. A stream whose
share exceeds its demand keeps only its demand and the rest is shared again.

Examples:
    >>> demands = {
    ...     "a": StreamDemand(target=10, rate=1000, sigma=1.0),
    ...     "b": StreamDemand(target=10, rate=1000, sigma=3.0),
    ...     "c": StreamDemand(target=10, rate=2),
    ... }
    >>> {k: round(v, 3) for k, v in allocate(demands, budget=100).items()}
    {'a': 10.0, 'b': 10.0, 'c': 2.0}
    >>> {k: round(v, 3) for k, v in allocate(demands, budget=12).items()}
    {'a': 2.5, 'b': 7.5, 'c': 2.0}
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["StreamDemand", "allocate", "weight_of"]

SPREAD_CLAMP = (0.25, 4.0)


@dataclass(frozen=True)
class StreamDemand:
    """What one stream wants: its target (rows/s), observed event rate, spread and drift."""

    target: float
    rate: float = math.inf
    sigma: float | None = None
    drift: float = 0.0
    boost: float = 1.0

    @property
    def demand(self) -> float:
        return max(0.0, float(min(self.target * self.boost, self.rate)))


def weight_of(d: StreamDemand, mean_sigma: float | None) -> float:
    """The allocation weight of a stream (see the module docstring)."""
    spread = 1.0
    if d.sigma is not None and mean_sigma and math.isfinite(d.sigma) and mean_sigma > 0:
        lo, hi = SPREAD_CLAMP
        spread = min(hi, max(lo, d.sigma / mean_sigma))
    return max(0.0, d.target * d.boost) * (1.0 + max(0.0, d.drift)) * spread


def allocate(demands: Mapping[str, StreamDemand], budget: float) -> dict[str, float]:
    """Rows/s for each stream under a global ``budget`` (see the module docstring)."""
    want = {k: d.demand for k, d in demands.items()}
    if sum(want.values()) <= budget:
        return want
    sigmas = [d.sigma for d in demands.values() if d.sigma is not None and math.isfinite(d.sigma)]
    mean_sigma = sum(sigmas) / len(sigmas) if sigmas else None
    weights = {k: weight_of(d, mean_sigma) for k, d in demands.items()}
    out = {k: 0.0 for k in demands}
    active = {k for k in demands if want[k] > 0 and weights[k] > 0}
    left = max(0.0, float(budget))
    while active and left > 0:
        total = sum(weights[k] for k in active)
        satisfied = {k for k in active if left * weights[k] / total >= want[k]}
        if not satisfied:
            for k in active:
                out[k] = left * weights[k] / total
            break
        for k in satisfied:
            out[k] = want[k]
            left -= want[k]
        active -= satisfied
    return out
