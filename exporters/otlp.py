"""Decoding OTLP export requests (protobuf or JSON) into RowBinary rows per table.

Metrics go through the native kernel (or its Python twin); logs, a lower-volume
signal, are encoded here, and log records that carry sampled model rows or
labels (:mod:`.samples`) are routed to the ``samples`` and ``labels`` tables
instead of ``otel_logs``. JSON bodies follow the OTLP/JSON mapping: field names
in lowerCamelCase, enums as integers, 64-bit integers as strings, and trace and
span ids as hex (protobuf's JSON mapping would read them as base64, so they are
converted first).
"""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from stethoscope._extras import require
from stethoscope.errors import ConfigError, DecodeError
from stethoscope.native import implementation
from stethoscope.native.otlp_rowbinary import any_value_to_str, attr_map, rb_string

from .cardinality import CardinalityLimiter
from .samples import LABEL_EVENT, SAMPLE_EVENT, Rejections, encode_label, encode_sample, event_of
from .schema import LABELS_TABLE, LOGS_TABLE, METRIC_TABLES, SAMPLES_TABLE

__all__ = ["MetricsDecoder", "decode_logs", "DecodedLogs", "json_to_protobuf", "LOG_COLUMNS", "Part"]

Part = tuple[str, int, bytes]  # (table, rows, RowBinary)

#: otel_logs columns we insert; TimestampTime is filled by its DEFAULT.
LOG_COLUMNS = tuple(c for c in LOGS_TABLE.column_names if c != "TimestampTime")

_ID_KEYS = frozenset({"traceId", "spanId", "trace_id", "span_id"})


def _hex_ids_to_base64(node: Any, path: str = "$") -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in _ID_KEYS and isinstance(value, str):
                try:
                    node[key] = base64.b64encode(bytes.fromhex(value)).decode("ascii")
                except ValueError:
                    raise DecodeError(f"{path}.{key}: ids must be hex strings, got {value[:40]!r}") from None
            else:
                _hex_ids_to_base64(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, item in enumerate(node):
            _hex_ids_to_base64(item, f"{path}[{i}]")


def json_to_protobuf(body: bytes, message_type: type) -> bytes:
    """Parse an OTLP/JSON body into ``message_type`` and return its protobuf bytes."""
    json_format = require("google.protobuf.json_format", extra="server", feature="OTLP/JSON decoding")
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DecodeError(f"body is not valid JSON: {exc}") from exc
    except RecursionError:
        raise DecodeError("body is not valid JSON: nested too deeply") from None
    if not isinstance(doc, dict):
        raise DecodeError(f"body must be a JSON object, got {type(doc).__name__}")
    _hex_ids_to_base64(doc)
    try:
        msg = json_format.ParseDict(doc, message_type(), ignore_unknown_fields=True)
    except json_format.ParseError as exc:
        raise DecodeError(f"body is not a valid {message_type.__name__}: {exc}") from exc
    except RecursionError:
        raise DecodeError("body is nested too deeply") from None
    return msg.SerializeToString()


class MetricsDecoder:
    """Turns an ``ExportMetricsServiceRequest`` into parts for the metric tables.

    With a ``limiter`` (:class:`~.cardinality.CardinalityLimiter`), attribute sets
    beyond the per-metric cardinality limit get the overflow set, inside the
    encoder's single pass.
    """

    def __init__(self, impl: str = "auto", *, limiter: CardinalityLimiter | None = None) -> None:
        self._module = implementation(impl)
        self._encode: Callable[[bytes], dict[str, tuple[int, bytes]]] = self._module.encode_metrics
        self.implementation = self._module.__name__
        if limiter is not None and not hasattr(self._module, "CardinalityState"):
            raise ConfigError(
                f"collector.cardinality_limit: {self.implementation} predates the cardinality limit "
                "(a stale build of the C kernel): rebuild it with `pip install -e .`, or set the limit to 0"
            )
        self.limiter = limiter

    def decode(self, body: bytes, *, json_body: bool = False) -> tuple[list[Part], int]:
        """Return the parts and the number of data points."""
        if json_body:
            pb = require(
                "opentelemetry.proto.collector.metrics.v1.metrics_service_pb2",
                extra="server",
                feature="OTLP decoding",
            )
            body = json_to_protobuf(body, pb.ExportMetricsServiceRequest)
        if self.limiter is not None:
            encoded = self.limiter.encode(body, self._module)
        else:
            try:
                encoded = self._encode(body)
            except ValueError as exc:
                raise DecodeError(str(exc)) from exc
        parts = [(METRIC_TABLES[kind].name, rows, data) for kind, (rows, data) in encoded.items()]
        return parts, sum(p[1] for p in parts)


_pack_Q = struct.Struct("<Q").pack


@dataclass(frozen=True)
class DecodedLogs:
    """What one ``ExportLogsServiceRequest`` became.

    ``parts`` go to the ingestor (``otel_logs``, ``samples``, ``labels``; a table
    without rows has no part). ``logs``, ``samples`` and ``labels`` count the rows
    of each; ``rejected`` counts dropped sample and label records by reason
    (:data:`~.samples.REJECT_REASONS`), and ``rejected_message`` says why, for
    the OTLP partial-success answer.
    """

    parts: list[Part] = field(default_factory=list)
    logs: int = 0
    samples: int = 0
    labels: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    rejected_message: str = ""

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())


