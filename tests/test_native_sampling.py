"""Consistent probability sampling: the C kernels in ``stethoscope._sketch`` against their twin and the spec.

Tests parametrised over ``impl`` run against both; the native module is part
of the build, so its absence fails the run rather than skipping it.
"""

from __future__ import annotations

import hashlib
import math
import random
import uuid
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stethoscope.native import sampling as twin

try:
    from stethoscope import _sketch as _native_mod

    _NATIVE_ERROR: ImportError | None = None
except ImportError as exc:  # reported by the fixtures, not skipped
    _native_mod = None
    _NATIVE_ERROR = exc

MAX = 1 << 56


def _native():
    if _native_mod is None:
        pytest.fail(f"stethoscope._sketch is not importable (it is part of the build): {_NATIVE_ERROR}")
    return _native_mod


@pytest.fixture
def native():
    return _native()


@pytest.fixture(params=["native", "python"])
def impl(request):
    return _native() if request.param == "native" else twin


# The spec's table (tracestate-probability-sampling.md, "Converting floating-point
# probability to threshold value"): 1-in-N, th at precision 3, 4, 5, adjusted counts.
SPEC_TABLE = [
    (1, ["0", "0", "0"], [1, 1, 1]),
    (2, ["8", "8", "8"], [2, 2, 2]),
    (3, ["aab", "aaab", "aaaab"], [3.0007326007326007, 3.00004577706569, 3.0000028610256777]),
    (4, ["c", "c", "c"], [4, 4, 4]),
    (5, ["ccd", "cccd", "ccccd"], [5.001221001221001, 5.0000762951094835, 5.0000047683761295]),
    (8, ["e", "e", "e"], [8, 8, 8]),
    (10, ["e66", "e666", "e6666"], [9.990243902439024, 9.99938968568813, 9.999961853172863]),
    (16, ["f", "f", "f"], [16, 16, 16]),
    (100, ["fd71", "fd70a", "fd70a4"], [100.05496183206107, 99.99771123402633, 100.00009536752259]),
    (1000, ["ffbe7", "ffbe77", "ffbe76d"], [999.5958055290753, 1000.012874769029, 1000.0016987352618]),
    (10000, ["fff972", "fff9724", "fff97247"], [9998.340882002383, 9999.830725674266, 9999.99370426336]),
    (100000, ["ffff584", "ffff583a", "ffff583a5"], [100013.21013412817, 99999.238556461, 99999.96614643588]),
    (1000000, ["ffffef4", "ffffef39", "ffffef391"], [1.0016248358208955e06, 999992.38556461, 1.0000069374699865e06]),
]


@pytest.mark.parametrize("n, ths, counts", SPEC_TABLE)
def test_spec_table(impl, n, ths, counts):
    p = 1.0 / n if n not in (100000, 1000000) else {100000: 0.00001, 1000000: 0.000001}[n]
    for precision, th, count in zip((3, 4, 5), ths, counts):
        t = impl.threshold_for(p, precision=precision)
        assert impl.threshold_hex(t) == th
        assert impl.parse_threshold_hex(th) == t
        assert impl.adjusted_count(t) == pytest.approx(count, rel=1e-15)


def test_spec_worked_example(impl):
    # "1% ... with 5 digits of precision would be ... 0xfd70a400000000", th "fd70a4"
    t = impl.threshold_for(0.01, precision=5)
    assert t == 0xFD70A400000000 == 71337018784743424
    assert impl.threshold_hex(t) == "fd70a4"
    # full precision: T = round((1 - p) * 2**56)
    assert impl.threshold_hex(impl.threshold_for(0.01)) == "fd70a3d70a3d71"


def test_full_precision_is_exact_rounding(impl):
    rng = random.Random(7)
    ps = [rng.random() for _ in range(2000)] + [2.0**-k for k in range(57)] + [1 / 3, 0.1, 0.7, 1 - 2**-53]
    ps += [rng.uniform(2.0**-56, 2.0**-40) for _ in range(200)]
    for p in ps:
        if p < 2.0**-56:
            continue
        assert impl.threshold_for(p) == round((1 - Fraction(p)) * MAX), p


