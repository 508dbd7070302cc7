"""The server store: a ClickHouse server or cluster over HTTP, through clickhouse-connect.

Runs exactly the DDL and SQL of the embedded store. With ``cluster`` set in the
schema options, DDL carries ``ON CLUSTER``; pair it with a ``Replicated*`` engine.
"""

from __future__ import annotations

import threading
from urllib.parse import unquote, urlsplit

from stethoscope._extras import require
from stethoscope.errors import StoreError, StoreUnavailable

from .schema import SchemaOptions
from .store import QueryResult, Store, parse_clickhouse_error

__all__ = ["ClickHouseStore"]


class ClickHouseStore(Store):
    """Store backed by a ClickHouse server at ``url`` (``http[s]://user:password@host:port``)."""

    name = "clickhouse"

    def __init__(self, url: str, schema: SchemaOptions | None = None, *, timeout_s: float = 30.0):
        super().__init__(schema or SchemaOptions())
        self._cc = require("clickhouse_connect", extra="server", feature="The ClickHouse server store")
        from clickhouse_connect.driver import exceptions as cc_exc

        self._exc = cc_exc
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise StoreError(f"clickhouse_url must be an http:// or https:// URL, got {url!r}")
        self.url = url
        self._kwargs = dict(
            host=parts.hostname,
            port=parts.port or (8443 if parts.scheme == "https" else 8123),
            username=unquote(parts.username or "default"),
            password=unquote(parts.password or ""),
            secure=parts.scheme == "https",
            connect_timeout=timeout_s,
            send_receive_timeout=timeout_s,
            autogenerate_session_id=False,
        )
        self._local = threading.local()  # one client per thread: clients are not thread-safe
        self._closed = False
        self._clients: list = []
        self._lock = threading.Lock()
        # Probe now so a wrong URL fails at start, not at the first insert.
        self.execute(f"CREATE DATABASE IF NOT EXISTS `{self.database}`{self.schema.on_cluster()}")
        # From now on unqualified names mean our database, as in the embedded store.
        self._kwargs["database"] = self.database
        self._client().database = self.database

    def _client(self):
        if self._closed:
            raise StoreError("the store is closed")
        client = getattr(self._local, "client", None)
        if client is None:
            try:
                client = self._cc.get_client(**self._kwargs)
            except self._exc.OperationalError as exc:
                raise StoreUnavailable(f"cannot reach ClickHouse at {self._redacted()}: {exc}") from exc
            except self._exc.ClickHouseError as exc:
                raise StoreError(f"cannot connect to ClickHouse at {self._redacted()}: {exc}") from exc
            self._local.client = client
            with self._lock:
                self._clients.append(client)
        return client

    def _redacted(self) -> str:
        return f"{'https' if self._kwargs['secure'] else 'http'}://{self._kwargs['host']}:{self._kwargs['port']}"

    def _translate(self, exc: Exception, what: str) -> StoreError:
        text = str(exc)
        if isinstance(exc, self._exc.OperationalError):
            return StoreUnavailable(f"{what}: ClickHouse unreachable: {text}", code=parse_clickhouse_error(text))
        return StoreError(f"{what}: {text}", code=parse_clickhouse_error(text))

    def execute(self, sql: str) -> None:
        client = self._client()
        try:
            client.command(sql)
        except self._exc.ClickHouseError as exc:
            raise self._translate(exc, "statement failed") from exc

    def query(self, sql: str, fmt: str = "JSONEachRow", *, readonly: bool = True) -> QueryResult:
        client = self._client()
        settings = {"readonly": 1} if readonly else None
        try:
            data = client.raw_query(sql, fmt=fmt, settings=settings)
        except self._exc.ClickHouseError as exc:
            raise self._translate(exc, "query failed") from exc
        return QueryResult(data=bytes(data))

    def insert_raw(self, statement: str, data: bytes, fmt: str) -> int:
        client = self._client()
        try:
            summary = client.command(f"{statement} FORMAT {fmt}", data=data)
        except self._exc.ClickHouseError as exc:
            raise self._translate(exc, "insert failed") from exc
        written = getattr(summary, "written_rows", None)
        return int(written) if written is not None else 0

    def close(self) -> None:
        self._closed = True
        with self._lock:
            for client in self._clients:
                client.close()
            self._clients.clear()
