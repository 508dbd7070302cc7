"""Per-feature exponential histograms: the NumPy twin of ``sketch.c``.

A model server records each request's feature vector into one OpenTelemetry
base-2 exponential histogram per feature. :class:`ExpHistogramState` holds the
histograms of ``d`` features; :func:`exphist_update` records a batch (an
``n x d`` float64 or float32 array) and :func:`exphist_update_row` a single
row. The C kernel ``stethoscope._sketch`` has the same functions and leaves
every state array bit-for-bit identical; pick one with
``stethoscope.native.implementation(kernel="sketch")``.

Rules, shared with the C kernel (they follow the OpenTelemetry data model and
the Python SDK's ``ExponentialBucketHistogramAggregation``):

* Buckets are upper-inclusive: at scale ``s`` (base ``2**2**-s``) bucket ``i``
  holds ``base**i < |v| <= base**(i+1)``. For ``s <= 0`` the index comes from
  the IEEE exponent (exact); for ``s > 0`` it is ``floor(log(|v|) * 2**s / ln 2)``
  with the C library's ``log``, except that exact powers of two are computed
  exactly. Subnormal magnitudes count as ``2**-1022`` (the spec permits this
  rounding; the SDK does the same).
* ``|v| <= zero_threshold`` (default 0) counts in ``zero_count``; negative
  values go to the negative range by magnitude. NaN and infinities are dropped
  and counted in the return value; they touch nothing else.
* Values are taken in row order per column. A new scale starts at
  ``max_scale``. When a value's bucket would make its range span more than
  ``max_size`` buckets, the scale drops by the least amount that fits (buckets
  merge pairwise per step: index ``i`` becomes ``i >> change``, both ranges
  together) and the value is mapped again at the new scale: exactly the SDK's
  sequence of steps, so both agree bucket for bucket.
* ``count``, ``sum`` (added in row order), ``min`` and ``max`` cover every
  finite value; ``min``/``max`` keep the first of equal values (``0.0`` and ``-0.0``).

Where this differs from the SDK (nowhere the tests could find otherwise):

* A histogram holding only zeros reports its current scale; the SDK reports 0.
* After lowering the scale, the value is mapped again and, should it still not
  fit (possible only a few ulps below a power of two when the scale crosses
  from 1 to 0 or below, where the logarithm and the exponent methods can
  disagree by one bucket), the scale drops again; the SDK would write the
  bucket without checking.
* Near bucket boundaries the logarithm method (``scale > 0``) can be one
  bucket off the exact answer, as the spec allows ("MAY use an inexact
  mapping"); powers of two are always exact. We keep the SDK's formula so
  that both agree bucket for bucket.

State layout (one block, exported to C through the buffer protocol):
``pos_counts[c, k]`` is the count of bucket ``i`` where ``k == i % max_size``
(a circular window), and ``pos_offset[c]`` is the smallest index holding a
count, or :data:`EMPTY_OFFSET` when the range has none; every index with a
count lies in ``[offset, offset + max_size)``. The layout depends only on what
was recorded, never on the order of window moves. Same for ``neg_*``.

Examples
--------
>>> import numpy as np
>>> st = ExpHistogramState(2, max_size=4)
>>> exphist_update(np.array([[1.0, 0.0], [2.0, -3.0], [4.0, np.nan]]), st)
1
>>> p = st.buckets(0)
>>> p.scale, p.pos_offset, p.pos_counts, p.count, p.sum, p.min, p.max
(0, -1, [1, 1, 1], 3, 7.0, 1.0, 4.0)
>>> st.buckets(1)[:6]
(20, 1, 0, [], 1661953, [1])
"""

from __future__ import annotations

import math
import operator
import os
from typing import NamedTuple

import numpy as np

from stethoscope.errors import ConfigError

__all__ = [
    "EMPTY_OFFSET",
    "MAX_MAX_SIZE",
    "MAX_SCALE",
    "MIN_SCALE",
    "ExpHistogramPoint",
    "ExpHistogramState",
    "exphist_update",
    "exphist_update_row",
    "record_row",
    "RowStats",
    "RowTotals",
    "ROW_SLOW",
    "ROW_WRONG_TYPE",
    "ROW_WRONG_SHAPE",
    "ROW_KEPT",
    "ROW_BOOSTED",
    "ROW_BAD_PREDICTION",
    "ROW_BAD_CONFIDENCE",
    "ROW_BAD_LATENCY",
    "ROW_LABEL",
    "ROW_NONFINITE_UNIT",
]

#: Offset of a range that holds no counts.
EMPTY_OFFSET = 2**31 - 1
#: Smallest scale: at -10 every double maps to bucket -1 or 0.
MIN_SCALE = -10
#: Largest scale: bucket indexes still fit in 32 bits.
MAX_SCALE = 20
#: Largest ``max_size`` (the SDK's limit).
MAX_MAX_SIZE = 16384

_MAGIC = 0x5354_4845_5850_4831
_HEADER = 32
_BIG = 1 << 40
_MANT = np.uint64((1 << 52) - 1)
#: 2**s / ln 2 for s in 0..20, computed as the C module and the SDK compute it.
_SCALE_FACTOR = np.array([math.ldexp(1.0 / math.log(2.0), s) for s in range(MAX_SCALE + 1)])
#: np.log may differ from the C library's log by an ulp: recheck results this close to an integer.
_TOL = 2.0**-40


class ExpHistogramPoint(NamedTuple):
    """One column as OTLP wants it: bucket runs trimmed of zeros at both ends."""

    scale: int
    zero_count: int
    pos_offset: int
    pos_counts: list[int]
    neg_offset: int
    neg_counts: list[int]
    count: int
    sum: float
    min: float
    max: float


