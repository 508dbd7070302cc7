"""Categorical detectors against SciPy, unseen categories, missing labels."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats as st
from scipy.spatial.distance import jensenshannon
from stethoscope.analytics import (
    CategoricalJensenShannon,
    CategoricalPSI,
    Chi2,
    FisherExact,
    GTest,
    TotalVariation,
    check_dataset,
)
from stethoscope.analytics.categorical import chi2_table, contingency, cramers_v


def _labels(rng, n, shares, cats="abcde"):
    shares = np.asarray(shares, dtype=float)
    return rng.choice(list(cats[: shares.size]), n, p=shares / shares.sum())


def _table(ref, cur):
    cats = sorted(set(ref) | set(cur))
    return np.array([[np.sum(ref == c) for c in cats], [np.sum(cur == c) for c in cats]])


@pytest.mark.parametrize("k", [2, 3, 5])
@pytest.mark.parametrize("n", [40, 400, 5000])
def test_chi2_and_g_equal_scipy(k, n):
    rng = np.random.default_rng(n + k)
    ref = _labels(rng, n, np.arange(1, k + 1))
    cur = _labels(rng, n // 2 + 3, np.arange(k, 0, -1) + 2)
    table = _table(ref, cur)
    for lam, det in ((None, Chi2()), ("log-likelihood", GTest())):
        want = st.chi2_contingency(table, lambda_=lam)
        got = det.fit(ref).score(cur)
        assert got.statistic == pytest.approx(want.statistic, rel=1e-10, abs=1e-12)
        assert abs(got.p_value - want.pvalue) <= 1e-10
        chi2_plain = st.chi2_contingency(table, correction=False).statistic
        assert got.effect == pytest.approx(np.sqrt(chi2_plain / table.sum()))


@pytest.mark.parametrize("seed", range(6))
def test_fisher_equals_scipy(seed):
    rng = np.random.default_rng(seed)
    n1, n2 = rng.integers(5, 60, size=2)
    ref = _labels(rng, n1, [rng.random() + 0.05, 1])
    cur = _labels(rng, n2, [rng.random() + 0.05, 1])
    got = FisherExact().fit(ref).score(cur)
    want = st.fisher_exact(_table(ref, cur).T)
    assert got.p_value == pytest.approx(want.pvalue, abs=1e-12)
    if np.isfinite(want.statistic) and want.statistic > 0:
        assert got.statistic == pytest.approx(want.statistic)


def test_fisher_zero_cell_reports_a_finite_odds_ratio():
    r = FisherExact().fit(["a"] * 20).score(["a"] * 10 + ["b"] * 10)
    assert np.isfinite(r.statistic) and r.details["haldane"] and r.drifted
    with pytest.raises(ValueError, match="at most 2 categories"):
        FisherExact().fit(["a", "b", "c"]).score(["a"])


def test_distances_equal_definitions():
    rng = np.random.default_rng(3)
    ref, cur = _labels(rng, 3000, [5, 3, 2]), _labels(rng, 2000, [2, 3, 5])
    t = _table(ref, cur).astype(float)
    p, q = t[0] / t[0].sum(), t[1] / t[1].sum()
    assert TotalVariation().fit(ref).score(cur).statistic == pytest.approx(0.5 * np.abs(p - q).sum())
    js = CategoricalJensenShannon().fit(ref).score(cur).statistic
    assert js == pytest.approx(jensenshannon(p, q, base=2), abs=1e-12)
    ps, qs = (t[0] + 0.5) / (t[0].sum() + 1.5), (t[1] + 0.5) / (t[1].sum() + 1.5)
    assert CategoricalPSI().fit(ref).score(cur).statistic == pytest.approx(np.sum((qs - ps) * np.log(qs / ps)))


def test_unseen_categories_are_kept_and_reported():
    ref = np.array(["a"] * 50 + ["b"] * 50)
    cur = np.array(["a"] * 40 + ["b"] * 40 + ["z"] * 20)
    r = Chi2().fit(ref).score(cur)
    assert r.details["unseen"] == ["z"] and r.details["unseen_share"] == pytest.approx(0.2)
    assert r.details["categories"] == 3 and r.drifted
    want = st.chi2_contingency(np.array([[50, 50, 0], [40, 40, 20]]))
    assert r.statistic == pytest.approx(want.statistic)
    assert np.isfinite(CategoricalPSI().fit(ref).score(cur).statistic)


def test_missing_labels_are_dropped_and_counted():
    r = Chi2().fit(np.array(["a", None, "b", float("nan")], dtype=object)).score(["a", "b", "b"])
    assert r.details["dropped_reference"] == 2 and r.n_reference == 2
    with pytest.raises(ValueError, match="all 2 values are missing"):
        Chi2().fit(["a"]).score(np.array([None, None], dtype=object))
    with pytest.raises(ValueError, match="current sample is empty"):
        Chi2().fit(["a"]).score([])


def test_one_category_everywhere_is_not_drift():
    r = Chi2().fit(["a"] * 10).score(["a"] * 30)
    assert r.statistic == 0.0 and r.p_value == 1.0 and not r.drifted
    stat, p, dof = chi2_table(np.array([[5.0], [7.0]]))
    assert (stat, p, dof) == (0.0, 1.0, 0)
    assert cramers_v(contingency({"a": 3}, {"a": 3})[1]) == 0.0


def test_dataset_picks_fisher_for_small_binary_and_chi2_otherwise():
    rng = np.random.default_rng(12)
    ref = {"flag": rng.choice([True, False], 300), "color": _labels(rng, 300, [1, 1, 1]),
           "big": _labels(rng, 4000, [1, 1, 1])}
    cur = {"flag": rng.choice([True, False], 300), "color": _labels(rng, 300, [1, 1, 1]),
           "big": _labels(rng, 4000, [1, 1, 1.6])}
    ref["big"], cur["big"] = ref["big"][:4000], cur["big"][:4000]
    report = check_dataset(ref, cur)
    assert report["flag"].method == "fisher_exact" and report["flag"].threshold == 0.0
    assert report["color"].method == "chi2" and report["color"].threshold == 0.0
    big = report["big"]
    assert big.method == "chi2" and big.threshold == 0.1 and big.details["effect_gate"]
    assert big.p_value < 1e-6 and big.drifted == (big.effect >= 0.1)
