"""The alert runner inside ``up``: new findings in, notifications out, state in the ``alerts`` table.

Every ``interval_s``, :meth:`AlertRunner.run_once` (a *full run*) reads the findings
written since the previous run (``Time`` after the newest one it has seen), evaluates
the :class:`~.state.AlertEngine` (with the values of ``expr`` rules), queues the
notifications in the :class:`~.outbox.Outbox` (persisted in ``notification_attempts``),
saves the engine's state as one snapshot in ``alerts`` (:mod:`.schema`), delivers, and
prunes old snapshots. Between full runs, :meth:`AlertRunner.tick` (every ``poll_s``,
or at once after :meth:`AlertRunner.wake`) does the same for new findings and silence
requests (:mod:`.silences`) without the ``expr`` rules, and sends due retries. The
newest snapshot and the undelivered outbox entries are loaded first, so a restart
neither forgets firing alerts, nor notifies them again before the repeat interval,
nor loses a notification a receiver has not taken yet.

Routing: a notification goes to the notifiers its rule's ``actions`` name, or to every
configured notifier when it names none. ``alertmanager`` gets all firing alerts on
every full run, as Alertmanager expects, and new and resolved ones through the outbox.
A name that is not configured is skipped; with no notifier at all, notifications are
only logged at INFO.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._periodic import Periodic
from ..analytics.findings import COLUMNS as FINDING_COLUMNS
from ..analytics.findings import Finding
from ..exporters.schema import quote_ident
from .notifiers import (
    AlertmanagerNotifier,
    Delivery,
    Notifier,
    PagerDutyNotifier,
    SlackNotifier,
    WebhookNotifier,
)
from .outbox import Backoff, Outbox
from .schema import COLUMNS, from_rows, to_rows
from .state import AlertEngine, Notification, expr_values

if TYPE_CHECKING:
    from ..config import Config

__all__ = ["AlertRunner", "NOTIFIER_NAMES", "notifiers_from_config", "runner_from_config", "silence_dir"]

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
    """Evaluates ``engine`` on new findings and sends to ``notifiers`` (name -> notifier) through an outbox.

    ``run_once`` (a full run: expressions too, Alertmanager re-post, snapshot pruning)
    and ``tick`` (a quick look for new findings and silence requests, and due retries)
    may be called directly with explicit times; ``start`` runs them on a daemon thread
    until ``stop``: a full run every ``interval_s``, a tick every ``poll_s`` (0: none)
    and at once when :meth:`wake` is called. The thread never dies: each kind of error
    is logged once with its traceback, later ones at debug level, and counted in
    :attr:`errors`.
    """

    _thread_name = "stethoscope-alerts"
    _run_name = "alert run"
    _log = log

    def __init__(self, store: Any, engine: AlertEngine, notifiers: Mapping[str, Notifier], *, interval_s: float = 30.0,
                 clock: Callable[[], float] = time.time, outbox: Outbox | None = None, poll_s: float = 0.0,
                 snapshot_retention_s: float = 3600.0, prune_interval_s: float = 600.0,
                 silence_dir: str | os.PathLike[str] | None = None, actions: Any = None) -> None:
        from ..errors import ConfigError

        problems = []
        if not (interval_s > 0 and math.isfinite(interval_s)):
            problems.append(f"interval_s: must be finite and > 0, got {interval_s!r}")
        if not (poll_s >= 0 and math.isfinite(poll_s)):
            problems.append(f"poll_s: must be finite and >= 0, got {poll_s!r}")
        if not (snapshot_retention_s >= 0 and prune_interval_s > 0):
            problems.append(f"snapshot retention {snapshot_retention_s!r} must be >= 0 and the prune interval "
                            f"{prune_interval_s!r} > 0")
        if problems:
            raise ConfigError(problems)
        self.store = store
        self.engine = engine
        self.notifiers = dict(notifiers)
        self.outbox = outbox if outbox is not None else Outbox(store, self.notifiers)
        self.interval_s = float(interval_s)
        self.poll_s = float(poll_s)
        self.snapshot_retention_s = float(snapshot_retention_s)
        self.prune_interval_s = float(prune_interval_s)
        self.silence_dir = None if silence_dir is None else Path(silence_dir)
        #: The remediation :class:`~.actions.ActionRunner` given each run's notifications (None: no actions).
        self.actions = actions
        self.clock = clock
        self._init_periodic()
        self._wake = threading.Event()
        #: Deliveries of the latest run or tick that sent anything.
        self.deliveries: list[Delivery] = []
        self._cursor_ms: int | None = None  # newest findings InsertedAt seen (ms); None until loaded
        #: How far back before the cursor each read looks again (ms): an insert may become visible late.
        self.overlap_ms = 5000
        self._seen: dict[tuple, int] = {}  # rows already returned within the overlap -> their InsertedAt
        self._version = 0  # newest snapshot version (ms)
        self._loaded = False
        self._pruned_at: float | None = None

    # --- state ---------------------------------------------------------------------------

    def load(self) -> None:
        """Restore the engine from the newest snapshot in ``alerts`` and the outbox from its table."""
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
        self.outbox.load()
        self._loaded = True

    def save(self, now: float) -> int:
        """Write the engine's state as a new snapshot; return its version (epoch ms, strictly increasing)."""
        self._version = max(int(round(now * 1000)), self._version + 1)
        rows = to_rows(self.engine.state(), version=self._version)
        data = "".join(json.dumps(r) + "\n" for r in rows).encode()
        self.store.insert("alerts", COLUMNS, data, fmt="JSONEachRow", token=f"alerts-{self._version}")
        return self._version

    def prune(self, now: float) -> bool:
        """Delete snapshots older than the retention (never the newest one); at most once per prune interval.

        Returns whether a delete ran.
        """
        if self._pruned_at is not None and now - self._pruned_at < self.prune_interval_s:
            return False
        self._pruned_at = now
        cutoff = min(int((now - self.snapshot_retention_s) * 1000), self._version)
        db = self.store.schema
        self.store.execute(f"DELETE FROM {quote_ident(db.database)}.alerts{db.on_cluster()} WHERE Version < {cutoff}")
        return True

    # --- one run -------------------------------------------------------------------------

    def new_findings(self, now: float) -> list[Finding]:
        """Findings written since the previous call, in the order they were written; advances the cursor.

        The cursor is on ``InsertedAt`` (when the store wrote the row), not on the
        finding's own ``Time``: detectors stamp a finding with the moment the incident
        began, often seconds before it is written, and another detector may have written
        a later-stamped finding in between. Each query re-reads the last
        :attr:`overlap_ms` before the cursor (an insert may become visible late) and skips
        the rows it has already returned.
        """
        now_ms = int(round(now * 1000))
        if self._cursor_ms is None:  # no snapshot yet: look back one interval
            self._cursor_ms = now_ms - int(self.interval_s * 1000)
        since = self._cursor_ms - self.overlap_ms
        cols = [c for c in FINDING_COLUMNS if c not in ("Time", "WindowStart", "WindowEnd")]
        data = self.store.query(
            f"SELECT toUnixTimestamp64Milli(InsertedAt) AS I, toUnixTimestamp64Milli(Time) AS T, "
            f"toUnixTimestamp64Milli(WindowStart) AS WS, toUnixTimestamp64Milli(WindowEnd) AS WE, "
            f"{', '.join(cols)} FROM findings "
            f"WHERE InsertedAt > fromUnixTimestamp64Milli(toInt64({since})) ORDER BY InsertedAt, Time",
            "JSONEachRow",
        ).data
        out = []
        seen = {k: i for k, i in self._seen.items() if i > since}
        for line in data.splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            inserted = int(row["I"])
            key = (inserted, row["T"], row["Kind"], row["Subject"], row["Method"], row["Feature"])
            if key in seen:
                continue
            seen[key] = inserted
            self._cursor_ms = max(self._cursor_ms, inserted)
            try:
                out.append(_finding(row))
            except (ValueError, KeyError, TypeError) as exc:  # a malformed row must not stop the others
                self._record_error(exc, "reading a finding")
        self._seen = seen
        out.sort(key=lambda f: f.time)
        return out

    def _expr_value(self, sql: str) -> float | None:
        text = self.store.query(sql, "TabSeparated").data.decode().strip()
        if not text or text.split("\t")[0].split("\n")[0] in ("\\N", "nan"):
            return None
        return float(text.split("\n")[0].split("\t")[0])

    def run_once(self, now: float | None = None) -> list[Notification]:
        """A full run at ``now``: findings since the previous run and ``expr`` rules; send, save, return notifications."""
        now = self.clock() if now is None else float(now)
        if not self._loaded:
            self.load()
        changed = self._apply_silence_requests(now)
        findings = self.new_findings(now)
        values = expr_values(self.engine.rules, self._expr_value)
        notes = self.engine.evaluate(findings, now, values)
        self._process(notes, now, full=True)
        self._done_silence_requests(changed)
        self.prune(now)
        return notes

    def tick(self, now: float | None = None) -> list[Notification]:
        """A quick run: new findings and silence requests are evaluated (expressions are not), due retries sent."""
        now = self.clock() if now is None else float(now)
        if not self._loaded:
            self.load()
        changed = self._apply_silence_requests(now)
        findings = self.new_findings(now)
        if not findings and not changed:
            due = self.outbox.next_due()
            if due is not None and due <= now:
                self.deliveries = self.outbox.flush(now)
            return []
        notes = self.engine.evaluate(findings, now, None)
        self._process(notes, now, full=False)
        self._done_silence_requests(changed)
        return notes

    def wake(self, *_: Any) -> None:
        """Ask the background thread for a tick now, e.g. right after findings were written.

        Extra arguments are ignored, so it can be passed as the anomaly scheduler's
        ``on_findings`` callback as it is.
        """
        self._wake.set()

    def _process(self, notes: Sequence[Notification], now: float, *, full: bool) -> None:
        """Queue (persisted), save the snapshot, then deliver: a crash in between re-sends nothing twice."""
        for n in notes:
            log.info("alert %s (%s): %s %s %s", n.status, n.reason, n.rule, n.subject,
                     n.annotations.get("summary", ""))
        self.outbox.enqueue(self._route(notes, now), now)
        self.save(now)
        if self.actions is not None and notes:
            try:  # guarded and audited inside; a failure here must not stop the notifications
                self.actions.handle(notes, now)
            except Exception as exc:
                self._record_error(exc, "remediation actions")
        active = None
        if full and "alertmanager" in self.notifiers:
            active = [n for n in self.engine.firing(now) if not n.actions or "alertmanager" in n.actions]
        self.deliveries = self.outbox.flush(now, alertmanager_active=active)

    def _route(self, notes: Sequence[Notification], now: float) -> list[tuple[str, Notification, str]]:
        out = []
        for n in notes:
            if not (n.status == "resolved" or n.reason in ("new", "repeat")):
                continue
            seq = ""
            if n.reason == "repeat":
                seq = f"repeat-{int((now - n.starts_at) // max(self.engine.repeat_interval_s, 1e-9))}"
            for name in n.actions or tuple(self.notifiers):
                if name not in self.notifiers or (name == "alertmanager" and n.reason == "repeat"):
                    continue  # Alertmanager repeats on its own; the regular re-post keeps it firing
                out.append((name, n, seq))
        return out

    # --- silences ------------------------------------------------------------------------

    def _apply_silence_requests(self, now: float) -> list[Path]:
        if self.silence_dir is None:
            return []
        from .silences import apply_request, read_requests

        done = []
        for path, req in read_requests(self.silence_dir):
            try:
                apply_request(self.engine, req, now)
                log.info("silence %s: %s", req.get("op"), req.get("id"))
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("silence request %s ignored: %s", path.name, exc)
            done.append(path)
        return done

    def _done_silence_requests(self, paths: Sequence[Path]) -> None:
        for p in paths:  # after the snapshot that holds their effect
            try:
                p.unlink()
            except FileNotFoundError:
                pass

    # --- background loop -----------------------------------------------------------------

    def start(self) -> None:
        """Start the loop, and the remediation API when one is configured."""
        if self.actions is not None:
            self.actions.start()
        super().start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        super().stop(timeout)
        if self.actions is not None:
            self.actions.stop()

    def _loop(self) -> None:
        next_full = self.clock() + self.interval_s
        while not self._stop.is_set():
            now = self.clock()
            until = next_full
            if self.poll_s > 0:
                until = min(until, now + self.poll_s)
            due = self.outbox.next_due()
            if due is not None:
                until = min(until, max(due, now + 0.05))
            self._wake.wait(max(until - now, 0.0))
            self._wake.clear()
            if self._stop.is_set():
                break
            now = self.clock()
            try:
                if now >= next_full:
                    next_full = now + self.interval_s
                    self.run_once(now)
                else:
                    self.tick(now)
            except Exception as exc:  # noqa: BLE001 - the loop must outlive any one run
                self._record_error(exc, self._run_name)


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


