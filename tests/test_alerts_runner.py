"""The alert runner: findings in the store -> engine -> notifiers, state in the alerts table."""

from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import make_service
from stethoscope.alerts.runner import AlertRunner, notifiers_from_config, runner_from_config
from stethoscope.alerts.signing import verify
from stethoscope.alerts.state import AlertEngine
from stethoscope.analytics.findings import Finding, FindingsWriter
from stethoscope.config import load_config
from stethoscope.errors import ConfigError

NOW = 1_718_000_000.0
SECRET = "s3cret-for-tests"
RULE = """
rules:
  - name: FraudDrift
    match: {kind: feature_drift, subject: "model=fraud", min_severity: warning, drifted: true}
    for: 1m
    severity: critical
    annotations: {summary: "fraud inputs drifted"}
    actions: [webhook]
"""


class _Hook(BaseHTTPRequestHandler):
    received: list[dict] = []
    errors: list[str] = []

    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        try:
            verify(SECRET, dict(self.headers), body, time.time())
        except Exception as exc:  # recorded; the test asserts none
            self.errors.append(str(exc))
            self.send_response(401)
        else:
            self.received.append(json.loads(body))
            self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def hook():
    _Hook.received, _Hook.errors = [], []
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/hook", _Hook
    srv.shutdown()
    srv.server_close()


def drift(t: float, model: str = "fraud") -> Finding:
    return Finding(time=t, kind="feature_drift", subject=f"model={model} version=3 stream=default feature=age",
                   model=model, model_version="3", feature="age", method="ks", statistic=0.3, p_value=1e-9,
                   effect=0.3, threshold=0.1, severity="warning", drifted=True, window_start=t - 3600, window_end=t,
                   details={"n_current": 600}, labels={"stream": "default"})


def runner(store, tmp_path, url: str = "", **settings) -> AlertRunner:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULE)
    overrides = {"alerts.rules": [str(rules)], "alerts.webhook_url": url, **settings}
    cfg = load_config(environ={}, overrides=overrides)
    return runner_from_config(cfg, store, environ={"STETHOSCOPE_WEBHOOK_SECRET": SECRET})


def test_a_drift_finding_fires_to_the_signed_webhook_after_for(store, tmp_path, hook):
    url, h = hook
    r = runner(store, tmp_path, url, **{"alerts.resolve_after": "30s"})
    assert set(r.notifiers) == {"webhook"}
    writer = FindingsWriter(store)
    writer.write([drift(NOW)])
    assert [n.rule for n in r.run_once(NOW)] == ["FeatureDrift"]  # default pack, for: 0s, webhook by default
    assert [m["rule"] for m in h.received] == ["FeatureDrift"]  # FraudDrift still pending
    writer.write([drift(NOW + 30)])
    assert r.run_once(NOW + 30) == []
    writer.write([drift(NOW + 60)])
    notes = r.run_once(NOW + 60)
    assert [(n.rule, n.status, n.reason) for n in notes] == [("FraudDrift", "firing", "new")]
    assert h.errors == []
    msg = h.received[-1]
    assert (msg["rule"], msg["status"], msg["severity"]) == ("FraudDrift", "firing", "critical")
    assert msg["subject"].startswith("model=fraud") and msg["labels"]["stream"] == "default"
    assert all(d.ok for d in r.deliveries)

    # the alerts table holds the newest state
    rows = store.query("SELECT Kind, Rule, State, Version FROM alerts WHERE Version = (SELECT max(Version) FROM alerts) "
                       "ORDER BY Kind, Rule", "JSONEachRow").data.decode().splitlines()
    got = [json.loads(x) for x in rows]
    assert [(g["Kind"], g["Rule"], g["State"]) for g in got] == [
        ("alert", "FeatureDrift", "firing"), ("alert", "FraudDrift", "firing"), ("snapshot", "", "")]
    assert int(got[0]["Version"]) == int((NOW + 60) * 1000)

    # a restart: the firing alert is remembered and not notified again before the repeat interval
    sent = len(h.received)
    r2 = runner(store, tmp_path, url, **{"alerts.resolve_after": "30s"})
    writer.write([drift(NOW + 90)])
    assert r2.run_once(NOW + 90) == []
    assert len(h.received) == sent
    assert {a.rule: a.state for a in r2.engine.alerts.values()} == {"FeatureDrift": "firing", "FraudDrift": "firing"}
    # ... and resolves (and says so) when the findings stop
    notes = r2.run_once(NOW + 120)
    assert sorted((n.rule, n.status) for n in notes) == [("FeatureDrift", "resolved"), ("FraudDrift", "resolved")]
    assert sorted(m["rule"] for m in h.received[sent:]) == ["FeatureDrift", "FraudDrift"]
    assert h.errors == []


