"""Dataset drift: a method per column, one correction across columns, one summary.

The method is chosen per column from its type and sample size (``n`` is the smaller
of the reference and current counts after dropping missing values; ``small`` is
``Calibration.small_sample``, 1000 by default):

=================  ===============  ==============================  =================================
column             n                test (p-value)                  effect >= threshold also needed
=================  ===============  ==============================  =================================
numeric            > small          KS (SciPy ``ks_2samp`` "auto")  W1 / std(reference) >= 0.1
numeric            <= small         KS                              -- (the p-value decides)
categorical        > small          chi-squared on the 2 x k table  Cramer's V >= 0.1
categorical, <=2   <= small         Fisher exact                    -- (the p-value decides)
categories
categorical        <= small         chi-squared                     -- (the p-value decides)
=================  ===============  ==============================  =================================

All p-values of a dataset are corrected together (Benjamini-Hochberg by default). A
column drifts when its corrected p-value is below ``alpha`` and its effect reaches
the threshold; the dataset drifts when at least ``drift_share`` (0.5) of the checked
columns drift. NaN values are dropped and counted; a column left empty gets a
:class:`ColumnError` in its place instead of failing the whole check.

The numeric path is vectorised for wide tables: each reference column is sorted
once at ``fit`` (that sorted float64 copy is the fitted state), and scoring sorts one
current column at a time and needs two ``searchsorted`` calls and one pass over the
merged quantile grid per column; asymptotic p-values for all columns come from a
single ``kstwo`` call.

Examples
--------
>>> import numpy as np
>>> rng = np.random.default_rng(3)
>>> ref = {"x": rng.normal(size=5000), "y": rng.normal(size=5000), "c": rng.choice(["a", "b"], 5000)}
>>> cur = {"x": rng.normal(1.0, 1, 5000), "y": rng.normal(size=5000), "c": rng.choice(["a", "b"], 5000)}
>>> report = check_dataset(ref, cur)
>>> [(r.column, r.drifted) for r in report.columns]
[('x', True), ('y', False), ('c', False)]
>>> report.summary.n_drifted, report.summary.drifted
(1, False)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .calibration import Calibration, adjust_pvalues
from .categorical import FisherExact, chi2_table, clean_labels, contingency, cramers_v
from .detector import DriftResult
from .univariate import (
    EXACT_MAX_N,
    clean_numeric,
    ks_pvalue,
    ks_pvalues,
    ks_statistic_sorted,
    normalizer,
    wasserstein_sorted,
)

__all__ = ["KINDS", "ColumnError", "DatasetDrift", "DatasetReport", "DatasetSummary", "check_dataset", "infer_kind"]

#: Column kinds the dataset check understands.
KINDS = ("numeric", "categorical")


@dataclass(frozen=True)
class ColumnError:
    """A column that could not be checked (empty, all missing, wrong type); never drifted."""

    column: str
    kind: str
    message: str
    drifted: bool = False


@dataclass(frozen=True)
class DatasetSummary:
    """The dataset-level verdict: ``drifted`` when ``share >= drift_share``."""

    n_columns: int
    n_checked: int
    n_drifted: int
    n_errors: int
    share: float
    drift_share: float
    drifted: bool
    alpha: float
    correction: str


@dataclass(frozen=True)
class DatasetReport:
    """Per-column results (in column order) and the summary."""

    columns: tuple[DriftResult | ColumnError, ...]
    summary: DatasetSummary

    @property
    def drifted(self) -> bool:
        return self.summary.drifted

    def __getitem__(self, column: str) -> DriftResult | ColumnError:
        for item in self.columns:
            if item.column == column:
                return item
        raise KeyError(column)

    def records(self) -> list[dict[str, Any]]:
        """Plain dicts for JSON: one per column, then the summary (``"type": "dataset"``)."""
        out: list[dict[str, Any]] = []
        for item in self.columns:
            if isinstance(item, ColumnError):
                out.append({"type": "column", "column": item.column, "kind": item.kind, "error": item.message,
                            "drifted": False})
                continue
            d = item.details
            out.append({
                "type": "column",
                "column": item.column,
                "kind": d.get("kind"),
                "method": item.method,
                "statistic": item.statistic,
                "p_value": item.p_value,
                "p_adjusted": d.get("p_adjusted"),
                "effect": item.effect,
                "effect_measure": d.get("effect_measure"),
                "threshold": item.threshold,
                "drifted": item.drifted,
                "n_reference": item.n_reference,
                "n_current": item.n_current,
                "dropped_reference": d.get("dropped_reference", 0),
                "dropped_current": d.get("dropped_current", 0),
            })
        s = self.summary
        out.append({"type": "dataset", "n_columns": s.n_columns, "n_checked": s.n_checked,
                    "n_drifted": s.n_drifted, "n_errors": s.n_errors, "share": s.share,
                    "drift_share": s.drift_share, "drifted": s.drifted, "alpha": s.alpha,
                    "correction": s.correction})
        return out


def infer_kind(values: Any) -> str:
    """``"numeric"`` for integer and float arrays, ``"categorical"`` for the rest
    (booleans, strings, objects).

    >>> infer_kind(np.array([1.5])), infer_kind(np.array([True])), infer_kind(["a"])
    ('numeric', 'categorical', 'categorical')
    """
    return "numeric" if np.asarray(values).dtype.kind in "iuf" else "categorical"


@dataclass
class _Fitted:
    kind: str
    values: Any = None  # sorted float64 (numeric) or {category: count} (categorical)
    dropped: int = 0
    scale: float = 1.0
    error: str | None = None


@dataclass
class _Pending:
    """One column's numbers before the correction across columns."""

    column: str
    kind: str
    method: str
    statistic: float
    p_value: float
    effect: float
    threshold: float
    n_reference: int
    n_current: int
    details: dict = field(default_factory=dict)


