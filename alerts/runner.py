"""The alert runner inside ``up``: new findings in, notifications out, state in the ``alerts`` table.

Every ``interval_s``, :meth:`AlertRunner.run_once` reads the findings written since
the previous run (``Time`` after the newest one it has seen), evaluates the
:class:`~.state.AlertEngine` (with the values of ``expr`` rules), sends the
notifications and saves the engine's state as one snapshot in ``alerts``
(:mod:`.schema`). The newest snapshot is loaded on the first run, so a restart neither
forgets firing alerts nor notifies them again before the repeat interval.

Routing: a notification goes to the notifiers its rule's ``actions`` name, or to every
configured notifier when it names none. ``alertmanager`` is posted every run with
all firing alerts (plus the resolved ones), as Alertmanager expects. A name that is
not configured is skipped; with no notifier at all, notifications are only logged at
INFO.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..analytics.findings import COLUMNS as FINDING_COLUMNS
from .._periodic import Periodic
from ..analytics.findings import Finding
from .notifiers import AlertmanagerNotifier, Delivery, Notifier, PagerDutyNotifier, SlackNotifier, WebhookNotifier
from .schema import COLUMNS, from_rows, to_rows
from .state import AlertEngine, Notification, expr_values

if TYPE_CHECKING:
    from ..config import Config

__all__ = ["AlertRunner", "NOTIFIER_NAMES", "notifiers_from_config", "runner_from_config"]

log = logging.getLogger(__name__)

#: The notifier names a rule's ``actions`` may use.
NOTIFIER_NAMES = ("alertmanager", "webhook", "pagerduty", "slack")

_FIELDS = {  # findings column -> Finding field
    "Kind": "kind", "Subject": "subject", "Model": "model", "ModelVersion": "model_version", "Feature": "feature",
    "Method": "method", "Statistic": "statistic", "PValue": "p_value", "Effect": "effect", "Threshold": "threshold",
    "Severity": "severity", "Drifted": "drifted",
}


def _num(v: Any) -> float:
    try:
        return math.nan if v is None else float(v)
    except (TypeError, ValueError):
        return math.nan


def _finding(row: Mapping[str, Any]) -> Finding:
    """A :class:`Finding` from one JSONEachRow row of the query in :meth:`AlertRunner.new_findings`."""
    kw: dict[str, Any] = {f: row[c] for c, f in _FIELDS.items()}
    for f in ("statistic", "p_value", "effect", "threshold"):
        kw[f] = _num(kw[f])
    kw["drifted"] = bool(kw["drifted"])
    try:
        details = json.loads(row.get("Details") or "{}")
    except ValueError:
        details = {}
    return Finding(time=int(row["T"]) / 1000, window_start=int(row["WS"]) / 1000, window_end=int(row["WE"]) / 1000,
                   details=details if isinstance(details, dict) else {}, labels=dict(row.get("Labels") or {}), **kw)


class AlertRunner(Periodic):
    """Evaluates ``engine`` on new findings every ``interval_s`` and sends to ``notifiers`` (name -> notifier).

    ``run_once`` may be called directly with explicit times; ``start`` runs it on a
    daemon thread until ``stop``. The thread never dies: each kind of error is logged
    once with its traceback, later ones at debug level, and counted in :attr:`errors`.
    """

    _thread_name = "stethoscope-alerts"
    _run_name = "alert run"
    _log = log

    def __init__(self, store: Any, engine: AlertEngine, notifiers: Mapping[str, Notifier], *, interval_s: float = 30.0,
                 clock: Callable[[], float] = time.time) -> None:
        if not (interval_s > 0 and math.isfinite(interval_s)):
            from ..errors import ConfigError

            raise ConfigError([f"interval_s: must be finite and > 0, got {interval_s!r}"])
        self.store = store
        self.engine = engine
        self.notifiers = dict(notifiers)
        self.interval_s = float(interval_s)
        self.clock = clock
        self._init_periodic()
        #: Deliveries of the latest run.
        self.deliveries: list[Delivery] = []
        self._cursor_ms: int | None = None  # newest findings Time seen (ms); None until loaded
        self._version = 0  # newest snapshot version (ms)
        self._loaded = False

    # --- state ---------------------------------------------------------------------------

    def load(self) -> None:
        """Restore the engine from the newest snapshot in ``alerts`` (nothing when there is none)."""
        data = self.store.query(
            f"SELECT {', '.join(COLUMNS)} FROM alerts WHERE Version = (SELECT max(Version) FROM alerts)",
            "JSONEachRow",
        ).data
        rows = [json.loads(line) for line in data.splitlines() if line.strip()]
        if rows:
            self.engine.restore(from_rows(rows))
            self._version = max(int(r["Version"]) for r in rows)
            self._cursor_ms = self._version
            log.info("alert state restored: %d alerts, %d silences", len(self.engine.alerts), len(self.engine.silences))
        self._loaded = True

    def save(self, now: float) -> int:
        """Write the engine's state as a new snapshot; return its version (epoch ms, strictly increasing)."""
        self._version = max(int(round(now * 1000)), self._version + 1)
        rows = to_rows(self.engine.state(), version=self._version)
        data = "".join(json.dumps(r) + "\n" for r in rows).encode()
        self.store.insert("alerts", COLUMNS, data, fmt="JSONEachRow", token=f"alerts-{self._version}")
        return self._version

    # --- one run -------------------------------------------------------------------------

    def new_findings(self, now: float) -> list[Finding]:
        """Findings with ``Time`` after the cursor and not after ``now``, oldest first; advances the cursor."""
        now_ms = int(round(now * 1000))
        if self._cursor_ms is None:  # no snapshot yet: look back one interval
            self._cursor_ms = now_ms - int(self.interval_s * 1000)
        cols = [c for c in FINDING_COLUMNS if c not in ("Time", "WindowStart", "WindowEnd")]
        data = self.store.query(
            f"SELECT toUnixTimestamp64Milli(Time) AS T, toUnixTimestamp64Milli(WindowStart) AS WS, "
            f"toUnixTimestamp64Milli(WindowEnd) AS WE, {', '.join(cols)} FROM findings "
            f"WHERE Time > fromUnixTimestamp64Milli(toInt64({self._cursor_ms})) "
            f"AND Time <= fromUnixTimestamp64Milli(toInt64({now_ms})) ORDER BY Time",
            "JSONEachRow",
        ).data
        out = []
        for line in data.splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            self._cursor_ms = max(self._cursor_ms, int(row["T"]))
            try:
                out.append(_finding(row))
            except (ValueError, KeyError, TypeError) as exc:  # a malformed row must not stop the others
                self._record_error(exc, "reading a finding")
        return out

    def _expr_value(self, sql: str) -> float | None:
        text = self.store.query(sql, "TabSeparated").data.decode().strip()
        if not text or text.split("\t")[0].split("\n")[0] in ("\\N", "nan"):
            return None
        return float(text.split("\n")[0].split("\t")[0])

    def run_once(self, now: float | None = None) -> list[Notification]:
        """Evaluate the findings since the previous run at ``now``; send, save and return the notifications."""
        now = self.clock() if now is None else float(now)
        if not self._loaded:
            self.load()
        findings = self.new_findings(now)
        values = expr_values(self.engine.rules, self._expr_value)
        notes = self.engine.evaluate(findings, now, values)
        self.deliveries = self._send(notes, now)
        self.save(now)
        return notes

    def _send(self, notes: Sequence[Notification], now: float) -> list[Delivery]:
        for n in notes:
            log.info("alert %s (%s): %s %s %s", n.status, n.reason, n.rule, n.subject,
                     n.annotations.get("summary", ""))
        out: list[Delivery] = []
        routed = [n for n in notes if n.status == "resolved" or n.reason in ("new", "repeat")]
        for n in routed:
            for name in n.actions or tuple(self.notifiers):
                if name == "alertmanager" or name not in self.notifiers:
                    continue
                out.append(self.notifiers[name].send(n))
        am = self.notifiers.get("alertmanager")
        if am is not None:
            wants = lambda n: not n.actions or "alertmanager" in n.actions  # noqa: E731
            batch = [n for n in self.engine.firing(now) if wants(n)] + [n for n in notes if n.status == "resolved" and wants(n)]
            if batch:
                send_many = getattr(am, "send_many", None)
                out += [send_many(batch)] if send_many else [am.send(n) for n in batch]
        for d in out:
            if not d.ok:
                log.warning("alert notification via %s failed: %s", d.notifier, d.reason)
        return out


