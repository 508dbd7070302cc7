"""The C kernel ``stethoscope._native.encode_metrics`` against its Python twin.

The native module is part of the build: the tests that need it fail (they do
not skip) when it cannot be imported. Tests that only exercise the Python twin
run either way.
"""

from __future__ import annotations

import json
import math
import random
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.metrics.v1.metrics_pb2 import AggregationTemporality

from stethoscope.exporters.schema import METRIC_TABLES, SchemaOptions, create_statements, quote_ident
from stethoscope.native import otlp_rowbinary as twin

try:
    from stethoscope import _native as _native_mod

    _NATIVE_ERROR: ImportError | None = None
except ImportError as exc:  # reported by the `native` fixture, not skipped
    _native_mod = None
    _NATIVE_ERROR = exc

KINDS = ("gauge", "sum", "histogram", "exponential_histogram", "summary")
#: Newer opentelemetry-proto releases add ``string_value_strindex`` to the AnyValue oneof.
HAS_STRINDEX = "string_value_strindex" in AnyValue.DESCRIPTOR.fields_by_name


def _native():
    if _native_mod is None:
        pytest.fail(f"stethoscope._native is not importable (it is part of the build): {_NATIVE_ERROR}")
    return _native_mod


@pytest.fixture
def native():
    return _native()


def assert_same(data: bytes) -> dict:
    """Native and twin agree byte for byte (and in key order); return the result."""
    expected = twin.encode_metrics(data)
    got = _native().encode_metrics(data)
    assert list(got) == list(expected)
    for kind in expected:
        assert got[kind][0] == expected[kind][0], kind
        assert got[kind][1] == expected[kind][1], kind
    return got


# --------------------------------------------------------------------------
# Hand-built wire bytes (for non-canonical encodings the serializer never emits)


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def w_varint(field: int, n: int) -> bytes:
    return _varint(field << 3) + _varint(n)


def w_fixed64(field: int, n: int) -> bytes:
    return _varint(field << 3 | 1) + struct.pack("<Q", n & ((1 << 64) - 1))


def w_double(field: int, d: float) -> bytes:
    return _varint(field << 3 | 1) + struct.pack("<d", d)