def test_extremes(impl):
    assert impl.threshold_for(1.0) == 0 and impl.threshold_for(1) == 0
    assert impl.threshold_hex(0) == "0" and impl.parse_threshold_hex("0") == 0
    assert impl.adjusted_count(0) == 1.0
    assert impl.threshold_for(0.5) == 1 << 55 and impl.threshold_hex(1 << 55) == "8"
    tiny = impl.threshold_for(2.0**-56)
    assert tiny == MAX - 1 and impl.threshold_hex(tiny) == "ffffffffffffff"
    assert impl.adjusted_count(tiny) == float(MAX)
    assert impl.threshold_for(2.0**-56, precision=4) < MAX
    assert impl.threshold_for(1.0, precision=4) == 0
    for bad in (0.0, -0.5, 2.0**-57, 1.0000001, math.nan, math.inf):
        with pytest.raises(ValueError):
            impl.threshold_for(bad)
    for bad in (0, 14, -1):
        with pytest.raises(ValueError):
            impl.threshold_for(0.5, precision=bad)
    with pytest.raises(TypeError):
        impl.threshold_for("0.5")
    with pytest.raises(TypeError):
        impl.threshold_for(0.5, precision=4.0)


def test_threshold_hex_round_trip(impl):
    rng = random.Random(3)
    for _ in range(2000):
        t = rng.randrange(MAX) >> (4 * rng.randrange(14))
        th = impl.threshold_hex(t)
        assert 1 <= len(th) <= 14 and (th == "0" or not th.endswith("0"))
        assert impl.parse_threshold_hex(th) == t
    for bad in ("", "fffffffffffffff", "FD70A4", "0x8", " 8", "8 ", "g", "-1", "8_0"):
        with pytest.raises(ValueError):
            impl.parse_threshold_hex(bad)
    with pytest.raises(TypeError):
        impl.parse_threshold_hex(b"8")
    for bad in (-1, MAX):
        for fn in (impl.threshold_hex, impl.adjusted_count):
            with pytest.raises(ValueError):
                fn(bad)
    with pytest.raises(TypeError):
        impl.threshold_hex(1.5)


def test_sample_mask(impl):
    t = impl.threshold_for(0.25)
    r = np.array([0, t - 1, t, t + 1, MAX - 1, 2**64 - 1], dtype=np.uint64)
    assert impl.sample_mask(r, t).tolist() == [False, False, True, True, True, True]
    assert impl.sample_mask(r, 0).all()  # th:0 keeps everything
    assert impl.sample_mask(r[::2], t).tolist() == [False, True, True]
    out = impl.sample_mask(np.empty(0, np.uint64), t)
    assert out.dtype == np.bool_ and out.shape == (0,)
    with pytest.raises(TypeError):
        impl.sample_mask(np.zeros(3, np.int64), t)
    with pytest.raises(TypeError):
        impl.sample_mask([1, 2, 3], t)
    with pytest.raises(ValueError):
        impl.sample_mask(np.zeros((2, 2), np.uint64), t)
    with pytest.raises(ValueError):
        impl.sample_mask(r, MAX)


def test_trace_ids_use_their_last_seven_bytes(impl):
    tid = "4bf92f3577b34da6a3ce929d0e0e4736"
    r = impl.randomness_from_ids([tid, tid.upper(), tid.encode(), bytearray(tid.encode())])
    assert r.dtype == np.uint64 and r.tolist() == [0xCE929D0E0E4736] * 4
    u = uuid.UUID(int=random.Random(1).getrandbits(128))
    assert impl.randomness_from_ids([u.hex]).tolist() == [u.int & (MAX - 1)]


def _expected_hash(b: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(b, digest_size=8).digest()[1:], "big")


def test_other_ids_are_hashed_with_blake2b(impl):
    rng = random.Random(5)
    ids: list[bytes | str] = [b"", b"a", "request-1", "é-ünïcode-✓", "4bf92f3577b34da6a3ce929d0e0e473", "x" * 32]
    ids += ["4bf92f3577b34da6a3ce929d0e0e473g", "4bf92f3577b34da6a3ce929d0e0e47360"]
    ids += [bytes(rng.randrange(256) for _ in range(n)) for n in list(range(0, 300)) + [1000, 4096]]
    want = [_expected_hash(x.encode() if isinstance(x, str) else x) for x in ids]
    assert impl.randomness_from_ids(ids).tolist() == want
    assert impl.randomness_from_ids(iter(["request-1"])).tolist() == [want[2]]
    assert impl.randomness_from_ids(np.array(["request-1"])).tolist() == [want[2]]
    assert impl.randomness_from_ids([]).shape == (0,)