def _layout(d: int, m: int) -> tuple[list[tuple[str, np.dtype, tuple[int, ...], int]], int]:
    fields = [
        ("sum", np.float64, (d,)),
        ("min", np.float64, (d,)),
        ("max", np.float64, (d,)),
        ("count", np.uint64, (d,)),
        ("zero_count", np.uint64, (d,)),
        ("pos_counts", np.uint64, (d, m)),
        ("neg_counts", np.uint64, (d, m)),
        ("scale", np.int32, (d,)),
        ("pos_offset", np.int32, (d,)),
        ("neg_offset", np.int32, (d,)),
    ]
    out, pos = [], _HEADER
    for name, dtype, shape in fields:
        out.append((name, np.dtype(dtype), shape, pos))
        pos += np.dtype(dtype).itemsize * math.prod(shape)
    return out, -(-pos // 8) * 8


class ExpHistogramState:
    """Exponential histograms of ``d`` features, one per column.

    Configuration (``d``, ``max_size``, ``max_scale``, ``zero_threshold``) is
    fixed at construction and checked all at once (:class:`~stethoscope.errors.ConfigError`).
    The arrays are NumPy views of one block that the kernels update in place:
    ``scale`` int32[d], ``count`` / ``zero_count`` uint64[d], ``sum`` / ``min`` /
    ``max`` float64[d], ``pos_offset`` / ``neg_offset`` int32[d] and
    ``pos_counts`` / ``neg_counts`` uint64[d, max_size] (layout in the module docstring).

    Examples
    --------
    >>> import numpy as np
    >>> a, b = ExpHistogramState(1), ExpHistogramState(1)
    >>> exphist_update(np.array([[1.5], [3.0]]), a)
    0
    >>> exphist_update(np.array([[-2.0], [1e6]]), b)
    0
    >>> a.merge(b)
    >>> p = a.buckets(0)
    >>> p.count, p.min, p.max, p.scale
    (4, -2.0, 1000000.0, 3)
    >>> sum(p.pos_counts), p.neg_counts
    (3, [1])
    >>> round(a.quantile(0, 0.5), 2)
    2.22
    """

    __slots__ = ("_d", "_max_size", "_max_scale", "_zero_threshold", "_block", "_views")

    def __init__(self, d: int, max_size: int = 160, max_scale: int = MAX_SCALE, zero_threshold: float = 0.0) -> None:
        problems = []
        nd, nm, ns = _int(d, 1, None), _int(max_size, 2, MAX_MAX_SIZE), _int(max_scale, MIN_SCALE, MAX_SCALE)
        if nd is None:
            problems.append(f"d: must be a positive int, got {d!r}")
        if nm is None:
            problems.append(f"max_size: must be an int in [2, {MAX_MAX_SIZE}], got {max_size!r}")
        if ns is None:
            problems.append(f"max_scale: must be an int in [{MIN_SCALE}, {MAX_SCALE}], got {max_scale!r}")
        try:
            zt = float(zero_threshold)
        except (TypeError, ValueError):
            zt = math.nan
        if not (math.isfinite(zt) and zt >= 0.0):
            problems.append(f"zero_threshold: must be a finite number >= 0, got {zero_threshold!r}")
        if problems or nd is None or nm is None or ns is None:
            raise ConfigError(problems)
        d, max_size = nd, nm
        self._d, self._max_size, self._max_scale, self._zero_threshold = nd, nm, ns, zt
        fields, nbytes = _layout(d, max_size)
        self._block = np.zeros(nbytes // 8, dtype=np.uint64)
        self._block[:3] = (_MAGIC, d, max_size)
        self._block[3:4].view(np.float64)[0] = zt
        self._views = {
            name: np.ndarray(shape, dtype=dtype, buffer=self._block, offset=off) for name, dtype, shape, off in fields
        }
        self.reset()

    # configuration ---------------------------------------------------------
    @property
    def d(self) -> int:
        """Number of features (columns)."""
        return self._d

    @property
    def max_size(self) -> int:
        """Most buckets per range (positive or negative)."""
        return self._max_size

    @property
    def max_scale(self) -> int:
        """Scale a fresh histogram starts at."""
        return self._max_scale

    @property
    def zero_threshold(self) -> float:
        """Magnitudes up to this count as zero."""
        return self._zero_threshold

    # arrays (views of the block; the attributes themselves are read-only) ---
    scale = property(lambda self: self._views["scale"], doc="int32[d]: each column's scale.")
    count = property(lambda self: self._views["count"], doc="uint64[d]: finite values recorded.")
    zero_count = property(lambda self: self._views["zero_count"], doc="uint64[d]: values counted as zero.")
    sum = property(lambda self: self._views["sum"], doc="float64[d]: sum of finite values, in order.")
    min = property(lambda self: self._views["min"], doc="float64[d]: smallest value (+inf when none).")
    max = property(lambda self: self._views["max"], doc="float64[d]: largest value (-inf when none).")
    pos_offset = property(lambda self: self._views["pos_offset"], doc="int32[d]: lowest positive bucket index.")
    pos_counts = property(lambda self: self._views["pos_counts"], doc="uint64[d, max_size]: positive buckets.")
    neg_offset = property(lambda self: self._views["neg_offset"], doc="int32[d]: lowest negative bucket index.")
    neg_counts = property(lambda self: self._views["neg_counts"], doc="uint64[d, max_size]: negative buckets.")

    def arrays(self) -> dict[str, np.ndarray]:
        """Every state array by name (views, not copies)."""
        return dict(self._views)

    def reset(self) -> None:
        """Forget everything recorded (the configuration stays)."""
        v = self._views
        for name in ("sum", "count", "zero_count", "pos_counts", "neg_counts"):
            v[name][...] = 0
        v["min"][...] = math.inf
        v["max"][...] = -math.inf
        v["scale"][...] = self._max_scale
        v["pos_offset"][...] = EMPTY_OFFSET
        v["neg_offset"][...] = EMPTY_OFFSET

    def copy(self) -> ExpHistogramState:
        """An independent state with the same configuration and contents."""
        other = ExpHistogramState(self._d, self._max_size, self._max_scale, self._zero_threshold)
        other._block[...] = self._block
        return other

    def merge(self, other: ExpHistogramState) -> None:
        """Add ``other``'s histograms into these, column by column.

        Per the data model: both go to the smaller of their scales, lowered
        further by the least amount that lets each range of the union fit in
        this state's ``max_size``; counts add up. ``other`` is not changed.
        The two must have the same ``d`` and ``zero_threshold``.
        """
        if not isinstance(other, ExpHistogramState):
            raise TypeError(f"can only merge an ExpHistogramState, not {type(other).__name__}")
        if other.d != self._d or other.zero_threshold != self._zero_threshold:
            raise ValueError(
                f"cannot merge histograms of d={other.d}, zero_threshold={other.zero_threshold} "
                f"into d={self._d}, zero_threshold={self._zero_threshold}"
            )
        m = self._max_size
        for c in range(self._d):
            s1, s2 = int(self.scale[c]), int(other.scale[c])
            s = min(s1, s2)
            change = 0
            for r in (0, 1):
                runs = [_index_counts(self, c, r), _index_counts(other, c, r)]
                lows = [int(i[0]) >> (sc - s) for (i, _), sc in zip(runs, (s1, s2)) if i.size]
                highs = [int(i[-1]) >> (sc - s) for (i, _), sc in zip(runs, (s1, s2)) if i.size]
                if lows:
                    change = max(change, _scale_change(min(lows), max(highs), m))
            target = s - change
            _downscale_column(self, c, s1 - target)
            for r in (0, 1):
                idx, cnt = _index_counts(other, c, r)
                if idx.size:
                    idx = idx >> (s2 - target)
                    row = (self.pos_counts if r == 0 else self.neg_counts)[c]
                    np.add.at(row, idx % m, cnt)
                    offs = self.pos_offset if r == 0 else self.neg_offset
                    offs[c] = min(int(offs[c]), int(idx[0]))
        self.count[...] += other.count
        self.zero_count[...] += other.zero_count
        with np.errstate(over="ignore", invalid="ignore"):
            self.sum[...] += other.sum
        np.copyto(self.min, other.min, where=other.min < self.min)
        np.copyto(self.max, other.max, where=other.max > self.max)

    def buckets(self, col: int) -> ExpHistogramPoint:
        """Column ``col`` as an OTLP data point (empty ranges: offset 0, no counts)."""
        c = operator.index(col)
        if not -self._d <= c < self._d:
            raise IndexError(f"column {col} out of range for d={self._d}")
        runs = []
        for r in (0, 1):
            idx, cnt = _index_counts(self, c, r)
            if idx.size == 0:
                runs += [0, []]
            else:
                first, last = int(idx[0]), int(idx[-1])
                row = (self.pos_counts if r == 0 else self.neg_counts)[c]
                runs += [first, [int(row[i % self._max_size]) for i in range(first, last + 1)]]
        return ExpHistogramPoint(
            int(self.scale[c]),
            int(self.zero_count[c]),
            runs[0],
            runs[1],
            runs[2],
            runs[3],
            int(self.count[c]),
            float(self.sum[c]),
            float(self.min[c]),
            float(self.max[c]),
        )

    def quantile(self, col: int, q: float) -> float:
        """Estimate of the ``q`` quantile of column ``col`` (NaN when empty).

        Each bucket's count sits at its midpoint (zero for the zero bucket);
        the estimate interpolates linearly between neighbouring midpoints, and
        between ``min``/``max`` and the outermost ones. ``q=0`` is ``min``, ``q=1`` is ``max``.
        """
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"q must be in [0, 1], got {q!r}")
        p = self.buckets(col)
        if p.count == 0:
            return math.nan
        if q == 0.0:
            return p.min
        if q == 1.0:
            return p.max
        points: list[tuple[float, int]] = []
        for k in range(len(p.neg_counts) - 1, -1, -1):
            if p.neg_counts[k]:
                points.append((-_midpoint(p.neg_offset + k, p.scale), p.neg_counts[k]))
        if p.zero_count:
            points.append((0.0, p.zero_count))
        for k, n in enumerate(p.pos_counts):
            if n:
                points.append((_midpoint(p.pos_offset + k, p.scale), n))
        target = q * p.count
        prev_x, prev_rank, seen = p.min, 0.0, 0
        for x, n in points:
            rank = seen + n / 2.0
            if target <= rank:
                frac = (target - prev_rank) / (rank - prev_rank) if rank > prev_rank else 1.0
                return _clamp(prev_x + frac * (x - prev_x), p.min, p.max)
            prev_x, prev_rank, seen = x, rank, seen + n
        frac = (target - prev_rank) / (p.count - prev_rank) if p.count > prev_rank else 1.0
        return _clamp(prev_x + frac * (p.max - prev_x), p.min, p.max)

    def __reduce__(self) -> tuple:
        # pickle the block, not the views: views restored on their own would stop sharing it
        return (_restore, (self._d, self._max_size, self._max_scale, self._zero_threshold, self._block.tobytes()))

    def __repr__(self) -> str:
        return (
            f"ExpHistogramState(d={self._d}, max_size={self._max_size}, max_scale={self._max_scale}, "
            f"zero_threshold={self._zero_threshold})"
        )


def _int(x: object, lo: int, hi: int | None) -> int | None:
    """x as an int when it is an integer (bool excluded) in [lo, hi], else None."""
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
        return None
    n = int(x)
    return n if lo <= n and (hi is None or n <= hi) else None


def _restore(d: int, max_size: int, max_scale: int, zero_threshold: float, block: bytes) -> ExpHistogramState:
    state = ExpHistogramState(d, max_size, max_scale, zero_threshold)
    state._block[...] = np.frombuffer(block, dtype=np.uint64)
    return state


def _clamp(x: float, lo: float, hi: float) -> float:
    return min(max(x, lo), hi)


def _lower_boundary(i: int, scale: int) -> float:
    e = math.ldexp(i, -scale)  # exact: i / 2**scale
    if e >= 1024:
        return math.inf
    if e < -1075:
        return 0.0
    return 2.0**e


def _midpoint(i: int, scale: int) -> float:
    lo, hi = _lower_boundary(i, scale), _lower_boundary(i + 1, scale)
    return hi if math.isinf(hi) else (lo + hi) / 2.0


def _index_counts(state: ExpHistogramState, c: int, r: int) -> tuple[np.ndarray, np.ndarray]:
    """Indexes (ascending) and counts of the nonzero buckets of one range of column c."""
    lo = int((state.pos_offset if r == 0 else state.neg_offset)[c])
    if lo == EMPTY_OFFSET:
        return np.empty(0, np.int64), np.empty(0, np.uint64)
    m = state.max_size
    idx = lo + np.arange(m, dtype=np.int64)
    cnt = (state.pos_counts if r == 0 else state.neg_counts)[c][idx % m]
    nz = cnt != 0
    return idx[nz], cnt[nz]


def _scale_change(low: int, high: int, m: int) -> int:
    change = 0
    while high - low >= m:
        high >>= 1
        low >>= 1
        change += 1
    return change


def _downscale_column(state: ExpHistogramState, c: int, change: int) -> None:
    if change <= 0:
        return
    m = state.max_size
    for r in (0, 1):
        offs = state.pos_offset if r == 0 else state.neg_offset
        lo = int(offs[c])
        if lo == EMPTY_OFFSET:
            continue
        row = (state.pos_counts if r == 0 else state.neg_counts)[c]
        idx = lo + np.arange(m, dtype=np.int64)
        moved = np.zeros(m, np.uint64)
        np.add.at(moved, (idx >> change) % m, row[idx % m])
        row[...] = moved
        offs[c] = lo >> change
    state.scale[c] -= change


def _hi(row: np.ndarray, lo: int, m: int) -> int:
    """Largest index with a count in a range whose offset is lo (lo when none)."""
    nz = np.flatnonzero(row[(lo + np.arange(m)) % m])
    return lo + int(nz[-1]) if nz.size else lo


# --------------------------------------------------------------------------
# Mapping values to bucket indexes


def _map_scalar(a: float, s: int) -> int:
    """Index of a positive finite magnitude at scale s (the C kernel's map_index)."""
    bits = int(np.float64(a).view(np.uint64))
    raw, pow2 = bits >> 52, (bits & ((1 << 52) - 1)) == 0
    e = -1023 if raw == 0 else raw - 1023 - pow2
    if s <= 0:
        return e >> -s
    if raw == 0 or pow2:
        return ((e + 1) << s) - 1
    return min(math.floor(math.log(a) * float(_SCALE_FACTOR[s])), (1024 << s) - 1)


def _map(mag: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Vectorised :func:`_map_scalar`: mag positive finite, s broadcastable to it."""
    s = np.broadcast_to(np.asarray(s, dtype=np.int64), mag.shape)
    bits = np.ascontiguousarray(mag).view(np.uint64)
    raw = (bits >> np.uint64(52)).astype(np.int64)
    pow2 = (bits & _MANT) == 0
    e = np.where(raw == 0, -1023, raw - 1023 - pow2)
    out = e >> np.maximum(-s, 0)
    pos_scale = s > 0
    if pos_scale.any():
        mult = np.left_shift(1, np.maximum(s, 0))
        exact = pos_scale & ((raw == 0) | pow2)
        out = np.where(exact, (e + 1) * mult - 1, out)
        use_log = pos_scale & ~exact
        if use_log.any():
            a = mag[use_log]
            sf = _SCALE_FACTOR[s[use_log]]
            x = np.log(a) * sf
            near = np.abs(x - np.rint(x)) <= _TOL * np.maximum(np.abs(x), 1.0)
            for k in np.flatnonzero(near):  # settle near-integers with the C library's log
                x[k] = math.log(float(a[k])) * float(sf[k])
            out[use_log] = np.minimum(np.floor(x).astype(np.int64), 1024 * mult[use_log] - 1)
    return out


# --------------------------------------------------------------------------
# The kernels


def _matrix(values: object, ndim: int) -> np.ndarray:
    if isinstance(values, np.ndarray):
        arr = values
    else:
        try:
            arr = np.asarray(memoryview(values))  # type: ignore[arg-type]
        except TypeError:
            raise TypeError(
                f"values must be a float64 or float32 array (buffer protocol), not {type(values).__name__}"
            ) from None
    if arr.dtype not in (np.float64, np.float32) or not arr.dtype.isnative:
        raise TypeError(f"values must hold float64 or float32 in native byte order, not {arr.dtype}")
    if arr.ndim != ndim:
        raise ValueError(f"values must be {ndim}-dimensional, not {arr.ndim}-dimensional")
    return arr.astype(np.float64, copy=False)


def _check_state(state: object, d: int, max_size: int | None = None) -> ExpHistogramState:
    if not isinstance(state, ExpHistogramState):
        raise TypeError(f"state must be an ExpHistogramState, not {type(state).__name__}")
    if state.d != d:
        raise ValueError(f"values have {d} columns but the state has {state.d}")
    if max_size is not None and operator.index(max_size) != state.max_size:
        raise ValueError(f"max_size is {max_size} but the state was made with max_size={state.max_size}")
    bad = (state.scale < MIN_SCALE) | (state.scale > MAX_SCALE)
    if bad.any():
        c = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"the state's scale for column {c} is {int(state.scale[c])}, outside [{MIN_SCALE}, {MAX_SCALE}]"
        )
    # an offset is EMPTY or a bucket some double maps to at the column's scale
    s = state.scale.astype(np.int64)
    mult = np.left_shift(1, np.maximum(s, 0))
    first = np.where(s > 0, -1022 * mult - 1, -1023 >> np.maximum(-s, 0))
    last = np.where(s > 0, 1024 * mult - 1, 1023 >> np.maximum(-s, 0))
    for offs in (state.pos_offset, state.neg_offset):
        o = offs.astype(np.int64)
        bad = (o != EMPTY_OFFSET) & ((o < first) | (o > last))
        if bad.any():
            c = int(np.flatnonzero(bad)[0])
            raise ValueError(
                f"the state is corrupt: offset {int(o[c])} of column {c} is no bucket at scale {int(s[c])}"
            )
    return state


def exphist_update(values: object, state: ExpHistogramState, max_size: int | None = None) -> int:
    """Record ``values`` (n x d, float64 or float32) into ``state``; return how many were dropped.

    Row ``k`` holds one value per column; columns are independent histograms.
    ``max_size``, when given, must match the state's (a guard for callers that
    hard-code it). Non-finite values are dropped and counted, never raised.
    """
    arr = _matrix(values, 2)
    _check_state(state, arr.shape[1], max_size)
    return _ingest(state, arr)


def exphist_update_row(values: object, state: ExpHistogramState, /) -> int:
    """Record one row of ``d`` values (1-D array, list or tuple); return how many were dropped."""
    if isinstance(values, (list, tuple)):
        for x in values:
            if isinstance(x, (str, bytes, bytearray)):
                raise TypeError(f"values must be numbers, not {type(x).__name__}")
        arr = np.array([float(x) for x in values], dtype=np.float64)
    else:
        arr = _matrix(values, 1)
    _check_state(state, arr.shape[0])
    return _ingest(state, arr[None, :])


def _ingest(state: ExpHistogramState, x: np.ndarray) -> int:
    n, d = x.shape
    if n == 0:
        return 0
    finite = np.isfinite(x)
    nfinite = finite.sum(axis=0)
    state.count[...] += nfinite.astype(np.uint64)
    clean = np.where(finite, x, -0.0)  # x + -0.0 == x for every x, so dropped values add nothing
    with np.errstate(over="ignore", invalid="ignore"):  # a sum may overflow to inf, then inf - inf is NaN
        state.sum[...] = np.add.accumulate(np.vstack((state.sum[None, :], clean)), axis=0)[-1]
    cols = np.arange(d)
    lows = np.where(finite, x, np.inf)
    cand = lows[np.argmin(lows, axis=0), cols]  # the first of equal minima, like the C loop
    np.copyto(state.min, cand, where=cand < state.min)
    highs = np.where(finite, x, -np.inf)
    cand = highs[np.argmax(highs, axis=0), cols]
    np.copyto(state.max, cand, where=cand > state.max)

    mag = np.abs(x)
    zero = finite & (mag <= state.zero_threshold)
    state.zero_count[...] += zero.sum(axis=0).astype(np.uint64)
    bucketed = finite & ~zero
    if bucketed.any():
        _bucket_rows(state, x, np.where(bucketed, mag, 1.0), bucketed)
    return int(n * d - int(nfinite.sum()))


def _ranges(state: ExpHistogramState):
    return ((0, state.pos_offset, state.pos_counts), (1, state.neg_offset, state.neg_counts))


def _bucket_rows(state: ExpHistogramState, x: np.ndarray, mag: np.ndarray, bucketed: np.ndarray) -> None:
    """Bucket every column at its current scale up to the first value that needs a lower one."""
    n, d = x.shape
    m = state.max_size
    idx = _map(mag, state.scale.astype(np.int64)[None, :])
    masks = (bucketed & (x > 0), bucketed & (x < 0))
    first = np.full(d, n)
    for (r, offs, counts), mask in zip(_ranges(state), masks):
        lo = offs.astype(np.int64)
        hi = np.array([_hi(counts[c], int(lo[c]), m) if lo[c] != EMPTY_OFFSET else -_BIG for c in range(d)])
        run_lo = np.minimum(np.minimum.accumulate(np.where(mask, idx, _BIG), axis=0), lo)
        run_hi = np.maximum(np.maximum.accumulate(np.where(mask, idx, -_BIG), axis=0), hi)
        over = run_hi - run_lo >= m
        first = np.minimum(first, np.where(over.any(axis=0), over.argmax(axis=0), n))
    before = np.arange(n)[:, None] < first[None, :]
    for (r, offs, counts), mask in zip(_ranges(state), masks):
        sel = mask & before
        if sel.any():
            rows, cs = np.nonzero(sel)
            ii = idx[rows, cs]
            counts += np.bincount(cs * m + ii % m, minlength=d * m).reshape(d, m).astype(np.uint64)
            np.minimum(offs, np.where(sel, idx, _BIG).min(axis=0), out=offs, casting="unsafe")
    for c in np.flatnonzero(first < n):
        rest = masks[0][first[c] :, c] | masks[1][first[c] :, c]
        _bucket_column(state, int(c), x[first[c] :, c][rest])


def _bucket_column(state: ExpHistogramState, c: int, vals: np.ndarray) -> None:
    """Bucket one column's nonzero finite values in order, lowering the scale when needed."""
    m = state.max_size
    while vals.size:
        idx = _map(np.abs(vals), int(state.scale[c]))
        first = vals.size
        masks = (vals > 0, vals < 0)
        for (r, offs, counts), mask in zip(_ranges(state), masks):
            lo = int(offs[c])
            hi = _hi(counts[c], lo, m) if lo != EMPTY_OFFSET else -_BIG
            run_lo = np.minimum(np.minimum.accumulate(np.where(mask, idx, _BIG)), lo)
            run_hi = np.maximum(np.maximum.accumulate(np.where(mask, idx, -_BIG)), hi)
            over = run_hi - run_lo >= m
            if over.any():
                first = min(first, int(over.argmax()))
        for (r, offs, counts), mask in zip(_ranges(state), masks):
            sel = mask[:first]
            if sel.any():
                ii = idx[:first][sel]
                counts[c] += np.bincount(ii % m, minlength=m).astype(np.uint64)
                offs[c] = min(int(offs[c]), int(ii.min()))
        if first == vals.size:
            return
        _record_one(state, c, float(vals[first]))
        vals = vals[first + 1 :]


def _record_one(state: ExpHistogramState, c: int, v: float) -> None:
    """One nonzero finite value, step by step as the C kernel's record_slow does it."""
    r = 1 if v < 0 else 0
    a = abs(v)
    m = state.max_size
    offs = state.neg_offset if r else state.pos_offset
    row = (state.neg_counts if r else state.pos_counts)[c]
    while True:
        idx = _map_scalar(a, int(state.scale[c]))
        lo = int(offs[c])
        if lo == EMPTY_OFFSET:
            offs[c] = idx
            row[idx % m] += 1
            return
        if lo <= idx < lo + m:
            row[idx % m] += 1
            return
        if idx < lo:
            hi = _hi(row, lo, m)
            if hi - idx < m:
                offs[c] = idx
                row[idx % m] += 1
                return
            low, high = idx, hi
        else:
            low, high = lo, idx
        change = _scale_change(low, high, m)
        if int(state.scale[c]) - change < MIN_SCALE:  # at scale -10 every double is in bucket -1 or 0
            raise ValueError("the state is corrupt: its buckets need a scale below -10")
        _downscale_column(state, c, change)


# --------------------------------------------------------------------------
# One prediction: the hot path of ModelMonitor.record

#: ``record_row`` codes below zero: nothing was recorded.
ROW_SLOW = -1
ROW_WRONG_TYPE = -2
ROW_WRONG_SHAPE = -3
#: ``record_row`` code bits (a code >= 0 means the row was recorded).
ROW_KEPT = 1
ROW_BOOSTED = 2
ROW_BAD_PREDICTION = 4
ROW_BAD_CONFIDENCE = 8
ROW_BAD_LATENCY = 16
ROW_LABEL = 32
#: The code's bits from 6 up count the non-finite feature values: ``code // ROW_NONFINITE_UNIT``.
ROW_NONFINITE_UNIT = 64

_ROW_MAGIC = 0x5354_4852_3057_4131
_ROW_MAX_BOUNDS = 4096
(_RW_MAGIC, _RW_NB, _RW_MIN_U, _RW_BOOST1, _RW_RNG, _RW_EVENTS, _RW_KEPT, _RW_EXPECTED, _RW_LAT_N, _RW_LAT_SUM,
 _RW_LAT_MIN, _RW_LAT_MAX, _RW_SIG_N, _RW_SIG_MEAN, _RW_SIG_M2, _RW_REQUESTS, _RW_HEADER) = range(17)
_M64 = (1 << 64) - 1
_SPACE = 1 << 56


class RowTotals(NamedTuple):
    """What :meth:`RowStats.take` hands over: the counters since the last take."""

    requests: int
    events: int
    kept: int
    expected: float
    lat_n: int
    lat_sum: float
    lat_min: float
    lat_max: float
    lat_counts: np.ndarray
    sig_n: int
    sig_mean: float
    sig_m2: float


class RowStats:
    """Counters that :func:`record_row` updates in place: one block of uint64 words.

    Words (``f``: float64 bits): 0 magic, 1 number of latency bounds ``nb``,
    2 ``min_uncertainty`` (f), 3 ``boost1`` (f), 4 the generator state for rows
    without a request id (splitmix64), 5 events, 6 kept, 7 summed ``p_eff``
    (f), 8 latency count, 9 latency sum (f), 10 latency min (f), 11 latency max
    (f), 12 signal count, 13 signal mean (f), 14 signal sum of squared
    deviations (f), 15 requests; then ``nb`` latency bounds (f) and ``nb + 1``
    latency bucket counts. A row whose uncertainty ``u >= min_uncertainty``
    has its probability boosted to ``min(1, p * (1 + boost1 * u))``.

    >>> st = RowStats([1.0, 10.0], seed=7)
    >>> t = st.take()
    >>> t.requests, t.lat_counts.tolist(), t.lat_min
    (0, [0, 0, 0], inf)
    """

    __slots__ = ("block", "nb")

    def __init__(self, bounds: object = (), min_uncertainty: float = math.inf, boost1: float = 0.0,
                 seed: int | None = None) -> None:
        b = np.asarray(bounds, dtype=np.float64)
        problems = []
        if b.ndim != 1 or b.shape[0] > _ROW_MAX_BOUNDS or not np.all(np.isfinite(b)) or np.any(np.diff(b) <= 0):
            problems.append(f"bounds: must be at most {_ROW_MAX_BOUNDS} finite increasing numbers, got {bounds!r}")
        if not (min_uncertainty >= 0.0):
            problems.append(f"min_uncertainty: must be a number >= 0, got {min_uncertainty!r}")
        if not (math.isfinite(boost1) and boost1 >= 0.0):
            problems.append(f"boost1: must be a finite number >= 0, got {boost1!r}")
        if problems:
            raise ConfigError(problems)
        self.nb = nb = int(b.shape[0])
        #: the block record_row takes
        self.block = np.zeros(_RW_HEADER + 2 * nb + 1, dtype=np.uint64)
        f = self.block.view(np.float64)
        self.block[_RW_MAGIC] = _ROW_MAGIC
        self.block[_RW_NB] = nb
        f[_RW_MIN_U], f[_RW_BOOST1] = min_uncertainty, boost1
        if seed is None:
            seed = int.from_bytes(os.urandom(8), "little")
        self.block[_RW_RNG] = operator.index(seed) & _M64
        f[_RW_HEADER:_RW_HEADER + nb] = b
        self._clear()

    def _clear(self) -> None:
        blk, f = self.block, self.block.view(np.float64)
        for k in (_RW_EVENTS, _RW_KEPT, _RW_LAT_N, _RW_SIG_N, _RW_REQUESTS):
            blk[k] = 0
        f[_RW_EXPECTED] = f[_RW_LAT_SUM] = f[_RW_SIG_MEAN] = f[_RW_SIG_M2] = 0.0
        f[_RW_LAT_MIN], f[_RW_LAT_MAX] = math.inf, -math.inf
        blk[_RW_HEADER + self.nb:] = 0

    def take(self) -> RowTotals:
        """The counters so far; they restart from zero (the generator state stays)."""
        blk, f = self.block, self.block.view(np.float64)
        out = RowTotals(int(blk[_RW_REQUESTS]), int(blk[_RW_EVENTS]), int(blk[_RW_KEPT]), float(f[_RW_EXPECTED]),
                        int(blk[_RW_LAT_N]), float(f[_RW_LAT_SUM]), float(f[_RW_LAT_MIN]), float(f[_RW_LAT_MAX]),
                        blk[_RW_HEADER + self.nb:].astype(np.int64), int(blk[_RW_SIG_N]), float(f[_RW_SIG_MEAN]),
                        float(f[_RW_SIG_M2]))
        self._clear()
        return out


def _number(x: object) -> float | None:
    """``x`` as a float, or None when it is no number (text never is; neither is anything float() refuses)."""
    if type(x) is float:
        return x  # type: ignore[return-value]
    if isinstance(x, (str, bytes, bytearray)):
        return None
    tp = type(x)
    if not isinstance(x, (float, int)) and not (hasattr(tp, "__float__") or hasattr(tp, "__index__")):
        return None
    try:
        return float(x)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return None


def _ingest_row(state: ExpHistogramState, vals: list[float]) -> int:
    """One row, value by value as the C kernel's record_row does it (faster than :func:`_ingest` for one row)."""
    count, total, lo, hi, zero, scale = state.count, state.sum, state.min, state.max, state.zero_count, state.scale
    zt = state.zero_threshold
    bad = 0
    for c, v in enumerate(vals):
        if not math.isfinite(v):
            bad += 1
            continue
        s = int(scale[c])
        if not MIN_SCALE <= s <= MAX_SCALE:
            raise ValueError(f"the state's scale for column {c} is {s}, outside [{MIN_SCALE}, {MAX_SCALE}]")
        count[c] += 1
        total[c] = float(total[c]) + v
        if v < lo[c]:
            lo[c] = v
        if v > hi[c]:
            hi[c] = v
        if abs(v) <= zt:
            zero[c] += 1
        else:
            _record_one(state, c, v)
    return bad


def _next_randomness(blk: np.ndarray) -> int:
    z = (int(blk[_RW_RNG]) + 0x9E37_79B9_7F4A_7C15) & _M64
    blk[_RW_RNG] = z
    z = ((z ^ (z >> 30)) * 0xBF58_476D_1CE4_E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D0_49BB_1331_11EB) & _M64
    return (z ^ (z >> 31)) >> 8


def _threshold_of(p: float) -> int:
    if not p >= 2.0**-56:
        p = 2.0**-56
    elif p > 1.0:
        p = 1.0
    return _SPACE - round(math.ldexp(p, 56))


def _stats_block(stats: object) -> np.ndarray:
    ok = (isinstance(stats, np.ndarray) and stats.dtype == np.uint64 and stats.ndim == 1
          and stats.flags.c_contiguous and stats.flags.writeable and stats.shape[0] >= _RW_HEADER
          and int(stats[_RW_MAGIC]) == _ROW_MAGIC and int(stats[_RW_NB]) <= _ROW_MAX_BOUNDS
          and stats.shape[0] == _RW_HEADER + 2 * int(stats[_RW_NB]) + 1)
    if not ok:
        raise ValueError("stats must be a RowStats block")
    return stats  # type: ignore[return-value]


def record_row(features: object, state: ExpHistogramState, prediction: object, confidence: object,
               latency: object, request_id: object, outputs: ExpHistogramState, stats: np.ndarray, p: float,
               t: int, u: object = None, /) -> int:
    """Record one prediction: features, outputs, latency, and the sampling decision; return a code.

    The single-row hot path of ``ModelMonitor.record``, in one call (the C
    kernel's is about a microsecond for 64 features). Checks, in this order:

    1. ``features``: a ``list`` or ``tuple`` of numbers, or a 1-D float64/float32
       buffer. Anything else that is not a float buffer returns :data:`ROW_SLOW`
       (the caller converts it and calls again); an item that is no number (text,
       None, a list...) gives :data:`ROW_WRONG_TYPE`, a buffer that is not 1-D
       :data:`ROW_WRONG_SHAPE`.
    2. ``prediction``: a ``str`` (a class label: :data:`ROW_LABEL`, no number
       recorded), or a number; else :data:`ROW_WRONG_TYPE`. Non-finite: :data:`ROW_BAD_PREDICTION`.
    3. The row's length against ``state.d``: :data:`ROW_WRONG_SHAPE`.

    Up to here nothing is touched; a negative code means the row was refused.
    Then ``confidence`` (None or a number in [0, 1], else
    :data:`ROW_BAD_CONFIDENCE`; its uncertainty is ``1 - confidence`` unless
    ``u`` in [0, 1] is given) and ``latency`` (None or a finite number >= 0,
    else :data:`ROW_BAD_LATENCY`). Finite features go into ``state`` (the
    count of the others in the code's bits from 6 up), the finite prediction
    and confidence into columns 0 and 1 of ``outputs``, the latency into the
    ``stats`` histogram. The signal for the sampler is the prediction, or the
    confidence when the prediction is no finite number (running mean and
    squared deviations, Welford). Sampling: ``R`` is the request id's
    randomness (a ``str`` id, or ``str()`` of another id, by
    :func:`stethoscope.native.sampling.randomness_from_ids`'s rule) or the next
    splitmix64 draw of ``stats`` when the id is None; the row is kept
    (:data:`ROW_KEPT`) iff ``R >= T`` where ``T`` is ``t``, or, when the
    uncertainty reaches ``stats``' ``min_uncertainty`` (:data:`ROW_BOOSTED`),
    the threshold of the boosted probability. Bad arguments other than the
    row's (a state that is not one, a ``stats`` block that is not a
    :class:`RowStats` block) raise.

    >>> st, outs, stats = ExpHistogramState(2), ExpHistogramState(2), RowStats([5.0], seed=1)
    >>> record_row([1.0, float("nan")], st, 0.5, 0.9, 3.0, "req-1", outs, stats.block, 1.0, 0)
    65
    >>> record_row([1.0, 2.0, 3.0], st, 0.5, None, None, None, outs, stats.block, 1.0, 0)
    -3
    >>> int(st.count[0]), int(outs.count[1]), stats.take().lat_counts.tolist()
    (1, 1, [1, 0])
    """
    p = float(p)  # type: ignore[arg-type]
    t = operator.index(t)
    if not 0 <= t < _SPACE:
        raise ValueError("t must be a threshold in [0, 2**56)")
    code = 0
    if type(features) is list or type(features) is tuple:
        vals = []
        for x in features:  # type: ignore[union-attr]
            v = _number(x)
            if v is None:
                return ROW_WRONG_TYPE
            vals.append(v)
        arr = np.array(vals, dtype=np.float64)
    else:
        try:
            arr = np.asarray(memoryview(features))  # type: ignore[arg-type]
        except TypeError:
            return ROW_SLOW
        if arr.dtype not in (np.float64, np.float32) or not arr.dtype.isnative:
            return ROW_SLOW
        if arr.ndim != 1:
            return ROW_WRONG_SHAPE
        arr = arr.astype(np.float64)
    pnum = math.nan
    if isinstance(prediction, str):
        code |= ROW_LABEL
    else:
        v = _number(prediction)
        if v is None:
            return ROW_WRONG_TYPE
        if math.isfinite(v):
            pnum = v
        else:
            code |= ROW_BAD_PREDICTION
    if not isinstance(state, ExpHistogramState):
        raise TypeError(f"state must be an ExpHistogramState, not {type(state).__name__}")
    if state.d != arr.shape[0]:
        return ROW_WRONG_SHAPE
    if not isinstance(outputs, ExpHistogramState):
        raise TypeError(f"state must be an ExpHistogramState, not {type(outputs).__name__}")
    if outputs.d != 2:
        raise ValueError(f"values have 2 columns but the state has {outputs.d}")
    blk = _stats_block(stats)
    f = blk.view(np.float64)

    conf = uu = lat = math.nan
    if confidence is not None:
        c = _number(confidence)
        if c is not None and 0.0 <= c <= 1.0:
            conf, uu = c, 1.0 - c
        else:
            code |= ROW_BAD_CONFIDENCE
    if u is not None:
        given = _number(u)
        if given is not None and 0.0 <= given <= 1.0:
            uu = given
    if latency is not None:
        v = _number(latency)
        if v is not None and 0.0 <= v < math.inf:
            lat = v
        else:
            code |= ROW_BAD_LATENCY

    if request_id is None:
        r = _next_randomness(blk)
    else:
        from .sampling import _randomness

        r = _randomness(request_id if isinstance(request_id, str) else str(request_id))

    nonfinite = _ingest_row(state, arr.tolist())
    _ingest_row(outputs, [pnum, conf])

    nb = int(blk[_RW_NB])
    if not math.isnan(lat):
        k = int(np.searchsorted(f[_RW_HEADER:_RW_HEADER + nb], lat, side="left"))
        blk[_RW_HEADER + nb + k] += np.uint64(1)
        blk[_RW_LAT_N] += np.uint64(1)
        f[_RW_LAT_SUM] = float(f[_RW_LAT_SUM]) + lat
        if lat < f[_RW_LAT_MIN]:
            f[_RW_LAT_MIN] = lat
        if lat > f[_RW_LAT_MAX]:
            f[_RW_LAT_MAX] = lat

    sig = conf if math.isnan(pnum) else pnum
    if not math.isnan(sig):
        n = int(blk[_RW_SIG_N]) + 1
        blk[_RW_SIG_N] = n
        mean = float(f[_RW_SIG_MEAN])
        delta = sig - mean
        mean += delta / n
        f[_RW_SIG_MEAN] = mean
        f[_RW_SIG_M2] = float(f[_RW_SIG_M2]) + delta * (sig - mean)

    p_eff, t_eff = p, t
    if uu >= float(f[_RW_MIN_U]):
        p_eff = min(1.0, p * (1.0 + float(f[_RW_BOOST1]) * uu))
        t_eff = _threshold_of(p_eff)
        code |= ROW_BOOSTED
    blk[_RW_REQUESTS] += np.uint64(1)
    blk[_RW_EVENTS] += np.uint64(1)
    f[_RW_EXPECTED] = float(f[_RW_EXPECTED]) + p_eff
    if r >= t_eff:
        blk[_RW_KEPT] += np.uint64(1)
        code |= ROW_KEPT
    return code + ROW_NONFINITE_UNIT * nonfinite
