"""Sampling overrides that the in-process SDKs poll, and analytics sets.

The SDK samples model rows under a rate budget. While analytics investigates a
stream (a model and one of its input streams, keyed ``<model>/<stream>``) it can
raise that stream's rate for a while; every SDK picks the change up on its next
poll. The receiver serves it on the OTLP port (see :mod:`.otlp_http`):

``GET /v1/sampling?service=<name>``
    The current document, with an ``ETag``; ``If-None-Match`` with that ETag gets
    ``304 Not Modified`` and no body, so polling costs next to nothing::

        {"version": 1718000000000,
         "streams": {"fraud/eu": {"target_rows_per_s": 20.0, "boost": 1.0,
                                  "expires_at": "2025-06-10T07:00:00.000Z",
                                  "reason": "drift alert 42"}},
         "global_budget_rows_per_s": 100.0,
         "default_target_rows_per_s": 1.0,
         "poll_interval_s": 30}

    Only unexpired overrides are listed; a stream absent from ``streams`` samples
    at ``default_target_rows_per_s``. ``service`` names the poller; overrides are
    keyed by model and stream and apply to every service, so the answer does not
    depend on it today. ``version`` changes with every write; the ETag also
    changes when an override expires. SDKs should honour ``expires_at`` locally
    too, as an override may expire between two polls.

``PUT /v1/sampling/<model>/<stream>``
    JSON ``{"target_rows_per_s": 20, "boost": 1, "ttl_s": 3600, "reason": "..."}``,
    every field optional: the target defaults to ``default_target_rows_per_s``,
    ``boost`` (a multiplier > 0 the SDK applies to the stream's rate) to 1, and
    without ``ttl_s`` the override never expires. Unknown fields and bad values
    are answered 400, naming each offending field. The model may contain ``/``
    (the last segment is the stream); both are percent-decoded.

``DELETE /v1/sampling/<model>/<stream>``
    Ends an override now (404 if there is none).

Overrides are rows of ``sampling_config`` (ReplacingMergeTree by ``Version``),
so they survive a restart; the collector keeps them in memory and reloads them
every ``refresh_s`` so collectors sharing one ClickHouse converge.

There is no authentication yet: anyone who can reach the OTLP port can change
sampling rates. Keep that port on a trusted network until tokens arrive.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from stethoscope.errors import ConfigError, DecodeError, StoreError

from .schema import SAMPLING_CONFIG_TABLE, quote_ident
from .store import Store

__all__ = ["SamplingConfig", "Override", "etag_matches", "DEFAULT_BUDGET", "DEFAULT_TARGET"]

log = logging.getLogger(__name__)

DEFAULT_BUDGET = 100.0  # rows/s
DEFAULT_TARGET = 1.0  # rows/s per stream

#: ``ExpiresAt`` of an override without a TTL (near DateTime64's upper bound).
_NEVER_MS = int(datetime(2299, 12, 31, tzinfo=UTC).timestamp() * 1000)
_MAX_TTL_S = 366 * 86400
_MAX_RATE = 1e6
_MAX_BOOST = 1000.0
_MAX_REASON = 1000
_MAX_NAME = 256
_FIELDS = ("target_rows_per_s", "boost", "ttl_s", "reason")
_pack_Q = struct.Struct("<Q").pack
_pack_q = struct.Struct("<q").pack


@dataclass(frozen=True)
class Override:
    """One stream's override, as stored."""

    stream: str  # "<model>/<stream>"
    target_rows_per_s: float
    boost: float
    reason: str
    expires_at_ms: int | None  # None: never expires
    version: int
    updated_at_ms: int

    def active(self, now_ms: int) -> bool:
        return self.expires_at_ms is None or self.expires_at_ms > now_ms

    def as_json(self) -> dict:
        return {
            "target_rows_per_s": self.target_rows_per_s,
            "boost": self.boost,
            "expires_at": None if self.expires_at_ms is None else _rfc3339(self.expires_at_ms),
            "reason": self.reason,
        }


def _rfc3339(ms: int) -> str:
    """
    >>> _rfc3339(1_700_000_000_123)
    '2023-11-14T22:13:20.123Z'
    """
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _rb_str(s: str) -> bytes:
    b = s.encode("utf-8")
    n, out = len(b), bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out) + b


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """Whether an ``If-None-Match`` header names ``etag`` (weak forms and ``*`` too).

    >>> etag_matches('W/"abc", "def"', '"abc"'), etag_matches('"x"', '"abc"'), etag_matches("*", '"abc"')
    (True, False, True)
    """
    if not if_none_match:
        return False
    for tag in if_none_match.split(","):
        tag = tag.strip()
        if tag == "*" or tag.removeprefix("W/") == etag:
            return True
    return False


