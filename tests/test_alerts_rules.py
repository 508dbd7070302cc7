"""Alert rule files: the default pack loads; every problem is reported with file:line."""

from __future__ import annotations

import textwrap

import pytest

from stethoscope.alerts import DEFAULT_RULES, check, load_rules
from stethoscope.alerts.rules import parse_duration
from stethoscope.analytics.findings import Finding
from stethoscope.errors import ConfigError

DEFAULT_KINDS = {
    "gpu_temperature", "gpu_xid", "gpu_ecc_uncorrectable", "gpu_underutilized", "training_nan", "loss_spike",
    "gradient_explosion", "straggler_rank", "throughput_regression", "input_bound", "memory_leak_forecast",
    "feature_drift", "prediction_drift", "confidence_cv", "accuracy_drop", "latency_sla", "error_rate", "cost_spike",
}


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text).lstrip("\n"))
    return p


def test_default_pack_loads_and_covers_every_kind():
    rules = load_rules([DEFAULT_RULES])
    assert check([DEFAULT_RULES]) == []
    kinds = {k for r in rules for k in r.match.kinds}
    assert kinds == DEFAULT_KINDS
    for r in rules:
        assert r.annotations["summary"]
        assert r.annotations["runbook_url"].startswith("docs/runbooks/") and r.annotations["runbook_url"].endswith(".md")
        assert r.severity in ("warning", "critical")


def test_default_pack_matches_todays_drift_findings():
    rules = {r.name: r for r in load_rules([DEFAULT_RULES.parent])}
    drift = Finding(time=0, kind="feature_drift", subject="model=m version=1 feature=x", severity="warning", drifted=True)
    calm = Finding(time=0, kind="feature_drift", subject="model=m version=1 feature=x", severity="info", drifted=False)
    assert rules["FeatureDrift"].match(drift) and not rules["FeatureDrift"].match(calm)
    cv = Finding(time=0, kind="confidence_cv", subject="model=m version=1", severity="warning", drifted=True)
    assert rules["ConfidenceCvHigh"].match(cv)


def test_match_and_expr_rules(tmp_path):
    p = write(tmp_path, "r.yaml", """
        rules:
          - name: FraudDrift
            match: {kind: [feature_drift, dataset_drift], subject: "model=fraud\\\\b", min_severity: critical}
            severity: critical
            labels: {team: risk}
            annotations: {summary: drift}
            actions: [pagerduty]
          - name: SlowQueries
            expr: SELECT quantile(0.99)(Duration) FROM spans
            threshold: 0.5
            op: ">="
            for: 5m
            annotations: {summary: slow}
    """)
    fraud, slow = load_rules([p], notifiers=["pagerduty"])
    assert fraud.match.kinds == ("feature_drift", "dataset_drift") and fraud.actions == ("pagerduty",)
    assert fraud.source == f"{p}:2"
    f = Finding(time=0, kind="dataset_drift", subject="model=fraud version=2", severity="critical")
    assert fraud.match(f)
    assert not fraud.match(Finding(time=0, kind="dataset_drift", subject="model=fraudx version=2", severity="critical"))
    assert not fraud.match(Finding(time=0, kind="dataset_drift", subject="model=fraud version=2", severity="warning"))
    assert slow.expr.holds(0.5) and not slow.expr.holds(0.4) and not slow.expr.holds(None)
    assert slow.for_s == 300 and slow.severity == "warning"


