"""Push-down: drift summaries computed inside ClickHouse, so only summaries move to Python.

Over a window of ``samples`` (one ``(Model, ModelVersion, Stream)`` and a time
range, :class:`WindowSpec`), :class:`PushDown` asks the store for

* :meth:`PushDown.summary`: per feature the count of finite values, mean,
  standard deviation, min, max and quantiles (``quantilesExactInclusive``, the
  same linear interpolation as NumPy's default ``np.quantile``);
* :meth:`PushDown.histograms`: per feature the counts in given bins (edges per
  feature, counted with ``arrayCount(e -> e <= v, edges)``: bin 0 is below the
  first edge, bin ``k`` is ``[e_{k-1}, e_k)``, the last bin is at or above the last
  edge), ready for PSI / JS / Hellinger in Python;
* :meth:`PushDown.ks`: per feature ClickHouse's two-sample
  ``kolmogorovSmirnovTest('two-sided', method)(value, sample_index)`` between two
  windows, one query for all features (``ARRAY JOIN`` over the feature vector);
* :meth:`PushDown.sample`: the window's rows themselves, capped at ``max_rows`` by
  a deterministic pseudo-random choice in SQL (``ORDER BY cityHash64(RequestId,
  Timestamp) LIMIT max_rows``), for the exact tests that need rows.

ClickHouse's KS test (checked against SciPy 1.17 on chDB 4.4 in
``tests/test_pushdown.py``): the statistic is the same ``D = sup |F - G|``
(within 1e-12; it is accumulated in floating point); ``method='exact'``
gives SciPy's ``ks_2samp(method="exact")`` p-value, and ``method='asymp'`` gives
Kolmogorov's limiting distribution ``kstwobign.sf(D sqrt(n m / (n + m)))``,
which is **not** SciPy's ``ks_2samp(method="asymp")`` (that one uses ``kstwo.sf(D,
round(n m / (n + m)))``, the finite-n distribution; the two differ by up to a
about 10% of p for windows of a few hundred rows and converge as
they grow). ``'auto'`` picks exact for small samples. :meth:`PushDown.ks` returns
the method it used in each result. Non-finite feature values are left out
(``isFinite``) everywhere, as the Python detectors drop them.

Examples
--------
>>> WindowSpec("fraud", "3", "default", 0.0, 3600.0).where()
"Model = 'fraud' AND ModelVersion = '3' AND Stream = 'default' AND Timestamp >= fromUnixTimestamp64Milli(toInt64(0)) AND Timestamp < fromUnixTimestamp64Milli(toInt64(3600000))"
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from stethoscope.errors import ConfigError

from .sql import literal as _lit
from .sql import ts_ms as _ts

__all__ = ["KS_METHODS", "SAMPLE_ORDER", "FeatureSummary", "PushDown", "PushKS", "WindowSpec"]

#: ``computation_method`` values of ClickHouse's ``kolmogorovSmirnovTest``.
KS_METHODS = ("exact", "asymp", "auto")
#: Row order for capped reads: a deterministic pseudo-random permutation of a window.
SAMPLE_ORDER = "cityHash64(RequestId, toUnixTimestamp64Nano(Timestamp))"


@dataclass(frozen=True)
class WindowSpec:
    """Rows of one model stream in ``[start, end)``."""

    model: str
    version: str
    stream: str
    start: float
    end: float

    def where(self) -> str:
        return " AND ".join((f"Model = {_lit(self.model)}", f"ModelVersion = {_lit(self.version)}",
                             f"Stream = {_lit(self.stream)}", f"Timestamp >= {_ts(self.start)}",
                             f"Timestamp < {_ts(self.end)}"))


@dataclass(frozen=True)
class FeatureSummary:
    """One feature of a window, as ClickHouse summarised it (index is 0-based)."""

    index: int
    count: int
    mean: float
    std: float
    min: float
    max: float
    quantiles: tuple[float, ...]


@dataclass(frozen=True)
class PushKS:
    """ClickHouse's two-sample KS result for one feature."""

    index: int
    statistic: float
    p_value: float
    n_reference: int
    n_current: int
    method: str


