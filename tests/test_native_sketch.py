"""Exponential-histogram kernels: ``stethoscope._sketch`` against its NumPy twin, an exact reference and the OTel SDK.

The native module is part of the build: tests that need it fail (they do not
skip) when it cannot be imported. Tests parametrised over ``impl`` run against
both the C kernel and the twin.
"""

from __future__ import annotations

import math
import struct
from decimal import Decimal, localcontext
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from opentelemetry.sdk.metrics import MeterProvider, UpDownCounter
from opentelemetry.sdk.metrics.export import AggregationTemporality, InMemoryMetricReader
from opentelemetry.sdk.metrics.view import ExponentialBucketHistogramAggregation, View

from stethoscope import native as native_pkg
from stethoscope.errors import ConfigError
from stethoscope.native import sketch as twin
from stethoscope.native.sketch import EMPTY_OFFSET, ExpHistogramPoint, ExpHistogramState

try:
    from stethoscope import _sketch as _native_mod

    _NATIVE_ERROR: ImportError | None = None
except ImportError as exc:  # reported by the fixtures, not skipped
    _native_mod = None
    _NATIVE_ERROR = exc

MIN_NORMAL = 2.0**-1022
MAX_DOUBLE = 1.7976931348623157e308


def _native():
    if _native_mod is None:
        pytest.fail(f"stethoscope._sketch is not importable (it is part of the build): {_NATIVE_ERROR}")
    return _native_mod


@pytest.fixture
def native():
    return _native()


@pytest.fixture(params=["native", "python"])
def impl(request):
    """Every API test runs against the C kernel and the twin."""
    return _native() if request.param == "native" else twin


def assert_same_state(a: ExpHistogramState, b: ExpHistogramState) -> None:
    """Every array bit for bit (so 0.0 and -0.0 differ, and NaN equals NaN)."""
    for name, x in a.arrays().items():
        y = b.arrays()[name]
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert x.tobytes() == y.tobytes(), f"{name} differs: {x} vs {y}"
    assert a._block.tobytes() == b._block.tobytes()


def both(batches, d, max_size=160, max_scale=20, zero_threshold=0.0, row=False):
    """Feed the same batches to C and the twin; check equal states and drop counts; return the C state."""
    a = ExpHistogramState(d, max_size, max_scale, zero_threshold)
    b = ExpHistogramState(d, max_size, max_scale, zero_threshold)
    for x in batches:
        if row:
            got, want = _native().exphist_update_row(x, a), twin.exphist_update_row(x, b)
        else:
            got, want = _native().exphist_update(x, a), twin.exphist_update(x, b)
        assert got == want
    assert_same_state(a, b)
    return a


def check_invariants(s: ExpHistogramState) -> None:
    for c in range(s.d):
        p = s.buckets(c)
        assert p.count == p.zero_count + sum(p.pos_counts) + sum(p.neg_counts)
        assert len(p.pos_counts) <= s.max_size and len(p.neg_counts) <= s.max_size
        ranges = ((p.pos_offset, p.pos_counts, s.pos_offset), (p.neg_offset, p.neg_counts, s.neg_offset))
        for off, counts, arr in ranges:
            if counts:
                assert counts[0] and counts[-1] and int(arr[c]) == off
            else:
                assert int(arr[c]) == EMPTY_OFFSET
        assert twin.MIN_SCALE <= p.scale <= s.max_scale


# --------------------------------------------------------------------------
# Value generators


def nasty_values(rng: np.random.Generator, shape, spread: float) -> np.ndarray:
    """Log-normal magnitudes of both signs with zeros, subnormals, extremes, powers of two and non-finite values."""
    x = np.exp(np.clip(rng.normal(0.0, spread, shape), -700, 700)) * rng.choice([-1.0, 1.0, 1.0], shape)
    u = rng.random(shape)
    x[u < 0.04] = 0.0
    x[(u >= 0.04) & (u < 0.05)] = -0.0
    x[(u >= 0.05) & (u < 0.06)] = np.nan
    x[(u >= 0.06) & (u < 0.065)] = np.inf
    x[(u >= 0.065) & (u < 0.07)] = -np.inf
    sub = (u >= 0.07) & (u < 0.08)
    x[sub] = rng.choice([5e-324, 1e-310, -2.5e-320, MIN_NORMAL, -MIN_NORMAL, np.nextafter(MIN_NORMAL, 0)], sub.sum())
    big = (u >= 0.08) & (u < 0.09)
    x[big] = rng.choice([MAX_DOUBLE, -MAX_DOUBLE, 1e300, 1e-300, -1e-300], big.sum())
    p2 = (u >= 0.09) & (u < 0.13)
    k = rng.integers(-1022, 1024, p2.sum())
    x[p2] = np.ldexp(1.0, k) * rng.choice([1.0, -1.0], p2.sum())
    near = (u >= 0.13) & (u < 0.16)
    k = rng.integers(-1000, 1000, near.sum())
    x[near] = np.nextafter(np.ldexp(1.0, k), rng.choice([0.0, np.inf], near.sum()))
    return x


# --------------------------------------------------------------------------
# C kernel == twin


@pytest.mark.parametrize("max_size", [2, 3, 5, 16, 160])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_twin_equivalence_random_batches(max_size, dtype):
    rng = np.random.default_rng(max_size * 7 + (dtype == np.float32))
    for trial in range(6):
        d = int(rng.integers(1, 9))
        spread = float(rng.choice([0.001, 0.5, 5.0, 80.0]))
        batches = []
        for _ in range(int(rng.integers(1, 8))):
            n = int(rng.integers(0, 300))
            with np.errstate(over="ignore"):
                batches.append(nasty_values(rng, (n, d), spread).astype(dtype))
        s = both(batches, d, max_size=max_size)
        check_invariants(s)


