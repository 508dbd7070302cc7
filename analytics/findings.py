"""Findings: what analytics concluded, one typed row each, stored in the ``findings`` table.

A :class:`Finding` is generic on purpose: alert rules select on ``kind``,
``severity`` and ``drifted`` without knowing which method produced the row; the
method-specific numbers go in ``details`` (JSON). Times are seconds since the
Unix epoch (UTC), stored with millisecond precision.

:class:`FindingsWriter` inserts a batch as RowBinary with an insert token that is
the hash of the encoded batch, so a retried write of the same findings is dropped
by the store instead of being stored twice.

Examples
--------
>>> from stethoscope.analytics.detector import DriftResult
>>> r = DriftResult("ks", 0.31, 1e-9, 0.42, 0.1, True, column="amount", details={"p_adjusted": 3e-9})
>>> f = from_drift_result(r, kind="feature_drift", model="fraud", version="3", feature="amount",
...                       window_start=0.0, window_end=3600.0, time=3600.0, labels={"stream": "default"})
>>> f.subject, f.severity, f.p_value, f.drifted
('model=fraud version=3 stream=default feature=amount', 'warning', 3e-09, True)
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .detector import DriftResult

__all__ = ["SEVERITIES", "Finding", "FindingsWriter", "from_drift_result", "default_severity", "subject_of"]

#: Allowed severities, least severe first.
SEVERITIES = ("info", "warning", "critical")

#: Column order of the ``findings`` table, which :meth:`FindingsWriter.write` encodes.
COLUMNS = (
    "Time", "Kind", "Subject", "Model", "ModelVersion", "Feature", "Method", "Statistic", "PValue", "Effect",
    "Threshold", "Severity", "Drifted", "WindowStart", "WindowEnd", "Details", "Labels",
)


@dataclass(frozen=True)
class Finding:
    """One conclusion. ``p_value`` is NaN where the method defines none; ``details`` must be
    JSON-serialisable (non-finite floats are written as ``null``)."""

    time: float
    kind: str
    subject: str
    model: str = ""
    model_version: str = ""
    feature: str = ""
    method: str = ""
    statistic: float = math.nan
    p_value: float = math.nan
    effect: float = math.nan
    threshold: float = math.nan
    severity: str = "info"
    drifted: bool = False
    window_start: float = 0.0
    window_end: float = 0.0
    details: Mapping[str, Any] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {SEVERITIES}, got {self.severity!r}")
        if not self.kind:
            raise ValueError("kind must not be empty")


def subject_of(model: str, version: str, labels: Mapping[str, str] | None = None, feature: str = "") -> str:
    """``model=fraud version=3 stream=default feature=amount`` (labels in the given order).

    >>> subject_of("fraud", "3", {"stream": "eu"})
    'model=fraud version=3 stream=eu'
    """
    parts = [f"model={model}", f"version={version}"]
    parts += [f"{k}={v}" for k, v in (labels or {}).items()]
    if feature:
        parts.append(f"feature={feature}")
    return " ".join(parts)


def default_severity(result: DriftResult) -> str:
    """``warning`` when the result drifted, else ``info``."""
    return "warning" if result.drifted else "info"


def from_drift_result(
    result: DriftResult,
    *,
    kind: str,
    model: str,
    version: str,
    feature: str,
    window_start: float,
    window_end: float,
    severity_rule: Callable[[DriftResult], str] = default_severity,
    time: float | None = None,
    labels: Mapping[str, str] | None = None,
    details_extra: Mapping[str, Any] | None = None,
) -> Finding:
    """A finding from a detector's result.

    ``p_value`` is the p-value the verdict was made on: the corrected one
    (``details["p_adjusted"]``) when a dataset check set it, else the raw one;
    both are kept in ``details``, with ``details_extra`` merged in. ``time``
    defaults to ``window_end``.
    """
    d = dict(result.details)
    p = d.get("p_adjusted", result.p_value)
    details = {**(details_extra or {}), **d, "p_raw": result.p_value, "n_reference": result.n_reference, "n_current": result.n_current}
    return Finding(
        time=window_end if time is None else time,
        kind=kind,
        subject=subject_of(model, version, labels, feature),
        model=model,
        model_version=version,
        feature=feature,
        method=result.method,
        statistic=float(result.statistic),
        p_value=math.nan if p is None else float(p),
        effect=float(result.effect),
        threshold=float(result.threshold),
        severity=severity_rule(result),
        drifted=bool(result.drifted),
        window_start=window_start,
        window_end=window_end,
        details=details,
        labels=dict(labels or {}),
    )


# --- RowBinary encoding -----------------------------------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _str(s: str) -> bytes:
    b = s.encode()
    return _varint(len(b)) + b


def _ms(t: float) -> bytes:
    return struct.pack("<q", int(round(t * 1000)))


def _plain(v: Any) -> Any:
    """JSON-safe copy: NumPy scalars to Python, non-finite floats to None."""
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if hasattr(v, "item") and callable(v.item):  # NumPy scalar
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return str(v)


def encode(f: Finding) -> bytes:
    """One finding as a RowBinary row in :data:`COLUMNS` order."""
    details = json.dumps(_plain(f.details), sort_keys=True, separators=(",", ":"), allow_nan=False)
    labels = sorted(f.labels.items())
    return b"".join((
        _ms(f.time), _str(f.kind), _str(f.subject), _str(f.model), _str(f.model_version), _str(f.feature),
        _str(f.method), struct.pack("<dddd", f.statistic, f.p_value, f.effect, f.threshold), _str(f.severity),
        b"\x01" if f.drifted else b"\x00", _ms(f.window_start), _ms(f.window_end), _str(details),
        _varint(len(labels)), *(_str(str(k)) + _str(str(v)) for k, v in labels),
    ))


class FindingsWriter:
    """Writes findings to the store's ``findings`` table, one insert per batch."""

    table = "findings"

    def __init__(self, store: Any) -> None:
        self.store = store

    def write(self, findings: Sequence[Finding]) -> int:
        """Insert ``findings`` in one batch; return the rows the store reports written.

        The insert token is the SHA-256 of the encoded batch: writing the same
        findings again (a retry) stores nothing new.
        """
        if not findings:
            return 0
        data = b"".join(encode(f) for f in findings)
        token = "findings-" + hashlib.sha256(data).hexdigest()
        return self.store.insert(self.table, COLUMNS, data, fmt="RowBinary", token=token)
