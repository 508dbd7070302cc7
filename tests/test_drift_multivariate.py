"""Multivariate and embedding drift: MMD ground truth, calibration, classifier, PCA, means."""

from __future__ import annotations

import doctest

import numpy as np
import pytest

from stethoscope.analytics import multivariate
from stethoscope.analytics.detector import REGISTRY, BatchDetector, DriftResult
from stethoscope.analytics.multivariate import (
    MMD,
    DomainClassifier,
    MeanEmbeddingDistance,
    PCAReconstruction,
    median_bandwidth,
    mmd2_unbiased,
)
from stethoscope.errors import ConfigError


def test_docstring_examples_run() -> None:
    res = doctest.testmod(multivariate)
    assert res.attempted > 0 and res.failed == 0


def test_registered_with_kinds() -> None:
    kinds = {"mmd": "multivariate", "domain_classifier": "multivariate",
             "pca_reconstruction": "multivariate", "mean_embedding": "embedding"}
    for name, kind in kinds.items():
        det = REGISTRY[name]()
        assert isinstance(det, BatchDetector) and det.name == name and det.kind == kind


def test_exact_mmd_equals_direct_quadratic_computation() -> None:
    for seed in range(5):
        rng = np.random.default_rng(seed)
        x, y = rng.normal(size=(60, 3)), rng.normal(0.4, 1.2, size=(45, 3))
        det = MMD(method="exact", n_permutations=20, seed=seed).fit(x)
        # the bandwidth is the median pairwise distance of the reference
        d = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))[np.triu_indices(60, 1)]
        assert det.bandwidth_ == pytest.approx(float(np.median(d)))
        r = det.score(y)
        assert r.statistic == pytest.approx(mmd2_unbiased(x, y, det.bandwidth_), abs=1e-12)
        # the direct formula, written out with loops over pairs
        k = lambda a, b: np.exp(-np.sum((a - b) ** 2) / (2 * det.bandwidth_**2))  # noqa: E731
        n, m = len(x), len(y)
        kxx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
        kyy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
        kxy = sum(k(a, b) for a in x for b in y) / (n * m)
        assert r.statistic == pytest.approx(kxx + kyy - 2 * kxy, abs=1e-12)


@pytest.mark.parametrize("shift", [0.0, 0.3, 1.0])
def test_random_features_approximate_exact_mmd(shift: float) -> None:
    for seed in range(6):
        rng = np.random.default_rng(seed)
        x, y = rng.normal(size=(200, 5)), rng.normal(shift, 1.0, size=(200, 5))
        exact = MMD(method="exact", n_permutations=10, seed=seed).fit(x).score(y).statistic
        approx = MMD(method="rff", n_permutations=10, seed=seed).fit(x).score(y).statistic
        assert abs(approx - exact) <= 0.15 * abs(exact) + 0.002


@pytest.mark.parametrize("method,n,trials", [("exact", 30, 300), ("rff", 60, 200)])
def test_permutation_p_value_is_calibrated_on_null_data(method: str, n: int, trials: int) -> None:
    p_values = []
    for seed in range(trials):
        rng = np.random.default_rng(seed)
        det = MMD(method=method, n_permutations=99, n_features=64, seed=seed)
        p_values.append(det.fit(rng.normal(size=(n, 3))).score(rng.normal(size=(n, 3))).p_value)
    p = np.array(p_values)
    assert 0.01 <= float(np.mean(p < 0.05)) <= 0.10
    assert 0.10 <= float(np.mean(p < 0.20)) <= 0.30  # roughly uniform, not just at 5%


def test_mmd_auto_switches_to_features_on_large_samples_and_detects() -> None:
    rng = np.random.default_rng(0)
    det = MMD(n_permutations=200).fit(rng.normal(size=(1500, 8)))
    null, shifted = det.score(rng.normal(size=(1500, 8))), det.score(rng.normal(0.2, 1.0, size=(1500, 8)))
    assert null.details["computation"] == shifted.details["computation"] == "rff"
    assert not null.drifted and shifted.drifted and shifted.p_value < 0.01
    assert det.score(rng.normal(size=(100, 8))).details["computation"] == "exact"


def test_results_are_deterministic_given_seed() -> None:
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(300, 4)), rng.normal(0.1, 1.0, size=(300, 4))
    for factory in (lambda s: MMD(seed=s, n_permutations=100), lambda s: DomainClassifier(seed=s),
                    lambda s: PCAReconstruction(seed=s), lambda s: MeanEmbeddingDistance(seed=s, n_permutations=100)):
        assert factory(3).fit(x).score(y) == factory(3).fit(x).score(y)


