"""Table definitions: the OpenTelemetry Collector ClickHouse exporter's tables, plus ours.

Metric and log tables keep the exporter's column names and types, so the
OpenTelemetry Collector's ``clickhouseexporter`` (with ``create_schema: false``)
can write into the very tables Stethoscope creates. Timestamps are
``DateTime64(9)`` everywhere, as in the exporter's original metric schema, so
sub-second telemetry (per-step training timings) keeps its precision.

Beside them live Stethoscope's own tables: ``samples`` (model rows sampled by
the in-process SDK), ``labels`` (delayed ground truth, joined to samples on
``RequestId``), ``sampling_config`` (the sampling overrides served on
``/v1/sampling``), ``findings`` (what analytics concluded, for alert rules) and
``alerts`` (snapshots of the alert engine's state, see :mod:`stethoscope.alerts.schema`).

Every statement is idempotent (``IF NOT EXISTS``); changes after the first
release go in :data:`MIGRATIONS` and are recorded in ``schema_migrations``.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from stethoscope.alerts.schema import ALERTS_DDL, ATTEMPTS_DDL
from stethoscope.dashboards.rollups import ROLLUPS, rebuild_statements, view_statement

__all__ = [
    "Table",
    "Migration",
    "TABLES",
    "METRIC_TABLES",
    "LOGS_TABLE",
    "SAMPLES_TABLE",
    "LABELS_TABLE",
    "SAMPLING_CONFIG_TABLE",
    "FINDINGS_TABLE",
    "ALERTS_TABLE",
    "NOTIFICATION_ATTEMPTS_TABLE",
    "ACTIONS_TABLE",
    "MIGRATIONS",
    "SchemaOptions",
    "create_statements",
    "create_table_statement",
    "ttl_statements",
]

_MAP = "Map(LowCardinality(String), String)"

_METRIC_HEAD = [
    ("ResourceAttributes", _MAP, "CODEC(ZSTD(1))"),
    ("ResourceSchemaUrl", "String", "CODEC(ZSTD(1))"),
    ("ScopeName", "String", "CODEC(ZSTD(1))"),
    ("ScopeVersion", "String", "CODEC(ZSTD(1))"),
    ("ScopeAttributes", _MAP, "CODEC(ZSTD(1))"),
    ("ScopeDroppedAttrCount", "UInt32", "CODEC(ZSTD(1))"),
    ("ScopeSchemaUrl", "String", "CODEC(ZSTD(1))"),
    ("ServiceName", "LowCardinality(String)", "CODEC(ZSTD(1))"),
    ("MetricName", "LowCardinality(String)", "CODEC(ZSTD(1))"),
    ("MetricDescription", "String", "CODEC(ZSTD(1))"),
    ("MetricUnit", "String", "CODEC(ZSTD(1))"),
    ("Attributes", _MAP, "CODEC(ZSTD(1))"),
    ("StartTimeUnix", "DateTime64(9)", "CODEC(Delta, ZSTD(1))"),
    ("TimeUnix", "DateTime64(9)", "CODEC(Delta, ZSTD(1))"),
]

_EXEMPLARS = [
    ("Exemplars.FilteredAttributes", f"Array({_MAP})", "CODEC(ZSTD(1))"),
    ("Exemplars.TimeUnix", "Array(DateTime64(9))", "CODEC(ZSTD(1))"),
    ("Exemplars.Value", "Array(Float64)", "CODEC(ZSTD(1))"),
    ("Exemplars.SpanId", "Array(String)", "CODEC(ZSTD(1))"),
    ("Exemplars.TraceId", "Array(String)", "CODEC(ZSTD(1))"),
]

_MAP_INDEXES = [
    "INDEX idx_res_attr_key mapKeys(ResourceAttributes) TYPE bloom_filter(0.01) GRANULARITY 1",
    "INDEX idx_res_attr_value mapValues(ResourceAttributes) TYPE bloom_filter(0.01) GRANULARITY 1",
    "INDEX idx_scope_attr_key mapKeys(ScopeAttributes) TYPE bloom_filter(0.01) GRANULARITY 1",
    "INDEX idx_scope_attr_value mapValues(ScopeAttributes) TYPE bloom_filter(0.01) GRANULARITY 1",
]
_METRIC_INDEXES = [
    *_MAP_INDEXES,
    "INDEX idx_attr_key mapKeys(Attributes) TYPE bloom_filter(0.01) GRANULARITY 1",
    "INDEX idx_attr_value mapValues(Attributes) TYPE bloom_filter(0.01) GRANULARITY 1",
    "INDEX idx_time_minmax TimeUnix TYPE minmax GRANULARITY 1",
]
_METRIC_ORDER = "(ServiceName, MetricName, toStartOfHour(TimeUnix), cityHash64(Attributes), TimeUnix)"


@dataclass(frozen=True)
class Table:
    """One table: its columns (name, type, codec), indexes and layout."""

    name: str
    columns: tuple[tuple[str, str, str], ...]
    order_by: str
    partition_by: str
    ttl_column: str
    indexes: tuple[str, ...] = ()
    engine: str = "MergeTree"
    primary_key: str = ""

    @property
    def column_names(self) -> tuple[str, ...]:
        """Column names in DDL order (Nested sub-columns as ``Parent.Child``)."""
        return tuple(c[0] for c in self.columns)


def _metric(name: str, tail: list[tuple[str, str, str]]) -> Table:
    return Table(
        name=name,
        columns=tuple(_METRIC_HEAD + tail),
        order_by=_METRIC_ORDER,
        partition_by="toDate(TimeUnix)",
        ttl_column="TimeUnix",
        indexes=tuple(_METRIC_INDEXES),
    )


_FLAGS = ("Flags", "UInt32", "CODEC(ZSTD(1))")
_TEMPORALITY = ("AggregationTemporality", "Int32", "CODEC(ZSTD(1))")
_COUNT = ("Count", "UInt64", "CODEC(Delta, ZSTD(1))")
_SUM = ("Sum", "Float64", "CODEC(ZSTD(1))")
_MINMAX = [("Min", "Float64", "CODEC(ZSTD(1))"), ("Max", "Float64", "CODEC(ZSTD(1))")]

METRIC_TABLES: dict[str, Table] = {
    "gauge": _metric(
        "otel_metrics_gauge", [("Value", "Float64", "CODEC(ZSTD(1))"), _FLAGS, *_EXEMPLARS]
    ),
    "sum": _metric(
        "otel_metrics_sum",
        [
            ("Value", "Float64", "CODEC(ZSTD(1))"),
            _FLAGS,
            *_EXEMPLARS,
            _TEMPORALITY,
            ("IsMonotonic", "Bool", "CODEC(Delta, ZSTD(1))"),
        ],
    ),
    "histogram": _metric(
        "otel_metrics_histogram",
        [
            _COUNT,
            _SUM,
            ("BucketCounts", "Array(UInt64)", "CODEC(ZSTD(1))"),
            ("ExplicitBounds", "Array(Float64)", "CODEC(ZSTD(1))"),
            *_EXEMPLARS,
            _FLAGS,
            *_MINMAX,
            _TEMPORALITY,
        ],
    ),
    "exponential_histogram": _metric(
        "otel_metrics_exponential_histogram",
        [
            _COUNT,
            _SUM,
            ("Scale", "Int32", "CODEC(ZSTD(1))"),
            ("ZeroCount", "UInt64", "CODEC(ZSTD(1))"),
            ("PositiveOffset", "Int32", "CODEC(ZSTD(1))"),
            ("PositiveBucketCounts", "Array(UInt64)", "CODEC(ZSTD(1))"),
            ("NegativeOffset", "Int32", "CODEC(ZSTD(1))"),
            ("NegativeBucketCounts", "Array(UInt64)", "CODEC(ZSTD(1))"),
            *_EXEMPLARS,
            _FLAGS,
            *_MINMAX,
            _TEMPORALITY,
        ],
    ),
    "summary": _metric(
        "otel_metrics_summary",
        [
            _COUNT,
            _SUM,
            ("ValueAtQuantiles.Quantile", "Array(Float64)", "CODEC(ZSTD(1))"),
            ("ValueAtQuantiles.Value", "Array(Float64)", "CODEC(ZSTD(1))"),
            _FLAGS,
        ],
    ),
}

LOGS_TABLE = Table(
    name="otel_logs",
    columns=(
        ("Timestamp", "DateTime64(9)", "CODEC(Delta(8), ZSTD(1))"),
        # Kept for Grafana's ClickHouse plugin before v1.3, which filters on it;
        # the collector does not insert it, so it is filled by its DEFAULT.
        ("TimestampTime", "DateTime", "DEFAULT toDateTime(Timestamp)"),
        ("TraceId", "String", "CODEC(ZSTD(1))"),
        ("SpanId", "String", "CODEC(ZSTD(1))"),
        ("TraceFlags", "UInt8", ""),
        ("SeverityText", "LowCardinality(String)", "CODEC(ZSTD(1))"),
        ("SeverityNumber", "UInt8", ""),
        ("ServiceName", "LowCardinality(String)", "CODEC(ZSTD(1))"),
        ("Body", "String", "CODEC(ZSTD(1))"),
        ("ResourceSchemaUrl", "LowCardinality(String)", "CODEC(ZSTD(1))"),
        ("ResourceAttributes", _MAP, "CODEC(ZSTD(1))"),
        ("ScopeSchemaUrl", "LowCardinality(String)", "CODEC(ZSTD(1))"),
        ("ScopeName", "String", "CODEC(ZSTD(1))"),
        ("ScopeVersion", "LowCardinality(String)", "CODEC(ZSTD(1))"),
        ("ScopeAttributes", _MAP, "CODEC(ZSTD(1))"),
        ("LogAttributes", _MAP, "CODEC(ZSTD(1))"),
        ("EventName", "String", "CODEC(ZSTD(1))"),
    ),
    indexes=(
        "INDEX idx_trace_id TraceId TYPE bloom_filter(0.001) GRANULARITY 1",
        *_MAP_INDEXES,
        "INDEX idx_log_attr_key mapKeys(LogAttributes) TYPE bloom_filter(0.01) GRANULARITY 1",
        "INDEX idx_log_attr_value mapValues(LogAttributes) TYPE bloom_filter(0.01) GRANULARITY 1",
        "INDEX idx_body Body TYPE tokenbf_v1(32768, 3, 0) GRANULARITY 8",
    ),
    partition_by="toDate(TimestampTime)",
    primary_key="(ServiceName, TimestampTime)",
    order_by="(ServiceName, TimestampTime, Timestamp)",
    ttl_column="TimestampTime",
)

MIGRATIONS_TABLE = Table(
    name="schema_migrations",
    columns=(
        ("Version", "UInt32", ""),
        ("Description", "String", ""),
        ("AppliedAt", "DateTime64(3)", ""),
    ),
    engine="ReplacingMergeTree",
    order_by="Version",
    partition_by="",
    ttl_column="",
)

_REQUEST_ID_INDEX = "INDEX idx_request_id RequestId TYPE bloom_filter(0.001) GRANULARITY 1"

#: One row per model prediction sampled by the SDK (``event_name = stethoscope.sample``).
SAMPLES_TABLE = Table(
    name="samples",
    columns=(
        ("Timestamp", "DateTime64(9)", "CODEC(Delta(8), ZSTD(1))"),
        ("ServiceName", "LowCardinality(String)", "CODEC(ZSTD(1))"),
        ("Model", "LowCardinality(String)", "CODEC(ZSTD(1))"),
        ("ModelVersion", "LowCardinality(String)", "CODEC(ZSTD(1))"),
        ("Stream", "LowCardinality(String)", "CODEC(ZSTD(1))"),
        ("RequestId", "String", "CODEC(ZSTD(1))"),
        ("Features", "Array(Float32)", "CODEC(ZSTD(1))"),
        ("FeatureNames", "Array(LowCardinality(String))", "CODEC(ZSTD(1))"),
        ("Prediction", "Float64", "CODEC(ZSTD(1))"),
        ("PredictionLabel", "String", "CODEC(ZSTD(1))"),
        ("Confidence", "Float64", "CODEC(ZSTD(1))"),
        ("AdjustedCount", "Float64", "CODEC(ZSTD(1))"),
        ("SamplingThreshold", "String", "CODEC(ZSTD(1))"),
        ("Uncertain", "Bool", "CODEC(ZSTD(1))"),
        ("Attributes", _MAP, "CODEC(ZSTD(1))"),
        ("ResourceAttributes", _MAP, "CODEC(ZSTD(1))"),
    ),
    indexes=(_REQUEST_ID_INDEX,),
    partition_by="toDate(Timestamp)",
    order_by="(Model, ModelVersion, Stream, Timestamp)",
    ttl_column="Timestamp",
)

#: Ground truth that arrives after the prediction (``event_name = stethoscope.label``).
LABELS_TABLE = Table(
    name="labels",
    columns=(
        ("Timestamp", "DateTime64(9)", "CODEC(Delta(8), ZSTD(1))"),
        ("ServiceName", "LowCardinality(String)", "CODEC(ZSTD(1))"),
        ("Model", "LowCardinality(String)", "CODEC(ZSTD(1))"),
        ("RequestId", "String", "CODEC(ZSTD(1))"),
        ("Label", "Float64", "CODEC(ZSTD(1))"),
        ("LabelText", "String", "CODEC(ZSTD(1))"),
        ("Attributes", _MAP, "CODEC(ZSTD(1))"),
        ("ResourceAttributes", _MAP, "CODEC(ZSTD(1))"),
    ),
    indexes=(_REQUEST_ID_INDEX,),
    partition_by="toDate(Timestamp)",
    order_by="(Model, RequestId, Timestamp)",
    ttl_column="Timestamp",
)

#: Sampling overrides per ``<model>/<stream>``; the highest Version of a stream wins.
SAMPLING_CONFIG_TABLE = Table(
    name="sampling_config",
    columns=(
        ("Stream", "String", ""),
        ("Settings", "String", ""),
        ("Version", "UInt64", ""),
        ("ExpiresAt", "DateTime64(3)", ""),
        ("UpdatedAt", "DateTime64(3)", ""),
    ),
    engine="ReplacingMergeTree(Version)",
    order_by="Stream",
    partition_by="",
    ttl_column="",
)

#: What analytics concluded (drift, confidence, ...): one row per finding, generic so
#: alert rules can select on Kind/Severity/Drifted without knowing the method. Written
#: by :class:`stethoscope.analytics.findings.FindingsWriter`.
FINDINGS_TABLE = Table(
    name="findings",
    columns=(
        ("Time", "DateTime64(3)", "CODEC(Delta(8), ZSTD(1))"),
        ("Kind", "LowCardinality(String)", "CODEC(ZSTD(1))"),
        ("Subject", "String", "CODEC(ZSTD(1))"),
        ("Model", "LowCardinality(String)", "CODEC(ZSTD(1))"),
        ("ModelVersion", "LowCardinality(String)", "CODEC(ZSTD(1))"),
        ("Feature", "String", "CODEC(ZSTD(1))"),
        ("Method", "LowCardinality(String)", "CODEC(ZSTD(1))"),
        ("Statistic", "Float64", "CODEC(ZSTD(1))"),
        ("PValue", "Float64", "CODEC(ZSTD(1))"),
        ("Effect", "Float64", "CODEC(ZSTD(1))"),
        ("Threshold", "Float64", "CODEC(ZSTD(1))"),
        ("Severity", "LowCardinality(String)", "CODEC(ZSTD(1))"),
        ("Drifted", "Bool", "CODEC(ZSTD(1))"),
        ("WindowStart", "DateTime64(3)", "CODEC(ZSTD(1))"),
        ("WindowEnd", "DateTime64(3)", "CODEC(ZSTD(1))"),
        ("Details", "String", "CODEC(ZSTD(1))"),
        ("Labels", _MAP, "CODEC(ZSTD(1))"),
        ("InsertedAt", "DateTime64(3)", "DEFAULT now64(3) CODEC(Delta(8), ZSTD(1))"),
    ),
    partition_by="toDate(Time)",
    order_by="(Kind, Model, Time)",
    ttl_column="Time",
)


def _table_from_ddl(ddl: str) -> Table:
    """A :class:`Table` from a plain ``CREATE TABLE`` (one column per line, MergeTree, ORDER BY).

    Lets a module outside ``exporters`` own its table's definition (one source of truth)
    while the table is still created and migrated like every other.
    """
    name = re.search(r"CREATE TABLE IF NOT EXISTS (\w+)", ddl)
    order = re.search(r"^ORDER BY (.+)$", ddl, re.M)
    engine = re.search(r"^ENGINE = (\w+)\s*$", ddl, re.M)
    cols = tuple(
        (m.group(1), m.group(2), m.group(3))
        for m in re.finditer(r"^\s+(\w+) (.+?) (CODEC\(.*\)),?\s*$", ddl, re.M)
    )
    if not (name and order and engine and cols):
        raise AssertionError(f"cannot read table definition: {ddl}")
    return Table(name=name.group(1), columns=cols, order_by=order.group(1).strip(), partition_by="",
                 ttl_column="", engine=engine.group(1))


#: Snapshots of alert state (:mod:`stethoscope.alerts.schema` owns the definition);
#: written by :class:`stethoscope.alerts.runner.AlertRunner`, one snapshot per run. No TTL
#: (no time column); old versions may be deleted with ``ALTER TABLE alerts DELETE WHERE Version < ...``.
ALERTS_TABLE = _table_from_ddl(ALERTS_DDL)

#: The alert outbox and every delivery attempt (:mod:`stethoscope.alerts.outbox` owns the
#: definition); partitioned by day and kept as long as the store's TTL.
NOTIFICATION_ATTEMPTS_TABLE = dataclasses.replace(
    _table_from_ddl(ATTEMPTS_DDL), partition_by="toDate(Time)", ttl_column="Time"
)

#: The audit of remediation decisions (:mod:`stethoscope.alerts.actions`): one row per
#: decision, taken or skipped and why. The guards rebuild their state from it after a
#: restart. No TTL on purpose (an audit trail outlives telemetry); prune it by hand.
ACTIONS_TABLE = Table(
    name="actions",
    columns=(
        ("Time", "DateTime64(3)", "CODEC(Delta(8), ZSTD(1))"),
        ("ActionId", "String", "CODEC(ZSTD(1))"),
        ("Action", "LowCardinality(String)", "CODEC(ZSTD(1))"),
        ("Target", "String", "CODEC(ZSTD(1))"),
        ("Rule", "LowCardinality(String)", "CODEC(ZSTD(1))"),
        ("Fingerprint", "String", "CODEC(ZSTD(1))"),
        ("Decision", "LowCardinality(String)", "CODEC(ZSTD(1))"),
        ("Reason", "String", "CODEC(ZSTD(1))"),
        ("DryRun", "Bool", "CODEC(ZSTD(1))"),
        ("Params", "String", "CODEC(ZSTD(1))"),
        ("Result", "String", "CODEC(ZSTD(1))"),
        ("IdempotencyKey", "String", "CODEC(ZSTD(1))"),
    ),
    partition_by="toDate(Time)",
    order_by="(Time, ActionId)",
    ttl_column="",
)

#: Every table Stethoscope creates and keeps the TTL of (``schema_migrations`` aside).
TABLES: dict[str, Table] = {
    **{t.name: t for t in METRIC_TABLES.values()},
    LOGS_TABLE.name: LOGS_TABLE,
    SAMPLES_TABLE.name: SAMPLES_TABLE,
    LABELS_TABLE.name: LABELS_TABLE,
    SAMPLING_CONFIG_TABLE.name: SAMPLING_CONFIG_TABLE,
    FINDINGS_TABLE.name: FINDINGS_TABLE,
    ALERTS_TABLE.name: ALERTS_TABLE,
    NOTIFICATION_ATTEMPTS_TABLE.name: NOTIFICATION_ATTEMPTS_TABLE,
    ACTIONS_TABLE.name: ACTIONS_TABLE,
}

#: Per-minute and per-hour rollups of the gauge and sum tables, filled by materialized
#: views (:mod:`stethoscope.dashboards.rollups` owns the definitions); same TTL as the rest.
ROLLUP_TABLES: dict[str, Table] = {
    r.name: Table(name=r.name, columns=r.columns, order_by=r.order_by, partition_by=r.partition_by,
                  ttl_column=r.ttl_column, engine="AggregatingMergeTree")
    for r in ROLLUPS
}
TABLES.update(ROLLUP_TABLES)


@dataclass(frozen=True)
class SchemaOptions:
    """How to lay the tables out: database, TTL, and cluster settings."""

    database: str = "stethoscope"
    ttl_seconds: int = 0
    cluster: str = ""
    #: Replaces ``MergeTree`` for every table, e.g. ``ReplicatedMergeTree`` on a cluster.
    engine: str = ""
    #: How many recent insert tokens a plain MergeTree table remembers, so a
    #: retried batch is not stored twice. Replicated tables deduplicate by default.
    dedup_window: int = 1000

    def on_cluster(self) -> str:
        return f" ON CLUSTER {quote_ident(self.cluster)}" if self.cluster else ""


def quote_ident(name: str) -> str:
    """Quote a ClickHouse identifier with backticks.

    >>> quote_ident("otel_logs"), quote_ident("Exemplars.Value"), quote_ident("a`b")
    ('`otel_logs`', '`Exemplars.Value`', '`a\\\\`b`')
    """
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"


def ttl_expr(column: str, seconds: int) -> str:
    """A TTL clause in the largest unit that divides ``seconds`` evenly.

    >>> ttl_expr("TimeUnix", 7 * 86400)
    'toDateTime(TimeUnix) + toIntervalDay(7)'
    >>> ttl_expr("TimeUnix", 90 * 60)
    'toDateTime(TimeUnix) + toIntervalMinute(90)'
    """
    for unit, size in (("Day", 86400), ("Hour", 3600), ("Minute", 60), ("Second", 1)):
        if seconds % size == 0:
            return f"toDateTime({column}) + toInterval{unit}({seconds // size})"
    raise AssertionError("unreachable: every integer is a multiple of 1")


def _nested_groups(columns: tuple[tuple[str, str, str], ...]) -> list[str]:
    """Render columns, folding ``Parent.Child`` runs back into ``Nested(...)``."""
    out: list[str] = []
    i = 0
    while i < len(columns):
        name, typ, codec = columns[i]
        if "." in name:
            parent = name.split(".", 1)[0]
            members = []
            while i < len(columns) and columns[i][0].startswith(parent + "."):
                child, ctyp, _ = columns[i]
                inner = ctyp[len("Array(") : -1]  # Nested members are declared unwrapped
                members.append(f"{quote_ident(child.split('.', 1)[1])} {inner}")
                i += 1
            out.append(f"{quote_ident(parent)} Nested({', '.join(members)}) {codec}".rstrip())
            continue
        out.append(f"{quote_ident(name)} {typ} {codec}".rstrip())
        i += 1
    return out


def create_table_statement(t: Table, opts: SchemaOptions, *, db: str | None = None, on_cluster: str | None = None) -> str:
    """``CREATE TABLE IF NOT EXISTS`` for one table.

    ``db`` and ``on_cluster`` replace the quoted database and the ``ON CLUSTER``
    clause of ``opts``; migrations pass ``"{db}"`` and ``"{on_cluster}"`` so the
    store fills them in when it applies the statement.
    """
    db = quote_ident(opts.database) if db is None else db
    on_cluster = opts.on_cluster() if on_cluster is None else on_cluster
    body = ",\n    ".join(_nested_groups(t.columns) + list(t.indexes))
    engine = t.engine
    if opts.engine and engine == "MergeTree":
        engine = opts.engine
    elif opts.engine and engine == "AggregatingMergeTree":  # ReplicatedMergeTree -> ReplicatedAggregatingMergeTree
        engine = opts.engine.replace("MergeTree", "AggregatingMergeTree", 1)
    settings = ["index_granularity = 8192"]
    if t.ttl_column:
        settings.append("ttl_only_drop_parts = 1")
    if engine == "MergeTree" and opts.dedup_window > 0:
        settings.append(f"non_replicated_deduplication_window = {opts.dedup_window}")
    parts = [
        f"CREATE TABLE IF NOT EXISTS {db}.{quote_ident(t.name)}{on_cluster} (\n    {body}\n)",
        f"ENGINE = {engine}()" if "(" not in engine else f"ENGINE = {engine}",
    ]
    if t.partition_by:
        parts.append(f"PARTITION BY {t.partition_by}")
    if t.primary_key:
        parts.append(f"PRIMARY KEY {t.primary_key}")
    parts.append(f"ORDER BY {t.order_by}")
    if t.ttl_column and opts.ttl_seconds > 0:
        parts.append(f"TTL {ttl_expr(t.ttl_column, opts.ttl_seconds)}")
    parts.append("SETTINGS " + ", ".join(settings))
    return "\n".join(parts)


def create_statements(opts: SchemaOptions, tables: list[Table] | None = None) -> list[str]:
    """``CREATE ... IF NOT EXISTS`` statements for the database and ``tables``."""
    db = quote_ident(opts.database)
    stmts = [f"CREATE DATABASE IF NOT EXISTS {db}{opts.on_cluster()}"]
    tables = tables if tables is not None else [MIGRATIONS_TABLE, *TABLES.values()]
    for t in tables:
        stmts.append(create_table_statement(t, opts))
    names = {t.name for t in tables}
    stmts += [view_statement(r, db, opts.on_cluster()) for r in ROLLUPS if {r.name, r.reads} <= names]
    return stmts


def ttl_statements(opts: SchemaOptions, current: dict[str, str]) -> list[str]:
    """ALTERs that bring each table's TTL to ``opts``.

    ``current`` maps table name to its ``create_table_query`` as the server
    reports it; a table whose TTL already matches is left alone.
    """
    stmts = []
    for t in TABLES.values():
        ddl = current.get(t.name)
        if ddl is None or not t.ttl_column:
            continue
        target = ttl_expr(t.ttl_column, opts.ttl_seconds) if opts.ttl_seconds > 0 else ""
        has_ttl = " TTL " in ddl
        name = f"{quote_ident(opts.database)}.{quote_ident(t.name)}{opts.on_cluster()}"
        if target and target not in ddl:
            stmts.append(f"ALTER TABLE {name} MODIFY TTL {target}")
        elif not target and has_ttl:
            stmts.append(f"ALTER TABLE {name} REMOVE TTL")
    return stmts


@dataclass(frozen=True)
class Migration:
    """A numbered schema change applied once and recorded in ``schema_migrations``."""

    version: int
    description: str
    statements: tuple[str, ...]  # may use {db} and {on_cluster}


def _migration_ddl(*tables: Table) -> tuple[str, ...]:
    """CREATE statements with ``{db}``/``{on_cluster}`` placeholders, rendered from
    the same :class:`Table` as :func:`create_statements`, so both give one table.

    They use the default layout (``MergeTree``, no TTL). :meth:`Store.ensure_schema`
    runs :func:`create_statements` first, with the configured engine and TTL, so on
    our stores these find their tables already there and change nothing; TTLs are
    aligned afterwards either way.
    """
    out = []
    for t in tables:
        ddl = create_table_statement(t, SchemaOptions(), db="{db}", on_cluster="{on_cluster}")
        if ddl.count("{") != 2:  # str.format would trip on any other brace
            raise AssertionError(f"DDL of {t.name} contains braces: {ddl}")
        out.append(ddl)
    return tuple(out)


#: Version 1 is the initial layout created by :func:`create_statements`; later
#: changes append here and never edit an applied entry.
MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "initial OpenTelemetry metric and log tables", ()),
    Migration(
        2,
        "samples, labels and sampling_config tables for sampled model rows",
        _migration_ddl(SAMPLES_TABLE, LABELS_TABLE, SAMPLING_CONFIG_TABLE),
    ),
    Migration(3, "findings table for analytics results", _migration_ddl(FINDINGS_TABLE)),
    Migration(4, "alerts table for alert state snapshots", _migration_ddl(ALERTS_TABLE)),
    Migration(5, "notification_attempts table for the alert outbox", _migration_ddl(NOTIFICATION_ATTEMPTS_TABLE)),
    Migration(6, "actions table auditing every remediation decision", _migration_ddl(ACTIONS_TABLE)),
    Migration(
        7,
        "per-minute and per-hour rollups of gauges and sums, rebuilt from the rows already stored",
        (*_migration_ddl(*(ROLLUP_TABLES[r.name] for r in ROLLUPS if r.kind == "metric")),
         *(s for r in ROLLUPS if r.kind == "metric" for s in rebuild_statements(r, "{db}", "{on_cluster}"))),
    ),
    Migration(
        8,
        "findings.InsertedAt: when a finding was written, so alert rules read findings in the order they arrive",
        ("ALTER TABLE {db}.findings {on_cluster} ADD COLUMN IF NOT EXISTS InsertedAt DateTime64(3) "
         "DEFAULT now64(3) CODEC(Delta(8), ZSTD(1))",),
    ),
    Migration(
        9,
        "per-minute and per-hour rollups of histograms (the latency panels), rebuilt from the rows already stored",
        (*_migration_ddl(*(ROLLUP_TABLES[r.name] for r in ROLLUPS if r.kind == "histogram")),
         *(s for r in ROLLUPS if r.kind == "histogram" for s in rebuild_statements(r, "{db}", "{on_cluster}"))),
    ),
)
