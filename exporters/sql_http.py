"""A ClickHouse-compatible HTTP SQL endpoint over the store.

It serves the subset of ClickHouse's HTTP interface that ``curl``, Grafana's
ClickHouse plugin (HTTP protocol) and ``clickhouse-connect`` use: queries by
``GET /?query=`` or ``POST /`` (query in the body or the ``query`` parameter),
``INSERT ... FORMAT <fmt>`` with the data as body, every ClickHouse output format
(``default_format`` or a ``FORMAT`` clause; TabSeparated by default), compressed
request bodies, compressed responses with ``enable_http_compression=1``, ``/ping``,
and errors as ClickHouse reports them (``X-ClickHouse-Exception-Code``).
``FORMAT Native`` follows the ``client_protocol_version`` a client sends, as
ClickHouse does (:mod:`.native_frame`); clickhouse-go, and so Grafana's plugin in
HTTP mode, needs it.

Read-only unless ``writable`` is set: writes are refused up front (403, code 164)
and reads run under ClickHouse's ``readonly=1``, which also blocks table
functions that would read files or reach the network.

With tokens configured (:mod:`.auth`), queries need a token with ``read`` (or
``write``), sent as ``Authorization: Bearer``, as the password of HTTP Basic
auth, or as ``X-ClickHouse-Key``; writes need ``write`` on top of
``writable``. A missing or unknown token is answered 401 (ClickHouse code 516,
``WWW-Authenticate: Bearer``), a missing permission 403 (code 497).
``/ping`` and ``/healthz`` stay open.
"""

from __future__ import annotations

import gzip
import json
import re
import socket
import time
import uuid
import zlib
from urllib.parse import parse_qs

from stethoscope.errors import StoreError, StoreUnavailable

from .http_common import BaseHandler, BodyError, decompress
from .native_frame import NativeFrameError, reframe
from .store import READ_ONLY_VERBS

__all__ = ["SqlHandler", "first_verb", "split_insert", "error_status", "WRITE_VERBS"]

_COMMENTS = re.compile(r"(--[^\n]*|#[^\n]*|/\*.*?\*/)", re.S)
_INSERT_FORMAT = re.compile(r"^\s*(INSERT\s+INTO\s+.+?)\s+FORMAT\s+([A-Za-z0-9_]+)\s*;?\s*$", re.I | re.S)
_TRAILING_FORMAT = re.compile(r"\bFORMAT\s+([A-Za-z0-9_]+)\s*;?\s*$", re.I)

#: Statements refused up front on a read-only endpoint (with a clear message).
WRITE_VERBS = frozenset(
    "INSERT CREATE DROP ALTER TRUNCATE RENAME ATTACH DETACH OPTIMIZE SYSTEM KILL GRANT REVOKE "
    "SET DELETE UPDATE EXCHANGE UNDROP BACKUP RESTORE MOVE USE CHECK".split()
)

_STATUS_BY_CODE = {62: 400, 6: 400, 27: 400, 36: 400, 46: 400, 47: 400, 164: 403, 497: 403, 60: 404, 81: 404}