class DatasetDrift:
    """Fit on a reference table, score current tables against it.

    A table is a mapping of column name to 1-D array, or a 2-D array (columns named
    ``"0"``, ``"1"``, ...). ``kinds`` overrides the inferred kind of named columns.
    """

    def __init__(self, calibration: Calibration | None = None, *, kinds: Mapping[str, str] | None = None) -> None:
        self.calibration = calibration or Calibration()
        bad = {k: v for k, v in (kinds or {}).items() if v not in KINDS}
        if bad:
            from ..errors import ConfigError

            raise ConfigError([f"kinds.{k}: must be one of {KINDS}, got {v!r}" for k, v in bad.items()])
        self.kinds = dict(kinds or {})
        self._fitted: dict[str, _Fitted] | None = None

    def fit(self, reference: Any, *, overwrite: bool = False) -> DatasetDrift:
        """Keep what scoring needs: each numeric column sorted, each categorical one counted.

        With ``overwrite=True``, numeric columns given as writable, contiguous 1-D
        float64 arrays are sorted in place and kept as views (no copy): the caller's
        arrays are reordered. The CLI does this with the columns it has just read.
        """
        table = _as_columns(reference, "reference")
        fitted: dict[str, _Fitted] = {}
        for name, values in table.items():
            kind = self.kinds.get(name) or infer_kind(values)
            f = _Fitted(kind)
            try:
                if kind == "numeric" and overwrite and _sortable_in_place(values):
                    values.sort()
                    # sorted: -inf first, then the finite values, +inf, NaN last
                    lo = int(np.searchsorted(values, -np.inf, side="right"))
                    hi = int(np.searchsorted(values, np.inf, side="left"))
                    f.values, f.dropped = values[lo:hi], int(values.size - (hi - lo))
                    if f.values.size == 0:
                        raise ValueError(f"reference column {name!r} sample is empty after dropping "
                                         f"{f.dropped} NaN/inf values; nothing to compare")
                    f.scale = float(np.std(f.values))
                elif kind == "numeric":
                    arr, f.dropped = clean_numeric(values, f"reference column {name!r}")
                    f.values = np.sort(arr)
                    f.scale = float(np.std(f.values))
                else:
                    labels, f.dropped = clean_labels(values, f"reference column {name!r}")
                    cats, counts = np.unique(labels, return_counts=True)
                    f.values = dict(zip(cats.tolist(), counts.tolist(), strict=True))
            except ValueError as exc:
                f.error = str(exc)
            fitted[name] = f
        self._fitted = fitted
        return self

    @property
    def columns(self) -> list[str]:
        if self._fitted is None:
            raise RuntimeError("DatasetDrift.columns read before fit")
        return list(self._fitted)

    def score(self, current: Any) -> DatasetReport:
        if self._fitted is None:
            raise RuntimeError("DatasetDrift.score called before fit")
        table = _as_columns(current, "current")
        missing = [c for c in self._fitted if c not in table]
        if missing:
            raise ValueError(f"current table lacks reference columns: {', '.join(map(str, missing))}")
        cal = self.calibration
        results: list[_Pending | ColumnError] = []
        asymp: list[int] = []  # positions whose p-value comes from the vectorised call
        for name, f in self._fitted.items():
            if f.error is not None:
                results.append(ColumnError(name, f.kind, f.error))
                continue
            try:
                if f.kind == "numeric":
                    pending = self._numeric(name, f, table[name])
                    if pending.details.get("mode") == "asymp":
                        asymp.append(len(results))
                else:
                    pending = self._categorical(name, f, table[name])
            except ValueError as exc:
                results.append(ColumnError(name, f.kind, str(exc)))
                continue
            results.append(pending)
        if asymp:
            rows = [results[i] for i in asymp]
            ps = ks_pvalues(np.array([r.statistic for r in rows]), np.array([r.n_reference for r in rows]),
                            np.array([r.n_current for r in rows]))
            for r, p in zip(rows, ps, strict=True):
                r.p_value = float(p)
        return self._finish(results, cal)

    # -- per column ------------------------------------------------------------------------

    def _numeric(self, name: str, f: _Fitted, values: Any) -> _Pending:
        cal = self.calibration
        cur, dropped = clean_numeric(values, f"current column {name!r}")
        cur = np.sort(cur)
        ref = f.values
        n1, n2 = ref.size, cur.size
        d = ks_statistic_sorted(ref, cur)
        if max(n1, n2) <= EXACT_MAX_N:
            d, p, mode = ks_pvalue(d, n1, n2)
        else:
            p, mode = math.nan, "asymp"  # filled in for all such columns at once
        details: dict[str, Any] = {"kind": "numeric", "mode": mode, "ks_d": d, "dropped_reference": f.dropped,
                                   "dropped_current": dropped}
        if min(n1, n2) <= cal.small_sample:
            details.update(effect_measure="ks", effect_gate=False)
            effect, threshold = d, 0.0
        else:
            w = wasserstein_sorted(ref, cur)
            scale = f.scale if f.scale > 0 else normalizer(ref, cur)
            effect, threshold = w / scale, cal.threshold("wasserstein")
            details.update(effect_measure="wasserstein", effect_gate=True, w1=w, scale=scale)
        return _Pending(name, "numeric", "ks", d, p, effect, threshold, n1, n2, details)

    def _categorical(self, name: str, f: _Fitted, values: Any) -> _Pending:
        cal = self.calibration
        labels, dropped = clean_labels(values, f"current column {name!r}")
        cats, counts = np.unique(labels, return_counts=True)
        cur = dict(zip(cats.tolist(), counts.tolist(), strict=True))
        names, table = contingency(f.values, cur)
        n1, n2 = int(table[0].sum()), int(table[1].sum())
        unseen = [c for c in names if c not in f.values]
        details: dict[str, Any] = {"kind": "categorical", "categories": len(names), "dropped_reference": f.dropped,
                                   "dropped_current": dropped, "unseen": [str(c) for c in unseen[:20]],
                                   "effect_measure": "cramers_v"}
        small = min(n1, n2) <= cal.small_sample
        effect = cramers_v(table)
        if small and len(names) <= 2:
            stat, p, _, extra = FisherExact()._compute(table)
            method = "fisher_exact"
            details.update(extra)
        else:
            stat, p, dof = chi2_table(table)
            method = "chi2"
            details["dof"] = dof
        details["effect_gate"] = not small
        threshold = 0.0 if small else cal.threshold("cramers_v")
        return _Pending(name, "categorical", method, stat, p, effect, threshold, n1, n2, details)

    # -- across columns ----------------------------------------------------------------------

    def _finish(self, results: list[_Pending | ColumnError], cal: Calibration) -> DatasetReport:
        pending = [r for r in results if isinstance(r, _Pending)]
        adjusted = adjust_pvalues([r.p_value for r in pending], cal.correction) if pending else np.array([])
        p_adj = {id(r): float(a) for r, a in zip(pending, adjusted, strict=True)}
        columns: list[DriftResult | ColumnError] = []
        for r in results:
            if isinstance(r, ColumnError):
                columns.append(r)
                continue
            pa = p_adj[id(r)]
            drifted = pa < cal.alpha and r.effect >= r.threshold
            columns.append(DriftResult(
                method=r.method, statistic=float(r.statistic), p_value=float(r.p_value), effect=float(r.effect),
                threshold=float(r.threshold), drifted=bool(drifted), column=r.column, n_reference=r.n_reference,
                n_current=r.n_current, details={**r.details, "p_adjusted": pa},
            ))
        checked = len(pending)
        n_drifted = sum(1 for c in columns if c.drifted)
        share = n_drifted / checked if checked else 0.0
        summary = DatasetSummary(
            n_columns=len(columns), n_checked=checked, n_drifted=n_drifted, n_errors=len(columns) - checked,
            share=share, drift_share=cal.drift_share, drifted=bool(checked and share >= cal.drift_share),
            alpha=cal.alpha, correction=cal.correction,
        )
        return DatasetReport(tuple(columns), summary)


def _sortable_in_place(values: Any) -> bool:
    return (isinstance(values, np.ndarray) and values.ndim == 1 and values.dtype == np.float64
            and values.flags.writeable and values.flags.c_contiguous)


def _as_columns(table: Any, side: str) -> dict[str, Any]:
    if isinstance(table, Mapping):
        return {str(k): v for k, v in table.items()}
    arr = np.asarray(table)
    if arr.ndim != 2:
        raise ValueError(f"{side} table: expected a mapping of columns or a 2-D array, got shape {arr.shape}")
    return {str(j): arr[:, j] for j in range(arr.shape[1])}


def check_dataset(reference: Any, current: Any, calibration: Calibration | None = None, *,
                  kinds: Mapping[str, str] | None = None) -> DatasetReport:
    """Fit on ``reference`` and score ``current`` in one call."""
    return DatasetDrift(calibration, kinds=kinds).fit(reference).score(current)
