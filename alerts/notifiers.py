"""Notifiers: deliver a :class:`~stethoscope.alerts.state.Notification` somewhere.

Each has ``name`` and ``send(notification) -> Delivery``. ``send`` never raises: a
network error, a timeout or an unexpected HTTP status becomes ``Delivery(ok=False,
reason=...)``. All use ``urllib`` with a timeout. The built-in ones also take
``idempotency_key`` (the outbox entry id, see :mod:`.outbox`): the webhook sends it as
an ``Idempotency-Key`` header; PagerDuty has its ``dedup_key`` and Alertmanager merges
by label set, so they ignore it. ``secrets`` lists what must never reach a log or the
``notification_attempts`` table (signing secret, routing key, a Slack URL's token).

* :class:`AlertmanagerNotifier` - ``POST {url}/api/v2/alerts`` (API v2 postable alerts).
* :class:`WebhookNotifier` - JSON body signed with HMAC-SHA256 (see :mod:`.signing`).
* :class:`PagerDutyNotifier` - Events API v2 trigger/resolve, ``dedup_key`` = fingerprint.
* :class:`SlackNotifier` - incoming webhook with ``text`` and ``blocks``.

Examples
--------
>>> from stethoscope.alerts.state import Notification
>>> n = Notification("firing", "new", "ab12", "{}:{alertname=\\"Hot\\"}", "Hot", "critical",
...                  {"alertname": "Hot"}, {"summary": "GPU hot"}, "gpu=0", 0.0, None)
>>> postable_alert(n, now=60.0)["labels"], postable_alert(n, now=60.0)["startsAt"]
({'alertname': 'Hot'}, '1970-01-01T00:00:00Z')
>>> SlackNotifier("http://127.0.0.1:9/").send(n, timeout=0.5).ok
False
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Protocol

from .signing import sign_headers
from .state import Notification

__all__ = [
    "Delivery", "Notifier", "AlertmanagerNotifier", "WebhookNotifier", "PagerDutyNotifier", "SlackNotifier",
    "PAGERDUTY_URL", "postable_alert", "notification_json", "rfc3339", "dispatch", "retryable",
]

PAGERDUTY_URL = "https://events.pagerduty.com/v2/enqueue"


@dataclass(frozen=True)
class Delivery:
    """What happened to one send: ``status`` is the HTTP status (0 when no response)."""

    notifier: str
    ok: bool
    status: int = 0
    reason: str = ""
    body: str = ""


class Notifier(Protocol):
    name: str

    def send(self, notification: Notification) -> Delivery: ...


def retryable(d: Delivery) -> bool:
    """Whether a failed delivery may succeed later: no response, 408, 425, 429 or 5xx.

    Any other 4xx means the receiver refused this request for good (bad payload,
    wrong signature or key), and sending it again would only repeat that.

    >>> retryable(Delivery("x", False, 0)), retryable(Delivery("x", False, 503)), retryable(Delivery("x", False, 400))
    (True, True, False)
    """
    return not d.ok and (d.status in (0, 408, 425, 429) or d.status >= 500)


def rfc3339(t: float) -> str:
    """``2026-01-02T03:04:05.123Z`` (milliseconds only when non-zero)."""
    dt = datetime.fromtimestamp(t, tz=timezone.utc)
    s = dt.strftime("%Y-%m-%dT%H:%M:%S")
    ms = int(round((t - int(t)) * 1000)) if t >= 0 else 0
    return s + (f".{ms:03d}" if 0 < ms < 1000 else "") + "Z"


def _post(name: str, url: str, body: bytes, headers: Mapping[str, str], timeout: float, ok: Iterable[int]) -> Delivery:
    try:
        req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json", **headers})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, text = resp.status, resp.read(65536).decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        text = exc.read(65536).decode("utf-8", "replace") if exc.fp else ""
        return Delivery(name, False, exc.code, f"HTTP {exc.code}: {text.strip()[:200] or exc.reason}", text)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return Delivery(name, False, 0, f"{type(exc).__name__}: {reason}")
    if status not in set(ok):
        return Delivery(name, False, status, f"unexpected HTTP {status}: {text.strip()[:200]}", text)
    return Delivery(name, True, status, "", text)


# --- Alertmanager -----------------------------------------------------------------------


def postable_alert(n: Notification, now: float, generator_url: str = "") -> dict[str, Any]:
    """An API v2 ``postableAlert``. Firing alerts carry no ``endsAt`` (Alertmanager adds
    ``resolve_timeout``), so keep re-posting them; a resolved one has ``endsAt`` = when it
    resolved (``now`` if unknown), also when the outbox delivers it late."""
    out: dict[str, Any] = {
        "labels": {str(k): str(v) for k, v in n.labels.items()},
        "annotations": {str(k): str(v) for k, v in n.annotations.items()},
        "startsAt": rfc3339(n.starts_at),
    }
    if n.status == "resolved":
        out["endsAt"] = rfc3339(n.ends_at if n.ends_at is not None else now)
    if generator_url:
        out["generatorURL"] = generator_url
    return out


class AlertmanagerNotifier:
    """Posts to Alertmanager's API v2. ``url`` is its base, e.g. ``http://127.0.0.1:9093``."""

    def __init__(self, url: str, *, name: str = "alertmanager", generator_url: str = "", timeout: float = 10.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.url, self.name, self.generator_url, self.timeout, self.clock = url.rstrip("/"), name, generator_url, timeout, clock
        self.secrets: tuple[str, ...] = ()

    def send(self, notification: Notification, *, idempotency_key: str = "") -> Delivery:
        return self.send_many([notification])

    def send_many(self, notifications: Sequence[Notification]) -> Delivery:
        """One POST with every alert; post :meth:`AlertEngine.firing` each evaluation to keep them active."""
        now = self.clock()
        body = json.dumps([postable_alert(n, now, self.generator_url) for n in notifications]).encode()
        return _post(self.name, self.url + "/api/v2/alerts", body, {}, self.timeout, (200,))


# --- generic webhook ---------------------------------------------------------------------


def notification_json(n: Notification) -> dict[str, Any]:
    """The generic webhook body: the notification's fields, times in RFC 3339."""
    return {
        "version": "1", "status": n.status, "reason": n.reason, "fingerprint": n.fingerprint,
        "groupKey": n.group_key, "rule": n.rule, "severity": n.severity, "subject": n.subject,
        "labels": dict(n.labels), "annotations": dict(n.annotations), "startsAt": rfc3339(n.starts_at),
        "endsAt": rfc3339(n.ends_at) if n.ends_at is not None else None, "value": n.value,
    }


class WebhookNotifier:
    """POSTs :func:`notification_json`, signed with ``secret`` (headers from :func:`.signing.sign_headers`)."""

    def __init__(self, url: str, secret: str | bytes, *, name: str = "webhook", timeout: float = 10.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.url, self.secret, self.name, self.timeout, self.clock = url, secret, name, timeout, clock
        self.secrets = (secret.decode("utf-8", "replace") if isinstance(secret, bytes) else secret,)

    def send(self, notification: Notification, *, idempotency_key: str = "") -> Delivery:
        """POST the signed body; ``idempotency_key`` (stable across retries) goes in ``Idempotency-Key``."""
        body = json.dumps(notification_json(notification), sort_keys=True, separators=(",", ":")).encode()
        headers = sign_headers(self.secret, body, self.clock())
        if idempotency_key:
            headers = {**headers, "Idempotency-Key": idempotency_key}
        return _post(self.name, self.url, body, headers, self.timeout, range(200, 300))


# --- PagerDuty ---------------------------------------------------------------------------


class PagerDutyNotifier:
    """Events API v2: ``trigger`` while firing, ``resolve`` when resolved; ``dedup_key`` = fingerprint."""

    def __init__(self, routing_key: str, *, url: str = PAGERDUTY_URL, source: str = "stethoscope",
                 name: str = "pagerduty", timeout: float = 10.0) -> None:
        self.routing_key, self.url, self.source, self.name, self.timeout = routing_key, url, source, name, timeout
        self.secrets = (routing_key,)

    def event(self, n: Notification) -> dict[str, Any]:
        if n.status == "resolved":
            return {"routing_key": self.routing_key, "event_action": "resolve", "dedup_key": n.fingerprint}
        summary = n.annotations.get("summary", n.rule)
        if n.subject:
            summary = f"{summary} ({n.subject})"
        links = [{"href": n.annotations[k], "text": t} for k, t in (("runbook_url", "Runbook"), ("dashboard_url", "Dashboard"))
                 if n.annotations.get(k)]
        event: dict[str, Any] = {
            "routing_key": self.routing_key, "event_action": "trigger", "dedup_key": n.fingerprint,
            "payload": {
                "summary": summary[:1024], "source": n.labels.get("node") or self.source, "severity": n.severity,
                "timestamp": rfc3339(n.starts_at), "group": n.rule, "class": n.labels.get("team", ""),
                "custom_details": {"labels": dict(n.labels), "annotations": dict(n.annotations), "value": n.value},
            },
        }
        if links:
            event["links"] = links
        return event

    def send(self, notification: Notification, *, idempotency_key: str = "") -> Delivery:
        body = json.dumps(self.event(notification)).encode()
        return _post(self.name, self.url, body, {}, self.timeout, (200, 202))


# --- Slack -------------------------------------------------------------------------------


class SlackNotifier:
    """Incoming webhook: ``text`` (the fallback line) and ``blocks`` (header, details, links)."""

    def __init__(self, url: str, *, name: str = "slack", timeout: float = 10.0) -> None:
        self.url, self.name, self.timeout = url, name, timeout
        self.secrets = (url,)  # the path of an incoming-webhook URL is its credential

    @staticmethod
    def message(n: Notification) -> dict[str, Any]:
        icon = ":white_check_mark:" if n.status == "resolved" else (":rotating_light:" if n.severity == "critical" else ":warning:")
        summary = n.annotations.get("summary", n.rule)
        text = f"{icon} [{n.status.upper()}] {n.rule}: {summary}" + (f" ({n.subject})" if n.subject else "")
        fields = [{"type": "mrkdwn", "text": f"*{k}*: {v}"} for k, v in sorted(n.labels.items())][:10]
        blocks: list[dict[str, Any]] = [
            {"type": "header", "text": {"type": "plain_text", "text": f"[{n.status.upper()}] {n.rule}"[:150]}},
            {"type": "section", "text": {"type": "mrkdwn", "text": summary}, **({"fields": fields} if fields else {})},
        ]
        links = [f"<{n.annotations[k]}|{t}>" for k, t in (("runbook_url", "Runbook"), ("dashboard_url", "Dashboard"))
                 if n.annotations.get(k)]
        if links:
            blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": " | ".join(links)}]})
        return {"text": text, "blocks": blocks}

    def send(self, notification: Notification, timeout: float | None = None, *, idempotency_key: str = "") -> Delivery:
        body = json.dumps(self.message(notification)).encode()
        return _post(self.name, self.url, body, {}, self.timeout if timeout is None else timeout, (200,))


def dispatch(notifications: Iterable[Notification], notifiers: Mapping[str, Notifier],
             default: Sequence[str] = ()) -> list[Delivery]:
    """Send each notification to the notifiers its rule's ``actions`` name (``default`` when none).

    An unknown name yields a failed :class:`Delivery` rather than an exception.
    """
    out: list[Delivery] = []
    for n in notifications:
        for name in n.actions or default:
            notifier = notifiers.get(name)
            out.append(notifier.send(n) if notifier else Delivery(name, False, 0, f"no notifier named {name!r}"))
    return out
