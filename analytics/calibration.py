"""Calibrated verdicts: multiple-testing correction and practical effect thresholds.

A column is reported as drifted only when two things hold at once:

* its p-value is significant *after* correcting for the number of columns tested
  (Benjamini-Hochberg by default, Bonferroni on request, at ``alpha=0.05``), and
* its effect size is at least the method's practical threshold, so that a huge
  sample cannot turn a negligible difference into an alarm.

Methods without a p-value (PSI, Jensen-Shannon, Hellinger, KL, total variation, the
normalized Wasserstein distance on its own) use their threshold alone.

:data:`DEFAULT_THRESHOLDS` lists the practical thresholds; docs/detectors.md explains
each choice.

>>> adjust_pvalues([0.01, 0.04, 0.03, 0.20], "bh").round(4).tolist()
[0.04, 0.0533, 0.0533, 0.2]
>>> adjust_pvalues([0.01, 0.04], "bonferroni").tolist()
[0.02, 0.08]
>>> Calibration(alpha=0.01, correction="bonferroni").alpha
0.01
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np

from ..errors import ConfigError

__all__ = [
    "CORRECTIONS",
    "check_alpha_threshold",
    "DEFAULT_THRESHOLDS",
    "Calibration",
    "adjust_pvalues",
]

#: Multiple-testing corrections understood by :func:`adjust_pvalues`.
CORRECTIONS = ("bh", "bonferroni", "none")

#: Practical effect thresholds, per effect measure. An effect at or above its
#: threshold counts as large enough to matter.
DEFAULT_THRESHOLDS: Mapping[str, float] = MappingProxyType(
    {
        # maximum gap between the two empirical CDFs: 0.05 is about an eighth of a
        # standard deviation of mean shift between two normals (D = 2 Phi(delta/2) - 1)
        "ks": 0.05,
        # W1 divided by the reference standard deviation: 0.1 is a mean shift of a
        # tenth of a standard deviation (the value Evidently uses for large samples)
        "wasserstein": 0.1,
        # Cramer-von Mises / Anderson-Darling: the KS D is reported as their effect
        "cramer_von_mises": 0.05,
        "anderson_darling": 0.05,
        # population stability index: 0.1-0.2 "moderate", >= 0.2 "significant shift"
        "psi": 0.2,
        # Jensen-Shannon *distance* (square root of the base-2 divergence), in [0, 1]
        "jensen_shannon": 0.1,
        # Hellinger distance in [0, 1]
        "hellinger": 0.1,
        # Kullback-Leibler divergence of current from reference, in nats
        "kl": 0.1,
        # total variation distance (half the L1 distance of the frequencies)
        "tvd": 0.1,
        # Cramer's V of the 2 x k table: 0.1 is Cohen's "small" association
        "cramers_v": 0.1,
    }
)


def adjust_pvalues(p_values: Sequence[float] | np.ndarray, correction: str = "bh") -> np.ndarray:
    """Corrected p-values, in the input order, to compare with ``alpha``.

    ``"bh"``: Benjamini-Hochberg step-up (controls the false discovery rate; under
    the global null it also controls the chance of any alarm at ``alpha``).
    ``"bonferroni"``: ``min(1, p * m)`` (controls the family-wise error rate).
    ``"none"``: the p-values unchanged. NaN entries are ignored and stay NaN, and
    ``m`` counts only the finite ones.
    """
    if correction not in CORRECTIONS:
        raise ValueError(f"correction must be one of {CORRECTIONS}, got {correction!r}")
    p = np.asarray(p_values, dtype=np.float64)
    if p.ndim != 1:
        raise ValueError(f"p_values must be 1-D, got shape {p.shape}")
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    m = ok.size
    if m == 0 or correction == "none":
        out[ok] = p[ok]
        return out
    q = p[ok]
    if correction == "bonferroni":
        out[ok] = np.minimum(1.0, q * m)
        return out
    order = np.argsort(q, kind="stable")
    scaled = q[order] * m / np.arange(1, m + 1)
    scaled = np.minimum.accumulate(scaled[::-1])[::-1]  # step-up: monotone from the top
    adjusted = np.empty(m)
    adjusted[order] = np.minimum(1.0, scaled)
    out[ok] = adjusted
    return out


@dataclass(frozen=True)
class Calibration:
    """How per-column results become verdicts. Validated when built, all problems at once.

    ``alpha``: significance level after correction. ``correction``: one of
    :data:`CORRECTIONS`. ``drift_share``: the dataset drifts when at least this share
    of the checked columns drift. ``small_sample``: at or below this many reference
    or current values a test's p-value alone decides (the test cannot reach
    significance on a negligible effect at that size, and effect estimates are noisy).
    ``thresholds``: overrides of :data:`DEFAULT_THRESHOLDS`.

    Examples
    --------
    >>> Calibration().threshold("wasserstein")
    0.1
    >>> Calibration(thresholds={"wasserstein": 0.2}).threshold("wasserstein")
    0.2
    >>> Calibration(alpha=2, correction="holm")
    Traceback (most recent call last):
    ...
    stethoscope.errors.ConfigError: 2 configuration problems:
      - alpha: must be in (0, 1), got 2
      - correction: must be one of ('bh', 'bonferroni', 'none'), got 'holm'
    """

    alpha: float = 0.05
    correction: str = "bh"
    drift_share: float = 0.5
    small_sample: int = 1000
    thresholds: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        problems = []
        if not _is_real(self.alpha) or not 0 < self.alpha < 1:
            problems.append(f"alpha: must be in (0, 1), got {self.alpha!r}")
        if self.correction not in CORRECTIONS:
            problems.append(f"correction: must be one of {CORRECTIONS}, got {self.correction!r}")
        if not _is_real(self.drift_share) or not 0 < self.drift_share <= 1:
            problems.append(f"drift_share: must be in (0, 1], got {self.drift_share!r}")
        if isinstance(self.small_sample, bool) or not isinstance(self.small_sample, int) or self.small_sample < 0:
            problems.append(f"small_sample: must be an integer >= 0, got {self.small_sample!r}")
        for key, value in dict(self.thresholds).items():
            if key not in DEFAULT_THRESHOLDS:
                problems.append(f"thresholds.{key}: unknown effect measure; known: {sorted(DEFAULT_THRESHOLDS)}")
            elif not _is_real(value) or value < 0:
                problems.append(f"thresholds.{key}: must be a finite number >= 0, got {value!r}")
        if problems:
            raise ConfigError(problems)
        object.__setattr__(self, "thresholds", MappingProxyType(dict(self.thresholds)))

    def threshold(self, measure: str) -> float:
        """The practical threshold for ``measure`` (an override, else the default)."""
        return float(self.thresholds.get(measure, DEFAULT_THRESHOLDS[measure]))


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_alpha_threshold(alpha, threshold, measure: str, uses_p_value: bool) -> tuple[list[str], float]:
    """Problems with a detector's ``alpha`` and ``threshold``, and the threshold to use.

    ``threshold=None`` takes :data:`DEFAULT_THRESHOLDS` for ``measure``.

    >>> check_alpha_threshold(0.05, None, "psi", False)
    ([], 0.2)
    >>> check_alpha_threshold(2, 0, "psi", False)[0]
    ['alpha: must be in (0, 1), got 2', 'threshold: a distance-only detector needs a threshold > 0']
    """
    problems = []
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 1:
        problems.append(f"alpha: must be in (0, 1), got {alpha!r}")
    if threshold is None:
        threshold = DEFAULT_THRESHOLDS[measure]
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold < math.inf:
        problems.append(f"threshold: must be a finite number >= 0, got {threshold!r}")
    elif not uses_p_value and threshold == 0:
        problems.append("threshold: a distance-only detector needs a threshold > 0")
    return problems, threshold
