"""The embedded store: chDB (ClickHouse in-process) on a local data directory.

One read-write connection takes inserts and DDL; a small pool of connections
opened with ``readonly=1`` serves queries, so a slow dashboard query never holds
up ingestion and read-only SQL cannot write, change settings or reach files.

chDB allows one data directory per process at a time.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from pathlib import Path

from stethoscope._extras import require
from stethoscope.errors import StoreError

from .schema import SchemaOptions, quote_ident
from .store import QueryResult, Store, parse_clickhouse_error

__all__ = ["ChdbStore"]


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
        return int(result.rows_written)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._close_all()