def test_twin_equivalence_many_sequential_batches():
    rng = np.random.default_rng(11)
    batches = [nasty_values(rng, (int(rng.integers(1, 40)), 4), 3.0 + i) for i in range(60)]
    s = both(batches, 4)
    check_invariants(s)
    assert (s.scale < 20).all()


def test_twin_equivalence_zero_threshold_and_small_max_scale():
    rng = np.random.default_rng(5)
    batches = [nasty_values(rng, (200, 3), 4.0) for _ in range(4)]
    both(batches, 3, max_size=20, max_scale=3, zero_threshold=0.5)
    both(batches, 3, max_size=20, max_scale=-10)
    both(batches, 3, max_size=2, max_scale=0, zero_threshold=MIN_NORMAL)


def test_twin_equivalence_rows_and_rows_equal_batches():
    rng = np.random.default_rng(6)
    x = nasty_values(rng, (150, 5), 6.0)
    by_row = both(list(x), 5, max_size=12, row=True)
    by_batch = both([x], 5, max_size=12)
    assert_same_state(by_row, by_batch)
    as_lists = both([list(r) for r in x[:30]], 5, max_size=12, row=True)
    assert_same_state(as_lists, both([x[:30]], 5, max_size=12))


def test_twin_equivalence_strided_inputs():
    rng = np.random.default_rng(8)
    base = nasty_values(rng, (120, 12), 2.0)
    views = [base[:, ::3], base.T[:4].T, base[::-2, 1:5], np.asfortranarray(base[:, :4])]
    for v in views:
        assert_same_state(both([v], v.shape[1]), both([np.ascontiguousarray(v)], v.shape[1]))
    row = base[7, ::3]
    assert_same_state(both([row], 4, row=True), both([row[None, :].copy()], 4))


def test_downscale_through_every_scale_near_powers_of_two():
    """Values a few ulps below powers of two, recorded at high scales, then pushed down to negative scales."""
    ks = np.arange(-60, 61)
    below = np.nextafter(np.ldexp(1.0, ks), 0)
    above = np.nextafter(np.ldexp(1.0, ks), np.inf)
    seq = [below[:5], above[:5], np.array([1.0, 3.0]), below, np.array([1e-200, 1e200]), above, below]
    batches = [np.stack([s, -s[::-1]], axis=1) for s in seq]
    s = both(batches, 2, max_size=8)
    assert (s.scale <= 0).all()
    for c in range(2):
        assert sdk_point([float(v) for b in batches for v in b[:, c]], 8) == s.buckets(c)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    x=hnp.arrays(
        dtype=st.sampled_from([np.float64, np.float32]),
        shape=st.tuples(st.integers(0, 30), st.integers(1, 8)),
        elements={"allow_nan": True, "allow_infinity": True, "allow_subnormal": True},
    ),
    max_size=st.sampled_from([2, 4, 160]),
    max_scale=st.integers(-10, 20),
)
def test_property_native_matches_twin(x, max_size, max_scale):
    half = x.shape[0] // 2
    s = both([x[:half], x[half:]], x.shape[1], max_size=max_size, max_scale=max_scale)
    check_invariants(s)


# --------------------------------------------------------------------------
# Independent reference: exact bucket indexes


def ref_index(v: float, scale: int) -> tuple[int, bool]:
    """Upper-inclusive bucket of |v| by exact arithmetic (subnormals counted as 2**-1022, as the kernels do).

    Also says whether |v| is within 1e-9 of a bucket (in index units) of a
    boundary, where the spec lets the logarithm method be one bucket off.
    """
    v = max(abs(v), MIN_NORMAL)
    frac, exp = math.frexp(v)  # v = frac * 2**exp, frac in [0.5, 1)
    if scale <= 0:
        e = exp - 2 if frac == 0.5 else exp - 1  # powers of two belong to the bucket below
        return e >> -scale, False
    if frac == 0.5:
        return ((exp - 1) << scale) - 1, False
    n = 1 << scale
    with localcontext() as ctx:  # 60 digits: plenty to tell how close to a boundary v is
        ctx.prec = 60
        x = Decimal(v).ln() / Decimal(2).ln() * n
        i = int(x.to_integral_value(rounding="ROUND_CEILING")) - 1
        near = abs(x - x.to_integral_value()) < Decimal("1e-9")
    if scale <= 6:
        # base**i < v <= base**(i+1)  <=>  2**i < v**n <= 2**(i+1), in exact rationals
        p = Fraction(v) ** n
        assert Fraction(2) ** i < p <= Fraction(2) ** (i + 1)
    return i, near


def spec_log_index(v: float, scale: int) -> int:
    """The spec's "MapToIndex for any scale, exact for powers of two" (subnormals as 2**-1022)."""
    v = max(abs(v), MIN_NORMAL)
    frac, exp = math.frexp(v)
    if frac == 0.5:
        return ((exp - 1) << scale) - 1
    return min(math.floor(math.log(v) * math.ldexp(1 / math.log(2), scale)), (1024 << scale) - 1)


def indexes_via_kernel(impl, values: list[float], scale: int) -> list[int]:
    """Each value in its own column of a fresh state at ``scale``: its bucket is the column's offset."""
    s = ExpHistogramState(len(values), max_scale=scale)
    impl.exphist_update(np.array([values]), s)
    return [int(s.pos_offset[c]) if values[c] > 0 else int(s.neg_offset[c]) for c in range(len(values))]


