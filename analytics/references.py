"""References kept as sketches: drift checks that never re-read raw reference rows.

A :class:`ReferenceSketch` summarises a window of feature vectors with

* one OpenTelemetry base-2 exponential histogram per feature (the
  :class:`~stethoscope.native.sketch.ExpHistogramState` the SDK records into, so
  sketches built here, sketches exported by the SDK and sketches of several
  windows all merge);
* a quantile summary per feature (:data:`QUANTILES`, exact when the sketch was
  built from rows, read from the histogram when it was built from SDK points);
* frequent items of the model's class predictions (the ``top_k`` most common
  labels with counts, and the count of all others) or, for numeric predictions,
  one more exponential histogram.

:class:`ReferenceStore` keeps sketches in the ``findings`` table (``Kind =
'reference_sketch'``, the sketch as JSON in ``Details``, the reference name in
``Labels['reference']``), so no schema change is needed; a named snapshot is a
*fixed* reference, the sketch of the previous window a *rolling* one, the first
window of a model version a *per-version* one.

Drift from sketches (:func:`sketch_ks`, :func:`binned_distances`, :class:`SketchDrift`)
----------------------------------------------------------------------------------------
Two histograms are first brought to a common scale (the smaller one; indexes
shift right, as in a merge), so their buckets are the same intervals of the real
line. Per bucket ``k`` (ordered along the line) the empirical CDFs of the two
samples are known *exactly* at bucket edges: ``P_k`` and ``Q_k``, the shares of
values up to the end of bucket ``k``. Inside bucket ``k`` they lie in
``[P_{k-1}, P_k]`` and ``[Q_{k-1}, Q_k]``. Hence the exact two-sample KS
statistic ``D = sup |F - G|`` of the raw values satisfies

    ``D_lo = max_k |P_k - Q_k|  <=  D  <=  D_hi = max_k max(P_k - Q_{k-1}, Q_k - P_{k-1})``

and, since ``P_k - Q_{k-1} = (P_k - Q_k) + q_k``,
``D_hi - D_lo <= max_k max(p_k, q_k)``: the error is at most the largest share
of either sample in one bucket. Bucket ``k`` of the positive range at scale
``s`` is ``(b, b (1 + g)]`` with relative width ``g = 2**(2**-s) - 1``; for values
drawn from a density ``f`` its expected share is at most
``g (1 + g) sup_x |x| f(x)``. So, up to sampling noise in the bucket shares
(a binomial share ``m`` out of ``n`` values has standard deviation
``sqrt(m / n)``):

    ``|D_sketch - D_exact| <= D_hi - D_lo <= g (1 + g) sup_x |x| f(x)``

For a normal N(mu, sigma^2) sample, ``|x| <= |x - mu| + |mu|`` gives
``sup_x |x| f(x) <= phi(1) + |mu| phi(0) / sigma = 0.242 + 0.399 |mu| / sigma``;
for N(0, 1) that is 0.242, so at scale 3 (``g = 0.0905``) the KS statistic from
sketches is within 0.024 of the exact one, at scale 4 within 0.011, at scale 6
within 0.0027. The bound does not depend on ``sigma`` when ``mu = 0``: exponential
buckets are relative, so they resolve values near zero as finely as large ones;
a sketch loses resolution instead where the data sit far from zero relative to
their spread (``|mu| / sigma`` large), e.g. timestamps or prices around 10,000
that vary by 1.
``details`` of each result carry ``statistic_high`` (``D_hi``), ``ks_error_bound``
(``D_hi - D_lo``, the bound that holds for these data), ``max_bucket_share`` and
``relative_bucket_width`` (``g``). The reported statistic is ``D_lo`` (exact at the
bucket edges; never claims more drift than the data show) and its p-value is the
asymptotic KS p-value of ``D_lo`` (:func:`~.univariate.ks_pvalues`, as SciPy's
``ks_2samp(method="asymp")``); ``p_value_low`` is the p-value of ``D_hi``.
Values within an ulp of a bucket edge may be mapped one bucket off (the
OpenTelemetry specification allows an inexact mapping, see
:mod:`stethoscope.native.sketch`); only those few values can step outside the bracket.

PSI, Jensen-Shannon and Hellinger use the aligned bucket counts as bins
(:func:`binned_distances`); they are exact for these bins, which are
data-independent log-scale bins rather than the reference-quantile bins the
raw-row detectors use, so the numbers differ from theirs.

Examples
--------
>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> ref = ReferenceSketch.from_rows(rng.normal(size=(5000, 2)), ["a", "b"])
>>> cur = ReferenceSketch.from_rows(np.column_stack([rng.normal(size=5000), rng.normal(1, 1, 5000)]), ["a", "b"])
>>> [(r.column, r.drifted) for r in SketchDrift().compare(ref, cur)]
[('a', False), ('b', True)]
>>> again = ReferenceSketch.from_json(ref.to_json())
>>> again.names, again.n_rows, again.state.buckets(0) == ref.state.buckets(0)
(('a', 'b'), 5000, True)
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from stethoscope.native.sketch import (
    EMPTY_OFFSET,
    ExpHistogramPoint,
    ExpHistogramState,
    exphist_update,
)

from stethoscope.errors import ConfigError

from .calibration import adjust_pvalues
from .categorical import chi2_table, hellinger, jensen_shannon, psi, total_variation
from .detector import DriftResult
from .findings import Finding, FindingsWriter, subject_of
from .sql import literal as _lit
from .univariate import ks_pvalues

__all__ = [
    "DEFAULT_MAX_SIZE",
    "QUANTILES",
    "ReferenceSketch",
    "ReferenceStore",
    "SketchDrift",
    "SketchKS",
    "aligned_counts",
    "binned_distances",
    "relative_width",
    "sketch_ks",
    "state_from_points",
]

#: Quantiles kept per feature.
QUANTILES = tuple(np.round(np.linspace(0.0, 1.0, 21), 2).tolist())
#: Buckets per sign per feature in reference sketches (the SDK exports 160; more
#: buckets keep a finer scale on wide-ranged data).
DEFAULT_MAX_SIZE = 320
_SEGMENT = 1 << 40


def _update(values: np.ndarray, state: ExpHistogramState) -> int:
    """Fold rows into ``state`` with the C kernel when built (bit-for-bit the twin's result), else the twin."""
    from stethoscope import native

    try:
        mod = native.implementation(kernel="sketch")
    except ImportError:  # pragma: no cover - implementation() falls back to the twin itself
        mod = None
    return int(getattr(mod, "exphist_update", exphist_update)(values, state) or 0)


def relative_width(scale: int) -> float:
    """Relative width ``2**(2**-scale) - 1`` of a bucket at ``scale``.

    >>> round(relative_width(3), 4), relative_width(0)
    (0.0905, 1.0)
    """
    return 2.0 ** (2.0 ** -scale) - 1.0


# --- one histogram as ordered buckets ---------------------------------------------------


def _keys(p: ExpHistogramPoint, scale: int) -> tuple[np.ndarray, np.ndarray]:
    """(sort keys along the real line, counts) of ``p``'s buckets at ``scale`` (<= p.scale).

    Negative-range index ``i`` holds ``[-b**(i+1), -b**i)``: a larger ``i`` lies further
    left, so its key is ``-2**40 - i``; the zero bucket is key 0; positive index ``i``
    is ``2**40 + i``. Downscaling first (``i >> change``) merges buckets as a merge does.
    """
    change = p.scale - scale
    parts_k, parts_c = [], []
    if p.neg_counts:
        idx = (p.neg_offset + np.arange(len(p.neg_counts), dtype=np.int64)) >> change
        parts_k.append(-_SEGMENT - idx)
        parts_c.append(np.asarray(p.neg_counts, dtype=np.float64))
    if p.zero_count:
        parts_k.append(np.zeros(1, np.int64))
        parts_c.append(np.array([float(p.zero_count)]))
    if p.pos_counts:
        idx = (p.pos_offset + np.arange(len(p.pos_counts), dtype=np.int64)) >> change
        parts_k.append(_SEGMENT + idx)
        parts_c.append(np.asarray(p.pos_counts, dtype=np.float64))
    if not parts_k:
        return np.empty(0, np.int64), np.empty(0)
    return np.concatenate(parts_k), np.concatenate(parts_c)


def aligned_counts(a: ExpHistogramPoint, b: ExpHistogramPoint) -> tuple[np.ndarray, np.ndarray, int]:
    """Counts of ``a`` and ``b`` over the same buckets (ordered along the line, buckets
    empty in both left out) and that common scale.

    >>> st = ExpHistogramState(2, max_size=4)
    >>> exphist_update(np.array([[1.0, 1.0], [2.0, 2.0], [4.0, 3.0]]), st)
    0
    >>> p, q, s = aligned_counts(st.buckets(0), st.buckets(1))
    >>> p.tolist(), q.tolist(), s
    ([1.0, 1.0, 1.0], [1.0, 1.0, 1.0], 0)
    """
    scale = min(a.scale, b.scale)
    ka, ca = _keys(a, scale)
    kb, cb = _keys(b, scale)
    keys, inverse = np.unique(np.concatenate([ka, kb]), return_inverse=True)
    p, q = np.zeros(keys.size), np.zeros(keys.size)
    np.add.at(p, inverse[: ka.size], ca)
    np.add.at(q, inverse[ka.size:], cb)
    keep = (p + q) > 0
    return p[keep], q[keep], scale


@dataclass(frozen=True)
class SketchKS:
    """Bounds on the two-sample KS statistic from two histograms (see the module docstring)."""

    statistic: float  # D_lo: exact at the bucket edges, a lower bound on the exact D
    statistic_high: float  # D_hi: an upper bound on the exact D
    p_value: float  # asymptotic p-value of D_lo
    p_value_low: float  # asymptotic p-value of D_hi
    max_bucket_share: float
    scale: int
    n_reference: int
    n_current: int

    @property
    def error_bound(self) -> float:
        """``D_hi - D_lo``: how far the exact KS statistic can be from :attr:`statistic`."""
        return self.statistic_high - self.statistic


def sketch_ks(a: ExpHistogramPoint, b: ExpHistogramPoint) -> SketchKS:
    """KS statistic bounds and p-values between the values summarised by ``a`` and ``b``.

    >>> rng = np.random.default_rng(1)
    >>> x, y = rng.normal(size=3000), rng.normal(size=3000)
    >>> sa, sb = ExpHistogramState(1, 320), ExpHistogramState(1, 320)
    >>> _ = exphist_update(x[:, None], sa), exphist_update(y[:, None], sb)
    >>> r = sketch_ks(sa.buckets(0), sb.buckets(0))
    >>> from scipy.stats import ks_2samp
    >>> bool(r.statistic <= ks_2samp(x, y).statistic <= r.statistic_high)
    True
    """
    p, q, scale = aligned_counts(a, b)
    n, m = float(p.sum()), float(q.sum())
    if n <= 0 or m <= 0:
        raise ValueError(f"sketch_ks: both histograms need values (reference has {n:.0f}, current {m:.0f})")
    P, Q = np.cumsum(p) / n, np.cumsum(q) / m
    P0, Q0 = np.concatenate([[0.0], P[:-1]]), np.concatenate([[0.0], Q[:-1]])
    lo = float(np.max(np.abs(P - Q)))
    hi = float(max(np.max(P - Q0), np.max(Q - P0)))
    lo, hi = min(lo, 1.0), min(max(hi, lo), 1.0)
    pv = ks_pvalues(np.array([lo, hi]), np.array([int(n)] * 2), np.array([int(m)] * 2))
    share = float(max(np.max(p / n), np.max(q / m)))
    return SketchKS(lo, hi, float(pv[0]), float(pv[1]), share, int(scale), int(n), int(m))


def binned_distances(a: ExpHistogramPoint, b: ExpHistogramPoint) -> dict[str, float]:
    """PSI, Jensen-Shannon distance and Hellinger distance over the aligned buckets.

    >>> st = ExpHistogramState(2)
    >>> exphist_update(np.array([[1.0, 1.0], [2.0, 2.0]]), st)
    0
    >>> binned_distances(st.buckets(0), st.buckets(1))
    {'psi': 0.0, 'js': 0.0, 'hellinger': 0.0}
    """
    p, q, _ = aligned_counts(a, b)
    return {"psi": psi(p, q), "js": jensen_shannon(p, q), "hellinger": hellinger(p, q)}


# --- building states from OTLP points ----------------------------------------------------


def _fill_column(state: ExpHistogramState, c: int, scale: int, zero_count: int, pos_offset: int,
                 pos_counts: Sequence[int], neg_offset: int, neg_counts: Sequence[int], count: int, total: float,
                 lo: float, hi: float) -> None:
    """Write one OTLP-style histogram into empty column ``c``, downscaling until it fits ``max_size``."""
    m = state.max_size
    runs = []
    for off, counts in ((pos_offset, pos_counts), (neg_offset, neg_counts)):
        cnt = np.asarray(counts, dtype=np.uint64)
        idx = int(off) + np.arange(cnt.size, dtype=np.int64)
        nz = cnt != 0
        runs.append((idx[nz], cnt[nz]))
    while any(i.size and int(i[-1]) - int(i[0]) >= m for i, _ in runs):
        runs = [(i >> 1, c_) for i, c_ in runs]
        scale -= 1
    state.scale[c] = scale
    for r, (idx, cnt) in enumerate(runs):
        row = (state.pos_counts if r == 0 else state.neg_counts)[c]
        offs = state.pos_offset if r == 0 else state.neg_offset
        row[...] = 0
        if idx.size:
            np.add.at(row, idx % m, cnt)
            offs[c] = int(idx[0])
        else:
            offs[c] = EMPTY_OFFSET
    state.zero_count[c] = int(zero_count)
    state.count[c] = int(count)
    state.sum[c] = float(total)
    state.min[c] = float(lo) if math.isfinite(lo) or count == 0 else math.inf
    state.max[c] = float(hi) if math.isfinite(hi) or count == 0 else -math.inf


def state_from_points(points: Iterable[tuple[int, Mapping[str, Any]]], d: int,
                      max_size: int = DEFAULT_MAX_SIZE) -> ExpHistogramState:
    """Merge ``(column, point)`` pairs into one ``d``-column state.

    A point is a mapping with the OTLP fields ``scale``, ``zero_count``,
    ``positive_offset``, ``positive_counts``, ``negative_offset``,
    ``negative_counts``, ``count``, ``sum``, ``min``, ``max`` (the
    ``otel_metrics_exponential_histogram`` columns, lower-cased). Several points of
    one column merge (delta points of consecutive intervals add up).
    """
    total = ExpHistogramState(d, max_size=max_size)
    for col, pt in points:
        if not 0 <= col < d:
            raise ValueError(f"column {col} out of range for d={d}")
        one = ExpHistogramState(d, max_size=max_size)
        _fill_column(one, col, int(pt["scale"]), int(pt["zero_count"]), int(pt["positive_offset"]),
                     pt["positive_counts"], int(pt["negative_offset"]), pt["negative_counts"], int(pt["count"]),
                     float(pt["sum"]), float(pt["min"]), float(pt["max"]))
        total.merge(one)
    return total


def _point_json(p: ExpHistogramPoint) -> dict[str, Any]:
    return {"scale": p.scale, "zero_count": p.zero_count, "positive_offset": p.pos_offset,
            "positive_counts": list(p.pos_counts), "negative_offset": p.neg_offset,
            "negative_counts": list(p.neg_counts), "count": p.count, "sum": p.sum,
            "min": p.min if math.isfinite(p.min) else None, "max": p.max if math.isfinite(p.max) else None}


def _point_from_json(raw: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(raw)
    out["min"] = math.inf if raw.get("min") is None else float(raw["min"])
    out["max"] = -math.inf if raw.get("max") is None else float(raw["max"])
    return out


# --- the reference -------------------------------------------------------------------------


@dataclass(frozen=True)
class ReferenceSketch:
    """Sketches of one window of ``d`` features (and, optionally, of the model's predictions).

    ``quantiles[j]`` holds feature ``j``'s values at :data:`QUANTILES`; ``frequent``
    maps the most common class predictions to their counts (``other`` counts the
    rest); ``prediction`` is a one-column histogram of numeric predictions.
    """

    names: tuple[str, ...]
    state: ExpHistogramState
    quantiles: np.ndarray
    n_rows: int
    frequent: Mapping[str, int] = field(default_factory=dict)
    other: int = 0
    prediction: ExpHistogramState | None = None
    source: str = "rows"

    def __post_init__(self) -> None:
        if len(self.names) != self.state.d:
            raise ValueError(f"{len(self.names)} names for a sketch of {self.state.d} features")

    @classmethod
    def from_rows(cls, features: Any, names: Sequence[str], *, predictions: Any = None, top_k: int = 64,
                  max_size: int = DEFAULT_MAX_SIZE) -> ReferenceSketch:
        """Sketch an ``n x d`` array of feature rows (non-finite values are left out of each feature)."""
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != len(names) or x.shape[1] == 0:
            raise ValueError(f"features: need an n x {len(names)} array (one column per name), got shape {x.shape}")
        state = ExpHistogramState(x.shape[1], max_size=max_size)
        _update(np.ascontiguousarray(x), state)
        qs = np.full((x.shape[1], len(QUANTILES)), np.nan)
        finite = np.isfinite(x).all(axis=0)
        if finite.any() and x.shape[0]:
            qs[finite] = np.quantile(x[:, finite], QUANTILES, axis=0).T
        for j in np.flatnonzero(~finite):
            col = x[:, j][np.isfinite(x[:, j])]
            if col.size:
                qs[j] = np.quantile(col, QUANTILES)
        frequent: dict[str, int] = {}
        other, pred_state = 0, None
        if predictions is not None:
            pr = np.asarray(predictions)
            if pr.dtype.kind == "f":
                pred_state = ExpHistogramState(1, max_size=max_size)
                _update(np.ascontiguousarray(pr.reshape(-1, 1), dtype=np.float64), pred_state)
            else:
                counts = Counter(str(v) for v in pr if v is not None)
                top = counts.most_common(top_k)
                frequent = dict(top)
                other = sum(counts.values()) - sum(frequent.values())
        return cls(tuple(str(n) for n in names), state, qs, int(x.shape[0]), frequent, other, pred_state, "rows")

    @classmethod
    def from_points(cls, points: Iterable[tuple[int, Mapping[str, Any]]], names: Sequence[str],
                    max_size: int = DEFAULT_MAX_SIZE, source: str = "otel") -> ReferenceSketch:
        """Sketch from exported exponential-histogram points (``(column, point)`` pairs)."""
        state = state_from_points(points, len(names), max_size)
        qs = np.array([[state.quantile(j, q) for q in QUANTILES] for j in range(state.d)])
        return cls(tuple(names), state, qs, int(state.count.max()) if state.d else 0, source=source)

    def merge(self, other: ReferenceSketch) -> ReferenceSketch:
        """A new sketch of both windows (same feature names). Quantiles come from the merged histograms."""
        if self.names != other.names:
            raise ValueError(f"cannot merge sketches of features {other.names} into {self.names}")
        state = self.state.copy()
        state.merge(other.state)
        qs = np.array([[state.quantile(j, q) for q in QUANTILES] for j in range(state.d)])
        freq = Counter(self.frequent)
        freq.update(other.frequent)
        pred = None
        if self.prediction is not None and other.prediction is not None:
            pred = self.prediction.copy()
            pred.merge(other.prediction)
        return ReferenceSketch(self.names, state, qs, self.n_rows + other.n_rows, dict(freq),
                               self.other + other.other, pred, "merged")

    def point(self, j: int) -> ExpHistogramPoint:
        return self.state.buckets(j)

    def to_json(self) -> str:
        """The sketch as compact JSON (what :class:`ReferenceStore` stores)."""
        doc = {
            "version": 1, "names": list(self.names), "n_rows": self.n_rows, "source": self.source,
            "max_size": self.state.max_size, "quantile_levels": list(QUANTILES),
            "features": [_point_json(self.state.buckets(j)) for j in range(self.state.d)],
            "quantiles": [[None if not math.isfinite(v) else float(v) for v in row] for row in self.quantiles],
            "frequent": dict(self.frequent), "other": self.other,
            "prediction": None if self.prediction is None else _point_json(self.prediction.buckets(0)),
        }
        return json.dumps(doc, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | Mapping[str, Any]) -> ReferenceSketch:
        """Read back :meth:`to_json`'s output; a clear ``ValueError`` on anything else."""
        try:
            doc = json.loads(text) if isinstance(text, str) else dict(text)
            if doc.get("version") != 1:
                raise ValueError(f"unknown reference sketch version {doc.get('version')!r}")
            names = [str(n) for n in doc["names"]]
            max_size = int(doc["max_size"])
            state = state_from_points(((j, _point_from_json(p)) for j, p in enumerate(doc["features"])),
                                      len(names), max_size)
            qs = np.array([[math.nan if v is None else float(v) for v in row] for row in doc["quantiles"]],
                          dtype=np.float64).reshape(len(names), -1)
            pred = None
            if doc.get("prediction") is not None:
                pred = state_from_points([(0, _point_from_json(doc["prediction"]))], 1, max_size)
            return cls(tuple(names), state, qs, int(doc["n_rows"]), {str(k): int(v) for k, v in doc["frequent"].items()},
                       int(doc["other"]), pred, str(doc.get("source", "rows")))
        except (KeyError, TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"not a reference sketch: {exc!r}") from exc


# --- drift between two sketches ------------------------------------------------------------


class SketchDrift:
    """Per-feature drift between a reference sketch and a current one.

    Each feature gets the KS bounds of :func:`sketch_ks` (statistic ``D_lo``, its
    p-value) and the binned PSI / JS / Hellinger of :func:`binned_distances` in
    ``details``. P-values are corrected across features (``correction``, BH by
    default); a feature drifts when its corrected p-value is below ``alpha`` and
    ``D_lo`` is at least ``min_effect`` (0.1, a practical-size threshold so that a
    huge window does not turn a tiny shift into an alarm).
    """

    name = "sketch_ks"

    def __init__(self, *, alpha: float = 0.05, min_effect: float = 0.1, correction: str = "bh") -> None:
        problems = []
        if not 0 < alpha < 1:
            problems.append(f"alpha: must be in (0, 1), got {alpha!r}")
        if not 0 <= min_effect <= 1:
            problems.append(f"min_effect: must be in [0, 1], got {min_effect!r}")
        if correction not in ("bh", "bonferroni", "none"):
            problems.append(f"correction: must be bh, bonferroni or none, got {correction!r}")
        if problems:
            raise ConfigError(problems)
        self.alpha, self.min_effect, self.correction = float(alpha), float(min_effect), correction

    def compare(self, reference: ReferenceSketch, current: ReferenceSketch) -> list[DriftResult]:
        """One result per feature name the two share, in the reference's order (empty features left out)."""
        cur_index = {n: j for j, n in enumerate(current.names)}
        pairs = [(n, j, cur_index[n]) for j, n in enumerate(reference.names) if n in cur_index]
        rows = []
        for name, i, j in pairs:
            a, b = reference.point(i), current.point(j)
            if a.count == 0 or b.count == 0:
                continue
            rows.append((name, sketch_ks(a, b), binned_distances(a, b)))
        adjusted = adjust_pvalues([r[1].p_value for r in rows], self.correction) if rows else []
        out = []
        for (name, ks, binned), p_adj in zip(rows, adjusted):
            out.append(DriftResult(
                method=self.name, statistic=ks.statistic, p_value=ks.p_value, effect=ks.statistic,
                threshold=self.min_effect, drifted=bool(p_adj < self.alpha and ks.statistic >= self.min_effect),
                column=name, n_reference=ks.n_reference, n_current=ks.n_current,
                details={"p_adjusted": float(p_adj), "correction": self.correction, "alpha": self.alpha,
                         "statistic_high": ks.statistic_high, "p_value_low": ks.p_value_low,
                         "ks_error_bound": ks.error_bound, "max_bucket_share": ks.max_bucket_share,
                         "scale": ks.scale, "relative_bucket_width": relative_width(ks.scale), **binned},
            ))
        return out


    def compare_predictions(self, reference: ReferenceSketch, current: ReferenceSketch, *,
                            min_effect: float = 0.05) -> DriftResult | None:
        """Prediction drift between two sketches, or None when they hold no comparable predictions.

        Class predictions (frequent items): chi-squared test of the 2 x k table of the
        items kept on either side, plus one cell for everything else (exact when no
        side dropped items, ``top_k`` distinct labels or fewer); effect the total
        variation of the shares. Numeric predictions (histograms): :func:`sketch_ks`,
        effect ``D_lo``. Drift when ``p < alpha`` and the effect exceeds ``min_effect``
        (0.05), as :class:`~.performance.PredictionDrift` decides on rows.
        """
        if reference.frequent and current.frequent:
            labels = sorted(set(reference.frequent) | set(current.frequent))
            table = np.array([[side.frequent.get(k, 0) for k in labels] + [side.other]
                              for side in (reference, current)], dtype=np.float64)
            stat, p, dof = chi2_table(table)
            tv = total_variation(table[0], table[1])
            return DriftResult(
                method="sketch_chi2", statistic=stat, p_value=p, effect=tv, threshold=min_effect,
                drifted=bool(p < self.alpha and tv > min_effect), n_reference=int(table[0].sum()),
                n_current=int(table[1].sum()),
                details={"test": "chi2", "dof": dof, "alpha": self.alpha, "labels": len(labels),
                         "other_reference": reference.other, "other_current": current.other},
            )
        if reference.prediction is not None and current.prediction is not None:
            a, b = reference.prediction.buckets(0), current.prediction.buckets(0)
            if a.count == 0 or b.count == 0:
                return None
            ks = sketch_ks(a, b)
            return DriftResult(
                method="sketch_ks", statistic=ks.statistic, p_value=ks.p_value, effect=ks.statistic,
                threshold=min_effect, drifted=bool(ks.p_value < self.alpha and ks.statistic > min_effect),
                n_reference=ks.n_reference, n_current=ks.n_current,
                details={"test": "ks", "alpha": self.alpha, "statistic_high": ks.statistic_high,
                         "ks_error_bound": ks.error_bound, "scale": ks.scale},
            )
        return None


# --- storage --------------------------------------------------------------------------------



class ReferenceStore:
    """Reference sketches in the ``findings`` table (``Kind = 'reference_sketch'``).

    One row per saved sketch: ``Labels`` ``{"stream": ..., "reference": name}``,
    ``WindowStart``/``WindowEnd`` the window it summarises, ``Details`` the JSON.
    :meth:`load` returns the latest one of a name (optionally ending by a time).
    """

    kind = "reference_sketch"

    def __init__(self, store: Any) -> None:
        self.store = store
        self.writer = FindingsWriter(store)

    def finding(self, name: str, model: str, version: str, stream: str, sketch: ReferenceSketch, *,
                window_start: float, window_end: float, time: float | None = None) -> Finding:
        """The row :meth:`save` writes (for batching with other findings)."""
        if not name:
            raise ValueError("a reference needs a non-empty name")
        labels = {"stream": stream, "reference": name}
        return Finding(time=window_end if time is None else time, kind=self.kind,
                       subject=subject_of(model, version, labels), model=model, model_version=version,
                       method="sketch", statistic=float(sketch.n_rows), window_start=window_start,
                       window_end=window_end, details=json.loads(sketch.to_json()), labels=labels)

    def save(self, name: str, model: str, version: str, stream: str, sketch: ReferenceSketch, *,
             window_start: float, window_end: float, time: float | None = None) -> None:
        self.writer.write([self.finding(name, model, version, stream, sketch, window_start=window_start,
                                        window_end=window_end, time=time)])

    def load(self, name: str, model: str, version: str | None, stream: str, *,
             ending_by: float | None = None) -> tuple[ReferenceSketch, float, float] | None:
        """``(sketch, window_start, window_end)`` of the latest saved sketch, or None.

        ``version=None`` takes the latest of any version of the model (a fixed
        snapshot kept across releases).
        """
        cond = [f"Kind = {_lit(self.kind)}", f"Model = {_lit(model)}",
                f"Labels['stream'] = {_lit(stream)}", f"Labels['reference'] = {_lit(name)}"]
        if version is not None:
            cond.append(f"ModelVersion = {_lit(version)}")
        if ending_by is not None:
            cond.append(f"WindowEnd <= fromUnixTimestamp64Milli(toInt64({int(round(ending_by * 1000))}))")
        data = self.store.query(
            "SELECT Details, toUnixTimestamp64Milli(WindowStart), toUnixTimestamp64Milli(WindowEnd) FROM findings "
            f"WHERE {' AND '.join(cond)} ORDER BY WindowEnd DESC, Time DESC LIMIT 1", "JSONCompactEachRow",
        ).data
        lines = [ln for ln in data.splitlines() if ln.strip()]
        if not lines:
            return None
        details, start, end = json.loads(lines[0])
        return ReferenceSketch.from_json(details), int(start) / 1000, int(end) / 1000
