"""Keeping the agent cheap: measure its own cost, judge it against a budget, pick the cadence.

* :class:`OverheadMeter` samples this process's CPU time and RSS (psutil) and
  turns two samples into a :class:`Usage` (CPU as a ratio of one core).
* :class:`OverheadBudget` accumulates usage over a window (10 s by default, so
  one slow collection is not a verdict) and says whether the agent is over
  budget, comfortably under it (below half), or fine.
* :class:`Cadence` decides the next collection interval: the fast interval
  while a collector asks for it and for ``hold_s`` after, then doubling back
  to the base interval; the whole thing multiplied by a backoff factor that
  doubles while over budget (up to ``max_backoff``) and halves once well under.
* :func:`register_self_metrics` publishes the agent's vitals as
  ``stethoscope.agent.*`` instruments.

Examples:
    >>> cadence = Cadence(base_s=10, fast_s=1, hold_s=5)
    >>> cadence.observe(now=0.0, wants_fast=True)
    1.0
    >>> [cadence.observe(now=t, wants_fast=False) for t in (2.0, 6.0, 7.0, 8.0, 9.0, 10.0)]
    [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    >>> cadence.back_off(), cadence.observe(now=11.0, wants_fast=False)
    (True, 20.0)
"""

from __future__ import annotations

import enum
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import psutil
from opentelemetry.metrics import CallbackOptions, Meter, Observation

__all__ = [
    "AgentVitals",
    "Cadence",
    "OverheadBudget",
    "OverheadMeter",
    "Usage",
    "Verdict",
    "register_self_metrics",
]


@dataclass(frozen=True)
class Usage:
    """The process's cost over one window."""

    cpu_ratio: float
    """CPU seconds per wall second (1.0 = one core busy)."""
    rss_bytes: int
    window_s: float


def _process_reader() -> Callable[[], tuple[float, int]]:
    proc = psutil.Process(os.getpid())

    def read() -> tuple[float, int]:
        times = proc.cpu_times()
        return times.user + times.system, proc.memory_info().rss

    return read


