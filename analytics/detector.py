"""The one small interface every drift and anomaly detector implements.

Batch detectors compare a *reference* sample with a *current* one::

    det = KS().fit(reference)          # validate and keep what scoring needs
    result = det.score(current)        # a DriftResult, never a loose dict

Sequential detectors watch a stream, one value at a time, the way River's do::

    for x in stream:
        if det.update(x):              # True on the step a change is detected
            ...
    det.drift_detected                 # the same flag, until reset()

Every result carries the statistic, the p-value where the method defines one, an
effect size in the method's documented units, the practical threshold that effect
is compared with, and the verdict. A conformance suite runs the same checks on every
detector registered in :data:`REGISTRY`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

__all__ = ["DriftResult", "BatchDetector", "SequentialDetector", "REGISTRY", "register"]


@dataclass(frozen=True)
class DriftResult:
    """The outcome of one check.

    ``drifted`` is the verdict of this check alone; a dataset check may overrule it
    after multiple-testing correction and records the corrected p-value in
    ``details["p_adjusted"]``.
    """

    method: str
    statistic: float
    p_value: float | None
    effect: float
    threshold: float
    drifted: bool
    column: str | None = None
    n_reference: int = 0
    n_current: int = 0
    details: Mapping[str, Any] = field(default_factory=dict)


@runtime_checkable
class BatchDetector(Protocol):
    """Compares a current sample with a fitted reference."""

    name: str
    kind: str  # "numeric", "categorical", "multivariate", "embedding", "prediction", "performance"

    def fit(self, reference: Any) -> BatchDetector: ...

    def score(self, current: Any) -> DriftResult: ...


@runtime_checkable
class SequentialDetector(Protocol):
    """Watches a stream; ``update`` is O(1) amortised and never raises on a bad value."""

    name: str
    drift_detected: bool

    def update(self, x: float) -> bool: ...

    def reset(self) -> None: ...


#: name -> factory building a detector with its default settings.
REGISTRY: dict[str, Any] = {}


def register(name: str):
    """Class decorator adding a detector to :data:`REGISTRY` under ``name``."""

    def wrap(cls):
        if name in REGISTRY:
            raise ValueError(f"detector {name!r} registered twice")
        REGISTRY[name] = cls
        return cls

    return wrap
