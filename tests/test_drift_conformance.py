"""The one conformance suite: the same checks on every detector in ``REGISTRY``.

Contract for a registered detector (a class or factory building it with defaults):

* it has ``name`` and ``kind`` strings, ``fit(reference)`` returns the fitted
  detector, and ``score(current)`` returns a :class:`DriftResult`;
* the suite needs null and shifted inputs for it, found in this order:
  1. ``conformance_inputs(rng, n, shifted)`` on the detector class, if defined;
  2. ``sample_inputs(name, rng, n, shifted=...)`` in the detector's module, if
     defined (performance.py has one for "prediction", "confidence",
     "performance" and "shadow");
  3. the generator for its ``kind`` below: "numeric" 1-D floats, N(0, 1) vs
     N(1, 1); "categorical" 1-D string labels whose shares reverse (at most
     ``max_categories`` labels when the class sets it); "multivariate" and
     "embedding" 2-D floats ``n x 5``, shifted by 1 in every coordinate;
  a detector none of these covers fails ``test_has_inputs``;
* results: finite statistic, p-value in [0, 1] or None, finite effect >= 0, finite
  threshold; ``drifted`` False when scoring the reference itself, True on the
  shifted input; the same result twice from the same inputs (seeded);
* a few missing values (NaN, or None in labels) are dropped without an exception;
  empty and all-missing input raise ``ValueError`` with a message.
"""

from __future__ import annotations

import importlib
import math
import pkgutil
import sys
from typing import Any

import numpy as np
import pytest
from stethoscope.analytics.detector import REGISTRY, BatchDetector, DriftResult

from stethoscope import analytics

# Import every analytics module so that each one's detectors are registered.
for _info in pkgutil.iter_modules(analytics.__path__, analytics.__name__ + "."):
    if not _info.name.endswith(("__main__", "drift_cli")):
        importlib.import_module(_info.name)

N = 600

#: (test, detector) pairs that fail today, each with what is wrong. Strict xfail: when
#: the detector is fixed the suite fails until the entry is removed here.
KNOWN_FAILURES: dict[tuple[str, str], str] = {
    # e.g. ("identical", "some_detector"): "what is wrong"; tests: identical, missing, empty
}


def names(test: str) -> list:
    out = []
    for name in sorted(REGISTRY):
        reason = KNOWN_FAILURES.get((test, name))
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        out.append(pytest.param(name, marks=marks, id=name))
    return out


NAMES = names("")


def _numeric(cls, rng, n, shifted):
    return rng.normal(0.0, 1.0, n), rng.normal(1.0 if shifted else 0.0, 1.0, n)


def _categorical(cls, rng, n, shifted):
    k = min(4, getattr(cls, "max_categories", 4) or 4)
    labels = np.array(["a", "b", "c", "d"][:k])
    shares = np.arange(k, 0, -1, dtype=float)
    shares /= shares.sum()
    return rng.choice(labels, n, p=shares), rng.choice(labels, n, p=shares[::-1] if shifted else shares)


def _matrix(cls, rng, n, shifted):
    return rng.normal(size=(n, 5)), rng.normal(1.0 if shifted else 0.0, 1.0, size=(n, 5))


KIND_INPUTS = {"numeric": _numeric, "categorical": _categorical, "multivariate": _matrix, "embedding": _matrix}


def inputs(name: str, seed: int = 0, *, shifted: bool = False, n: int = N) -> tuple[Any, Any]:
    cls = REGISTRY[name]
    rng = np.random.default_rng(seed)
    hook = getattr(cls, "conformance_inputs", None)
    if hook is not None:
        return hook(rng, n, shifted)
    module_hook = getattr(sys.modules.get(getattr(cls, "__module__", "")), "sample_inputs", None)
    if module_hook is not None:
        try:
            return module_hook(name, rng, n, shifted=shifted)
        except ValueError:
            pass
    kind = getattr(cls, "kind", None)
    if kind in KIND_INPUTS:
        return KIND_INPUTS[kind](cls, rng, n, shifted)
    raise LookupError(f"no conformance inputs for {name!r} (kind {kind!r})")


def with_missing(x: Any) -> Any:
    """A copy of an input with a few missing entries, in the form its type allows."""
    if isinstance(x, tuple):
        floats = [i for i, v in enumerate(x) if np.asarray(v).dtype.kind == "f"]
        i = floats[0] if floats else len(x) - 1
        return tuple(with_missing(v) if j == i else v for j, v in enumerate(x))
    arr = np.asarray(x)
    if arr.dtype.kind == "f":
        out = arr.copy()
        out[:3] = np.nan
        return out
    out = arr.astype(object)
    out[:3] = None
    return out


