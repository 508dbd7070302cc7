"""The embedded store: chDB (ClickHouse in-process) on a local data directory.

One read-write connection takes inserts and DDL; a small pool of connections
opened with ``readonly=1`` serves queries, so a slow dashboard query never holds
up ingestion and read-only SQL cannot write, change settings or reach files.

chDB allows one data directory per process at a time.

chDB 4.4 returns from an INSERT as if it had succeeded when the disk under the
data directory is full: no part is written, and the failure only shows as a
rising counter in ``system.errors`` (``NOT_ENOUGH_SPACE``: "Cannot reserve ...
not enough space"). So after every insert the counters of the errors that mean
"could not write to disk" (:data:`WRITE_FAILURES`) are read again, and a rise
turns into a :class:`~stethoscope.errors.StoreUnavailable` naming the directory.
The collector then keeps the batch and retries it under the same
deduplication token (:mod:`.ingest`), so a failure blamed on an insert that
did in fact write (a background merge that ran out of space in between, say)
stores nothing twice. The check is one small query per insert
(docs/benchmarks.md, "Cardinality limiter" section, has its cost).
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from pathlib import Path

from stethoscope._extras import require
from stethoscope.errors import StoreError, StoreUnavailable

from .schema import SchemaOptions, quote_ident
from .store import QueryResult, Store, parse_clickhouse_error

__all__ = ["ChdbStore", "WRITE_FAILURES"]

#: ClickHouse error names that, counted in ``system.errors`` during an insert,
#: mean it could not write its data (memory errors are left out: read queries
#: on other connections raise those too).
WRITE_FAILURES = (
    "NOT_ENOUGH_SPACE",
    "CANNOT_WRITE_TO_FILE_DESCRIPTOR",
    "CANNOT_WRITE_TO_OSTREAM",
    "CANNOT_FSYNC",
    "CANNOT_TRUNCATE_FILE",
    "CANNOT_CREATE_DIRECTORY",
    "CANNOT_CLOSE_FILE",
)
_WRITE_FAILURES_SQL = (
    "SELECT name, sum(value), argMax(last_error_message, last_error_time) FROM system.errors WHERE name IN ("
    + ", ".join(f"'{n}'" for n in WRITE_FAILURES)
    + ") GROUP BY name"
)


class ChdbStore(Store):
    """Store backed by embedded chDB in ``data_dir``.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     store = ChdbStore(d)
    ...     _ = store.ensure_schema()
    ...     print(store.query("SELECT count() FROM otel_metrics_gauge", "TabSeparated").data)
    ...     store.close()
    b'0\\n'
    """

    name = "chdb"

    def __init__(self, data_dir: str | os.PathLike[str], schema: SchemaOptions | None = None, *, readers: int = 2):
        super().__init__(schema or SchemaOptions())
        chdb = require("chdb", extra="server", feature="The embedded store")
        self.path = Path(data_dir).expanduser().resolve()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the data directory {self.path}: {exc.strerror}") from exc
        try:
            self._rw = chdb.connect(str(self.path))
            self._readers: queue.SimpleQueue = queue.SimpleQueue()
            self._all = [self._rw]
            for _ in range(max(1, readers)):
                conn = chdb.connect(f"{self.path}?readonly=1")
                self._all.append(conn)
                self._readers.put(conn)
        except Exception as exc:  # chDB raises RuntimeError and its own ChdbError
            self._close_all()
            raise StoreError(f"cannot open the chDB store in {self.path}: {exc}") from exc
        self._rw_lock = threading.Lock()
        self._closed = False
        # Unqualified table names in queries and inserts mean our database.
        self.execute(f"CREATE DATABASE IF NOT EXISTS {quote_ident(self.database)}")
        for conn in self._all:
            conn.query(f"USE {quote_ident(self.database)}")
        with self._rw_lock:
            self._write_errors = self._read_write_errors()[0]

    def _close_all(self) -> None:
        for conn in getattr(self, "_all", []):
            try:
                conn.close()
            except Exception:  # closing a half-opened connection: nothing more to do
                pass

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("the store is closed")

    @staticmethod
    def _error(exc: BaseException, what: str) -> StoreError:
        text = str(exc)
        return StoreError(f"{what}: {text}", code=parse_clickhouse_error(text))

    def execute(self, sql: str) -> None:
        self._check_open()
        with self._rw_lock:
            try:
                self._rw.query(sql)
            except Exception as exc:
                raise self._error(exc, "statement failed") from exc

    def query(self, sql: str, fmt: str = "JSONEachRow", *, readonly: bool = True) -> QueryResult:
        self._check_open()
        if readonly:
            conn = self._readers.get()
            try:
                res = conn.query(sql, fmt)
            except Exception as exc:
                raise self._error(exc, "query failed") from exc
            finally:
                self._readers.put(conn)
        else:
            with self._rw_lock:
                try:
                    res = self._rw.query(sql, fmt)
                except Exception as exc:
                    raise self._error(exc, "query failed") from exc
        if res is None:
            return QueryResult(b"")
        return QueryResult(
            data=res.bytes(),
            rows_read=res.rows_read(),
            bytes_read=res.bytes_read(),
            elapsed_s=res.elapsed(),
            result_rows=res.rows_read(),
        )

    def insert_raw(self, statement: str, data: bytes, fmt: str) -> int:
        self._check_open()
        with self._rw_lock:
            try:
                inserter = self._rw.send_insert(statement, fmt)
                try:
                    inserter.append(data)
                    result = inserter.finish()
                except BaseException:
                    with contextlib.suppress(Exception):  # the original error is what matters
                        inserter.cancel()
                    raise
            except Exception as exc:
                raise self._error(exc, "insert failed") from exc
            self._check_written()
        return int(result.rows_written)

    def _read_write_errors(self) -> tuple[dict[str, int], dict[str, str]]:
        """The counters of :data:`WRITE_FAILURES` in ``system.errors``, and their last messages."""
        try:
            res = self._rw.query(_WRITE_FAILURES_SQL, "TabSeparated")
        except Exception as exc:
            raise self._error(exc, "cannot read system.errors after an insert") from exc
        counts: dict[str, int] = {}
        messages: dict[str, str] = {}
        for line in res.bytes().decode("utf-8", "replace").splitlines():
            name, value, message = (line.split("\t", 2) + ["", ""])[:3]
            counts[name] = int(value)
            messages[name] = message.replace("\\n", " ").replace("\\t", " ").replace("\\'", "'")
        return counts, messages

    def _check_written(self) -> None:
        """Raise if a write failure was counted since the last check (call with the write lock held)."""
        counts, messages = self._read_write_errors()
        risen = sorted(n for n, v in counts.items() if v > self._write_errors.get(n, 0))
        self._write_errors = counts
        if not risen:
            return
        try:
            st = os.statvfs(self.path)
            free = f"{st.f_bavail * st.f_frsize} bytes free there"
        except OSError as exc:
            free = f"its free space is unknown ({exc.strerror})"
        detail = "; ".join(f"{n}: {messages.get(n, '')[:300]}" for n in risen)
        raise StoreUnavailable(  # a full disk passes: the collector keeps the batch and retries it
            f"insert failed: chDB could not write under {self.path} ({detail}); {free}. "
            "Its rows are not stored (chDB reports such inserts as done): free disk space or move store.data_dir",
            code=243 if "NOT_ENOUGH_SPACE" in risen else None,
        )

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._close_all()
