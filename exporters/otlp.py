"""Decoding OTLP export requests (protobuf or JSON) into RowBinary rows per table.

Metrics go through the native kernel (or its Python twin); logs, a lower-volume
signal, are encoded here. JSON bodies follow the OTLP/JSON mapping: field names
in lowerCamelCase, enums as integers, 64-bit integers as strings, and trace and
span ids as hex (protobuf's JSON mapping would read them as base64, so they are
converted first).
"""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Callable
from typing import Any

from stethoscope._extras import require
from stethoscope.errors import DecodeError
from stethoscope.native import implementation
from stethoscope.native.otlp_rowbinary import any_value_to_str, attr_map, rb_string

from .schema import LOGS_TABLE, METRIC_TABLES

__all__ = ["MetricsDecoder", "decode_logs", "json_to_protobuf", "LOG_COLUMNS", "Part"]

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
    """Turns an ``ExportMetricsServiceRequest`` into parts for the metric tables."""

    def __init__(self, impl: str = "auto") -> None:
        self._encode: Callable[[bytes], dict[str, tuple[int, bytes]]] = implementation(impl).encode_metrics
        self.implementation = implementation(impl).__name__

    def decode(self, body: bytes, *, json_body: bool = False) -> tuple[list[Part], int]:
        """Return the parts and the number of data points."""
        if json_body:
            pb = require(
                "opentelemetry.proto.collector.metrics.v1.metrics_service_pb2",
                extra="server",
                feature="OTLP decoding",
            )
            body = json_to_protobuf(body, pb.ExportMetricsServiceRequest)
        try:
            encoded = self._encode(body)
        except ValueError as exc:
            raise DecodeError(str(exc)) from exc
        parts = [(METRIC_TABLES[kind].name, rows, data) for kind, (rows, data) in encoded.items()]
        return parts, sum(p[1] for p in parts)


_pack_Q = struct.Struct("<Q").pack


def decode_logs(body: bytes, *, json_body: bool = False) -> tuple[list[Part], int]:
    """Encode an ``ExportLogsServiceRequest`` as ``otel_logs`` rows (:data:`LOG_COLUMNS`)."""
    pb = require("opentelemetry.proto.collector.logs.v1.logs_service_pb2", extra="server", feature="OTLP decoding")
    message = require("google.protobuf.message", extra="server", feature="OTLP decoding")
    if json_body:
        body = json_to_protobuf(body, pb.ExportLogsServiceRequest)
    try:
        req = pb.ExportLogsServiceRequest.FromString(body)
    except (message.DecodeError, RecursionError) as exc:
        raise DecodeError(f"invalid OTLP logs protobuf: {exc}") from exc
    chunks: list[bytes] = []
    rows = 0
    for rl in req.resource_logs:
        res_map, res = attr_map(rl.resource.attributes)
        service = res.get(b"service.name", b"")
        for sl in rl.scope_logs:
            sc = sl.scope
            scope_map, _ = attr_map(sc.attributes)
            for rec in sl.log_records:
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
                rows += 1
    if not rows:
        return [], 0
    return [(LOGS_TABLE.name, rows, b"".join(chunks))], rows


