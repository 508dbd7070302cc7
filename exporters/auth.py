"""Who may talk to the listeners, and over what: bearer tokens, permissions, TLS.

Tokens live in a file (``auth.tokens_file``, TOML or YAML) as SHA-256 hashes,
never in plain text, each with a name and a set of permissions:

``ingest``
    ``POST /v1/metrics`` and ``/v1/logs``; ``GET /v1/sampling`` (the SDKs poll it).
``read``
    queries on the SQL endpoint, ``GET /v1/sampling``, and ``/metrics``.
``write``
    ``INSERT`` and DDL on the SQL endpoint, and only when ``sql.writable`` is on.
``sampling_admin``
    ``PUT`` and ``DELETE /v1/sampling/<model>/<stream>``.

A presented token is hashed and compared with every stored hash in constant
time (:func:`hmac.compare_digest`), so neither the answer's timing nor an early
exit says which stored token came close. Tokens and their hashes are never
logged; a refusal logs the peer address and the reason only.

With no tokens configured the listeners are open, which is allowed only on a
loopback address (:func:`exposure_problems`), unless
``auth.allow_unauthenticated`` says otherwise.

Examples
--------
>>> tokens = TokenSet([TokenEntry("agents", hash_token("s3cret"), frozenset({"ingest"}))])
>>> tokens.authenticate("s3cret").name, tokens.authenticate("wrong")
('agents', None)
>>> bearer_token("Bearer s3cret"), bearer_token("Basic abc"), bearer_token(None)
('s3cret', None, None)
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import os
import re
import ssl
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from stethoscope.errors import ConfigError

__all__ = [
    "PERMISSIONS",
    "TokenEntry",
    "TokenSet",
    "AuthFailure",
    "hash_token",
    "bearer_token",
    "basic_password",
    "is_loopback",
    "exposure_problems",
    "server_tls_context",
    "check",
    "authorize",
    "listener_security",
]

#: Every permission a token may carry.
PERMISSIONS = ("ingest", "read", "write", "sampling_admin")

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_BEARER = re.compile(r"^\s*Bearer\s+([A-Za-z0-9\-._~+/]+=*)\s*$", re.I)
_BASIC = re.compile(r"^\s*Basic\s+([A-Za-z0-9+/]+=*)\s*$", re.I)


def hash_token(token: str) -> str:
    """The SHA-256 of ``token`` in lowercase hex: what the tokens file stores.

    >>> hash_token("s3cret")[:16]
    '1ec1c26b50d5d3c5'
    """
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class TokenEntry:
    """One configured token: its name, the SHA-256 of its secret, what it may do."""

    name: str
    sha256: str
    permissions: frozenset[str]

    def __repr__(self) -> str:  # keep the hash out of reprs that end up in logs
        return f"TokenEntry(name={self.name!r}, permissions={sorted(self.permissions)!r})"


class TokenSet:
    """The configured tokens; :meth:`authenticate` maps a presented secret to its entry."""

    def __init__(self, entries: Sequence[TokenEntry]) -> None:
        self._entries = tuple(entries)
        self._digests = tuple(bytes.fromhex(e.sha256) for e in self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(e.name for e in self._entries)

    def authenticate(self, token: str | None) -> TokenEntry | None:
        """The entry whose hash matches ``token``, or None; every entry is compared, in constant time."""
        if not token:
            return None
        presented = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        found = None
        for entry, digest in zip(self._entries, self._digests):
            if hmac.compare_digest(presented, digest) and found is None:
                found = entry
        return found

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> TokenSet:
        """Read a tokens file (``.toml``, or ``.yaml``/``.yml``); :class:`ConfigError` lists every problem.

        The file holds a list ``tokens`` of tables with ``name``, ``sha256`` (64 hex
        digits) and ``permissions`` (a list among :data:`PERMISSIONS`).
        """
        where = f"auth.tokens_file {os.fspath(path)}"
        try:
            with open(path, "rb") as fh:
                raw = fh.read()
        except OSError as exc:
            raise ConfigError(f"{where}: cannot be read: {exc.strerror}") from None
        try:
            if os.fspath(path).endswith((".yaml", ".yml")):
                import yaml

                doc = yaml.safe_load(raw.decode("utf-8")) or {}
            else:
                doc = tomllib.loads(raw.decode("utf-8"))
        except Exception as exc:  # tomllib, yaml and UnicodeDecodeError each have their own type
            raise ConfigError(f"{where}: not valid TOML/YAML: {type(exc).__name__}") from None
        return cls(_parse_entries(doc, where))


def _parse_entries(doc: Any, where: str) -> list[TokenEntry]:
    problems: list[str] = []
    items = doc.get("tokens") if isinstance(doc, Mapping) else None
    if not isinstance(items, list) or not items:
        raise ConfigError(f"{where}: expected a non-empty list 'tokens' of {{name, sha256, permissions}}")
    entries: list[TokenEntry] = []
    seen_names: set[str] = set()
    seen_hashes: set[str] = set()
    for i, item in enumerate(items):
        at = f"{where}: tokens[{i}]"
        if not isinstance(item, Mapping):
            problems.append(f"{at}: expected a table with name, sha256 and permissions")
            continue
        unknown = sorted(set(item) - {"name", "sha256", "permissions"})
        if unknown:
            problems.append(f"{at}: unknown keys {', '.join(map(str, unknown))} (plain-text tokens are not accepted: store sha256)")
        name = item.get("name")
        if not isinstance(name, str) or not name.strip():
            problems.append(f"{at}: name must be a non-empty string")
            name = f"#{i}"
        elif name in seen_names:
            problems.append(f"{at}: name {name!r} is used twice")
        seen_names.add(name)
        digest = item.get("sha256")
        if not isinstance(digest, str) or not _HEX64.match(digest.strip().lower()):
            problems.append(f"{at} ({name}): sha256 must be 64 hex digits (sha256sum of the token)")
            digest = None
        else:
            digest = digest.strip().lower()
            if digest in seen_hashes:
                problems.append(f"{at} ({name}): the same token hash appears twice")
            seen_hashes.add(digest)
        perms = item.get("permissions")
        if not isinstance(perms, list) or not perms or not all(isinstance(p, str) for p in perms):
            problems.append(f"{at} ({name}): permissions must be a non-empty list among {', '.join(PERMISSIONS)}")
            perms = []
        bad = sorted(set(perms) - set(PERMISSIONS))
        if bad:
            problems.append(f"{at} ({name}): unknown permissions {', '.join(bad)} (known: {', '.join(PERMISSIONS)})")
        if digest is not None and perms and not bad:
            entries.append(TokenEntry(name, digest, frozenset(perms)))
    if problems:
        raise ConfigError(problems)
    return entries


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header (RFC 6750), else None."""
    if not authorization:
        return None
    m = _BEARER.match(authorization)
    return m.group(1) if m else None


