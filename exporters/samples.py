"""Sampled model rows and delayed labels: OTLP log records into ``samples`` and ``labels``.

The in-process SDK sends each sampled prediction as an OTLP ``LogRecord`` whose
``event_name`` (field 12; or, from SDKs that cannot set it, the attribute
``event.name``) is :data:`SAMPLE_EVENT`, and each ground-truth label that
arrives later as one named :data:`LABEL_EVENT`. :func:`event_of` tells them
apart from ordinary logs; :func:`encode_sample` and :func:`encode_label` turn one
record into one RowBinary row in the column order of
:data:`~stethoscope.exporters.schema.SAMPLES_TABLE` and
:data:`~stethoscope.exporters.schema.LABELS_TABLE`.

A record that breaks the contract is not raised about: the encoder returns
``None`` and notes why in a :class:`Rejections` tally (one reason per record, the
first problem found), so the rest of the request is still stored and the
receiver can answer with OTLP partial success.

Contract of a sample (attributes; any others go to ``Attributes`` as strings):

=============================== ======================= ==========================
attribute                       type                    when absent
=============================== ======================= ==========================
``stethoscope.model``           non-empty string        rejected (missing_model)
``stethoscope.model.version``   string                  ``""``
``stethoscope.stream``          string                  ``"default"``
``stethoscope.request_id``      string                  ``""``
``stethoscope.features``        array of numbers        rejected (missing_features)
``stethoscope.feature_names``   array of strings, same  ``[]``
                                length as features
``stethoscope.prediction``      number, or string label NaN and ``""``
``stethoscope.confidence``      number                  NaN
``stethoscope.adjusted_count``  number, finite, >= 1    rejected
                                                        (missing_adjusted_count)
``stethoscope.sampling.         string of 1-14 hex      ``""``
threshold``                     digits (OpenTelemetry
                                ``th``)
``stethoscope.uncertainty``     bool                    false
=============================== ======================= ==========================

A label needs ``stethoscope.model`` and a non-empty ``stethoscope.request_id``,
and ``stethoscope.label``: a number (``Label``) or a string (``LabelText``, with
``Label`` NaN); its other attributes (``stethoscope.model.version`` too) go to
``Attributes``. Either kind needs a time: ``time_unix_nano``, else
``observed_time_unix_nano``. Numbers may be OTLP doubles or integers; features
are stored as Float32 (values beyond its range become infinities, as a
ClickHouse cast would make them).

Features are the bulk of a sample, so the common case (every element a double)
is converted without touching elements one by one: an array of doubles
serialises as fixed 11-byte elements, checked and unpacked in C by ``struct``.
"""

from __future__ import annotations

import array
import functools
import math
import re
import struct
import sys

from stethoscope.native.otlp_rowbinary import any_value_to_str, varint

__all__ = [
    "SAMPLE_EVENT",
    "LABEL_EVENT",
    "REJECT_REASONS",
    "Rejections",
    "event_of",
    "encode_sample",
    "encode_label",
]

SAMPLE_EVENT = "stethoscope.sample"
LABEL_EVENT = "stethoscope.label"
_EVENT_ATTR = "event.name"

#: Why a sample or label record was dropped (the ``reason`` of the rejection counter).
REJECT_REASONS = (
    "missing_timestamp",
    "bad_timestamp",
    "missing_model",
    "bad_model",
    "bad_model_version",
    "bad_stream",
    "bad_request_id",
    "missing_request_id",
    "missing_features",
    "bad_features",
    "bad_feature_names",
    "bad_prediction",
    "bad_confidence",
    "missing_adjusted_count",
    "bad_adjusted_count",
    "bad_sampling_threshold",
    "bad_uncertainty",
    "missing_label",
    "bad_label",
)

_NAN = float("nan")
_pack_q = struct.Struct("<q").pack
_pack_d = struct.Struct("<d").pack
_pack_dd = struct.Struct("<dd").pack
_TH = re.compile(r"[0-9a-f]{1,14}")
_LITTLE = sys.byteorder == "little"

