"""alibi-detect as a test oracle: our KS, chi-squared and MMD against its KSDrift, ChiSquareDrift, MMDDrift.

alibi-detect is under the Business Source License and pins numpy<2, so it is never
a dependency: it lives in a separate environment that ``scripts/oracle-env.sh``
builds. Run these with

    scripts/oracle-env.sh
    .venv-oracle/bin/python -m pytest -q -p no:cacheprovider --confcutdir=tests/oracle tests/oracle

(``--confcutdir`` keeps the main suite's conftest, which needs the server extra,
out). In the main environment the module is skipped with that instruction.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

with warnings.catch_warnings():  # alibi-detect and its backends warn on import; that is not ours to fix
    warnings.simplefilter("ignore")
    alibi_cd = pytest.importorskip(
        "alibi_detect.cd",
        reason="alibi-detect is not installed here (optional oracle): build .venv-oracle with scripts/oracle-env.sh",
    )

from stethoscope.analytics.categorical import Chi2
from stethoscope.analytics.multivariate import MMD
from stethoscope.analytics.univariate import KS, ks_pvalues

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]


def _predict(detector, x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return detector.predict(x, return_p_val=True, return_distance=True)["data"]


def test_ks_matches_alibi_ksdrift():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(1500, 3))
    cur = rng.normal(size=(1800, 3))
    cur[:, 1] += 0.15
    got = _predict(alibi_cd.KSDrift(ref, p_val=0.05), cur)
    for j in range(3):
        ours = KS().fit(ref[:, j]).score(cur[:, j])
        assert ours.statistic == pytest.approx(float(got["distance"][j]), abs=1e-7)  # alibi keeps float32
        # alibi asks SciPy for the asymptotic p-value; ours, asked the same way:
        p = float(ks_pvalues(np.array([ours.statistic]), np.array([1500]), np.array([1800]))[0])
        assert p == pytest.approx(float(got["p_val"][j]), abs=1e-6)
    assert got["p_val"][1] < 0.05


def test_chi2_matches_alibi_chisquaredrift():
    rng = np.random.default_rng(1)
    ref = np.column_stack([rng.choice(4, 2000, p=[0.4, 0.3, 0.2, 0.1]), rng.choice(2, 2000)]).astype(np.int64)
    cur = np.column_stack([rng.choice(4, 1500, p=[0.3, 0.3, 0.25, 0.15]), rng.choice(2, 1500)]).astype(np.int64)
    got = _predict(alibi_cd.ChiSquareDrift(ref, p_val=0.05), cur)
    for j in range(2):
        ours = Chi2().fit(ref[:, j]).score(cur[:, j])
        assert ours.statistic == pytest.approx(float(got["distance"][j]), rel=1e-6)  # alibi keeps float32
        assert ours.p_value == pytest.approx(float(got["p_val"][j]), abs=1e-6)


@pytest.mark.parametrize("shift", [0.0, 0.4])
def test_mmd_matches_alibi_mmddrift(shift):
    pytest.importorskip("torch", reason="MMDDrift needs its PyTorch backend; oracle-env.sh installs torch (CPU)")
    rng = np.random.default_rng(2)
    ref = rng.normal(size=(300, 4)).astype(np.float32)
    cur = rng.normal(shift, 1.0, size=(300, 4)).astype(np.float32)
    ours = MMD(n_permutations=1000, method="exact").fit(ref.astype(np.float64)).score(cur.astype(np.float64))
    bw = ours.details["bandwidth"]
    det = alibi_cd.MMDDrift(ref, backend="pytorch", p_val=0.05, sigma=np.array([bw], dtype=np.float32),
                            n_permutations=1000)
    got = _predict(det, cur)
    # the same unbiased MMD^2 with the same RBF bandwidth (alibi computes in float32)
    assert ours.statistic == pytest.approx(float(got["distance"]), abs=1e-5, rel=1e-4)
    # permutation p-values: different random permutations, so equal within Monte Carlo error
    assert abs(ours.p_value - float(got["p_val"])) <= 0.06
    assert (ours.p_value < 0.05) == (float(got["p_val"]) < 0.05)
