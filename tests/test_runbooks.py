"""Every default alert rule has a runbook, and every query in the runbooks runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import make_service, sql

from stethoscope.alerts import DEFAULT_RULES, load_rules

ROOT = Path(__file__).resolve().parent.parent
RUNBOOKS = ROOT / "docs" / "runbooks"
SECTIONS = ("## What it means", "## How to confirm it", "## What to do", "## Related")
QUERY = re.compile(r'stethoscope sql "([^"]+)"')


def _rules():
    return load_rules([DEFAULT_RULES])


def _runbooks() -> list[Path]:
    return sorted(p for p in RUNBOOKS.glob("*.md") if p.name != "README.md")


def _queries() -> list[tuple[str, str]]:
    return [(p.name, q) for p in _runbooks() for q in QUERY.findall(p.read_text())]


def test_every_default_rule_has_a_runbook():
    rules = _rules()
    assert len(rules) == 29
    for rule in rules:
        url = rule.annotations.get("runbook_url", "")
        assert url.startswith("docs/runbooks/"), (rule.name, url)
        assert (ROOT / url).is_file(), f"{rule.name}: missing {url}"
    linked = {Path(r.annotations["runbook_url"]).name for r in rules}
    assert {p.name for p in _runbooks()} == linked
    readme = (RUNBOOKS / "README.md").read_text()
    assert all(name in readme for name in linked)


@pytest.mark.parametrize("path", _runbooks(), ids=lambda p: p.name)
def test_runbook_has_sections_and_a_query(path):
    text = path.read_text()
    for heading in SECTIONS:
        assert heading in text, f"{path.name}: no {heading!r}"
    assert QUERY.search(text), f"{path.name}: no stethoscope sql query"


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    svc = make_service(tmp_path_factory.mktemp("runbooks"))
    yield svc
    svc.stop()


def test_runbook_queries_run(service):
    queries = _queries()
    assert queries
    failures = []
    for name, query in queries:
        try:
            sql(service, query)
        except Exception as exc:  # noqa: BLE001 - collect every failure
            body = getattr(exc, "read", lambda: b"")()
            failures.append(f"{name}: {exc} {body[:300]!r}\n  {query}")
    assert not failures, "\n".join(failures)


def test_every_dashboard_link_names_a_real_dashboard():
    from stethoscope.alerts import DEFAULT_RULES, load_rules
    from stethoscope.dashboards import build_all

    uids = {d["uid"] for d in build_all()}
    for rule in load_rules([DEFAULT_RULES]):
        url = rule.annotations.get("dashboard_url", "")
        if url:
            uid = url.split("/d/", 1)[1].split("/", 1)[0].split("?", 1)[0]
            assert uid in uids, f"{rule.name}: dashboard_url {url} names no dashboard"


DETECTOR_KINDS = {  # kind -> (rule, severity) for the fleet, serving, cost and training anomaly detectors
    "gpu_busy_not_working": ("GpuBusyNotWorking", "warning"), "job_hung": ("TrainingJobHung", "critical"),
    "node_unhealthy": ("NodeUnhealthy", "critical"), "gpu_throttle": ("GpuThrottling", "warning"),
    "capacity": ("ServingCapacity", "warning"), "idle_gpu_cost": ("IdleGpuCost", "warning"),
    "load_imbalance": ("ServingLoadImbalance", "warning"), "queue_time": ("ServingQueueTime", "warning"),
    "loss_plateau": ("TrainingLossPlateau", "info"), "phase_shift": ("TrainingPhaseShift", "info"),
}


@pytest.mark.parametrize("kind", sorted(DETECTOR_KINDS))
def test_each_anomaly_finding_kind_has_its_rule(kind):
    from stethoscope.analytics.findings import Finding

    name, severity = DETECTOR_KINDS[kind]
    finding = Finding(time=0, kind=kind, subject="node=n1 gpu=0", severity="info" if severity == "info" else "warning")
    matched = [r for r in _rules() if r.match is not None and r.match(finding)]
    assert [(r.name, r.severity) for r in matched] == [(name, severity)]


def test_info_rules_never_page():
    for rule in _rules():
        if rule.severity == "info":
            assert rule.actions and set(rule.actions) <= {"slack", "alertmanager"}, rule.name


def test_node_unhealthy_inhibits_its_node_like_node_down():
    from stethoscope.alerts.state import DEFAULT_INHIBIT

    sources = {dict(i.source).get("alertname"): i.equal for i in DEFAULT_INHIBIT}
    assert sources["NodeUnhealthy"] == sources["NodeDown"] == ("node",)
