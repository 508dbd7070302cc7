"""The durable alert outbox: retries with backoff, attempt records, restart, idempotency, secrets."""

from __future__ import annotations

import doctest
import json
import logging
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import free_port
from stethoscope.alerts import outbox as outbox_module
from stethoscope.alerts.notifiers import (
    AlertmanagerNotifier,
    PagerDutyNotifier,
    SlackNotifier,
    WebhookNotifier,
)
from stethoscope.alerts.outbox import ACTIVE_ID, Backoff, Outbox, entry_id
from stethoscope.alerts.runner import runner_from_config
from stethoscope.alerts.signing import verify
from stethoscope.alerts.state import Notification
from stethoscope.analytics.findings import Finding, FindingsWriter
from test_alerts_alertmanager import BINARY, alertmanager, receiver  # noqa: F401 - fixtures

from stethoscope.config import load_config
from stethoscope.errors import ConfigError

NOW = 1_718_000_000.0
SECRET = "outbox-test-secret"
FIRING = Notification("firing", "new", "0123456789abcdef", '{}:{alertname="TrainingNaN"}', "TrainingNaN", "critical",
                      {"alertname": "TrainingNaN", "job": "llm"}, {"summary": "NaN"}, "job=llm rank=0", NOW, None)
RESOLVED = Notification(**{**FIRING.__dict__, "status": "resolved", "reason": "resolved", "ends_at": NOW + 60})


