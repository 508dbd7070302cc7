"""The OTLP/HTTP receiver: ``POST /v1/metrics`` and ``POST /v1/logs``.

Bodies are protobuf (``application/x-protobuf``) or JSON (``application/json``),
optionally gzip-compressed. A request is answered 200 only once its rows are
stored. Errors follow the OTLP/HTTP specification: 400 for a malformed body with
a ``google.rpc.Status`` explaining why, 413 for a body over the limit, 415 for a
content type or encoding we do not take, and 503 with ``Retry-After`` when the
store is slow or down, so exporters retry instead of dropping data.
"""

from __future__ import annotations

import json
import logging

from stethoscope.errors import DecodeError, StoreError

from .http_common import BaseHandler, BodyError, decompress
from .ingest import Saturated
from .otlp import decode_logs

__all__ = ["OtlpHandler", "encode_status"]

log = logging.getLogger(__name__)

_PROTOBUF = "application/x-protobuf"
_JSON = "application/json"


def encode_status(code: int, message: str) -> bytes:
    r"""A ``google.rpc.Status`` (code, message), serialised as protobuf.

    >>> encode_status(3, "bad")
    b'\x08\x03\x12\x03bad'
    """
    from google.rpc.status_pb2 import Status

    return Status(code=code, message=message).SerializeToString()


# gRPC status codes used in google.rpc.Status
_INVALID_ARGUMENT, _RESOURCE_EXHAUSTED, _UNAVAILABLE = 3, 8, 14


class OtlpHandler(BaseHandler):
    endpoint = "otlp"

    def do_GET(self) -> None:
        if not self.serve_common():
            self.reply(404, b"not found: OTLP takes POST /v1/metrics and POST /v1/logs\n")

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        signal = {"/v1/metrics": "metrics", "/v1/logs": "logs"}.get(path)
        ctype = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        as_json = ctype == _JSON
        if signal is None:
            self._refuse(404, "unknown_path", f"no OTLP receiver at {path}: use /v1/metrics or /v1/logs", as_json)
            return
        if ctype not in (_PROTOBUF, _JSON):
            self._refuse(415, "content_type", f"Content-Type must be {_PROTOBUF} or {_JSON}, got {ctype or 'none'!r}", as_json)
            return
        ctx = self.server.context
        limit = ctx["max_body_bytes"]
        try:
            raw = self.read_body(limit)
            body = decompress(raw, self.headers.get("Content-Encoding", ""), limit)
            if signal == "metrics":
                parts, points = ctx["metrics_decoder"].decode(body, json_body=as_json)
            else:
                parts, points = decode_logs(body, json_body=as_json)
        except BodyError as exc:
            self._refuse(exc.status, exc.reason, str(exc), as_json)
            return
        except DecodeError as exc:
            self._refuse(400, "malformed", str(exc), as_json)
            return
        ingestor = ctx["ingestor"]
        try:
            ticket = ingestor.submit(parts)
        except Saturated as exc:
            self._refuse(503, "saturated", f"collector busy, retry later: {exc}", as_json, retry_after=1)
            return
        try:
            stored = ticket.wait(ctx["request_timeout_s"])
        except StoreError as exc:
            self._refuse(503, "store_error", f"could not store the data, retry later: {exc}", as_json, retry_after=5)
            return
        if not stored:
            if ingestor.cancel(ticket):
                self._refuse(503, "timeout", "the store is slow; request withdrawn, retry later", as_json, retry_after=5)
                return
            try:  # already being inserted: the outcome is only seconds away
                ticket.wait(None)
            except StoreError as exc:
                self._refuse(503, "store_error", f"could not store the data, retry later: {exc}", as_json, retry_after=5)
                return
        self.metrics.points_received.labels(signal=signal).inc(points)
        if as_json:
            self.reply(200, b"{}", _JSON)
        else:
            self.reply(200, b"", _PROTOBUF)

    def _refuse(self, status: int, reason: str, message: str, as_json: bool, retry_after: int | None = None) -> None:
        self.metrics.rejects.labels(endpoint=self.endpoint, reason=reason).inc()
        if status >= 500:
            log.warning("OTLP request refused (%d %s): %s", status, reason, message)
        else:
            log.info("OTLP request refused (%d %s): %s", status, reason, message)
        code = _UNAVAILABLE if status >= 500 else _RESOURCE_EXHAUSTED if status == 429 else _INVALID_ARGUMENT
        headers = {"Retry-After": str(retry_after)} if retry_after else None
        if as_json:
            body = json.dumps({"code": code, "message": message}).encode()
            self.reply(status, body, _JSON, headers)
        else:
            self.reply(status, encode_status(code, message), _PROTOBUF, headers)
