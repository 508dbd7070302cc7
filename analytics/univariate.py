"""Numeric drift detectors on 1-D samples, and the sorted-array kernels behind them.

Every detector sorts the reference once at ``fit``; scoring sorts the current sample
and works on the two sorted arrays:

* the two-sample KS statistic from two ``searchsorted`` calls (ties handled as SciPy
  does), with the p-value SciPy's ``ks_2samp(method="auto")`` gives: exact when
  both samples have at most 10,000 values, else the ``kstwo`` distribution at the
  rounded effective size ``n1 n2 / (n1 + n2)``;
* the Wasserstein-1 distance as the integral of ``|Q_ref(t) - Q_cur(t)|`` over the
  merged grid of the two quantile functions;
* histograms on the reference's quantile bins for PSI, Jensen-Shannon, Hellinger
  and KL.

Values that are NaN or infinite are dropped and counted in
``details["dropped_reference"]`` / ``details["dropped_current"]``; a sample with
nothing left raises ``ValueError`` naming the side.

Examples
--------
>>> import numpy as np
>>> rng = np.random.default_rng(7)
>>> ref = rng.normal(size=2000)
>>> KS().fit(ref).score(rng.normal(size=2000)).drifted
False
>>> r = KS().fit(ref).score(rng.normal(0.5, 1, size=2000))
>>> r.drifted, r.p_value < 1e-10, round(r.effect, 2)
(True, True, 0.24)
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import functools
import math
import warnings
from typing import Any

import numpy as np

from .._extras import require
from ..errors import ConfigError
from .calibration import check_alpha_threshold
from .categorical import hellinger, jensen_shannon, kl_divergence, psi
from .detector import DriftResult, register

__all__ = [
    "DEFAULT_BINS",
    "EXACT_MAX_N",
    "KL",
    "KS",
    "PELZ_GOOD_MIN_N",
    "PSI",
    "TAIL_MIN_N",
    "TAIL_P",
    "AndersonDarling",
    "CramerVonMises",
    "Hellinger",
    "JensenShannon",
    "Wasserstein",
    "binned_counts",
    "clean_numeric",
    "ks_pvalue",
    "ks_pvalues",
    "ks_statistic_sorted",
    "normalizer",
    "quantile_edges",
    "wasserstein_sorted",
]

#: Like SciPy's ``ks_2samp(method="auto")``: exact p-values up to this many values per sample.
EXACT_MAX_N = 10_000
#: Exact p-values of unequal samples of at least this size are not walked out when the
#: asymptotic p-value is below :data:`TAIL_P` (both are then far below any alpha).
TAIL_MIN_N, TAIL_P = 100, 1e-12
#: Bins on reference quantiles for PSI / JS / Hellinger / KL (deciles).
DEFAULT_BINS = 10


def _stats():
    return require("scipy.stats", extra="server", feature="drift detection")


def clean_numeric(values: Any, side: str) -> tuple[np.ndarray, int]:
    """``values`` as 1-D float64 without NaN/inf, and how many were dropped.

    >>> clean_numeric([1.0, float("nan"), 2.0], "current")
    (array([1., 2.]), 1)
    >>> clean_numeric([float("nan")], "current")
    Traceback (most recent call last):
    ...
    ValueError: current sample is empty after dropping 1 NaN/inf values; nothing to compare
    """
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{side}: values are not numeric ({exc})") from exc
    if arr.ndim != 1:
        raise ValueError(f"{side}: expected a 1-D array, got shape {arr.shape}")
    finite = np.isfinite(arr)
    dropped = int(arr.size - np.count_nonzero(finite))
    if dropped:
        arr = arr[finite]
    if arr.size == 0:
        if dropped:
            raise ValueError(f"{side} sample is empty after dropping {dropped} NaN/inf values; nothing to compare")
        raise ValueError(f"{side} sample is empty; nothing to compare")
    return arr, dropped


# -- Kolmogorov-Smirnov ------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _steps(n: int) -> np.ndarray:
    """``[1/n, 2/n, ..., 1]``: the ECDF just after each sorted value (read-only, cached)."""
    out = np.arange(1, n + 1, dtype=np.float64) / n
    out.flags.writeable = False
    return out


def ks_statistic_sorted(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample KS statistic ``sup |F_a - F_b|`` of two sorted, NaN-free samples.

    The supremum of ``F_a - F_b`` sits at a value of ``a`` and that of ``F_b - F_a``
    at a value of ``b``; inside a run of tied values the last one dominates, so the
    running index stands in for the ECDF without any tie bookkeeping.

    >>> ks_statistic_sorted(np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 3.0]))
    0.0
    """
    n1, n2 = a.size, b.size
    d_plus = np.max(_steps(n1) - np.searchsorted(b, a, side="right") / n2)
    d_minus = np.max(_steps(n2) - np.searchsorted(a, b, side="right") / n1)
    return float(max(d_plus, d_minus, 0.0))