# Statuses ClickHouse's own HTTP interface gives other errors, by error name
# (ClickHouse src/Server/HTTP/exceptionCodeToHTTPStatus.cpp); chDB's messages end in "(NAME)".
_STATUS_BY_NAME = {
    **dict.fromkeys(
        "UNKNOWN_TABLE UNKNOWN_TYPE UNKNOWN_STORAGE UNKNOWN_DATABASE UNKNOWN_SETTING UNKNOWN_DIRECTION_OF_SORTING "
        "UNKNOWN_AGGREGATE_FUNCTION UNKNOWN_FORMAT UNKNOWN_DATABASE_ENGINE UNKNOWN_TYPE_OF_QUERY UNKNOWN_ROLE".split(),
        404,
    ),
    "QUERY_IS_TOO_LARGE": 413,
    "NOT_IMPLEMENTED": 501,
    "TIMEOUT_EXCEEDED": 408,
    "SOCKET_TIMEOUT": 503,
    "CANNOT_SCHEDULE_TASK": 503,
    "UNSUPPORTED_MEDIA_TYPE": 415,
}
# Errors that say something about the server, not the query: these stay 5xx. Any
# other error a query raises is the query's fault (ClickHouse would answer 500 for
# many of them, e.g. ILLEGAL_TYPE_OF_ARGUMENT; this endpoint answers 400).
_SERVER_FAULTS = frozenset(
    "MEMORY_LIMIT_EXCEEDED CANNOT_ALLOCATE_MEMORY NOT_ENOUGH_SPACE LOGICAL_ERROR STD_EXCEPTION POCO_EXCEPTION "
    "UNKNOWN_EXCEPTION CANNOT_OPEN_FILE CANNOT_READ_FROM_FILE_DESCRIPTOR CANNOT_WRITE_TO_FILE_DESCRIPTOR "
    "TOO_MANY_SIMULTANEOUS_QUERIES ABORTED".split()
)
_ERROR_NAME = re.compile(r"\(([A-Z][A-Z0-9_]+)\)")
_QUERY_ID = re.compile(r"^[\x21-\x7e]{1,256}$")


def error_status(exc: StoreError) -> int:
    """The HTTP status for a store error: ClickHouse's mapping, 400 for other query errors.

    >>> error_status(StoreError("Code: 62. DB::Exception: Syntax error (SYNTAX_ERROR)", code=62))
    400
    >>> error_status(StoreError("Code: 73. DB::Exception: Unknown format Nope. (UNKNOWN_FORMAT)", code=73))
    404
    >>> error_status(StoreError("Code: 241. DB::Exception: Memory limit exceeded (MEMORY_LIMIT_EXCEEDED)", code=241))
    500
    """
    if isinstance(exc, StoreUnavailable):
        return 503
    if exc.code in _STATUS_BY_CODE:
        return _STATUS_BY_CODE[exc.code]
    names = _ERROR_NAME.findall(str(exc))
    name = names[-1] if names else ""
    if name in _STATUS_BY_NAME:
        return _STATUS_BY_NAME[name]
    if name in _SERVER_FAULTS or not exc.code:
        return 500
    return 400

_CONTENT_TYPES = (
    ("TabSeparated", "text/tab-separated-values; charset=UTF-8"),
    ("TSV", "text/tab-separated-values; charset=UTF-8"),
    ("JSON", "application/json; charset=UTF-8"),
    ("CSV", "text/csv; charset=UTF-8; header=absent"),
    ("XML", "application/xml; charset=UTF-8"),
    ("Pretty", "text/plain; charset=UTF-8"),
    ("Vertical", "text/plain; charset=UTF-8"),
    ("Values", "text/plain; charset=UTF-8"),
    ("Markdown", "text/markdown; charset=UTF-8"),
)


def first_verb(sql: str) -> str:
    """The first keyword of ``sql``, comments and brackets skipped, upper-cased.

    >>> first_verb("  -- hi\\n/* x */ (select 1)")
    'SELECT'
    >>> first_verb("insert into t values (1)")
    'INSERT'
    """
    text = _COMMENTS.sub(" ", sql).lstrip(" \t\r\n(")
    m = re.match(r"[A-Za-z]+", text)
    return m.group(0).upper() if m else ""


def split_insert(query: str) -> tuple[str, str] | None:
    """``(statement, format)`` when ``query`` is ``INSERT INTO ... FORMAT fmt`` with data to follow.

    >>> split_insert("INSERT INTO t (a, b) FORMAT Native")
    ('INSERT INTO t (a, b)', 'Native')
    >>> split_insert("INSERT INTO t VALUES (1)") is None
    True
    """
    m = _INSERT_FORMAT.match(_COMMENTS.sub(" ", query))
    return (m.group(1), m.group(2)) if m else None


