"""Model outputs and realized performance: prediction drift, confidence, metrics, shadows.

Contract per kind (what ``fit(reference)`` and ``score(current)`` take):

``"prediction"`` (:class:`PredictionDrift`, ``"prediction_drift"``)
    1-D arrays of model outputs. Float arrays are numeric scores (two-sample KS);
    integer, bool, string or object arrays are class predictions (chi-squared test
    of class shares). ``mode`` forces either reading.
``"confidence"`` (:class:`ConfidenceCV`, ``"confidence_cv"``)
    1-D arrays of the model's confidence in its answer (top-class probability,
    values in (0, 1]). Drift is the current coefficient of variation above 0.2,
    so a reference of confident answers (e.g. Beta(20, 2)) is "null" and a spread
    one (e.g. Beta(2, 2)) is "shifted".
``"performance"`` (:class:`PerformanceDrop`, ``"performance_drop"``)
    A tuple ``(y_true, y_pred)`` or ``(y_true, y_pred, y_score)`` of equal-length
    1-D arrays, labels already joined to predictions. ``y_score`` (the probability
    of the positive class) is needed by ``metric="roc_auc"`` only.
``"shadow"`` (:class:`ShadowAgreement`, ``"shadow_agreement"``)
    ``fit`` takes the primary model's predictions and ``score`` the shadow's, each
    either a tuple ``(request_ids, predictions)`` or a bare 1-D array (ids are then
    positions). Rows are joined on request id.

:func:`sample_inputs` builds null or shifted inputs of each kind for tests. NaN /
inf / ``None`` entries are dropped (row-wise for tuples) and counted in
``details["n_dropped"]``. Malformed input (wrong dimensions, unequal lengths,
fewer than 2 usable values; for ``"shadow"``, no usable row) raises
``ValueError``. The KS and chi-squared tests use SciPy, which comes with the
``server`` extra.

Metrics (:func:`accuracy`, :func:`f1`, :func:`f1_macro`, :func:`roc_auc`,
:func:`mae`) are plain functions of arrays.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from stethoscope._extras import require
from stethoscope.errors import ConfigError

from .detector import DriftResult, register

__all__ = [
    "accuracy",
    "f1",
    "f1_macro",
    "roc_auc",
    "mae",
    "METRICS",
    "PredictionDrift",
    "ConfidenceCV",
    "PerformanceDrop",
    "ShadowAgreement",
    "sample_inputs",
]


def _stats():
    return require("scipy.stats", extra="server", feature="Prediction drift tests (KS, chi-squared)")


def _check(problems: list[str]) -> None:
    if problems:
        raise ConfigError(problems)


# --- metrics -----------------------------------------------------------------


def accuracy(y_true: Any, y_pred: Any) -> float:
    """Share of exact matches.

    >>> accuracy([1, 0, 1, 1], [1, 0, 0, 1])
    0.75
    """
    t, p = np.asarray(y_true), np.asarray(y_pred)
    return float(np.mean(t == p)) if t.size else math.nan


def _f1_for(t: np.ndarray, p: np.ndarray, label: Any) -> float:
    tp = float(np.sum((t == label) & (p == label)))
    fp = float(np.sum((t != label) & (p == label)))
    fn = float(np.sum((t == label) & (p != label)))
    return 2.0 * tp / (2.0 * tp + fp + fn) if tp + fp + fn > 0 else 0.0


def f1(y_true: Any, y_pred: Any, pos_label: Any = 1) -> float:
    """Binary F1 of ``pos_label``: ``2 TP / (2 TP + FP + FN)`` (0 when undefined).

    >>> round(f1([1, 1, 0, 0], [1, 0, 1, 0]), 3)
    0.5
    """
    return _f1_for(np.asarray(y_true), np.asarray(y_pred), pos_label)


def f1_macro(y_true: Any, y_pred: Any) -> float:
    """Unweighted mean of per-class F1 over the classes present in either array.

    >>> round(f1_macro([0, 1, 2, 2], [0, 2, 2, 2]), 3)
    0.6
    """
    t, p = np.asarray(y_true), np.asarray(y_pred)
    labels = np.unique(np.concatenate([t, p]))
    return float(np.mean([_f1_for(t, p, c) for c in labels])) if labels.size else math.nan


def _average_ranks(s: np.ndarray) -> np.ndarray:
    order = np.argsort(s, kind="mergesort")
    ordered = s[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    ends = np.r_[starts[1:], ordered.size]
    ranks = np.empty(s.size)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def roc_auc(y_true: Any, y_score: Any, pos_label: Any = 1) -> float:
    """ROC AUC from ranks (Mann-Whitney U / (n_pos n_neg)); ties count one half.

    NaN when either class is absent.

    >>> roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    0.75
    >>> roc_auc([0, 1], [0.5, 0.5])
    0.5
    """
    t = np.asarray(y_true) == pos_label
    s = np.asarray(y_score, dtype=np.float64)
    n_pos = int(t.sum())
    n_neg = t.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    r_pos = float(_average_ranks(s)[t].sum())
    return (r_pos - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def mae(y_true: Any, y_pred: Any) -> float:
    """Mean absolute error.

    >>> mae([1.0, 2.0], [1.5, 1.0])
    0.75
    """
    t, p = np.asarray(y_true, dtype=np.float64), np.asarray(y_pred, dtype=np.float64)
    return float(np.mean(np.abs(t - p))) if t.size else math.nan


#: metric name -> (function of (y_true, y_pred, y_score), higher is better)
METRICS: dict[str, tuple[Any, bool]] = {
    "accuracy": (lambda t, p, s: accuracy(t, p), True),
    "f1": (lambda t, p, s: f1(t, p), True),
    "f1_macro": (lambda t, p, s: f1_macro(t, p), True),
    "roc_auc": (lambda t, p, s: roc_auc(t, s), True),
    "mae": (lambda t, p, s: mae(t, p), False),
}


# --- input handling -------------------------------------------------------------


def _bad(a: np.ndarray) -> np.ndarray:
    """Mask of NaN / inf / None entries in a 1-D array of any dtype."""
    if a.dtype.kind in "fc":
        return ~np.isfinite(a)
    if a.dtype.kind == "O":
        return np.array([v is None or (isinstance(v, float) and not math.isfinite(v)) for v in a], dtype=bool)
    return np.zeros(a.shape, dtype=bool)


def _vector(data: Any, name: str) -> tuple[np.ndarray, int]:
    a = np.asarray(data)
    if a.ndim != 1:
        raise ValueError(f"{name}: must be a 1-D array, got {a.ndim}-D")
    bad = _bad(a)
    a = a[~bad]
    if a.size < 2:
        raise ValueError(f"{name}: needs at least 2 usable values, got {a.size}")
    if a.dtype.kind == "O":
        try:
            a = a.astype(np.float64) if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in a) else a.astype(str)
        except (TypeError, ValueError):
            a = a.astype(str)
    return a, int(bad.sum())


def _is_numeric(a: np.ndarray, mode: str) -> bool:
    return mode == "numeric" or (mode == "auto" and a.dtype.kind == "f")


def _distribution_test(ref: np.ndarray, cur: np.ndarray, numeric: bool) -> tuple[str, float, float, float]:
    """(test, statistic, p-value, effect): KS distance, or chi-squared with total variation."""
    st = _stats()
    if numeric:
        res = st.ks_2samp(ref.astype(np.float64), cur.astype(np.float64))
        return "ks", float(res.statistic), float(res.pvalue), float(res.statistic)
    labels, inverse = np.unique(np.concatenate([ref.astype(str), cur.astype(str)]), return_inverse=True)
    counts = np.zeros((2, labels.size))
    np.add.at(counts[0], inverse[: ref.size], 1.0)
    np.add.at(counts[1], inverse[ref.size:], 1.0)
    tvd = 0.5 * float(np.abs(counts[0] / ref.size - counts[1] / cur.size).sum())
    if labels.size < 2:
        return "chi2", 0.0, 1.0, tvd
    expected = counts.sum(axis=0)[None, :] * counts.sum(axis=1)[:, None] / counts.sum()
    chi2 = float(np.sum((counts - expected) ** 2 / expected))
    p = float(st.chi2.sf(chi2, labels.size - 1))
    return "chi2", chi2, p, tvd


# --- detectors -------------------------------------------------------------------


@register("prediction_drift")
class PredictionDrift:
    """Has the distribution of the model's outputs moved?

    Numeric scores: two-sample KS, ``effect`` the KS distance. Class predictions:
    chi-squared test of homogeneity of class shares, ``effect`` the total
    variation distance between the shares. Drift when ``p < alpha`` (0.05) and
    ``effect > min_effect`` (0.05).

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> det = PredictionDrift().fit(rng.integers(0, 3, 2000))
    >>> det.score(rng.integers(0, 3, 2000)).drifted
    False
    >>> det.score(rng.choice(3, 2000, p=[0.6, 0.2, 0.2])).drifted
    True
    """

    name = "prediction_drift"
    kind = "prediction"

    def __init__(self, *, mode: str = "auto", alpha: float = 0.05, min_effect: float = 0.05) -> None:
        problems = []
        if mode not in ("auto", "numeric", "class"):
            problems.append(f"mode: must be 'auto', 'numeric' or 'class', got {mode!r}")
        if not 0 < alpha < 1:
            problems.append(f"alpha: must be in (0, 1), got {alpha}")
        if not min_effect >= 0:
            problems.append(f"min_effect: must be >= 0, got {min_effect}")
        _check(problems)
        self.mode, self.alpha, self.min_effect = mode, float(alpha), float(min_effect)
        self._ref: np.ndarray | None = None

    def fit(self, reference: Any) -> PredictionDrift:
        self._ref, self._dropped_ref = _vector(reference, "reference")
        return self

    def score(self, current: Any) -> DriftResult:
        if self._ref is None:
            raise ValueError("prediction_drift: call fit(reference) before score()")
        cur, dropped = _vector(current, "current")
        numeric = _is_numeric(self._ref, self.mode)
        test, stat, p, effect = _distribution_test(self._ref, cur, numeric)
        return DriftResult(
            method=self.name, statistic=stat, p_value=p, effect=effect, threshold=self.min_effect,
            drifted=bool(p < self.alpha and effect > self.min_effect), n_reference=int(self._ref.size),
            n_current=int(cur.size), details={"test": test, "alpha": self.alpha, "n_dropped": dropped + self._dropped_ref},
        )


def _cv(a: np.ndarray) -> float:
    mean = float(a.mean())
    return float(a.std(ddof=1)) / mean if mean > 0 else math.inf


@register("confidence_cv")
class ConfidenceCV:
    """Retraining signal: the confidences' coefficient of variation above a threshold.

    ``CV = std / mean`` of the model's confidence over the current window (sample
    std). A confident model has a tight, high confidence distribution (CV ~0.05-0.1);
    when inputs move away from the training data the confidences spread and sag,
    and the CV rises. ``drifted`` is ``CV_current > threshold`` (0.2) — a rule, not
    a test, so ``p_value`` is ``None``. ``details`` carry ``cv_reference`` and
    ``cv_current`` (and the means) so a reference that already breaks the rule is
    visible. A mean <= 0 gives ``CV = inf``.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> det = ConfidenceCV().fit(rng.beta(20, 2, 1000))
    >>> det.score(rng.beta(20, 2, 1000)).drifted, det.score(rng.beta(2, 2, 1000)).drifted
    (False, True)
    """

    name = "confidence_cv"
    kind = "confidence"

    def __init__(self, *, threshold: float = 0.2) -> None:
        if not (threshold > 0 and math.isfinite(threshold)):
            raise ConfigError([f"threshold: must be finite and > 0, got {threshold}"])
        self.threshold = float(threshold)
        self._ref: np.ndarray | None = None

    def fit(self, reference: Any) -> ConfidenceCV:
        ref, self._dropped_ref = _vector(reference, "reference")
        self._ref = ref.astype(np.float64)
        self.cv_reference_ = _cv(self._ref)
        return self

    def score(self, current: Any) -> DriftResult:
        if self._ref is None:
            raise ValueError("confidence_cv: call fit(reference) before score()")
        cur, dropped = _vector(current, "current")
        cur = cur.astype(np.float64)
        cv = _cv(cur)
        return DriftResult(
            method=self.name, statistic=cv, p_value=None, effect=cv, threshold=self.threshold,
            drifted=bool(cv > self.threshold), n_reference=int(self._ref.size), n_current=int(cur.size),
            details={"cv_reference": self.cv_reference_, "cv_current": cv, "mean_reference": float(self._ref.mean()),
                     "mean_current": float(cur.mean()), "n_dropped": dropped + self._dropped_ref},
        )


def _labelled(data: Any, name: str, need_score: bool) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray | None], int]:
    if not isinstance(data, (tuple, list)) or len(data) not in (2, 3):
        raise ValueError(f"{name}: must be a tuple (y_true, y_pred) or (y_true, y_pred, y_score)")
    arrays = [np.asarray(a) for a in data]
    if any(a.ndim != 1 for a in arrays) or len({a.size for a in arrays}) != 1:
        raise ValueError(f"{name}: y_true, y_pred[, y_score] must be 1-D arrays of equal length")
    if need_score and len(arrays) < 3:
        raise ValueError(f"{name}: metric 'roc_auc' needs y_score as the third element")
    bad = np.zeros(arrays[0].size, dtype=bool)
    for a in arrays:
        bad |= _bad(a)
    arrays = [a[~bad] for a in arrays]
    if arrays[0].size < 2:
        raise ValueError(f"{name}: needs at least 2 usable rows, got {arrays[0].size}")
    score = arrays[2].astype(np.float64) if len(arrays) == 3 else None
    return (arrays[0], arrays[1], score), int(bad.sum())


@register("performance_drop")
class PerformanceDrop:
    """Realized performance once labels arrive, against the reference period.

    ``metric`` is one of :data:`METRICS` (``accuracy`` by default; ``f1`` binary
    with positive label 1, ``f1_macro``, ``roc_auc`` on ``y_score``, ``mae``).
    ``effect`` is the relative degradation: ``(ref - cur) / ref`` for metrics where
    higher is better, ``(cur - ref) / ref`` for MAE. Drift when the effect exceeds
    ``max_drop`` (0.05, a 5% relative drop) and a one-sided permutation test
    (``n_permutations`` = 200 reshuffles of the pooled labelled rows) gives
    ``p < alpha``, so a 5% dip on a handful of labels does not alert.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> y = rng.integers(0, 2, 2000)
    >>> det = PerformanceDrop().fit((y[:1000], np.where(rng.random(1000) < 0.9, y[:1000], 1 - y[:1000])))
    >>> worse = np.where(rng.random(1000) < 0.75, y[1000:], 1 - y[1000:])
    >>> r = det.score((y[1000:], worse))
    >>> r.drifted, round(r.details["reference_metric"], 2), round(r.details["current_metric"], 2)
    (True, 0.9, 0.76)
    """

    name = "performance_drop"
    kind = "performance"

    def __init__(self, *, metric: str = "accuracy", max_drop: float = 0.05, alpha: float = 0.05,
                 n_permutations: int = 200, seed: int = 0) -> None:
        problems = []
        if metric not in METRICS:
            problems.append(f"metric: must be one of {sorted(METRICS)}, got {metric!r}")
        if not max_drop >= 0:
            problems.append(f"max_drop: must be >= 0, got {max_drop}")
        if not 0 < alpha <= 1:
            problems.append(f"alpha: must be in (0, 1], got {alpha}")
        if n_permutations < 1:
            problems.append(f"n_permutations: must be >= 1, got {n_permutations}")
        _check(problems)
        self.metric, self.max_drop, self.alpha = metric, float(max_drop), float(alpha)
        self.n_permutations, self.seed = int(n_permutations), int(seed)
        self._ref: tuple[np.ndarray, np.ndarray, np.ndarray | None] | None = None

    def _value(self, t: np.ndarray, p: np.ndarray, s: np.ndarray | None) -> float:
        return float(METRICS[self.metric][0](t, p, s))

    def _drop(self, ref: float, cur: float) -> float:
        diff = ref - cur if METRICS[self.metric][1] else cur - ref
        if ref == 0:
            return 0.0 if diff == 0 else math.copysign(math.inf, diff)
        return diff / abs(ref)

    def fit(self, reference: Any) -> PerformanceDrop:
        self._ref, self._dropped_ref = _labelled(reference, "reference", self.metric == "roc_auc")
        self.reference_metric_ = self._value(*self._ref)
        return self

    def score(self, current: Any) -> DriftResult:
        if self._ref is None:
            raise ValueError("performance_drop: call fit(reference) before score()")
        cur, dropped = _labelled(current, "current", self.metric == "roc_auc")
        ref_value = self.reference_metric_
        cur_value = self._value(*cur)
        drop = self._drop(ref_value, cur_value)
        n, m = self._ref[0].size, cur[0].size
        pooled = [np.concatenate([a, b]) if a is not None and b is not None else None for a, b in zip(self._ref, cur)]
        rng = np.random.default_rng(self.seed)
        hits = 0
        for _ in range(self.n_permutations):
            order = rng.permutation(n + m)
            ia, ib = order[:n], order[n:]
            pa = [None if a is None else a[ia] for a in pooled]
            pb = [None if a is None else a[ib] for a in pooled]
            null = self._drop(self._value(*pa), self._value(*pb))  # type: ignore[arg-type]
            hits += bool(null >= drop - 1e-12)
        p = (1 + hits) / (1 + self.n_permutations)
        return DriftResult(
            method=self.name, statistic=cur_value, p_value=p, effect=drop, threshold=self.max_drop,
            drifted=bool(drop > self.max_drop and p < self.alpha), n_reference=n, n_current=m,
            details={"metric": self.metric, "reference_metric": ref_value, "current_metric": cur_value,
                     "alpha": self.alpha, "n_dropped": dropped + self._dropped_ref},
        )


def _keyed(data: Any, name: str) -> tuple[np.ndarray, np.ndarray, int, int]:
    """(unique ids, predictions, n_dropped, n_duplicates); the first row of an id wins."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and np.ndim(data[0]) == 1 and np.ndim(data[1]) == 1:
        ids, preds = np.asarray(data[0]), np.asarray(data[1])
        if ids.size != preds.size:
            raise ValueError(f"{name}: request_ids and predictions differ in length ({ids.size} vs {preds.size})")
    else:
        preds = np.asarray(data)
        if preds.ndim != 1:
            raise ValueError(f"{name}: must be (request_ids, predictions) or a 1-D array of predictions")
        ids = np.arange(preds.size)
    bad = _bad(preds) | _bad(ids)
    ids, preds = ids[~bad], preds[~bad]
    if ids.size == 0:
        raise ValueError(f"{name}: no usable (request_id, prediction) rows")
    uniq, first = np.unique(ids, return_index=True)
    return uniq, preds[first], int(bad.sum()), int(ids.size - uniq.size)


