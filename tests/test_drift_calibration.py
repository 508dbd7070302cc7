"""Multiple-testing correction and the calibration settings."""

from __future__ import annotations

import numpy as np
import pytest
from stethoscope.analytics import (
    DEFAULT_THRESHOLDS,
    Calibration,
    adjust_pvalues,
    check_dataset,
)

from stethoscope.errors import ConfigError


def _bh_reference(p):
    """Benjamini-Hochberg by its definition: the smallest (m / j) p_(j) over j >= rank."""
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    out = [0.0] * m
    for rank, i in enumerate(order, start=1):
        out[i] = min(1.0, min(p[order[j - 1]] * m / j for j in range(rank, m + 1)))
    return out


@pytest.mark.parametrize("seed", range(5))
def test_bh_matches_its_definition(seed):
    rng = np.random.default_rng(seed)
    p = np.concatenate([rng.random(15), rng.random(5) * 1e-3])
    assert np.allclose(adjust_pvalues(p, "bh"), _bh_reference(list(p)))


def test_bonferroni_none_and_nan():
    p = [0.01, np.nan, 0.3]
    got = adjust_pvalues(p, "bonferroni")
    assert got[0] == pytest.approx(0.02) and np.isnan(got[1]) and got[2] == pytest.approx(0.6)
    assert np.allclose(adjust_pvalues([0.2, 0.9], "none"), [0.2, 0.9])
    assert adjust_pvalues([], "bh").size == 0
    with pytest.raises(ValueError, match="correction"):
        adjust_pvalues([0.1], "holm")


def test_bh_is_never_stricter_than_bonferroni():
    rng = np.random.default_rng(1)
    p = rng.random(50) ** 3
    assert np.all(adjust_pvalues(p, "bh") <= adjust_pvalues(p, "bonferroni") + 1e-15)


def test_calibration_reports_every_problem():
    with pytest.raises(ConfigError) as info:
        Calibration(alpha=0, correction="x", drift_share=0, small_sample=-1, thresholds={"ks": -1, "nope": 1})
    assert len(info.value.problems) == 6
    assert Calibration(thresholds={"psi": 0.25}).threshold("psi") == 0.25
    assert Calibration().threshold("psi") == DEFAULT_THRESHOLDS["psi"] == 0.2


def test_bonferroni_option_and_drift_share_in_the_dataset_check():
    rng = np.random.default_rng(6)
    ref = {f"c{i}": rng.normal(size=2000) for i in range(4)}
    cur = {f"c{i}": rng.normal(0.5 if i < 2 else 0.0, 1, 2000) for i in range(4)}
    bh = check_dataset(ref, cur)
    assert bh.summary.n_drifted == 2 and bh.summary.share == 0.5 and bh.drifted
    bonf = check_dataset(ref, cur, Calibration(correction="bonferroni", drift_share=0.75))
    assert bonf.summary.correction == "bonferroni" and not bonf.drifted
    assert bonf["c0"].details["p_adjusted"] >= bh["c0"].details["p_adjusted"]
