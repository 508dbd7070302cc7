"""Uncertainty over-sampling: low-confidence predictions go to a labeling queue.

A prediction's uncertainty ``u`` is in ``[0, 1]``: ``1 - confidence`` for a
scalar confidence, or the normalised entropy ``H(p) / log K`` of a vector of
``K`` class probabilities. A row with ``u >= min_uncertainty`` is sampled at
``p_eff = min(1, p * (1 + (boost - 1) * u))`` instead of the stream's ``p``;
its adjusted count is ``1 / p_eff``, so estimates stay unbiased. Kept rows
sampled that way carry ``stethoscope.uncertainty = true`` and are also put on a
bounded :class:`LabelingQueue` for a human or a labeling service to drain.

Examples:
    >>> cfg = UncertaintyConfig(boost=11.0, min_uncertainty=0.2)
    >>> cfg.weight(0.1), cfg.weight(0.5), cfg.weight(1.0)
    (1.0, 6.0, 11.0)
    >>> confidence_and_uncertainty(0.9)
    (0.9, 0.09999999999999998)
    >>> c, u = confidence_and_uncertainty([0.5, 0.5])
    >>> c, round(u, 6)
    (0.5, 1.0)
    >>> q = LabelingQueue(maxlen=2)
    >>> for i in range(3):
    ...     q.put(LabelCandidate("m", "1", "default", f"r{i}", 0, (1.0,), 0.0, 0.5, 0.5, 2.0))
    >>> [c.request_id for c in q.drain()], q.evicted
    (['r1', 'r2'], 1)
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["LabelCandidate", "LabelingQueue", "UncertaintyConfig", "confidence_and_uncertainty", "uncertainty_many"]


@dataclass(frozen=True)
class UncertaintyConfig:
    """How hard to over-sample uncertain predictions.

    ``boost`` is the probability multiplier at ``u = 1`` (linear in ``u``
    above ``min_uncertainty``); ``queue_size`` bounds the labeling queue (the
    oldest candidates are evicted and counted).
    """

    boost: float = 10.0
    min_uncertainty: float = 0.2
    queue_size: int = 1024

    def problems(self) -> list[str]:
        out = []
        if not (isinstance(self.boost, (int, float)) and math.isfinite(self.boost) and self.boost >= 1):
            out.append(f"uncertainty.boost: must be a finite number >= 1, got {self.boost!r}")
        if not (isinstance(self.min_uncertainty, (int, float)) and 0 <= self.min_uncertainty <= 1):
            out.append(f"uncertainty.min_uncertainty: must be in [0, 1], got {self.min_uncertainty!r}")
        if not (isinstance(self.queue_size, int) and not isinstance(self.queue_size, bool) and self.queue_size > 0):
            out.append(f"uncertainty.queue_size: must be a positive integer, got {self.queue_size!r}")
        return out

    def weight(self, u: float) -> float:
        """The multiplier on ``p`` for uncertainty ``u``."""
        if u >= self.min_uncertainty:
            return 1.0 + (self.boost - 1.0) * u
        return 1.0

    def weights(self, u: np.ndarray) -> np.ndarray:
        """:meth:`weight` over an array (NaN uncertainty weighs 1)."""
        with np.errstate(invalid="ignore"):
            boosted = u >= self.min_uncertainty
        return np.where(boosted, 1.0 + (self.boost - 1.0) * np.nan_to_num(u), 1.0)


def confidence_and_uncertainty(confidence: object) -> tuple[float, float]:
    """``(confidence, u)`` from a scalar confidence or a vector of class probabilities.

    Raises ``TypeError``/``ValueError`` for anything else; the caller counts it.
    """
    if isinstance(confidence, (float, int)) and not isinstance(confidence, bool):
        c = float(confidence)
        if not 0.0 <= c <= 1.0:
            raise ValueError("confidence must be in [0, 1]")
        return c, 1.0 - c
    probs = np.asarray(confidence, dtype=np.float64)
    if probs.ndim == 0:
        return confidence_and_uncertainty(float(probs))
    if probs.ndim != 1 or probs.shape[0] < 2 or not np.all(np.isfinite(probs)) or np.any(probs < 0):
        raise ValueError("class probabilities must be a finite, non-negative vector of length >= 2")
    total = float(probs.sum())
    if total <= 0.0:
        raise ValueError("class probabilities sum to zero")
    probs = probs / total
    nz = probs[probs > 0]
    entropy = float(-(nz * np.log(nz)).sum()) / math.log(probs.shape[0])
    return float(probs.max()), min(1.0, max(0.0, entropy))


def uncertainty_many(confidences: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(confidence, u)`` arrays from ``n`` confidences or an ``n x K`` probability matrix.

    Invalid entries come back as NaN in both arrays.
    """
    c = np.asarray(confidences, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        if c.ndim == 1:
            c = np.where((c >= 0.0) & (c <= 1.0), c, np.nan)
            return c, 1.0 - c
        total = c.sum(axis=1, keepdims=True)
        probs = c / total
        ok = np.isfinite(probs).all(axis=1) & (c >= 0).all(axis=1) & (total[:, 0] > 0)
        logs = np.where(probs > 0, np.log(np.where(probs > 0, probs, 1.0)), 0.0)
        entropy = -(probs * logs).sum(axis=1) / math.log(c.shape[1])
        conf = np.where(ok, probs.max(axis=1), np.nan)
        u = np.where(ok, np.clip(entropy, 0.0, 1.0), np.nan)
    return conf, u


@dataclass(frozen=True)
class LabelCandidate:
    """A prediction worth labeling: what was seen, what was predicted, how unsure."""

    model: str
    version: str
    stream: str
    request_id: str
    time_unix_nano: int
    features: Sequence[float]
    prediction: float | str
    confidence: float
    uncertainty: float
    adjusted_count: float


class LabelingQueue:
    """A bounded, thread-safe FIFO of :class:`LabelCandidate`; the oldest is evicted when full."""

    def __init__(self, maxlen: int = 1024) -> None:
        self._items: deque[LabelCandidate] = deque(maxlen=maxlen)
        self._lock = threading.Lock()
        self.evicted = 0

    def put(self, item: LabelCandidate) -> None:
        with self._lock:
            if len(self._items) == self._items.maxlen:
                self.evicted += 1
            self._items.append(item)

    def drain(self, max_items: int | None = None) -> list[LabelCandidate]:
        """Take up to ``max_items`` candidates (all by default), oldest first."""
        with self._lock:
            n = len(self._items) if max_items is None else max(0, min(max_items, len(self._items)))
            return [self._items.popleft() for _ in range(n)]

    def __len__(self) -> int:
        return len(self._items)
