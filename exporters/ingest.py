"""Batching between the receivers and the store, with group commit.

Receivers :meth:`Ingestor.submit` the rows of one request (RowBinary per table)
and wait on the returned :class:`Ticket`; they answer the client only once the
rows are stored, so an acknowledged request is never lost. One writer thread
takes everything pending, inserts it per table in one batch with a fresh
deduplication token, and retries that same batch with the same token while the
store is unavailable, so a retry is never stored twice.

A batch is inserted as soon as ``batch_rows`` rows are waiting, or when its
oldest row has waited ``flush_interval_s``. Under load, rows that arrive while a
batch is being inserted form the next one, so batches grow with the load without
adding latency. When ``queue_max_rows`` are waiting, :meth:`Ingestor.submit`
raises :class:`Saturated` and receivers answer 503 with ``Retry-After``.

Before each insert into an embedded store (one with a local ``path``), the free
space under it is checked: with less than ``min_free_bytes`` (or twice the
batch) free, the batch fails with a :class:`StoreError` naming the directory,
and receivers answer 503. chDB 4.4's streaming insert reports success when the
disk is full and writes nothing (the error only reaches ``system.errors``), so
without this check a full disk would lose acknowledged data.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Sequence

from stethoscope.errors import StoreError, StoreUnavailable

from .selfmetrics import SelfMetrics
from .store import Store, with_retries

__all__ = ["Ingestor", "Ticket", "Saturated"]

log = logging.getLogger(__name__)


class Saturated(Exception):
    """The queue is full; the caller should ask its client to retry later."""


class Ticket:
    """Completion of one submission, which may span several tables."""

    __slots__ = ("_event", "_parts", "_lock", "error", "rows", "_cancelled", "_taken")

    def __init__(self, parts: int) -> None:
        self._event = threading.Event()
        self._parts = parts
        self._lock = threading.Lock()
        self.error: StoreError | None = None
        self.rows = 0
        self._cancelled = False
        self._taken = False

    def _part_done(self, rows: int, error: StoreError | None) -> None:
        with self._lock:
            self.rows += rows
            if error is not None and self.error is None:
                self.error = error
            self._parts -= 1
            if self._parts == 0:
                self._event.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until stored (True) or ``timeout`` passes (False); raise if it failed."""
        if not self._event.wait(timeout):
            return False
        if self.error is not None:
            raise self.error
        return True


class _Part:
    __slots__ = ("rows", "data", "ticket", "since")

    def __init__(self, rows: int, data: bytes, ticket: Ticket, since: float) -> None:
        self.rows, self.data, self.ticket, self.since = rows, data, ticket, since


