"""Prometheus metrics about Stethoscope's own collector, store and SQL endpoint."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["SelfMetrics"]


class SelfMetrics:
    """All self-telemetry in one registry of its own (never the global default).

    >>> m = SelfMetrics()
    >>> m.points_received.labels(signal="metrics").inc(3)
    >>> b"stethoscope_points_received_total{signal=\\"metrics\\"} 3.0" in m.exposition()[0]
    True
    """

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.points_received = Counter(
            "stethoscope_points_received", "Data points and log records accepted by the receivers.", ["signal"], registry=r
        )
        self.requests = Counter(
            "stethoscope_http_requests", "HTTP requests answered, by endpoint and status code.", ["endpoint", "code"], registry=r
        )
        self.rejects = Counter(
            "stethoscope_rejects", "Requests refused, by endpoint and reason.", ["endpoint", "reason"], registry=r
        )
        self.rows_written = Counter("stethoscope_rows_written", "Rows inserted into the store.", ["table"], registry=r)
        self.batches = Counter(
            "stethoscope_batches", "Insert batches, by table and outcome (ok, retried, failed).", ["table", "outcome"], registry=r
        )
        self.queue_rows = Gauge("stethoscope_queue_rows", "Rows waiting to be inserted or being inserted.", registry=r)
        self.insert_seconds = Histogram(
            "stethoscope_insert_duration_seconds",
            "Time to insert one batch, retries included.",
            ["table"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.samples_rejected = Counter(
            "stethoscope_samples_rejected",
            "Sample and label records dropped for breaking the contract, by reason.",
            ["reason"],
            registry=r,
        )
        self.cardinality_overflow = Counter(
            "stethoscope_cardinality_overflow_points",
            "Data points whose attributes were replaced by otel.metric.overflow=true (cardinality limit).",
            registry=r,
        )
        self.cardinality_untracked = Counter(
            "stethoscope_cardinality_untracked_points",
            "Data points of metric names beyond the tracked-name bound, passed through without a limit.",
            registry=r,
        )
        self.cardinality_series = Gauge(
            "stethoscope_cardinality_series", "Distinct attribute sets tracked in the current window.", registry=r
        )
        self.clock_skew_points = Counter(
            "stethoscope_points_clock_skew",
            "Accepted data points stamped more than 5 minutes from the collector's clock (sampled, a lower bound).",
            ["direction"],
            registry=r,
        )
        self.duplicate_requests = Counter(
            "stethoscope_duplicate_requests",
            "Requests answered without storing because their Idempotency-Key was already stored or in flight.",
            registry=r,
        )
        self.journal_pending = Gauge(
            "stethoscope_journal_pending_batches",
            "Batches in the ingest journal not yet confirmed stored (held while the store is unavailable).",
            registry=r,
        )
        self.sql_queries = Counter(
            "stethoscope_sql_queries", "Queries run through the SQL endpoint, by outcome.", ["outcome"], registry=r
        )

    def exposition(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
