"""Alert lifecycle with a fake clock: pending/firing/resolved, dedup, inhibition, silences, repeats."""

from __future__ import annotations

import json
from dataclasses import replace

from stethoscope.alerts import AlertEngine, Silence
from stethoscope.alerts.rules import Expr, Match, Rule
from stethoscope.alerts.schema import ALERTS_DDL, from_rows, to_rows
from stethoscope.alerts.state import expr_values, fingerprint, group
from stethoscope.analytics.findings import Finding

HOT = Rule("HotGpu", "critical", match=Match(("gpu_temperature",)), for_s=60, labels={"team": "gpu"},
           annotations={"summary": "hot"}, actions=("pagerduty",))
NOW_HOT = replace(HOT, for_s=0)
DOWN = Rule("NodeDown", "critical", match=Match(("node_down",)), annotations={"summary": "down"})
SLOW = Rule("Slow", "warning", expr=Expr("SELECT 1", 0.5, ">"), annotations={"summary": "slow"})


def hot(node="n1", gpu="0", severity="warning"):
    return Finding(time=0, kind="gpu_temperature", subject=f"gpu={gpu}", severity=severity, labels={"node": node, "gpu": gpu})


def down(node="n1"):
    return Finding(time=0, kind="node_down", subject=f"node={node}", severity="critical", labels={"node": node})


def brief(notes):
    return [(n.rule, n.status, n.reason) for n in notes]


def test_pending_then_firing_then_resolved():
    eng = AlertEngine([HOT])
    assert eng.evaluate([hot()], now=0) == []
    assert next(iter(eng.alerts.values())).state == "pending"
    assert eng.evaluate([hot()], now=59) == []
    (n,) = eng.evaluate([hot()], now=60)
    assert (n.status, n.reason, n.starts_at, n.ends_at) == ("firing", "new", 60, None)
    assert n.labels == {"node": "n1", "gpu": "0", "team": "gpu", "alertname": "HotGpu", "severity": "critical"}
    assert n.actions == ("pagerduty",) and n.subject == "gpu=0"
    assert eng.evaluate([hot()], now=120) == []
    (r,) = eng.evaluate([], now=180)
    assert (r.status, r.ends_at, r.fingerprint) == ("resolved", 180, n.fingerprint)
    assert eng.alerts == {}
    assert eng.evaluate([hot()], now=200) == []  # a new episode starts pending again


def test_pending_that_clears_never_notifies():
    eng = AlertEngine([HOT])
    eng.evaluate([hot()], now=0)
    assert eng.evaluate([], now=30) == [] and eng.alerts == {}


def test_dedup_one_alert_per_fingerprint():
    eng = AlertEngine([NOW_HOT])
    notes = eng.evaluate([hot(), hot(), hot(gpu="1"), hot(severity="info")], now=0)
    assert brief(notes) == [("HotGpu", "firing", "new")] * 2
    assert len({n.fingerprint for n in notes}) == 2 and len(eng.alerts) == 2


def test_fingerprint_is_stable_and_label_order_free():
    a = fingerprint("HotGpu", {"node": "n1", "gpu": "0"}, "gpu=0")
    assert a == fingerprint("HotGpu", {"gpu": "0", "node": "n1"}, "gpu=0")
    assert a != fingerprint("HotGpu", {"gpu": "0", "node": "n1"}, "gpu=1")
    assert a != fingerprint("Other", {"gpu": "0", "node": "n1"}, "gpu=0")
    assert a == "c61dd9eacf9fff77"  # pinned: stable across processes and releases


def test_grouping_key():
    eng = AlertEngine([NOW_HOT], group_by=("node",))
    notes = eng.evaluate([hot("n1", "0"), hot("n1", "1"), hot("n2", "0")], now=0)
    groups = group(notes)
    assert sorted(groups) == ['{}:{alertname="HotGpu",node="n1"}', '{}:{alertname="HotGpu",node="n2"}']
    assert len(groups['{}:{alertname="HotGpu",node="n1"}']) == 2


def test_inhibition_by_node_down():
    eng = AlertEngine([NOW_HOT, DOWN])
    notes = eng.evaluate([hot("n1"), hot("n2"), down("n1")], now=0)
    assert sorted((n.rule, n.labels["node"]) for n in notes) == [("HotGpu", "n2"), ("NodeDown", "n1")]
    assert eng.evaluate([hot("n1"), hot("n2"), down("n1")], now=10) == []
    # the node comes back: the inhibited alert, still active, is announced now
    notes = eng.evaluate([hot("n1"), hot("n2")], now=20)
    assert [(n.rule, n.status, n.labels["node"]) for n in notes] == [("NodeDown", "resolved", "n1"), ("HotGpu", "firing", "n1")]


def test_inhibition_lifts_when_source_resolves():
    eng = AlertEngine([NOW_HOT, DOWN])
    eng.evaluate([hot("n1"), down("n1")], now=0)
    notes = eng.evaluate([hot("n1")], now=10)
    assert sorted(brief(notes)) == [("HotGpu", "firing", "new"), ("NodeDown", "resolved", "resolved")]


def test_silence_mutes_until_expiry():
    eng = AlertEngine([NOW_HOT])
    eng.add_silence(Silence("s1", {"alertname": "HotGpu", "node": "~n[12]"}, until=100, comment="maintenance"))
    assert brief(eng.evaluate([hot("n1"), hot("n3")], now=0)) == [("HotGpu", "firing", "new")]
    assert eng.evaluate([hot("n1"), hot("n3")], now=50) == []
    notes = eng.evaluate([hot("n1"), hot("n3")], now=100)  # expired: the silenced alert is announced
    assert [(n.labels["node"], n.reason) for n in notes] == [("n1", "new")]
    assert eng.silences == {}