@register("shadow_agreement")
class ShadowAgreement:
    """Shadow / canary comparison: do two model versions answer the same requests alike?

    Rows are joined on request id (NumPy ``intersect1d``). Ids on one side only are
    counted (``details["only_reference"]``, ``details["only_current"]``) and left
    out; an id repeated on one side keeps its first row (``details["duplicates"]``).
    Two joined predictions agree when equal (class predictions) or, for float
    predictions, when ``|a - b| <= tolerance`` (0.0). ``statistic`` is the agreement
    rate over joined requests, ``effect`` the disagreement rate, and drift is
    ``agreement < min_agreement`` (0.95). ``details["prediction_drift"]`` holds a
    KS / chi-squared comparison of the two versions' joined outputs (test,
    statistic, p-value). With no request in common the agreement is NaN and
    ``drifted`` is ``False`` (``details["joined"] == 0`` says why).

    Examples
    --------
    >>> import numpy as np
    >>> det = ShadowAgreement().fit((np.array([1, 2, 3, 4]), np.array([0, 1, 1, 0])))
    >>> r = det.score((np.array([2, 3, 4, 5]), np.array([1, 1, 1, 0])))
    >>> round(r.statistic, 3), r.details["only_reference"], r.details["only_current"], r.drifted
    (0.667, 1, 1, True)
    """

    name = "shadow_agreement"
    kind = "shadow"

    def __init__(self, *, min_agreement: float = 0.95, tolerance: float = 0.0, mode: str = "auto") -> None:
        problems = []
        if not 0 <= min_agreement <= 1:
            problems.append(f"min_agreement: must be in [0, 1], got {min_agreement}")
        if not tolerance >= 0:
            problems.append(f"tolerance: must be >= 0, got {tolerance}")
        if mode not in ("auto", "numeric", "class"):
            problems.append(f"mode: must be 'auto', 'numeric' or 'class', got {mode!r}")
        _check(problems)
        self.min_agreement, self.tolerance, self.mode = float(min_agreement), float(tolerance), mode
        self._ref: tuple[np.ndarray, np.ndarray] | None = None

    def fit(self, reference: Any) -> ShadowAgreement:
        ids, preds, self._dropped_ref, self._dup_ref = _keyed(reference, "reference")
        self._ref = (ids, preds)
        return self

    def score(self, current: Any) -> DriftResult:
        if self._ref is None:
            raise ValueError("shadow_agreement: call fit(reference) before score()")
        ref_ids, ref_preds = self._ref
        ids, preds, dropped, dups = _keyed(current, "current")
        common, ia, ib = np.intersect1d(ref_ids, ids, assume_unique=True, return_indices=True)
        a, b = ref_preds[ia], preds[ib]
        numeric = _is_numeric(a, self.mode) and b.dtype.kind in "fiu"
        if common.size == 0:
            agreement = math.nan
        elif numeric:
            agreement = float(np.mean(np.abs(a.astype(np.float64) - b.astype(np.float64)) <= self.tolerance))
        else:
            agreement = float(np.mean(a.astype(str) == b.astype(str)) if a.dtype != b.dtype else np.mean(a == b))
        drift_test: dict[str, Any] = {}
        if common.size >= 2:
            test, stat, p, _ = _distribution_test(a, b, numeric)
            drift_test = {"test": test, "statistic": stat, "p_value": p}
        drifted = bool(common.size > 0 and agreement < self.min_agreement)
        return DriftResult(
            method=self.name, statistic=agreement, p_value=None,
            effect=(1.0 - agreement) if common.size else math.nan, threshold=1.0 - self.min_agreement,
            drifted=drifted, n_reference=int(ref_ids.size), n_current=int(ids.size),
            details={"joined": int(common.size), "only_reference": int(ref_ids.size - common.size),
                     "only_current": int(ids.size - common.size), "duplicates": dups + self._dup_ref,
                     "n_dropped": dropped + self._dropped_ref, "prediction_drift": drift_test},
        )