class Receiver:
    """A loopback receiver answering each POST with the next status of ``statuses`` (then 200)."""

    def __init__(self, statuses=(), port=0, body=b"ok"):
        self.statuses, self.body = list(statuses), body
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        rec = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                data = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                rec.requests.append((self.path, dict(self.headers), data))
                status = rec.statuses.pop(0) if rec.statuses else 200
                self.send_response(status)
                self.send_header("Content-Length", str(len(rec.body)))
                self.end_headers()
                self.wfile.write(rec.body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receivers():
    made = []

    def make(*args, **kw):
        r = Receiver(*args, **kw)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


def attempts(store, where="1"):
    data = store.query(f"SELECT OutboxId, Notifier, Fingerprint, Rule, Status, Attempt, HttpStatus, Error, "
                       f"toUnixTimestamp64Milli(NextAttemptAt) AS Next, toUnixTimestamp64Milli(Time) AS T, Body "
                       f"FROM notification_attempts WHERE {where} ORDER BY Time, Attempt", "JSONEachRow").data
    return [json.loads(line) for line in data.splitlines()]


def test_the_module_examples_run():
    res = doctest.testmod(outbox_module)
    assert res.attempted > 0 and res.failed == 0


def test_a_receiver_that_is_down_gets_the_notification_later_and_every_attempt_is_recorded(store, receivers):
    rec = receivers([503, 503, 502])
    box = Outbox(store, {"webhook": WebhookNotifier(rec.url + "/hook", SECRET)}, rng=random.Random(1))
    (e,) = box.enqueue([("webhook", FIRING, "")], NOW)
    assert e.id == entry_id(FIRING, "webhook")
    rows = attempts(store)
    assert [(r["Status"], r["Attempt"]) for r in rows] == [("queued", 0)]  # stored before the first attempt
    assert json.loads(rows[0]["Body"])["rule"] == "TrainingNaN"

    now, delays = NOW, []
    while box.pending:
        if delays:
            assert box.flush(now - 0.01) == []  # nothing is attempted before it is due
        assert len(box.flush(now)) == 1
        if box.pending:
            delays.append(box.next_due() - now)
            now = box.next_due()
    # 1 s doubling, each drawn from the upper half of its step
    assert len(delays) == 3
    for n, d in enumerate(delays):
        assert 2 ** n / 2 <= d <= 2 ** n
    rows = attempts(store)
    assert [(r["Status"], r["Attempt"], r["HttpStatus"]) for r in rows] == [
        ("queued", 0, 0), ("retry", 1, 503), ("retry", 2, 503), ("retry", 3, 502), ("delivered", 4, 200)]
    assert all(r["OutboxId"] == e.id and r["Fingerprint"] == FIRING.fingerprint for r in rows)
    assert [r["Next"] for r in rows[1:4]] == sorted(r["Next"] for r in rows[1:4])
    # the same Idempotency-Key on every attempt, and each one correctly signed
    assert len(rec.requests) == 4
    assert {h["Idempotency-Key"] for _, h, _ in rec.requests} == {e.id}
    for _, headers, body in rec.requests:
        verify(SECRET, headers, body, time.time())


def test_a_refused_notification_fails_at_once_and_is_not_retried(store, receivers):
    rec = receivers([400])
    box = Outbox(store, {"webhook": WebhookNotifier(rec.url, SECRET)})
    box.enqueue([("webhook", FIRING, "")], NOW)
    (d,) = box.flush(NOW)
    assert (d.ok, d.status) == (False, 400)
    assert box.pending == {} and box.next_due() is None
    assert [r["Status"] for r in attempts(store)] == ["queued", "failed"]
    assert box.flush(NOW + 3600) == [] and len(rec.requests) == 1


def test_an_undeliverable_notification_expires_after_the_maximum_age(store):
    url = f"http://127.0.0.1:{free_port()}/hook"  # nothing listens
    box = Outbox(store, {"webhook": WebhookNotifier(url, SECRET, timeout=2)}, max_age_s=60,
                 backoff=Backoff(1, 20), rng=random.Random(3))
    box.enqueue([("webhook", FIRING, "")], NOW)
    now = NOW
    while box.pending:
        box.flush(now)
        now = max(box.next_due() or now, now + 1)
    statuses = [r["Status"] for r in attempts(store)]
    assert statuses[0] == "queued" and statuses[-1] == "expired"
    assert set(statuses[1:-1]) == {"retry"} and len(statuses) > 4
    expired = attempts(store, "Status = 'expired'")[0]
    assert "not delivered within 60 s" in expired["Error"] and expired["T"] >= (NOW + 60) * 1000


def test_an_unreachable_receiver_costs_one_attempt_per_flush(store):
    url = f"http://127.0.0.1:{free_port()}/hook"
    box = Outbox(store, {"webhook": WebhookNotifier(url, SECRET, timeout=2)}, rng=random.Random(5))
    notes = [Notification(**{**FIRING.__dict__, "fingerprint": f"{i:016x}"}) for i in range(3)]
    box.enqueue([("webhook", n, "") for n in notes], NOW)
    assert len(box.flush(NOW)) == 1
    assert len({e.next_at for e in box.pending.values()}) == 1 and len(box.pending) == 3
    assert [r["Status"] for r in attempts(store)].count("retry") == 1


def test_pending_notifications_survive_a_restart_and_are_never_sent_twice(store, tmp_path):
    """A receiver down across a restart of the runner: delivered once when it comes back."""
    port = free_port()
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules: []\n")
    cfg = load_config(environ={}, overrides={"alerts.webhook_url": f"http://127.0.0.1:{port}/hook"})
    env = {"STETHOSCOPE_WEBHOOK_SECRET": SECRET}
    nan = Finding(time=NOW, kind="training_nan", subject="job=llm rank=0 node=n1 gpu=0", severity="critical")
    FindingsWriter(store).write([nan])
    r1 = runner_from_config(cfg, store, environ=env)
    assert [(n.rule, n.reason) for n in r1.run_once(NOW + 1)] == [("TrainingNaN", "new")]
    assert [d.ok for d in r1.deliveries] == [False] and len(r1.outbox.pending) == 1
    (pending,) = r1.outbox.pending.values()

    # "restart": a fresh runner on the same store; the undelivered entry comes back from the table
    r2 = runner_from_config(cfg, store, environ=env)
    r2.load()
    assert list(r2.outbox.pending) == [pending.id]
    restored = r2.outbox.pending[pending.id]
    assert restored.notification == pending.notification and restored.attempt == 1
    assert abs(restored.next_at - pending.next_at) < 0.002
    # a crash before the engine's snapshot would evaluate the same alert again: same id, not queued twice
    assert r2.outbox.enqueue([("webhook", pending.notification, "")], NOW + 2) == []

    rec = Receiver(port=port)
    try:
        assert r2.tick(NOW + 1) == [] and rec.requests == []  # not due yet
        r2.tick(restored.next_at + 0.01)
        assert [d.ok for d in r2.deliveries] == [True]
        r2.tick(NOW + 3600)
        r3 = runner_from_config(cfg, store, environ=env)
        r3.load()
        assert r3.outbox.pending == {}
        r3.tick(NOW + 3600)
        assert len(rec.requests) == 1
        assert rec.requests[0][1]["Idempotency-Key"] == pending.id
        assert json.loads(rec.requests[0][2])["rule"] == "TrainingNaN"
    finally:
        rec.close()
    assert [r["Status"] for r in attempts(store, f"OutboxId = '{pending.id}'")] == ["queued", "retry", "delivered"]


def test_secrets_never_reach_the_attempts_table_or_the_log(store, receivers, caplog):
    routing_key = "R0UT1NGKEY0123456789abcdef"
    rec = receivers([500, 500, 500], body=f"bad key {routing_key} for {SECRET}".encode())
    slack_url = rec.url + "/services/T000/B000/XXXXSLACKTOKENXXXX"
    rec.body = f"bad key {routing_key} for {SECRET} at {slack_url}".encode()
    notifiers = {"pagerduty": PagerDutyNotifier(routing_key, url=rec.url + "/v2/enqueue"),
                 "webhook": WebhookNotifier(rec.url + "/hook", SECRET), "slack": SlackNotifier(slack_url)}
    box = Outbox(store, notifiers)
    box.enqueue([(name, FIRING, "") for name in notifiers], NOW)
    with caplog.at_level(logging.DEBUG):
        assert [d.ok for d in box.flush(NOW)] == [False, False, False]
    dump = store.query("SELECT * FROM notification_attempts FORMAT TSV", "TSV").data.decode()
    assert "***" in dump and "HTTP 500" in dump
    for secret in (routing_key, SECRET, "XXXXSLACKTOKENXXXX"):
        assert secret not in dump
        assert secret not in caplog.text


def test_alertmanager_gets_the_firing_alerts_each_run_and_a_resolution_it_missed_later(store, receivers):
    am = receivers([200, 503, 200])
    box = Outbox(store, {"alertmanager": AlertmanagerNotifier(am.url)}, rng=random.Random(2))
    box.enqueue([("alertmanager", FIRING, "")], NOW)
    (d,) = box.flush(NOW, alertmanager_active=[FIRING])  # new + the re-post in one request
    assert d.ok and len(am.requests) == 1 and am.requests[0][0] == "/api/v2/alerts"
    assert [a["labels"]["alertname"] for a in json.loads(am.requests[0][2])] == ["TrainingNaN"]

    box.enqueue([("alertmanager", RESOLVED, "")], NOW + 60)
    (d,) = box.flush(NOW + 60, alertmanager_active=[])
    assert (d.ok, d.status) == (False, 503) and len(box.pending) == 1
    box.flush(box.next_due())
    assert box.pending == {}
    posted = json.loads(am.requests[-1][2])
    assert posted[0]["endsAt"] == "2024-06-10T06:14:20Z" and len(am.requests) == 3
    rows = attempts(store)
    assert [(r["OutboxId"] == ACTIVE_ID, r["Status"]) for r in rows if r["Status"] != "queued"] == [
        (False, "delivered"), (True, "delivered"), (False, "retry"), (False, "delivered")]


def test_a_notifier_no_longer_configured_fails_its_entries_with_a_reason(store):
    box = Outbox(store, {"webhook": WebhookNotifier("http://127.0.0.1:9/", SECRET)})
    box.enqueue([("webhook", FIRING, "")], NOW)
    restarted = Outbox(store, {})
    restarted.load()
    assert len(restarted.pending) == 1
    restarted.flush(NOW)
    assert restarted.pending == {}
    assert "notifier 'webhook' is not configured" in attempts(store, "Status = 'failed'")[0]["Error"]


def test_bad_outbox_settings_are_configuration_errors():
    with pytest.raises(ConfigError, match="backoff"):
        Backoff(10, 1)
    with pytest.raises(ConfigError, match="max age"):
        Outbox(None, {}, max_age_s=0)
    with pytest.raises(ConfigError, match="alerts.outbox_backoff"):
        load_config(environ={"STETHOSCOPE_ALERTS_OUTBOX_BACKOFF": "soon"})


def test_migration_5_creates_the_attempts_table_as_fresh_creation_does(store):
    from stethoscope.alerts.schema import ATTEMPT_COLUMNS
    from stethoscope.exporters import schema

    migration = next(m for m in schema.MIGRATIONS if m.version == 5)
    assert schema.NOTIFICATION_ATTEMPTS_TABLE.column_names == ATTEMPT_COLUMNS
    store.execute("CREATE DATABASE migrated")
    for stmt in migration.statements:
        store.execute(stmt.format(db="`migrated`", on_cluster=""))
    ddl = {}
    for db in ("stethoscope", "migrated"):
        out = store.query(f"SELECT create_table_query FROM system.tables WHERE database = '{db}' "
                          "AND name = 'notification_attempts'", "JSONCompactEachRow", readonly=False).data.decode()
        ddl[db] = json.loads(out)[0].replace(f"{db}.", "DB.")
    assert ddl["stethoscope"] == ddl["migrated"]
    assert "PARTITION BY toDate(Time)" in ddl["migrated"]


def test_a_notifier_plugin_that_raises_is_a_failed_attempt_not_a_crash(store):
    class Broken:
        name = "broken"

        def send(self, notification):
            raise RuntimeError("plugin bug")

    box = Outbox(store, {"broken": Broken()}, rng=random.Random(0))
    box.enqueue([("broken", FIRING, "")], NOW)
    (d,) = box.flush(NOW)
    assert not d.ok and "RuntimeError: plugin bug" in d.reason and len(box.pending) == 1
    assert [r["Status"] for r in attempts(store)] == ["queued", "retry"]


@pytest.mark.e2e
@pytest.mark.skipif(not BINARY.exists(), reason="prometheus-alertmanager is not installed "
                    "(apt-get install --no-install-recommends prometheus-alertmanager)")
def test_the_runner_fires_and_resolves_through_a_real_alertmanager(store, alertmanager, receiver):  # noqa: F811
    """Outbox semantics end to end: runner -> outbox -> prometheus-alertmanager -> its webhook."""
    from test_alerts_alertmanager import next_payload

    _, got = receiver
    cfg = load_config(environ={}, overrides={"alerts.alertmanager_url": alertmanager, "alerts.resolve_after": "1s"})
    r = runner_from_config(cfg, store, environ={})
    t0 = time.time()
    FindingsWriter(store).write([Finding(time=t0, kind="gpu_xid", subject="node=n1 gpu=3", severity="critical")])
    assert [(n.rule, n.reason) for n in r.run_once(t0 + 0.1)] == [("GpuXidCritical", "new")]
    assert [d.ok for d in r.deliveries] == [True]
    (a,) = next_payload(got, "firing")["alerts"]
    assert (a["labels"]["alertname"], a["labels"]["node"], a["labels"]["gpu"]) == ("GpuXidCritical", "n1", "3")
    notes = r.run_once(t0 + 2)
    assert [(n.rule, n.status) for n in notes] == [("GpuXidCritical", "resolved")]
    (a,) = next_payload(got, "resolved")["alerts"]
    assert a["status"] == "resolved" and a["labels"]["node"] == "n1"
    assert [(x["Status"], x["HttpStatus"]) for x in attempts(store, f"OutboxId != '{ACTIVE_ID}'")] == [
        ("queued", 0), ("delivered", 200), ("queued", 0), ("delivered", 200)]
