"""Guards on remediation actions, and the audit record every decision leaves.

Pure and clock-free: the :class:`Ledger` is the guard state (what was done when, which
idempotency keys are spent, which actions wait for approval), built by applying
:class:`Decision` records in order - the live ones as they are made, or the rows of the
``actions`` table after a restart, which gives the same state. :meth:`Ledger.check`
says why a request must be skipped, or ``None`` when it may go ahead:

1. **idempotency** - a key already spent (the same alert firing instance and action) is a duplicate;
2. **pending** - an action of the same kind already waits for approval on the same target;
3. **cooldown** - the same action on the same target ran less than ``cooldown_s`` ago;
4. **hourly maximum** - per action kind (the rule's ``max_per_hour``) and across all actions.

Actions *taken* - ``executed``, ``failed`` (it may have half-applied) and ``dry_run`` -
count towards cooldowns and hourly maximums, each in its own mode: a dry run is counted
as the live action would be, so its audit shows what going live would do, and going
live does not inherit the dry run's counts. A clock that jumps back makes the guards
stricter, never looser (a future event still counts).

:func:`bound_replicas` keeps a scale within ``[min, max]`` and a step limit.

Examples
--------
>>> led = Ledger()
>>> req = Request("scale", "deployment/ns/web", "Hot", "fp1", "k1", dry_run=False, cooldown_s=600)
>>> led.check(req, now=0.0, limits=Limits(max_per_hour=2)) is None
True
>>> led.apply(Decision(0.0, "a1", "scale", "deployment/ns/web", "Hot", "fp1", "executed", "", False, {}, {}, "k1"))
>>> led.check(req, now=10.0, limits=Limits(max_per_hour=2))
'duplicate: idempotency key k1 already used by action a1 (executed)'
>>> other = Request("scale", "deployment/ns/web", "Hot", "fp2", "k2", dry_run=False, cooldown_s=600)
>>> led.check(other, now=10.0, limits=Limits())
'cooldown: scale on deployment/ns/web ran at 0, cooldown 600s (590s left)'
>>> bound_replicas(3, "+5", lo=1, hi=6, max_step=2)
(5, '')
"""

from __future__ import annotations

import json
import math
import re
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "DECISIONS", "TAKEN", "Decision", "Request", "Limits", "Ledger", "bound_replicas", "parse_change", "HOUR_S",
]

DECISIONS = ("executed", "dry_run", "skipped", "pending_approval", "approved", "rejected", "failed")
#: Decisions that count towards cooldowns and hourly maximums.
TAKEN = frozenset({"executed", "dry_run", "failed"})
#: Decisions that spend an idempotency key (a skip does not: nothing was triggered).
_SPENDS_KEY = frozenset({"executed", "dry_run", "failed", "pending_approval", "approved", "rejected"})
HOUR_S = 3600.0
_SLACK_S = 86400.0
_CHANGE = re.compile(r"^([+-]?)(\d{1,6})$")


@dataclass(frozen=True)
class Decision:
    """One audit row of the ``actions`` table (field order = its columns, see :data:`~.actions.COLUMNS`)."""

    time: float
    action_id: str
    action: str
    target: str
    rule: str
    fingerprint: str
    decision: str
    reason: str
    dry_run: bool
    params: Mapping[str, Any] = field(default_factory=dict)
    result: Mapping[str, Any] = field(default_factory=dict)
    idempotency_key: str = ""

    def row(self) -> dict[str, Any]:
        """The row as ``JSONEachRow`` wants it (``Time`` in epoch milliseconds)."""
        return {
            "Time": int(round(self.time * 1000)), "ActionId": self.action_id, "Action": self.action,
            "Target": self.target, "Rule": self.rule, "Fingerprint": self.fingerprint, "Decision": self.decision,
            "Reason": self.reason, "DryRun": self.dry_run,
            "Params": json.dumps(self.params, sort_keys=True, default=str),
            "Result": json.dumps(self.result, sort_keys=True, default=str), "IdempotencyKey": self.idempotency_key,
        }

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Decision:
        """The inverse of :meth:`row` (``Time`` as epoch milliseconds)."""
        def obj(text: Any) -> dict[str, Any]:
            try:
                v = json.loads(text or "{}")
            except ValueError:
                return {}
            return v if isinstance(v, dict) else {}

        return cls(int(row["Time"]) / 1000, str(row["ActionId"]), str(row["Action"]), str(row["Target"]),
                   str(row["Rule"]), str(row["Fingerprint"]), str(row["Decision"]), str(row["Reason"]),
                   bool(row["DryRun"]), obj(row.get("Params")), obj(row.get("Result")), str(row.get("IdempotencyKey", "")))


@dataclass(frozen=True)
class Request:
    """What a rule asks for: one action on one target for one alert firing instance (``key``)."""

    action: str
    target: str
    rule: str
    fingerprint: str
    key: str
    dry_run: bool = True
    cooldown_s: float | None = None  # None: Limits.cooldown_s
    max_per_hour: int | None = None  # per action kind; None: only the global maximum
    approval: bool = False


@dataclass(frozen=True)
class Limits:
    """The global guard settings (``[remediation]``)."""

    max_per_hour: int = 20
    cooldown_s: float = 600.0
    approval_timeout_s: float = 3600.0


