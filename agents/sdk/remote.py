"""Sampling overrides from the collector: ``GET <endpoint>/v1/sampling?service=<name>``.

The collector answers with a JSON document::

    {"version": 3, "global_budget_rows_per_s": 50.0, "default_target_rows_per_s": 1.0, "poll_interval_s": 30,
     "streams": {"fraud/default": {"target_rows_per_s": 5.0, "boost": 4.0,
                                   "expires_at": 1767225600, "reason": "drift"}}}

:class:`SamplingConfigPoller` remembers the ``ETag`` and sends
``If-None-Match``, so an unchanged document costs a 304. A 404, a connection
error, a timeout or a malformed document all mean "keep what you have": the
poller returns ``None`` and never raises (problems are logged once per kind).

Authentication and TLS work as for the SDK's OTLP exporters and the agent's
sender (:mod:`stethoscope.agents.delivery`): ``token`` is sent as
``Authorization: Bearer`` (the collector lets any ``ingest`` or ``read`` token
read the document), ``ca_file`` verifies an ``https`` collector, with
``client_cert_file``/``client_key_file`` for mutual TLS. When not given they
fall back to ``OTEL_EXPORTER_OTLP_[METRICS_]HEADERS``,
``OTEL_EXPORTER_OTLP_[METRICS_]CERTIFICATE``,
``OTEL_EXPORTER_OTLP_[METRICS_]CLIENT_CERTIFICATE`` and ``..._CLIENT_KEY``,
the variables the metrics exporter reads, so a monitor configured through the
environment polls with the credentials it exports with. A 401 or 403 is logged
once by status (never the token) and the local settings stay.

Examples:
    >>> doc = {"version": 2, "streams": {"m/default": {"target_rows_per_s": 3, "boost": 2,
    ...        "expires_at": "2030-01-01T00:00:00Z", "reason": "drift"}}}
    >>> cfg = parse_sampling_document(doc)
    >>> cfg.version, cfg.streams["m/default"].boost, cfg.streams["m/default"].expires_at
    (2, 2.0, 1893456000.0)
    >>> cfg.streams["m/default"].active(now=1893455999.0), cfg.streams["m/default"].active(now=1893456001.0)
    (True, False)
"""

from __future__ import annotations

import json
import logging
import math
import os
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import Any

from ..delivery import bearer_headers, client_tls_context, env_headers

__all__ = ["RemoteSampling", "SamplingConfigPoller", "StreamOverride", "parse_sampling_document", "SAMPLING_PATH"]

_log = logging.getLogger("stethoscope.agents.sdk")

SAMPLING_PATH = "/v1/sampling"


@dataclass(frozen=True)
class StreamOverride:
    """The collector's word on one ``<model>/<stream>``; ``None`` fields keep the local value."""

    target_rows_per_s: float | None = None
    boost: float = 1.0
    expires_at: float | None = None
    """Unix seconds; ``None`` means until the next document says otherwise."""
    reason: str = ""

    def active(self, now: float) -> bool:
        return self.expires_at is None or now < self.expires_at


@dataclass(frozen=True)
class RemoteSampling:
    """A parsed sampling document."""

    version: int = 0
    streams: Mapping[str, StreamOverride] = field(default_factory=lambda: MappingProxyType({}))
    global_budget_rows_per_s: float | None = None
    default_target_rows_per_s: float | None = None
    poll_interval_s: float | None = None


def _number(value: Any, *, minimum: float = 0.0) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) and value >= minimum else None


def _when(value: Any) -> float | None:
    if isinstance(value, str) and value:
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return None
    return _number(value)


