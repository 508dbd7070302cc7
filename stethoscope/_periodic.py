"""A background loop for the services inside ``stethoscope up`` (drift checks, alerts).

A subclass sets ``_thread_name``, ``_run_name`` and ``_log``, calls
:meth:`Periodic._init_periodic` from its constructor, and implements ``run_once``.
The loop calls ``run_once()`` every ``interval_s`` and outlives any one failure: each
kind of error is logged once as a warning with its traceback, later ones at debug
level, and all are counted in ``errors``.
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from typing import Any

__all__ = ["Periodic"]


class Periodic(ABC):
    _thread_name = "stethoscope-periodic"
    _run_name = "run"
    _log = logging.getLogger(__name__)
    interval_s: float

    def _init_periodic(self) -> None:
        #: Errors caught by the background loop (and by the subclass), by exception type name.
        self.errors: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @abstractmethod
    def run_once(self, now: float | None = None) -> Any:
        """One pass of the subclass's work at ``now``."""

    def start(self) -> None:
        """Run :meth:`run_once` every ``interval_s`` on a daemon thread (first run after one interval)."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name=self._thread_name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread; a run in progress finishes first. Idempotent."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.run_once()
            except Exception as exc:  # the loop must outlive any one run
                self._record_error(exc, self._run_name)

    def _record_error(self, exc: Exception, what: str) -> None:
        kind = type(exc).__name__
        first = kind not in self.errors
        self.errors[kind] = self.errors.get(kind, 0) + 1
        if first:
            self._log.warning("%s failed (%s; later errors of this kind are logged at debug level)", what, kind,
                              exc_info=exc)
        else:
            self._log.debug("%s failed: %s", what, exc)
