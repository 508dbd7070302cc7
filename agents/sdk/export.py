"""Getting SDK data to the collector: metrics as OTLP MetricsData, rows as OTLP log records.

:class:`Delivery` owns one endpoint's two pipes:

* **metrics** -- the monitors build ``MetricsData`` themselves (their sketches,
  per-step gauges and sums don't fit the SDK's instruments) and hand it to
  :meth:`Delivery.export_metrics`, which posts it with the SDK's
  ``OTLPMetricExporter``, or, with ``spool_dir``, appends it to the node
  agent's on-disk :class:`~stethoscope.agents.spool.Spool` for a
  :class:`~stethoscope.agents.delivery.Sender` thread to deliver (durable
  across collector outages and restarts);
* **rows** -- sampled rows and labels are OTLP log records with an
  ``event_name``, emitted through a private ``LoggerProvider`` and
  ``BatchLogRecordProcessor`` (its own thread; ``emit`` never waits on the
  network) to ``OTLPLogExporter``, or to a second spool with ``spool_dir``.

Only the monitors' background threads call in here; nothing here runs on a
caller's hot path.

Authentication and TLS: ``token`` is sent as ``Authorization: Bearer`` on both
pipes and ``ca_file`` verifies an ``https`` collector. Without them the
standard ``OTEL_EXPORTER_OTLP_HEADERS`` and ``OTEL_EXPORTER_OTLP_CERTIFICATE``
variables apply, whether the data goes through the OTLP exporters or a spool.
The exporters' ``requests`` session would let ``REQUESTS_CA_BUNDLE`` or
``CURL_CA_BUNDLE`` silently replace a CA file (requests merges the environment
over the session's ``verify``), so with ``ca_file`` they get a session that
keeps it.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from opentelemetry.exporter.otlp.proto.common._log_encoder import encode_logs
from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.metrics import NoOpMeterProvider
from opentelemetry.sdk._logs import LoggerProvider, ReadableLogRecord
from opentelemetry.sdk._logs.export import BatchLogRecordProcessor, LogRecordExporter, LogRecordExportResult
from opentelemetry.sdk.metrics.export import (
    Metric,
    MetricExporter,
    MetricExportResult,
    MetricsData,
    ResourceMetrics,
    ScopeMetrics,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.util.types import Attributes

from ..delivery import Sender, SpoolingExporter, bearer_headers
from ..spool import Spool, SpoolError

__all__ = ["Delivery", "SpoolingLogExporter", "SCOPE_NAME", "LOGS_PATH", "METRICS_PATH"]

_log = logging.getLogger("stethoscope.agents.sdk")

SCOPE_NAME = "stethoscope.agents.sdk"
METRICS_PATH = "/v1/metrics"
LOGS_PATH = "/v1/logs"
MiB = 1024 * 1024


def _pinned_ca_session(ca_file: str) -> Any:
    """A ``requests`` session that verifies with ``ca_file`` whatever the environment says."""
    import requests

    class _PinnedCASession(requests.Session):
        def merge_environment_settings(self, url, proxies, stream, verify, cert):  # noqa: ANN001 - requests' signature
            merged = super().merge_environment_settings(url, proxies, stream, verify, cert)
            merged["verify"] = ca_file
            return merged

    session = _PinnedCASession()
    session.verify = ca_file
    return session


class SpoolingLogExporter(LogRecordExporter):
    """Appends each batch of log records, OTLP-encoded, to a spool; never raises."""

    def __init__(self, spool: Spool, *, on_append: Any = None) -> None:
        self.spool = spool
        self._on_append = on_append
        self.dropped_records = 0

    def export(self, batch: Sequence[ReadableLogRecord]) -> LogRecordExportResult:
        if not batch:
            return LogRecordExportResult.SUCCESS
        try:
            self.spool.append(encode_logs(batch).SerializeToString(), weight=len(batch))
        except (SpoolError, ValueError) as exc:
            self.dropped_records += len(batch)
            _log.warning("could not spool %d log records: %s", len(batch), exc)
            return LogRecordExportResult.FAILURE
        if self._on_append is not None:
            self._on_append()
        return LogRecordExportResult.SUCCESS

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True


class Delivery:
    """Metrics and log records to one collector ``endpoint`` (base URL).

    ``metric_exporter``/``log_exporter`` replace the network exporters (tests
    pass in-memory ones). Construction errors in the spool raise
    :class:`~stethoscope.agents.spool.SpoolError`; after that nothing raises.
    """

    def __init__(
        self,
        endpoint: str,
        resource: Resource,
        *,
        scope_version: str = "",
        headers: Mapping[str, str] | None = None,
        timeout_s: float = 10.0,
        spool_dir: str | os.PathLike[str] | None = None,
        spool_max_bytes: int = 64 * MiB,
        metric_exporter: MetricExporter | None = None,
        log_exporter: LogRecordExporter | None = None,
        log_schedule_delay_ms: float = 1000.0,
        log_queue_size: int = 8192,
        token: str | None = None,
        ca_file: str | None = None,
    ) -> None:
        base = endpoint.rstrip("/")
        self.resource = resource
        self.scope = InstrumentationScope(SCOPE_NAME, scope_version or None)
        self.timeout_s = timeout_s
        self._senders: list[Sender] = []
        self._spools: list[Spool] = []
        hdrs = {**dict(headers or {}), **bearer_headers(token)}
        tls = {"certificate_file": ca_file} if ca_file else {}
        if metric_exporter is None and log_exporter is None and spool_dir is not None:
            root = Path(spool_dir)
            mspool = Spool(root / "metrics", max_bytes=spool_max_bytes)
            self._spools.append(mspool)
            lspool = Spool(root / "logs", max_bytes=spool_max_bytes)
            self._spools.append(lspool)
            msender = Sender(mspool, base + METRICS_PATH, headers=hdrs, timeout_s=timeout_s, ca_file=ca_file)
            lsender = Sender(lspool, base + LOGS_PATH, headers=hdrs, timeout_s=timeout_s, ca_file=ca_file)
            self._senders += [msender, lsender]
            metric_exporter = SpoolingExporter(mspool, on_append=msender.wake)
            log_exporter = SpoolingLogExporter(lspool, on_append=lsender.wake)
            for sender in self._senders:
                sender.start()
        if metric_exporter is None:
            metric_exporter = OTLPMetricExporter(
                endpoint=base + METRICS_PATH, headers=hdrs, timeout=timeout_s,
                **tls, **({"session": _pinned_ca_session(ca_file)} if ca_file else {}))
        if log_exporter is None:
            log_exporter = OTLPLogExporter(
                endpoint=base + LOGS_PATH, headers=hdrs, timeout=timeout_s,
                **tls, **({"session": _pinned_ca_session(ca_file)} if ca_file else {}))
        self._metric_exporter = metric_exporter
        self._log_exporter = log_exporter
        self._provider = LoggerProvider(resource=resource, shutdown_on_exit=False, meter_provider=NoOpMeterProvider())
        self._processor = BatchLogRecordProcessor(
            self._log_exporter, schedule_delay_millis=log_schedule_delay_ms, max_queue_size=log_queue_size,
            max_export_batch_size=min(512, log_queue_size), meter_provider=NoOpMeterProvider(),
        )
        self._provider.add_log_record_processor(self._processor)
        self._logger = self._provider.get_logger(SCOPE_NAME, scope_version or None)
        self._lock = threading.Lock()
        self._closed = False
        self.failed_exports = 0

    def export_metrics(self, metrics: Sequence[Metric]) -> bool:
        """Send one collection; True on success (never raises)."""
        if not metrics or self._closed:
            return True
        data = MetricsData(resource_metrics=[ResourceMetrics(
            resource=self.resource,
            scope_metrics=[ScopeMetrics(scope=self.scope, metrics=list(metrics), schema_url="")],
            schema_url="",
        )])
        try:
            ok = self._metric_exporter.export(data, timeout_millis=self.timeout_s * 1000) is MetricExportResult.SUCCESS
        except Exception as exc:  # an exporter bug must not take the monitor's thread down
            _log.warning("metric export failed: %s", exc)
            ok = False
        if not ok:
            self.failed_exports += 1
        return ok

    def emit(self, event_name: str, timestamp_ns: int, attributes: Attributes) -> None:
        """Queue one log record (the batch processor's thread exports it)."""
        if self._closed:
            return
        try:
            self._logger.emit(timestamp=timestamp_ns, observed_timestamp=timestamp_ns, event_name=event_name,
                              attributes=attributes)
        except Exception as exc:
            _log.warning("could not queue a %s record: %s", event_name, exc)

    def flush(self, timeout_s: float | None = None) -> bool:
        """Push queued log records out; with a spool, wait for both spools to drain."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        try:
            ok = bool(self._processor.force_flush(int(timeout * 1000)))
        except Exception as exc:
            _log.warning("log flush failed: %s", exc)
            ok = False
        for sender in self._senders:
            ok = sender.wait_drained(timeout) and ok
        return ok

    def shutdown(self, timeout_s: float | None = None) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        timeout = self.timeout_s if timeout_s is None else timeout_s
        for step in (self._provider.shutdown, self._metric_exporter.shutdown):
            try:
                step()
            except Exception as exc:
                _log.warning("shutdown: %s", exc)
        for sender in self._senders:
            sender.shutdown(drain_timeout_s=timeout)
        for spool in self._spools:
            spool.close()
