"""``stethoscope up``: collector, store and SQL endpoint in one process."""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from stethoscope.config import Config, parse_duration

from .auth import listener_security
from .cardinality import CardinalityLimiter
from .http_common import Listener
from .ingest import Ingestor
from .journal import Journal
from .otlp import LOG_COLUMNS, MetricsDecoder
from .otlp_http import OtlpHandler, RejectedRecords
from .sampling_config import SamplingConfig
from .schema import LABELS_TABLE, LOGS_TABLE, METRIC_TABLES, SAMPLES_TABLE, SchemaOptions
from .selfmetrics import SelfMetrics
from .sql_http import SqlHandler
from .store import Store, open_store

if TYPE_CHECKING:
    from stethoscope.alerts.runner import AlertRunner
    from stethoscope.analytics.anomaly_scheduler import AnomalyScheduler
    from stethoscope.analytics.scheduler import DriftScheduler

__all__ = ["Service", "open_configured_store"]

log = logging.getLogger(__name__)


def open_configured_store(cfg: Config) -> Store:
    """The store the configuration names: a ClickHouse server if a URL is set, else chDB."""
    s = cfg.store
    schema = SchemaOptions(
        database=s.database, ttl_seconds=int(parse_duration(s.ttl)), cluster=s.cluster, engine=s.engine
    )
    if s.clickhouse_url:
        return open_store("clickhouse", url=s.clickhouse_url, schema=schema)
    return open_store("chdb", data_dir=s.data_dir, schema=schema)


def _journal(cfg: Config) -> Journal | None:
    """The ingest journal ``store.journal`` asks for, under ``store.journal_dir``."""
    if not cfg.store.journal:
        return None
    import os

    return Journal(cfg.store.journal_dir or os.path.join(cfg.store.data_dir, "journal"))


def _drift_scheduler(cfg: Config, store: Store) -> DriftScheduler:
    """The drift scheduler ``[analytics]`` describes (SciPy and pyarrow: the ``server`` extra, as for ``up``)."""
    from stethoscope.analytics.scheduler import DriftScheduler

    return DriftScheduler.from_config(store, cfg.analytics)


def _anomaly_scheduler(cfg: Config, store: Store, alerts: AlertRunner | None) -> AnomalyScheduler:
    """The training, fleet, serving and cost watches ``[anomaly]`` describes; new findings wake the alert runner."""
    from stethoscope.analytics.anomaly_scheduler import AnomalyScheduler
    from stethoscope.analytics.fleet_watch import watches_from_config
    from stethoscope.analytics.training_analysis import TrainingWatch

    watches = [TrainingWatch(lookback_s=parse_duration(cfg.anomaly.lookback)), *watches_from_config(cfg)]
    return AnomalyScheduler(store, watches, interval_s=parse_duration(cfg.anomaly.interval),
                            on_findings=alerts.wake if alerts is not None else None)


