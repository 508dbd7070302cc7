"""Alert lifecycle: pending -> firing (after ``for``) -> resolved, with dedup, grouping,
inhibition, silences and a repeat interval. Pure: the clock is the ``now`` you pass.

Each :meth:`AlertEngine.evaluate` is given the findings since the previous one (and
the values of ``expr`` rules). An alert is *active* in an evaluation when at least one
finding matches its rule (or its expression holds); an evaluation in which it is not
active resolves it. One alert exists per fingerprint (rule name + sorted labels +
subject), however many findings match it.

Examples
--------
>>> from stethoscope.alerts.rules import Match, Rule
>>> from stethoscope.analytics.findings import Finding
>>> rule = Rule("HotGpu", "critical", match=Match(("gpu_temperature",)), for_s=60,
...             annotations={"summary": "hot"})
>>> eng = AlertEngine([rule])
>>> hot = Finding(time=0, kind="gpu_temperature", subject="gpu=0", severity="warning", labels={"node": "n1"})
>>> eng.evaluate([hot], now=0)                     # pending
[]
>>> [(n.status, n.reason) for n in eng.evaluate([hot], now=60)]
[('firing', 'new')]
>>> [(n.status, n.reason) for n in eng.evaluate([], now=90)]
[('resolved', 'resolved')]
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import StethoscopeError
from .rules import Rule

__all__ = [
    "Alert", "Notification", "Silence", "InhibitRule", "AlertEngine", "fingerprint", "group_key", "DEFAULT_INHIBIT",
    "group", "expr_values", "subject_labels", "SUBJECT_LABELS",
]

PENDING, FIRING, RESOLVED = "pending", "firing", "resolved"


def fingerprint(rule: str, labels: Mapping[str, str], subject: str = "") -> str:
    """Stable 16-hex id of an alert: the same rule, labels (any order) and subject give the same id.

    >>> fingerprint("A", {"b": "1", "a": "2"}) == fingerprint("A", {"a": "2", "b": "1"})
    True
    """
    canon = json.dumps([rule, sorted((str(k), str(v)) for k, v in labels.items()), subject], separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()[:16]


def group_key(rule: str, labels: Mapping[str, str], by: Sequence[str]) -> str:
    """``{}:{alertname="X",node="n1"}``: the rule name plus the chosen labels, in Alertmanager's style.

    >>> group_key("HotGpu", {"node": "n1", "gpu": "0"}, ["node"])
    '{}:{alertname="HotGpu",node="n1"}'
    """
    parts = [f'alertname="{rule}"'] + [f'{k}="{labels.get(k, "")}"' for k in sorted(set(by) - {"alertname"})]
    return "{}:{" + ",".join(parts) + "}"


@dataclass(frozen=True)
class Silence:
    """Mutes alerts whose labels satisfy every matcher until ``until`` (epoch seconds).

    A matcher value starting with ``~`` is a regex (full match), else it must be equal.
    """

    id: str
    matchers: Mapping[str, str]
    until: float
    comment: str = ""
    created_by: str = ""

    def matches(self, labels: Mapping[str, str], now: float) -> bool:
        if now >= self.until:
            return False
        for k, want in self.matchers.items():
            have = labels.get(k, "")
            if want.startswith("~"):
                if not re.fullmatch(want[1:], have):
                    return False
            elif have != want:
                return False
        return True


@dataclass(frozen=True)
class InhibitRule:
    """A firing alert whose labels include ``source`` mutes other alerts that agree with it on ``equal``."""

    source: Mapping[str, str]
    equal: tuple[str, ...]


#: A ``NodeDown`` or ``NodeUnhealthy`` alert for node X silences every other alert with ``node=X``.
DEFAULT_INHIBIT = (
    InhibitRule({"alertname": "NodeDown"}, ("node",)),
    InhibitRule({"alertname": "NodeUnhealthy"}, ("node",)),
)

#: Keys of a finding's subject (``node=n1 gpu=3``) that become alert labels when the
#: finding's own labels lack them, so grouping and inhibition can use them.
SUBJECT_LABELS = ("node", "gpu", "job", "rank", "model", "version")


def subject_labels(subject: str) -> dict[str, str]:
    """The :data:`SUBJECT_LABELS` named in a finding subject.

    >>> subject_labels("job=llm rank=3 node=n7 gpu=1 step=90")
    {'job': 'llm', 'rank': '3', 'node': 'n7', 'gpu': '1'}
    """
    out: dict[str, str] = {}
    for token in subject.split():
        k, sep, v = token.partition("=")
        if sep and k in SUBJECT_LABELS and v:
            out.setdefault(k, v)
    return out


@dataclass
class Alert:
    """The running state of one alert (one fingerprint)."""

    fingerprint: str
    rule: str
    labels: dict[str, str]
    annotations: dict[str, str]
    subject: str
    state: str
    active_since: float
    last_seen: float
    fired_at: float | None = None
    resolved_at: float | None = None
    last_notified: float | None = None
    value: float | None = None


@dataclass(frozen=True)
class Notification:
    """One alert to send: ``status`` firing|resolved, ``reason`` new|repeat|resolved."""

    status: str
    reason: str
    fingerprint: str
    group_key: str
    rule: str
    severity: str
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    subject: str
    starts_at: float
    ends_at: float | None
    actions: tuple[str, ...] = ()
    value: float | None = None


@dataclass
class AlertEngine:
    """Evaluates rules against findings; holds alert state and silences (serialisable to JSON)."""

    rules: Sequence[Rule]
    group_by: tuple[str, ...] = ()
    repeat_interval_s: float = 4 * 3600.0
    inhibit: Sequence[InhibitRule] = DEFAULT_INHIBIT
    #: How long an alert stays active after its latest matching finding. 0: only while
    #: the current evaluation has one (evaluate exactly once per finding period).
    resolve_after_s: float = 0.0
    alerts: dict[str, Alert] = field(default_factory=dict)
    silences: dict[str, Silence] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._by_name = {r.name: r for r in self.rules}

    # -- silences --

    def add_silence(self, silence: Silence) -> None:
        self.silences[silence.id] = silence

    def expire_silence(self, silence_id: str) -> None:
        self.silences.pop(silence_id, None)

    # -- evaluation --

    def evaluate(self, findings: Iterable[Any], now: float, values: Mapping[str, float | None] | None = None) -> list[Notification]:
        """Advance every alert to ``now``; return what should be sent (resolutions first).

        ``findings`` are the findings since the previous call; ``values`` maps ``expr``
        rule names to the number their SQL returned (see :func:`expr_values`). With
        ``values=None`` the expressions were not evaluated this time: their alerts are
        kept as they are (a quick evaluation between two full ones).

        An alert is active when a finding in this call matches it, or when its latest
        match is less than :attr:`resolve_after_s` old; only a match in this call moves
        it from pending to firing, so ``for`` still needs the condition to go on.
        """
        self.silences = {k: s for k, s in self.silences.items() if now < s.until}
        active: dict[str, tuple[Rule, dict[str, str], str, float | None]] = {}
        for f in findings:
            for rule in self.rules:
                if rule.match is not None and rule.match(f):
                    labels = {**subject_labels(f.subject), **dict(f.labels), **dict(rule.labels), "alertname": rule.name,
                              "severity": rule.severity}
                    active.setdefault(fingerprint(rule.name, labels, f.subject), (rule, labels, f.subject, None))
        for rule in self.rules:
            if values is not None and rule.expr is not None and rule.expr.holds(values.get(rule.name)):
                labels = {**dict(rule.labels), "alertname": rule.name, "severity": rule.severity}
                active[fingerprint(rule.name, labels)] = (rule, labels, "", values.get(rule.name))

        for fp, (rule, labels, subject, value) in active.items():
            a = self.alerts.get(fp)
            if a is None or a.state == RESOLVED:
                a = self.alerts[fp] = Alert(fp, rule.name, labels, dict(rule.annotations), subject, PENDING, now, now)
            a.last_seen, a.value = now, value
            if a.state == PENDING and now - a.active_since >= rule.for_s:
                a.state, a.fired_at = FIRING, now
        kept = set(active)
        for fp, a in self.alerts.items():
            rule = self._by_name.get(a.rule)
            if fp in kept or rule is None or a.state == RESOLVED:
                continue
            if (values is None and rule.expr is not None) or now - a.last_seen < self.resolve_after_s:
                kept.add(fp)

        out: list[Notification] = []
        # Resolve first, so an inhibiting alert that just ended no longer mutes anything.
        for fp in sorted(self.alerts):
            a = self.alerts[fp]
            if fp in kept:
                continue
            rule = self._by_name.get(a.rule)
            if a.state == FIRING:
                a.state, a.resolved_at = RESOLVED, now
                if a.last_notified is not None and rule is not None:
                    out.append(self._note(a, rule, "resolved", "resolved"))
            del self.alerts[fp]  # resolved or pending-and-cleared: a new match opens a fresh alert
        for fp in sorted(kept):
            a = self.alerts[fp]
            rule = self._by_name[a.rule]
            if a.state != FIRING or self._muted(a, now):
                continue
            if a.last_notified is None:
                out.append(self._note(a, rule, "firing", "new"))
            elif now - a.last_notified >= self.repeat_interval_s:
                out.append(self._note(a, rule, "firing", "repeat"))
            else:
                continue
            a.last_notified = now
        return out

    def firing(self, now: float) -> list[Notification]:
        """Every firing, unmuted alert, e.g. to re-post to Alertmanager on each evaluation."""
        return [self._note(a, self._by_name[a.rule], "firing", "active") for fp, a in sorted(self.alerts.items())
                if a.state == FIRING and a.rule in self._by_name and not self._muted(a, now)]

    def _muted(self, a: Alert, now: float) -> bool:
        if any(s.matches(a.labels, now) for s in self.silences.values()):
            return True
        for inh in self.inhibit:
            if all(a.labels.get(k) == v for k, v in inh.source.items()):
                continue  # a source alert never inhibits itself or its kind
            for src in self.alerts.values():
                if (src.state == FIRING and all(src.labels.get(k) == v for k, v in inh.source.items())
                        and all(k in a.labels and src.labels.get(k) == a.labels[k] for k in inh.equal)):
                    return True
        return False

    def _note(self, a: Alert, rule: Rule, status: str, reason: str) -> Notification:
        return Notification(
            status=status, reason=reason, fingerprint=a.fingerprint,
            group_key=group_key(a.rule, a.labels, self.group_by), rule=a.rule, severity=rule.severity,
            labels=dict(a.labels), annotations=dict(a.annotations), subject=a.subject,
            starts_at=a.fired_at if a.fired_at is not None else a.active_since,
            ends_at=a.resolved_at if status == "resolved" else None, actions=rule.actions, value=a.value,
        )

    # -- persistence --

    def state(self) -> dict[str, Any]:
        """JSON-serialisable state: alerts and silences (rules are configuration, not state)."""
        return {
            "alerts": [asdict(a) for _, a in sorted(self.alerts.items())],
            "silences": [{**asdict(s), "matchers": dict(s.matchers)} for _, s in sorted(self.silences.items())],
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        """Replace alerts and silences with those in ``state`` (from :meth:`state`)."""
        self.alerts = {d["fingerprint"]: Alert(**d) for d in state.get("alerts", [])}
        self.silences = {d["id"]: Silence(**d) for d in state.get("silences", [])}

    def to_json(self) -> str:
        return json.dumps(self.state(), sort_keys=True, allow_nan=False)

    def load_json(self, text: str) -> None:
        self.restore(json.loads(text))


def group(notifications: Iterable[Notification]) -> dict[str, list[Notification]]:
    """Notifications by group key, in first-seen order."""
    out: dict[str, list[Notification]] = {}
    for n in notifications:
        out.setdefault(n.group_key, []).append(n)
    return out


def expr_values(rules: Iterable[Rule], query: Any) -> dict[str, float | None]:
    """Run each ``expr`` rule's SQL through ``query(sql) -> float | None``; a failing query gives None."""
    out: dict[str, float | None] = {}
    for r in rules:
        if r.expr is not None:
            try:
                v = query(r.expr.sql)
                out[r.name] = None if v is None else float(v)
            except (StethoscopeError, ValueError, TypeError, OSError):  # a failed query is "no value"
                out[r.name] = None
    return out


