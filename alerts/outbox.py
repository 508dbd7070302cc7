"""The alert outbox: every notification is stored before it is sent, and retried until delivered.

A notification bound for a notifier becomes an :class:`Entry` with a stable id
(:func:`entry_id`: fingerprint, status, firing start and notifier, plus the repeat
number of a repeat), and a ``queued`` row in ``notification_attempts`` (the
notification as JSON, never a secret) *before* the first attempt. Each attempt then
adds a row: ``delivered``, ``retry`` (with ``NextAttemptAt``), ``failed`` (the
receiver refused it for good: a 4xx other than 408, 425 or 429) or ``expired`` (still
undelivered after ``max_age_s``). The newest row of an id is its state, so
:meth:`Outbox.load` rebuilds the pending entries after a restart from the table alone.

Retries back off exponentially with jitter (:class:`Backoff`: 1 s doubling to 5 min,
each delay drawn uniformly from its upper half). Within one :meth:`Outbox.flush`, a
notifier that cannot be reached at all is not tried again for its other entries: they
wait for the same next attempt, so a receiver that is down costs one timeout per
flush, not one per alert.

Idempotency: :meth:`Outbox.enqueue` ignores an id it has seen within ``max_age_s``, so
a notification produced again after a crash (the engine's snapshot was older than the
outbox) is not sent twice; receivers get the id as well (``Idempotency-Key`` on the
webhook; PagerDuty deduplicates on ``dedup_key``).

Alertmanager is special: it expects every firing alert to be re-posted regularly.
``flush(now, alertmanager_active=...)`` posts those in one request together with the
due Alertmanager entries (new firing ones first, resolved ones in a second request),
and records the re-post as ``OutboxId = 'alertmanager:active'``.

Examples
--------
>>> import random
>>> b = Backoff(base_s=1.0, max_s=300.0)
>>> rng = random.Random(7)
>>> [all(d / 2 <= b.delay(n, rng) <= d for _ in range(50)) for n, d in ((1, 1), (2, 2), (3, 4), (9, 256), (10, 300))]
[True, True, True, True, True]
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import ConfigError, StethoscopeError
from .notifiers import Delivery, Notifier, retryable
from .schema import ATTEMPT_COLUMNS
from .state import Notification

__all__ = ["Backoff", "Entry", "Outbox", "entry_id", "QUEUED", "RETRY", "DELIVERED", "FAILED", "EXPIRED",
           "ACTIVE_ID"]

log = logging.getLogger(__name__)

QUEUED, RETRY, DELIVERED, FAILED, EXPIRED = "queued", "retry", "delivered", "failed", "expired"
#: ``OutboxId`` of the rows recording Alertmanager's regular re-post of the firing alerts.
ACTIVE_ID = "alertmanager:active"


def entry_id(n: Notification, notifier: str, seq: str = "") -> str:
    """32-hex id of one notification to one notifier; the same inputs give the same id.

    ``seq`` tells repeats of one firing alert apart (e.g. ``"repeat-2"``).

    >>> n = Notification("firing", "new", "ab12", "", "Hot", "critical", {}, {}, "", 60.0, None)
    >>> entry_id(n, "webhook") == entry_id(n, "webhook"), entry_id(n, "webhook") == entry_id(n, "slack")
    (True, False)
    """
    canon = json.dumps([n.fingerprint, n.status, int(round(n.starts_at * 1000)), notifier, seq], separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Backoff:
    """Delay before attempt ``n + 1`` after ``n`` failures: ``min(max_s, base_s * 2**(n-1))``,
    drawn uniformly from its upper half (jitter, so receivers coming back are not hit in step)."""

    base_s: float = 1.0
    max_s: float = 300.0

    def __post_init__(self) -> None:
        if not (0 < self.base_s <= self.max_s):
            raise ConfigError([f"outbox backoff: need 0 < base ({self.base_s!r}) <= max ({self.max_s!r})"])

    def delay(self, failures: int, rng: random.Random) -> float:
        d = min(self.max_s, self.base_s * 2.0 ** min(max(failures - 1, 0), 64))
        return d / 2 + rng.random() * d / 2


@dataclass
class Entry:
    """One notification waiting for one notifier."""

    id: str
    notifier: str
    notification: Notification
    created: float
    attempt: int = 0  # attempts made so far
    next_at: float = 0.0  # epoch seconds of the next attempt


def _note_json(n: Notification) -> str:
    return json.dumps({**asdict(n), "labels": dict(n.labels), "annotations": dict(n.annotations),
                       "actions": list(n.actions)}, sort_keys=True, allow_nan=False)


def _note(text: str) -> Notification:
    d = json.loads(text)
    d["actions"] = tuple(d.get("actions") or ())
    return Notification(**d)


def _accepts_key(notifier: Any) -> bool:
    try:
        params = inspect.signature(notifier.send).parameters
    except (TypeError, ValueError):
        return False
    return "idempotency_key" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


class Outbox:
    """Persisted, retried delivery of notifications to ``notifiers`` (name -> notifier).

    Not thread-safe: the alert runner's thread is its only user. Every method that
    writes tolerates a store error: rows that could not be written are kept and
    written with the next ones, and delivery goes on (better sent than lost).
    """

    table = "notification_attempts"

    def __init__(self, store: Any, notifiers: Mapping[str, Notifier], *, backoff: Backoff | None = None,
                 max_age_s: float = 86400.0, rng: random.Random | None = None) -> None:
        if not max_age_s > 0:
            raise ConfigError([f"outbox max age: must be > 0 seconds, got {max_age_s!r}"])
        self.store = store
        self.notifiers = dict(notifiers)
        self.backoff = backoff or Backoff()
        self.max_age_s = float(max_age_s)
        self.rng = rng or random.Random()
        #: Entries not yet delivered, failed or expired, by id.
        self.pending: dict[str, Entry] = {}
        self._seen: dict[str, float] = {}  # id -> created, for every id of the last max_age_s
        self._unwritten: list[dict[str, Any]] = []
        self._keyed = {name: _accepts_key(n) for name, n in self.notifiers.items()}
        self._store_errors = 0

    # --- persistence ---------------------------------------------------------------------

    def load(self) -> int:
        """Rebuild the pending entries (and the ids already handled) from the table; return how many are pending."""
        span_ms = int((self.max_age_s + 3600.0) * 1000)  # counted back from the newest row, not the wall clock
        data = self.store.query(
            "SELECT OutboxId, any(Notifier) AS N, argMax(Status, (Time, Attempt)) AS S, max(Attempt) AS A, "
            "toUnixTimestamp64Milli(argMax(NextAttemptAt, (Time, Attempt))) AS NA, "
            "toUnixTimestamp64Milli(min(Time)) AS C, argMaxIf(Body, Time, Status = 'queued') AS B "
            f"FROM {self.table} WHERE Time >= fromUnixTimestamp64Milli(toInt64((SELECT toUnixTimestamp64Milli(max(Time)) "
            f"FROM {self.table}) - {span_ms})) AND OutboxId != '{ACTIVE_ID}' "
            "GROUP BY OutboxId",
            "JSONEachRow",
        ).data
        for line in data.splitlines():
            if not line.strip():
                continue
            r = json.loads(line)
            created = int(r["C"]) / 1000
            self._seen[r["OutboxId"]] = created
            if r["S"] not in (QUEUED, RETRY) or not r["B"]:
                continue
            try:
                note = _note(r["B"])
            except (ValueError, TypeError, KeyError) as exc:
                log.warning("outbox entry %s has an unreadable notification and is dropped: %s", r["OutboxId"], exc)
                continue
            self.pending[r["OutboxId"]] = Entry(r["OutboxId"], r["N"], note, created, int(r["A"]), int(r["NA"]) / 1000)
        if self.pending:
            log.info("alert outbox: %d undelivered notifications restored", len(self.pending))
        return len(self.pending)

    def _row(self, e: Entry, now: float, status: str, *, attempt: int, http: int = 0, error: str = "",
             next_at: float = 0.0, body: str = "") -> dict[str, Any]:
        return {"Time": round(now, 3), "OutboxId": e.id, "Notifier": e.notifier, "Fingerprint": e.notification.fingerprint,
                "Rule": e.notification.rule, "Status": status, "Attempt": attempt, "HttpStatus": min(max(http, 0), 65535),
                "Error": self._scrub(error)[:1000], "NextAttemptAt": round(next_at, 3), "Body": body}

    def _scrub(self, text: str) -> str:
        for n in self.notifiers.values():
            for secret in getattr(n, "secrets", ()) or ():
                if secret and len(secret) >= 4:
                    text = text.replace(secret, "***")
        return text

    def _write(self, rows: list[dict[str, Any]]) -> bool:
        rows = self._unwritten + rows
        if not rows:
            return True
        data = "".join(json.dumps({c: r[c] for c in ATTEMPT_COLUMNS}) + "\n" for r in rows).encode()
        token = "outbox-" + hashlib.sha256(data).hexdigest()
        try:
            self.store.insert(self.table, ATTEMPT_COLUMNS, data, fmt="JSONEachRow", token=token)
        except (StethoscopeError, OSError) as exc:
            self._unwritten = rows[-100_000:]
            self._store_errors += 1
            (log.warning if self._store_errors == 1 else log.debug)(
                "alert outbox: %d rows could not be written to %s (kept, retried with the next ones): %s",
                len(rows), self.table, exc)
            return False
        self._unwritten = []
        return True

    # --- queueing --------------------------------------------------------------------------

    def enqueue(self, items: Iterable[tuple[str, Notification, str]], now: float) -> list[Entry]:
        """Add ``(notifier, notification, seq)`` items; persist them (one insert) and return the new entries.

        An id seen within ``max_age_s`` (pending or already handled) is skipped.
        """
        new: list[Entry] = []
        for name, n, seq in items:
            eid = entry_id(n, name, seq)
            if eid in self._seen:
                continue
            e = Entry(eid, name, n, now, 0, now)
            self._seen[eid] = now
            self.pending[eid] = e
            new.append(e)
        if new:
            self._write([self._row(e, now, QUEUED, attempt=0, next_at=now, body=_note_json(e.notification)) for e in new])
        return new

    def next_due(self) -> float | None:
        """When the earliest pending entry is due (epoch seconds), or None when nothing is pending."""
        return min((e.next_at for e in self.pending.values()), default=None)

    # --- delivery --------------------------------------------------------------------------

    def flush(self, now: float, *, alertmanager_active: Sequence[Notification] | None = None) -> list[Delivery]:
        """Attempt every entry due at ``now`` (and re-post ``alertmanager_active``); record every attempt."""
        rows: list[dict[str, Any]] = []
        out: list[Delivery] = []
        due: dict[str, list[Entry]] = {}
        for e in sorted(self.pending.values(), key=lambda e: (e.created, e.id)):
            if now - e.created >= self.max_age_s:
                del self.pending[e.id]
                rows.append(self._row(e, now, EXPIRED, attempt=e.attempt,
                                      error=f"not delivered within {self.max_age_s:g} s"))
                log.error("alert notification %s (%s %s) to %s expired after %d attempts", e.id, e.notification.rule,
                          e.notification.status, e.notifier, e.attempt)
            elif e.next_at <= now:
                due.setdefault(e.notifier, []).append(e)
        if alertmanager_active is not None and "alertmanager" in self.notifiers:
            due.setdefault("alertmanager", [])
        for name, entries in due.items():
            notifier = self.notifiers.get(name)
            if notifier is None:
                for e in entries:
                    del self.pending[e.id]
                    rows.append(self._row(e, now, FAILED, attempt=e.attempt,
                                          error=f"notifier {name!r} is not configured"))
                continue
            if name == "alertmanager" and hasattr(notifier, "send_many"):
                out += self._alertmanager(notifier, entries, alertmanager_active or [], now, rows)
                continue
            for i, e in enumerate(entries):
                d = self._send_one(name, notifier, e)
                out.append(d)
                self._settle(e, d, now, rows)
                if not d.ok and d.status == 0:  # unreachable: the others wait for the same retry time
                    for rest in entries[i + 1:]:
                        rest.next_at = e.next_at
                    break
        self._write(rows)
        self._seen = {k: t for k, t in self._seen.items() if now - t < self.max_age_s or k in self.pending}
        return out

    def _send_one(self, name: str, notifier: Any, e: Entry) -> Delivery:
        try:
            if self._keyed.get(name):
                return notifier.send(e.notification, idempotency_key=e.id)
            return notifier.send(e.notification)
        except Exception as exc:  # noqa: BLE001 - a plugin breaking the never-raise contract: a failed, retried attempt
            return Delivery(name, False, 0, f"{type(exc).__name__}: {exc}")

    def _alertmanager(self, am: Any, entries: list[Entry], active: Sequence[Notification], now: float,
                      rows: list[dict[str, Any]]) -> list[Delivery]:
        out = []
        firing = [e for e in entries if e.notification.status != "resolved"]
        resolved = [e for e in entries if e.notification.status == "resolved"]
        batch = list(active)
        have = {n.fingerprint for n in batch}
        batch += [e.notification for e in firing if e.notification.fingerprint not in have]
        if batch:
            d = am.send_many(batch)
            out.append(d)
            for e in firing:
                self._settle(e, d, now, rows)
            if active:
                rows.append({"Time": round(now, 3), "OutboxId": ACTIVE_ID, "Notifier": "alertmanager", "Fingerprint": "",
                             "Rule": "", "Status": DELIVERED if d.ok else FAILED, "Attempt": 1, "HttpStatus": d.status,
                             "Error": self._scrub(d.reason)[:1000], "NextAttemptAt": 0.0, "Body": ""})
            if not d.ok and d.status == 0:
                for e in resolved:
                    e.next_at = max(e.next_at, now + self.backoff.delay(e.attempt + 1, self.rng))
                return out
        if resolved:
            d = am.send_many([e.notification for e in resolved])
            out.append(d)
            for e in resolved:
                self._settle(e, d, now, rows)
        return out

    def _settle(self, e: Entry, d: Delivery, now: float, rows: list[dict[str, Any]]) -> None:
        e.attempt += 1
        if d.ok:
            del self.pending[e.id]
            rows.append(self._row(e, now, DELIVERED, attempt=e.attempt, http=d.status))
        elif retryable(d):
            e.next_at = now + self.backoff.delay(e.attempt, self.rng)
            rows.append(self._row(e, now, RETRY, attempt=e.attempt, http=d.status, error=d.reason, next_at=e.next_at))
            (log.warning if e.attempt == 1 else log.debug)(
                "alert notification via %s failed (attempt %d, retried in %.0f s): %s", e.notifier, e.attempt,
                e.next_at - now, self._scrub(d.reason))
        else:
            del self.pending[e.id]
            rows.append(self._row(e, now, FAILED, attempt=e.attempt, http=d.status, error=d.reason))
            log.error("alert notification via %s refused (not retried): %s", e.notifier, self._scrub(d.reason))
