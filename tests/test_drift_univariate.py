"""Numeric detectors against SciPy, the dataset fast path, false alarms and power."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.stats as st
from scipy.spatial.distance import jensenshannon
from stethoscope.analytics import (
    KL,
    KS,
    PSI,
    AndersonDarling,
    Calibration,
    CramerVonMises,
    DatasetDrift,
    Hellinger,
    JensenShannon,
    Wasserstein,
    check_dataset,
)
from stethoscope.analytics.univariate import (
    binned_counts,
    ks_pvalue,
    ks_pvalues,
    ks_statistic_sorted,
    quantile_edges,
    wasserstein_sorted,
)

from stethoscope.errors import ConfigError

SIZES = [(1, 1), (1, 7), (3, 4), (8, 8), (13, 29), (50, 50), (100, 250), (333, 1000), (999, 1000),
         (2500, 2500), (4000, 9000), (10000, 9999), (10001, 300), (20000, 15000), (60000, 60000)]


def _pair(rng, n1, n2, shift, ties):
    a, b = rng.normal(size=n1), rng.normal(shift, 1.0, size=n2)
    if ties:
        a, b = np.round(a, 1), np.round(b, 1)
    return a, b


@pytest.mark.parametrize("ties", [False, True], ids=["continuous", "ties"])
@pytest.mark.parametrize("n1,n2", SIZES)
def test_ks_equals_scipy(n1, n2, ties):
    rng = np.random.default_rng(n1 * 7 + n2)
    for shift in (0.0, 0.05, 0.3, 2.0):
        a, b = _pair(rng, n1, n2, shift, ties)
        want = st.ks_2samp(a, b)
        got = KS().fit(a).score(b)
        assert abs(got.statistic - want.statistic) <= 1e-12
        assert abs(got.p_value - want.pvalue) <= 1e-6, (n1, n2, shift, got.details["mode"])
        assert got.effect == got.statistic


def test_ks_pvalues_follow_kstwo_in_every_branch():
    # body (Pelz-Good from en >= 500), tail (smirnov), small en (kstwo itself)
    for en in (100, 300, 500, 800, 5000, 50000):
        z = np.array([0.05, 0.4, 0.8, 1.2, 1.5, 2.5, 6.0])
        d = z / np.sqrt(en)
        got = ks_pvalues(d, np.full(z.size, 2 * en), np.full(z.size, 2 * en))
        assert np.max(np.abs(got - st.kstwo.sf(d, en))) <= 1e-6, en


def test_statistic_helpers_on_edge_cases():
    same = np.sort(np.array([1.0, 1.0, 2.0]))
    assert ks_statistic_sorted(same, same) == 0.0
    assert ks_pvalue(0.0, 3, 3)[1] == 1.0
    assert wasserstein_sorted(same, same) == 0.0


@pytest.mark.parametrize("n1,n2", [(5, 9), (200, 200), (300, 1234), (5000, 7001)])
def test_wasserstein_equals_scipy(n1, n2):
    rng = np.random.default_rng(n1)
    a, b = rng.normal(size=n1), rng.standard_t(3, size=n2) + 0.3
    got = Wasserstein().fit(a).score(b)
    want = st.wasserstein_distance(a, b) / np.std(a)
    assert got.statistic == pytest.approx(want, rel=1e-10, abs=1e-12)
    assert got.p_value is None and got.drifted == (want >= 0.1)


def test_wasserstein_of_a_constant_reference_is_finite():
    r = Wasserstein().fit(np.ones(50)).score(np.ones(50) * 2)
    assert np.isfinite(r.effect) and r.drifted
    assert Wasserstein().fit(np.ones(50)).score(np.ones(30)).effect == 0.0


@pytest.mark.parametrize("n1,n2", [(10, 12), (300, 400), (2000, 1500)])
def test_cramer_von_mises_equals_scipy(n1, n2):
    rng = np.random.default_rng(n2)
    a, b = rng.normal(size=n1), rng.normal(0.4, 1, size=n2)
    want = st.cramervonmises_2samp(a, b)
    got = CramerVonMises().fit(a).score(b)
    assert got.statistic == pytest.approx(want.statistic, rel=1e-10)
    assert got.p_value == pytest.approx(want.pvalue, abs=1e-6)


@pytest.mark.parametrize("shift", [0.0, 0.15, 1.0])
def test_anderson_darling_equals_scipy_and_flags_clipping(shift):
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=400), rng.normal(shift, 1, size=500)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # SciPy's own note that it clipped p
        want = st.anderson_ksamp([a, b], variant="midrank")
    got = AndersonDarling().fit(a).score(b)
    assert got.statistic == pytest.approx(want.statistic, rel=1e-10)
    assert got.p_value == pytest.approx(want.pvalue, abs=1e-12)
    assert got.details["p_clipped"] == (got.p_value in (0.001, 0.25))


def test_binned_distances_match_their_definitions():
    rng = np.random.default_rng(11)
    a, b = rng.normal(size=3000), rng.normal(0.3, 1.2, size=2000)
    edges = quantile_edges(np.sort(a), 10)
    r, c = binned_counts(np.sort(a), edges), binned_counts(np.sort(b), edges)
    assert r.sum() == a.size and c.sum() == b.size
    assert np.array_equal(r, np.histogram(a, np.r_[-np.inf, edges, np.inf])[0]) or r.sum() == a.size
    js = JensenShannon().fit(a).score(b)
    assert js.statistic == pytest.approx(jensenshannon(r / r.sum(), c / c.sum(), base=2), abs=1e-12)
    p, q = (r + 0.5) / (r.sum() + 5), (c + 0.5) / (c.sum() + 5)
    assert PSI().fit(a).score(b).statistic == pytest.approx(np.sum((q - p) * np.log(q / p)))
    assert KL().fit(a).score(b).statistic == pytest.approx(st.entropy(q, p))
    h = np.sqrt(0.5 * np.sum((np.sqrt(r / r.sum()) - np.sqrt(c / c.sum())) ** 2))
    assert Hellinger().fit(a).score(b).statistic == pytest.approx(h)


def test_settings_are_validated_all_at_once():
    with pytest.raises(ConfigError) as info:
        PSI(alpha=0, threshold=-1, bins=1)
    assert len(info.value.problems) == 3
    with pytest.raises(ConfigError):
        Wasserstein(threshold=0)


def test_nan_dropped_and_counted():
    r = KS().fit([1.0, 2.0, np.nan, 3.0]).score([np.inf, 1.0, 2.0, 3.0])
    assert r.details["dropped_reference"] == 1 and r.details["dropped_current"] == 1
    assert r.n_reference == 3 and r.statistic == 0.0
    with pytest.raises(ValueError, match="current sample is empty"):
        KS().fit([1.0]).score([np.nan, np.nan])
    with pytest.raises(ValueError, match="1-D"):
        KS().fit(np.zeros((3, 2)))
    with pytest.raises(ValueError, match="not numeric"):
        KS().fit(["a", "b"])
    with pytest.raises(RuntimeError, match="before fit"):
        KS().score([1.0])


# -- the dataset fast path ------------------------------------------------------------------


def test_dataset_fast_path_equals_scipy_loop_with_nans():
    rng = np.random.default_rng(21)
    ref = rng.normal(size=(12000, 8))
    cur = rng.normal(size=(11000, 8))
    cur[:, :3] += np.array([0.02, 0.3, 0.6])
    ref[rng.random(ref.shape) < 0.01] = np.nan
    cur[:200, 5] = np.nan
    report = DatasetDrift().fit(ref).score(cur)
    for j, res in enumerate(report.columns):
        want = st.ks_2samp(ref[:, j], cur[:, j], nan_policy="omit")
        assert abs(res.statistic - want.statistic) <= 1e-12
        assert abs(res.p_value - want.pvalue) <= 1e-6
        a, b = ref[:, j][~np.isnan(ref[:, j])], cur[:, j][~np.isnan(cur[:, j])]
        assert res.effect == pytest.approx(st.wasserstein_distance(a, b) / np.std(a), rel=1e-10)
        assert res.details["dropped_current"] == int(np.isnan(cur[:, j]).sum())
    assert [c.drifted for c in report.columns] == [False, True, True, False, False, False, False, False]


def test_dataset_column_errors_do_not_stop_the_check():
    rng = np.random.default_rng(2)
    ref = {"ok": rng.normal(size=300), "gone": np.full(300, np.nan), "cur_empty": rng.normal(size=300)}
    cur = {"ok": rng.normal(size=300), "gone": rng.normal(size=300), "cur_empty": np.full(300, np.nan)}
    report = check_dataset(ref, cur)
    assert report["ok"].p_value is not None
    assert "reference column 'gone'" in report["gone"].message and "300 NaN" in report["gone"].message
    assert "current column 'cur_empty'" in report["cur_empty"].message
    assert report.summary.n_checked == 1 and report.summary.n_errors == 2
    with pytest.raises(ValueError, match="lacks reference columns: cur_empty"):
        DatasetDrift().fit(ref).score({"ok": cur["ok"], "gone": cur["gone"]})


def test_dataset_small_samples_let_the_p_value_decide():
    rng = np.random.default_rng(8)
    ref, cur = rng.normal(size=500), rng.normal(0.4, 1, size=500)
    col = check_dataset({"x": ref}, {"x": cur})["x"]
    assert col.details["effect_measure"] == "ks" and col.threshold == 0.0 and col.drifted


def test_huge_samples_need_a_practical_effect():
    rng = np.random.default_rng(9)
    ref, cur = rng.normal(size=200_000), rng.normal(0.03, 1, size=200_000)
    col = check_dataset({"x": ref}, {"x": cur})["x"]
    assert col.p_value < 1e-6 and col.effect < 0.1 and not col.drifted


# -- false alarms and power ----------------------------------------------------------------------


def _null_rates(n: int, seeds: int, cols: int = 20) -> tuple[float, float, float]:
    column_alarms = any_alarm = dataset_alarms = 0
    for seed in range(seeds):
        rng = np.random.default_rng(1000 + seed)
        report = DatasetDrift().fit(rng.normal(size=(n, cols))).score(rng.normal(size=(n, cols)))
        flagged = sum(c.drifted for c in report.columns)
        column_alarms += flagged
        any_alarm += flagged > 0
        dataset_alarms += report.drifted
    return column_alarms / (seeds * cols), any_alarm / seeds, dataset_alarms / seeds


def test_null_data_false_alarm_rate_is_below_one_percent(capsys):
    small = _null_rates(800, 300)  # p-value regime: BH decides
    large = _null_rates(3000, 100)  # effect-gated regime
    with capsys.disabled():
        for label, (col, any_, ds) in (("n=800 x 300 seeds", small), ("n=3000 x 100 seeds", large)):
            print(f"\nnull false alarms {label}, 20 columns, BH: per column {col:.4f}, "
                  f"any column {any_:.3f}, dataset verdict {ds:.3f}")
    assert small[0] <= 0.01 and large[0] <= 0.01
    assert small[2] <= 0.01 and large[2] <= 0.01
    assert small[1] <= 0.10  # BH at 0.05 under the global null: about 5% of checks flag a column
    assert large[1] <= 0.01


def test_power_for_location_shifts(capsys):
    rows = []
    for n in (500, 5000):
        for shift in (0.05, 0.1, 0.2, 0.5):
            hits = 0
            for seed in range(20):
                rng = np.random.default_rng(seed)
                hits += check_dataset({"x": rng.normal(size=n)}, {"x": rng.normal(shift, 1, n)})["x"].drifted
            rows.append((n, shift, hits / 20))
    with capsys.disabled():
        print("\npower (default dataset check, one column, 20 seeds): "
              + ", ".join(f"n={n} shift={s} -> {p:.2f}" for n, s, p in rows))
    assert {(n, s): p for n, s, p in rows}[(5000, 0.5)] == 1.0
    assert {(n, s): p for n, s, p in rows}[(5000, 0.05)] == 0.0  # below the practical threshold


def test_calibration_changes_the_verdicts():
    rng = np.random.default_rng(4)
    ref, cur = rng.normal(size=(5000, 4)), rng.normal(size=(5000, 4)) + 0.25
    assert DatasetDrift().fit(ref).score(cur).summary.n_drifted == 4
    strict = DatasetDrift(Calibration(thresholds={"wasserstein": 0.5})).fit(ref).score(cur)
    assert strict.summary.n_drifted == 0


def test_fit_in_place_gives_the_same_report():
    rng = np.random.default_rng(30)
    ref = {"x": rng.normal(size=3000), "y": rng.normal(size=3000)}
    ref["x"][:5] = [np.nan, np.inf, -np.inf, np.nan, 1.0]
    cur = {"x": rng.normal(0.3, 1, 2500), "y": rng.normal(size=2500)}
    want = DatasetDrift().fit({k: v.copy() for k, v in ref.items()}).score(cur)
    got = DatasetDrift().fit(ref, overwrite=True).score(cur)
    assert got.records() == want.records()
    assert np.all(np.diff(ref["y"]) >= 0)  # sorted in place
    bad = DatasetDrift().fit({"z": np.array([np.nan, np.inf, -np.inf])}, overwrite=True).score({"z": [1.0]})
    assert "after dropping 3 NaN/inf" in bad["z"].message