def test_a_firing_alert_is_repeated_after_the_repeat_interval(store, tmp_path, hook):
    url, h = hook
    r = runner(store, tmp_path, url, **{"alerts.repeat_interval": "2m"})
    writer = FindingsWriter(store)
    for t in (NOW, NOW + 60, NOW + 120, NOW + 150):
        writer.write([drift(t)])
        r.run_once(t)
    reasons = sorted((m["rule"], m["reason"]) for m in h.received)
    assert reasons == [("FeatureDrift", "new"), ("FeatureDrift", "repeat"), ("FraudDrift", "new")]
    assert h.errors == []


def test_without_notifiers_nothing_is_sent_and_nothing_fails(store, tmp_path, caplog):
    r = runner(store, tmp_path)
    assert r.notifiers == {}
    writer = FindingsWriter(store)
    writer.write([drift(NOW)])
    with caplog.at_level(logging.INFO, logger="stethoscope.alerts.runner"):
        notes = r.run_once(NOW)
    assert [n.rule for n in notes] == ["FeatureDrift"] and r.deliveries == []
    assert any("alert firing (new): FeatureDrift" in m for m in caplog.messages)
    assert r.errors == {}
    assert store.query("SELECT count() FROM alerts WHERE Kind = 'snapshot'", "TabSeparated").data == b"1\n"


def test_findings_are_read_once_and_unrelated_ones_do_not_match(store):
    eng = AlertEngine([])
    r = AlertRunner(store, eng, {}, interval_s=30)
    r._cursor_ms = int((NOW - 60) * 1000)
    FindingsWriter(store).write([drift(NOW - 10), Finding(time=NOW - 5, kind="dataset_drift", subject="x")])
    got = r.new_findings(NOW)
    assert [(f.kind, f.time) for f in got] == [("feature_drift", NOW - 10), ("dataset_drift", NOW - 5)]
    assert got[0] == drift(NOW - 10)
    assert r.new_findings(NOW + 30) == []


def test_webhook_secret_comes_from_the_environment_and_is_never_logged(caplog):
    cfg = load_config(environ={}, overrides={"alerts.webhook_url": "http://127.0.0.1:9/h",
                                             "alerts.slack_webhook_url": "http://127.0.0.1:9/s",
                                             "alerts.pagerduty_routing_key_env": "PD_KEY"})
    with caplog.at_level(logging.INFO):
        assert set(notifiers_from_config(cfg, {})) == {"slack"}
    assert any("STETHOSCOPE_WEBHOOK_SECRET" in m for m in caplog.messages)
    n = notifiers_from_config(cfg, {"STETHOSCOPE_WEBHOOK_SECRET": SECRET, "PD_KEY": "rk"})
    assert set(n) == {"webhook", "slack", "pagerduty"}
    assert SECRET not in caplog.text


def test_config_rejects_bad_alert_settings():
    with pytest.raises(ConfigError) as err:
        load_config(environ={"STETHOSCOPE_ALERTS_INTERVAL": "0", "STETHOSCOPE_ALERTS_WEBHOOK_URL": "ftp://x",
                             "STETHOSCOPE_ALERTS_WEBHOOK_SECRET_ENV": "not a name"})
    text = str(err.value)
    assert "alerts.interval" in text and "alerts.webhook_url" in text and "alerts.webhook_secret_env" in text


