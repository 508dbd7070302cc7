"""The anomaly scheduler: every few seconds, the training, fleet, serving and cost watches look at new telemetry.

A *watch* is an object with ``name`` and ``run(store, now) -> list[Finding]``: it
reads the points that arrived since its own watermark, feeds its detectors (which
keep their state between runs) and returns what they concluded. The scheduler runs
each watch in turn, writes all findings of one run in one batch to ``findings``
and, when something was written, calls ``on_findings`` (``up`` uses it to wake the
alert runner, so an incident is not left waiting for the next alert interval).

A watch that fails is logged (once per error type with its traceback) and counted
in :attr:`errors`; the other watches still run and their findings are still written.

Examples:
    >>> from stethoscope.analytics.findings import Finding
    >>> class Fake:
    ...     name = "fake"
    ...     def run(self, store, now):
    ...         return [Finding(time=now, kind="loss_spike", subject="job=j rank=0", severity="warning")]
    >>> class Store:
    ...     rows = []
    ...     def insert(self, table, columns, data, fmt, token): self.rows.append(table); return 1
    >>> s = AnomalyScheduler(Store(), [Fake()], interval_s=5)
    >>> [f.kind for f in s.run_once(now=100.0)], Store.rows
    (['loss_spike'], ['findings'])
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from .._periodic import Periodic
from .findings import Finding, FindingsWriter

__all__ = ["AnomalyScheduler", "Watch"]

log = logging.getLogger(__name__)


class Watch(Protocol):
    name: str

    def run(self, store: Any, now: float) -> list[Finding]: ...


class AnomalyScheduler(Periodic):
    """Runs ``watches`` every ``interval_s`` and writes their findings."""

    _thread_name = "stethoscope-anomaly"
    _run_name = "anomaly run"
    _log = log

    def __init__(self, store: Any, watches: Sequence[Watch], *, interval_s: float = 10.0,
                 clock: Callable[[], float] = time.time,
                 on_findings: Callable[[list[Finding]], None] | None = None) -> None:
        if not (interval_s > 0 and math.isfinite(interval_s)):
            from ..errors import ConfigError

            raise ConfigError([f"interval_s: must be finite and > 0, got {interval_s!r}"])
        self.store = store
        self.watches = list(watches)
        self.interval_s = float(interval_s)
        self.clock = clock
        self.on_findings = on_findings
        self.writer = FindingsWriter(store)
        #: Findings written, by kind, since start.
        self.written: dict[str, int] = {}
        self._init_periodic()

    def run_once(self, now: float | None = None) -> list[Finding]:
        """Run every watch at ``now``; write and return the findings."""
        now = self.clock() if now is None else float(now)
        findings: list[Finding] = []
        for watch in self.watches:
            try:
                findings += watch.run(self.store, now)
            except Exception as exc:  # one broken watch must not hide the others
                self._record_error(exc, f"anomaly watch {getattr(watch, 'name', watch)!r}")
        if findings:
            self.writer.write(findings)
            for f in findings:
                self.written[f.kind] = self.written.get(f.kind, 0) + 1
            if self.on_findings is not None:
                try:
                    self.on_findings(findings)
                except Exception as exc:
                    self._record_error(exc, "on_findings callback")
        return findings
