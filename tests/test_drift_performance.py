"""Prediction drift, confidence CV, realized performance and shadow agreement."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
from scipy import stats

from stethoscope.analytics import performance
from stethoscope.analytics.detector import REGISTRY, BatchDetector
from stethoscope.analytics.performance import (
    ConfidenceCV,
    PerformanceDrop,
    PredictionDrift,
    ShadowAgreement,
    accuracy,
    f1,
    f1_macro,
    mae,
    roc_auc,
    sample_inputs,
)
from stethoscope.errors import ConfigError

NAMES = {"prediction_drift": "prediction", "confidence_cv": "confidence",
         "performance_drop": "performance", "shadow_agreement": "shadow"}


def test_docstring_examples_run() -> None:
    res = doctest.testmod(performance)
    assert res.attempted > 0 and res.failed == 0


@pytest.mark.parametrize("name", sorted(NAMES))
def test_registered_and_sample_inputs_null_vs_shifted(name: str) -> None:
    det = REGISTRY[name]()
    assert isinstance(det, BatchDetector) and det.kind == NAMES[name]
    for seed in range(5):
        rng = np.random.default_rng(seed)
        ref, cur = sample_inputs(name, rng, 1000)
        assert not REGISTRY[name]().fit(ref).score(cur).drifted
        ref, cur = sample_inputs(name, rng, 1000, shifted=True)
        assert REGISTRY[name]().fit(ref).score(cur).drifted


def test_roc_auc_equals_mann_whitney_with_ties() -> None:
    for seed in range(30):
        rng = np.random.default_rng(seed)
        n = int(rng.integers(5, 300))
        y = rng.integers(0, 2, n)
        y[:2] = [0, 1]
        score = rng.integers(0, 6, n) + 0.5 * y if seed % 2 else rng.normal(y * 0.5, 1.0)
        u = stats.mannwhitneyu(score[y == 1], score[y == 0]).statistic
        assert roc_auc(y, score) == pytest.approx(u / ((y == 1).sum() * (y == 0).sum()), abs=1e-12)
    assert np.isnan(roc_auc([1, 1], [0.2, 0.3]))
    assert roc_auc(["b", "a", "b"], [0.9, 0.1, 0.8], pos_label="b") == 1.0


def test_classification_and_regression_metrics() -> None:
    t = np.array([1, 1, 1, 0, 0, 2])
    p = np.array([1, 0, 1, 0, 1, 2])
    assert accuracy(t, p) == pytest.approx(4 / 6)
    # class 1: tp=2 fp=1 fn=1 -> 4/6
    assert f1(t, p) == pytest.approx(2 / 3)
    # class 0: tp=1 fp=1 fn=1 -> 0.5, class 2: 1.0
    assert f1_macro(t, p) == pytest.approx((2 / 3 + 0.5 + 1.0) / 3)
    assert f1([0, 0], [0, 0]) == 0.0
    assert mae([1.0, 3.0], [2.0, 1.0]) == pytest.approx(1.5)


def test_confidence_cv_rule_and_details() -> None:
    ref = np.array([0.9, 0.95, 0.85, 0.9])
    det = ConfidenceCV().fit(ref)
    assert det.cv_reference_ == pytest.approx(np.std(ref, ddof=1) / np.mean(ref))
    below = np.array([0.8, 0.9, 1.0, 0.9])  # CV ~0.09
    above = np.array([0.2, 0.9, 0.5, 0.95])  # CV ~0.56
    r_low, r_high = det.score(below), det.score(above)
    assert not r_low.drifted and r_high.drifted and r_high.p_value is None
    assert r_high.statistic == pytest.approx(np.std(above, ddof=1) / np.mean(above))
    assert r_high.details["cv_current"] == r_high.statistic
    assert r_high.details["cv_reference"] == pytest.approx(det.cv_reference_)
    assert r_high.threshold == 0.2
    # the rule is strictly "CV > threshold": just under and just over
    base = np.array([1.0, 1.0, 1.0, 1.0]) + np.array([-1.0, 1.0, -1.0, 1.0]) * 0.2 * np.sqrt(3) / 2
    exact = np.std(base, ddof=1) / np.mean(base)
    assert exact == pytest.approx(0.2)
    assert ConfidenceCV(threshold=exact + 1e-9).fit(ref).score(base).drifted is False
    assert ConfidenceCV(threshold=exact - 1e-9).fit(ref).score(base).drifted is True
    assert det.score([0.0, 0.0, np.nan]).statistic == np.inf


def test_performance_drop_metrics_and_significance() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 4000)

    def noisy(lab: np.ndarray, err: float) -> np.ndarray:
        return np.where(rng.random(lab.size) < err, 1 - lab, lab)

    ref = (y[:2000], noisy(y[:2000], 0.1))
    for metric in ("accuracy", "f1", "f1_macro"):
        det = PerformanceDrop(metric=metric).fit(ref)
        assert not det.score((y[2000:], noisy(y[2000:], 0.1))).drifted
        r = det.score((y[2000:], noisy(y[2000:], 0.25)))
        assert r.drifted and r.effect > 0.05 and r.p_value < 0.01
    # an ~11% relative drop (0.9 -> 0.8) on 20 labels is not significant
    few = y[:20].copy()
    few_pred = few.copy()
    few_pred[:2] = 1 - few_pred[:2]  # accuracy 0.9 ... and 0.8 with two more errors
    few_pred[2:4] = 1 - few_pred[2:4]
    small = PerformanceDrop().fit(ref).score((few, few_pred))
    assert small.effect > 0.05
    assert small.p_value > 0.05 and not small.drifted
    # MAE: higher is worse
    t = rng.normal(size=1000)
    det = PerformanceDrop(metric="mae").fit((t, t + rng.normal(0, 1.0, 1000)))
    worse = det.score((t, t + rng.normal(0, 1.5, 1000)))
    assert worse.drifted and worse.details["current_metric"] > worse.details["reference_metric"]
    assert not det.score((t, t + rng.normal(0, 0.5, 1000))).drifted  # better is no alert


def test_performance_drop_roc_auc_needs_scores() -> None:
    rng = np.random.default_rng(1)
    ref, cur = sample_inputs("performance_drop", rng, 1000, shifted=True)
    det = PerformanceDrop(metric="roc_auc").fit(ref)
    r = det.score(cur)
    assert r.details["reference_metric"] == pytest.approx(roc_auc(ref[0], ref[2]))
    assert r.drifted
    with pytest.raises(ValueError):
        det.score(cur[:2])
    with pytest.raises(ValueError):
        det.score((np.zeros(3), np.zeros(4), np.zeros(3)))


def test_prediction_drift_numeric_matches_scipy_and_classes_use_chi2() -> None:
    rng = np.random.default_rng(0)
    ref, cur = rng.normal(size=500), rng.normal(0.3, 1.0, 400)
    r = PredictionDrift().fit(ref).score(cur)
    ks = stats.ks_2samp(ref, cur)
    assert r.details["test"] == "ks" and r.statistic == pytest.approx(ks.statistic)
    assert r.p_value == pytest.approx(ks.pvalue) and r.drifted
    ref_c = np.array(["cat"] * 600 + ["dog"] * 400)
    cur_c = np.array(["cat"] * 450 + ["dog"] * 450 + ["emu"] * 100)
    rc = PredictionDrift().fit(ref_c).score(cur_c)
    table = np.array([[600, 400, 0], [450, 450, 100]])
    chi2 = stats.chi2_contingency(table, correction=False)
    assert rc.details["test"] == "chi2" and rc.statistic == pytest.approx(chi2.statistic)
    assert rc.effect == pytest.approx(0.5 * (0.15 + 0.05 + 0.1)) and rc.drifted
    forced = PredictionDrift(mode="class").fit(np.r_[np.zeros(50), np.ones(50)]).score(np.r_[np.zeros(50), np.ones(50)])
    assert forced.details["test"] == "chi2" and not forced.drifted


def test_shadow_agreement_join_and_counts() -> None:
    det = ShadowAgreement().fit((np.array(["a", "b", "c", "d", "d"]), np.array([1, 0, 1, 1, 0])))
    r = det.score((np.array(["d", "c", "x", "y", "b"]), np.array([1, 1, 0, 0, 1])))
    # joined: b (0 vs 1), c (1 vs 1), d (first row wins: 1 vs 1)
    assert r.details["joined"] == 3 and r.statistic == pytest.approx(2 / 3)
    assert r.details["only_reference"] == 1 and r.details["only_current"] == 2
    assert r.details["duplicates"] == 1 and r.drifted and r.effect == pytest.approx(1 / 3)
    numeric = ShadowAgreement(tolerance=0.01).fit(np.array([0.5, 0.7, 0.9]))
    assert numeric.score(np.array([0.505, 0.7, 0.95])).statistic == pytest.approx(2 / 3)
    for empty in ((np.array([]), np.array([])), (np.array([1, 2]), np.array([None, None], dtype=object))):
        with pytest.raises(ValueError):
            ShadowAgreement().fit(empty)
    none = ShadowAgreement().fit((np.array([1, 2]), np.array([0, 1]))).score((np.array([3, 4]), np.array([0, 1])))
    assert none.details["joined"] == 0 and np.isnan(none.statistic) and not none.drifted


def test_bad_values_dropped_and_config_errors() -> None:
    det = PredictionDrift().fit(np.array([0.1, np.nan, 0.2, 0.3, np.inf]))
    r = det.score(np.array([0.1, 0.2, None, 0.4], dtype=object))
    assert r.details["n_dropped"] == 3
    perf = PerformanceDrop().fit((np.array([1, 0, 1, 1]), np.array([1.0, np.nan, 1.0, 0.0])))
    assert perf.reference_metric_ == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        PredictionDrift().fit(np.zeros((3, 2)))
    with pytest.raises(ConfigError) as err:
        PerformanceDrop(metric="r2", max_drop=-1, alpha=0, n_permutations=0)
    assert len(err.value.problems) == 4
    with pytest.raises(ConfigError):
        ConfidenceCV(threshold=0)