class Service:
    """The running ``up`` process. ``start()`` binds the ports; ``stop()`` drains and closes.

    ``sampling_budget`` and ``sampling_default_target`` (rows/s) shape the
    document served on ``/v1/sampling`` (:mod:`.sampling_config`).
    """

    def __init__(
        self,
        cfg: Config,
        *,
        store: Store | None = None,
        sampling_budget: float | None = None,
        sampling_default_target: float | None = None,
    ) -> None:
        self.cfg = cfg
        self.metrics = SelfMetrics()
        self.store = store or open_configured_store(cfg)
        self._owns_store = store is None
        self._sampling_budget = cfg.collector.sampling_budget if sampling_budget is None else sampling_budget
        self._sampling_default_target = (
            cfg.collector.sampling_default_target if sampling_default_target is None else sampling_default_target
        )
        #: Sample and label records dropped for breaking the contract, by reason.
        self.rejected_records = RejectedRecords(self.metrics)
        self.sampling: SamplingConfig | None = None
        self.ingestor: Ingestor | None = None
        self.scheduler: DriftScheduler | None = None
        self.alerts: AlertRunner | None = None
        self.anomaly: AnomalyScheduler | None = None
        self.otlp: Listener | None = None
        self.sql: Listener | None = None
        self._stopped = threading.Event()

    def start(self) -> None:
        cfg = self.cfg
        try:
            tokens, tls = listener_security(cfg)  # refuses an open non-loopback listener (ConfigError)
            applied = self.store.ensure_schema()
            if applied:
                log.info("schema migrations applied: %s", applied)
            columns = {t.name: t.column_names for t in METRIC_TABLES.values()}
            columns[LOGS_TABLE.name] = LOG_COLUMNS
            columns[SAMPLES_TABLE.name] = SAMPLES_TABLE.column_names
            columns[LABELS_TABLE.name] = LABELS_TABLE.column_names
            self.sampling = SamplingConfig(
                self.store,
                global_budget_rows_per_s=self._sampling_budget,
                default_target_rows_per_s=self._sampling_default_target,
            )
            self.sampling.load()
            self.ingestor = Ingestor(
                self.store,
                columns,
                batch_rows=cfg.store.batch_rows,
                flush_interval_s=parse_duration(cfg.store.flush_interval),
                queue_max_rows=cfg.store.queue_max_rows,
                attempts=cfg.store.insert_attempts,
                metrics=self.metrics,
                journal=_journal(cfg),
            )
            self.ingestor.start()
            if cfg.analytics.enabled:
                self.scheduler = _drift_scheduler(cfg, self.store)
                self.scheduler.start()
            if cfg.alerts.enabled:
                from stethoscope.alerts.runner import runner_from_config

                self.alerts = runner_from_config(cfg, self.store)
                self.alerts.start()
            if cfg.anomaly.enabled:
                self.anomaly = _anomaly_scheduler(cfg, self.store, self.alerts)
                self.anomaly.start()
            limit = cfg.collector.cardinality_limit
            decoder = MetricsDecoder(
                cfg.collector.decoder, limiter=CardinalityLimiter(limit, metrics=self.metrics) if limit else None
            )
            log.info("OTLP metrics decoding: %s", decoder.implementation)
            self.otlp = Listener(
                (cfg.collector.host, cfg.collector.otlp_http_port),
                OtlpHandler,
                tls=tls,
                auth=tokens,
                metrics=self.metrics,
                store=self.store,
                ingestor=self.ingestor,
                metrics_decoder=decoder,
                sampling=self.sampling,
                rejected_records=self.rejected_records,
                max_body_bytes=cfg.collector.max_body_bytes,
                request_timeout_s=parse_duration(cfg.collector.request_timeout),
            )
            self.sql = Listener(
                (cfg.sql.host, cfg.sql.port),
                SqlHandler,
                tls=tls,
                auth=tokens,
                metrics=self.metrics,
                store=self.store,
                writable=cfg.sql.writable,
                max_body_bytes=cfg.sql.max_body_bytes,
                timezone=self._timezone(),
            )
        except BaseException:
            self.stop()
            raise
        self.otlp.start("stethoscope-otlp-http")
        self.sql.start("stethoscope-sql-http")
        log.info(
            "stethoscope up: OTLP/HTTP on %s://%s:%d, SQL on %s://%s:%d (%s, %s), store %s",
            self.otlp.scheme,
            cfg.collector.host,
            self.otlp.port,
            self.sql.scheme,
            cfg.sql.host,
            self.sql.port,
            "read-write" if cfg.sql.writable else "read-only",
            f"{len(tokens)} tokens" if tokens is not None else "no tokens",
            cfg.store.clickhouse_url.split("@")[-1] if cfg.store.clickhouse_url else f"chDB in {cfg.store.data_dir}",
        )

    def _timezone(self) -> str:
        try:
            return self.store.query("SELECT timezone()", "TabSeparated").data.decode().strip() or "UTC"
        except Exception:  # only a response header depends on it
            return "UTC"

    def stop(self) -> None:
        """Stop accepting, store what was accepted, close the store. Idempotent."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self.scheduler is not None:
            self.scheduler.stop()
        if self.anomaly is not None:
            self.anomaly.stop()
        if self.alerts is not None:
            self.alerts.stop()
        if self.otlp is not None:
            self.otlp.stop()
        if self.ingestor is not None:
            self.ingestor.close()
        if self.sql is not None:
            self.sql.stop()
        if self._owns_store:
            self.store.close()
        log.info("stethoscope stopped")