def test_silenced_alert_that_resolves_sends_nothing():
    eng = AlertEngine([NOW_HOT])
    eng.add_silence(Silence("s1", {"node": "n1"}, until=100))
    eng.evaluate([hot("n1")], now=0)
    assert eng.evaluate([], now=10) == []


def test_repeat_interval():
    eng = AlertEngine([NOW_HOT], repeat_interval_s=300)
    assert brief(eng.evaluate([hot()], now=0)) == [("HotGpu", "firing", "new")]
    assert eng.evaluate([hot()], now=299) == []
    assert brief(eng.evaluate([hot()], now=300)) == [("HotGpu", "firing", "repeat")]
    assert eng.evaluate([hot()], now=400) == []
    assert brief(eng.evaluate([hot()], now=600)) == [("HotGpu", "firing", "repeat")]
    assert len(eng.firing(now=601)) == 1


def test_expr_rules_and_failed_queries():
    def query(sql):
        raise OSError("store down")

    assert expr_values([SLOW, HOT], query) == {"Slow": None}
    assert expr_values([SLOW], lambda sql: 0.9) == {"Slow": 0.9}
    eng = AlertEngine([SLOW])
    (n,) = eng.evaluate([], now=0, values={"Slow": 0.9})
    assert (n.rule, n.value, n.subject) == ("Slow", 0.9, "")
    assert brief(eng.evaluate([], now=10, values={"Slow": 0.1})) == [("Slow", "resolved", "resolved")]


def test_state_round_trips_through_json_and_rows():
    eng = AlertEngine([HOT, DOWN])
    eng.add_silence(Silence("s1", {"node": "n9"}, until=1000))
    eng.evaluate([hot("n1"), hot("n2")], now=0)
    eng.evaluate([hot("n1"), hot("n2")], now=60)
    text = eng.to_json()
    json.loads(text)
    other = AlertEngine([HOT, DOWN])
    other.load_json(text)
    assert other.state() == eng.state()
    assert brief(other.evaluate([hot("n1")], now=120)) == [("HotGpu", "resolved", "resolved")]
    assert from_rows(to_rows(eng.state(), version=1)) == eng.state()
    newer = to_rows(other.state(), version=2)
    assert from_rows(to_rows(eng.state(), version=1) + newer)["alerts"] == other.state()["alerts"]
    assert from_rows(newer + to_rows(AlertEngine([]).state(), version=3)) == {"alerts": [], "silences": []}
    assert from_rows([]) == {"alerts": [], "silences": []}
    assert "CREATE TABLE IF NOT EXISTS alerts" in ALERTS_DDL


def test_resolve_after_keeps_an_alert_between_sparse_findings_and_for_still_needs_fresh_ones():
    eng = AlertEngine([HOT], resolve_after_s=300)
    assert eng.evaluate([hot()], now=0) == []
    # pending, no new finding: it neither fires after `for` nor is forgotten
    assert eng.evaluate([], now=120) == [] and next(iter(eng.alerts.values())).state == "pending"
    assert brief(eng.evaluate([hot()], now=200)) == [("HotGpu", "firing", "new")]
    assert eng.evaluate([], now=499) == []  # 299 s since the latest finding: still firing
    assert brief(eng.evaluate([], now=500)) == [("HotGpu", "resolved", "resolved")]


def test_without_expression_values_an_expression_alert_is_kept_as_it_is():
    eng = AlertEngine([SLOW])
    assert brief(eng.evaluate([], now=0, values={"Slow": 2.0})) == [("Slow", "firing", "new")]
    assert eng.evaluate([], now=10, values=None) == [] and len(eng.alerts) == 1
    assert brief(eng.evaluate([], now=20, values={"Slow": 0.1})) == [("Slow", "resolved", "resolved")]


def test_node_unhealthy_inhibits_the_alerts_of_its_node_only():
    unhealthy = Rule("NodeUnhealthy", "critical", match=Match(("node_unhealthy",)), annotations={"summary": "bad"})
    eng = AlertEngine([NOW_HOT, unhealthy])
    sick = Finding(time=0, kind="node_unhealthy", subject="node=n1", severity="critical")  # node only in the subject
    gpu_n1 = Finding(time=0, kind="gpu_temperature", subject="node=n1 gpu=0", severity="warning")
    gpu_n2 = Finding(time=0, kind="gpu_temperature", subject="node=n2 gpu=0", severity="warning")
    notes = eng.evaluate([sick, gpu_n1, gpu_n2], now=0)
    assert sorted((n.rule, n.labels["node"]) for n in notes) == [("HotGpu", "n2"), ("NodeUnhealthy", "n1")]
    notes = eng.evaluate([gpu_n1, gpu_n2], now=30)  # the node recovered: its GPU alert is heard now
    assert sorted((n.rule, n.status, n.labels["node"]) for n in notes) == [
        ("HotGpu", "firing", "n1"), ("NodeUnhealthy", "resolved", "n1")]


def test_subject_labels_do_not_override_the_findings_own_labels():
    eng = AlertEngine([NOW_HOT])
    f = Finding(time=0, kind="gpu_temperature", subject="node=n9 gpu=7 job=j", severity="warning", labels={"node": "n1"})
    (n,) = eng.evaluate([f], now=0)
    assert (n.labels["node"], n.labels["gpu"], n.labels["job"]) == ("n1", "7", "j")
