"""Batching between the receivers and the store, with group commit and a journal.

Receivers :meth:`Ingestor.submit` the rows of one request (RowBinary per table)
and wait on the returned :class:`Ticket`; they answer the client only once the
rows are stored (or, with a journal, durably accepted), so an acknowledged
request is never lost. One writer thread takes everything pending and inserts it
per table in one batch, each table with the deduplication token
``<batch token>-<table>``, and retries that same batch with the same tokens
while the store is unavailable, so a retry is never stored twice.

A batch is inserted as soon as ``batch_rows`` rows are waiting, or when its
oldest row has waited ``flush_interval_s``. Under load, rows that arrive while a
batch is being inserted form the next one, so batches grow with the load without
adding latency. When ``queue_max_rows`` are waiting, :meth:`Ingestor.submit`
raises :class:`Saturated` and receivers answer 503 with ``Retry-After``.

With a :class:`~.journal.Journal`, delivery is exactly once (see that module):

- each batch is written to the journal and flushed before its inserts, and
  inserted again with the same tokens after a crash;
- a request submitted with an idempotency ``key`` that is already stored, or
  already waiting, is not stored again: the caller gets the earlier outcome;
- when the store stays unavailable past ``attempts``, the batch's requests are
  answered as accepted (the journal holds them) and the writer keeps retrying the
  batch, backing off up to ``retry_max_s``, until the store returns; a stop in the
  meantime leaves it in the journal for the next start. New requests queue behind
  it until ``queue_max_rows`` and are then refused with 503.

Without a journal, requests of a batch the store could not take get the error
(503 to clients, which keep the data and send it again).

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

from .journal import Journal, JournalError
from .selfmetrics import SelfMetrics
from .store import Store, with_retries

__all__ = ["Ingestor", "Ticket", "Saturated"]

log = logging.getLogger(__name__)


class Saturated(Exception):
    """The queue is full; the caller should ask its client to retry later."""


class Ticket:
    """Completion of one submission, which may span several tables.

    ``duplicate`` is True when the submission carried a key that was already
    stored: nothing was queued and :meth:`wait` returns True at once.
    """

    __slots__ = ("_event", "_parts", "_lock", "error", "rows", "_cancelled", "_taken", "key", "duplicate")

    def __init__(self, parts: int, key: bytes | None = None) -> None:
        self._event = threading.Event()
        self._parts = parts
        self._lock = threading.Lock()
        self.error: StoreError | None = None
        self.rows = 0
        self._cancelled = False
        self._taken = False
        self.key = key
        self.duplicate = False

    def _part_done(self, rows: int, error: StoreError | None) -> None:
        with self._lock:
            self.rows += rows
            if error is not None and self.error is None:
                self.error = error
            self._parts -= 1
            if self._parts == 0:
                self._event.set()

    @property
    def done(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until stored (True) or ``timeout`` passes (False); raise if it failed."""
        if not self._event.wait(timeout):
            return False
        if self.error is not None:
            raise self.error
        return True


class _Part:
    __slots__ = ("rows", "data", "ticket", "since", "done")

    def __init__(self, rows: int, data: bytes, ticket: Ticket, since: float) -> None:
        self.rows, self.data, self.ticket, self.since = rows, data, ticket, since
        self.done = False

    def finish(self, rows: int, error: StoreError | None) -> None:
        if not self.done:
            self.done = True
            self.ticket._part_done(rows, error)