def w_ld(field: int, payload: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def wrap_metric(metric: bytes) -> bytes:
    """A request holding one metric (bytes of a Metric message)."""
    return w_ld(1, w_ld(2, w_ld(2, metric)))


def kv(key: str, **value) -> KeyValue:
    return KeyValue(key=key, value=AnyValue(**value))


# --------------------------------------------------------------------------
# Requests built with the official classes


def full_request() -> ExportMetricsServiceRequest:
    req = ExportMetricsServiceRequest()
    rm = req.resource_metrics.add(schema_url="https://opentelemetry.io/schemas/1.21.0")
    rm.resource.attributes.extend(
        [
            kv("service.name", string_value="trainer"),
            kv("host.name", string_value="gpu-07"),
            kv("service.name", string_value="ignored duplicate"),
            kv("gpu.count", int_value=8),
        ]
    )
    sm = rm.scope_metrics.add(schema_url="scope-url")
    sm.scope.name = "stethoscope.gpu"
    sm.scope.version = "0.1.0"
    sm.scope.dropped_attributes_count = 4
    sm.scope.attributes.extend([kv("z", bool_value=False), kv("a", double_value=0.1)])

    g = sm.metrics.add(name="gpu.utilization", description="busy fraction", unit="1")
    for i in range(3):
        dp = g.gauge.data_points.add(start_time_unix_nano=10 + i, time_unix_nano=20 + i, flags=i)
        if i % 2:
            dp.as_int = -(2**63) + i
        else:
            dp.as_double = i / 3
        dp.attributes.extend([kv("gpu", int_value=i), kv("device", string_value=f"cuda:{i}")])
        if i == 2:
            ex = dp.exemplars.add(
                time_unix_nano=99, as_double=2.5, span_id=bytes(range(8)), trace_id=bytes(range(16))
            )
            ex.filtered_attributes.extend([kv("user", string_value="u1"), kv("b", bytes_value=b"\x00\x01")])
            dp.exemplars.add(as_int=42)
            dp.exemplars.add()

    s = sm.metrics.add(name="tokens", unit="{token}")
    s.sum.aggregation_temporality = AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE
    s.sum.is_monotonic = True
    s.sum.data_points.add(as_int=12345, time_unix_nano=2**64 - 1)
    s.sum.data_points.add(as_double=-0.0)

    h = sm.metrics.add(name="latency", unit="s")
    h.histogram.aggregation_temporality = AggregationTemporality.AGGREGATION_TEMPORALITY_DELTA
    hp = h.histogram.data_points.add(count=6, sum=1.25, min=0.01, max=0.9)
    hp.bucket_counts.extend([1, 2, 3])
    hp.explicit_bounds.extend([0.1, 0.5])
    hp.exemplars.add(as_double=0.3, trace_id=b"\xff" * 16)
    h.histogram.data_points.add(count=0)  # absent sum/min/max

    e = sm.metrics.add(name="sizes")
    e.exponential_histogram.aggregation_temporality = 2
    ep = e.exponential_histogram.data_points.add(count=10, scale=-4, zero_count=2, zero_threshold=1e-9)
    ep.positive.offset = -3
    ep.positive.bucket_counts.extend([0, 1, 2**64 - 1])
    ep.negative.offset = 7
    ep.negative.bucket_counts.append(5)
    ep.attributes.append(kv("k", string_value="v"))
    ep.sum = 3.5
    ep.max = 10.0
    e.exponential_histogram.data_points.add()

    q = sm.metrics.add(name="rpc.duration")
    qp = q.summary.data_points.add(count=3, sum=7.0, flags=1)
    qp.quantile_values.add(quantile=0.5, value=1.0)
    qp.quantile_values.add(quantile=0.99, value=5.0)
    q.summary.data_points.add()

    sm.metrics.add(name="no.data")  # no oneof member: no rows
    sm.metrics.add(name="empty.gauge").gauge.SetInParent()  # kind present, zero rows
    return req


def test_full_request_all_kinds(native):
    got = assert_same(full_request().SerializeToString())
    assert set(got) == set(KINDS)
    assert got["gauge"][0] == 3 and got["sum"][0] == 2 and got["summary"][0] == 2


def test_empty_inputs(native):
    assert native.encode_metrics(b"") == {}
    assert native.encode_metrics(ExportMetricsServiceRequest().SerializeToString()) == {}
    req = ExportMetricsServiceRequest()
    req.resource_metrics.add().scope_metrics.add().metrics.add(name="x")
    assert assert_same(req.SerializeToString()) == {}
    req.resource_metrics[0].scope_metrics[0].metrics[0].sum.SetInParent()
    assert assert_same(req.SerializeToString()) == {}


def test_twin_empty_and_invalid():
    assert twin.encode_metrics(b"") == {}
    with pytest.raises(ValueError):
        twin.encode_metrics(b"\x0a\x05\x01")


def test_buffer_protocol(native):
    data = full_request().SerializeToString()
    expected = native.encode_metrics(data)
    assert native.encode_metrics(bytearray(data)) == expected
    assert native.encode_metrics(memoryview(data)) == expected
    assert native.encode_metrics(memoryview(b"xx" + data)[2:]) == expected
    with pytest.raises(TypeError):
        native.encode_metrics("not bytes")
    with pytest.raises(TypeError):
        native.encode_metrics(None)


def _gauge_with_attrs(attrs: list[KeyValue], resource: list[KeyValue] | None = None) -> bytes:
    req = ExportMetricsServiceRequest()
    rm = req.resource_metrics.add()
    rm.resource.attributes.extend(resource or [])
    dp = rm.scope_metrics.add().metrics.add(name="m").gauge.data_points.add(as_double=1.0)
    dp.attributes.extend(attrs)
    return req.SerializeToString()


def _nested(depth: int) -> AnyValue:
    v = AnyValue(string_value="leaf")
    for i in range(depth):
        w = AnyValue()
        if i % 2:
            w.array_value.values.append(v)
        else:
            w.kvlist_value.values.add(key=f"k{i}", value=v)
        v = w
    return v


DOUBLES = [
    0.0, -0.0, 1.0, -1.5, 0.1, 1 / 3, 2.0 / 3.0, 1e300, -1e300, 1e-300, 5e-324, 2.2250738585072014e-308,
    1.7976931348623157e308, 123456789012345678.0, 1e16, 1e15, 0.5e-4, 1e-5, 100.0, math.pi,
    math.nan, math.inf, -math.inf,
]  # fmt: skip


def test_every_anyvalue_kind(native):
    attrs = [
        kv("s", string_value="plain"),
        kv("empty-string", string_value=""),
        kv("t", bool_value=True),
        kv("f", bool_value=False),
        kv("i0", int_value=0),
        kv("imin", int_value=-(2**63)),
        kv("imax", int_value=2**63 - 1),
        kv("b", bytes_value=b"\x00\xffhello"),
        kv("b1", bytes_value=b"x"),
        kv("b2", bytes_value=b"xy"),
        kv("b0", bytes_value=b""),
        KeyValue(key="none"),  # value absent
        KeyValue(key="empty", value=AnyValue()),
        kv("arr-empty", array_value={}),
        kv("kv-empty", kvlist_value={}),
    ]
    for i, d in enumerate(DOUBLES):
        attrs.append(kv(f"d{i:02}", double_value=d))
    arr = AnyValue()
    for d in DOUBLES:
        arr.array_value.values.add(double_value=d)
    arr.array_value.values.extend(
        [
            AnyValue(string_value='q"uo\\te\n\r\t\b\f\x00\x1f\x7f é 世界 🎉'),
            AnyValue(bool_value=True),
            AnyValue(int_value=-7),
            AnyValue(bytes_value=b"\xfb\xff"),
            AnyValue(),
            AnyValue(array_value={}),
            AnyValue(kvlist_value={}),
        ]
    )
    attrs.append(KeyValue(key="array", value=arr))
    kvl = AnyValue()
    kvl.kvlist_value.values.extend(
        [kv('k"\n', string_value="v"), KeyValue(key="nothing"), kv("dup", int_value=1), kv("dup", int_value=2)]
    )
    attrs.append(KeyValue(key="kvlist", value=kvl))
    attrs.append(KeyValue(key="nested", value=_nested(20)))
    got = assert_same(_gauge_with_attrs(attrs))
    assert b'"NaN","+Inf","-Inf"' in got["gauge"][1]
    assert b"\x02b2\x04eHk=" in got["gauge"][1]


def test_anyvalue_member_unknown_to_the_twin(native):
    # field 8 of AnyValue (string_value_strindex where the proto has it): the twin renders "null"
    av8 = w_varint(8, 3)
    attr = w_ld(7, w_ld(1, b"k") + w_ld(2, w_ld(1, b"s") + av8))
    arr = w_ld(7, w_ld(1, b"a") + w_ld(2, w_ld(5, w_ld(1, av8) + w_ld(1, w_varint(3, 1)))))
    got = assert_same(wrap_metric(w_ld(5, w_ld(1, attr + arr))))
    if HAS_STRINDEX:
        assert b"\x01a\x08[null,1]\x01k\x04null" in got["gauge"][1]


def test_double_rendering(native):
    for d in DOUBLES + [random.Random(i).uniform(-1e6, 1e6) for i in range(200)]:
        assert_same(_gauge_with_attrs([kv("d", double_value=d)]))


def test_duplicate_unsorted_and_unicode_keys(native):
    attrs = [
        kv("zeta", string_value="1"),
        kv("alpha", string_value="first"),
        kv("Alpha", string_value="upper sorts first"),
        kv("alpha", string_value="second"),
        kv("", string_value="empty key"),
        kv("é", string_value="é"),
        kv("e", string_value="e"),
        kv("日本", string_value="語"),
        kv("a\x00b", string_value="nul"),
        kv("a", string_value="prefix"),
        kv("ab", string_value="longer"),
    ]
    resource = [kv("service.name", int_value=5), kv("service.name", string_value="second")]
    got = assert_same(_gauge_with_attrs(attrs, resource))
    assert b"\x01a\x06prefix" in got["gauge"][1]
    assert b"\x05alpha\x05first" in got["gauge"][1]
    # ServiceName comes from the first service.name, rendered
    assert b"\x0cservice.name\x015" in got["gauge"][1]
    many = [kv(f"key{(i * 7919) % 100:03}", int_value=i) for i in range(300)]  # merge-sort path
    assert_same(_gauge_with_attrs(many, many))


def test_int_vs_double_points_and_special_values(native):
    req = ExportMetricsServiceRequest()
    m = req.resource_metrics.add().scope_metrics.add().metrics.add(name="v")
    for d in DOUBLES:
        m.gauge.data_points.add(as_double=d)
    for i in (0, 1, -1, 2**53 + 1, 2**63 - 1, -(2**63)):
        m.gauge.data_points.add(as_int=i)
    m.gauge.data_points.add()  # no value
    got = assert_same(req.SerializeToString())
    assert got["gauge"][0] == len(DOUBLES) + 7


def test_depth_limit(native):
    # request > resource_metrics > resource > KeyValue > AnyValue: 4 levels, 2 per nesting
    for depth, ok in ((48, True), (49, False)):
        w = AnyValue(string_value="x")
        for _ in range(depth):
            outer = AnyValue()
            outer.array_value.values.append(w)
            w = outer
        req = ExportMetricsServiceRequest()
        req.resource_metrics.add().resource.attributes.add(key="deep", value=w)
        data = req.SerializeToString()
        if ok:
            assert_same(data)
        else:
            with pytest.raises(ValueError, match="nesting"):
                native.encode_metrics(data)
            with pytest.raises(ValueError):
                twin.encode_metrics(data)
    # very deep hand-built nesting: no recursion blow-up
    blob = w_varint(2, 1)
    for _ in range(5000):
        blob = w_ld(5, w_ld(1, blob))
    with pytest.raises(ValueError, match="nesting"):
        native.encode_metrics(w_ld(1, w_ld(1, w_ld(1, w_ld(1, b"\x0a\x01k") + w_ld(2, blob)))))


def test_non_packed_repeated_fields(native):
    # HistogramDataPoint: bucket_counts (6) and explicit_bounds (7), unpacked and mixed
    hdp = (
        w_fixed64(3, 1000)
        + w_fixed64(4, 6)
        + w_fixed64(6, 1)
        + w_ld(6, struct.pack("<2Q", 2, 3))
        + w_fixed64(6, 4)
        + w_double(7, 0.5)
        + w_double(7, 1.5)
        + w_ld(7, struct.pack("<d", 2.5))
    )
    hist = w_ld(1, hdp) + w_varint(2, 2)
    # ExponentialHistogram Buckets.bucket_counts (2): unpacked varints and mixed
    pos = w_varint(1, 5) + w_varint(2, 1) + w_varint(2, 2**64 - 1) + w_ld(2, _varint(300) + _varint(0))
    edp = w_ld(8, pos) + w_ld(9, w_varint(2, 7) + w_varint(1, 1)) + w_varint(6, (2**32 - 1))
    exph = w_ld(1, edp)
    for metric in (w_ld(1, b"h") + w_ld(9, hist), w_ld(1, b"e") + w_ld(10, exph)):
        got = assert_same(wrap_metric(metric))
        assert len(got) == 1 and next(iter(got.values()))[0] == 1


def test_fields_out_of_order_and_unknown(native):
    # temporality and schema urls after the repeated children; unknown fields of every wire type
    unknown = w_varint(99, 5) + w_fixed64(98, 1) + w_ld(97, b"junk") + _varint(96 << 3 | 5) + b"abcd"
    group = _varint(95 << 3 | 3) + w_varint(1, 1) + _varint(95 << 3 | 4)
    dp = w_fixed64(3, 7) + unknown + w_double(4, 2.5) + w_ld(7, w_ld(2, w_ld(1, b"v")) + w_ld(1, b"k"))
    summ = w_ld(1, dp + w_varint(8, 1)) + unknown
    metric = unknown + w_ld(7, w_ld(1, dp) + unknown + w_varint(3, 1) + w_varint(2, 1)) + w_ld(1, b"name")
    sm = w_ld(2, metric) + w_ld(2, w_ld(11, summ) + w_ld(3, b"u")) + w_ld(3, b"scope-url") + w_ld(1, w_ld(1, b"sc"))
    rm = group + w_ld(2, sm) + w_ld(3, b"res-url") + w_ld(1, w_ld(1, w_ld(1, b"service.name") + w_ld(2, w_ld(1, b"S"))))
    got = assert_same(w_ld(1, rm) + unknown)
    assert got["sum"][0] == 1 and got["summary"][0] == 1
    assert b"\x07res-url" in got["sum"][1]


def test_merge_semantics(native):
    # scalar last wins; oneof last member wins; repeated singular sub-messages merge
    dp = w_double(4, 1.5) + w_fixed64(6, 3) + w_fixed64(3, 1) + w_fixed64(3, 2)
    av_then_int = w_ld(2, w_ld(1, b"str") + w_varint(3, 9))
    two_values = w_ld(2, w_ld(5, w_ld(1, w_varint(3, 1)))) + w_ld(2, w_ld(5, w_ld(1, w_varint(3, 2))))
    arr_str_arr = w_ld(2, w_ld(5, w_ld(1, w_varint(3, 1))) + w_ld(1, b"s") + w_ld(5, w_ld(1, w_varint(3, 2))) + w_ld(5, b""))
    dp += w_ld(7, w_ld(1, b"a") + av_then_int) + w_ld(7, w_ld(1, b"b") + two_values)
    dp += w_ld(7, w_ld(1, b"c") + arr_str_arr) + w_ld(7, w_ld(1, b"d") + w_ld(1, b"renamed"))
    gauge = w_ld(1, dp)
    metric = w_ld(1, b"m") + w_ld(7, w_ld(1, w_fixed64(3, 5))) + w_ld(5, gauge) + w_ld(5, gauge) + w_ld(1, b"m2")
    res = w_ld(1, w_ld(1, w_ld(1, b"r1") + w_ld(2, w_ld(1, b"x")))) + w_ld(1, w_ld(1, w_ld(1, b"r0")))
    scope = w_ld(1, w_ld(1, b"n1")) + w_ld(1, w_ld(2, b"v2"))
    expo = w_ld(10, w_ld(1, w_ld(8, w_varint(1, 3) + w_varint(2, 1)) + w_ld(8, w_varint(2, 2))))
    data = w_ld(1, res + w_ld(2, scope + w_ld(2, metric) + w_ld(2, expo)))
    got = assert_same(data)
    assert got["gauge"][0] == 2 and "sum" not in got


def test_malformed_inputs_raise_value_error(native):
    good = full_request().SerializeToString()
    cases = {
        b"\x0a": "truncated varint",
        b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01": "varint longer than 10 bytes",
        b"\x0a\x05\x01": "exceeds",
        b"\x10\x01\x17": "invalid wire type 7",
        b"\x00": "field number 0",
        b"\x14": "unexpected end-group",
        b"\x13\x08\x01": "unterminated group",
        w_varint(1, 5): "field 1 of ExportMetricsServiceRequest has wrong wire type 0",
        wrap_metric(w_varint(3, 1)): "field 3 of Metric has wrong wire type",
        wrap_metric(w_ld(1, b"\xff")): "invalid UTF-8",
        wrap_metric(w_ld(1, b"\xed\xa0\x80")): "invalid UTF-8",  # surrogate
        wrap_metric(w_ld(1, b"\xc0\x80")): "invalid UTF-8",  # overlong
        wrap_metric(w_ld(9, w_ld(1, w_ld(6, b"\x00" * 7)))): "multiple of 8",
        wrap_metric(w_ld(5, w_ld(1, w_fixed64(3, 1)[:-1]))): "truncated fixed64",
        good[:-1]: "invalid OTLP metrics protobuf: ",
    }
    for data, message in cases.items():
        with pytest.raises(ValueError, match=message):
            native.encode_metrics(data)
    # inside a string value, inside exemplar attributes, inside overwritten oneof members
    bad_utf8 = [
        _gauge_with_attrs([kv("k", string_value="x")]).replace(b"\x01x", b"\x01\xfe"),
        _gauge_with_attrs([kv("ok", string_value="x")]).replace(b"ok", b"o\xff"),
        wrap_metric(w_ld(5, w_ld(1, w_ld(1, b"\x80"))) + w_ld(7, b"")),  # unknown field 1: skipped
    ]
    with pytest.raises(ValueError, match="UTF-8"):
        native.encode_metrics(bad_utf8[0])
    with pytest.raises(ValueError, match="UTF-8"):
        native.encode_metrics(bad_utf8[1])
    assert native.encode_metrics(bad_utf8[2]) == twin.encode_metrics(bad_utf8[2]) == {}
    overwritten = wrap_metric(w_ld(5, w_ld(1, w_ld(7, w_ld(1, b"\xff")))) + w_ld(7, b""))
    for impl in (native, twin):
        with pytest.raises(ValueError):
            impl.encode_metrics(overwritten)


# --------------------------------------------------------------------------
# Property tests

_keys = st.sampled_from(["service.name", "host", "gpu", "a", "b", "é", "", "k\n", "zz"]) | st.text(max_size=6)
_doubles = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0.0, -0.0, 5e-324, 1e300])
_u64 = st.integers(0, 2**64 - 1)
_i64 = st.integers(-(2**63), 2**63 - 1)
_u32 = st.integers(0, 2**32 - 1)
_i32 = st.integers(-(2**31), 2**31 - 1)