def emptied(x: Any, fill: str) -> Any:
    """The input with no rows (``fill="empty"``) or with every entry missing (``"missing"``)."""
    if isinstance(x, tuple):
        return tuple(emptied(v, fill) for v in x)
    arr = np.asarray(x)
    if fill == "empty":
        return arr[:0]
    if arr.dtype.kind == "f":
        return np.full(arr.shape, np.nan)
    return np.full(arr.shape, None, dtype=object)


def check_result(result: Any) -> None:
    assert isinstance(result, DriftResult)
    assert isinstance(result.method, str) and result.method
    assert math.isfinite(result.statistic)
    assert result.p_value is None or 0.0 <= result.p_value <= 1.0
    assert math.isfinite(result.effect) and result.effect >= 0.0
    assert math.isfinite(result.threshold)
    assert isinstance(result.drifted, bool)


@pytest.mark.parametrize("name", NAMES)
def test_has_inputs_and_interface(name):
    det = REGISTRY[name]()
    assert isinstance(det, BatchDetector)
    assert isinstance(det.name, str) and isinstance(det.kind, str)
    ref, _ = inputs(name)
    assert det.fit(ref) is det


@pytest.mark.parametrize("name", names("identical"))
def test_identical_data_does_not_drift(name):
    ref, _ = inputs(name)
    result = REGISTRY[name]().fit(ref).score(ref)
    check_result(result)
    assert result.drifted is False, result


@pytest.mark.parametrize("name", NAMES)
def test_large_shift_drifts(name):
    ref, cur = inputs(name, shifted=True)
    result = REGISTRY[name]().fit(ref).score(cur)
    check_result(result)
    assert result.drifted is True, result


@pytest.mark.parametrize("name", names("missing"))
def test_missing_values_are_dropped(name):
    ref, cur = inputs(name, seed=1)
    result = REGISTRY[name]().fit(with_missing(ref)).score(with_missing(cur))
    check_result(result)


@pytest.mark.parametrize("fill", ["empty", "missing"])
@pytest.mark.parametrize("side", ["reference", "current"])
@pytest.mark.parametrize("name", names("empty"))
def test_empty_input_is_a_clear_error(name, side, fill):
    ref, cur = inputs(name, seed=2)
    det = REGISTRY[name]()
    with pytest.raises(ValueError) as info:
        if side == "reference":
            det.fit(emptied(ref, fill))
        else:
            det.fit(ref).score(emptied(cur, fill))
    assert str(info.value).strip()


@pytest.mark.parametrize("name", NAMES)
def test_deterministic(name):
    ref, cur = inputs(name, seed=3, shifted=True)
    a = REGISTRY[name]().fit(ref).score(cur)
    b = REGISTRY[name]().fit(ref).score(cur)
    assert (a.statistic, a.p_value, a.effect, a.drifted) == (b.statistic, b.p_value, b.effect, b.drifted)


def test_my_detectors_are_registered():
    for name in ["ks", "cramer_von_mises", "anderson_darling", "wasserstein", "psi", "jensen_shannon",
                 "hellinger", "kl", "chi2", "g_test", "fisher_exact", "tvd", "categorical_psi",
                 "categorical_jensen_shannon"]:
        assert name in REGISTRY


# --- streaming detectors: the same few promises from every one ---------------------

from stethoscope.analytics.sequential import STREAM_REGISTRY  # noqa: E402


@pytest.mark.parametrize("name", sorted(STREAM_REGISTRY))
def test_stream_detector_conformance(name):
    rng = np.random.default_rng(7)
    det = STREAM_REGISTRY[name]()
    for bad in (float("nan"), float("inf"), None, "x", object()):
        assert det.update(bad) is False  # counted and ignored, never raised
    assert det.n_ignored == 5 and det.n_seen == 0
    fired = False
    for x in np.concatenate([rng.normal(0, 1, 3000), rng.normal(4, 1, 3000)]):
        result = det.update(float(x))
        assert isinstance(result, bool)
        fired = fired or result
    assert fired and det.drift_detected, f"{name} missed a 4-sigma shift"
    det.reset()
    assert det.drift_detected is False