_MODEL = "stethoscope.model"
_VERSION = "stethoscope.model.version"
_STREAM = "stethoscope.stream"
_REQUEST_ID = "stethoscope.request_id"
_FEATURES = "stethoscope.features"
_FEATURE_NAMES = "stethoscope.feature_names"
_PREDICTION = "stethoscope.prediction"
_CONFIDENCE = "stethoscope.confidence"
_ADJUSTED = "stethoscope.adjusted_count"
_THRESHOLD = "stethoscope.sampling.threshold"
_UNCERTAINTY = "stethoscope.uncertainty"
_LABEL = "stethoscope.label"


class Rejections:
    """Per-request tally of dropped records: a count and the first message per reason.

    >>> r = Rejections()
    >>> r.add("bad_features", "stethoscope.features must be an array of numbers")
    >>> r.add("bad_features", "another one")
    >>> r.total, r.counts
    (2, {'bad_features': 2})
    >>> r.summary()
    'bad_features: 2 (stethoscope.features must be an array of numbers)'
    """

    __slots__ = ("counts", "first", "total")

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.first: dict[str, str] = {}
        self.total = 0

    def add(self, reason: str, message: str) -> None:
        self.total += 1
        n = self.counts.get(reason)
        if n is None:
            self.counts[reason] = 1
            self.first[reason] = message
        else:
            self.counts[reason] = n + 1

    def summary(self) -> str:
        """One line naming every reason, its count and its first message."""
        return "; ".join(f"{r}: {n} ({self.first[r]})" for r, n in sorted(self.counts.items()))