def _scalar_any():
    return st.one_of(
        st.builds(lambda s: AnyValue(string_value=s), st.text(max_size=8)),
        st.builds(lambda b: AnyValue(bool_value=b), st.booleans()),
        st.builds(lambda i: AnyValue(int_value=i), _i64),
        st.builds(lambda d: AnyValue(double_value=d), _doubles),
        st.builds(lambda b: AnyValue(bytes_value=b), st.binary(max_size=8)),
        st.just(AnyValue()),
        *([st.builds(lambda i: AnyValue(string_value_strindex=i), _i32)] if HAS_STRINDEX else []),
    )


def _array(children):
    v = AnyValue()
    v.array_value.values.extend(children)
    v.array_value.SetInParent()
    return v


def _kvlist(pairs):
    v = AnyValue()
    v.kvlist_value.SetInParent()
    for k, child in pairs:
        v.kvlist_value.values.add(key=k, value=child)
    return v


_any = st.recursive(
    _scalar_any(),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3).map(_array),
        st.lists(st.tuples(_keys, inner), max_size=3).map(_kvlist),
    ),
    max_leaves=6,
)
_attrs = st.lists(st.builds(lambda k, v: KeyValue(key=k, value=v), _keys, _any), max_size=4)


@st.composite
def _exemplars(draw, container):
    for _ in range(draw(st.integers(0, 2))):
        ex = container.add()
        ex.filtered_attributes.extend(draw(_attrs))
        ex.time_unix_nano = draw(_u64)
        which = draw(st.sampled_from(["d", "i", None]))
        if which == "d":
            ex.as_double = draw(_doubles)
        elif which == "i":
            ex.as_int = draw(_i64)
        ex.span_id = draw(st.binary(max_size=8))
        ex.trace_id = draw(st.binary(max_size=16))
    return container