class Ingestor:
    """Group-commit batcher in front of a :class:`Store`, optionally journaled."""

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
        journal: Journal | None = None,
        retry_max_s: float = 5.0,
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
        self.journal = journal
        self.retry_max_s = retry_max_s
        path = getattr(store, "path", None)  # the embedded store's directory; a server store has none
        self._data_dir = os.fspath(path) if isinstance(path, (str, os.PathLike)) else None
        self._cond = threading.Condition()
        self._pending: dict[str, list[_Part]] = {}
        self._pending_rows = 0
        self._inflight_rows = 0
        self._oldest: float | None = None
        self._closing = False
        self._by_key: dict[bytes, Ticket] = {}  # keys of requests queued or being inserted
        self._recovered: list[tuple[str, dict[str, list[_Part]]]] = []
        self._thread = threading.Thread(target=self._run, name="stethoscope-writer", daemon=True)
        self._started = False

    def start(self) -> None:
        """Start the writer; with a journal, first take back the batches a crash left behind."""
        if self._started:
            return
        if self.journal is not None:
            now = self._clock()
            for jb in self.journal.recover():
                for table in [t for t in jb.tables if t not in self.columns]:
                    log.error("ingest journal: batch %s holds rows for unknown table %s; they are dropped",
                              jb.token, table)
                    del jb.tables[table]
                ticket = Ticket(sum(len(parts) for parts in jb.tables.values()) or 1)
                ticket._taken = True
                batch = {t: [_Part(rows, data, ticket, now) for rows, data in parts] for t, parts in jb.tables.items()}
                if not batch:
                    ticket._event.set()
                for k in jb.keys:
                    self._by_key[k] = ticket  # a client's replay waits for this batch
                self._inflight_rows += sum(p.rows for parts in batch.values() for p in parts)
                self._recovered.append((jb.token, batch))
            self.metrics.journal_pending.set(len(self._recovered))
        self._started = True
        self._thread.start()

    @property
    def queued_rows(self) -> int:
        with self._cond:
            return self._pending_rows + self._inflight_rows

    def submit(self, parts: Sequence[tuple[str, int, bytes]], key: bytes | None = None) -> Ticket:
        """Queue ``(table, rows, rowbinary)`` parts; raise :class:`Saturated` if full.

        ``key`` is the request's idempotency key (see :meth:`.journal.Journal.key`);
        it is honoured only with a journal. A key already waiting returns that
        request's ticket; a key already stored returns a finished ticket with
        ``duplicate`` set.
        """
        parts = [p for p in parts if p[1] > 0]
        if self.journal is None:
            key = None
        if key is not None:
            with self._cond:
                earlier = self._by_key.get(key)
            if earlier is not None or self.journal.committed(key):
                self.metrics.duplicate_requests.inc()
                if earlier is not None:
                    return earlier
                ticket = Ticket(0, key)
                ticket.duplicate = True
                ticket._event.set()
                return ticket
        ticket = Ticket(len(parts), key)
        if not parts:
            ticket._event.set()
            return ticket
        rows = sum(p[1] for p in parts)
        now = self._clock()
        with self._cond:
            if self._closing:
                raise Saturated("the collector is shutting down")
            if key is not None and key in self._by_key:  # the same key raced in from another connection
                self.metrics.duplicate_requests.inc()
                return self._by_key[key]
            queued = self._pending_rows + self._inflight_rows
            if queued and queued + rows > self.queue_max_rows:
                raise Saturated(f"{queued} rows are already waiting to be stored")
            for table, _n, _data in parts:
                if table not in self.columns:
                    raise KeyError(f"unknown table {table!r}")
            for table, n, data in parts:
                self._pending.setdefault(table, []).append(_Part(n, data, ticket, now))
            if key is not None:
                self._by_key[key] = ticket
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
            if ticket.key is not None and self._by_key.get(ticket.key) is ticket:
                del self._by_key[ticket.key]
            ticket._cancelled = True
            self.metrics.queue_rows.set(self._pending_rows + self._inflight_rows)
            return True

    def close(self, timeout: float = 30.0) -> None:
        """Insert what is pending, then stop the writer.

        With a journal, a batch the store still refuses stays in the journal for
        the next start; the writer stops retrying it at once.
        """
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._started:
            self._thread.join(timeout)
        if self.journal is not None and not self._thread.is_alive():
            self.journal.close()

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
        recovered, self._recovered = self._recovered, []
        for token, batch in recovered:
            if not self._write_batch(token, batch, journaled=True):
                return  # closing while the store is still down: the journal keeps the rest
        while True:
            batch = self._take()
            if batch is None:
                return
            if not self._write_batch(uuid.uuid4().hex, batch, journaled=False):
                return

    def _release(self, batch: dict[str, list[_Part]]) -> None:
        """The batch is finished: forget its keys and its rows."""
        with self._cond:
            for parts in batch.values():
                for p in parts:
                    k = p.ticket.key
                    if k is not None and self._by_key.get(k) is p.ticket:
                        del self._by_key[k]
            self._inflight_rows -= sum(p.rows for parts in batch.values() for p in parts)
            self.metrics.queue_rows.set(self._pending_rows + self._inflight_rows)

    def _write_batch(self, token: str, batch: dict[str, list[_Part]], *, journaled: bool) -> bool:
        """Store one batch; False if the writer must stop (closing while the store is down)."""
        journal = self.journal
        if journal is not None and not journaled:
            keys = list(dict.fromkeys(p.ticket.key for ps in batch.values() for p in ps if p.ticket.key is not None))
            try:
                journal.append_batch(token, keys, {t: [(p.rows, p.data) for p in ps] for t, ps in batch.items()})
            except JournalError as exc:
                log.error("could not store a batch of %d rows: %s", sum(p.rows for ps in batch.values() for p in ps), exc)
                for ps in batch.values():
                    for p in ps:
                        p.finish(0, exc)
                self._release(batch)
                return True
            self.metrics.journal_pending.set(journal.pending_batches)
        delay = 0.5
        done: set[str] = set()
        while True:
            unavailable: StoreUnavailable | None = None
            for table, parts in batch.items():
                if table in done:
                    continue
                unavailable = self._insert(table, parts, f"{token}-{table}")
                if unavailable is not None:
                    break
                done.add(table)
            if unavailable is None:
                break
            if journal is None:  # nobody else holds the rows: the clients keep them and retry
                for ps in batch.values():
                    for p in ps:
                        p.finish(0, unavailable)
                break
            # The journal holds the batch: its requests are accepted, and the writer keeps trying.
            for ps in batch.values():
                for p in ps:
                    p.finish(p.rows, None)
            if delay == 0.5:
                log.warning("store unavailable (%s); batch %s is kept in the ingest journal and retried", unavailable, token)
            with self._cond:
                if self._closing:
                    log.warning("stopping with batch %s still unstored; it is inserted at the next start", token)
                    return False
                self._cond.wait(delay)
                if self._closing:
                    log.warning("stopping with batch %s still unstored; it is inserted at the next start", token)
                    return False
            delay = min(self.retry_max_s, delay * 2)
        if journal is not None:
            failed = [p.ticket.key for ps in batch.values() for p in ps
                      if p.ticket.key is not None and p.ticket.error is not None]
            journal.mark_done(token, failed)
            self.metrics.journal_pending.set(journal.pending_batches)
        self._release(batch)
        return True

    def _insert(self, table: str, parts: list[_Part], token: str) -> StoreUnavailable | None:
        """Insert ``parts`` into ``table`` under ``token``; finish their tickets.

        Returns the error, leaving the tickets alone, when the store is unavailable:
        the caller decides. One bad part does not sink the others: when a batch of
        several is refused, each part is inserted alone under ``token-i``.
        """
        rows = sum(p.rows for p in parts)
        data = parts[0].data if len(parts) == 1 else b"".join(p.data for p in parts)
        started = time.perf_counter()
        try:
            self._insert_once(table, data, token)
        except StoreUnavailable as exc:
            log.error("could not store %d rows into %s: %s", rows, table, exc)
            self.metrics.batches.labels(table=table, outcome="failed").inc()
            return exc
        except StoreError as exc:
            if len(parts) > 1:
                log.warning("batch of %d parts into %s rejected (%s); inserting parts separately", len(parts), table, exc)
                for i, p in enumerate(parts):
                    err = self._insert(table, [p], f"{token}-{i}")
                    if err is not None:
                        return err
                return None
            log.error("could not store %d rows into %s: %s", rows, table, exc)
            self.metrics.batches.labels(table=table, outcome="failed").inc()
            for p in parts:
                p.finish(0, exc)
            return None
        self.metrics.insert_seconds.labels(table=table).observe(time.perf_counter() - started)
        self.metrics.rows_written.labels(table=table).inc(rows)
        self.metrics.batches.labels(table=table, outcome="ok").inc()
        for p in parts:
            p.finish(p.rows, None)
        return None

    def _check_space(self, need: int) -> None:
        if self._data_dir is None:
            return
        try:
            st = os.statvfs(self._data_dir)
        except OSError:
            return  # the insert itself will say what is wrong
        free = st.f_bavail * st.f_frsize
        if free < max(self.min_free_bytes, 2 * need):
            raise StoreUnavailable(
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
