"""Counting what the hot path refuses, with a rate-limited log line.

The SDK never raises from ``record``/``step``: a bad value is counted under a
reason and dropped. :class:`DropCounter` keeps those counts and logs at most
one line per reason every ``log_every_s`` seconds (with how many were dropped
since the last line), so a model server that sends NaNs at 10 kHz does not
flood its own logs.

Examples:
    >>> drops = DropCounter("example", log_every_s=60.0, clock=lambda: 0.0)
    >>> drops.add("nonfinite_feature", 3)
    >>> drops.add("wrong_shape")
    >>> dict(drops.snapshot())
    {'nonfinite_feature': 3, 'wrong_shape': 1}
    >>> drops.total
    4
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from types import MappingProxyType

__all__ = ["DropCounter"]

_log = logging.getLogger("stethoscope.agents.sdk")


class DropCounter:
    """Counts of dropped values by reason; thread-safe, never raises."""

    def __init__(self, owner: str, *, log_every_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.owner = owner
        self.log_every_s = float(log_every_s)
        self._clock = clock
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        self._unlogged: dict[str, int] = {}
        self._last_log: dict[str, float] = {}

    def add(self, reason: str, n: int = 1, detail: str = "") -> None:
        """Count ``n`` dropped values under ``reason``; log if this reason has been quiet long enough."""
        if n <= 0:
            return
        with self._lock:
            self._counts[reason] = self._counts.get(reason, 0) + n
            pending = self._unlogged.get(reason, 0) + n
            now = self._clock()
            last = self._last_log.get(reason)
            if last is not None and now - last < self.log_every_s:
                self._unlogged[reason] = pending
                return
            self._last_log[reason] = now
            self._unlogged[reason] = 0
        try:
            _log.warning(
                "%s: dropped %d value(s): %s%s (counted in monitor.dropped; logged at most every %gs per reason)",
                self.owner, pending, reason, f" ({detail})" if detail else "", self.log_every_s,
            )
        except Exception:  # a broken log handler must not reach the caller
            pass

    def snapshot(self) -> Mapping[str, int]:
        """A read-only copy of the counts so far."""
        with self._lock:
            return MappingProxyType(dict(self._counts))

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self._counts.values())
