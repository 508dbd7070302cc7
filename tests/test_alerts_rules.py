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
    assert DEFAULT_KINDS <= kinds, sorted(DEFAULT_KINDS - kinds)  # the issue asks for "at least" these
    for r in rules:
        assert r.annotations["summary"]
        assert r.annotations["runbook_url"].startswith("docs/runbooks/") and r.annotations["runbook_url"].endswith(".md")
        assert r.severity in ("info", "warning", "critical")
        if r.severity == "info":  # never paged: chat and Alertmanager only
            assert r.actions and set(r.actions) <= {"slack", "alertmanager"}, r.name


def test_default_pack_covers_every_kind_the_detectors_write():
    import importlib
    import pkgutil

    from stethoscope import analytics
    from stethoscope.analytics.anomaly import ANOMALY_REGISTRY

    for info in pkgutil.iter_modules(analytics.__path__, analytics.__name__ + "."):
        importlib.import_module(info.name)
    written = {k for cls in ANOMALY_REGISTRY.values() for k in cls().kinds}
    written |= {"feature_drift", "sketch_drift", "prediction_drift", "sketch_prediction_drift", "confidence_cv",
                "accuracy_drop", "shadow_disagreement"}
    informational = {"gpu_cost", "cost_per_prediction"}  # summaries for dashboards, never alerts
    covered = {k for r in load_rules([DEFAULT_RULES]) for k in r.match.kinds}
    assert written - informational <= covered, sorted(written - informational - covered)


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


def test_action_mappings_beside_notifier_names(tmp_path):
    p = write(tmp_path, "act.yaml", """
        rules:
          - name: SlowRanker
            match: {kind: latency_sla}
            annotations: {summary: slow}
            actions:
              - slack
              - {action: scale, target: "deployment/prod/{{ labels.service }}", replicas: "+1", min: 1, max: 10,
                 max_step: 2, cooldown: 10m, max_per_hour: 4, approval: false, dry_run: true}
              - {action: retrain, backend: argo, url: "http://argo:2746", namespace: ml, template: retrain,
                 parameters: {model: "{{ subject.model }}"}}
    """)
    [r] = load_rules([p], notifiers=["slack"])
    assert r.actions == ("slack",)
    scale, retrain = r.remediations
    assert (scale.action, scale.target, scale.cooldown_s, scale.max_per_hour, scale.approval, scale.dry_run) == \
        ("scale", "deployment/prod/{{ labels.service }}", 600.0, 4, False, True)
    assert dict(scale.params) == {"replicas": "+1", "min": 1, "max": 10, "max_step": 2}
    assert scale.source == f"{p}:7"
    assert retrain.params["parameters"] == {"model": "{{ subject.model }}"} and retrain.dry_run is None


def test_bad_action_specs_are_reported_with_file_and_line(tmp_path):
    bad = write(tmp_path, "bad.yaml", """
        rules:
          - name: Acts
            match: {kind: x}
            annotations: {summary: s}
            actions:
              - {action: explode}
              - {action: scale, target: "pod/prod/web", replicas: "lots", max: 0, min: 2}
              - {action: cordon}
              - {action: cordon, target: "{{ node }}", cooldown: soon, max_per_hour: 0, approval: maybe}
              - {action: retrain, backend: airflow, url: "ftp://x"}
              - {action: retrain, backend: argo, url: "http://argo", template: t, token_env: "bad name"}
              - {target: x}
              - 3
              - {action: webhook, url: "http://h", secret_env: S, colour: blue}
    """)
    problems = check([bad])
    f = str(bad)
    expected = [
        f"{f}:6: rule 'Acts': action 'explode': unknown action 'explode' (known: cordon, retrain, scale, webhook)",
        f"{f}:7: rule 'Acts': action 'scale': target must be deployment/NAMESPACE/NAME",
        f"{f}:7: rule 'Acts': action 'scale': replicas: expected +N, -N or N, got 'lots'",
        f"{f}:7: rule 'Acts': action 'scale': max 0 is below min 2",
        f"{f}:8: rule 'Acts': action 'cordon': target is required",
        f"{f}:9: rule 'Acts': action 'cordon': target: unknown placeholder '{{{{ node }}}}'",
        f"{f}:9: rule 'Acts': action 'cordon': cooldown: not a duration: 'soon'",
        f"{f}:9: rule 'Acts': action 'cordon': max_per_hour must be an integer of 1 or more, got 0",
        f"{f}:9: rule 'Acts': action 'cordon': approval must be true or false, got 'maybe'",
        f"{f}:10: rule 'Acts': action 'retrain': url must be an http:// or https:// URL",
        f"{f}:10: rule 'Acts': action 'retrain': backend must be one of webhook, argo, kubeflow, got 'airflow'",
        f"{f}:11: rule 'Acts': action 'retrain': token_env must name an environment variable",
        f"{f}:11: rule 'Acts': action 'retrain': backend argo: 'namespace' is required",
        f"{f}:12: rule 'Acts': an action mapping needs 'action: NAME'",
        f"{f}:13: rule 'Acts': actions entries must be notifier names or action mappings",
        f"{f}:14: rule 'Acts': action 'webhook': unknown key 'colour'",
    ]
    assert len(problems) == len(expected), "\n".join(problems)
    for want in expected:
        assert any(p.startswith(want) for p in problems), f"missing {want!r} in\n" + "\n".join(problems)


def test_alerts_check_cli_reports_action_problems(tmp_path, capsys):
    from stethoscope.cli import main

    bad = write(tmp_path, "r.yaml", """
        rules:
          - name: A
            match: {kind: x}
            annotations: {summary: s}
            actions: [{action: cordon, target: "Not_A_Node"}]
    """)
    assert main(["alerts", "check", str(bad)]) == 1
    assert f"{bad}:5: rule 'A': action 'cordon': target must be a node name (DNS-1123), got 'Not_A_Node'" \
        in capsys.readouterr().err


def test_templates():
    from stethoscope.alerts.rules import render_template, template_problems

    assert render_template("{{ rule }}:{{ severity }}:{{ fingerprint }}:{{ subject }}", labels={}, subject="gpu=0",
                           rule="R", severity="critical", fingerprint="f") == "R:critical:f:gpu=0"
    with pytest.raises(KeyError, match="subject part 'model'"):
        render_template("{{ subject.model }}", labels={}, subject="gpu=0")
    assert template_problems("{{ labels }}") and template_problems("{{ rule.x }}") and template_problems("{{ a")
    assert template_problems("plain-text") == []
