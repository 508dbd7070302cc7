"""Pure-Python twin of ``otlp_rowbinary.c``: OTLP metrics protobuf to ClickHouse RowBinary.

:func:`encode_metrics` takes the bytes of an ``ExportMetricsServiceRequest`` and
returns, per metric kind present, the number of rows and their RowBinary
encoding, in the column order of :data:`stethoscope.exporters.schema.METRIC_TABLES`.
The C kernel produces byte-identical output; the test suite checks that on
generated requests and runs against both.

Encoding rules, shared with the C kernel (they follow the OpenTelemetry
Collector's ClickHouse exporter where it has one):

* Attribute maps are sorted by key (bytewise); a repeated key keeps its first value.
* Attribute values become strings: strings as is, booleans ``true``/``false``,
  integers in decimal, doubles in the shortest ``%.{p}g`` form that reads back
  exactly (``NaN``, ``+Inf``, ``-Inf`` for the specials), bytes in base64,
  arrays and key-value lists as compact JSON, an empty value as ``""``.
* ``ServiceName`` is the resource's ``service.name`` attribute, or ``""``.
* A number point's value is ``as_double``, else ``as_int`` as a double, else 0.
  Absent optional ``sum``/``min``/``max`` are written as 0.
* Trace and span ids are lowercase hex (empty when absent).

With a :class:`CardinalityState` (the C module has one of its own), points of a
metric name past its limit get the map ``{otel.metric.overflow: "true"}``
instead of their attributes; :mod:`stethoscope.exporters.cardinality` has the
rules. Attribute sets are told apart by :func:`attrs_hash` of their encoded map,
so two spellings of one set (key order, repeated keys) are one set.
"""

from __future__ import annotations

import base64
import math
import struct
import threading

__all__ = ["encode_metrics", "any_value_to_str", "attr_map", "rb_string", "varint", "attrs_hash", "CardinalityState"]

_pack_q = struct.Struct("<q").pack
_pack_Q = struct.Struct("<Q").pack
_pack_d = struct.Struct("<d").pack
_pack_I = struct.Struct("<I").pack
_pack_i = struct.Struct("<i").pack


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _str(b: bytes) -> bytes:
    return _varint(len(b)) + b


def varint(n: int) -> bytes:
    """LEB128, as RowBinary writes lengths and counts.

    >>> varint(5), varint(300)
    (b'\\x05', b'\\xac\\x02')
    """
    return _varint(n)


def _double_str(v: float) -> str:
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    for p in range(1, 18):
        s = "%.*g" % (p, v)
        if float(s) == v:
            return s
    return "%.17g" % v


_JSON_ESC = {0x22: '\\"', 0x5C: "\\\\", 0x0A: "\\n", 0x0D: "\\r", 0x09: "\\t", 0x08: "\\b", 0x0C: "\\f"}


def _json_str(s: str) -> str:
    out = ['"']
    for ch in s:
        o = ord(ch)
        esc = _JSON_ESC.get(o)
        if esc is not None:
            out.append(esc)
        elif o < 0x20:
            out.append("\\u%04x" % o)
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _json_value(v) -> str:  # v: opentelemetry AnyValue
    kind = v.WhichOneof("value")
    if kind == "string_value":
        return _json_str(v.string_value)
    if kind == "bool_value":
        return "true" if v.bool_value else "false"
    if kind == "int_value":
        return str(v.int_value)
    if kind == "double_value":
        d = v.double_value
        s = _double_str(d)
        return _json_str(s) if (math.isnan(d) or math.isinf(d)) else s
    if kind == "bytes_value":
        return _json_str(base64.b64encode(v.bytes_value).decode("ascii"))
    if kind == "array_value":
        return "[" + ",".join(_json_value(x) for x in v.array_value.values) + "]"
    if kind == "kvlist_value":
        return "{" + ",".join(
            _json_str(kv.key) + ":" + _json_value(kv.value) for kv in v.kvlist_value.values
        ) + "}"
    return "null"