def _content_type(fmt: str) -> str:
    for prefix, ctype in _CONTENT_TYPES:
        if fmt.startswith(prefix):
            return ctype
    return "application/octet-stream"


def _compress(body: bytes, accept: str) -> tuple[bytes, str | None]:
    offered = [e.split(";")[0].strip().lower() for e in accept.split(",")]
    for enc in offered:
        if enc == "gzip":
            return gzip.compress(body, 1), "gzip"
        if enc == "deflate":
            return zlib.compress(body, 1), "deflate"
        if enc == "zstd":
            import zstandard

            return zstandard.ZstdCompressor(level=1).compress(body), "zstd"
        if enc == "lz4":
            import lz4.frame

            return lz4.frame.compress(body), "lz4"
    return body, None


class SqlHandler(BaseHandler):
    endpoint = "sql"

    def do_HEAD(self) -> None:
        self.reply(200, b"")

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if self.serve_common():
            return
        if path in ("/ping", "/replicas_status"):
            self.reply(200, b"Ok.\n")
            return
        self._handle(path, allow_write=False)

    def do_POST(self) -> None:
        self._handle(self.path.split("?", 1)[0], allow_write=True)

    def _params(self) -> dict[str, str]:
        query = self.path.split("?", 1)[1] if "?" in self.path else ""
        return {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}

    def _handle(self, path: str, *, allow_write: bool) -> None:
        if path != "/":
            self._error(404, f"no SQL endpoint at {path}: send queries to /", 0, "UNKNOWN_PATH")
            return
        failure = self.auth_failure(("read", "write"), basic=True)
        if failure is not None:
            code, name = (516, "AUTHENTICATION_FAILED") if failure.status == 401 else (497, "ACCESS_DENIED")
            self._error(failure.status, failure.message, code, name, failure.headers, reason="")  # counted already
            return
        ctx = self.server.context
        params = self._params()
        try:
            raw = self.read_body(ctx["max_body_bytes"])
            body = decompress(raw, self.headers.get("Content-Encoding", ""), ctx["max_body_bytes"])
        except BodyError as exc:
            self._error(exc.status, str(exc), 0, "BAD_REQUEST_BODY", reason=exc.reason)
            return
        query = params.get("query", "")
        insert = split_insert(query) if query and body else None
        if insert is None:
            try:
                query = (query + "\n" + body.decode("utf-8")) if query and body else (query or body.decode("utf-8"))
            except UnicodeDecodeError:
                self._error(400, "the query is not valid UTF-8", 0, "BAD_QUERY")
                return
        if not query.strip():
            self.reply(200, b"Ok.\n")
            return
        verb = first_verb(insert[0] if insert else query)
        # Reads always run under readonly=1, even on a writable endpoint; anything
        # that is not plainly a read is refused up front unless writes are allowed,
        # and whatever slips through still meets readonly=1 in the store.
        writable = ctx["writable"] and allow_write and verb not in READ_ONLY_VERBS
        token_may_write = ctx.get("auth") is None or (self.token is not None and "write" in self.token.permissions)
        if verb in WRITE_VERBS and not (writable and token_may_write):
            if writable:
                why = f"token {self.token.name!r} lacks the write permission" if self.token else "no write permission"
                self.metrics.sql_queries.labels(outcome="refused").inc()
                self._error(403, f"Cannot execute {verb} query: {why}.", 497, "ACCESS_DENIED", reason="forbidden")
                return
            why = "GET requests are read-only" if ctx["writable"] else "the SQL endpoint is read-only (sql.writable = false)"
            self.metrics.sql_queries.labels(outcome="refused").inc()
            self._error(403, f"Cannot execute {verb or 'this'} query: {why}.", 164, "READONLY", reason="readonly")
            return
        writable = writable and token_may_write
        if not writable and self.token is not None and "read" not in self.token.permissions:
            self._error(403, f"token {self.token.name!r} lacks the read permission for this query", 497, "ACCESS_DENIED",
                        reason="forbidden")
            return
        store = ctx["store"]
        query_id = params.get("query_id") or self.headers.get("X-ClickHouse-Query-Id") or str(uuid.uuid4())
        if not _QUERY_ID.match(query_id):  # it is echoed in a response header
            self._error(400, "query_id must be 1 to 256 printable ASCII characters without spaces", 36, "BAD_ARGUMENTS")
            return
        try:
            revision = int(params.get("client_protocol_version") or 0)
            if revision < 0:
                raise ValueError
        except ValueError:
            self._error(400, "client_protocol_version must be a whole number >= 0", 36, "BAD_ARGUMENTS")
            return
        started = time.perf_counter_ns()
        try:
            if insert is not None:
                written = store.insert_raw(insert[0], body, insert[1])
                data, fmt, summary = b"", "TabSeparated", {"written_rows": written, "written_bytes": len(body)}
            else:
                m = _TRAILING_FORMAT.search(_COMMENTS.sub(" ", query))
                fmt = m.group(1) if m else (
                    params.get("default_format") or self.headers.get("X-ClickHouse-Format") or "TabSeparated"
                )
                db = params.get("database") or self.headers.get("X-ClickHouse-Database")
                if db and db != store.database:
                    self._error(400, f"database {db!r} is not served here; this endpoint serves {store.database!r}", 81, "UNKNOWN_DATABASE")
                    return
                res = store.query(query, fmt, readonly=not writable)
                data = res.data
                if fmt == "Native" and revision:
                    data = reframe(data, revision)
                summary = {
                    "read_rows": res.rows_read,
                    "read_bytes": res.bytes_read,
                    "written_rows": res.rows_written,
                    "written_bytes": res.bytes_written,
                    "result_rows": res.result_rows,
                    "result_bytes": len(data),
                }
        except NativeFrameError as exc:
            self.metrics.sql_queries.labels(outcome="error").inc()
            self._error(400, f"cannot send this result in Native format at protocol revision {revision}: {exc}", 48,
                        "NOT_IMPLEMENTED", reason="query_error")
            return
        except StoreError as exc:
            self.metrics.sql_queries.labels(outcome="error").inc()
            code = exc.code or 0
            text = str(exc).split(": ", 1)[-1]
            status = error_status(exc)
            self._error(status, text, code, "", {"Retry-After": "5"} if status == 503 else None, reason="query_error")
            return
        self.metrics.sql_queries.labels(outcome="ok").inc()
        summary["elapsed_ns"] = time.perf_counter_ns() - started
        headers = {
            "X-ClickHouse-Query-Id": query_id,
            "X-ClickHouse-Format": fmt,
            "X-ClickHouse-Timezone": ctx.get("timezone", "UTC"),
            "X-ClickHouse-Server-Display-Name": socket.gethostname(),
            "X-ClickHouse-Summary": json.dumps({k: str(v) for k, v in summary.items()}),
        }
        if params.get("enable_http_compression") == "1":
            data, enc = _compress(data, self.headers.get("Accept-Encoding", ""))
            if enc:
                headers["Content-Encoding"] = enc
        self.reply(200, data, _content_type(fmt), headers)

    def _error(self, status: int, message: str, code: int, name: str, extra_headers=None, reason: str | None = None) -> None:
        """Answer a ClickHouse-style error; a 4xx is counted in ``rejects`` (``reason`` or the error name)."""
        if 400 <= status < 500 and reason != "":
            self.metrics.rejects.labels(endpoint=self.endpoint, reason=reason or name.lower() or "client_error").inc()
        text = message if message.startswith("Code:") else f"Code: {code}. DB::Exception: {message}" + (f" ({name})" if name else "")
        headers = {"X-ClickHouse-Exception-Code": str(code), **(extra_headers or {})}
        self.reply(status, (text.rstrip() + "\n").encode("utf-8"), "text/plain; charset=UTF-8", headers)