class Ledger:
    """Guard state, rebuilt by applying decisions in time order (see the module docstring)."""

    def __init__(self) -> None:
        self._taken: deque[tuple[float, str, bool]] = deque()  # (time, action, dry_run), oldest first
        self._last: dict[tuple[str, str, bool], float] = {}  # (action, target, dry_run) -> latest taken
        self.keys: dict[str, tuple[str, str]] = {}  # idempotency key -> (action id, first decision)
        self.pending: dict[str, Decision] = {}  # action id -> its pending_approval decision
        self.approved: set[str] = set()  # ids approved, waiting for their execution row
        self._now = -math.inf

    def apply(self, d: Decision) -> None:
        """Fold one decision (live, or read back from the audit table) into the state."""
        if d.decision in _SPENDS_KEY and d.idempotency_key and d.idempotency_key not in self.keys:
            self.keys[d.idempotency_key] = (d.action_id, d.decision)
        if d.decision == "pending_approval":
            self.pending[d.action_id] = d
        elif d.decision == "approved":
            self.pending.pop(d.action_id, None)
            self.approved.add(d.action_id)
        else:
            self.pending.pop(d.action_id, None)
            self.approved.discard(d.action_id)
        if d.decision in TAKEN:
            self._taken.append((d.time, d.action, d.dry_run))
            k = (d.action, d.target, d.dry_run)
            self._last[k] = max(self._last.get(k, -math.inf), d.time)

    def _prune(self, now: float) -> None:
        # Forget events a day older than the latest clock seen, so a clock that goes back
        # by up to a day still finds them (and stays strict); "future" events keep counting.
        self._now = max(self._now, now)
        while self._taken and self._taken[0][0] <= self._now - HOUR_S - _SLACK_S:
            self._taken.popleft()

    def taken_last_hour(self, now: float, *, dry_run: bool, action: str | None = None) -> int:
        """Actions taken in ``(now - 1h, ...]`` in this mode (of kind ``action`` when given)."""
        self._prune(now)
        return sum(1 for t, a, dr in self._taken if t > now - HOUR_S and dr == dry_run and (action is None or a == action))

    def check(self, req: Request, now: float, limits: Limits, *, own_id: str = "") -> str | None:
        """Why ``req`` must be skipped at ``now``, or ``None``; ``own_id`` is an approved action re-checked."""
        spent = self.keys.get(req.key)
        if spent is not None and spent[0] != own_id:
            return f"duplicate: idempotency key {req.key} already used by action {spent[0]} ({spent[1]})"
        for pid, p in self.pending.items():
            if pid != own_id and p.action == req.action and p.target == req.target and p.dry_run == req.dry_run:
                return f"pending: {req.action} on {req.target} already waits for approval as action {pid}"
        cooldown = limits.cooldown_s if req.cooldown_s is None else req.cooldown_s
        last = self._last.get((req.action, req.target, req.dry_run))
        if last is not None and now - last < cooldown:
            return (f"cooldown: {req.action} on {req.target} ran at {last:g}, cooldown {cooldown:g}s "
                    f"({cooldown - (now - last):g}s left)")
        if req.max_per_hour is not None:
            n = self.taken_last_hour(now, dry_run=req.dry_run, action=req.action)
            if n >= req.max_per_hour:
                return f"max_per_hour: {n} {req.action} actions in the last hour (limit {req.max_per_hour})"
        n = self.taken_last_hour(now, dry_run=req.dry_run)
        if n >= limits.max_per_hour:
            return f"max_per_hour: {n} actions in the last hour (global limit {limits.max_per_hour})"
        return None

    def expired(self, now: float, limits: Limits) -> list[Decision]:
        """Pending approvals older than the approval timeout (not removed: apply their ``rejected`` row)."""
        return [p for p in self.pending.values() if now - p.time >= limits.approval_timeout_s]

    @classmethod
    def rebuild(cls, decisions: Iterable[Decision]) -> Ledger:
        """The state after ``decisions`` (sorted by time here, ties kept in the given order)."""
        led = cls()
        for d in sorted(decisions, key=lambda d: d.time):
            led.apply(d)
        return led


def parse_change(text: Any) -> tuple[str, int]:
    """``"+2"`` -> ``("+", 2)``, ``"-1"`` -> ``("-", 1)``, ``"4"``/``4`` -> ``("=", 4)``.

    >>> parse_change("+2"), parse_change(4)
    (('+', 2), ('=', 4))
    """
    if isinstance(text, bool):
        raise ValueError(f"replicas: expected +N, -N or N, got {text!r}")
    m = _CHANGE.match(str(text).strip())
    if not m:
        raise ValueError(f"replicas: expected +N, -N or N, got {text!r}")
    return (m.group(1) or "="), int(m.group(2))


def bound_replicas(current: int, change: Any, *, lo: int, hi: int, max_step: int | None = None) -> tuple[int | None, str]:
    """The replica count to set, or ``(None, why not)``.

    A value returned is always within ``[lo, hi]``, differs from ``current``, moves at
    most ``max_step`` and, for a relative change, moves in the asked direction.

    >>> bound_replicas(9, "+3", lo=1, hi=10)
    (10, '')
    >>> bound_replicas(10, "+1", lo=1, hi=10)
    (None, 'at the bound: 10 replicas, asked +1 within [1, 10]')
    >>> bound_replicas(30, "4", lo=1, hi=10, max_step=2)
    (None, 'out of bounds: 30 replicas, [1, 10] is more than max_step 2 away')
    """
    op, n = parse_change(change)
    if lo > hi:
        return None, f"bad bounds: min {lo} > max {hi}"
    want = current + n if op == "+" else current - n if op == "-" else n
    target = min(max(want, lo), hi)
    if max_step is not None:
        target = current + max(-max_step, min(max_step, target - current))
    if not lo <= target <= hi:
        return None, f"out of bounds: {current} replicas, [{lo}, {hi}] is more than max_step {max_step} away"
    if (op == "+" and target <= current) or (op == "-" and target >= current) or target == current:
        return None, f"at the bound: {current} replicas, asked {op if op != '=' else ''}{n} within [{lo}, {hi}]"
    return target, ""