def silence_dir(cfg: Config) -> Path:
    """Where silence requests for the running ``up`` are left (``alerts.silence_dir`` or inside the data dir)."""
    return Path(os.path.expanduser(cfg.alerts.silence_dir or os.path.join(cfg.store.data_dir, "silence-requests")))


def runner_from_config(cfg: Config, store: Any, environ: Mapping[str, str] | None = None) -> AlertRunner:
    """The runner ``[alerts]`` describes: the default rule pack plus ``alerts.rules``."""
    from ..config import parse_duration
    from . import DEFAULT_RULES
    from .rules import load_rules

    a = cfg.alerts
    rules = load_rules([DEFAULT_RULES, *a.rules], notifiers=NOTIFIER_NAMES)
    engine = AlertEngine(rules, repeat_interval_s=float(parse_duration(a.repeat_interval)),
                         resolve_after_s=float(parse_duration(a.resolve_after)))
    notifiers = notifiers_from_config(cfg, environ)
    if not notifiers:
        log.info("no alert notifiers configured: notifications are only logged")
    outbox = Outbox(store, notifiers, max_age_s=float(parse_duration(a.outbox_max_age)),
                    backoff=Backoff(float(parse_duration(a.outbox_backoff)), float(parse_duration(a.outbox_backoff_max))))
    from .actions import action_runner_from_config

    actions = action_runner_from_config(cfg, store, environ, rules=rules)
    return AlertRunner(store, engine, notifiers, interval_s=float(parse_duration(a.interval)), outbox=outbox,
                       poll_s=float(parse_duration(a.poll_interval)),
                       snapshot_retention_s=float(parse_duration(a.snapshot_retention)), silence_dir=silence_dir(cfg),
                       actions=actions)