def notifiers_from_config(cfg: Config, environ: Mapping[str, str] | None = None) -> dict[str, Notifier]:
    """The notifiers ``[alerts]`` configures (only those with a URL or key). Secrets come from the environment."""
    a = cfg.alerts
    env = os.environ if environ is None else environ
    out: dict[str, Notifier] = {}
    if a.alertmanager_url:
        out["alertmanager"] = AlertmanagerNotifier(a.alertmanager_url)
    if a.webhook_url:
        secret = env.get(a.webhook_secret_env, "") if a.webhook_secret_env else ""
        if secret:
            out["webhook"] = WebhookNotifier(a.webhook_url, secret)
        else:
            log.warning("alerts.webhook_url is set but the environment variable %s holding its secret is empty or "
                        "unset: the webhook is off", a.webhook_secret_env or "(alerts.webhook_secret_env)")
    if a.pagerduty_routing_key_env:
        key = env.get(a.pagerduty_routing_key_env, "")
        if key:
            out["pagerduty"] = PagerDutyNotifier(key)
        else:
            log.warning("environment variable %s (alerts.pagerduty_routing_key_env) is empty or unset: PagerDuty is off",
                        a.pagerduty_routing_key_env)
    if a.slack_webhook_url:
        out["slack"] = SlackNotifier(a.slack_webhook_url)
    return out


def runner_from_config(cfg: Config, store: Any, environ: Mapping[str, str] | None = None) -> AlertRunner:
    """The runner ``[alerts]`` describes: the default rule pack plus ``alerts.rules``."""
    from ..config import parse_duration
    from . import DEFAULT_RULES
    from .rules import load_rules

    a = cfg.alerts
    rules = load_rules([DEFAULT_RULES, *a.rules], notifiers=NOTIFIER_NAMES)
    engine = AlertEngine(rules, repeat_interval_s=float(parse_duration(a.repeat_interval)))
    notifiers = notifiers_from_config(cfg, environ)
    if not notifiers:
        log.info("no alert notifiers configured: notifications are only logged")
    return AlertRunner(store, engine, notifiers, interval_s=float(parse_duration(a.interval)))