def test_every_problem_with_file_and_line(tmp_path):
    bad = write(tmp_path, "bad.yaml", """
        rules:
          - name: Both
            match: {kind: x}
            expr: SELECT 1
            annotations: {summary: s}
          - name: Typo
            mach: {kind: x}
            match: {kind: x, subject: "(", min_severity: loud}
            for: soon
            severity: urgent
            annotations: {summary: s, runbook: r}
            actions: [nope]
          - name: NoThreshold
            expr: SELECT 1
            op: "=>"
            annotations: {summary: s}
          - name: Both
            match: {kind: y}
    """)
    problems = check([bad], notifiers=["slack"])
    f = str(bad)
    expected = [
        f"{f}:2: rule 'Both': needs exactly one of 'match' or 'expr'",
        f"{f}:7: rule 'Typo': unknown key 'mach'",
        f"{f}:8: rule 'Typo': match.subject is not a valid regex",
        f"{f}:8: rule 'Typo': match.min_severity must be one of info, warning, critical, got 'loud'",
        f"{f}:10: rule 'Typo': severity must be one of info, warning, critical, got 'urgent'",
        f"{f}:9: rule 'Typo': for: not a duration: 'soon'",
        f"{f}:11: rule 'Typo': unknown annotation 'runbook'",
        f"{f}:12: rule 'Typo': unknown notifier 'nope' (configured: slack)",
        f"{f}:14: rule 'NoThreshold': an 'expr' rule needs 'threshold'",
        f"{f}:15: rule 'NoThreshold': op must be one of",
        f"{f}:17: rule 'Both': duplicate name (first at {f}:2)",
        f"{f}:17: rule 'Both': annotations.summary is required",
    ]
    assert len(problems) == len(expected), "\n".join(problems)
    for want in expected:
        assert any(p.startswith(want) for p in problems), f"missing {want!r} in\n" + "\n".join(problems)
    with pytest.raises(ConfigError) as exc:
        load_rules([bad])
    assert len(exc.value.problems) == len(expected) - 1  # no notifier list given: 'nope' is fine


def test_yaml_syntax_error_has_a_line_and_other_files_still_checked(tmp_path):
    write(tmp_path, "a.yaml", "rules:\n  - name: A\n    match: {kind: x\n    annotations: {summary: s}\n")
    write(tmp_path, "b.yaml", "rules:\n  - name: B\n    annotations: {summary: s}\n")
    write(tmp_path, "ignored.txt", "not yaml: [")
    problems = check([tmp_path])
    assert len(problems) == 2
    assert problems[0].startswith(f"{tmp_path / 'a.yaml'}:4: invalid YAML")
    assert problems[1] == f"{tmp_path / 'b.yaml'}:2: rule 'B': needs exactly one of 'match' or 'expr'"


def test_shapes_and_missing_files(tmp_path):
    write(tmp_path, "empty.yaml", "")
    write(tmp_path, "scalar.yaml", "rules: 3\n")
    write(tmp_path, "extra.yaml", "rulez: []\n")
    problems = check([tmp_path / "empty.yaml", tmp_path / "scalar.yaml", tmp_path / "extra.yaml", tmp_path / "gone.yaml"])
    assert problems[0] == f"{tmp_path / 'empty.yaml'}:1: empty file; expected 'rules:' with a list of rules"
    assert problems[1] == f"{tmp_path / 'scalar.yaml'}:1: 'rules' must be a list of rules"
    assert problems[2] == f"{tmp_path / 'extra.yaml'}:1: unknown top-level key 'rulez' (expected 'rules')"
    assert problems[4].startswith(f"{tmp_path / 'gone.yaml'}: cannot read")


@pytest.mark.parametrize("text,seconds", [("30s", 30), ("5m", 300), ("1h", 3600), ("1.5h", 5400), (0, 0), (12, 12)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["5", "-1", "m", True, -3, "5 minutes"])
def test_bad_durations(text):
    with pytest.raises(ValueError):
        parse_duration(text)


def test_docs_list_every_default_rule_and_the_signature_snippet_runs(capsys):
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "alerts.md").read_text()
    for r in load_rules([DEFAULT_RULES]):
        assert f"| {r.name} | `{r.match.kinds[0]}`" in doc
    blocks = re.findall(r"```python\n(.*?)```", doc, re.S)
    snippet = next(b for b in blocks if "ReplayCache()" in b)
    ns: dict = {}
    exec(snippet, ns)  # noqa: S102 - our own documentation
    assert "rejected: signature already used (replay)" in capsys.readouterr().out
    exec(next(b for b in blocks if "compare_digest" in b), ns)  # noqa: S102