def _common(draw, dp):
    dp.attributes.extend(draw(_attrs))
    dp.start_time_unix_nano = draw(_u64)
    dp.time_unix_nano = draw(_u64)
    dp.flags = draw(_u32)


def _opt(draw, dp, name):
    if draw(st.booleans()):
        setattr(dp, name, draw(_doubles))


@st.composite
def requests(draw):
    req = ExportMetricsServiceRequest()
    for _ in range(draw(st.integers(0, 2))):
        rm = req.resource_metrics.add()
        rm.resource.attributes.extend(draw(_attrs))
        rm.resource.dropped_attributes_count = draw(_u32)
        rm.schema_url = draw(st.text(max_size=5))
        for _ in range(draw(st.integers(0, 2))):
            sm = rm.scope_metrics.add(schema_url=draw(st.text(max_size=5)))
            if draw(st.booleans()):
                sm.scope.name = draw(st.text(max_size=5))
                sm.scope.version = draw(st.text(max_size=5))
                sm.scope.attributes.extend(draw(_attrs))
                sm.scope.dropped_attributes_count = draw(_u32)
            for _ in range(draw(st.integers(0, 3))):
                m = sm.metrics.add(
                    name=draw(st.text(max_size=6)), description=draw(st.text(max_size=4)), unit=draw(st.text(max_size=3))
                )
                kind = draw(st.sampled_from([*KINDS, None]))
                temporality = draw(st.sampled_from([0, 1, 2]) | _i32)
                npoints = draw(st.integers(0, 3))
                if kind in ("gauge", "sum"):
                    body = getattr(m, kind)
                    body.SetInParent()
                    if kind == "sum":
                        body.aggregation_temporality = temporality
                        body.is_monotonic = draw(st.booleans())
                    for _ in range(npoints):
                        dp = body.data_points.add()
                        _common(draw, dp)
                        which = draw(st.sampled_from(["d", "i", None]))
                        if which == "d":
                            dp.as_double = draw(_doubles)
                        elif which == "i":
                            dp.as_int = draw(_i64)
                        draw(_exemplars(dp.exemplars))
                elif kind == "histogram":
                    m.histogram.SetInParent()
                    m.histogram.aggregation_temporality = temporality
                    for _ in range(npoints):
                        dp = m.histogram.data_points.add(count=draw(_u64))
                        _common(draw, dp)
                        for name in ("sum", "min", "max"):
                            _opt(draw, dp, name)
                        dp.bucket_counts.extend(draw(st.lists(_u64, max_size=4)))
                        dp.explicit_bounds.extend(draw(st.lists(_doubles, max_size=3)))
                        draw(_exemplars(dp.exemplars))
                elif kind == "exponential_histogram":
                    body = m.exponential_histogram
                    body.SetInParent()
                    body.aggregation_temporality = temporality
                    for _ in range(npoints):
                        dp = body.data_points.add(count=draw(_u64), scale=draw(_i32), zero_count=draw(_u64))
                        _common(draw, dp)
                        for name in ("sum", "min", "max"):
                            _opt(draw, dp, name)
                        dp.zero_threshold = draw(_doubles)
                        for side in (dp.positive, dp.negative):
                            if draw(st.booleans()):
                                side.offset = draw(_i32)
                                side.bucket_counts.extend(draw(st.lists(_u64, max_size=4)))
                        draw(_exemplars(dp.exemplars))
                elif kind == "summary":
                    m.summary.SetInParent()
                    for _ in range(npoints):
                        dp = m.summary.data_points.add(count=draw(_u64), sum=draw(_doubles))
                        _common(draw, dp)
                        for _ in range(draw(st.integers(0, 3))):
                            dp.quantile_values.add(quantile=draw(_doubles), value=draw(_doubles))
    return req


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests())
def test_property_native_matches_twin(req):
    assert_same(req.SerializeToString())