def any_value_to_str(v) -> str:
    """Render an OTLP ``AnyValue`` as the string stored in an attribute map."""
    kind = v.WhichOneof("value")
    if kind == "string_value":
        return v.string_value
    if kind is None:
        return ""
    if kind in ("array_value", "kvlist_value"):
        return _json_value(v)
    if kind == "bytes_value":
        return base64.b64encode(v.bytes_value).decode("ascii")
    if kind == "double_value":
        return _double_str(v.double_value)
    return _json_value(v)


def _attr_items(kvs) -> list[tuple[bytes, bytes]]:
    seen: dict[bytes, bytes] = {}
    for kv in kvs:
        k = kv.key.encode("utf-8")
        if k not in seen:
            seen[k] = any_value_to_str(kv.value).encode("utf-8")
    return sorted(seen.items())


def _map(items: list[tuple[bytes, bytes]]) -> bytes:
    return _varint(len(items)) + b"".join(_str(k) + _str(v) for k, v in items)


def _attrs(kvs) -> bytes:
    return _map(_attr_items(kvs))


def attr_map(kvs) -> tuple[bytes, dict[bytes, bytes]]:
    """A repeated ``KeyValue`` as a RowBinary map, and the map itself."""
    items = _attr_items(kvs)
    return _map(items), dict(items)


def rb_string(b: bytes) -> bytes:
    """A RowBinary ``String``: LEB128 length, then the bytes."""
    return _str(b)


def _exemplars(exs) -> bytes:
    n = _varint(len(exs))
    fa, ts, val, span, trace = [n], [n], [n], [n], [n]
    for e in exs:
        fa.append(_attrs(e.filtered_attributes))
        ts.append(_pack_Q(e.time_unix_nano))
        kind = e.WhichOneof("value")
        val.append(_pack_d(e.as_double if kind == "as_double" else float(e.as_int) if kind else 0.0))
        span.append(_str(e.span_id.hex().encode("ascii")))
        trace.append(_str(e.trace_id.hex().encode("ascii")))
    return b"".join(fa) + b"".join(ts) + b"".join(val) + b"".join(span) + b"".join(trace)


def _number_value(dp) -> float:
    kind = dp.WhichOneof("value")
    if kind == "as_double":
        return dp.as_double
    if kind == "as_int":
        return float(dp.as_int)
    return 0.0


def _opt(dp, field: str) -> float:
    return getattr(dp, field) if dp.HasField(field) else 0.0


def _u64_array(values) -> bytes:
    return _varint(len(values)) + b"".join(_pack_Q(x) for x in values)


def _f64_array(values) -> bytes:
    return _varint(len(values)) + b"".join(_pack_d(x) for x in values)


_M64 = (1 << 64) - 1
_iter_QQ = struct.Struct("<QQ").iter_unpack


def _mum(a: int, b: int) -> int:
    p = a * b
    return (p ^ (p >> 64)) & _M64


def attrs_hash(data: bytes, seed: int) -> int:
    """The seeded 64-bit hash the cardinality limit keys attribute maps (and names) by; never 0.

    Block ``k`` of 16 bytes goes into lane ``k % 2``; each block is folded in
    with a 64x64->128-bit multiply whose halves are xor-ed. A partial last
    block is the last 16 bytes of the data (overlapping the one before), or
    the data zero-padded when it is shorter than 16 bytes. The length goes in
    first and last.

    >>> attrs_hash(b"\\x00", 7) == attrs_hash(b"\\x00", 7) != attrs_hash(b"\\x00", 8)
    True
    """
    n = len(data)
    lanes = [(seed ^ (n * 0x9E3779B97F4A7C15)) & _M64, seed ^ 0x1D8E4E27C47D124F]
    s2 = seed ^ 0xE7037ED1A0B428DB
    blocks = data[: n - n % 16]
    if n % 16:
        blocks += data[-16:] if n >= 16 else data + bytes(16 - n)
    for k, (x, y) in enumerate(_iter_QQ(blocks)):
        lanes[k & 1] = _mum(x ^ lanes[k & 1] ^ 0xA0761D6478BD642F, y ^ s2)
    h = _mum(lanes[0] ^ 0x8EBC6AF09C88C6E3, lanes[1] ^ n ^ 0x589965CC75374CC3)
    return h or 1


