"""What the HTTP listeners share: a threaded server, body reading, decompression,
``/healthz`` and ``/metrics``."""

from __future__ import annotations

import gzip  # used by the doctest of decompress()
import json
import logging
import threading
import zlib
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import stethoscope

from .selfmetrics import SelfMetrics

__all__ = ["Listener", "BaseHandler", "BodyError", "decompress"]

log = logging.getLogger(__name__)


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
    """A threaded HTTP server running in a background thread."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], **context) -> None:
        super().__init__(address, handler)
        self.context = context
        self._thread: threading.Thread | None = None

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
            self.close_connection = True  # do not read a body we refuse
            raise BodyError(413, "too_large", f"body of {n} bytes exceeds the limit of {limit} bytes")
        data = self.rfile.read(n)
        if len(data) != n:
            self.close_connection = True
            raise BodyError(400, "truncated", f"body ended after {len(data)} of {n} bytes")
        return data

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

    def serve_common(self) -> bool:
        """Answer ``/healthz`` and ``/metrics``; return whether the path was one of them."""
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
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