def test_twin_doctests():
    import doctest

    assert doctest.testmod(twin).failed == 0


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=100), st.integers(0, 2**64 - 1))
def test_attrs_hash_native_matches_twin(data, seed):
    assert _native().attrs_hash(data, seed) == twin.attrs_hash(data, seed) != 0


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests(), st.integers(2, 4), st.integers(1, 3), st.integers(0, 2**64 - 1))
def test_property_limited_native_matches_twin(req, limit, max_metrics, seed):
    """With a cardinality limit, both encoders fold the same points the same way, request after request."""
    data = req.SerializeToString()
    mine = _native().CardinalityState(limit, max_metrics, seed)
    theirs = twin.CardinalityState(limit, max_metrics, seed)
    for _ in range(2):
        expected = twin.encode_metrics(data, theirs)
        got = _native().encode_metrics(data, mine)
        assert list(got) == list(expected)
        for kind in expected:
            assert got[kind] == expected[kind], kind
        assert mine.take() == theirs.take()
    unlimited = twin.encode_metrics(data)
    assert {k: v[0] for k, v in unlimited.items()} == {k: v[0] for k, v in expected.items()}  # rows never dropped


def test_limited_state_reset_and_errors(native):
    req = ExportMetricsServiceRequest()
    m = req.resource_metrics.add().scope_metrics.add().metrics.add(name="m")
    for i in range(5):
        m.gauge.data_points.add(as_int=i).attributes.append(kv("k", int_value=i))
    data = req.SerializeToString()
    for mod in (native, twin):
        state = mod.CardinalityState(3, 10, 1)
        first = mod.encode_metrics(data, state)
        assert first["gauge"][1].count(b"otel.metric.overflow") == 3
        assert state.take() == (3, 0, 2, ["m"])
        assert mod.encode_metrics(data, state) == first and state.take() == (3, 0, 2, [])  # warned once
        state.reset()
        assert state.take() == (0, 0, 0, []) and mod.encode_metrics(data, state) == first
        assert state.take()[3] == ["m"]  # a new window warns again
        with pytest.raises(ValueError, match="2 or more"):
            mod.CardinalityState(1, 10, 1)
        with pytest.raises(ValueError, match="max_metrics"):
            mod.CardinalityState(2, 0, 1)
        with pytest.raises(TypeError):
            mod.encode_metrics(data, "not a state")
    with pytest.raises(TypeError):
        native.encode_metrics(data, twin.CardinalityState(3, 10, 1))  # each encoder takes its own state