def test_id_errors(impl):
    for bad in ([1], [None], ["ok", 3.5], [memoryview(b"x")]):
        with pytest.raises(TypeError):
            impl.randomness_from_ids(bad)
    for bad in ("abc", b"abc", 5):
        with pytest.raises(TypeError):
            impl.randomness_from_ids(bad)
    # a lone surrogate is not refused: it is hashed as its "surrogatepass" UTF-8
    want = _expected_hash("a\ud800".encode("utf-8", "surrogatepass"))
    assert impl.randomness_from_ids(["a\ud800"]).tolist() == [want]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.text(max_size=40),
            st.text(st.characters(codec="utf-16", categories=["Cs", "Ll"]), max_size=5),
            st.binary(max_size=300),
            st.from_regex(r"[0-9a-fA-F]{32}", fullmatch=True),
        )
    )
)
def test_property_native_matches_twin(ids):
    r = _native().randomness_from_ids(ids)
    assert r.tolist() == twin.randomness_from_ids(ids).tolist()
    assert (r < MAX).all()


@settings(max_examples=300, deadline=None)
@given(p=st.floats(2.0**-56, 1.0), precision=st.one_of(st.none(), st.integers(1, 13)), r=st.integers(0, MAX - 1))
def test_property_threshold_functions_match(p, precision, r):
    n = _native()
    t = n.threshold_for(p, precision=precision)
    assert t == twin.threshold_for(p, precision=precision)
    assert 0 <= t < MAX
    assert n.threshold_hex(t) == twin.threshold_hex(t)
    assert n.adjusted_count(t) == twin.adjusted_count(t)
    arr = np.array([r, t], dtype=np.uint64)
    assert n.sample_mask(arr, t).tolist() == twin.sample_mask(arr, t).tolist() == [r >= t, True]


# --------------------------------------------------------------------------
# Statistics and consistency


@pytest.mark.parametrize("kind", ["hashed", "trace"])
def test_kept_fraction_over_a_million_ids(native, kind):
    rng = random.Random(2024)
    n = 1_000_000
    if kind == "hashed":
        ids = [f"req-{rng.getrandbits(40):x}-{i}" for i in range(n)]
    else:
        ids = [f"{rng.getrandbits(128):032x}" for _ in range(n)]
    r = native.randomness_from_ids(ids)
    assert np.array_equal(r, twin.randomness_from_ids(ids))
    for p in (0.5, 0.1, 0.01):
        kept = float(native.sample_mask(r, native.threshold_for(p)).mean())
        assert abs(kept - p) < 0.003
        assert abs(kept - p) < 5 * math.sqrt(p * (1 - p) / n)


def test_twin_kept_fraction(impl):
    ids = [f"user-{i}" for i in range(200_000)]
    r = impl.randomness_from_ids(ids)
    for p in (0.5, 0.1, 0.01):
        kept = float(impl.sample_mask(r, impl.threshold_for(p)).mean())
        assert abs(kept - p) < 5 * math.sqrt(p * (1 - p) / len(ids))


def test_decisions_are_consistent_across_probabilities(impl):
    r = impl.randomness_from_ids([f"span-{i}" for i in range(20000)])
    masks = [impl.sample_mask(r, impl.threshold_for(p)) for p in (0.001, 0.01, 0.1, 0.5, 1.0)]
    for low, high in zip(masks, masks[1:]):
        assert not (low & ~high).any()  # kept at p1 => kept at every p2 >= p1
    assert masks[-1].all()


def test_adjusted_counts_estimate_the_population(impl):
    r = impl.randomness_from_ids([f"event-{i}" for i in range(100_000)])
    for p in (0.3, 0.05):
        t = impl.threshold_for(p, precision=4)
        estimate = impl.sample_mask(r, t).sum() * impl.adjusted_count(t)
        assert estimate == pytest.approx(100_000, rel=0.05)


def test_both_modules_expose_the_same_names(native):
    for name in twin.__all__:
        assert hasattr(native, name), name
    assert native.MAX_THRESHOLD == twin.MAX_THRESHOLD == MAX
