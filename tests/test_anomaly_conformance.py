"""The conformance suite for anomaly detectors: the same promises from every one in ``ANOMALY_REGISTRY``.

* ``name`` and ``kinds`` are set, ``update`` returns a sequence of :class:`Finding`;
* on the clean inputs from ``conformance_inputs(rng, incident=False)`` nothing at
  ``warning`` or above is reported; on ``incident=True`` at least one is, of one of
  the detector's ``kinds``;
* every finding has a kind from ``kinds``, a subject, a valid severity and a time
  within the observations' times;
* garbage (missing fields, NaN, None, strings, wrong types) is ignored and counted,
  never raised; the same inputs give the same findings; ``reset`` forgets the past.
"""

from __future__ import annotations

import importlib
import math
import pkgutil

import numpy as np
import pytest
from stethoscope.analytics.anomaly import ANOMALY_REGISTRY
from stethoscope.analytics.findings import SEVERITIES, Finding

from stethoscope import analytics

for _info in pkgutil.iter_modules(analytics.__path__, analytics.__name__ + "."):
    if not _info.name.endswith(("__main__", "drift_cli")):
        importlib.import_module(_info.name)

NAMES = sorted(ANOMALY_REGISTRY)
GARBAGE = [{}, {"time": float("nan")}, {"time": 1.0, "loss": "x", "utilization": None},
           {"time": "soon"}, {"time": 2.0, "step_time": float("inf"), "phases": "data"}, None, 42, "text"]


def _run(det, observations):
    out = []
    for obs in observations:
        found = det.update(obs)
        assert isinstance(found, (list, tuple))
        for f in found:
            assert isinstance(f, Finding)
        out.extend(found)
    return out


def _alarms(findings):
    return [f for f in findings if SEVERITIES.index(f.severity) >= SEVERITIES.index("warning")]


def test_registry_is_not_empty():
    assert NAMES, "no anomaly detector registered"


@pytest.mark.parametrize("name", NAMES)
def test_conformance(name):
    cls = ANOMALY_REGISTRY[name]
    det = cls()
    assert det.name and isinstance(det.kinds, tuple) and det.kinds
    assert hasattr(cls, "conformance_inputs"), f"{name}: no conformance_inputs(rng, incident)"
    clean = cls.conformance_inputs(np.random.default_rng(3), incident=False)
    incident = cls.conformance_inputs(np.random.default_rng(3), incident=True)
    assert clean and incident

    assert _alarms(_run(det, clean)) == [], f"{name} alarmed on clean input"
    det.reset()
    found = _run(det, incident)
    alarms = _alarms(found)
    assert alarms, f"{name} missed the incident"
    times = [o["time"] for o in incident]
    for f in found:
        assert f.kind in det.kinds and f.subject
        assert f.severity in SEVERITIES
        assert min(times) <= f.time <= max(times) + 1e-6
        for v in (f.statistic, f.threshold):
            assert isinstance(v, float)

    # the same inputs, the same findings
    det.reset()
    again = _run(det, incident)
    assert [(f.kind, f.subject, f.time, f.severity) for f in again] == [
        (f.kind, f.subject, f.time, f.severity) for f in found]

    # garbage is counted and ignored, never raised
    det.reset()
    before = det.n_ignored
    assert _run(det, GARBAGE) == []
    assert det.n_ignored >= before + 1
    assert all(math.isfinite(float(o["time"])) for o in clean)