def _number(doc: dict, key: str, problems: dict[str, str], *, low: float, high: float, low_open: bool) -> float | None:
    v = doc[key]
    bound = f"{'>' if low_open else '>='} {low:g} and <= {high:g}"
    if isinstance(v, bool) or not isinstance(v, int | float):
        problems[key] = f"must be a number {bound}, got {json.dumps(v)[:40]}"
        return None
    v = float(v)
    if not math.isfinite(v) or v < low or (low_open and v == low) or v > high:
        problems[key] = f"must be a number {bound}, got {v!r}"
        return None
    return v


def _check_name(what: str, name: str, problems: dict[str, str], *, slash_ok: bool) -> None:
    if not name:
        problems[what] = "must not be empty"
    elif len(name) > _MAX_NAME:
        problems[what] = f"must be at most {_MAX_NAME} characters"
    elif any(ord(c) < 0x20 or c == "\x7f" for c in name):
        problems[what] = "must not contain control characters"
    elif not slash_ok and "/" in name:
        problems[what] = "must not contain '/'"


class SamplingConfig:
    """The sampling document and its overrides, kept in memory and in ``store``.

    Thread-safe. ``clock`` gives wall-clock seconds (expiry); ``monotonic`` paces
    reloads from the store.

    Examples
    --------
    >>> import tempfile
    >>> from stethoscope.exporters.chdb_store import ChdbStore
    >>> with tempfile.TemporaryDirectory() as d:
    ...     store = ChdbStore(d)
    ...     _ = store.ensure_schema()
    ...     cfg = SamplingConfig(store, clock=lambda: 1_700_000_000.0)
    ...     cfg.load()
    ...     _ = cfg.put("fraud", "eu", b'{"target_rows_per_s": 20, "ttl_s": 60}')
    ...     doc = json.loads(cfg.document()[0])
    ...     store.close()
    >>> doc["streams"]
    {'fraud/eu': {'boost': 1.0, 'expires_at': '2023-11-14T22:14:20.000Z', 'reason': '', 'target_rows_per_s': 20.0}}
    """

    def __init__(
        self,
        store: Store,
        *,
        global_budget_rows_per_s: float = DEFAULT_BUDGET,
        default_target_rows_per_s: float = DEFAULT_TARGET,
        poll_interval_s: int = 30,
        refresh_s: float = 10.0,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        problems = []
        if not (math.isfinite(global_budget_rows_per_s) and global_budget_rows_per_s > 0):
            problems.append(f"sampling budget: must be a positive number of rows/s, got {global_budget_rows_per_s!r}")
        if not (math.isfinite(default_target_rows_per_s) and default_target_rows_per_s >= 0):
            problems.append(f"sampling default target: must be >= 0 rows/s, got {default_target_rows_per_s!r}")
        if poll_interval_s < 1:
            problems.append(f"sampling poll interval: must be at least 1 s, got {poll_interval_s!r}")
        if problems:
            raise ConfigError(problems)
        self.store = store
        self.global_budget_rows_per_s = float(global_budget_rows_per_s)
        self.default_target_rows_per_s = float(default_target_rows_per_s)
        self.poll_interval_s = int(poll_interval_s)
        self.refresh_s = refresh_s
        self.clock = clock
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._overrides: dict[str, Override] = {}
        self._version = 0
        self._loaded_at: float | None = None
        self._refresh_failing = False
        self._table = f"{quote_ident(store.database)}.{quote_ident(SAMPLING_CONFIG_TABLE.name)}"

    # --- state ---------------------------------------------------------------

    def load(self) -> None:
        """Read the overrides from the store; raises :class:`StoreError`."""
        data = self.store.query(
            "SELECT Stream, Settings, Version, toUnixTimestamp64Milli(ExpiresAt), toUnixTimestamp64Milli(UpdatedAt) "
            f"FROM {self._table} FINAL",
            "JSONCompactEachRow",
        ).data
        overrides: dict[str, Override] = {}
        version = 0
        for line in data.splitlines():
            stream, settings, ver, expires, updated = json.loads(line)
            ver, expires = int(ver), int(expires)
            version = max(version, ver)
            try:
                s = json.loads(settings)
                overrides[stream] = Override(
                    stream=stream,
                    target_rows_per_s=float(s["target_rows_per_s"]),
                    boost=float(s["boost"]),
                    reason=str(s.get("reason", "")),
                    expires_at_ms=None if expires >= _NEVER_MS else expires,
                    version=ver,
                    updated_at_ms=int(updated),
                )
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("ignoring unreadable sampling override for %r (version %d): %s", stream, ver, exc)
        with self._lock:
            # A write that landed after the query above is newer than what it read.
            for key, mine in self._overrides.items():
                if key not in overrides or mine.version > overrides[key].version:
                    overrides[key] = mine
            self._overrides = overrides
            self._version = max(self._version, version)
            self._loaded_at = self._monotonic()

    def _maybe_refresh(self) -> None:
        loaded = self._loaded_at
        if loaded is not None and self._monotonic() - loaded < self.refresh_s:
            return
        try:
            self.load()
        except StoreError as exc:  # keep serving what we have; the store may come back
            if not self._refresh_failing:
                log.warning("could not reload sampling overrides, serving the last known ones: %s", exc)
            self._refresh_failing = True
            self._loaded_at = self._monotonic()
            return
        self._refresh_failing = False

    def overrides(self) -> dict[str, Override]:
        """Unexpired overrides by ``<model>/<stream>``."""
        self._maybe_refresh()
        now_ms = int(self.clock() * 1000)
        with self._lock:
            return {k: o for k, o in self._overrides.items() if o.active(now_ms)}

    def document(self, service: str = "") -> tuple[bytes, str]:
        """The JSON document SDKs poll, and its ETag (a hash of the bytes)."""
        del service  # overrides apply to every service today; see the module docstring
        active = self.overrides()
        with self._lock:
            version = self._version
        doc = {
            "version": version,
            "streams": {k: o.as_json() for k, o in sorted(active.items())},
            "global_budget_rows_per_s": self.global_budget_rows_per_s,
            "default_target_rows_per_s": self.default_target_rows_per_s,
            "poll_interval_s": self.poll_interval_s,
        }
        body = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
        return body, '"' + hashlib.blake2b(body, digest_size=12).hexdigest() + '"'

    # --- writes --------------------------------------------------------------

    def parse(self, model: str, stream: str, body: bytes) -> dict:
        """Validate a PUT; return its settings or raise :class:`DecodeError` naming every bad field."""
        problems: dict[str, str] = {}
        _check_name("model", model, problems, slash_ok=True)
        _check_name("stream", stream, problems, slash_ok=False)
        try:
            doc = json.loads(body or b"{}")
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DecodeError(f"body: not valid JSON: {exc}") from exc
        except RecursionError:
            raise DecodeError("body: not valid JSON: nested too deeply") from None
        if not isinstance(doc, dict):
            raise DecodeError(f"body: must be a JSON object, got {type(doc).__name__}")
        for key in doc:
            if key not in _FIELDS:
                problems[str(key)[:60]] = f"unknown field (expected {', '.join(_FIELDS)})"
        out = {"target_rows_per_s": self.default_target_rows_per_s, "boost": 1.0, "ttl_s": None, "reason": ""}
        if doc.get("target_rows_per_s") is not None:
            out["target_rows_per_s"] = _number(doc, "target_rows_per_s", problems, low=0, high=_MAX_RATE, low_open=False)
        if doc.get("boost") is not None:
            out["boost"] = _number(doc, "boost", problems, low=0, high=_MAX_BOOST, low_open=True)
        if doc.get("ttl_s") is not None:
            out["ttl_s"] = _number(doc, "ttl_s", problems, low=0, high=_MAX_TTL_S, low_open=True)
        reason = doc.get("reason")
        if reason is not None:
            if not isinstance(reason, str):
                problems["reason"] = f"must be a string, got {json.dumps(reason)[:40]}"
            elif len(reason) > _MAX_REASON:
                problems["reason"] = f"must be at most {_MAX_REASON} characters, got {len(reason)}"
            else:
                out["reason"] = reason
        if problems:
            raise DecodeError("; ".join(f"{k}: {v}" for k, v in problems.items()))
        return out

    def put(self, model: str, stream: str, body: bytes) -> Override:
        """Validate and store an override; :class:`DecodeError` (400) or :class:`StoreError` (503)."""
        s = self.parse(model, stream, body)
        now_ms = int(self.clock() * 1000)
        expires = None if s["ttl_s"] is None else now_ms + max(1, round(s["ttl_s"] * 1000))
        return self._write(f"{model}/{stream}", s["target_rows_per_s"], s["boost"], s["reason"], expires, now_ms)

    def delete(self, model: str, stream: str) -> bool:
        """End an active override now; False if there was none."""
        key = f"{model}/{stream}"
        current = self.overrides().get(key)
        if current is None:
            return False
        now_ms = int(self.clock() * 1000)
        self._write(key, current.target_rows_per_s, current.boost, current.reason, now_ms, now_ms)
        return True

    def _write(self, key: str, target: float, boost: float, reason: str, expires_ms: int | None, now_ms: int) -> Override:
        settings = json.dumps({"target_rows_per_s": target, "boost": boost, "reason": reason}, sort_keys=True)
        with self._lock:
            # Milliseconds since the epoch, but always past the last version seen, so
            # versions grow across restarts and roughly across collectors.
            version = max(self._version + 1, now_ms)
            row = (
                _rb_str(key)
                + _rb_str(settings)
                + _pack_Q(version)
                + _pack_q(_NEVER_MS if expires_ms is None else expires_ms)
                + _pack_q(now_ms)
            )
            self.store.insert(SAMPLING_CONFIG_TABLE.name, SAMPLING_CONFIG_TABLE.column_names, row)
            override = Override(key, target, boost, reason, expires_ms, version, now_ms)
            self._overrides[key] = override
            self._version = version
        log.info("sampling override %s: %s", key, settings)
        return override