def parse_sampling_document(doc: Any) -> RemoteSampling:
    """Turn the JSON body into a :class:`RemoteSampling`; bad entries are skipped, never raised."""
    if not isinstance(doc, Mapping):
        raise ValueError("the sampling document must be a JSON object")
    streams: dict[str, StreamOverride] = {}
    raw = doc.get("streams")
    for key, spec in (raw.items() if isinstance(raw, Mapping) else ()):
        if not isinstance(key, str) or not isinstance(spec, Mapping):
            continue
        boost = _number(spec.get("boost"))
        streams[key] = StreamOverride(
            target_rows_per_s=_number(spec.get("target_rows_per_s")),
            boost=boost if boost is not None and boost > 0 else 1.0,
            expires_at=_when(spec.get("expires_at")),
            reason=str(spec.get("reason", "")),
        )
    version = doc.get("version")
    return RemoteSampling(
        version=version if isinstance(version, int) and not isinstance(version, bool) else 0,
        streams=MappingProxyType(streams),
        global_budget_rows_per_s=_number(doc.get("global_budget_rows_per_s")),
        default_target_rows_per_s=_number(doc.get("default_target_rows_per_s")),
        poll_interval_s=_number(doc.get("poll_interval_s"), minimum=1.0),
    )


def _env(environ: Mapping[str, str], name: str) -> str:
    return environ.get(f"OTEL_EXPORTER_OTLP_METRICS_{name}") or environ.get(f"OTEL_EXPORTER_OTLP_{name}") or ""


class SamplingConfigPoller:
    """Polls the sampling endpoint with ``If-None-Match``; :meth:`poll` never raises."""

    def __init__(
        self,
        endpoint: str,
        service: str,
        *,
        timeout_s: float = 5.0,
        headers: Mapping[str, str] | None = None,
        token: str | None = None,
        ca_file: str | None = None,
        client_cert_file: str | None = None,
        client_key_file: str | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        """Raises ``ValueError`` naming a CA or client certificate file that cannot be loaded."""
        query = urllib.parse.urlencode({"service": service})
        self.url = f"{endpoint.rstrip('/')}{SAMPLING_PATH}?{query}"
        self.timeout_s = timeout_s
        environ = os.environ if environ is None else environ
        if not headers and not token:
            headers = env_headers(environ, "METRICS")
        self._headers = {**dict(headers or {}), **bearer_headers(token)}
        self._tls: ssl.SSLContext | None = None
        if self.url.startswith("https://"):
            ca = ca_file if ca_file is not None else _env(environ, "CERTIFICATE")
            try:
                self._tls = client_tls_context(
                    ca,
                    client_cert_file if client_cert_file is not None else _env(environ, "CLIENT_CERTIFICATE"),
                    client_key_file if client_key_file is not None else _env(environ, "CLIENT_KEY"),
                )
            except (OSError, ssl.SSLError) as exc:  # a CA bundle that will not load
                raise ValueError(f"sampling config poller: cannot load the CA file {ca}: {exc}") from exc
        self._etag: str | None = None
        self._logged: set[str] = set()
        self.polls = 0
        self.not_modified = 0
        self.failures = 0

    def _once(self, key: str, message: str, *args: Any) -> None:
        self.failures += 1
        if key not in self._logged:
            self._logged.add(key)
            _log.info(message + " (keeping local sampling settings; logged once)", *args)

    def poll(self) -> RemoteSampling | None:
        """A new document, or ``None`` when unchanged, absent or unreachable."""
        self.polls += 1
        headers = {"Accept": "application/json", **self._headers}
        if self._etag:
            headers["If-None-Match"] = self._etag
        request = urllib.request.Request(self.url, headers=headers, method="GET")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s, context=self._tls) as resp:
                body = resp.read(1 << 20)
                etag = resp.headers.get("ETag")
        except urllib.error.HTTPError as exc:
            if exc.code == 304:
                self.not_modified += 1
            else:
                self._once(f"http_{exc.code}", "sampling config %s: HTTP %d", self.url, exc.code)
            exc.close()
            return None
        except Exception as exc:  # connection refused, timeout, bad URL: keep the local defaults
            self._once(type(exc).__name__, "sampling config %s unreachable: %s", self.url, exc)
            return None
        try:
            parsed = parse_sampling_document(json.loads(body))
        except (ValueError, UnicodeDecodeError) as exc:
            self._once("malformed", "sampling config %s: malformed document: %s", self.url, exc)
            return None
        self._etag = etag
        return parsed
