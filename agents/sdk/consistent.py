"""Consistent probability sampling with OpenTelemetry threshold semantics.

A request carries 56 bits of randomness ``R``; at probability ``p`` the
rejection threshold is ``T = 2**56 - round(p * 2**56)`` and the request is kept
iff ``R >= T``. Because ``R`` comes from the request id, every hop that samples
the same request at the same probability decides the same way, and a hop at a
higher probability keeps a superset of what a lower one keeps. A kept row's
adjusted count is ``2**56 / (2**56 - T)`` (= 1/p) and its threshold travels as
``th``: ``T`` in hex, 14 digits with trailing zeros stripped (``"0"`` for p=1).

The rules are those of the sampling kernels (``stethoscope.native.sampling``,
C or twin, picked by ``stethoscope.native.implementation(kernel="sampling")``):
batches of ids go through the kernel's ``randomness_from_ids``; the one-row
functions here restate the same rules inline, because a kernel call per row
costs more than the rule itself (the tests check that both agree).

Examples:
    >>> threshold_hex(threshold_for(0.01))
    'fd70a3d70a3d71'
    >>> threshold_hex(threshold_for(1.0)), threshold_hex(threshold_for(0.5))
    ('0', '8')
    >>> adjusted_count(threshold_for(0.25))
    4.0
    >>> randomness("4bf92f3577b34da6a3ce929d0e0e4736") == 0xce929d0e0e4736
    True
    >>> randomness("order-17") == int(randomness_many(["order-17"])[0])
    True
"""

from __future__ import annotations

import hashlib
import math
import string
from collections.abc import Sequence
from types import ModuleType

import numpy as np

__all__ = [
    "MAX_RANDOMNESS",
    "SPACE",
    "adjusted_count",
    "randomness",
    "randomness_many",
    "sampling_kernel",
    "threshold_for",
    "threshold_hex",
    "thresholds",
]

SPACE = 1 << 56
"""Size of the randomness space: ``R`` and ``T`` lie in ``[0, 2**56)``."""
MAX_RANDOMNESS = SPACE - 1
_SPACE_F = float(SPACE)
_SPACE_U = np.uint64(SPACE)
_HEX = frozenset(string.hexdigits)
_MIN_P = math.ldexp(1.0, -56)


def threshold_for(p: float) -> int:
    """The rejection threshold ``T`` for probability ``p`` (clamped to ``[2**-56, 1]``)."""
    if not p >= _MIN_P:
        p = _MIN_P
    elif p > 1.0:
        p = 1.0
    return SPACE - round(math.ldexp(p, 56))


def thresholds(p: np.ndarray) -> np.ndarray:
    """:func:`threshold_for` over an array, as ``uint64`` (bit-identical to the scalar)."""
    p = np.clip(np.nan_to_num(np.asarray(p, dtype=np.float64), nan=_MIN_P), _MIN_P, 1.0)
    return _SPACE_U - np.rint(np.ldexp(p, 56)).astype(np.uint64)


def threshold_hex(t: int) -> str:
    """``T`` as the ``th`` value: 14 hex digits, trailing zeros stripped, ``"0"`` for 0."""
    if t <= 0:
        return "0"
    return f"{t:014x}".rstrip("0")


def adjusted_count(t: int) -> float:
    """How many requests a row kept at threshold ``T`` stands for: ``2**56 / (2**56 - T)``."""
    return _SPACE_F / float(SPACE - t)


def randomness(request_id: str) -> int:
    """56 bits of randomness for ``request_id``.

    A W3C trace id (32 hex digits) gives its last 7 bytes, as OpenTelemetry
    does; any other id is hashed (the last 7 bytes of an 8-byte BLAKE2b digest
    of its UTF-8), so ids need not be random themselves, only distinct.
    """
    if len(request_id) == 32 and _HEX.issuperset(request_id):
        return int(request_id[18:], 16)
    digest = hashlib.blake2b(request_id.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest[1:], "big")


def randomness_many(request_ids: Sequence[str]) -> np.ndarray:
    """:func:`randomness` for each id, as ``uint64``, by the sampling kernel."""
    if isinstance(request_ids, np.ndarray):
        request_ids = request_ids.tolist()
    elif not isinstance(request_ids, list):
        request_ids = list(request_ids)
    return sampling_kernel().randomness_from_ids(request_ids)


def sampling_kernel() -> ModuleType:
    """The sampling kernel module in use (C when built, else the twin)."""
    from stethoscope import native

    return native.implementation(kernel="sampling")