@pytest.mark.parametrize("scale", [-10, -4, -1, 0, 1, 2, 3, 6, 8, 12, 16, 20])
def test_indexes_match_exact_reference(impl, scale):
    rng = np.random.default_rng(scale + 100)
    values = list(np.exp(rng.uniform(-700, 700, 300)) * rng.choice([-1, 1], 300))
    values += list(np.exp(rng.uniform(-3, 3, 300)))
    values += [1.0, 2.0, 0.5, 3.0, MIN_NORMAL, 5e-324, 1e-310, MAX_DOUBLE, -4.0]
    values += [float(np.nextafter(2.0**k, 0)) for k in (-900, -1, 1, 2, 300)]
    values += [float(np.nextafter(2.0**k, 4.0**k)) for k in (-900, -1, 1, 2, 300)]
    got = indexes_via_kernel(impl, values, scale)
    off_by_one = 0
    for v, g in zip(values, got):
        want, near = ref_index(v, scale)
        if scale > 0:
            assert g == spec_log_index(v, scale), v
        if near:  # the logarithm method may be one off this close to a boundary (spec: "MAY")
            assert abs(g - want) <= 1, v
            off_by_one += g != want
        else:
            assert g == want, v
    assert off_by_one <= 10  # only the values built a few ulps from a power of two


def test_powers_of_two_are_exact_at_every_scale(impl):
    ks = list(range(-1022, 1024, 7)) + [-1022, 0, 1, 1023]
    for scale in range(-10, 21):
        got = indexes_via_kernel(impl, [2.0**k for k in ks], scale)
        want = [((k << scale) - 1) if scale > 0 else (k - 1) >> -scale for k in ks]
        assert got == want, scale


def test_bucket_boundaries_bracket_values(impl):
    """base**i < v <= base**(i+1) checked in floating point with one ulp of slack."""
    rng = np.random.default_rng(3)
    values = list(np.exp(rng.uniform(-50, 50, 400)))
    for scale in (1, 5, 10, 20):
        for v, i in zip(values, indexes_via_kernel(impl, values, scale)):
            lo, hi = 2.0 ** (i / 2**scale), 2.0 ** ((i + 1) / 2**scale)
            assert np.nextafter(lo, 0) < v <= np.nextafter(hi, np.inf)


# --------------------------------------------------------------------------
# Against the OpenTelemetry Python SDK


def _trim(offset: int, counts) -> tuple[int, list[int]]:
    counts = list(counts)
    while counts and counts[-1] == 0:
        counts.pop()
    k = 0
    while k < len(counts) and counts[k] == 0:
        k += 1
    return (offset + k, counts[k:]) if counts[k:] else (0, [])


def sdk_point(values, max_size=160, max_scale=20) -> ExpHistogramPoint:
    """The SDK's exponential histogram of ``values`` (recorded in order), as a trimmed point."""
    reader = InMemoryMetricReader(preferred_temporality={UpDownCounter: AggregationTemporality.DELTA})
    view = View(
        instrument_name="feature",
        aggregation=ExponentialBucketHistogramAggregation(max_size=max_size, max_scale=max_scale),
    )
    provider = MeterProvider(metric_readers=[reader], views=[view])
    try:
        counter = provider.get_meter("test").create_up_down_counter("feature")  # takes negative values
        for v in values:
            counter.add(float(v))
        data = reader.get_metrics_data()
    finally:
        provider.shutdown()
    dp = data.resource_metrics[0].scope_metrics[0].metrics[0].data.data_points[0]
    pos = _trim(dp.positive.offset, dp.positive.bucket_counts)
    neg = _trim(dp.negative.offset, dp.negative.bucket_counts)
    return ExpHistogramPoint(dp.scale, dp.zero_count, *pos, *neg, dp.count, dp.sum, dp.min, dp.max)