def _check_no_crash(data: bytes) -> None:
    try:
        result = _native().encode_metrics(data)
    except ValueError:
        return
    assert isinstance(result, dict)
    for kind, (rows, buf) in result.items():
        assert kind in KINDS and isinstance(rows, int) and rows > 0 and isinstance(buf, bytes)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_random_bytes(data):
    _check_no_crash(data)


@st.composite
def _mutated(draw):
    data = bytearray(draw(requests()).SerializeToString())
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["truncate", "flip", "set", "insert", "delete"]))
        pos = draw(st.integers(0, len(data)))
        if op == "truncate":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=4))
        elif pos < len(data):
            if op == "flip":
                data[pos] ^= 1 << draw(st.integers(0, 7))
            elif op == "set":
                data[pos] = draw(st.integers(0, 255))
            else:
                del data[pos : pos + draw(st.integers(1, 8))]
    return bytes(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_mutated())
def test_fuzz_mutated_requests(data):
    _check_no_crash(data)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_mutated())
def test_fuzz_mutated_requests_with_a_limit(data):
    state = _native().CardinalityState(2, 2, 99)
    for _ in range(2):
        try:
            result = _native().encode_metrics(data, state)
        except ValueError:
            return
        assert isinstance(result, dict)
    overflowed, untracked, series, names = state.take()
    assert series <= 2 and overflowed >= 0 and untracked >= 0 and len(names) <= 2