#: The map every overflowing point gets: ``{otel.metric.overflow: "true"}``.
OVERFLOW_MAP = _map([(b"otel.metric.overflow", b"true")])


class CardinalityState:
    """What the cardinality limit remembers in one window (the twin of the C module's type; thread-safe).

    Per metric name (at most ``max_metrics``), the :func:`attrs_hash` of up to
    ``limit - 1`` attribute maps. Pass it to :func:`encode_metrics`.
    """

    def __init__(self, limit: int, max_metrics: int, seed: int) -> None:
        if limit < 2:
            raise ValueError(f"cardinality limit must be 2 or more, got {limit}")
        if not 1 <= max_metrics <= 1 << 24:
            raise ValueError(f"max_metrics must be between 1 and 16777216, got {max_metrics}")
        self._room = limit - 1
        self._max_metrics = max_metrics
        self.seed = seed & _M64
        self._lock = threading.Lock()
        self._names: dict[bytes, set[int]] = {}
        self._warned: set[bytes] = set()
        self._new_warned: list[bytes] = []
        self._series = self._overflowed = self._untracked = 0

    def reset(self) -> None:
        """Forget every metric name and attribute set (a new window)."""
        with self._lock:
            self._names.clear()
            self._warned.clear()
            self._new_warned.clear()
            self._series = 0

    def take(self) -> tuple[int, int, int, list[str]]:
        """Points folded and points of untracked names since the last call, the sets tracked now,
        and the names that began to overflow since the last call (each once a window)."""
        with self._lock:
            out = (self._overflowed, self._untracked, self._series,
                   [n.decode("utf-8", "replace") for n in self._new_warned])
            self._overflowed = self._untracked = 0
            self._new_warned.clear()
        return out

    def _decide(self, name: bytes, hashes: list[int]) -> list[int]:
        """Indexes (into ``hashes``) of the points of one metric past the limit."""
        over: list[int] = []
        with self._lock:
            sets = self._names.get(name)
            if sets is None:
                if len(self._names) >= self._max_metrics:
                    self._untracked += len(hashes)
                    return over
                sets = self._names[name] = set()
            for i, h in enumerate(hashes):
                if h in sets:
                    continue
                if len(sets) < self._room:
                    sets.add(h)
                    self._series += 1
                else:
                    over.append(i)
            if over:
                self._overflowed += len(over)
                if name not in self._warned:
                    self._warned.add(name)
                    self._new_warned.append(name)
        return over


