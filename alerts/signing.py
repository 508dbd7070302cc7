"""HMAC-SHA256 signatures for the generic webhook, and their verification with replay protection.

The sender signs ``f"{timestamp}.{body}"`` and sends ``X-Stethoscope-Timestamp`` (integer
epoch seconds) and ``X-Stethoscope-Signature: sha256=<hex>``. A receiver calls
:func:`verify`, which raises :class:`SignatureError` for a bad or missing signature, a
timestamp outside the tolerance, or a signature it has already accepted.

Examples
--------
>>> body = b'{"status":"firing"}'
>>> headers = sign_headers("s3cret", body, now=1000)
>>> headers["X-Stethoscope-Signature"][:7]
'sha256='
>>> cache = ReplayCache()
>>> verify("s3cret", headers, body, now=1010, seen=cache)
>>> verify("s3cret", headers, body, now=1011, seen=cache)
Traceback (most recent call last):
...
stethoscope.alerts.signing.SignatureError: signature already used (replay)
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping

from ..errors import DecodeError

__all__ = ["TIMESTAMP_HEADER", "SIGNATURE_HEADER", "SignatureError", "ReplayCache", "sign", "sign_headers", "verify"]

TIMESTAMP_HEADER = "X-Stethoscope-Timestamp"
SIGNATURE_HEADER = "X-Stethoscope-Signature"


class SignatureError(DecodeError):
    """A webhook request failed verification; answer it with 401."""


def sign(secret: str | bytes, timestamp: int, body: bytes) -> str:
    """``sha256=<hex>`` of HMAC-SHA256(secret, ``f"{timestamp}." + body``)."""
    key = secret.encode() if isinstance(secret, str) else secret
    return "sha256=" + hmac.new(key, str(int(timestamp)).encode() + b"." + body, hashlib.sha256).hexdigest()


def sign_headers(secret: str | bytes, body: bytes, now: float) -> dict[str, str]:
    """The two headers to send with ``body`` at time ``now``."""
    ts = int(now)
    return {TIMESTAMP_HEADER: str(ts), SIGNATURE_HEADER: sign(secret, ts, body)}


class ReplayCache:
    """Signatures already accepted, forgotten once their timestamp is older than ``ttl_s``."""

    def __init__(self, ttl_s: float = 600.0) -> None:
        self.ttl_s = ttl_s
        self._seen: dict[str, float] = {}

    def add(self, signature: str, timestamp: float, now: float) -> bool:
        """Record ``signature``; False when it was already there (a replay)."""
        if len(self._seen) > 1024:
            self._seen = {s: t for s, t in self._seen.items() if now - t <= self.ttl_s}
        if signature in self._seen:
            return False
        self._seen[signature] = timestamp
        return True


def verify(
    secret: str | bytes,
    headers: Mapping[str, str],
    body: bytes,
    now: float,
    tolerance_s: float = 300.0,
    seen: ReplayCache | None = None,
) -> None:
    """Accept ``body`` or raise :class:`SignatureError` saying why. Header names are case-insensitive.

    Pass the same ``seen`` cache to every call to reject a replay inside the tolerance window.
    """
    lower = {k.lower(): v for k, v in headers.items()}
    ts_text, sig = lower.get(TIMESTAMP_HEADER.lower()), lower.get(SIGNATURE_HEADER.lower())
    if not ts_text or not sig:
        raise SignatureError(f"missing {TIMESTAMP_HEADER} or {SIGNATURE_HEADER} header")
    try:
        ts = int(ts_text)
    except ValueError as exc:
        raise SignatureError(f"{TIMESTAMP_HEADER} is not an integer: {ts_text!r}") from exc
    if abs(now - ts) > tolerance_s:
        raise SignatureError(f"timestamp {ts} is outside the {tolerance_s:g}s tolerance (now {int(now)})")
    if not hmac.compare_digest(sign(secret, ts, body), sig.strip()):
        raise SignatureError("signature does not match the body")
    if seen is not None and not seen.add(sig.strip(), ts, now):
        raise SignatureError("signature already used (replay)")
