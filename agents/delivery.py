"""Store-and-forward delivery: collections go to a :class:`~.spool.Spool`, a thread sends them.

:class:`SpoolingExporter` is the SDK-facing half: ``export`` encodes a
collection as an OTLP ``ExportMetricsServiceRequest`` (protobuf, the SDK's
own encoder), appends it to the spool and returns at once, so collection never
waits on the network. :class:`Sender` is the network half: one thread posts
spooled records, oldest first, to ``<endpoint>/v1/metrics`` and acknowledges
them only after a 2xx.

Retry policy (OTLP/HTTP): 429, 502, 503, 504 and connection errors are retried
forever with exponential backoff and full jitter (``uniform(0, min(cap,
initial * 2**attempt))``), or after exactly ``Retry-After`` when the server
sends one; other 5xx are retried ``max_attempts`` times, then dropped; other
4xx drop the record at once (counted by reason, logged once per status), so a
poison record never blocks the queue. Consecutive records are concatenated into
one request (protobuf concatenation of ``ExportMetricsServiceRequest`` appends
their ``resource_metrics``) up to ``batch_max_records``/``batch_max_bytes``; a
rejected batch is re-sent one record at a time so only the bad record is lost.

Authentication and TLS: ``token`` is sent as ``Authorization: Bearer``;
``ca_file`` is the CA bundle that verifies an ``https`` collector (with
``client_cert_file``/``client_key_file`` for mutual TLS). When not given they
fall back, as the OpenTelemetry OTLP exporter does, to
``OTEL_EXPORTER_OTLP_HEADERS``, ``OTEL_EXPORTER_OTLP_CERTIFICATE``,
``OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE`` and ``OTEL_EXPORTER_OTLP_CLIENT_KEY``
(the ``..._METRICS_...`` variants first), read once when the sender is built,
so either export path of the agent honours the same variables. A 401 or 403
(token missing, wrong or without the ``ingest`` permission) keeps the data
spooled and is retried with backoff like an outage, so fixing the token loses
nothing; the warning names the status, never the token.
"""

from __future__ import annotations

import email.utils
import gzip
import http.client
import logging
import os
import random
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.sdk.metrics.export import MetricExporter, MetricExportResult, MetricsData

from .spool import Spool, SpoolError

__all__ = [
    "DeliveryStats",
    "Sender",
    "SpoolingExporter",
    "RETRYABLE_STATUS",
    "count_points",
    "bearer_headers",
    "env_headers",
    "client_tls_context",
]

_log = logging.getLogger(__name__)

RETRYABLE_STATUS = frozenset({429, 502, 503, 504})
"""HTTP statuses OTLP/HTTP says to retry."""


def bearer_headers(token: str | None) -> dict[str, str]:
    """``{"Authorization": "Bearer <token>"}``, or nothing for an empty token.

    >>> bearer_headers("abc"), bearer_headers("")
    ({'Authorization': 'Bearer abc'}, {})
    """
    token = (token or "").strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def _env(environ: Mapping[str, str], signal: str, name: str) -> str:
    return environ.get(f"OTEL_EXPORTER_OTLP_{signal}_{name}") or environ.get(f"OTEL_EXPORTER_OTLP_{name}") or ""


def env_headers(environ: Mapping[str, str], signal: str = "METRICS") -> dict[str, str]:
    """Headers from ``OTEL_EXPORTER_OTLP_[<signal>_]HEADERS`` (``k=v,k2=v2``, values percent-encoded).

    >>> env_headers({"OTEL_EXPORTER_OTLP_HEADERS": "Authorization=Bearer%20abc"})
    {'authorization': 'Bearer abc'}
    """
    from opentelemetry.util.re import parse_env_headers

    raw = _env(environ, signal, "HEADERS")
    return dict(parse_env_headers(raw, liberal=True)) if raw else {}


def client_tls_context(ca_file: str = "", client_cert_file: str = "", client_key_file: str = "") -> ssl.SSLContext:
    """A client context (TLS 1.2 or later, hostname checked) trusting ``ca_file``, or the system CAs.

    Raises ``ValueError`` naming a file that cannot be loaded.
    """
    ctx = ssl.create_default_context(cafile=ca_file or None) if ca_file else ssl.create_default_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if client_cert_file:
        try:
            ctx.load_cert_chain(client_cert_file, client_key_file or None)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"cannot load the client certificate {client_cert_file}: {exc}") from exc
    return ctx


def count_points(metrics_data: MetricsData) -> int:
    """Data points in an SDK collection."""
    return sum(
        len(metric.data.data_points)
        for rm in metrics_data.resource_metrics
        for sm in rm.scope_metrics
        for metric in sm.metrics
    )