def encode_metrics(data: bytes, limiter: CardinalityState | None = None) -> dict[str, tuple[int, bytes]]:
    """Encode an ``ExportMetricsServiceRequest`` as RowBinary, per metric kind.

    With ``limiter``, points past its per-metric limit get :data:`OVERFLOW_MAP`.
    Raises :class:`ValueError` when ``data`` is not a valid request.
    """
    if limiter is not None and not isinstance(limiter, CardinalityState):
        raise TypeError(
            f"limiter must be a stethoscope.native.otlp_rowbinary.CardinalityState or None, not {type(limiter).__name__}"
        )
    from google.protobuf.message import DecodeError as _PbDecodeError
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
        ExportMetricsServiceRequest,
    )

    try:
        req = ExportMetricsServiceRequest.FromString(data)
    except (_PbDecodeError, RecursionError) as exc:
        raise ValueError(f"invalid OTLP metrics protobuf: {exc}") from exc
    out: dict[str, list] = {}
    memo: dict[bytes, int] = {}  # attrs_hash of the maps seen in this request (a set recurs point after point)
    for rm in req.resource_metrics:
        res_items = _attr_items(rm.resource.attributes)
        service = dict(res_items).get(b"service.name", b"")
        res_head = _map(res_items) + _str(rm.schema_url.encode("utf-8"))
        for sm in rm.scope_metrics:
            sc = sm.scope
            scope_head = (
                _str(sc.name.encode("utf-8"))
                + _str(sc.version.encode("utf-8"))
                + _attrs(sc.attributes)
                + _pack_I(sc.dropped_attributes_count)
                + _str(sm.schema_url.encode("utf-8"))
                + _str(service)
            )
            for m in sm.metrics:
                kind = m.WhichOneof("data")
                if kind is None:
                    continue
                head = (
                    res_head
                    + scope_head
                    + _str(m.name.encode("utf-8"))
                    + _str(m.description.encode("utf-8"))
                    + _str(m.unit.encode("utf-8"))
                )
                body = getattr(m, kind)
                rows = out.setdefault(kind, [0, []])
                chunks = rows[1]
                noted: list[int] = []  # where the maps of this metric's points are in chunks
                for dp in body.data_points:
                    rows[0] += 1
                    chunks.append(head)
                    amap = _attrs(dp.attributes)
                    if limiter is not None and amap != OVERFLOW_MAP:
                        noted.append(len(chunks))
                    chunks.append(amap)
                    chunks.append(_pack_Q(dp.start_time_unix_nano) + _pack_Q(dp.time_unix_nano))
                    if kind == "gauge" or kind == "sum":
                        chunks.append(_pack_d(_number_value(dp)) + _pack_I(dp.flags))
                        chunks.append(_exemplars(dp.exemplars))
                        if kind == "sum":
                            chunks.append(
                                _pack_i(body.aggregation_temporality)
                                + (b"\x01" if body.is_monotonic else b"\x00")
                            )
                    elif kind == "histogram":
                        chunks.append(
                            _pack_Q(dp.count)
                            + _pack_d(_opt(dp, "sum"))
                            + _u64_array(dp.bucket_counts)
                            + _f64_array(dp.explicit_bounds)
                            + _exemplars(dp.exemplars)
                            + _pack_I(dp.flags)
                            + _pack_d(_opt(dp, "min"))
                            + _pack_d(_opt(dp, "max"))
                            + _pack_i(body.aggregation_temporality)
                        )
                    elif kind == "exponential_histogram":
                        chunks.append(
                            _pack_Q(dp.count)
                            + _pack_d(_opt(dp, "sum"))
                            + _pack_i(dp.scale)
                            + _pack_Q(dp.zero_count)
                            + _pack_i(dp.positive.offset)
                            + _u64_array(dp.positive.bucket_counts)
                            + _pack_i(dp.negative.offset)
                            + _u64_array(dp.negative.bucket_counts)
                            + _exemplars(dp.exemplars)
                            + _pack_I(dp.flags)
                            + _pack_d(_opt(dp, "min"))
                            + _pack_d(_opt(dp, "max"))
                            + _pack_i(body.aggregation_temporality)
                        )
                    else:  # summary
                        q = dp.quantile_values
                        chunks.append(
                            _pack_Q(dp.count)
                            + _pack_d(dp.sum)
                            + _f64_array([x.quantile for x in q])
                            + _f64_array([x.value for x in q])
                            + _pack_I(dp.flags)
                        )
                if noted:
                    hashes = []
                    for j in noted:
                        h = memo.get(chunks[j])
                        if h is None:
                            h = memo[chunks[j]] = attrs_hash(chunks[j], limiter.seed)
                        hashes.append(h)
                    for i in limiter._decide(m.name.encode("utf-8"), hashes):
                        chunks[noted[i]] = OVERFLOW_MAP
    return {k: (v[0], b"".join(v[1])) for k, v in out.items() if v[0]}