def _exact_equal(n: int, h: int) -> float:
    """P(D >= h/n) for two samples of size ``n``: the reflection series, nested Horner-style."""
    total = 0.0
    j = np.arange(h, dtype=np.float64)
    for k in range(n // h, -1, -1):
        factor = float(np.prod((n - k * h - j) / (n + k * h + j + 1.0)))
        total = factor * (1.0 - total)
    return 2.0 * total


def _exact_unequal(n1: int, n2: int, g: int, h: int) -> float:
    """P(D >= d) with ``d = h g / (n1 n2)``: one minus the probability that a uniformly
    random lattice path from (0, 0) to (m, n) keeps ``|n x - m y| < h g`` throughout.

    The walk goes one anti-diagonal ``x + y = s`` at a time. From any point of
    diagonal ``s - 1`` a random path steps right with probability
    ``(m - x) / (m + n - s + 1)`` and up with ``(n - y) / (m + n - s + 1)``, so each
    diagonal is two scaled, shifted copies of the one before, restricted to the
    admissible band. Values stay probabilities (no overflow); far from the band's
    centre they underflow, which is harmless because they are that small.
    """
    m, n, bound, total = n1, n2, h * g, n1 + n2
    p = np.zeros(m + 2)  # p[x + 1] holds the probability at (x, s - x); p[0] stays 0
    p[1] = 1.0
    old_lo, old_hi = 0, 0
    for s in range(1, total + 1):
        # |n x - m (s - x)| < bound  <=>  (m s - bound) < (m + n) x < (m s + bound)
        lo = max(0, s - n, (m * s - bound) // total + 1)
        hi = min(m, s, -((-(m * s + bound)) // total) - 1)
        if lo > hi:
            return 1.0
        x = np.arange(lo, hi + 1, dtype=np.float64)
        vals = (p[lo : hi + 1] * (m - x + 1.0) + p[lo + 1 : hi + 2] * (n - s + x + 1.0)) / (total - s + 1.0)
        p[old_lo + 1 : old_hi + 2] = 0.0
        p[lo + 1 : hi + 2] = vals
        old_lo, old_hi = lo, hi
    return 1.0 - float(p[m + 1])


def _exact(d: float, n1: int, n2: int) -> tuple[float, float] | None:
    g = math.gcd(n1, n2)
    lcm = (n1 // g) * n2
    h = int(np.round(d * lcm))
    d = h / lcm
    if h == 0:
        return d, 1.0
    with np.errstate(over="ignore", invalid="ignore"):
        p = _exact_equal(n1, h) if n1 == n2 else _exact_unequal(n1, n2, g, h)
    if not -1e-9 <= p <= 1.0 + 1e-9:  # beyond rounding: let the asymptotic formula answer
        return None
    return d, min(1.0, max(0.0, p))


def ks_pvalue(d: float, n1: int, n2: int) -> tuple[float, float, str]:
    """``(statistic, p_value, mode)`` as ``scipy.stats.ks_2samp(method="auto")`` gives them.

    In the exact mode the statistic is rounded to the lattice ``h / lcm(n1, n2)`` the
    way SciPy does. ``mode`` is ``"exact"``, ``"asymp"``, or ``"tail"`` when an exact
    case was answered by the asymptotic value because that is below 1e-12.

    >>> d, p, mode = ks_pvalue(0.5, 10, 10)
    >>> round(p, 6), mode
    (0.167821, 'exact')
    """
    if max(n1, n2) <= EXACT_MAX_N:
        if n1 != n2 and min(n1, n2) >= TAIL_MIN_N:
            # Far in the tail the exact value is below 1e-6 as surely as the asymptotic
            # one is below 1e-12; skip the O((n1 + n2) x band) lattice walk there.
            tail = float(ks_pvalues(np.array([d]), np.array([n1]), np.array([n2]))[0])
            if tail < TAIL_P:
                return d, tail, "tail"
        got = _exact(d, n1, n2)
        if got is not None:
            return got[0], got[1], "exact"
    return d, float(ks_pvalues(np.array([d]), np.array([n1]), np.array([n2]))[0]), "asymp"


def ks_pvalues(d: np.ndarray, n1: np.ndarray, n2: np.ndarray) -> np.ndarray:
    """Asymptotic two-sided p-values for many columns at once: the survival function
    of the one-sample KS distribution ``kstwo`` at ``en = round(n1 n2 / (n1 + n2))``,
    as SciPy's ``ks_2samp(method="asymp")`` uses.

    ``kstwo.sf`` answers from formulas whose cost grows with ``en`` (a Durbin matrix
    in the body, an ``O(en)`` Smirnov sum in the tail: tens of milliseconds per column
    at ``en = 50,000``). From ``en >= 500`` this answers instead, vectorised over
    columns, with the Pelz-Good expansion for ``z = d sqrt(en) < 3`` and with
    Kolmogorov's limiting distribution beyond (where p < 3e-8). Measured against
    ``kstwo.sf`` the largest difference is 1.3e-7 (at ``en = 500``), under 6e-8 from
    ``en = 1000``. Smaller ``en`` go to ``kstwo.sf`` (or its exact Smirnov tail) itself.
    """
    special = require("scipy.special", extra="server", feature="drift detection")
    d = np.minimum(np.asarray(d, dtype=np.float64), 1.0)
    big = np.maximum(n1, n2).astype(np.float64)
    small = np.minimum(n1, n2).astype(np.float64)
    en = np.round(big * small / (big + small))
    out = np.empty(d.shape)
    z = np.sqrt(en) * d
    large = en >= PELZ_GOOD_MIN_N
    body, far = large & (z < 3.0), large & (z >= 3.0)
    tail = ~large & (en > 140) & (z * z >= 2.2)
    rest = ~(large | tail)
    if body.any():
        out[body] = 1.0 - _pelz_good_cdf(d[body], en[body])
    if far.any():
        out[far] = special.kolmogorov(z[far])
    if tail.any():
        out[tail] = 2.0 * special.smirnov(en[tail].astype(np.int64), d[tail])
    if rest.any():
        out[rest] = _stats().kstwo.sf(d[rest], en[rest])
    return np.clip(out, 0.0, 1.0)


#: From this effective size on, :func:`ks_pvalues` uses the Pelz-Good expansion in the body.
PELZ_GOOD_MIN_N = 500
_PI2 = math.pi**2


def _pelz_good_cdf(x: np.ndarray, n: np.ndarray) -> np.ndarray:
    """P(D_n <= x) by the Pelz-Good (1976) expansion in powers of ``1/sqrt(n)``:
    ``K0(z) + K1(z)/sqrt(n) + K2(z)/n + K3(z)/n^1.5`` with ``z = x sqrt(n)``, each
    ``K`` written as a theta-function series that converges fast for small ``z``."""
    z = np.sqrt(n) * x
    tiny = z < 0.05  # the CDF there is below 1e-300
    z = np.where(tiny, 1.0, z)
    z2, z4, z6, z8 = z**2, z**4, z**6, z**8
    odd = (2.0 * np.arange(1, 13) - 1.0)[:, None]  # m = 1, 3, 5, ...
    m2, m4, m6 = odd**2, odd**4, odd**6
    w = np.exp(-_PI2 * m2 / (8.0 * z2))  # q^(m^2), q = exp(-pi^2 / (8 z^2))
    c1 = -z2 + _PI2 / 4 * m2
    c2 = (6 * z6 + 2 * z4) + (2 * z4 - 5 * z2) * _PI2 / 4 * m2 + _PI2**2 * (1 - 2 * z2) / 16 * m4
    c3 = ((-30 * z6 - 90 * z8) + _PI2 * (135 * z4 - 96 * z6) / 4 * m2
          + _PI2**2 * (-60 * z2 + 212 * z4) / 16 * m4 + _PI2**3 * (5 - 30 * z2) / 64 * m6)
    root = math.sqrt(2 * math.pi)
    k0 = root * w.sum(axis=0) / z
    k1 = root * (c1 * w).sum(axis=0) / (6 * z4)
    k2 = root * (c2 * w).sum(axis=0) / (72 * z**7)
    k3 = root * (c3 * w).sum(axis=0) / (6480 * z**10)
    whole = np.arange(1, 13, dtype=np.float64)[:, None]  # k = 1, 2, 3, ...
    v = whole**2 * np.exp(-_PI2 * whole**2 / (2.0 * z2))
    k2 = k2 - _PI2 * root / (36 * z**3) * v.sum(axis=0)
    k3 = k3 + _PI2 * root / (216 * z6) * ((3 * z2 - _PI2 * whole**2) * v).sum(axis=0)
    cdf = k0 + k1 / np.sqrt(n) + k2 / n + k3 / n**1.5
    return np.where(tiny, 0.0, np.clip(cdf, 0.0, 1.0))


# -- Wasserstein ----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _merged_grid(n1: int, n2: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices into each sorted sample and the width of each piece of the merged
    quantile grid ``{i/n1} U {j/n2}``, in exact integer units of ``1 / lcm``."""
    lcm = n1 // math.gcd(n1, n2) * n2
    ta = np.arange(1, n1 + 1, dtype=np.int64) * (lcm // n1)
    tb = np.arange(1, n2 + 1, dtype=np.int64) * (lcm // n2)
    t = np.union1d(ta, tb)
    width = np.diff(t, prepend=0) / lcm
    ia, ib = np.searchsorted(ta, t), np.searchsorted(tb, t)
    for arr in (ia, ib, width):
        arr.flags.writeable = False
    return ia, ib, width


def wasserstein_sorted(a: np.ndarray, b: np.ndarray) -> float:
    """W1 distance of two sorted, NaN-free samples: ``integral |Q_a(t) - Q_b(t)| dt``.

    Equal to ``scipy.stats.wasserstein_distance(a, b)``.

    >>> wasserstein_sorted(np.array([0.0, 1.0]), np.array([1.0, 2.0]))
    1.0
    """
    if a.size == b.size:
        return float(np.mean(np.abs(a - b)))
    ia, ib, width = _merged_grid(a.size, b.size)
    return float(np.dot(width, np.abs(a[ia] - b[ib])))


def normalizer(a_sorted: np.ndarray, b_sorted: np.ndarray) -> float:
    """What W1 is divided by: the reference's standard deviation (ddof=0), or the
    pooled one when the reference is constant, or 1 when both are the same constant."""
    s = float(np.std(a_sorted))
    if s > 0:
        return s
    s = float(np.std(np.concatenate([a_sorted, b_sorted])))
    return s if s > 0 else 1.0


# -- binning --------------------------------------------------------------------------------------


def quantile_edges(ref_sorted: np.ndarray, bins: int) -> np.ndarray:
    """Interior bin edges at the reference's ``1/bins, ..., (bins-1)/bins`` quantiles,
    duplicates removed (ties merge bins)."""
    q = np.quantile(ref_sorted, np.arange(1, bins) / bins)
    return np.unique(q)


def binned_counts(sorted_values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Counts in ``(-inf, e1], (e1, e2], ..., (e_last, inf)`` of a sorted sample."""
    cum = np.searchsorted(sorted_values, edges, side="right")
    return np.diff(cum, prepend=0, append=sorted_values.size)


# -- detectors ----------------------------------------------------------------------------------------


class _Numeric(ABC):
    """Shared plumbing: validated settings, a sorted reference, the result record."""

    name = ""
    kind = "numeric"
    measure = ""  # key in DEFAULT_THRESHOLDS
    uses_p_value = False

    def __init__(self, *, alpha: float = 0.05, threshold: float | None = None, bins: int = DEFAULT_BINS) -> None:
        problems, threshold = check_alpha_threshold(alpha, threshold, self.measure, self.uses_p_value)
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 2:
            problems.append(f"bins: must be an integer >= 2, got {bins!r}")
        if problems:
            raise ConfigError(problems)
        self.alpha, self.threshold, self.bins = float(alpha), float(threshold), bins
        self._ref: np.ndarray | None = None
        self._dropped_ref = 0

    def fit(self, reference: Any):
        ref, self._dropped_ref = clean_numeric(reference, "reference")
        self._ref = np.sort(ref)
        return self

    def score(self, current: Any) -> DriftResult:
        if self._ref is None:
            raise RuntimeError(f"{type(self).__name__}.score called before fit")
        cur, dropped = clean_numeric(current, "current")
        cur = np.sort(cur)
        statistic, p_value, effect, extra = self._compute(self._ref, cur)
        drifted = effect >= self.threshold and (p_value is None or p_value < self.alpha)
        return DriftResult(
            method=self.name,
            statistic=float(statistic),
            p_value=None if p_value is None else float(p_value),
            effect=float(effect),
            threshold=self.threshold,
            drifted=bool(drifted),
            n_reference=int(self._ref.size),
            n_current=int(cur.size),
            details={"dropped_reference": self._dropped_ref, "dropped_current": dropped,
                     "effect_measure": self.measure, **extra},
        )

    @abstractmethod
    def _compute(self, ref: np.ndarray, cur: np.ndarray) -> tuple[float, float | None, float, dict]:
        """Implemented by each concrete detector."""


@register("ks")
class KS(_Numeric):
    """Two-sample Kolmogorov-Smirnov test; effect: the statistic D (threshold 0.05).

    Statistic and p-value equal ``scipy.stats.ks_2samp(ref, cur)`` (``method="auto"``).
    """

    name, measure, uses_p_value = "ks", "ks", True

    def _compute(self, ref, cur):
        d = ks_statistic_sorted(ref, cur)
        d, p, mode = ks_pvalue(d, ref.size, cur.size)
        return d, p, d, {"mode": mode}


@register("cramer_von_mises")
class CramerVonMises(_Numeric):
    """Two-sample Cramer-von Mises test (``scipy.stats.cramervonmises_2samp``, exact
    p-value up to 20 values per sample, asymptotic above); effect: the KS D of the
    same samples (threshold 0.05), since the CvM statistic has no scale-free size."""

    name, measure, uses_p_value = "cramer_von_mises", "cramer_von_mises", True

    def _compute(self, ref, cur):
        res = _stats().cramervonmises_2samp(ref, cur)
        p = float(res.pvalue)
        return float(res.statistic), min(1.0, max(0.0, p)), ks_statistic_sorted(ref, cur), {}


@register("anderson_darling")
class AndersonDarling(_Numeric):
    """k-sample Anderson-Darling test (``scipy.stats.anderson_ksamp``, midrank variant);
    effect: the KS D (threshold 0.05).

    SciPy interpolates the p-value from a table, so it is capped at 0.25 and floored
    at 0.001; ``details["p_clipped"]`` says when either happened. The cap cannot hide
    drift at any ``alpha`` below 0.25; the floor only hides how small p really is.
    """

    name, measure, uses_p_value = "anderson_darling", "anderson_darling", True

    def _compute(self, ref, cur):
        if ref[0] == ref[-1] == cur[0] == cur[-1]:
            return 0.0, 1.0, 0.0, {"p_clipped": False}  # one value everywhere: SciPy refuses
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = _stats().anderson_ksamp([ref, cur], variant="midrank")
        clipped = any("p-value" in str(w.message) for w in caught)
        return float(res.statistic), float(res.pvalue), ks_statistic_sorted(ref, cur), {"p_clipped": clipped}


@register("wasserstein")
class Wasserstein(_Numeric):
    """Wasserstein-1 distance divided by the reference's standard deviation (ddof=0);
    threshold 0.1, a tenth of a standard deviation of mean shift; no p-value.

    Equals ``scipy.stats.wasserstein_distance(ref, cur) / np.std(ref)``.
    """

    name, measure = "wasserstein", "wasserstein"

    def _compute(self, ref, cur):
        w = wasserstein_sorted(ref, cur)
        scale = normalizer(ref, cur)
        return w / scale, None, w / scale, {"w1": w, "scale": scale}


class _Binned(_Numeric):
    """Distances between histograms on the reference's quantile bins."""

    def _counts(self, ref, cur):
        edges = quantile_edges(ref, self.bins)
        return binned_counts(ref, edges), binned_counts(cur, edges)

    @abstractmethod
    def _distance(self, r: np.ndarray, c: np.ndarray) -> float:
        """Implemented by each concrete detector."""

    def _compute(self, ref, cur):
        r, c = self._counts(ref, cur)
        d = self._distance(r, c)
        return d, None, d, {"bins": int(r.size)}


@register("psi")
class PSI(_Binned):
    """Population stability index on reference deciles, 0.5 pseudo-count per bin; threshold 0.2."""

    name, measure = "psi", "psi"

    def _distance(self, r, c):
        return psi(r, c)


@register("jensen_shannon")
class JensenShannon(_Binned):
    """Jensen-Shannon distance (base 2, in [0, 1]) on reference deciles; threshold 0.1."""

    name, measure = "jensen_shannon", "jensen_shannon"

    def _distance(self, r, c):
        return jensen_shannon(r, c)


@register("hellinger")
class Hellinger(_Binned):
    """Hellinger distance (in [0, 1]) on reference deciles; threshold 0.1."""

    name, measure = "hellinger", "hellinger"

    def _distance(self, r, c):
        return hellinger(r, c)


@register("kl")
class KL(_Binned):
    """KL(current || reference) in nats on reference deciles, 0.5 pseudo-count per bin; threshold 0.1."""

    name, measure = "kl", "kl"

    def _distance(self, r, c):
        return kl_divergence(r, c)