class _Reject(Exception):
    """Internal: a record broke the contract (never escapes this module)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def event_of(rec) -> str:
    """The event name of a ``LogRecord``: field 12, else its ``event.name`` attribute."""
    name = getattr(rec, "event_name", "")  # older opentelemetry-proto lacks field 12
    if name:
        return name
    for kv in rec.attributes:
        if kv.key == _EVENT_ATTR:
            return kv.value.string_value
    return ""


def _s(b: bytes) -> bytes:
    n = len(b)
    return bytes((n,)) + b if n < 0x80 else varint(n) + b


def _str_field(v, key: str, reason: str) -> str:
    if v.WhichOneof("value") != "string_value":
        raise _Reject(reason, f"{key} must be a string")
    return v.string_value


def _num_field(v, key: str, reason: str) -> float:
    kind = v.WhichOneof("value")
    if kind == "double_value":
        return v.double_value
    if kind == "int_value":
        return float(v.int_value)
    raise _Reject(reason, f"{key} must be a number")


@functools.lru_cache(maxsize=256)
def _stride(n: int) -> struct.Struct:
    # An ArrayValue of n doubles serialises as n times: 0x0A 0x09 (values, 9 bytes)
    # 0x21 (double_value, fixed64) and the 8 bytes of the double.
    return struct.Struct("<" + "3xd" * n)


def _float32s(values: tuple[float, ...] | list[float]) -> bytes:
    a = array.array("f", values)
    if not _LITTLE:
        a.byteswap()
    return a.tobytes()


def _features(v) -> tuple[int, bytes]:
    """``(count, little-endian Float32 bytes)`` of an array of numbers."""
    if v.WhichOneof("value") != "array_value":
        raise _Reject("bad_features", f"{_FEATURES} must be an array of numbers")
    arr = v.array_value
    n = len(arr.values)
    if n:
        raw = arr.SerializeToString()
        if (
            len(raw) == 11 * n
            and raw[0::11] == b"\x0a" * n
            and raw[1::11] == b"\x09" * n
            and raw[2::11] == b"\x21" * n
        ):
            return n, _float32s(_stride(n).unpack(raw))
    out = []
    for i, x in enumerate(arr.values):
        kind = x.WhichOneof("value")
        if kind == "double_value":
            out.append(x.double_value)
        elif kind == "int_value":
            out.append(float(x.int_value))
        else:
            raise _Reject("bad_features", f"{_FEATURES}[{i}] must be a number, got {kind or 'nothing'}")
    return n, _float32s(out)


def _feature_names(v, n: int) -> bytes:
    if v.WhichOneof("value") != "array_value":
        raise _Reject("bad_feature_names", f"{_FEATURE_NAMES} must be an array of strings")
    count, encoded, problem = _names_rowbinary(v.array_value.SerializeToString())
    if problem:
        raise _Reject("bad_feature_names", problem)
    if count != n:
        raise _Reject("bad_feature_names", f"{_FEATURE_NAMES} has {count} names for {n} features")
    return encoded


@functools.lru_cache(maxsize=1024)
def _names_rowbinary(raw: bytes) -> tuple[int, bytes, str]:
    """``(count, RowBinary Array(String), problem)`` of a serialised ArrayValue of names.

    A model sends the same names with every row, so this is memoised on the bytes.
    """
    from opentelemetry.proto.common.v1.common_pb2 import ArrayValue

    names = ArrayValue.FromString(raw).values
    parts = [varint(len(names))]
    for i, x in enumerate(names):
        if x.WhichOneof("value") != "string_value":
            return len(names), b"", f"{_FEATURE_NAMES}[{i}] must be a string"
        parts.append(_s(x.string_value.encode("utf-8")))
    return len(names), b"".join(parts), ""


def _split(rec, consumed: frozenset[str]) -> tuple[dict, bytes]:
    """The record's ``consumed`` attributes as ``{key: AnyValue}`` (first wins), and the rest as a map.

    The rest, ``event.name`` aside, are rendered as strings into a RowBinary map
    sorted by key, as ``otel_logs`` renders its attribute maps.
    """
    known: dict = {}
    rest: dict[bytes, bytes] = {}
    for kv in rec.attributes:
        key = kv.key
        if key in consumed:
            if key not in known:
                known[key] = kv.value
        elif key != _EVENT_ATTR:
            k = key.encode("utf-8")
            if k not in rest:
                rest[k] = any_value_to_str(kv.value).encode("utf-8")
    if not rest:
        return known, b"\x00"
    items = sorted(rest.items())
    return known, varint(len(items)) + b"".join(_s(k) + _s(v) for k, v in items)


# Attribute keys each kind turns into columns; any other key goes to Attributes.
_SAMPLE_KEYS = frozenset(
    {_MODEL, _VERSION, _STREAM, _REQUEST_ID, _FEATURES, _FEATURE_NAMES, _PREDICTION, _CONFIDENCE,
     _ADJUSTED, _THRESHOLD, _UNCERTAINTY}
)
_LABEL_KEYS = frozenset({_MODEL, _REQUEST_ID, _LABEL})


def _timestamp(rec) -> int:
    ts = rec.time_unix_nano or rec.observed_time_unix_nano
    if not ts:
        raise _Reject("missing_timestamp", "time_unix_nano and observed_time_unix_nano are both unset")
    if ts >= 1 << 63:
        raise _Reject("bad_timestamp", f"time_unix_nano {ts} is beyond DateTime64(9)")
    return ts


def _model(known: dict) -> bytes:
    v = known.get(_MODEL)
    if v is None:
        raise _Reject("missing_model", f"{_MODEL} is required")
    model = _str_field(v, _MODEL, "bad_model")
    if not model:
        raise _Reject("missing_model", f"{_MODEL} must not be empty")
    return model.encode("utf-8")


def _opt_str(known: dict, key: str, default: str, reason: str) -> bytes:
    v = known.get(key)
    return (default if v is None else _str_field(v, key, reason)).encode("utf-8")


def _sample_row(rec, service: bytes, resource_map: bytes) -> bytes:
    ts = _timestamp(rec)
    known, attrs = _split(rec, _SAMPLE_KEYS)
    model = _model(known)
    version = _opt_str(known, _VERSION, "", "bad_model_version")
    stream = _opt_str(known, _STREAM, "default", "bad_stream")
    request_id = _opt_str(known, _REQUEST_ID, "", "bad_request_id")

    v = known.get(_FEATURES)
    if v is None:
        raise _Reject("missing_features", f"{_FEATURES} is required")
    n, features = _features(v)
    v = known.get(_FEATURE_NAMES)
    names = b"\x00" if v is None else _feature_names(v, n)

    prediction, label = _NAN, b""
    v = known.get(_PREDICTION)
    if v is not None:
        kind = v.WhichOneof("value")
        if kind == "string_value":
            label = v.string_value.encode("utf-8")
        else:
            prediction = _num_field(v, _PREDICTION, "bad_prediction")

    v = known.get(_CONFIDENCE)
    confidence = _NAN if v is None else _num_field(v, _CONFIDENCE, "bad_confidence")

    v = known.get(_ADJUSTED)
    if v is None:
        raise _Reject("missing_adjusted_count", f"{_ADJUSTED} is required")
    adjusted = _num_field(v, _ADJUSTED, "bad_adjusted_count")
    if not (adjusted >= 1.0 and math.isfinite(adjusted)):  # also false for NaN
        raise _Reject("bad_adjusted_count", f"{_ADJUSTED} must be a finite number >= 1, got {adjusted!r}")

    threshold = b""
    v = known.get(_THRESHOLD)
    if v is not None:
        th = _str_field(v, _THRESHOLD, "bad_sampling_threshold")
        if not _TH.fullmatch(th):
            raise _Reject("bad_sampling_threshold", f"{_THRESHOLD} must be 1 to 14 lowercase hex digits, got {th[:20]!r}")
        threshold = th.encode("ascii")

    uncertain = b"\x00"
    v = known.get(_UNCERTAINTY)
    if v is not None:
        if v.WhichOneof("value") != "bool_value":
            raise _Reject("bad_uncertainty", f"{_UNCERTAINTY} must be a bool")
        uncertain = b"\x01" if v.bool_value else b"\x00"

    return b"".join((
        _pack_q(ts),
        _s(service),
        _s(model),
        _s(version),
        _s(stream),
        _s(request_id),
        varint(n),
        features,
        names,
        _pack_d(prediction),
        _s(label),
        _pack_dd(confidence, adjusted),
        _s(threshold),
        uncertain,
        attrs,
        resource_map,
    ))


def _label_row(rec, service: bytes, resource_map: bytes) -> bytes:
    ts = _timestamp(rec)
    known, attrs = _split(rec, _LABEL_KEYS)
    model = _model(known)
    v = known.get(_REQUEST_ID)
    if v is None:
        raise _Reject("missing_request_id", f"{_REQUEST_ID} is required on a label")
    request_id = _str_field(v, _REQUEST_ID, "bad_request_id")
    if not request_id:
        raise _Reject("missing_request_id", f"{_REQUEST_ID} must not be empty on a label")
    v = known.get(_LABEL)
    if v is None:
        raise _Reject("missing_label", f"{_LABEL} is required")
    value, text = _NAN, b""
    if v.WhichOneof("value") == "string_value":
        text = v.string_value.encode("utf-8")
    else:
        value = _num_field(v, _LABEL, "bad_label")
    return b"".join((
        _pack_q(ts),
        _s(service),
        _s(model),
        _s(request_id.encode("utf-8")),
        _pack_d(value),
        _s(text),
        attrs,
        resource_map,
    ))


def encode_sample(rec, service: bytes, resource_map: bytes, rejections: Rejections) -> bytes | None:
    """One ``samples`` row for a sample ``LogRecord``, or ``None`` (noted in ``rejections``).

    ``service`` is the resource's ``service.name`` and ``resource_map`` its
    attributes as a RowBinary map, both encoded once per resource by the caller.
    """
    try:
        return _sample_row(rec, service, resource_map)
    except _Reject as exc:
        rejections.add(exc.reason, str(exc))
        return None


def encode_label(rec, service: bytes, resource_map: bytes, rejections: Rejections) -> bytes | None:
    """One ``labels`` row for a label ``LogRecord``, or ``None`` (noted in ``rejections``)."""
    try:
        return _label_row(rec, service, resource_map)
    except _Reject as exc:
        rejections.add(exc.reason, str(exc))
        return None