def test_fuzz_many_mutations_seeded(native):
    """Cheap bulk mutation fuzzing of a rich request (C is fast; the twin is not run)."""
    rng = random.Random(1234)
    base = full_request()
    base.resource_metrics[0].scope_metrics[0].metrics[0].gauge.data_points[0].attributes.add(
        key="nested", value=_nested(6)
    )
    base = base.SerializeToString()
    for _ in range(20000):
        data = bytearray(base)
        for _ in range(rng.randint(1, 3)):
            pos = rng.randrange(len(data))
            r = rng.random()
            if r < 0.5:
                data[pos] = rng.randrange(256)
            elif r < 0.7:
                del data[pos : pos + rng.randint(1, 4)]
            elif r < 0.9:
                data[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 3)))
            else:
                del data[pos:]
                break
        _check_no_crash(bytes(data))


# --------------------------------------------------------------------------
# Round trip through chDB


def test_chdb_round_trip(native, tmp_path):
    chdb = pytest.importorskip("chdb")
    result = native.encode_metrics(full_request().SerializeToString())
    conn = chdb.connect(str(tmp_path / "chdb"))
    try:
        for stmt in create_statements(SchemaOptions()):
            conn.query(stmt)
        for kind, (rows, buf) in result.items():
            table = METRIC_TABLES[kind]
            cols = ", ".join(quote_ident(c) for c in table.column_names)
            ins = conn.send_insert(f"INSERT INTO stethoscope.{quote_ident(table.name)} ({cols})", "RowBinary")
            ins.append(buf)
            ins.finish()
            count = conn.query(f"SELECT count() AS n FROM stethoscope.{table.name}", "JSONEachRow")
            assert json.loads(count.bytes())["n"] == rows

        def rows_of(sql: str) -> list[dict]:
            sql += " SETTINGS output_format_json_quote_64bit_integers = 0"
            out = conn.query(sql, "JSONEachRow").bytes().decode()
            return [json.loads(line) for line in out.splitlines() if line]

        g = rows_of(
            "SELECT ServiceName, MetricName, MetricUnit, ScopeName, ScopeDroppedAttrCount, "
            "ResourceAttributes, Attributes, Value, Flags, `Exemplars.TraceId` AS tid, "
            "`Exemplars.Value` AS ev, `Exemplars.FilteredAttributes` AS efa, "
            "toUnixTimestamp64Nano(TimeUnix) AS t FROM stethoscope.otel_metrics_gauge ORDER BY t"
        )
        assert [r["ServiceName"] for r in g] == ["trainer"] * 3
        assert g[0]["MetricName"] == "gpu.utilization" and g[0]["MetricUnit"] == "1"
        assert g[0]["ScopeName"] == "stethoscope.gpu" and g[0]["ScopeDroppedAttrCount"] == 4
        assert g[0]["ResourceAttributes"] == {"gpu.count": "8", "host.name": "gpu-07", "service.name": "trainer"}
        assert g[1]["Attributes"] == {"device": "cuda:1", "gpu": "1"}
        assert [float(r["Value"]) for r in g] == [0.0, float(-(2**63) + 1), 2 / 3]
        assert [int(r["t"]) for r in g] == [20, 21, 22]
        assert g[2]["tid"] == [bytes(range(16)).hex(), "", ""]
        assert g[2]["ev"] == [2.5, 42.0, 0.0]
        assert g[2]["efa"][0] == {"b": "AAE=", "user": "u1"}

        s = rows_of("SELECT Value, AggregationTemporality, IsMonotonic FROM stethoscope.otel_metrics_sum ORDER BY Value")
        assert s == [{"Value": 0, "AggregationTemporality": 2, "IsMonotonic": True},
                     {"Value": 12345, "AggregationTemporality": 2, "IsMonotonic": True}]  # fmt: skip
        h = rows_of(
            "SELECT Count, Sum, BucketCounts, ExplicitBounds, Min, Max, AggregationTemporality AS at "
            "FROM stethoscope.otel_metrics_histogram ORDER BY Count DESC"
        )
        assert h[0] == {"Count": 6, "Sum": 1.25, "BucketCounts": [1, 2, 3], "ExplicitBounds": [0.1, 0.5],
                        "Min": 0.01, "Max": 0.9, "at": 1}  # fmt: skip
        assert h[1]["Sum"] == 0 and h[1]["Max"] == 0
        e = rows_of(
            "SELECT Scale, ZeroCount, PositiveOffset, PositiveBucketCounts, NegativeOffset, "
            "NegativeBucketCounts, Sum FROM stethoscope.otel_metrics_exponential_histogram ORDER BY Count DESC"
        )
        assert e[0] == {"Scale": -4, "ZeroCount": 2, "PositiveOffset": -3,
                        "PositiveBucketCounts": [0, 1, 2**64 - 1], "NegativeOffset": 7,
                        "NegativeBucketCounts": [5], "Sum": 3.5}  # fmt: skip
        q = rows_of(
            "SELECT Count, `ValueAtQuantiles.Quantile` AS qq, `ValueAtQuantiles.Value` AS qv "
            "FROM stethoscope.otel_metrics_summary ORDER BY Count DESC"
        )
        assert q[0] == {"Count": 3, "qq": [0.5, 0.99], "qv": [1, 5]}
    finally:
        conn.close()