class PushDown:
    """Summaries of ``samples`` windows computed in the store (see the module docstring)."""

    def __init__(self, store: Any, *, max_rows: int = 100_000) -> None:
        if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
            raise ConfigError([f"max_rows: must be an integer >= 1, got {max_rows!r}"])
        self.store = store
        self.max_rows = max_rows

    def _rows(self, sql: str) -> list[list[Any]]:
        data = self.store.query(sql + " FORMAT JSONCompactEachRow", "JSONCompactEachRow").data
        return [json.loads(line) for line in data.splitlines() if line.strip()]

    def count(self, window: WindowSpec) -> int:
        """Rows in the window."""
        return int(self._rows(f"SELECT count() FROM samples WHERE {window.where()}")[0][0])

    def summary(self, window: WindowSpec, quantiles: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0)) -> list[FeatureSummary]:
        """Per-feature count, mean, std (n - 1), min, max and exact quantiles, one query."""
        qs = [float(q) for q in quantiles]
        if not qs or any(not 0.0 <= q <= 1.0 for q in qs):
            raise ValueError(f"quantiles: need levels in [0, 1], got {list(quantiles)!r}")
        rows = self._rows(
            f"SELECT j, count(), avg(v), stddevSamp(v), min(v), max(v), "
            f"quantilesExactInclusive({', '.join(repr(q) for q in qs)})(v) "
            f"FROM samples ARRAY JOIN arrayMap(x -> toFloat64(x), Features) AS v, arrayEnumerate(Features) AS j "
            f"WHERE {window.where()} AND isFinite(v) GROUP BY j ORDER BY j"
        )
        return [FeatureSummary(int(j) - 1, int(n), _f(mean), _f(std), _f(lo), _f(hi), tuple(_f(x) for x in q))
                for j, n, mean, std, lo, hi, q in rows]

    def histograms(self, window: WindowSpec, edges: Sequence[Sequence[float]]) -> np.ndarray:
        """Counts per feature and bin: ``len(edges) x (k + 1)`` for ``k`` edges per feature.

        ``edges[j]`` must be sorted; features beyond ``len(edges)`` are ignored.
        """
        e = [[float(x) for x in row] for row in edges]
        if not e or any(len(row) == 0 or any(not math.isfinite(x) for x in row) or row != sorted(row) for row in e):
            raise ValueError("edges: need one sorted, finite, non-empty list of edges per feature")
        k = max(len(row) for row in e)
        literal = "[" + ", ".join("[" + ", ".join(repr(x) for x in row) + "]" for row in e) + "]"
        rows = self._rows(
            f"SELECT j, toUInt32(arrayCount(x -> x <= v, arrayElement({literal}, j))) AS bin, count() "
            f"FROM samples ARRAY JOIN arrayMap(x -> toFloat64(x), Features) AS v, arrayEnumerate(Features) AS j "
            f"WHERE {window.where()} AND isFinite(v) AND j <= {len(e)} GROUP BY j, bin"
        )
        out = np.zeros((len(e), k + 1), dtype=np.int64)
        for j, b, n in rows:
            out[int(j) - 1, int(b)] += int(n)
        return out

    def ks(self, reference: WindowSpec, current: WindowSpec, method: str = "asymp") -> list[PushKS]:
        """ClickHouse's two-sided KS test per feature between two windows (features present in both)."""
        if method not in KS_METHODS:
            raise ValueError(f"method: must be one of {KS_METHODS}, got {method!r}")
        cur = current.where()
        rows = self._rows(
            f"SELECT j, kolmogorovSmirnovTest('two-sided', {_lit(method)})(v, g), countIf(g = 0), countIf(g = 1) "
            f"FROM (SELECT Features, toUInt8({cur}) AS g FROM samples WHERE ({reference.where()}) OR ({cur})) "
            f"ARRAY JOIN arrayMap(x -> toFloat64(x), Features) AS v, arrayEnumerate(Features) AS j WHERE isFinite(v) "
            f"GROUP BY j HAVING countIf(g = 0) > 0 AND countIf(g = 1) > 0 ORDER BY j"
        )
        out = []
        for j, res, n_ref, n_cur in rows:
            d, p = (res["d_statistic"], res["p_value"]) if isinstance(res, dict) else res
            d = 0.0 if float(d) < 1e-300 else float(d)  # ClickHouse reports no difference as the smallest double
            out.append(PushKS(int(j) - 1, d, float(p), int(n_ref), int(n_cur), method))
        return out

    def sample(self, window: WindowSpec) -> np.ndarray:
        """Up to ``max_rows`` feature rows of the window (float64 ``n x d``; rows of another width left out)."""
        rows = self._rows(f"SELECT arrayMap(x -> toFloat64(x), Features) FROM samples WHERE {window.where()} "
                          f"ORDER BY {SAMPLE_ORDER} LIMIT {self.max_rows}")
        if not rows:
            return np.empty((0, 0))
        d = len(rows[0][0])
        return np.array([[_f(x) for x in r[0]] for r in rows if len(r[0]) == d], dtype=np.float64).reshape(-1, d)


def _f(x: Any) -> float:
    return math.nan if x is None else float(x)
