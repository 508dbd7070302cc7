"""Categorical drift detectors, and the distances between two discrete distributions.

Detectors take 1-D arrays of labels (strings, integers, booleans). A category seen in
only one of the two samples is kept as its own cell: in the contingency tests its
reference count is zero (the expected counts stay positive because the current
sample holds it), and in the distances it is compared with a frequency of zero
(PSI and KL add a pseudo-count first, see :func:`psi`). ``details["unseen"]`` lists
up to 20 current categories the reference never showed, and
``details["unseen_share"]`` the share of current values that fell in them.
Missing labels (``None`` and float NaN) are dropped and counted in
``details["dropped_reference"]`` / ``details["dropped_current"]``.

The distance functions here work on count vectors over the same cells and are shared
with the binned numeric detectors in :mod:`.univariate`.

Examples
--------
>>> ref = ["a"] * 50 + ["b"] * 50
>>> Chi2().fit(ref).score(["a"] * 50 + ["b"] * 50).drifted
False
>>> r = Chi2().fit(ref).score(["a"] * 90 + ["b"] * 10)
>>> r.drifted, round(r.effect, 3)
(True, 0.436)
>>> round(total_variation([50, 50], [90, 10]), 2)
0.4
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import math
from typing import Any

import numpy as np

from .._extras import require
from ..errors import ConfigError
from .calibration import check_alpha_threshold
from .detector import DriftResult, register

__all__ = [
    "PSEUDO_COUNT",
    "CategoricalJensenShannon",
    "CategoricalPSI",
    "Chi2",
    "FisherExact",
    "GTest",
    "TotalVariation",
    "chi2_table",
    "clean_labels",
    "contingency",
    "cramers_v",
    "hellinger",
    "jensen_shannon",
    "kl_divergence",
    "psi",
    "total_variation",
]

#: Added to every cell's count before PSI and KL, so that an empty cell gives a large
#: but finite value (the Jeffreys / Krichevsky-Trofimov choice of one half).
PSEUDO_COUNT = 0.5


def _stats():
    return require("scipy.stats", extra="server", feature="drift detection")


# -- distances on count vectors ------------------------------------------------------


def _freqs(counts: Any, pseudo: float = 0.0) -> np.ndarray:
    c = np.asarray(counts, dtype=np.float64) + pseudo
    total = c.sum()
    if total <= 0:
        raise ValueError("a distribution with no counts has no frequencies")
    return c / total


def psi(reference_counts: Any, current_counts: Any, pseudo: float = PSEUDO_COUNT) -> float:
    """Population stability index, ``sum((q - p) * ln(q / p))``, after ``pseudo`` per cell.

    >>> psi([10, 10], [10, 10])
    0.0
    """
    p, q = _freqs(reference_counts, pseudo), _freqs(current_counts, pseudo)
    return max(0.0, float(np.sum((q - p) * np.log(q / p))))


def kl_divergence(reference_counts: Any, current_counts: Any, pseudo: float = PSEUDO_COUNT) -> float:
    """KL(current || reference) in nats, after ``pseudo`` per cell.

    >>> kl_divergence([5, 5], [5, 5])
    0.0
    """
    p, q = _freqs(reference_counts, pseudo), _freqs(current_counts, pseudo)
    return max(0.0, float(np.sum(q * np.log(q / p))))


def jensen_shannon(reference_counts: Any, current_counts: Any) -> float:
    """Jensen-Shannon *distance* with base-2 logarithms (in [0, 1]); no smoothing needed.

    Equal to ``scipy.spatial.distance.jensenshannon(p, q, base=2)``.

    >>> jensen_shannon([1, 0], [0, 1])
    1.0
    """
    p, q = _freqs(reference_counts), _freqs(current_counts)
    m = 0.5 * (p + q)
    with np.errstate(divide="ignore", invalid="ignore"):
        tp = np.where(p > 0, p * np.log2(p / m), 0.0)
        tq = np.where(q > 0, q * np.log2(q / m), 0.0)
    return math.sqrt(min(1.0, max(0.0, 0.5 * float(tp.sum() + tq.sum()))))


def hellinger(reference_counts: Any, current_counts: Any) -> float:
    """Hellinger distance ``sqrt(1 - sum(sqrt(p q)))``, in [0, 1].

    >>> hellinger([3, 1], [3, 1])
    0.0
    """
    p, q = _freqs(reference_counts), _freqs(current_counts)
    return math.sqrt(max(0.0, 1.0 - float(np.sum(np.sqrt(p * q)))))


def total_variation(reference_counts: Any, current_counts: Any) -> float:
    """Total variation distance, half the L1 distance of the frequencies, in [0, 1]."""
    p, q = _freqs(reference_counts), _freqs(current_counts)
    return 0.5 * float(np.abs(p - q).sum())


# -- labels and tables -----------------------------------------------------------------


def clean_labels(values: Any, side: str) -> tuple[np.ndarray, int]:
    """Labels as a 1-D array without missing values, and how many were dropped.

    Raises ``ValueError`` naming ``side`` when the input is not 1-D or nothing is left.
    """
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{side}: expected a 1-D array of labels, got shape {arr.shape}")
    if arr.dtype.kind == "f":
        keep = ~np.isnan(arr)
    elif arr.dtype.kind == "O":
        keep = np.array([not (v is None or (isinstance(v, float) and math.isnan(v))) for v in arr], dtype=bool)
    else:
        keep = np.ones(arr.shape, dtype=bool)
    dropped = int(arr.size - keep.sum())
    arr = arr[keep]
    if arr.size == 0:
        what = "empty" if dropped == 0 else f"all {dropped} values are missing"
        raise ValueError(f"{side} sample is {what}; nothing to compare")
    if arr.dtype.kind == "O":
        arr = arr.astype(str)
    return arr, dropped


def _counts(labels: np.ndarray) -> dict[Any, int]:
    cats, counts = np.unique(labels, return_counts=True)
    return {c.item() if hasattr(c, "item") else c: int(n) for c, n in zip(cats, counts, strict=True)}


def contingency(reference: dict[Any, int], current: dict[Any, int]) -> tuple[list[Any], np.ndarray]:
    """The categories (reference's first, then unseen ones) and the 2 x k count table."""
    cats = list(reference) + [c for c in current if c not in reference]
    table = np.array([[reference.get(c, 0) for c in cats], [current.get(c, 0) for c in cats]], dtype=np.float64)
    return cats, table


def chi2_table(table: np.ndarray, *, log_likelihood: bool = False, correction: bool = True) -> tuple[float, float, int]:
    """Pearson chi-squared (or G) statistic, p-value and dof of a 2 x k table.

    Matches ``scipy.stats.chi2_contingency(table, correction, lambda_)``: Yates'
    correction is applied only when dof == 1 (a 2 x 2 table), to both statistics.
    Empty categories (zero in both rows) are removed first.
    """
    table = np.asarray(table, dtype=np.float64)
    table = table[:, table.sum(axis=0) > 0]
    k = table.shape[1]
    dof = max(0, k - 1)
    if dof == 0:
        return 0.0, 1.0, 0
    expected = np.outer(table.sum(axis=1), table.sum(axis=0)) / table.sum()
    observed = table
    if correction and dof == 1:
        diff = expected - observed
        observed = observed + np.sign(diff) * np.minimum(0.5, np.abs(diff))
    if log_likelihood:
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(observed > 0, observed * np.log(observed / expected), 0.0)
        stat = 2.0 * float(terms.sum())
    else:
        stat = float(((observed - expected) ** 2 / expected).sum())
    stat = max(0.0, stat)
    return stat, float(_stats().chi2.sf(stat, dof)), dof


def cramers_v(table: np.ndarray) -> float:
    """Cramer's V of a 2 x k table from the uncorrected Pearson statistic, in [0, 1]."""
    table = np.asarray(table, dtype=np.float64)
    table = table[:, table.sum(axis=0) > 0]
    if table.shape[1] < 2:
        return 0.0
    expected = np.outer(table.sum(axis=1), table.sum(axis=0)) / table.sum()
    stat = float(((table - expected) ** 2 / expected).sum())
    return min(1.0, math.sqrt(stat / table.sum()))


# -- detectors -----------------------------------------------------------------------------


class _Categorical(ABC):
    """Shared plumbing: validated settings, cleaned reference counts, the result."""

    name = ""
    kind = "categorical"
    measure = ""  # key in DEFAULT_THRESHOLDS
    uses_p_value = False

    def __init__(self, *, alpha: float = 0.05, threshold: float | None = None) -> None:
        problems, threshold = check_alpha_threshold(alpha, threshold, self.measure, self.uses_p_value)
        if problems:
            raise ConfigError(problems)
        self.alpha, self.threshold = float(alpha), float(threshold)
        self._ref: dict[Any, int] | None = None
        self._dropped_ref = 0

    def fit(self, reference: Any):
        labels, self._dropped_ref = clean_labels(reference, "reference")
        self._ref = _counts(labels)
        return self

    def score(self, current: Any) -> DriftResult:
        if self._ref is None:
            raise RuntimeError(f"{type(self).__name__}.score called before fit")
        labels, dropped = clean_labels(current, "current")
        cur = _counts(labels)
        cats, table = contingency(self._ref, cur)
        statistic, p_value, effect, extra = self._compute(table)
        drifted = effect >= self.threshold and (p_value is None or p_value < self.alpha)
        unseen = [c for c in cats if c not in self._ref]
        details = {
            "dropped_reference": self._dropped_ref,
            "dropped_current": dropped,
            "categories": len(cats),
            "unseen": [str(c) for c in unseen[:20]],
            "unseen_share": float(sum(cur[c] for c in unseen) / labels.size),
            "effect_measure": self.measure,
            **extra,
        }
        return DriftResult(
            method=self.name,
            statistic=float(statistic),
            p_value=None if p_value is None else float(p_value),
            effect=float(effect),
            threshold=self.threshold,
            drifted=bool(drifted),
            n_reference=int(table[0].sum()),
            n_current=int(table[1].sum()),
            details=details,
        )

    @abstractmethod
    def _compute(self, table: np.ndarray) -> tuple[float, float | None, float, dict]:
        """Implemented by each concrete detector."""


@register("chi2")
class Chi2(_Categorical):
    """Pearson chi-squared test on the 2 x k table; effect: Cramer's V (threshold 0.1).

    Statistic and p-value equal ``scipy.stats.chi2_contingency`` with its defaults.
    """

    name, measure, uses_p_value = "chi2", "cramers_v", True

    def _compute(self, table):
        stat, p, dof = chi2_table(table)
        return stat, p, cramers_v(table), {"dof": dof}


@register("g_test")
class GTest(_Categorical):
    """Likelihood-ratio G-test on the 2 x k table; effect: Cramer's V (threshold 0.1).

    Equals ``scipy.stats.chi2_contingency(table, lambda_="log-likelihood")``.
    """

    name, measure, uses_p_value = "g_test", "cramers_v", True

    def _compute(self, table):
        stat, p, dof = chi2_table(table, log_likelihood=True)
        return stat, p, cramers_v(table), {"dof": dof}


@register("fisher_exact")
class FisherExact(_Categorical):
    """Fisher's exact test for two categories (a 2 x 2 table); effect: phi (Cramer's V).

    The p-value is ``scipy.stats.fisher_exact``'s two-sided one. The statistic is the
    sample odds ratio; when a zero cell makes it infinite or undefined, the
    Haldane-Anscombe odds ratio (0.5 added to every cell) is reported instead and
    ``details["haldane"]`` is True. With more than two categories it raises
    ``ValueError``; use :class:`Chi2`.
    """

    name, measure, uses_p_value = "fisher_exact", "cramers_v", True
    #: the most categories (reference and current together) this test accepts
    max_categories = 2

    def _compute(self, table):
        table = table[:, table.sum(axis=0) > 0]
        if table.shape[1] > self.max_categories:
            raise ValueError(f"fisher_exact needs at most 2 categories, got {table.shape[1]}; use chi2")
        if table.shape[1] < 2:
            return 1.0, 1.0, 0.0, {"haldane": False}
        t = table.T.astype(np.int64)  # rows: categories, columns: reference/current
        p = float(_stats().fisher_exact(t).pvalue)
        a, b, c, d = (float(x) for x in t.ravel())
        haldane = b * c == 0
        if haldane:
            a, b, c, d = a + 0.5, b + 0.5, c + 0.5, d + 0.5
        return a * d / (b * c), min(1.0, max(0.0, p)), cramers_v(table), {"haldane": haldane}


@register("tvd")
class TotalVariation(_Categorical):
    """Total variation distance of the category frequencies; threshold 0.1; no p-value."""

    name, measure = "tvd", "tvd"

    def _compute(self, table):
        d = total_variation(table[0], table[1])
        return d, None, d, {}


@register("categorical_psi")
class CategoricalPSI(_Categorical):
    """Population stability index over categories (pseudo-count 0.5); threshold 0.2."""

    name, measure = "categorical_psi", "psi"

    def _compute(self, table):
        d = psi(table[0], table[1])
        return d, None, d, {"pseudo_count": PSEUDO_COUNT}


@register("categorical_jensen_shannon")
class CategoricalJensenShannon(_Categorical):
    """Jensen-Shannon distance (base 2) of the category frequencies; threshold 0.1."""

    name, measure = "categorical_jensen_shannon", "jensen_shannon"

    def _compute(self, table):
        d = jensen_shannon(table[0], table[1])
        return d, None, d, {}