def test_up_runs_the_alert_runner_and_stops_it(tmp_path):
    svc = make_service(tmp_path, **{"analytics.enabled": False})
    try:
        assert svc.alerts is not None and svc.alerts._thread is not None
        assert svc.alerts.interval_s == 30.0
    finally:
        svc.stop()
    assert svc.alerts._thread is None


def test_migration_4_creates_the_alerts_table_as_fresh_creation_does(store):
    from stethoscope.alerts.schema import COLUMNS
    from stethoscope.exporters import schema

    migration = next(m for m in schema.MIGRATIONS if m.version == 4)
    assert schema.ALERTS_TABLE.column_names == COLUMNS
    store.execute("CREATE DATABASE migrated")
    for stmt in migration.statements:
        store.execute(stmt.format(db="`migrated`", on_cluster=""))
    ddl = {}
    for db in ("stethoscope", "migrated"):
        out = store.query(f"SELECT create_table_query FROM system.tables WHERE database = '{db}' AND name = 'alerts'",
                          "JSONCompactEachRow", readonly=False).data.decode()
        ddl[db] = json.loads(out)[0].replace(f"{db}.", "DB.")
    assert ddl["stethoscope"] == ddl["migrated"]
    assert "ORDER BY (Version, Kind, Fingerprint)" in ddl["migrated"]


def nan(t: float, job: str = "llm") -> Finding:
    return Finding(time=t, kind="training_nan", subject=f"job={job} rank=0 node=n1 gpu=0", severity="critical",
                   details={"value": "loss"})


def test_a_tick_evaluates_new_findings_at_once_without_expressions(store, tmp_path, hook):
    url, h = hook
    rules = tmp_path / "expr.yaml"
    rules.write_text("rules:\n  - name: Many\n    expr: SELECT count() FROM findings\n    threshold: 0\n"
                     "    severity: warning\n    annotations: {summary: many findings}\n    actions: [slack]\n")
    cfg = load_config(environ={}, overrides={"alerts.rules": [str(rules)], "alerts.webhook_url": url})
    r = runner_from_config(cfg, store, environ={"STETHOSCOPE_WEBHOOK_SECRET": SECRET})
    assert r.poll_s == 1.0 and r.engine.resolve_after_s == 600.0
    assert r.tick(NOW) == []  # nothing new: no evaluation, no snapshot
    assert store.query("SELECT count() FROM alerts", "TabSeparated").data == b"0\n"
    FindingsWriter(store).write([nan(NOW + 0.5)])
    assert [(n.rule, n.reason) for n in r.tick(NOW + 1)] == [("TrainingNaN", "new")]
    assert [m["rule"] for m in h.received] == ["TrainingNaN"]
    assert h.received[0]["labels"]["job"] == "llm" and h.received[0]["labels"]["node"] == "n1"  # from the subject
    assert "Many" not in {a.rule for a in r.engine.alerts.values()}  # expressions wait for the full run
    r.run_once(NOW + 30)
    assert {a.rule for a in r.engine.alerts.values()} == {"TrainingNaN", "Many"}
    r.tick(NOW + 31)  # a tick keeps the expression's alert as it is
    assert {a.rule for a in r.engine.alerts.values()} == {"TrainingNaN", "Many"}
    # still active within resolve_after (10 min) although no new finding came
    assert r.run_once(NOW + 300) == [] and len(h.received) == 1
    notes = r.run_once(NOW + 700)
    assert [(n.rule, n.status) for n in notes] == [("TrainingNaN", "resolved")]


def test_up_delivers_a_finding_to_the_webhook_within_seconds(tmp_path, hook, monkeypatch):
    """With default timing, the background tick (not the 30 s full run) picks up a new finding."""
    url, h = hook
    monkeypatch.setenv("STETHOSCOPE_WEBHOOK_SECRET", SECRET)
    svc = make_service(tmp_path, **{"analytics.enabled": False, "alerts.webhook_url": url})
    try:
        assert svc.alerts.interval_s == 30.0 and svc.alerts.poll_s == 1.0
        FindingsWriter(svc.store).write([nan(time.time())])
        deadline = time.monotonic() + 20  # far below the 30 s full run even on a loaded machine
        while not h.received and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [m["rule"] for m in h.received] == ["TrainingNaN"]
        assert h.errors == []
    finally:
        svc.stop()


