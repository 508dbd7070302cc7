"""The Store: one interface over the embedded chDB store and a ClickHouse server.

Both backends run the same DDL (:mod:`.schema`) and the same SQL, and take inserts
as ClickHouse RowBinary or any other input format, each insert carrying a
deduplication token so a retried batch is never stored twice.

Backends are plugins in the entry-point group ``stethoscope.stores``.
"""

from __future__ import annotations

import json
import logging
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points

from stethoscope.errors import PluginError, SchemaError, StoreError, StoreUnavailable

from .schema import MIGRATIONS, SchemaOptions, create_statements, quote_ident, ttl_statements

__all__ = ["Store", "QueryResult", "open_store", "with_retries", "READ_ONLY_VERBS", "parse_clickhouse_error"]

log = logging.getLogger(__name__)

#: First keywords of statements that only read.
READ_ONLY_VERBS = frozenset({"SELECT", "WITH", "SHOW", "DESCRIBE", "DESC", "EXPLAIN", "EXISTS"})


@dataclass(frozen=True)
class QueryResult:
    """Raw bytes of a query result in the requested format, with its statistics."""

    data: bytes
    rows_read: int = 0
    bytes_read: int = 0
    rows_written: int = 0
    bytes_written: int = 0
    elapsed_s: float = 0.0
    result_rows: int = 0


class Store(ABC):
    """Where telemetry lives. Thread-safe; every method may raise :class:`StoreError`."""

    name: str = "store"

    def __init__(self, schema: SchemaOptions) -> None:
        self.schema = schema

    @property
    def database(self) -> str:
        return self.schema.database

    @abstractmethod
    def execute(self, sql: str) -> None:
        """Run a statement that returns nothing (DDL), with full privileges."""

    @abstractmethod
    def query(self, sql: str, fmt: str = "JSONEachRow", *, readonly: bool = True) -> QueryResult:
        """Run ``sql`` and return its result in ``fmt`` (ignored if the SQL has FORMAT).

        ``readonly`` runs it with ClickHouse's ``readonly=1``: no writes, no
        settings changes, no table functions that reach files or the network.
        """

    def insert(
        self,
        table: str,
        columns: Sequence[str],
        data: bytes,
        *,
        fmt: str = "RowBinary",
        token: str | None = None,
    ) -> int:
        """Insert ``data`` (in input format ``fmt``) into ``table``; return rows written.

        ``table`` may be qualified (``db.table``); unqualified names live in
        :attr:`database`. ``token`` is ClickHouse's ``insert_deduplication_token``:
        a second insert with the same token into the same table is dropped.
        """
        db, _, name = table.rpartition(".")
        target = f"{quote_ident(db.strip('`') or self.database)}.{quote_ident(name.strip('`'))}"
        cols = f" ({', '.join(quote_ident(c) for c in columns)})" if columns else ""
        settings = ""
        if token:
            safe = token.replace("\\", "\\\\").replace("'", "\\'")
            settings = f" SETTINGS insert_deduplication_token = '{safe}'"
        return self.insert_raw(f"INSERT INTO {target}{cols}{settings}", data, fmt)

    @abstractmethod
    def insert_raw(self, statement: str, data: bytes, fmt: str) -> int:
        """Run ``statement`` (an ``INSERT INTO ...`` without FORMAT) with ``data`` in ``fmt``."""

    @abstractmethod
    def close(self) -> None:
        """Release connections; further calls fail."""

    def ping(self) -> bool:
        try:
            self.query("SELECT 1", "TabSeparated")
        except StoreError:
            return False
        return True

    # --- schema ------------------------------------------------------------

    def ensure_schema(self) -> list[int]:
        """Create missing tables, apply pending migrations, align TTLs.

        Idempotent; returns the migration versions applied by this call.
        """
        db = quote_ident(self.database)
        try:
            for stmt in create_statements(self.schema):
                self.execute(stmt)
            rows = self.query(
                f"SELECT Version FROM {db}.schema_migrations FINAL", "TabSeparated", readonly=False
            ).data.split()
            applied = {int(v) for v in rows}
            done = []
            for m in MIGRATIONS:
                if m.version in applied:
                    continue
                log.info("applying schema migration %d: %s", m.version, m.description)
                for stmt in m.statements:
                    self.execute(stmt.format(db=db, on_cluster=self.schema.on_cluster()))
                desc = m.description.replace("\\", "\\\\").replace("'", "\\'")
                self.execute(
                    f"INSERT INTO {db}.schema_migrations (Version, Description, AppliedAt) "
                    f"VALUES ({m.version}, '{desc}', now64(3))"
                )
                done.append(m.version)
            current = {}
            for line in self.query(
                f"SELECT name, create_table_query FROM system.tables WHERE database = '{self.database}'",
                "JSONCompactEachRow",
                readonly=False,
            ).data.splitlines():
                name, ddl = json.loads(line)
                current[name] = ddl
            for stmt in ttl_statements(self.schema, current):
                log.info("changing TTL: %s", stmt)
                self.execute(stmt)
        except StoreError as exc:
            raise SchemaError(f"could not create or migrate the schema in {self.database!r}: {exc}") from exc
        return done


_CODE = re.compile(r"Code:\s*(\d+)")


def parse_clickhouse_error(text: str) -> int | None:
    """The numeric ClickHouse error code in an exception text, if any.

    >>> parse_clickhouse_error("Code: 62. DB::Exception: Syntax error")
    62
    """
    m = _CODE.search(text)
    return int(m.group(1)) if m else None


def with_retries(fn, *, attempts: int, what: str, base_delay: float = 0.05, max_delay: float = 2.0):
    """Call ``fn`` until it succeeds, retrying :class:`StoreUnavailable` with backoff."""
    delay = base_delay
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except StoreUnavailable as exc:
            if attempt == attempts:
                raise
            log.warning("%s failed (attempt %d of %d), retrying in %.2fs: %s", what, attempt, attempts, delay, exc)
            time.sleep(delay)
            delay = min(delay * 2, max_delay)
    raise AssertionError("unreachable")


def open_store(kind: str, **kwargs) -> Store:
    """Instantiate the store backend registered under ``kind`` (``chdb``, ``clickhouse``)."""
    eps = {ep.name: ep for ep in entry_points(group="stethoscope.stores")}
    if kind not in eps:
        raise PluginError(f"unknown store {kind!r}; available: {', '.join(sorted(eps)) or 'none'}")
    try:
        cls = eps[kind].load()
    except Exception as exc:  # any import-time failure of a plugin is reported, not hidden
        raise PluginError(f"store plugin {kind!r} ({eps[kind].value}) failed to load: {exc}") from exc
    if not (isinstance(cls, type) and issubclass(cls, Store)):
        raise PluginError(f"store plugin {kind!r} ({eps[kind].value}) is not a Store subclass")
    return cls(**kwargs)