class Ingestor:
    """Group-commit batcher in front of a :class:`Store`."""

    def __init__(
        self,
        store: Store,
        columns: dict[str, Sequence[str]],
        *,
        batch_rows: int = 10_000,
        flush_interval_s: float = 0.2,
        queue_max_rows: int = 2_000_000,
        attempts: int = 8,
        metrics: SelfMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        min_free_bytes: int = 16 * 1024 * 1024,
    ) -> None:
        self.store = store
        self.columns = columns
        self.batch_rows = batch_rows
        self.flush_interval_s = flush_interval_s
        self.queue_max_rows = queue_max_rows
        self.attempts = attempts
        self.metrics = metrics or SelfMetrics()
        self._clock = clock
        self.min_free_bytes = min_free_bytes
        path = getattr(store, "path", None)  # the embedded store's directory; a server store has none
        self._data_dir = os.fspath(path) if isinstance(path, (str, os.PathLike)) else None
        self._cond = threading.Condition()
        self._pending: dict[str, list[_Part]] = {}
        self._pending_rows = 0
        self._inflight_rows = 0
        self._oldest: float | None = None
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="stethoscope-writer", daemon=True)
        self._started = False

    def start(self) -> None:
        if not self._started:
            self._started = True
            self._thread.start()

    @property
    def queued_rows(self) -> int:
        with self._cond:
            return self._pending_rows + self._inflight_rows

    def submit(self, parts: Sequence[tuple[str, int, bytes]]) -> Ticket:
        """Queue ``(table, rows, rowbinary)`` parts; raise :class:`Saturated` if full."""
        parts = [p for p in parts if p[1] > 0]
        ticket = Ticket(len(parts))
        if not parts:
            ticket._event.set()
            return ticket
        rows = sum(p[1] for p in parts)
        now = self._clock()
        with self._cond:
            if self._closing:
                raise Saturated("the collector is shutting down")
            queued = self._pending_rows + self._inflight_rows
            if queued and queued + rows > self.queue_max_rows:
                raise Saturated(f"{queued} rows are already waiting to be stored")
            for table, n, data in parts:
                if table not in self.columns:
                    raise KeyError(f"unknown table {table!r}")
                self._pending.setdefault(table, []).append(_Part(n, data, ticket, now))
            self._pending_rows += rows
            if self._oldest is None:
                self._oldest = now
            self.metrics.queue_rows.set(self._pending_rows + self._inflight_rows)
            self._cond.notify()
        return ticket

    def cancel(self, ticket: Ticket) -> bool:
        """Withdraw a submission not yet taken by the writer; True if withdrawn."""
        with self._cond:
            if ticket._taken or ticket._event.is_set():
                return False
            for table, parts in list(self._pending.items()):
                keep = [p for p in parts if p.ticket is not ticket]
                self._pending_rows -= sum(p.rows for p in parts if p.ticket is ticket)
                if keep:
                    self._pending[table] = keep
                else:
                    del self._pending[table]
            ticket._cancelled = True
            self.metrics.queue_rows.set(self._pending_rows + self._inflight_rows)
            return True

    def close(self, timeout: float = 30.0) -> None:
        """Insert what is pending, then stop the writer."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._started:
            self._thread.join(timeout)

    # --- writer thread ---------------------------------------------------------

    def _take(self) -> dict[str, list[_Part]] | None:
        with self._cond:
            while True:
                if self._pending_rows == 0:
                    if self._closing:
                        return None
                    self._cond.wait()
                    continue
                if self._closing or self._pending_rows >= self.batch_rows:
                    break
                assert self._oldest is not None
                left = self._oldest + self.flush_interval_s - self._clock()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch, self._pending = self._pending, {}
            self._inflight_rows += self._pending_rows
            self._pending_rows = 0
            self._oldest = None
            for parts in batch.values():
                for p in parts:
                    p.ticket._taken = True
            return batch

    def _run(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            for table, parts in batch.items():
                self._insert(table, parts)
                with self._cond:
                    self._inflight_rows -= sum(p.rows for p in parts)
                    self.metrics.queue_rows.set(self._pending_rows + self._inflight_rows)

    def _insert(self, table: str, parts: list[_Part]) -> None:
        rows = sum(p.rows for p in parts)
        data = parts[0].data if len(parts) == 1 else b"".join(p.data for p in parts)
        token = uuid.uuid4().hex
        started = time.perf_counter()
        try:
            self._insert_once(table, data, token)
        except StoreError as exc:
            if len(parts) > 1 and not isinstance(exc, StoreUnavailable):
                # One bad part must not sink the others: store them one by one.
                log.warning("batch of %d parts into %s rejected (%s); inserting parts separately", len(parts), table, exc)
                for p in parts:
                    self._insert(table, [p])
                return
            log.error("could not store %d rows into %s: %s", rows, table, exc)
            self.metrics.batches.labels(table=table, outcome="failed").inc()
            for p in parts:
                p.ticket._part_done(0, exc)
            return
        self.metrics.insert_seconds.labels(table=table).observe(time.perf_counter() - started)
        self.metrics.rows_written.labels(table=table).inc(rows)
        self.metrics.batches.labels(table=table, outcome="ok").inc()
        for p in parts:
            p.ticket._part_done(p.rows, None)

    def _check_space(self, need: int) -> None:
        if self._data_dir is None:
            return
        try:
            st = os.statvfs(self._data_dir)
        except OSError:
            return  # the insert itself will say what is wrong
        free = st.f_bavail * st.f_frsize
        if free < max(self.min_free_bytes, 2 * need):
            raise StoreError(
                f"disk full: {free} bytes free under {self._data_dir}, need at least "
                f"{max(self.min_free_bytes, 2 * need)}; free space or move store.data_dir"
            )

    def _insert_once(self, table: str, data: bytes, token: str) -> None:
        self._check_space(len(data))
        attempt = 0

        def call() -> int:
            nonlocal attempt
            attempt += 1
            if attempt > 1:
                self.metrics.batches.labels(table=table, outcome="retried").inc()
            return self.store.insert(table, self.columns[table], data, token=token)

        with_retries(call, attempts=self.attempts, what=f"insert into {table}")
