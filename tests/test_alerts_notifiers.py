"""Notifiers against local http.server fakes (exact paths and payloads), and webhook signatures."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from stethoscope.alerts import (
    AlertmanagerNotifier,
    PagerDutyNotifier,
    ReplayCache,
    SignatureError,
    SlackNotifier,
    WebhookNotifier,
    dispatch,
    sign_headers,
    verify,
)
from stethoscope.alerts.state import Notification
from tests.conftest import free_port

FIRING = Notification(
    status="firing", reason="new", fingerprint="0123456789abcdef", group_key='{}:{alertname="HotGpu"}', rule="HotGpu",
    severity="critical", labels={"alertname": "HotGpu", "severity": "critical", "node": "n1", "gpu": "0"},
    annotations={"summary": "GPU temperature above 85 °C", "runbook_url": "docs/runbooks/gpu-temperature-high.md"},
    subject="gpu=0", starts_at=1_700_000_000.0, ends_at=None, actions=("pagerduty", "slack"),
)
RESOLVED = Notification(**{**FIRING.__dict__, "status": "resolved", "reason": "resolved", "ends_at": 1_700_000_600.0})


class Fake:
    """A loopback HTTP server that records requests and answers with a fixed status and body."""

    def __init__(self, status=200, body=b""):
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                data = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                fake.requests.append((self.path, dict(self.headers), data))
                self.send_response(fake.status)
                self.send_header("Content-Length", str(len(fake.body)))
                self.end_headers()
                self.wfile.write(fake.body)

            def log_message(self, *args):
                pass

        self.status, self.body = status, body
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def json(self, i=-1):
        return json.loads(self.requests[i][2])

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def fake():
    servers: list[Fake] = []

    def make(status=200, body=b""):
        servers.append(Fake(status, body))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def test_alertmanager_posts_postable_alerts(fake):
    am = fake(200)
    n = AlertmanagerNotifier(am.url + "/", generator_url="http://steth/alerts", clock=lambda: 1_700_000_600.0)
    d = n.send(FIRING)
    assert d.ok and d.status == 200 and d.notifier == "alertmanager"
    path, headers, _ = am.requests[0]
    assert path == "/api/v2/alerts" and headers["Content-Type"] == "application/json"
    assert am.json(0) == [{
        "labels": dict(FIRING.labels), "annotations": dict(FIRING.annotations),
        "startsAt": "2023-11-14T22:13:20Z", "generatorURL": "http://steth/alerts",
    }]
    assert n.send(RESOLVED).ok
    assert am.json(1)[0]["endsAt"] == "2023-11-14T22:23:20Z"
    assert n.send_many([FIRING, RESOLVED]).ok and len(am.json(2)) == 2


def test_alertmanager_rejection_is_a_failed_delivery(fake):
    am = fake(422, b'{"code":602,"message":"0.labels in body is required"}')
    d = AlertmanagerNotifier(am.url).send(FIRING)
    assert not d.ok and d.status == 422 and "labels in body is required" in d.reason


def test_webhook_signs_and_receiver_verifies(fake):
    hook = fake(204)
    d = WebhookNotifier(hook.url + "/hooks/steth", "s3cret", clock=lambda: 1_700_000_001.0).send(FIRING)
    assert d.ok and d.status == 204
    path, headers, body = hook.requests[0]
    assert path == "/hooks/steth"
    assert headers["X-Stethoscope-Timestamp"] == "1700000001"
    assert headers["X-Stethoscope-Signature"].startswith("sha256=")
    doc = json.loads(body)
    assert (doc["status"], doc["fingerprint"], doc["rule"], doc["endsAt"]) == ("firing", FIRING.fingerprint, "HotGpu", None)
    cache = ReplayCache()
    verify("s3cret", headers, body, now=1_700_000_010, seen=cache)
    with pytest.raises(SignatureError, match="replay"):
        verify("s3cret", headers, body, now=1_700_000_011, seen=cache)


def test_verify_rejects_tampering_old_timestamps_and_missing_headers():
    body = b'{"status":"firing"}'
    h = sign_headers("k", body, now=1000)
    verify("k", {k.lower(): v for k, v in h.items()}, body, now=1000)  # header names are case-insensitive
    with pytest.raises(SignatureError, match="does not match"):
        verify("k", h, body.replace(b"firing", b"resolved"), now=1000)
    with pytest.raises(SignatureError, match="does not match"):
        verify("other", h, body, now=1000)
    with pytest.raises(SignatureError, match="does not match"):  # timestamp swapped: signature no longer covers it
        verify("k", {**h, "X-Stethoscope-Timestamp": "1001"}, body, now=1000)
    with pytest.raises(SignatureError, match="tolerance"):
        verify("k", h, body, now=1000 + 301)
    with pytest.raises(SignatureError, match="tolerance"):
        verify("k", h, body, now=1000 - 301)
    verify("k", h, body, now=1300)
    with pytest.raises(SignatureError, match="missing"):
        verify("k", {}, body, now=1000)
    with pytest.raises(SignatureError, match="not an integer"):
        verify("k", {**h, "X-Stethoscope-Timestamp": "soon"}, body, now=1000)


def test_pagerduty_trigger_and_resolve(fake):
    pd = fake(202, b'{"status":"success","message":"Event processed","dedup_key":"0123456789abcdef"}')
    n = PagerDutyNotifier("R" * 32, url=pd.url + "/v2/enqueue")
    d = n.send(FIRING)
    assert d.ok and d.status == 202 and "Event processed" in d.body
    assert pd.requests[0][0] == "/v2/enqueue"
    ev = pd.json(0)
    assert ev["routing_key"] == "R" * 32 and ev["event_action"] == "trigger" and ev["dedup_key"] == FIRING.fingerprint
    assert ev["payload"]["summary"] == "GPU temperature above 85 °C (gpu=0)"
    assert ev["payload"]["source"] == "n1" and ev["payload"]["severity"] == "critical"
    assert ev["links"] == [{"href": "docs/runbooks/gpu-temperature-high.md", "text": "Runbook"}]
    assert n.send(RESOLVED).ok
    assert pd.json(1) == {"routing_key": "R" * 32, "event_action": "resolve", "dedup_key": FIRING.fingerprint}


def test_slack_text_and_blocks(fake):
    slack = fake(200, b"ok")
    assert SlackNotifier(slack.url + "/services/T0/B0/x").send(FIRING).ok
    path, _, _ = slack.requests[0]
    msg = slack.json(0)
    assert path == "/services/T0/B0/x"
    assert msg["text"] == ":rotating_light: [FIRING] HotGpu: GPU temperature above 85 °C (gpu=0)"
    assert msg["blocks"][0] == {"type": "header", "text": {"type": "plain_text", "text": "[FIRING] HotGpu"}}
    assert SlackNotifier(slack.url).send(RESOLVED).ok
    assert slack.json(1)["text"].startswith(":white_check_mark: [RESOLVED] HotGpu")


def test_send_never_raises():
    closed = f"http://127.0.0.1:{free_port()}"
    for n in (AlertmanagerNotifier(closed, timeout=2), WebhookNotifier(closed, "k", timeout=2),
              PagerDutyNotifier("k", url=closed, timeout=2), SlackNotifier(closed, timeout=2),
              SlackNotifier("not a url")):
        d = n.send(FIRING)
        assert not d.ok and d.status == 0 and d.reason


def test_slack_error_text_is_the_reason(fake):
    slack = fake(400, b"invalid_payload")
    d = SlackNotifier(slack.url).send(FIRING)
    assert (d.ok, d.status) == (False, 400) and "invalid_payload" in d.reason


def test_timeout_is_a_failed_delivery():
    import socket

    with socket.socket() as s:  # accepts connections (backlog) but never answers
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        d = SlackNotifier(f"http://127.0.0.1:{s.getsockname()[1]}", timeout=0.3).send(FIRING)
    assert not d.ok and "timed out" in d.reason.lower()


def test_dispatch_routes_by_actions(fake):
    pd, slack = fake(202, b"{}"), fake(200, b"ok")
    notifiers = {"pagerduty": PagerDutyNotifier("k", url=pd.url), "slack": SlackNotifier(slack.url)}
    out = dispatch([FIRING, Notification(**{**FIRING.__dict__, "actions": ()})], notifiers, default=("slack", "email"))
    assert [(d.notifier, d.ok) for d in out] == [("pagerduty", True), ("slack", True), ("slack", True), ("email", False)]
    assert "no notifier named 'email'" in out[-1].reason


def test_a_late_resolution_keeps_the_time_it_resolved(fake):
    am = fake(200)
    n = AlertmanagerNotifier(am.url, clock=lambda: 1_700_003_600.0)  # delivered an hour after it resolved
    assert n.send(RESOLVED).ok
    assert am.json(0)[0]["endsAt"] == "2023-11-14T22:23:20Z"


def test_webhook_sends_the_idempotency_key_outside_the_signature(fake):
    hook = fake(200)
    n = WebhookNotifier(hook.url, "s3cret", clock=lambda: 1_700_000_001.0)
    assert n.send(FIRING, idempotency_key="k-123").ok and n.send(FIRING).ok
    (_, with_key, body1), (_, without, body2) = hook.requests
    assert with_key["Idempotency-Key"] == "k-123" and "Idempotency-Key" not in without
    assert body1 == body2 and with_key["X-Stethoscope-Signature"] == without["X-Stethoscope-Signature"]
    verify("s3cret", with_key, body1, now=1_700_000_002)


def test_which_failures_are_retried():
    from stethoscope.alerts.notifiers import Delivery, retryable

    assert [retryable(Delivery("x", False, s)) for s in (0, 408, 425, 429, 500, 503)] == [True] * 6
    assert [retryable(Delivery("x", False, s)) for s in (400, 401, 403, 404, 422)] == [False] * 5
    assert not retryable(Delivery("x", True, 200))


def test_every_builtin_notifier_names_its_secrets():
    assert WebhookNotifier("http://h/", b"bytes-secret").secrets == ("bytes-secret",)
    assert PagerDutyNotifier("rk-123").secrets == ("rk-123",)
    assert SlackNotifier("https://hooks.slack.com/services/T/B/X").secrets == ("https://hooks.slack.com/services/T/B/X",)
    assert AlertmanagerNotifier("http://am:9093").secrets == ()
