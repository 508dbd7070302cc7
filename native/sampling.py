"""Consistent probability sampling (OpenTelemetry): the pure-Python twin of the sampling kernels in ``sketch.c``.

OpenTelemetry's consistent probability sampling compares a 56-bit randomness
value ``R`` with a 56-bit rejection threshold ``T``: keep iff ``R >= T``. A
sampling probability ``p`` gives ``T = round((1 - p) * 2**56)``; the tracestate
carries ``T`` as ``th``, 14 hex digits with trailing zeros removed; a kept item
stands for ``2**56 / (2**56 - T)`` items (its adjusted count). The C module
``stethoscope._sketch`` has the same functions with identical results; pick one
with ``stethoscope.native.implementation(kernel="sampling")``.

Randomness of a request id (:func:`randomness_from_ids`), a stable rule shared with C:

* an id of exactly 32 ASCII hex digits (``str`` or ``bytes``, either case) is a
  W3C trace id: ``R`` is its last 7 bytes (the last 14 hex digits), as the spec
  and W3C Trace Context Level 2 say;
* any other id is hashed: ``R`` is the last 7 bytes, read big-endian, of
  ``blake2b(id, digest_size=8)`` (``str`` ids as UTF-8, lone surrogates passed
  through rather than refused). BLAKE2b is in every
  Python's ``hashlib``, fast, and spreads any id set uniformly.

Examples
--------
>>> t = threshold_for(0.01, precision=5)
>>> threshold_hex(t), parse_threshold_hex("fd70a4") == t
('fd70a4', True)
>>> threshold_hex(threshold_for(0.01))
'fd70a3d70a3d71'
>>> threshold_hex(threshold_for(1.0)), adjusted_count(threshold_for(0.25))
('0', 4.0)
>>> r = randomness_from_ids(["4bf92f3577b34da6a3ce929d0e0e4736", "request-0"])
>>> hex(int(r[0]))
'0xce929d0e0e4736'
>>> sample_mask(r, parse_threshold_hex("8")).tolist()
[True, False]
"""

from __future__ import annotations

import hashlib
import math
import operator
from collections.abc import Iterable

import numpy as np

__all__ = [
    "MAX_THRESHOLD",
    "adjusted_count",
    "parse_threshold_hex",
    "randomness_from_ids",
    "sample_mask",
    "threshold_for",
    "threshold_hex",
]

#: 2**56: thresholds and randomness values are below it.
MAX_THRESHOLD = 1 << 56

_HEX = b"0123456789abcdefABCDEF"


def _randomness(x: object) -> int:
    if isinstance(x, str):
        b = x.encode("utf-8", "surrogatepass")
    elif isinstance(x, (bytes, bytearray)):
        b = bytes(x)
    else:
        raise TypeError(f"ids must be str or bytes, not {type(x).__name__}")
    if len(b) == 32 and not b.strip(_HEX):
        return int(b[18:], 16)
    return int.from_bytes(hashlib.blake2b(b, digest_size=8).digest()[1:], "big")


def randomness_from_ids(ids: Iterable[str | bytes]) -> np.ndarray:
    """56-bit randomness (uint64 array) of each id, by the rule in the module docstring."""
    if isinstance(ids, (str, bytes, bytearray)):
        raise TypeError("ids must be a sequence of ids, not a single str or bytes")
    items = ids if isinstance(ids, (list, tuple)) else list(ids)
    out = np.empty(len(items), dtype=np.uint64)
    for k, x in enumerate(items):
        out[k] = _randomness(x)
    return out


def _threshold(t: object) -> int:
    t = operator.index(t)  # type: ignore[arg-type]
    if not 0 <= t < MAX_THRESHOLD:
        raise ValueError("a threshold must be an integer in [0, 2**56)")
    return t


def sample_mask(randomness: object, threshold: int, /) -> np.ndarray:
    """Keep mask (bool array): ``randomness >= threshold`` for a 1-D uint64 array."""
    if isinstance(randomness, np.ndarray):
        arr = randomness
    else:
        try:
            arr = np.asarray(memoryview(randomness))  # type: ignore[arg-type]
        except TypeError:
            raise TypeError(f"randomness must be a uint64 array, not {type(randomness).__name__}") from None
    if arr.dtype != np.uint64 or not arr.dtype.isnative:
        raise TypeError(f"randomness must hold uint64, not {arr.dtype}")
    if arr.ndim != 1:
        raise ValueError(f"randomness must be 1-dimensional, not {arr.ndim}-dimensional")
    return arr >= np.uint64(_threshold(threshold))


def threshold_for(p: float, precision: int | None = None) -> int:
    """Rejection threshold for sampling probability ``p`` in ``[2**-56, 1]``.

    With ``precision=None``, ``T = 2**56 - round(p * 2**56)`` exactly (``p * 2**56``
    is exact in floating point; ties go to even). With ``precision`` (1 to 13
    hex digits, more for probabilities near zero), the spec's rounding to that
    many significant digits: the ``th`` values of its table (``p=0.01``,
    precision 4 gives ``fd70a``).
    """
    if isinstance(p, (str, bytes)):
        raise TypeError("p must be a number")
    p = float(p)
    if not 2.0**-56 <= p <= 1.0:
        raise ValueError("a sampling probability must be in [2**-56, 1]")
    if precision is None:
        return MAX_THRESHOLD - round(math.ldexp(p, 56))
    precision = operator.index(precision)
    if not 1 <= precision <= 13:
        raise ValueError("precision must be in [1, 13] hex digits")
    if p == 1.0:
        return 0
    _, exp = math.frexp(p)
    prec = max(1, min(12, precision + exp // -4))  # more digits past the leading f's
    rejection = 2.0 - p  # in [1, 2): its 52 fraction bits are 13 hex digits of 1 - p
    rejection += math.ldexp(0.5, -4 * prec)  # round at the last kept digit
    digits = (1 << 52) - 1 if rejection >= 2.0 else int(np.float64(rejection).view(np.uint64)) & ((1 << 52) - 1)
    return (digits >> (4 * (13 - prec))) << (4 * (14 - prec))


def threshold_hex(threshold: int) -> str:
    """The ``th`` value of a threshold: 14 hex digits, trailing zeros removed (``"0"`` for 0)."""
    t = _threshold(threshold)
    return format(t, "014x").rstrip("0") or "0"


def parse_threshold_hex(th: str) -> int:
    """The threshold a ``th`` value (1 to 14 lowercase hex digits) stands for."""
    if not isinstance(th, str):
        raise TypeError(f"th must be str, not {type(th).__name__}")
    if not 1 <= len(th) <= 14 or th.strip("0123456789abcdef"):
        raise ValueError(f"a th value is 1 to 14 lowercase hex digits, not {th!r}")
    return int(th, 16) << (4 * (14 - len(th)))


def adjusted_count(threshold: int) -> float:
    """``2**56 / (2**56 - threshold)``: how many items one kept item stands for."""
    t = _threshold(threshold)
    return float(MAX_THRESHOLD) / float(MAX_THRESHOLD - t)