def basic_password(authorization: str | None) -> str | None:
    """The password of an ``Authorization: Basic`` header (how ClickHouse clients send a key).

    >>> basic_password("Basic " + base64.b64encode(b"default:tok").decode())
    'tok'
    """
    if not authorization:
        return None
    m = _BASIC.match(authorization)
    if not m:
        return None
    try:
        text = base64.b64decode(m.group(1), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return text.partition(":")[2] or None


@dataclass(frozen=True)
class AuthFailure:
    """Why a request was refused: 401 (no or unknown token) or 403 (permission missing)."""

    status: int
    reason: str
    message: str

    @property
    def headers(self) -> dict[str, str]:
        if self.status == 401:
            error = ', error="invalid_token"' if self.reason == "invalid_token" else ""
            return {"WWW-Authenticate": f'Bearer realm="stethoscope"{error}'}
        return {}


def check(tokens: TokenSet | None, presented: str | None, permission: str | Iterable[str]) -> AuthFailure | None:
    """None when the request may go on; else the :class:`AuthFailure` to answer.

    ``permission`` is one permission or several, any of which suffices.

    >>> ts = TokenSet([TokenEntry("ro", hash_token("t"), frozenset({"read"}))])
    >>> check(None, None, "ingest") is None, check(ts, "t", "read") is None
    (True, True)
    >>> check(ts, None, "read").status, check(ts, "x", "read").status, check(ts, "t", "ingest").status
    (401, 401, 403)
    """
    return authorize(tokens, presented, permission)[1]


def authorize(
    tokens: TokenSet | None, presented: str | None, permission: str | Iterable[str]
) -> tuple[TokenEntry | None, AuthFailure | None]:
    """``(entry, None)`` when allowed (entry None on an open listener), else ``(entry or None, failure)``."""
    if tokens is None:
        return None, None
    wanted = (permission,) if isinstance(permission, str) else tuple(permission)
    if presented is None:
        return None, AuthFailure(401, "unauthenticated", "a bearer token is required (Authorization: Bearer <token>)")
    entry = tokens.authenticate(presented)
    if entry is None:
        return None, AuthFailure(401, "invalid_token", "the bearer token is not valid")
    if not entry.permissions.intersection(wanted):
        return entry, AuthFailure(
            403, "forbidden", f"token {entry.name!r} lacks the {' or '.join(wanted)} permission for this request"
        )
    return entry, None


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps a listener reachable from this machine only.

    >>> is_loopback("127.0.0.1"), is_loopback("::1"), is_loopback("localhost")
    (True, True, True)
    >>> is_loopback("0.0.0.0"), is_loopback(""), is_loopback("10.1.2.3")
    (False, False, False)
    """
    h = host.strip().strip("[]").lower()
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False  # a name other than localhost may resolve anywhere


def exposure_problems(
    listeners: Iterable[tuple[str, str]], tokens: TokenSet | None, allow_unauthenticated: bool
) -> list[str]:
    """Problems with ``(setting, host)`` listeners open without tokens off loopback.

    >>> exposure_problems([("sql.host", "0.0.0.0")], None, False)  # doctest: +ELLIPSIS
    ['sql.host = 0.0.0.0 is not a loopback address and no tokens are configured: ...']
    >>> exposure_problems([("sql.host", "0.0.0.0")], None, True), exposure_problems([("sql.host", "::1")], None, False)
    ([], [])
    """
    if tokens is not None or allow_unauthenticated:
        return []
    return [
        f"{setting} = {host} is not a loopback address and no tokens are configured: set auth.tokens_file "
        "(see docs/security.md), bind to 127.0.0.1, or set auth.allow_unauthenticated = true to serve it open"
        for setting, host in listeners
        if not is_loopback(host)
    ]


def server_tls_context(cert_file: str, key_file: str, client_ca_file: str = "") -> ssl.SSLContext:
    """A server-side context (TLS 1.2 or later) from PEM files; with ``client_ca_file``, mutual TLS.

    Raises :class:`ConfigError` naming the file that could not be loaded.
    """
    problems = []
    if not cert_file or not key_file:
        problems.append("tls.cert_file and tls.key_file must be set together")
    for setting, value in (("tls.cert_file", cert_file), ("tls.key_file", key_file), ("tls.client_ca_file", client_ca_file)):
        if value and not os.path.isfile(value):
            problems.append(f"{setting}: {value} is not a readable file")
    if problems:
        raise ConfigError(problems)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert_file, key_file)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"tls.cert_file/tls.key_file: cannot load the certificate and key: {exc}") from None
    if client_ca_file:
        try:
            ctx.load_verify_locations(cafile=client_ca_file)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"tls.client_ca_file: cannot load {client_ca_file}: {exc}") from None
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def listener_security(cfg: Any) -> tuple[TokenSet | None, ssl.SSLContext | None]:
    """The tokens and the TLS context ``up`` serves with, from a :class:`~stethoscope.config.Config`.

    Raises one :class:`ConfigError` listing every problem: an unreadable tokens
    file, TLS files that do not load, or a listener bound off loopback with no
    tokens and no ``auth.allow_unauthenticated``.
    """
    problems: list[str] = []
    tokens = None
    if cfg.auth.tokens_file:
        try:
            tokens = TokenSet.from_file(cfg.auth.tokens_file)
        except ConfigError as exc:
            problems += exc.problems
    elif not cfg.auth.allow_unauthenticated:
        problems += exposure_problems(
            [("collector.host", cfg.collector.host), ("sql.host", cfg.sql.host)], None, False
        )
    tls = None
    if cfg.tls.cert_file or cfg.tls.key_file:
        try:
            tls = server_tls_context(cfg.tls.cert_file, cfg.tls.key_file, cfg.tls.client_ca_file)
        except ConfigError as exc:
            problems += exc.problems
    if problems:
        raise ConfigError(problems)
    return tokens, tls