def sample_inputs(name: str, rng: np.random.Generator, n: int = 1000, *, shifted: bool = False) -> tuple[Any, Any]:
    """``(reference, current)`` for the detector registered as ``name``, null or shifted.

    For the conformance suite: the inputs each kind here expects, with a shift that
    the default settings detect at ``n >= 500``.

    >>> ref, cur = sample_inputs("confidence_cv", np.random.default_rng(0), 500, shifted=True)
    >>> ConfidenceCV().fit(ref).score(cur).drifted
    True
    """
    if name == "prediction_drift":
        return rng.normal(0.0, 1.0, n), rng.normal(0.5 if shifted else 0.0, 1.0, n)
    if name == "confidence_cv":
        return rng.beta(20, 2, n), (rng.beta(2, 2, n) if shifted else rng.beta(20, 2, n))
    if name == "performance_drop":
        def labelled(err: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            y = rng.integers(0, 2, n)
            wrong = rng.random(n) < err
            score = np.clip(np.where(y == 1, 0.7, 0.3) + rng.normal(0.0, 0.25 + err, n), 0.0, 1.0)
            return y, np.where(wrong, 1 - y, y), score
        return labelled(0.1), labelled(0.3 if shifted else 0.1)
    if name == "shadow_agreement":
        ids = np.arange(n)
        primary = rng.integers(0, 3, n)
        shadow = primary.copy()
        if shifted:
            flip = rng.random(n) < 0.2
            shadow[flip] = (primary[flip] + 1) % 3
        order = rng.permutation(n)  # the shadow's rows arrive in another order
        return (ids, primary), (ids[order], shadow[order])
    raise ValueError(f"no sample inputs for {name!r}")
