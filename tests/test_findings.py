"""Findings: the typed row, its mapping from a DriftResult, and the idempotent writer."""

from __future__ import annotations

import json
import math

import pytest

from stethoscope.analytics.detector import DriftResult
from stethoscope.analytics.findings import Finding, FindingsWriter, from_drift_result

T = 1_718_000_000.0


def finding(**kw) -> Finding:
    base = dict(time=T, kind="feature_drift", subject="model=fraud version=3 stream=default feature=amount",
                model="fraud", model_version="3", feature="amount", method="ks", statistic=0.3, p_value=1e-6,
                effect=0.4, threshold=0.1, severity="warning", drifted=True, window_start=T - 3600,
                window_end=T, details={"ks_d": 0.3, "bad": math.inf}, labels={"stream": "default"})
    base.update(kw)
    return Finding(**base)


def test_from_drift_result_takes_the_corrected_p_value_and_keeps_both():
    r = DriftResult("ks", 0.3, 0.001, 0.4, 0.1, True, column="amount", n_reference=500, n_current=400,
                    details={"p_adjusted": 0.003})
    f = from_drift_result(r, kind="feature_drift", model="fraud", version="3", feature="amount",
                          window_start=T - 3600, window_end=T, severity_rule=lambda r: "critical",
                          labels={"stream": "default"})
    assert (f.p_value, f.severity, f.time, f.drifted) == (0.003, "critical", T, True)
    assert f.details["p_raw"] == 0.001 and f.details["n_current"] == 400
    assert f.subject == "model=fraud version=3 stream=default feature=amount"


def test_a_rule_without_p_value_gives_nan():
    r = DriftResult("confidence_cv", 0.3, None, 0.3, 0.2, True)
    f = from_drift_result(r, kind="confidence_cv", model="m", version="1", feature="", window_start=0, window_end=60)
    assert math.isnan(f.p_value) and f.severity == "warning" and f.subject == "model=m version=1"


def test_bad_severity_is_refused():
    with pytest.raises(ValueError, match="severity"):
        finding(severity="urgent")


def _rows(store) -> list[dict]:
    data = store.query("SELECT toUnixTimestamp64Milli(Time) AS t, Kind, Subject, Model, ModelVersion, Feature, "
                       "Method, Statistic, PValue, Effect, Threshold, Severity, Drifted, "
                       "toUnixTimestamp64Milli(WindowStart) AS ws, Details, Labels FROM findings ORDER BY Feature",
                       "JSONEachRow").data
    return [json.loads(line) for line in data.splitlines()]


def test_written_findings_read_back(store):
    nan = finding(feature="age", method="confidence_cv", p_value=math.nan, drifted=False, severity="info")
    assert FindingsWriter(store).write([finding(), nan]) == 2
    amount, age = sorted(_rows(store), key=lambda r: r["Feature"] != "amount")
    assert amount["t"] == int(T * 1000) and amount["ws"] == int((T - 3600) * 1000)
    assert (amount["Kind"], amount["Severity"], amount["Drifted"], amount["PValue"]) == ("feature_drift", "warning", True, 1e-6)
    assert json.loads(amount["Details"]) == {"ks_d": 0.3, "bad": None}  # valid JSON, no NaN/inf
    assert amount["Labels"] == {"stream": "default"}
    assert age["PValue"] is None or math.isnan(float(age["PValue"]))  # JSON renders NaN as null
    assert store.query("SELECT countIf(isNaN(PValue)) FROM findings", "TabSeparated").data == b"1\n"


def test_a_repeated_write_is_stored_once(store):
    writer = FindingsWriter(store)
    batch = [finding(), finding(feature="age")]
    writer.write(batch)
    writer.write(list(batch))  # a retry of the same batch
    assert store.query("SELECT count() FROM findings", "TabSeparated").data == b"2\n"
    writer.write([finding(time=T + 300)])  # new content, new token
    assert store.query("SELECT count() FROM findings", "TabSeparated").data == b"3\n"
    assert writer.write([]) == 0