class OverheadMeter:
    """Measures this process (or what ``read`` returns: ``(cpu_seconds, rss_bytes)``).

    Examples:
        >>> readings = iter([(1.0, 10), (1.5, 20)])
        >>> clock = iter([0.0, 10.0])
        >>> meter = OverheadMeter(read=lambda: next(readings), clock=lambda: next(clock))
        >>> meter.sample() is None
        True
        >>> meter.sample()
        Usage(cpu_ratio=0.05, rss_bytes=20, window_s=10.0)
    """

    def __init__(
        self,
        *,
        read: Callable[[], tuple[float, int]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._read = read or _process_reader()
        self._clock = clock
        self._last: tuple[float, float] | None = None  # (wall, cpu)
        self.latest: Usage | None = None
        self.rss_bytes: int | None = None

    def sample(self) -> Usage | None:
        """Usage since the previous sample; None the first time (nothing to compare)."""
        now = self._clock()
        cpu, rss = self._read()
        self.rss_bytes = rss
        last, self._last = self._last, (now, cpu)
        if last is None or now <= last[0]:
            return None
        window = now - last[0]
        self.latest = Usage(cpu_ratio=max(0.0, cpu - last[1]) / window, rss_bytes=rss, window_s=window)
        return self.latest


class Verdict(enum.Enum):
    """What :meth:`OverheadBudget.judge` concluded about a finished window."""

    OVER = "over"
    OK = "ok"
    WELL_UNDER = "well_under"


class OverheadBudget:
    """At most ``cpu_ratio`` of one core and ``rss_bytes`` of memory; None disables a limit.

    Examples:
        >>> budget = OverheadBudget(cpu_ratio=0.01, rss_bytes=None, window_s=10)
        >>> budget.judge(Usage(0.05, 1, 5.0)) is None  # window not full yet
        True
        >>> budget.judge(Usage(0.05, 1, 5.0))
        <Verdict.OVER: 'over'>
    """

    def __init__(self, cpu_ratio: float | None = 0.01, rss_bytes: int | None = 60 * 1024 * 1024,
                 *, window_s: float = 10.0) -> None:
        self.cpu_ratio = cpu_ratio
        self.rss_bytes = rss_bytes
        self.window_s = window_s
        self._cpu_s = 0.0
        self._wall_s = 0.0

    def judge(self, usage: Usage | None) -> Verdict | None:
        """Add ``usage``; a verdict once ``window_s`` of usage has accumulated, else None."""
        if usage is None:
            return None
        self._cpu_s += usage.cpu_ratio * usage.window_s
        self._wall_s += usage.window_s
        if self._wall_s < self.window_s:
            return None
        cpu = self._cpu_s / self._wall_s
        self._cpu_s = self._wall_s = 0.0
        over = (self.cpu_ratio is not None and cpu > self.cpu_ratio) or (
            self.rss_bytes is not None and usage.rss_bytes > self.rss_bytes
        )
        if over:
            return Verdict.OVER
        under = (self.cpu_ratio is None or cpu < self.cpu_ratio / 2) and (
            self.rss_bytes is None or usage.rss_bytes < self.rss_bytes * 0.9
        )
        return Verdict.WELL_UNDER if under else Verdict.OK


class Cadence:
    """The collection interval: fast while asked, doubling back to base, times a budget backoff."""

    def __init__(self, base_s: float, fast_s: float, *, hold_s: float = 60.0, max_backoff: int = 16) -> None:
        self.base_s = float(base_s)
        self.fast_s = float(min(fast_s, base_s))
        self.hold_s = float(hold_s)
        self.max_backoff = max(1, int(max_backoff))
        self.backoff = 1
        self._fast_until: float | None = None
        self._step = self.base_s  # before backoff
        self.interval_s = self.base_s

    @property
    def fast(self) -> bool:
        """True while the fast interval is in force (including its hold time)."""
        return self._step < self.base_s

    def observe(self, now: float, wants_fast: bool) -> float:
        """Record whether anything asked for fast collection at ``now``; return the next interval."""
        if wants_fast:
            self._fast_until = now + self.hold_s
        if wants_fast or (self._fast_until is not None and now < self._fast_until):
            self._step = self.fast_s
        else:
            self._fast_until = None
            self._step = min(self.base_s, self._step * 2)
        self.interval_s = self._step * self.backoff
        return self.interval_s

    def back_off(self) -> bool:
        """Double the backoff factor (up to ``max_backoff``); True if it changed."""
        if self.backoff >= self.max_backoff:
            return False
        self.backoff = min(self.max_backoff, self.backoff * 2)
        self.interval_s = self._step * self.backoff
        return True

    def relax(self) -> bool:
        """Halve the backoff factor (down to 1); True if it changed."""
        if self.backoff == 1:
            return False
        self.backoff //= 2
        self.interval_s = self._step * self.backoff
        return True


@dataclass(frozen=True)
class AgentVitals:
    """What the self metrics report; the agent refreshes one snapshot per collection."""

    interval_s: float
    usage: Usage | None = None
    rss_bytes: int | None = None
    spool_bytes: int | None = None
    spool_records: int | None = None
    dropped_points: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))


def register_self_metrics(meter: Meter, vitals: Callable[[], AgentVitals]) -> None:
    """Create the ``stethoscope.agent.*`` instruments on ``meter``, reading ``vitals()``."""

    def one(pick: Callable[[AgentVitals], float | int | None]) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(_options: CallbackOptions) -> Iterable[Observation]:
            value = pick(vitals())
            return [] if value is None else [Observation(value)]

        return callback

    def dropped(_options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(n, {"reason": reason}) for reason, n in sorted(vitals().dropped_points.items())]

    meter.create_observable_gauge(
        "stethoscope.agent.cpu.utilization", [one(lambda v: v.usage.cpu_ratio if v.usage else None)], unit="1",
        description="CPU the agent process used over the last collection interval, as a fraction of one core.",
    )
    meter.create_observable_gauge(
        "stethoscope.agent.memory.rss", [one(lambda v: v.rss_bytes)], unit="By",
        description="Resident memory of the agent process.",
    )
    meter.create_observable_counter(
        "stethoscope.agent.points.dropped", [dropped], unit="{point}",
        description="Data points the agent dropped, by reason (spool_full, spool_error, http_<status>...).",
    )
    meter.create_observable_gauge(
        "stethoscope.agent.spool.size", [one(lambda v: v.spool_bytes)], unit="By",
        description="Bytes the on-disk spool takes.",
    )
    meter.create_observable_gauge(
        "stethoscope.agent.spool.records", [one(lambda v: v.spool_records)], unit="{record}",
        description="Collections waiting in the spool to be delivered.",
    )
    meter.create_observable_gauge(
        "stethoscope.agent.interval", [one(lambda v: v.interval_s)], unit="s",
        description="The collection interval in force.",
    )
