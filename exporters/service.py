"""``stethoscope up``: collector, store and SQL endpoint in one process."""

from __future__ import annotations

import logging
import threading

from stethoscope.config import Config, parse_duration

from .http_common import Listener
from .ingest import Ingestor
from .otlp import LOG_COLUMNS, MetricsDecoder
from .otlp_http import OtlpHandler
from .schema import LOGS_TABLE, METRIC_TABLES, SchemaOptions
from .selfmetrics import SelfMetrics
from .sql_http import SqlHandler
from .store import Store, open_store

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


class Service:
    """The running ``up`` process. ``start()`` binds the ports; ``stop()`` drains and closes."""

    def __init__(self, cfg: Config, *, store: Store | None = None) -> None:
        self.cfg = cfg
        self.metrics = SelfMetrics()
        self.store = store or open_configured_store(cfg)
        self._owns_store = store is None
        self.ingestor: Ingestor | None = None
        self.otlp: Listener | None = None
        self.sql: Listener | None = None
        self._stopped = threading.Event()

    def start(self) -> None:
        cfg = self.cfg
        try:
            applied = self.store.ensure_schema()
            if applied:
                log.info("schema migrations applied: %s", applied)
            columns = {t.name: t.column_names for t in METRIC_TABLES.values()}
            columns[LOGS_TABLE.name] = LOG_COLUMNS
            self.ingestor = Ingestor(
                self.store,
                columns,
                batch_rows=cfg.store.batch_rows,
                flush_interval_s=parse_duration(cfg.store.flush_interval),
                queue_max_rows=cfg.store.queue_max_rows,
                attempts=cfg.store.insert_attempts,
                metrics=self.metrics,
            )
            self.ingestor.start()
            decoder = MetricsDecoder(cfg.collector.decoder)
            log.info("OTLP metrics decoding: %s", decoder.implementation)
            self.otlp = Listener(
                (cfg.collector.host, cfg.collector.otlp_http_port),
                OtlpHandler,
                metrics=self.metrics,
                store=self.store,
                ingestor=self.ingestor,
                metrics_decoder=decoder,
                max_body_bytes=cfg.collector.max_body_bytes,
                request_timeout_s=parse_duration(cfg.collector.request_timeout),
            )
            self.sql = Listener(
                (cfg.sql.host, cfg.sql.port),
                SqlHandler,
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
            "stethoscope up: OTLP/HTTP on http://%s:%d, SQL on http://%s:%d (%s), store %s",
            cfg.collector.host,
            self.otlp.port,
            cfg.sql.host,
            self.sql.port,
            "read-write" if cfg.sql.writable else "read-only",
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
        if self.otlp is not None:
            self.otlp.stop()
        if self.ingestor is not None:
            self.ingestor.close()
        if self.sql is not None:
            self.sql.stop()
        if self._owns_store:
            self.store.close()
        log.info("stethoscope stopped")
