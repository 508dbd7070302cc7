"""The OTLP/HTTP receiver: ``POST /v1/metrics`` and ``POST /v1/logs``, and ``/v1/sampling``.

Bodies are protobuf (``application/x-protobuf``) or JSON (``application/json``),
optionally gzip-compressed. A request is answered 200 only once its rows are
stored. Errors follow the OTLP/HTTP specification: 400 for a malformed body with
a ``google.rpc.Status`` explaining why, 413 for a body over the limit, 415 for a
content type or encoding we do not take, and 503 with ``Retry-After`` when the
store is slow or down, so exporters retry instead of dropping data.

Sampled model rows and labels arrive on ``/v1/logs`` (see :mod:`.samples`). A
sample or label record that breaks the contract is dropped, the rest of the
request is stored, and the answer is 200 with OTLP partial success
(``partial_success.rejected_log_records`` and an ``error_message`` naming the
reasons), in protobuf or JSON like the request.

The same port serves the sampling configuration the SDKs poll
(:mod:`.sampling_config`): ``GET /v1/sampling``, ``PUT`` and ``DELETE
/v1/sampling/<model>/<stream>``.

With tokens configured (:mod:`.auth`), every route but ``/healthz`` needs a
bearer token: ``ingest`` to post data, ``ingest`` or ``read`` to read the
sampling document, ``sampling_admin`` to change it, ``read`` for ``/metrics``.
A missing or unknown token is answered 401 with ``WWW-Authenticate: Bearer``,
a token without the permission 403, both in the request's format.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from urllib.parse import parse_qs, unquote

from google.protobuf.message import DecodeError as ProtobufDecodeError
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)

from stethoscope.errors import DecodeError, StoreError

from .http_common import BaseHandler, BodyError, decompress
from .ingest import Saturated
from .journal import Journal
from .otlp import DecodedLogs, decode_logs
from .sampling_config import SamplingConfig, etag_matches
from .selfmetrics import SelfMetrics

__all__ = ["OtlpHandler", "encode_status", "encode_logs_response", "RejectedRecords"]

log = logging.getLogger(__name__)

_PROTOBUF = "application/x-protobuf"
_JSON = "application/json"


def idempotency_key(value: str, token, signal: str) -> bytes:
    """The ingest key of a request's ``Idempotency-Key``: scoped by signal and by the
    token that sent it, so one tenant's keys can never suppress another's data.

    >>> idempotency_key("spool-1:4-9", None, "metrics")
    b'metrics\\x00spool-1:4-9'
    """
    scope = signal if token is None else f"{signal}/{token.name}"
    return Journal.key(value, scope)


def encode_status(code: int, message: str) -> bytes:
    r"""A ``google.rpc.Status`` (code, message), serialised as protobuf.

    >>> encode_status(3, "bad")
    b'\x08\x03\x12\x03bad'
    """
    from google.rpc.status_pb2 import Status

    return Status(code=code, message=message).SerializeToString()


def encode_logs_response(rejected: int, message: str, *, as_json: bool) -> bytes:
    """An ``ExportLogsServiceResponse``; with ``partial_success`` set when records were rejected.

    >>> encode_logs_response(0, "", as_json=True), encode_logs_response(0, "", as_json=False)
    (b'{}', b'')
    >>> encode_logs_response(2, "bad_features: 2", as_json=True)
    b'{"partialSuccess": {"rejectedLogRecords": "2", "errorMessage": "bad_features: 2"}}'
    """
    if not rejected:
        return b"{}" if as_json else b""
    from google.protobuf import json_format
    from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceResponse

    resp = ExportLogsServiceResponse()
    resp.partial_success.rejected_log_records = rejected
    resp.partial_success.error_message = message
    if as_json:
        return json.dumps(json_format.MessageToDict(resp)).encode()
    return resp.SerializeToString()


class RejectedRecords:
    """Sample and label records dropped since start, by reason (thread-safe).

    Each reason is logged the first time it is seen, then only counted.
    """

    def __init__(self, metrics: SelfMetrics | None = None) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        self._metrics = metrics

    def add(self, decoded: DecodedLogs) -> None:
        with self._lock:
            for reason, n in decoded.rejected.items():
                if self._metrics is not None:
                    self._metrics.samples_rejected.labels(reason=reason).inc(n)
                first = reason not in self._counts
                self._counts[reason] = self._counts.get(reason, 0) + n
                if first:
                    log.warning("dropping sample/label records (%s), first seen: %s", reason, decoded.rejected_message)

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


class _Throttle:
    """Lets one log line per key through every ``interval_s``; counts the ones held back."""

    def __init__(self, interval_s: float = 10.0, clock=time.monotonic) -> None:
        self._interval, self._clock = interval_s, clock
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def due(self, key: str) -> int | None:
        """None to stay quiet, else how many were held back since the last one let through."""
        with self._lock:
            now = self._clock()
            if now - self._last.get(key, float("-inf")) < self._interval:
                self._held[key] = self._held.get(key, 0) + 1
                return None
            self._last[key] = now
            return self._held.pop(key, 0)


_WARNINGS = _Throttle()


class _SkewCheck:
    """Samples accepted protobuf metrics requests, at most one every ``every_s``, for clock skew.

    A request is parsed a second time only when sampled (parsing costs about as
    much as decoding), so the cost stays bounded under load and the counter is
    a lower bound. Per resource, the first data point's ``time_unix_nano`` is
    compared with the collector's clock; beyond ``tolerance_s`` the resource's
    points are counted as ``future`` or ``past``. The data is stored as sent.
    """

    def __init__(self, tolerance_s: float = 300.0, every_s: float = 1.0, clock=time.monotonic) -> None:
        self.tolerance_ns, self.every_s, self._clock = int(tolerance_s * 1e9), every_s, clock
        self._next = float("-inf")
        self._lock = threading.Lock()

    def __call__(self, body: bytes, metrics: SelfMetrics) -> None:
        with self._lock:
            now = self._clock()
            if now < self._next:
                return
            self._next = now + self.every_s
        try:
            request = ExportMetricsServiceRequest.FromString(body)
        except ProtobufDecodeError:  # already decoded and stored: a second opinion is not worth an error
            return
        wall = time.time_ns()
        for rm in request.resource_metrics:
            first, points = None, 0
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    kind = m.WhichOneof("data")
                    pts = getattr(m, kind).data_points if kind else ()
                    if first is None and pts:
                        first = pts[0].time_unix_nano
                    points += len(pts)
            if first and abs(first - wall) > self.tolerance_ns:
                direction = "future" if first > wall else "past"
                metrics.clock_skew_points.labels(direction=direction).inc(points)
                if _WARNINGS.due(f"skew:{direction}") is not None:
                    service = next((kv.value.string_value for kv in rm.resource.attributes if kv.key == "service.name"), "")
                    log.warning("points from %r are stamped %.0f s in the %s of this collector's clock; stored as sent",
                                service, abs(first - wall) / 1e9, direction)


_SKEW = _SkewCheck()

# gRPC status codes used in google.rpc.Status
_INVALID_ARGUMENT, _PERMISSION_DENIED, _RESOURCE_EXHAUSTED, _UNAVAILABLE, _UNAUTHENTICATED = 3, 7, 8, 14, 16
_SAMPLING = "/v1/sampling"
_SAMPLING_BODY_LIMIT = 64 * 1024


class OtlpHandler(BaseHandler):
    endpoint = "otlp"

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] == _SAMPLING:
            failure = self.auth_failure(("ingest", "read"))
            if failure is not None:
                self._json(failure.status, {"error": failure.message}, failure.headers)
                return
            self._sampling_get()
        elif not self.serve_common():
            self.reply(404, b"not found: OTLP takes POST /v1/metrics and POST /v1/logs\n")

    def do_PUT(self) -> None:
        self._sampling_write()

    def do_DELETE(self) -> None:
        self._sampling_write()

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        signal = {"/v1/metrics": "metrics", "/v1/logs": "logs"}.get(path)
        ctype = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        as_json = ctype == _JSON
        failure = self.auth_failure("ingest")
        if failure is not None:
            self._answer_refusal(failure.status, failure.message, as_json, failure.headers)
            return
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
            decoded = None
            if signal == "metrics":
                parts, points = ctx["metrics_decoder"].decode(body, json_body=as_json)
            else:
                decoded = decode_logs(body, json_body=as_json)
                parts = decoded.parts
        except BodyError as exc:
            self._refuse(exc.status, exc.reason, str(exc), as_json)
            return
        except DecodeError as exc:
            self._refuse(400, "malformed", str(exc), as_json)
            return
        ingestor = ctx["ingestor"]
        key = self.headers.get("Idempotency-Key", "").strip()
        try:
            ticket = ingestor.submit(parts, idempotency_key(key, self.token, signal) if key else None)
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
        if ticket.duplicate:  # stored before: answer as the first time, count nothing twice
            if decoded is None:
                self.reply(200, b"{}" if as_json else b"", _JSON if as_json else _PROTOBUF)
            else:
                self.reply(200, encode_logs_response(0, "", as_json=as_json), _JSON if as_json else _PROTOBUF)
            return
        if decoded is None:
            self.metrics.points_received.labels(signal=signal).inc(points)
            self.reply(200, b"{}" if as_json else b"", _JSON if as_json else _PROTOBUF)
            if not as_json:  # after the answer: the client does not wait for it
                _SKEW(body, self.metrics)
            return
        for kind, n in (("logs", decoded.logs), ("samples", decoded.samples), ("labels", decoded.labels)):
            if n:
                self.metrics.points_received.labels(signal=kind).inc(n)
        rejected = decoded.rejected_total
        if rejected:
            tally = ctx.get("rejected_records")
            if tally is not None:
                tally.add(decoded)
            message = f"{rejected} sample/label records rejected: {decoded.rejected_message}"
        else:
            message = ""
        body = encode_logs_response(rejected, message, as_json=as_json)
        self.reply(200, body, _JSON if as_json else _PROTOBUF)

    # --- sampling configuration -------------------------------------------------

    def _sampling(self) -> SamplingConfig | None:
        cfg = self.server.context.get("sampling")
        if cfg is None:
            self._json(404, {"error": "sampling configuration is not served by this collector"})
        return cfg

    def _json(self, status: int, doc: dict, headers=None) -> None:
        self.reply(status, json.dumps(doc).encode() + b"\n", _JSON, headers)

    def _sampling_get(self) -> None:
        cfg = self._sampling()
        if cfg is None:
            return
        query = parse_qs(self.path.partition("?")[2])
        service = query.get("service", [""])[0]
        body, etag = cfg.document(service)
        headers = {"ETag": etag, "Cache-Control": "no-cache"}
        if etag_matches(self.headers.get("If-None-Match"), etag):
            self.reply(304, b"", _JSON, headers)
        else:
            self.reply(200, body, _JSON, headers)

    def _sampling_write(self) -> None:
        failure = self.auth_failure("sampling_admin")
        if failure is not None:
            self._json(failure.status, {"error": failure.message}, failure.headers)
            return
        no_body = "Content-Length" not in self.headers and "Transfer-Encoding" not in self.headers
        try:  # read first, so a refused request leaves the connection clean
            body = b"" if self.command == "DELETE" and no_body else self.read_body(_SAMPLING_BODY_LIMIT)
        except BodyError as exc:
            self._json(exc.status, {"error": str(exc)})
            return
        path = self.path.split("?", 1)[0]
        if not path.startswith(_SAMPLING + "/"):
            if path == _SAMPLING:
                self._json(405, {"error": f"{self.command} takes {_SAMPLING}/<model>/<stream>"}, {"Allow": "GET"})
            else:
                self._json(404, {"error": f"no {self.command} route at {path}"})
            return
        cfg = self._sampling()
        if cfg is None:
            return
        model_raw, slash, stream_raw = path[len(_SAMPLING) + 1 :].rpartition("/")
        try:
            if not slash:
                raise DecodeError(f"path: must be {_SAMPLING}/<model>/<stream>")
            model, stream = unquote(model_raw, errors="strict"), unquote(stream_raw, errors="strict")
            if self.command == "DELETE":
                if cfg.delete(model, stream):
                    self.reply(204, b"", _JSON)
                else:
                    self._json(404, {"error": f"no active sampling override for {model}/{stream}"})
                return
            override = cfg.put(model, stream, body)
        except UnicodeDecodeError:
            self._json(400, {"error": "invalid sampling override: path: model and stream must be UTF-8 once percent-decoded"})
        except DecodeError as exc:
            self._json(400, {"error": f"invalid sampling override: {exc}"})
        except StoreError as exc:
            log.warning("could not store a sampling override at %s: %s", path, exc)
            self._json(503, {"error": f"could not store the override, retry later: {exc}"}, {"Retry-After": "5"})
        else:
            self._json(200, {"stream": override.stream, "version": override.version, **override.as_json()})

    def _refuse(self, status: int, reason: str, message: str, as_json: bool, retry_after: int | None = None) -> None:
        self.metrics.rejects.labels(endpoint=self.endpoint, reason=reason).inc()
        if status >= 500:
            suppressed = _WARNINGS.due(reason)
            if suppressed is not None:  # at most one warning per reason every 10 s: 503s come in floods
                more = f" ({suppressed} more since the last warning)" if suppressed else ""
                log.warning("OTLP request refused (%d %s): %s%s", status, reason, message, more)
        else:
            log.info("OTLP request refused (%d %s): %s", status, reason, message)
        headers = {"Retry-After": str(retry_after)} if retry_after else None
        self._answer_refusal(status, message, as_json, headers)

    def _answer_refusal(self, status: int, message: str, as_json: bool, headers=None) -> None:
        code = {401: _UNAUTHENTICATED, 403: _PERMISSION_DENIED, 429: _RESOURCE_EXHAUSTED}.get(
            status, _UNAVAILABLE if status >= 500 else _INVALID_ARGUMENT
        )
        if as_json:
            body = json.dumps({"code": code, "message": message}).encode()
            self.reply(status, body, _JSON, headers)
        else:
            self.reply(status, encode_status(code, message), _PROTOBUF, headers)