def _count_encoded_points(body: bytes) -> int:
    try:
        request = ExportMetricsServiceRequest.FromString(body)
    except Exception:  # a record the collector called malformed may well be
        return 0
    total = 0
    for rm in request.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                kind = metric.WhichOneof("data")
                if kind:
                    total += len(getattr(metric, kind).data_points)
    return total


class SpoolingExporter(MetricExporter):
    """An SDK ``MetricExporter`` that appends each collection to a spool and returns at once.

    ``on_append`` is called after each successful append (the agent wakes its
    :class:`Sender` with it). A record the spool cannot take (disk full, I/O
    error) is dropped and counted in :attr:`dropped_points`; ``export`` then
    returns ``FAILURE`` but never raises. :attr:`exported_records` and
    :attr:`exported_points` count what was spooled. The spool belongs to the
    caller: ``shutdown`` does not close it.
    """

    def __init__(
        self,
        spool: Spool,
        *,
        on_append: Callable[[], None] | None = None,
        preferred_temporality: dict[type, Any] | None = None,
        preferred_aggregation: dict[type, Any] | None = None,
    ) -> None:
        super().__init__(preferred_temporality=preferred_temporality, preferred_aggregation=preferred_aggregation)
        self.spool = spool
        self._on_append = on_append
        self._lock = threading.Lock()
        self.dropped_points: dict[str, int] = {}
        self.exported_records = 0
        self.exported_points = 0
        self._logged: set[str] = set()

    def _drop(self, reason: str, points: int, message: str) -> MetricExportResult:
        with self._lock:
            self.dropped_points[reason] = self.dropped_points.get(reason, 0) + points
            first = reason not in self._logged
            self._logged.add(reason)
        if first:
            _log.warning("%s; dropping %d points (logged once, counted in stethoscope.agent.points.dropped)",
                         message, points)
        return MetricExportResult.FAILURE

    def export(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any) -> MetricExportResult:
        points = count_points(metrics_data)
        if points == 0:
            return MetricExportResult.SUCCESS
        try:
            body = encode_metrics(metrics_data).SerializeToString()
        except Exception as exc:
            return self._drop("encode_error", points, f"could not encode a collection: {exc}")
        try:
            self.spool.append(body, weight=points)
        except SpoolError as exc:
            return self._drop("spool_error", points, str(exc))
        self.exported_records += 1
        self.exported_points += points
        if self._on_append is not None:
            self._on_append()
        return MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        pass


@dataclass(frozen=True)
class DeliveryStats:
    """What a :class:`Sender` has done so far."""

    sent_records: int = 0
    sent_bytes: int = 0
    requests: int = 0
    retries: int = 0
    dropped: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    """Records dropped, by reason (``http_400``, ``http_413``...)."""
    dropped_points: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    """Data points in those records, by the same reasons."""
    last_error: str | None = None


def _retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now)


