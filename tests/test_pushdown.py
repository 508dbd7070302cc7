"""Push-down: ClickHouse's summaries and KS test against NumPy and SciPy on the same rows."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
from scipy import stats
from stethoscope.analytics import pushdown
from stethoscope.analytics.pushdown import PushDown, WindowSpec
from test_scheduler import COLUMNS, HOUR, NOW

from stethoscope.errors import ConfigError


def test_doctests():
    assert doctest.testmod(pushdown).failed == 0


def insert(store, start, end, x: np.ndarray, *, version="3", prefix="r") -> np.ndarray:
    """Rows of ``x`` (cast to Float32 as the table stores them) over [start, end); returns them as float64."""
    x32 = x.astype(np.float32)
    ts = np.linspace(start, end, x.shape[0], endpoint=False)
    lines = "\n".join(
        '{"Timestamp": "%.3f", "Model": "fraud", "ModelVersion": "%s", "Stream": "default", "Features": [%s], '
        '"FeatureNames": [], "Confidence": 0.9, "AdjustedCount": 1.0, "RequestId": "%s-%d", "Prediction": 0, '
        '"PredictionLabel": ""}' % (t, version, ", ".join(repr(float(v)) if np.isfinite(v) else "\"nan\"" for v in row), prefix, i)
        for i, (t, row) in enumerate(zip(ts, x32))
    )
    store.insert("samples", COLUMNS, (lines + "\n").encode(), fmt="JSONEachRow")
    return x32.astype(np.float64)


REF = WindowSpec("fraud", "3", "default", NOW - 2 * HOUR, NOW - HOUR)
CUR = WindowSpec("fraud", "3", "default", NOW - HOUR, NOW)


def test_ks_equals_scipy_on_the_same_rows(store):
    rng = np.random.default_rng(1)
    a = insert(store, REF.start, REF.end, np.column_stack([rng.normal(size=300), rng.exponential(size=300)]))
    b = insert(store, CUR.start, CUR.end, np.column_stack([rng.normal(0.2, 1, 400), rng.exponential(1.3, 400)]),
               prefix="c")
    pd = PushDown(store)
    exact = pd.ks(REF, CUR, method="exact")
    asymp = pd.ks(REF, CUR, method="asymp")
    assert [r.index for r in exact] == [0, 1] and (exact[0].n_reference, exact[0].n_current) == (300, 400)
    en = 300 * 400 / 700
    for j in range(2):
        ref = stats.ks_2samp(a[:, j], b[:, j], method="exact")
        assert exact[j].statistic == pytest.approx(ref.statistic, abs=1e-9)
        assert exact[j].p_value == pytest.approx(ref.pvalue, abs=1e-6)
        # 'asymp' is Kolmogorov's limit distribution, not SciPy's kstwo-based asymp
        assert asymp[j].p_value == pytest.approx(stats.kstwobign.sf(ref.statistic * np.sqrt(en)), abs=1e-6)
    assert exact[0].p_value < 0.05


def test_ks_on_a_large_window_matches_scipy(store):
    rng = np.random.default_rng(2)
    a = insert(store, REF.start, REF.end, rng.normal(size=(20000, 1)))
    b = insert(store, CUR.start, CUR.end, rng.normal(0.03, 1, (30000, 1)), prefix="c")
    (r,) = PushDown(store).ks(REF, CUR, method="asymp")
    ref = stats.ks_2samp(a[:, 0], b[:, 0])
    assert r.statistic == pytest.approx(ref.statistic, abs=1e-9)
    assert r.p_value == pytest.approx(stats.kstwobign.sf(ref.statistic * np.sqrt(20000 * 30000 / 50000)), abs=1e-6)
    assert r.p_value == pytest.approx(ref.pvalue, rel=0.05)  # and close to SciPy's own at this size


def test_ks_with_ties(store):
    rng = np.random.default_rng(3)
    a = insert(store, REF.start, REF.end, rng.poisson(3.0, (500, 1)).astype(float))
    b = insert(store, CUR.start, CUR.end, rng.poisson(3.4, (500, 1)).astype(float), prefix="c")
    (r,) = PushDown(store).ks(REF, CUR, method="exact")
    ref = stats.ks_2samp(a[:, 0], b[:, 0], method="exact")
    assert r.statistic == pytest.approx(ref.statistic, abs=1e-9)
    assert r.p_value == pytest.approx(ref.pvalue, abs=1e-6)


def test_summary_and_histograms_equal_numpy(store):
    rng = np.random.default_rng(4)
    x = np.column_stack([rng.normal(5, 2, 1000), rng.exponential(size=1000)])
    x[::100, 1] = np.nan
    got = insert(store, CUR.start, CUR.end, x)
    pd = PushDown(store)
    qs = (0.0, 0.1, 0.5, 0.9, 1.0)
    summary = pd.summary(CUR, qs)
    assert [s.index for s in summary] == [0, 1]
    for j, s in enumerate(summary):
        col = got[:, j][np.isfinite(got[:, j])]
        assert s.count == col.size
        assert s.mean == pytest.approx(col.mean(), rel=1e-9)
        assert s.std == pytest.approx(col.std(ddof=1), rel=1e-9)
        assert (s.min, s.max) == (col.min(), col.max())
        np.testing.assert_allclose(s.quantiles, np.quantile(col, qs), rtol=1e-12)
    edges = [[3.0, 5.0, 7.0], [0.5, 1.0]]
    counts = pd.histograms(CUR, edges)
    assert counts.shape == (2, 4)
    for j, e in enumerate(edges):
        col = got[:, j][np.isfinite(got[:, j])]
        want = np.bincount(np.searchsorted(e, col, side="right"), minlength=len(e) + 1)
        np.testing.assert_array_equal(counts[j, : len(e) + 1], want)


def test_sample_is_capped_deterministic_and_from_the_window(store):
    rng = np.random.default_rng(5)
    x = insert(store, CUR.start, CUR.end, rng.normal(size=(800, 2)))
    insert(store, REF.start, REF.end, rng.normal(10, 1, (300, 2)), prefix="old")
    pd = PushDown(store, max_rows=250)
    s1, s2 = pd.sample(CUR), pd.sample(CUR)
    assert s1.shape == (250, 2) and np.array_equal(s1, s2)
    rows = {tuple(r) for r in x}
    assert all(tuple(r) in rows for r in s1)
    assert abs(s1[:, 0].mean()) < 0.3  # a spread of the window, not the reference's rows
    assert pd.count(CUR) == 800 and PushDown(store).sample(CUR).shape == (800, 2)


def test_bad_arguments(store):
    with pytest.raises(ConfigError):
        PushDown(store, max_rows=0)
    pd = PushDown(store)
    with pytest.raises(ValueError, match="method"):
        pd.ks(REF, CUR, method="fast")
    with pytest.raises(ValueError, match="edges"):
        pd.histograms(CUR, [[2.0, 1.0]])
    with pytest.raises(ValueError, match="quantiles"):
        pd.summary(CUR, [1.5])