def test_wake_runs_a_tick_right_away(store, tmp_path, hook):
    url, h = hook
    cfg = load_config(environ={}, overrides={"alerts.webhook_url": url, "alerts.poll_interval": "0s",
                                             "alerts.interval": "1h"})
    r = runner_from_config(cfg, store, environ={"STETHOSCOPE_WEBHOOK_SECRET": SECRET})
    r.start()
    try:
        FindingsWriter(store).write([nan(time.time())])
        r.wake()
        deadline = time.monotonic() + 20
        while not h.received and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [m["rule"] for m in h.received] == ["TrainingNaN"]
    finally:
        r.stop()


def test_old_snapshots_are_pruned_and_a_restart_still_restores_the_state(store, tmp_path, hook):
    url, h = hook
    r = runner(store, tmp_path, url, **{"alerts.snapshot_retention": "3m"})
    r.prune_interval_s = 60
    writer = FindingsWriter(store)
    for i in range(24):  # 12 minutes of full runs every 30 s, the condition holding throughout
        writer.write([drift(NOW + 30 * i)])
        r.run_once(NOW + 30 * i)
    versions = store.query("SELECT uniqExact(Version), min(Version), max(Version) FROM alerts", "JSONCompactEachRow")
    count, oldest, newest = json.loads(versions.data)
    # kept: the last 3 minutes (+ one prune interval of slack), not the whole history
    assert count <= (180 + 60) // 30 + 1 and int(newest) == int((NOW + 30 * 23) * 1000)
    assert int(newest) - int(oldest) <= (180 + 60) * 1000
    sent = len(h.received)
    assert sent == 2  # FeatureDrift and FraudDrift, once each
    r2 = runner(store, tmp_path, url)
    r2.load()
    assert {a.rule: a.state for a in r2.engine.alerts.values()} == {"FeatureDrift": "firing", "FraudDrift": "firing"}
    writer.write([drift(NOW + 30 * 24)])
    r2.run_once(NOW + 30 * 24)
    assert len(h.received) == sent  # remembered: not notified again


def test_a_snapshot_older_than_the_retention_is_kept_when_it_is_the_newest(store, tmp_path):
    r = runner(store, tmp_path, **{"alerts.snapshot_retention": "1m"})
    FindingsWriter(store).write([drift(NOW)])
    r.run_once(NOW)
    r2 = runner(store, tmp_path, **{"alerts.snapshot_retention": "1m"})
    r2.load()
    assert r2.prune(NOW + 86400)  # a day later, nothing newer was written
    assert store.query("SELECT count() FROM alerts WHERE Kind = 'snapshot'", "TabSeparated").data == b"1\n"


def test_a_finding_written_late_with_an_earlier_time_is_still_evaluated(store, tmp_path, hook):
    """Detectors stamp findings with the incident's start; the runner must read them in the order they are written."""
    url, h = hook
    r = runner(store, tmp_path, url)
    writer = FindingsWriter(store)
    writer.write([drift(NOW + 10, model="ranker")])  # written first, stamped later
    assert [n.rule for n in r.run_once(NOW + 10)] == ["FeatureDrift"]
    late = Finding(time=NOW + 2, kind="straggler_rank", subject="job=llm rank=13 node=node-1 gpu=5",
                   severity="warning", statistic=0.15, threshold=0.1)
    writer.write([late])  # written second, stamped earlier than anything seen so far
    notes = r.run_once(NOW + 12)
    assert [(n.rule, n.subject) for n in notes] == [("TrainingStragglerRank", "job=llm rank=13 node=node-1 gpu=5")]
    assert r.run_once(NOW + 14) == []  # read once, not again from the overlap
    assert h.errors == [] and [m["rule"] for m in h.received] == ["FeatureDrift", "TrainingStragglerRank"]