class Sender:
    """Sends spooled records in order to ``url`` on its own thread.

    ``url`` is the full metrics URL (``http://host:4318/v1/metrics``).
    ``rng`` and ``sleep``-free waiting make the backoff testable: every wait
    is on an event that :meth:`shutdown` sets.
    """

    def __init__(
        self,
        spool: Spool,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        timeout_s: float = 10.0,
        gzip_body: bool = False,
        batch_max_records: int = 64,
        batch_max_bytes: int = 1024 * 1024,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
        retry_after_max_s: float = 300.0,
        max_attempts: int = 5,
        rng: random.Random | None = None,
        token: str | None = None,
        ca_file: str | None = None,
        client_cert_file: str | None = None,
        client_key_file: str | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"Sender needs an http(s) URL, got {url!r}")
        environ = os.environ if environ is None else environ
        signal = "LOGS" if parts.path.rstrip("/").endswith("/v1/logs") else "METRICS"
        self._tls: ssl.SSLContext | None = None
        if parts.scheme == "https":
            try:
                self._tls = client_tls_context(
                    ca_file if ca_file is not None else _env(environ, signal, "CERTIFICATE"),
                    client_cert_file if client_cert_file is not None else _env(environ, signal, "CLIENT_CERTIFICATE"),
                    client_key_file if client_key_file is not None else _env(environ, signal, "CLIENT_KEY"),
                )
            except (OSError, ssl.SSLError) as exc:  # a CA bundle that will not load
                raise ValueError(f"Sender: cannot load the CA file: {exc}") from exc
        if not headers and not token:
            headers = env_headers(environ, signal)
        self.spool = spool
        self.url = url
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port
        self._path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._headers = {"Content-Type": "application/x-protobuf", **dict(headers or {}), **bearer_headers(token)}
        if gzip_body:
            self._headers["Content-Encoding"] = "gzip"
        self._gzip = gzip_body
        self.timeout_s = timeout_s
        self.batch_max_records = batch_max_records
        self.batch_max_bytes = batch_max_bytes
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.retry_after_max_s = retry_after_max_s
        self.max_attempts = max_attempts
        self._rng = rng or random.Random()
        self._conn: http.client.HTTPConnection | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._kick = threading.Event()  # interrupts a backoff pause
        self._progress = threading.Condition()
        self._thread: threading.Thread | None = None
        self._deadline: float | None = None  # set while shutting down: drain until then
        self._attempt = 0
        self._single_until = 0  # after a rejected batch, send one record at a time up to here
        # After a failed attempt, or a restart mid-request, resend exactly the same
        # records (same Idempotency-Key): the spool remembers the last one in flight.
        self._pinned = spool.inflight
        self._failures_at_head = 0
        self._logged: set[str] = set()
        self._outage_logged = False
        self._stats_lock = threading.Lock()
        self._sent_records = self._sent_bytes = self._requests = self._retries = 0
        self._dropped: dict[str, int] = {}
        self._dropped_points: dict[str, int] = {}
        self.last_error: str | None = None

    # -- control ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the sending thread; idempotent."""
        if self._thread is None and not self._stop.is_set():
            self._thread = threading.Thread(target=self._run, name="stethoscope-sender", daemon=True)
            self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wake(self) -> None:
        """Tell the thread there is something new to send."""
        self._wake.set()

    def wait_drained(self, timeout_s: float) -> bool:
        """Block until the spool has nothing pending (True) or ``timeout_s`` passes (False)."""
        deadline = time.monotonic() + timeout_s
        with self._progress:
            while self.spool.pending > 0:
                left = deadline - time.monotonic()
                if left <= 0 or not self.running:
                    return self.spool.pending == 0
                self._progress.wait(min(left, 0.5))
        return True

    def shutdown(self, drain_timeout_s: float = 5.0) -> bool:
        """Keep sending for up to ``drain_timeout_s``, then stop; True if nothing is left pending.

        Whatever is left stays in the spool for the next start.
        """
        if self._thread is not None:
            self._deadline = time.monotonic() + max(0.0, drain_timeout_s)
            self._wake.set()
            self._kick.set()
            self._thread.join(max(0.0, drain_timeout_s) + self.timeout_s + 1.0)
        self._stop.set()
        self._wake.set()
        self._kick.set()
        if self._thread is not None:
            self._thread.join(1.0)
        self._close_conn()
        try:
            return self.spool.pending == 0
        except SpoolError:
            return False

    def stats(self) -> DeliveryStats:
        with self._stats_lock:
            return DeliveryStats(
                sent_records=self._sent_records,
                sent_bytes=self._sent_bytes,
                requests=self._requests,
                retries=self._retries,
                dropped=MappingProxyType(dict(self._dropped)),
                dropped_points=MappingProxyType(dict(self._dropped_points)),
                last_error=self.last_error,
            )

    # -- the loop --------------------------------------------------------------------------

    def _should_exit(self) -> bool:
        if self._stop.is_set():
            return True
        if self._deadline is not None:
            return self.spool.pending == 0 or time.monotonic() >= self._deadline
        return False

    def _pause(self, seconds: float) -> None:
        """Wait ``seconds``, cut short by :meth:`shutdown` (its drain deadline, or stop)."""
        end = time.monotonic() + seconds
        while not self._stop.is_set():
            limit = end if self._deadline is None else min(end, self._deadline)
            left = limit - time.monotonic()
            if left <= 0:
                return
            self._kick.wait(left)
            self._kick.clear()

    def _run(self) -> None:
        try:
            while not self._should_exit():
                try:
                    self._step()
                except Exception as exc:  # a bug must not stop delivery for good
                    self._note_error(f"{type(exc).__name__}: {exc}")
                    if "crash" not in self._logged:
                        self._logged.add("crash")
                        _log.exception("sender: unexpected error; retrying (data stays spooled)")
                    self._close_conn()
                    self._pause(1.0)
        finally:
            self._close_conn()
            with self._progress:
                self._progress.notify_all()

    def _step(self) -> None:
        self._wake.clear()
        try:
            limit = 1 if self._single_until else self.batch_max_records
            batch = self.spool.peek(limit, self.batch_max_bytes)
        except SpoolError as exc:
            self._note_error(f"spool: {exc}")
            self._pause(1.0)
            return
        if not batch:
            self._single_until = 0
            self.spool.sync_if_due()
            if self._deadline is None:
                self._wake.wait(1.0)
            return
        if batch[-1][0] > self._single_until:
            self._single_until = 0
        if self._pinned:
            if batch[0][0] <= self._pinned:
                batch = [rec for rec in batch if rec[0] <= self._pinned]
            self._pinned = 0
        self._deliver(batch)

    def _deliver(self, batch: list[tuple[int, bytes]]) -> None:
        body = b"".join(record for _, record in batch)
        wire = gzip.compress(body, compresslevel=5) if self._gzip else body
        # The same records always go out under the same key, so a collector with an
        # ingest journal stores them once however often they are sent.
        key = f"{self.spool.identity}:{batch[0][0]}-{batch[-1][0]}"
        self.spool.note_inflight(batch[-1][0])
        status, retry_after, detail = self._post(wire, key)
        with self._stats_lock:
            self._requests += 1
        last_seq = batch[-1][0]
        if status is not None and 200 <= status < 300:
            with self._stats_lock:  # count before the ack wakes anyone waiting for the drain
                self._sent_records += len(batch)
                self._sent_bytes += len(wire)
            self._acknowledge(last_seq)
            self._attempt = self._failures_at_head = 0
            if self._outage_logged:
                _log.info("delivery to %s recovered", self.url)
                self._outage_logged = False
            return
        what = f"HTTP {status}: {detail}" if status is not None else detail
        self._note_error(what)
        retryable = status is None or status in RETRYABLE_STATUS or status in (401, 403, 408)
        if not retryable and len(batch) > 1:
            self._single_until = last_seq  # find the bad record without losing its neighbours
            return
        if not retryable and status is not None and status >= 500:
            self._failures_at_head += 1
            retryable = self._failures_at_head < self.max_attempts
        if not retryable:
            self._reject(batch[0], status)
            return
        self._pinned = last_seq
        if not self._outage_logged:
            _log.warning("cannot deliver to %s (%s); keeping data spooled and retrying", self.url, what)
            self._outage_logged = True
        with self._stats_lock:
            self._retries += 1
        delay = _retry_after(retry_after, time.time())
        if delay is None:
            ceiling = min(self.backoff_max_s, self.backoff_initial_s * (2 ** min(self._attempt, 30)))
            delay = self._rng.uniform(0.0, ceiling)
        else:
            delay = min(delay, self.retry_after_max_s)
        self._attempt += 1
        self._pause(delay)

    def _reject(self, record: tuple[int, bytes], status: int | None) -> None:
        seq, data = record
        reason = f"http_{status}"
        points = _count_encoded_points(data)
        with self._stats_lock:  # count before the ack wakes anyone waiting for the drain
            self._dropped[reason] = self._dropped.get(reason, 0) + 1
            self._dropped_points[reason] = self._dropped_points.get(reason, 0) + points
        self._acknowledge(seq)
        self._failures_at_head = 0
        if reason not in self._logged:
            self._logged.add(reason)
            _log.warning(
                "%s rejected a record with HTTP %s (%s); dropped it and moving on "
                "(logged once per status, counted in stethoscope.agent.points.dropped)",
                self.url, status, self.last_error,
            )

    def _acknowledge(self, seq: int) -> None:
        try:
            self.spool.ack(seq)
        except SpoolError as exc:
            self._note_error(f"spool: {exc}")
        with self._progress:
            self._progress.notify_all()

    def _note_error(self, text: str) -> None:
        with self._stats_lock:
            self.last_error = text

    # -- HTTP ------------------------------------------------------------------------------

    def _post(self, body: bytes, key: str = "") -> tuple[int | None, str | None, str]:
        """(status, Retry-After, detail); status None for a connection failure."""
        headers = {**self._headers, "Idempotency-Key": key} if key else self._headers
        for fresh in (False, True):
            conn = self._conn
            reused = conn is not None and not fresh
            if conn is None or fresh:
                self._close_conn()
                if self._https:
                    conn = http.client.HTTPSConnection(self._host, self._port, timeout=self.timeout_s, context=self._tls)
                else:
                    conn = http.client.HTTPConnection(self._host, self._port, timeout=self.timeout_s)
                self._conn = conn
            try:
                conn.request("POST", self._path, body=body, headers=headers)
                resp = conn.getresponse()
                text = resp.read()
            except (OSError, http.client.HTTPException) as exc:
                self._close_conn()
                if reused:  # a kept-alive connection the server had closed: try once fresh
                    continue
                return None, None, f"{type(exc).__name__}: {exc}"
            if resp.will_close:
                self._close_conn()
            detail = text[:200].decode("utf-8", "replace") if text else resp.reason
            return resp.status, resp.getheader("Retry-After"), detail
        return None, None, "connection failed"  # pragma: no cover - loop always returns

    def _close_conn(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