def test_domain_classifier_auc_band_and_null_rate() -> None:
    rng = np.random.default_rng(0)
    alarms = 0
    for seed in range(20):
        r = DomainClassifier(seed=seed).fit(rng.normal(size=(300, 6))).score(rng.normal(size=(300, 6)))
        assert 0.4 < r.statistic < 0.6
        alarms += r.drifted
    assert alarms <= 1
    shifted = DomainClassifier().fit(rng.normal(size=(300, 6))).score(rng.normal(0.4, 1.0, size=(300, 6)))
    assert shifted.drifted and shifted.statistic > 0.6 and shifted.p_value < 1e-4
    assert shifted.effect == pytest.approx(shifted.statistic - 0.5) and shifted.threshold == 0.05
    assert shifted.statistic == pytest.approx(np.mean(shifted.details["fold_aucs"]))


def test_pca_reconstruction_uses_held_out_errors() -> None:
    alarms = 0
    for seed in range(20):
        rng = np.random.default_rng(seed)
        det = PCAReconstruction(seed=seed).fit(rng.normal(size=(500, 32)))
        alarms += det.score(rng.normal(size=(500, 32))).drifted
    assert alarms <= 3  # in-sample errors would flag most of these (biased ~20% low)
    rng = np.random.default_rng(0)
    mix = rng.normal(size=(4, 4))
    ref = rng.normal(size=(1000, 4)) @ mix
    det = PCAReconstruction().fit(ref)
    assert det.n_components_ >= 1
    new_structure = det.score(rng.normal(size=(1000, 4)) @ rng.normal(size=(4, 4)))
    assert new_structure.drifted and new_structure.details["current_error"] > new_structure.details["reference_error"]


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_mean_embedding_distance(metric: str) -> None:
    rng = np.random.default_rng(0)
    ref = rng.normal(1.0, 1.0, size=(400, 16))
    det = MeanEmbeddingDistance(metric=metric, n_permutations=300).fit(ref)
    null = det.score(rng.normal(1.0, 1.0, size=(400, 16)))
    moved = rng.normal(1.0, 1.0, size=(400, 16))
    moved[:, :8] += 0.5
    shifted = det.score(moved)
    assert not null.drifted and shifted.drifted and shifted.effect > null.effect
    if metric == "euclidean":
        expected = np.linalg.norm(ref.mean(0) - moved.mean(0))
        assert shifted.statistic == pytest.approx(expected)


def test_bad_rows_dropped_and_shapes_checked() -> None:
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(200, 3))
    cur = rng.normal(size=(200, 3))
    cur[::20, 1] = np.nan
    cur[5, 0] = np.inf
    for name in ("mmd", "domain_classifier", "pca_reconstruction", "mean_embedding"):
        det = REGISTRY[name]().fit(ref)
        r = det.score(cur)
        assert isinstance(r, DriftResult) and r.details["n_dropped"] == 11
        with pytest.raises(ValueError):
            det.score(rng.normal(size=(50, 4)))
        with pytest.raises(ValueError):
            REGISTRY[name]().score(cur)
    with pytest.raises(ValueError):
        MMD().fit(np.zeros((2, 2, 2)))


def test_configuration_problems_are_reported_together() -> None:
    with pytest.raises(ConfigError) as err:
        MMD(n_permutations=0, alpha=2.0, method="fast", n_features=2, bandwidth=-1.0)
    assert len(err.value.problems) == 5
    with pytest.raises(ConfigError) as err:
        DomainClassifier(n_folds=1, band=0.7)
    assert len(err.value.problems) == 2


def test_median_bandwidth_subsamples_deterministically() -> None:
    x = np.random.default_rng(0).normal(size=(3000, 4))
    a = median_bandwidth(x, np.random.default_rng(5))
    assert a == median_bandwidth(x, np.random.default_rng(5))
    # |x - y|^2 / 2 ~ chi2(d) for x, y ~ N(0, I): the median distance is sqrt(2 median chi2(4))
    assert a == pytest.approx(np.sqrt(2 * 3.3567), rel=0.05)


@pytest.mark.parametrize("name", ["mmd", "domain_classifier", "pca_reconstruction", "mean_embedding"])
def test_identical_and_duplicated_data_do_not_drift(name: str) -> None:
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(600, 5))
    r = REGISTRY[name]().fit(ref).score(ref)
    assert not r.drifted and r.effect >= 0.0 and np.isfinite(r.statistic)
    # duplicated rows in both samples: the classifier must not learn twins backwards
    dup = np.repeat(ref[:150], 4, axis=0)
    r2 = REGISTRY[name]().fit(dup).score(dup[::-1].copy())
    assert not r2.drifted and r2.effect >= 0.0


def test_mmd_effect_is_clipped_but_statistic_is_not() -> None:
    rng = np.random.default_rng(2)
    for seed in range(10):
        r = MMD(n_permutations=50, seed=seed).fit(rng.normal(size=(80, 3))).score(rng.normal(size=(80, 3)))
        assert r.effect == max(r.statistic, 0.0)