@pytest.mark.parametrize("max_size", [2, 7, 160])
def test_matches_opentelemetry_sdk(impl, max_size):
    rng = np.random.default_rng(max_size)
    for trial in range(8):
        d = 3
        x = nasty_values(rng, (int(rng.integers(1, 250)), d), float(rng.choice([0.01, 1.0, 30.0, 300.0])))
        x[:, 0] = np.abs(x[:, 0])  # one column of a Histogram's usual non-negative values
        x[0] = 1.5  # every column has a bucketed value (the SDK reports scale 0 for zeros only)
        if trial % 2:
            with np.errstate(over="ignore"):
                x = x.astype(np.float32)
        s = ExpHistogramState(d, max_size)
        impl.exphist_update(x[: len(x) // 2], s)
        impl.exphist_update(x[len(x) // 2 :], s)
        for c in range(d):
            finite = [float(v) for v in x[:, c] if math.isfinite(v)]
            assert s.buckets(c) == sdk_point(finite, max_size), (trial, c)


def test_matches_opentelemetry_sdk_single_rows(impl):
    rng = np.random.default_rng(21)
    x = np.abs(nasty_values(rng, (300, 2), 12.0))
    x[0] = 3.0
    s = ExpHistogramState(2, 40, max_scale=12)
    for row in x:
        impl.exphist_update_row(row, s)
    for c in range(2):
        finite = [float(v) for v in x[:, c] if math.isfinite(v)]
        assert s.buckets(c) == sdk_point(finite, 40, max_scale=12)


def test_zero_only_column_keeps_its_scale(impl):
    """The one documented difference: the SDK reports scale 0 for a histogram of zeros only; we keep the scale."""
    s = ExpHistogramState(1)
    impl.exphist_update(np.zeros((3, 1)), s)
    sdk = sdk_point([0.0, 0.0, 0.0])
    assert s.buckets(0)._replace(scale=0) == sdk and s.buckets(0).scale == 20


# --------------------------------------------------------------------------
# Semantics


def test_counts_sum_min_max_and_drops(impl):
    s = ExpHistogramState(2)
    x = np.array([[1.0, np.nan], [-2.5, np.inf], [0.0, -np.inf], [-0.0, 4.0]])
    assert impl.exphist_update(x, s) == 3
    p0, p1 = s.buckets(0), s.buckets(1)
    assert (p0.count, p0.zero_count, p0.sum, p0.min, p0.max) == (4, 2, -1.5, -2.5, 1.0)
    assert (p1.count, p1.zero_count, p1.sum, p1.min, p1.max) == (1, 0, 4.0, 4.0, 4.0)
    assert sum(p0.pos_counts) == 1 and sum(p0.neg_counts) == 1


def test_signed_zero_min_max_keep_the_first(impl):
    s = ExpHistogramState(2)
    impl.exphist_update(np.array([[0.0, -0.0], [-0.0, 0.0]]), s)
    assert [math.copysign(1, v) for v in s.min] == [1.0, -1.0]
    assert [math.copysign(1, v) for v in s.max] == [1.0, -1.0]
    assert list(s.zero_count) == [2, 2] and list(s.count) == [2, 2]


def test_sum_is_sequential_in_row_order(impl):
    x = np.array([[1e16], [1.0], [1.0], [-1e16], [1.0]] * 3)
    s = ExpHistogramState(1)
    impl.exphist_update(x, s)
    acc = 0.0
    for v in x[:, 0]:
        acc += float(v)
    assert s.sum[0] == acc


def test_float32_values_are_widened_exactly(impl):
    x32 = np.array([[0.1], [3.4e38], [1e-45], [-7.25]], dtype=np.float32)
    a, b = ExpHistogramState(1), ExpHistogramState(1)
    impl.exphist_update(x32, a)
    impl.exphist_update(x32.astype(np.float64), b)
    assert_same_state(a, b)


def test_empty_batch_and_empty_state(impl):
    s = ExpHistogramState(3)
    assert impl.exphist_update(np.empty((0, 3)), s) == 0
    p = s.buckets(2)
    assert p == ExpHistogramPoint(20, 0, 0, [], 0, [], 0, 0.0, math.inf, -math.inf)
    assert math.isnan(s.quantile(2, 0.5))


def test_downscale_is_minimal(impl):
    s = ExpHistogramState(1, max_size=4)
    impl.exphist_update(np.array([[1.0], [1.0001]]), s)
    assert s.scale[0] == 14  # 1 and 1.0001: buckets -1 and 2 at scale 14, -1 and 4 at 15
    impl.exphist_update(np.array([[16.0]]), s)  # 1..16 is 4 octaves: buckets -1..3 at scale 0, -1..1 at -1
    assert s.scale[0] == -1
    assert s.buckets(0) == sdk_point([1.0, 1.0001, 16.0], 4)
    for values in ([1.0, 1.0001], [1.0, 1.0001, 16.0]):
        scale = -1 if len(values) == 3 else 14
        at = [ref_index(v, scale + 1)[0] for v in values]
        assert max(at) - min(at) >= 4  # one scale up does not fit


def test_state_is_reusable_after_reset(impl):
    rng = np.random.default_rng(2)
    x = nasty_values(rng, (100, 3), 9.0)
    s = ExpHistogramState(3, 10)
    impl.exphist_update(x, s)
    s.reset()
    fresh = ExpHistogramState(3, 10)
    assert_same_state(s, fresh)
    impl.exphist_update(x, s)
    impl.exphist_update(x, fresh)
    assert_same_state(s, fresh)


# --------------------------------------------------------------------------
# Merge, copy, quantiles


def test_merge_equals_recording_everything(impl):
    rng = np.random.default_rng(4)
    for trial in range(10):
        m = int(rng.choice([5, 20, 160]))
        x = np.exp(rng.normal(0, 4, (400, 3))) * rng.choice([-1, 1], (400, 3))
        x[rng.random(x.shape) < 0.05] = 0.0
        cut = int(rng.integers(0, 400))
        a, b, whole = ExpHistogramState(3, m), ExpHistogramState(3, m), ExpHistogramState(3, m)
        impl.exphist_update(x[:cut], a)
        impl.exphist_update(x[cut:], b)
        impl.exphist_update(x, whole)
        b_before = b.copy()
        a.merge(b)
        assert_same_state(b, b_before)
        for c in range(3):
            pa, pw = a.buckets(c), whole.buckets(c)
            assert pa._replace(sum=0.0) == pw._replace(sum=0.0)
            assert pa.sum == pytest.approx(pw.sum, rel=1e-12, abs=1e-300)
        check_invariants(a)


def test_merge_with_empty_and_with_a_wider_state(impl):
    rng = np.random.default_rng(9)
    a = ExpHistogramState(2, 10)
    impl.exphist_update(np.exp(rng.normal(0, 2, (50, 2))), a)
    before = a.copy()
    a.merge(ExpHistogramState(2, 10))
    assert_same_state(a, before)
    wide = ExpHistogramState(2, 160)
    impl.exphist_update(np.exp(rng.normal(0, 20, (500, 2))) * rng.choice([-1, 1], (500, 2)), wide)
    a.merge(wide)
    check_invariants(a)
    assert list(a.count) == [550, 550]
    empty = ExpHistogramState(2, 10)
    empty.merge(before)
    for c in range(2):
        assert empty.buckets(c) == before.buckets(c)


def test_merge_rejects_incompatible_states():
    with pytest.raises(ValueError):
        ExpHistogramState(2).merge(ExpHistogramState(3))
    with pytest.raises(ValueError):
        ExpHistogramState(2).merge(ExpHistogramState(2, zero_threshold=1e-9))
    with pytest.raises(TypeError):
        ExpHistogramState(2).merge("nope")


def test_quantiles_track_numpy(impl):
    rng = np.random.default_rng(12)
    x = np.exp(rng.normal(1.0, 1.5, (20000, 2)))
    x[:, 1] *= rng.choice([-1.0, 1.0], 20000)
    s = ExpHistogramState(2)
    impl.exphist_update(x, s)
    for c in range(2):
        width = 2.0 ** (2.0 ** -int(s.scale[c])) - 1.0  # relative width of one bucket
        for q in (0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99):
            want = float(np.quantile(x[:, c], q))
            assert s.quantile(c, q) == pytest.approx(want, rel=2 * width, abs=0.05)
        assert s.quantile(c, 0.0) == x[:, c].min() and s.quantile(c, 1.0) == x[:, c].max()
    with pytest.raises(ValueError):
        s.quantile(0, 1.5)


def test_quantile_of_few_values_stays_in_range():
    s = ExpHistogramState(1)
    twin.exphist_update(np.array([[5.0]]), s)
    assert s.quantile(0, 0.5) == 5.0
    twin.exphist_update(np.array([[0.0], [-3.0]]), s)
    assert -3.0 <= s.quantile(0, 0.3) <= 5.0


# --------------------------------------------------------------------------
# API, validation, layout


def test_both_modules_expose_the_same_names(native):
    for name in twin.__all__:
        assert hasattr(native, name), name
    assert native.ExpHistogramState is ExpHistogramState
    for name in ("EMPTY_OFFSET", "MIN_SCALE", "MAX_SCALE", "MAX_MAX_SIZE"):
        assert getattr(native, name) == getattr(twin, name)


def test_scale_factors_agree_with_the_c_library(native):
    # the C module computes 2**s/ln 2 at import from log(); Python from math.log: same bits
    for s in range(1, 21):
        v = math.nextafter(2.0 ** (5 / 2**s), 0.0)
        assert indexes_via_kernel(native, [v], s) == indexes_via_kernel(twin, [v], s)


def test_configuration_errors_are_reported_together():
    with pytest.raises(ConfigError) as err:
        ExpHistogramState(0, max_size=1, max_scale=21, zero_threshold=-1.0)
    assert len(err.value.problems) == 4
    with pytest.raises(ConfigError):
        ExpHistogramState(2, zero_threshold=math.nan)
    with pytest.raises(ConfigError):
        ExpHistogramState(True)


def test_state_arrays_are_views_of_one_block():
    s = ExpHistogramState(3, 7)
    arrays = s.arrays()
    assert arrays["pos_counts"].shape == (3, 7) and arrays["scale"].dtype == np.int32
    for a in arrays.values():
        assert np.shares_memory(a, s._block)
    with pytest.raises(AttributeError):
        s.scale = np.zeros(3, np.int32)
    assert "d=3" in repr(s)
    c = s.copy()
    c.count[0] = 5
    assert s.count[0] == 0


def test_pickle_and_copy_keep_the_views_on_the_block(impl):
    import copy
    import pickle

    s = ExpHistogramState(2, 9, max_scale=7, zero_threshold=0.5)
    impl.exphist_update(np.array([[1.0, -2.0], [0.1, 300.0]]), s)
    for t in (pickle.loads(pickle.dumps(s)), copy.deepcopy(s), copy.copy(s), s.copy()):
        assert_same_state(t, s)
        assert (t.max_size, t.max_scale, t.zero_threshold) == (9, 7, 0.5)
        impl.exphist_update(np.array([[5.0, 5.0]]), t)  # the kernel writes the block; the views see it
        assert list(t.count) == [3, 3] and list(s.count) == [2, 2] and t.zero_count[0] == 1
        assert all(np.shares_memory(a, t._block) for a in t.arrays().values())


@pytest.mark.parametrize(
    "values, exc",
    [
        (np.zeros((2, 3), dtype=np.int64), TypeError),
        (np.zeros((2, 3), dtype=np.float16), TypeError),
        (np.zeros((2, 3), dtype=">f8"), TypeError),
        ([[1.0, 2.0, 3.0]], TypeError),
        ("abc", TypeError),
        (None, TypeError),
        (np.zeros(3), ValueError),
        (np.zeros((2, 4)), ValueError),
        (np.zeros((1, 2, 3)), ValueError),
    ],
)
def test_batch_argument_errors(impl, values, exc):
    s = ExpHistogramState(3)
    with pytest.raises(exc):
        impl.exphist_update(values, s)
    assert_same_state(s, ExpHistogramState(3))


@pytest.mark.parametrize(
    "values, exc",
    [
        ([1.0, 2.0], ValueError),
        ([1.0, "2", 3.0], TypeError),
        ([1.0, None, 3.0], TypeError),
        (np.zeros((1, 3)), ValueError),
        (np.zeros(3, dtype=np.int32), TypeError),
        ({1.0, 2.0, 3.0}, TypeError),
    ],
)
def test_row_argument_errors(impl, values, exc):
    s = ExpHistogramState(3)
    with pytest.raises(exc):
        impl.exphist_update_row(values, s)
    assert_same_state(s, ExpHistogramState(3))


def test_state_argument_errors(impl):
    with pytest.raises(TypeError):
        impl.exphist_update(np.zeros((1, 2)), object())
    s = ExpHistogramState(2, 16)
    with pytest.raises(ValueError):
        impl.exphist_update(np.zeros((1, 2)), s, max_size=160)
    assert impl.exphist_update(np.zeros((1, 2)), s, max_size=16) == 0
    s.scale[1] = 21
    with pytest.raises(ValueError):
        impl.exphist_update(np.ones((1, 2)), s)
    with pytest.raises(ValueError):
        impl.exphist_update_row(np.ones(2), s)
    with pytest.raises(TypeError):
        impl.exphist_update_row(np.ones(2))


def test_native_rejects_a_corrupt_block(native):
    s = ExpHistogramState(2)
    s._block[0] = 0
    with pytest.raises(ValueError, match="corrupt"):
        native.exphist_update(np.ones((1, 2)), s)
    s = ExpHistogramState(2)
    s._block[2] = 1  # max_size below 2
    with pytest.raises(ValueError, match="corrupt"):
        native.exphist_update(np.ones((1, 2)), s)
    s = ExpHistogramState(2)
    s._block[3:4].view(np.float64)[0] = -1.0
    with pytest.raises(ValueError, match="corrupt"):
        native.exphist_update_row([1.0, 2.0], s)


def test_native_survives_hand_edited_offsets(native):
    """Nonsense offsets and counts give nonsense histograms, never out-of-bounds writes."""
    rng = np.random.default_rng(13)
    for _ in range(50):
        scale = int(rng.integers(-10, 21))
        s = ExpHistogramState(3, int(rng.choice([2, 5, 160])), max_scale=scale)
        first, last = ref_index(MIN_NORMAL, scale)[0], ref_index(MAX_DOUBLE, scale)[0]
        s.pos_offset[...] = rng.integers(first, last + 1, 3)  # valid buckets, nonsense counts around them
        s.neg_offset[...] = rng.choice([EMPTY_OFFSET, first, last, -(2**31)], 3)
        s.pos_counts[...] = rng.integers(0, 3, s.pos_counts.shape)
        s.neg_counts[...] = rng.integers(0, 2, s.neg_counts.shape)
        x = nasty_values(rng, (50, 3), 30.0)
        try:
            native.exphist_update(x, s)
        except ValueError as exc:
            assert "corrupt" in str(exc)
    s = ExpHistogramState(2, 2, max_scale=-10)
    s.pos_offset[0] = 2  # at scale -10 every double maps to -1 or 0
    for impl in (native, twin):
        with pytest.raises(ValueError, match="corrupt"):
            impl.exphist_update(np.ones((1, 2)), s)


# --------------------------------------------------------------------------
# Kernel selection


def test_implementation_picks_each_family(monkeypatch):
    monkeypatch.delenv(native_pkg.PURE_ENV, raising=False)
    assert native_pkg.implementation(kernel="sketch").__name__ == "stethoscope._sketch"
    assert native_pkg.implementation(kernel="sampling").__name__ == "stethoscope._sketch"
    assert native_pkg.implementation("python", kernel="sampling").__name__ == "stethoscope.native.sampling"
    assert native_pkg.implementation("native", kernel="otlp_rowbinary").__name__ == "stethoscope._native"
    assert native_pkg.native_available("sketch") and native_pkg.native_available()
    monkeypatch.setenv(native_pkg.PURE_ENV, "1")
    assert native_pkg.implementation(kernel="sketch").__name__ == "stethoscope.native.sketch"
    with pytest.raises(ValueError):
        native_pkg.implementation(kernel="nope")
    with pytest.raises(ValueError):
        native_pkg.native_available("nope")


def test_one_warning_per_family_when_the_c_module_is_missing(monkeypatch, caplog):
    monkeypatch.delenv(native_pkg.PURE_ENV, raising=False)
    monkeypatch.setattr(native_pkg, "native_available", lambda kernel="otlp_rowbinary": False)
    monkeypatch.setattr(native_pkg, "_warned", False)
    monkeypatch.setattr(native_pkg, "_warned_kernels", set())
    with caplog.at_level("WARNING", logger="stethoscope.native"):
        for _ in range(3):
            assert native_pkg.implementation(kernel="sketch").__name__ == "stethoscope.native.sketch"
            assert native_pkg.implementation(kernel="sampling").__name__ == "stethoscope.native.sampling"
            assert native_pkg.implementation().__name__ == "stethoscope.native.otlp_rowbinary"
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3
    assert all("C compiler" in m for m in messages)
    assert sum("stethoscope._sketch" in m for m in messages) == 2


def test_block_layout_is_what_the_c_module_expects():
    s = ExpHistogramState(2, 3, zero_threshold=0.25)
    header = s._block[:4].tobytes()
    magic, d, m = struct.unpack("<3Q", header[:24])
    assert (magic, d, m) == (0x5354484558504831, 2, 3)
    assert struct.unpack("<d", header[24:])[0] == 0.25
    fields, nbytes = twin._layout(2, 3)
    assert nbytes == s._block.nbytes == 32 + 8 * (5 * 2 + 2 * 2 * 3) + 12 * 2


# --------------------------------------------------------------------------
# record_row: one prediction in one call (ModelMonitor.record's hot path)


class _Num:
    """Not a float, but float() takes it (as NumPy scalars and Decimal are taken)."""

    def __float__(self) -> float:
        return 2.5


def _edge_rows(rng: np.random.Generator, d: int, n: int) -> list[tuple]:
    """Rows of every shape and type record() may meet, with edge values, as record_row arguments."""
    values = [0.0, -0.0, -1.5, 5e-324, -2.5e-320, MIN_NORMAL, MAX_DOUBLE, -MAX_DOUBLE, 1e-300, np.nan, np.inf,
              -np.inf, 3.0, 1024.0, np.nextafter(1024.0, 0.0), True, 7, -3, 10**400, np.float32(2.5),
              np.float64(-4.0), np.int64(9), _Num()]
    bad_items = ["x", None, b"1", [1.0], {"a": 1}, 1j]
    rows = []
    for i in range(n):
        f: object = [values[j] for j in rng.integers(0, len(values), d)]
        kind = i % 10
        if kind == 1:
            f = nasty_values(rng, d, 30.0)
        elif kind == 2:
            with np.errstate(over="ignore"):
                f = nasty_values(rng, d, 30.0).astype(np.float32)
        elif kind == 3:
            f = tuple(f)  # type: ignore[arg-type]
        elif kind == 4:
            f = nasty_values(rng, 2 * d, 30.0)[::2]  # strided
        elif kind == 5:
            f = list(f)[: rng.integers(0, d)] if i % 20 == 5 else list(f) + [1.0]  # wrong length
        elif kind == 6 and i % 3 == 0:
            f = list(f)  # type: ignore[arg-type]
            f[rng.integers(0, d)] = bad_items[i % len(bad_items)]
        elif kind == 7:
            f = [np.ones((d, 1)), np.arange(d), np.ones(d, dtype=">f8"), np.ones(()), (x for x in range(d)),
                 "abc", None][i % 7]
        pred = [0.3, "cat", np.nan, object(), -2.0, np.float32(1e9), np.inf, True, [1], _Num()][i % 10]
        conf = [None, 0.2, 0.95, 1.5, np.nan, "x", -0.1, 1, np.float32(0.5)][i % 9]
        lat = [None, 0.5, 3.0, 10.0, 11.0, -1.0, np.inf, np.nan, 7, "slow"][i % 10]
        rid = [None, f"req-{i}", "4bf92f3577b34da6a3ce929d0e0e4736", i, "\udc80", "é" * 200][i % 6]
        p = [1.0, 0.3, 0.01, 2.0**-56][i % 4]
        u = [None, None, 0.9, 0.1, 2.0][i % 5]
        rows.append((f, pred, conf, lat, rid, p, twin._threshold_of(p), u))
    return rows


def _run_rows(mod, rows, d, max_size=160, bounds=(1.0, 5.0, 10.0)):
    st, outs = ExpHistogramState(d, max_size=max_size), ExpHistogramState(2, max_size=max_size)
    stats = twin.RowStats(bounds, min_uncertainty=0.5, boost1=3.0, seed=42)
    codes = []
    for f, pred, conf, lat, rid, p, t, u in rows:
        codes.append(mod.record_row(f, st, pred, conf, lat, rid, outs, stats.block, p, t, u))
    return codes, st, outs, stats


@pytest.mark.parametrize("max_size", [2, 5, 160])
def test_record_row_twins_agree_on_edge_rows(max_size):
    rows = _edge_rows(np.random.default_rng(max_size), 6, 600)
    codes_c, st_c, outs_c, stats_c = _run_rows(_native(), rows, 6, max_size)
    rows = _edge_rows(np.random.default_rng(max_size), 6, 600)  # fresh generators for the twin
    codes_p, st_p, outs_p, stats_p = _run_rows(twin, rows, 6, max_size)
    assert codes_c == codes_p
    assert_same_state(st_c, st_p)
    assert_same_state(outs_c, outs_p)
    assert stats_c.block.tobytes() == stats_p.block.tobytes()
    # every outcome was exercised
    kinds = set(codes_c)
    for code in (twin.ROW_SLOW, twin.ROW_WRONG_TYPE, twin.ROW_WRONG_SHAPE):
        assert code in kinds
    seen = 0
    for code in kinds:
        if code >= 0:
            seen |= code
    for bit in (twin.ROW_KEPT, twin.ROW_BOOSTED, twin.ROW_BAD_PREDICTION, twin.ROW_BAD_CONFIDENCE,
                twin.ROW_BAD_LATENCY, twin.ROW_LABEL, twin.ROW_NONFINITE_UNIT):
        assert seen & bit, bit
    check_invariants(st_c)


def test_record_row_keeps_the_batched_kernels_histograms(impl):
    """Row by row through record_row == the whole batch through exphist_update (finite values)."""
    rng = np.random.default_rng(5)
    x = nasty_values(rng, (300, 8), 25.0)
    for max_size in (3, 160):
        st, outs, stats = ExpHistogramState(8, max_size), ExpHistogramState(2, max_size), twin.RowStats()
        dropped = 0
        for row in x:
            code = impl.record_row(row, st, 0.5, None, None, None, outs, stats.block, 1.0, 0)
            assert code >= 0
            dropped += code // impl.ROW_NONFINITE_UNIT
        want = ExpHistogramState(8, max_size)
        assert impl.exphist_update(x, want) == dropped
        assert_same_state(st, want)
        check_invariants(st)


def test_record_row_refusals_touch_nothing(impl):
    st, outs, stats = ExpHistogramState(3), ExpHistogramState(2), twin.RowStats([1.0])
    before = (st._block.copy(), outs._block.copy(), stats.block.copy())
    cases = [
        (np.arange(3), 0.5, impl.ROW_SLOW),  # int array: the caller converts it
        ((x for x in (1.0, 2.0, 3.0)), 0.5, impl.ROW_SLOW),
        ("abc", 0.5, impl.ROW_SLOW),
        ([1.0, "2", 3.0], 0.5, impl.ROW_WRONG_TYPE),
        ([1.0, None, 3.0], 0.5, impl.ROW_WRONG_TYPE),
        ([1.0, 2.0, 3.0], object(), impl.ROW_WRONG_TYPE),
        ([1.0, 2.0, 3.0], b"cat", impl.ROW_WRONG_TYPE),
        ([1.0, 2.0], 0.5, impl.ROW_WRONG_SHAPE),
        (np.ones(4), 0.5, impl.ROW_WRONG_SHAPE),
        (np.ones((3, 1)), 0.5, impl.ROW_WRONG_SHAPE),
        (np.ones((1, 3)), 0.5, impl.ROW_WRONG_SHAPE),
    ]
    for features, pred, want in cases:
        assert impl.record_row(features, st, pred, 0.5, 1.0, "r", outs, stats.block, 1.0, 0) == want, features
    assert (st._block.tobytes(), outs._block.tobytes(), stats.block.tobytes()) == tuple(b.tobytes() for b in before)


def test_record_row_counts_outputs_latency_and_signal(impl):
    st, outs, stats = ExpHistogramState(2), ExpHistogramState(2), twin.RowStats([1.0, 10.0], seed=3)
    rr = impl.record_row
    assert rr([1.0, np.nan], st, 0.25, 0.5, 1.0, None, outs, stats.block, 1.0, 0) == 1 + 64
    assert rr([1.0, 2.0], st, "cat", 0.75, 10.5, None, outs, stats.block, 1.0, 0) == 1 + impl.ROW_LABEL
    assert rr([1.0, 2.0], st, np.inf, 2.0, -1.0, None, outs, stats.block, 1.0, 0) == (
        1 + impl.ROW_BAD_PREDICTION + impl.ROW_BAD_CONFIDENCE + impl.ROW_BAD_LATENCY)
    assert rr((3, True), st, 0.75, None, 0.0, None, outs, stats.block, 1.0, 0) == 1
    assert st.count.tolist() == [4, 3] and st.sum.tolist() == [6.0, 5.0]
    # outputs: column 0 the finite predictions, column 1 the valid confidences
    assert outs.count.tolist() == [2, 2] and outs.sum.tolist() == [1.0, 1.25]
    t = stats.take()
    assert (t.requests, t.events, t.kept, t.expected) == (4, 4, 4, 4.0)
    # upper-inclusive explicit buckets: 1.0 -> (-inf, 1], 10.5 -> (10, inf), 0.0 -> (-inf, 1]
    assert (t.lat_n, t.lat_sum, t.lat_min, t.lat_max, t.lat_counts.tolist()) == (3, 11.5, 0.0, 10.5, [2, 0, 1])
    # signal: predictions 0.25, 0.75 and the confidence 0.75 of the labelled row
    vals = np.array([0.25, 0.75, 0.75])
    assert t.sig_n == 3 and t.sig_mean == pytest.approx(vals.mean())
    assert t.sig_m2 == pytest.approx(((vals - vals.mean()) ** 2).sum())
    assert stats.take().requests == 0  # take restarts the counters


def test_record_row_samples_by_request_id_and_boosts_the_uncertain(impl):
    from stethoscope.native import sampling

    ids = [f"request-{i}" for i in range(2000)]
    r = sampling.randomness_from_ids(ids)
    p = 0.1
    t = twin._threshold_of(p)
    st, outs = ExpHistogramState(1), ExpHistogramState(2)
    stats = twin.RowStats(min_uncertainty=0.8, boost1=4.0)
    kept = []
    for rid, conf in zip(ids, np.linspace(0.0, 1.0, len(ids))):
        code = impl.record_row([1.0], st, 0.5, float(conf), None, rid, outs, stats.block, p, t)
        u = 1.0 - float(conf)
        boosted = u >= 0.8
        assert bool(code & impl.ROW_BOOSTED) == boosted
        t_eff = twin._threshold_of(min(1.0, p * (1.0 + 4.0 * u))) if boosted else t
        assert bool(code & impl.ROW_KEPT) == (int(r[len(kept)]) >= t_eff)
        kept.append(bool(code & impl.ROW_KEPT))
    # the same ids give the same decisions on every call (consistent sampling)
    again = [bool(impl.record_row([1.0], st, 0.5, 0.5, None, rid, outs, stats.block, p, t) & 1) for rid in ids[:200]]
    assert again == [int(x) >= t for x in r[:200]]
    # non-str ids are sampled by their str()
    code = impl.record_row([1.0], st, 0.5, None, None, 12345, outs, stats.block, 0.5, twin._threshold_of(0.5))
    assert bool(code & 1) == (int(sampling.randomness_from_ids(["12345"])[0]) >= twin._threshold_of(0.5))


def test_record_row_without_ids_draws_the_same_generator():
    """Rows without a request id: both kernels draw the same splitmix64 sequence from the stats block."""
    out = []
    for mod in (_native(), twin):
        st, outs, stats = ExpHistogramState(1), ExpHistogramState(2), twin.RowStats(seed=123)
        t = twin._threshold_of(0.5)
        out.append([mod.record_row([1.0], st, 0.5, None, None, None, outs, stats.block, 0.5, t) for _ in range(500)])
    assert out[0] == out[1]
    assert 200 < sum(out[0]) < 300  # about half kept


def test_record_row_argument_errors(impl):
    st, outs, stats = ExpHistogramState(2), ExpHistogramState(2), twin.RowStats()
    with pytest.raises(TypeError, match="ExpHistogramState"):
        impl.record_row([1.0, 2.0], object(), 0.5, None, None, None, outs, stats.block, 1.0, 0)
    with pytest.raises(ValueError, match="columns"):
        impl.record_row([1.0, 2.0], st, 0.5, None, None, None, ExpHistogramState(3), stats.block, 1.0, 0)
    with pytest.raises(ValueError, match="RowStats"):
        impl.record_row([1.0, 2.0], st, 0.5, None, None, None, outs, np.zeros(20, np.uint64), 1.0, 0)
    with pytest.raises(ValueError, match="threshold"):
        impl.record_row([1.0, 2.0], st, 0.5, None, None, None, outs, stats.block, 1.0, 2**56)
    with pytest.raises(ConfigError):
        twin.RowStats([2.0, 1.0], min_uncertainty=-1)
