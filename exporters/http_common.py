"""What the HTTP listeners share: a threaded server (optionally TLS), body reading,
decompression, bearer-token checks, ``/healthz`` and ``/metrics``."""

from __future__ import annotations

import json
import logging
import socket
import ssl
import threading
import zlib
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import stethoscope

from .auth import AuthFailure, TokenEntry, TokenSet, authorize, basic_password, bearer_token
from .selfmetrics import SelfMetrics

__all__ = ["Listener", "BaseHandler", "BodyError", "decompress"]

log = logging.getLogger(__name__)


#: A body at most this much over the limit is read and dropped before the 413, larger ones are not read.
_DRAIN_MAX = 16 * 1024 * 1024
#: The body of a request refused for its token is read and dropped up to this size.
_AUTH_DRAIN_MAX = 1024 * 1024


class BodyError(Exception):
    """A request body that cannot be accepted; carries the HTTP status to answer."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status, self.reason = status, reason


def _bounded(chunks: Callable[[], bytes | None], limit: int) -> bytes:
    out = bytearray()
    while (chunk := chunks()) is not None:
        out += chunk
        if len(out) > limit:
            raise BodyError(413, "too_large", f"decompressed body exceeds the limit of {limit} bytes")
    return bytes(out)


def decompress(body: bytes, encoding: str, limit: int) -> bytes:
    """Undo ``Content-Encoding`` (gzip, deflate, zstd, lz4, identity), capped at ``limit`` bytes.

    >>> import gzip
    >>> decompress(gzip.compress(b"x" * 10), "gzip", 100)
    b'xxxxxxxxxx'
    >>> decompress(gzip.compress(b"x" * 1000), "gzip", 100)
    Traceback (most recent call last):
    ...
    stethoscope.exporters.http_common.BodyError: decompressed body exceeds the limit of 100 bytes
    """
    enc = encoding.strip().lower()
    if enc in ("", "identity"):
        return body
    try:
        if enc in ("gzip", "x-gzip", "deflate"):
            d = zlib.decompressobj(wbits=31 if "gzip" in enc else 15)
            state = {"data": body}

            def step() -> bytes | None:
                if state["data"] is None:
                    return None
                out = d.decompress(state["data"], 1 << 20)
                state["data"] = d.unconsumed_tail or None
                if state["data"] is None:
                    if not d.eof:
                        raise BodyError(400, "bad_encoding", f"{enc} body is truncated")
                    return out + d.flush()
                return out

            return _bounded(step, limit)
        if enc == "zstd":
            import zstandard

            reader = zstandard.ZstdDecompressor().stream_reader(body)
            return _bounded(lambda: reader.read(1 << 20) or None, limit)
        if enc == "lz4":
            import lz4.frame

            d4 = lz4.frame.LZ4FrameDecompressor()
            out = d4.decompress(body, max_length=limit + 1)
            if len(out) > limit:
                raise BodyError(413, "too_large", f"decompressed body exceeds the limit of {limit} bytes")
            return out
    except BodyError:
        raise
    except ImportError:
        raise BodyError(415, "bad_encoding", f"Content-Encoding {enc} is not available on this server") from None
    except Exception as exc:  # each codec raises its own error type for corrupt input
        raise BodyError(400, "bad_encoding", f"body is not valid {enc}: {exc}") from exc
    raise BodyError(415, "bad_encoding", f"unsupported Content-Encoding {encoding!r}")


class Listener(ThreadingHTTPServer):
    """A threaded HTTP server running in a background thread.

    With ``tls`` (a server :class:`ssl.SSLContext`) every connection is wrapped
    in TLS on its own worker thread, so a slow or failed handshake never holds
    up the accept loop; a failed handshake is counted as a reject
    (``reason="tls_handshake"``) and the connection dropped. ``auth`` (a
    :class:`~.auth.TokenSet`, or None for an open listener) is what handlers
    check bearer tokens against.
    """

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256
    #: Seconds a client has to complete the TLS handshake.
    handshake_timeout_s = 10.0

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        *,
        tls: ssl.SSLContext | None = None,
        auth: TokenSet | None = None,
        **context,
    ) -> None:
        super().__init__(address, handler)
        self.tls = tls
        context["auth"] = auth
        self.context = context
        self._thread: threading.Thread | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.tls is not None else "http"

    def finish_request(self, request, client_address) -> None:  # runs on the worker thread
        if self.tls is not None:
            try:
                request.settimeout(self.handshake_timeout_s)
                request = self.tls.wrap_socket(request, server_side=True)
                request.settimeout(None)
            except (ssl.SSLError, OSError) as exc:
                metrics = self.context.get("metrics")
                if metrics is not None:
                    endpoint = getattr(self.RequestHandlerClass, "endpoint", "http")
                    metrics.rejects.labels(endpoint=endpoint, reason="tls_handshake").inc()
                log.info("TLS handshake with %s failed: %s", client_address[0], getattr(exc, "reason", None) or exc)
                return
        try:
            super().finish_request(request, client_address)
        finally:
            if self.tls is not None:
                try:
                    request.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                request.close()

    @property
    def port(self) -> int:
        return self.server_address[1]

    def start(self, name: str) -> None:
        self._thread = threading.Thread(target=self.serve_forever, name=name, kwargs={"poll_interval": 0.2}, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:  # shutdown() waits for serve_forever: only if it runs
            self.shutdown()
            self._thread.join(5)
        self.server_close()


class BaseHandler(BaseHTTPRequestHandler):
    """Request handler with the helpers both listeners use."""

    protocol_version = "HTTP/1.1"
    server_version = f"stethoscope/{stethoscope.__version__}"
    endpoint = "http"
    server: Listener
    #: The token the request authenticated with (set by :meth:`auth_failure`; None on an open listener).
    token: TokenEntry | None = None

    @property
    def metrics(self) -> SelfMetrics:
        return self.server.context["metrics"]

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - signature fixed by the stdlib
        log.debug("%s %s", self.address_string(), format % args)

    def reply(self, status: int, body: bytes = b"", content_type: str = "text/plain; charset=utf-8", headers=None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.metrics.requests.labels(endpoint=self.endpoint, code=str(status)).inc()

    def read_body(self, limit: int) -> bytes:
        """The raw request body, or :class:`BodyError` (411, 413, 400)."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            return self._read_chunked(limit)
        length = self.headers.get("Content-Length")
        if length is None:
            if self.command in ("GET", "HEAD"):
                return b""
            raise BodyError(411, "no_length", "Content-Length is required")
        try:
            n = int(length)
        except ValueError:
            raise BodyError(400, "bad_length", f"Content-Length is not a number: {length!r}") from None
        if n < 0:
            raise BodyError(400, "bad_length", f"Content-Length is negative: {n}")
        if n > limit:
            self.close_connection = True
            if n - limit <= _DRAIN_MAX:  # read and drop it, so the client sees the 413 instead of a reset
                self._discard(n)
            raise BodyError(413, "too_large", f"body of {n} bytes exceeds the limit of {limit} bytes")
        data = self.rfile.read(n)
        if len(data) != n:
            self.close_connection = True
            raise BodyError(400, "truncated", f"body ended after {len(data)} of {n} bytes")
        return data

    def _discard(self, n: int) -> None:
        while n > 0 and (chunk := self.rfile.read(min(n, 1 << 16))):
            n -= len(chunk)

    def _read_chunked(self, limit: int) -> bytes:
        out = bytearray()
        while True:
            line = self.rfile.readline(65537)
            try:
                size = int(line.split(b";")[0].strip(), 16)
            except ValueError:
                self.close_connection = True
                raise BodyError(400, "bad_chunk", "malformed chunked encoding") from None
            if size == 0:
                while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                    pass
                return bytes(out)
            if len(out) + size > limit:
                self.close_connection = True
                raise BodyError(413, "too_large", f"body exceeds the limit of {limit} bytes")
            out += self.rfile.read(size)
            self.rfile.readline(3)

    def auth_failure(self, permission: str | tuple[str, ...], *, basic: bool = False) -> AuthFailure | None:
        """None when the request's token grants ``permission`` (or the listener is open).

        Otherwise the refusal is counted (``rejects``, reason ``unauthenticated``,
        ``invalid_token`` or ``forbidden``) and logged without the token, the
        connection is marked to close (a body of up to 1 MiB is read and
        dropped first, so the client sees the answer, a larger one is not read), and the
        :class:`~.auth.AuthFailure` is returned for the handler to answer in its
        own format. ``basic`` also takes the token as the password of HTTP Basic
        auth or as ``X-ClickHouse-Key``, as ClickHouse clients send it.
        """
        tokens = self.server.context.get("auth")
        if tokens is None:
            return None
        header = self.headers.get("Authorization")
        presented = bearer_token(header)
        if presented is None and basic:
            presented = basic_password(header) or self.headers.get("X-ClickHouse-Key") or None
        self.token, failure = authorize(tokens, presented, permission)
        if failure is not None:
            self.close_connection = True
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = 0
            if 0 < length <= _AUTH_DRAIN_MAX:
                self._discard(length)
            self.metrics.rejects.labels(endpoint=self.endpoint, reason=failure.reason).inc()
            log.info("%s %s from %s refused: %s", self.command, self.path.split("?", 1)[0], self.address_string(), failure.reason)
        return failure

    def serve_common(self) -> bool:
        """Answer ``/healthz`` and ``/metrics``; return whether the path was one of them.

        ``/healthz`` is always open (load balancers probe it); ``/metrics`` needs
        the ``read`` permission when tokens are configured.
        """
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            failure = self.auth_failure("read", basic=True)
            if failure is not None:
                self.reply(failure.status, (failure.message + "\n").encode(), headers=failure.headers)
                return True
            body, ctype = self.metrics.exposition()
            self.reply(200, body, ctype)
            return True
        if path == "/healthz":
            store = self.server.context.get("store")
            ok = store is None or store.ping()
            doc = {"status": "ok" if ok else "degraded", "store": "ok" if ok else "unreachable", "version": stethoscope.__version__}
            self.reply(200 if ok else 503, json.dumps(doc).encode() + b"\n", "application/json")
            return True
        return False