def decode_logs(body: bytes, *, json_body: bool = False) -> DecodedLogs:
    """Route each record of an ``ExportLogsServiceRequest`` to its table.

    Records named ``stethoscope.sample`` or ``stethoscope.label`` (by
    ``event_name``, or the ``event.name`` attribute) become ``samples`` or
    ``labels`` rows, or are rejected and counted; every other record becomes an
    ``otel_logs`` row (:data:`LOG_COLUMNS`), exactly as before those existed.
    """
    pb = require("opentelemetry.proto.collector.logs.v1.logs_service_pb2", extra="server", feature="OTLP decoding")
    message = require("google.protobuf.message", extra="server", feature="OTLP decoding")
    if json_body:
        body = json_to_protobuf(body, pb.ExportLogsServiceRequest)
    try:
        req = pb.ExportLogsServiceRequest.FromString(body)
    except (message.DecodeError, RecursionError) as exc:
        raise DecodeError(f"invalid OTLP logs protobuf: {exc}") from exc
    chunks: list[bytes] = []
    samples: list[bytes] = []
    labels: list[bytes] = []
    rejections = Rejections()
    for rl in req.resource_logs:
        res_map, res = attr_map(rl.resource.attributes)
        service = res.get(b"service.name", b"")
        for sl in rl.scope_logs:
            sc = sl.scope
            scope_map = None  # encoded on the first ordinary log record of the scope
            for rec in sl.log_records:
                event = event_of(rec)
                if event == SAMPLE_EVENT:
                    row = encode_sample(rec, service, res_map, rejections)
                    if row is not None:
                        samples.append(row)
                    continue
                if event == LABEL_EVENT:
                    row = encode_label(rec, service, res_map, rejections)
                    if row is not None:
                        labels.append(row)
                    continue
                if scope_map is None:
                    scope_map, _ = attr_map(sc.attributes)
                ts = rec.time_unix_nano or rec.observed_time_unix_nano
                log_map, _ = attr_map(rec.attributes)
                chunks.append(
                    _pack_Q(ts)
                    + rb_string(rec.trace_id.hex().encode("ascii"))
                    + rb_string(rec.span_id.hex().encode("ascii"))
                    + bytes([rec.flags & 0xFF])
                    + rb_string(rec.severity_text.encode("utf-8"))
                    + bytes([max(0, min(255, rec.severity_number))])
                    + rb_string(service)
                    + rb_string(any_value_to_str(rec.body).encode("utf-8"))
                    + rb_string(rl.schema_url.encode("utf-8"))
                    + res_map
                    + rb_string(sl.schema_url.encode("utf-8"))
                    + rb_string(sc.name.encode("utf-8"))
                    + rb_string(sc.version.encode("utf-8"))
                    + scope_map
                    + log_map
                    + rb_string(getattr(rec, "event_name", "").encode("utf-8"))
                )
    parts: list[Part] = []
    for table, rows in ((LOGS_TABLE.name, chunks), (SAMPLES_TABLE.name, samples), (LABELS_TABLE.name, labels)):
        if rows:
            parts.append((table, len(rows), b"".join(rows)))
    return DecodedLogs(
        parts=parts,
        logs=len(chunks),
        samples=len(samples),
        labels=len(labels),
        rejected=dict(rejections.counts),
        rejected_message=rejections.summary(),
    )
