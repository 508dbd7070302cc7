"""Per-minute and per-hour rollups of the gauge and sum metric tables, and how panels pick them.

Histograms (the SDK's latency) have the same two rollups, with the bucket counts summed.

A rollup is an ``AggregatingMergeTree`` table filled by a materialized view
(``CREATE MATERIALIZED VIEW ... TO <rollup>``) on a raw table (the minute rollups) or
on the minute rollup (the hourly ones). Each row summarises one series
(service, metric, cluster, node and the point's ``Attributes``) over one minute or one
hour: ``Count``, ``Sum``, ``Min``, ``Max`` and the earliest ``StartTime``, all
``SimpleAggregateFunction`` columns, so a query reads them with plain ``sum``,
``min`` and ``max`` whether or not the parts have merged yet. ``Cluster`` and ``Node``
(from ``ResourceAttributes``) and ``Gpu`` (``Attributes['gpu.index']``) have their own
columns, so fleet panels need not decode a map per row.

This module holds plain data only: :mod:`stethoscope.exporters.schema` turns
:data:`ROLLUPS` into tables with the store's engine, database and TTL, and
``schema_migrations`` version 7 creates them (with a backfill) in existing stores.

A materialized view only sees rows inserted after it exists. Migration 7 therefore
rebuilds each rollup from what is already stored (:func:`rebuild_statements`: drop the
view, empty the rollup, copy every row of the table the view reads, create the view
again). The same
statements rebuild a rollup by hand; :func:`backfill_statement` copies a chosen time
range only.

Panels choose between the raw table and a rollup inside one query (:func:`pick`): a
``UNION ALL`` of branches, each guarded by a condition on the dashboard range or the
panel interval that folds to a constant, so ClickHouse reads only the chosen table.

Examples:
    >>> [r.name for r in ROLLUPS]  # doctest: +NORMALIZE_WHITESPACE
    ['otel_metrics_gauge_1m', 'otel_metrics_gauge_1h', 'otel_metrics_sum_1m', 'otel_metrics_sum_1h',
     'otel_metrics_histogram_1m', 'otel_metrics_histogram_1h']
    >>> print(GAUGE.at(60)["avg"], "|", GAUGE.at(0)["avg"])
    sum(Sum) / sum(Count) | avg(Value)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

__all__ = [
    "GAUGE",
    "HISTOGRAM",
    "LONG_RANGE_S",
    "ROLLUPS",
    "SUM",
    "TIERS",
    "Dialect",
    "Rollup",
    "backfill_statement",
    "pick",
    "rebuild_statements",
    "step_expr",
    "tier_condition",
    "view_statement",
]

# ``any`` over a map of LowCardinality keys returns plain String keys, so the rollup stores those.
_MAP = "Map(String, String)"

#: Whole-range panels (stats, tables) read the rollups when the range is longer than this (seconds).
LONG_RANGE_S = 6 * 3600

_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("Time", "DateTime", "CODEC(Delta, ZSTD(1))"),
    ("ServiceName", "LowCardinality(String)", "CODEC(ZSTD(1))"),
    ("MetricName", "LowCardinality(String)", "CODEC(ZSTD(1))"),
    ("Cluster", "LowCardinality(String)", "CODEC(ZSTD(1))"),
    ("Node", "LowCardinality(String)", "CODEC(ZSTD(1))"),
    ("Gpu", "LowCardinality(String)", "CODEC(ZSTD(1))"),
    ("AttributesHash", "UInt64", "CODEC(ZSTD(1))"),
    ("Attributes", f"SimpleAggregateFunction(any, {_MAP})", "CODEC(ZSTD(1))"),
    ("StartTime", "SimpleAggregateFunction(min, DateTime64(9))", "CODEC(ZSTD(1))"),
    ("Count", "SimpleAggregateFunction(sum, UInt64)", "CODEC(ZSTD(1))"),
    ("Sum", "SimpleAggregateFunction(sum, Float64)", "CODEC(ZSTD(1))"),
    ("Min", "SimpleAggregateFunction(min, Float64)", "CODEC(ZSTD(1))"),
    ("Max", "SimpleAggregateFunction(max, Float64)", "CODEC(ZSTD(1))"),
)

#: Histogram rollups add the bucket counts, summed element by element (a ``sumForEach``
#: state, read with ``sumForEachMerge``), and the bucket bounds.
_HISTOGRAM_COLUMNS = (
    *_COLUMNS,
    ("BucketCounts", "AggregateFunction(sumForEach, Array(UInt64))", "CODEC(ZSTD(1))"),
    ("ExplicitBounds", "SimpleAggregateFunction(any, Array(Float64))", "CODEC(ZSTD(1))"),
)

# Rows of one series and one time bucket merge into one: every key column is in ORDER BY.
_ORDER_BY = "(MetricName, Time, Cluster, Node, Gpu, ServiceName, AttributesHash)"


@dataclass(frozen=True)
class Rollup:
    """One rollup table: its name, the raw table it summarises, and its time grain in seconds.

    ``feeder`` names a finer rollup of the same raw table that the view reads instead of
    the raw rows (the hourly rollups are fed by the minute ones: far fewer rows to
    aggregate on every insert).
    """

    name: str
    source: str
    grain_s: int
    feeder: str = ""
    columns: tuple[tuple[str, str, str], ...] = _COLUMNS
    #: ``metric`` (gauge and sum rows: ``Value``) or ``histogram`` (``Count``, ``Sum``, ``Min``,
    #: ``Max`` and the bucket counts of each point).
    kind: str = "metric"
    order_by: str = _ORDER_BY
    partition_by: str = "toDate(Time)"
    ttl_column: str = "Time"

    @property
    def view(self) -> str:
        """Name of the materialized view that fills the table."""
        return f"{self.name}_mv"

    @property
    def reads(self) -> str:
        """The table the view reads: the feeder rollup, or else the raw table."""
        return self.feeder or self.source

    def select(self, source: str, where: str = "") -> str:
        """The aggregation from ``source`` (the qualified :attr:`reads` table), optionally filtered.

        >>> "INTERVAL 60 second" in ROLLUPS[0].select("db.t")
        True
        """
        hist = self.kind == "histogram"
        if self.feeder:
            # Re-aggregate a finer rollup; the inner query renames what the outer one aggregates.
            inner = ("SELECT Time AS T, ServiceName, MetricName, Cluster, Node, Gpu, AttributesHash, Attributes AS A,"
                     " StartTime AS S, Count AS C, Sum AS Su, Min AS Mi, Max AS Ma"
                     + (", BucketCounts AS B, ExplicitBounds AS Bo" if hist else "")
                     + f" FROM {source}{f' WHERE {where}' if where else ''}")
            return (
                f"SELECT toStartOfInterval(T, INTERVAL {self.grain_s} second) AS Time,"
                " ServiceName, MetricName, Cluster, Node, Gpu, AttributesHash, any(A) AS Attributes,"
                " min(S) AS StartTime, sum(C) AS Count, sum(Su) AS Sum, min(Mi) AS Min, max(Ma) AS Max"
                + (", sumForEachMergeState(B) AS BucketCounts, any(Bo) AS ExplicitBounds" if hist else "")
                + f" FROM ({inner})"
                " GROUP BY Time, ServiceName, MetricName, Cluster, Node, Gpu, AttributesHash"
            )
        # The inner query renames Attributes, which the outer one both hashes and aggregates
        # (and a histogram's columns, which the outer one aggregates under the same names).
        values = (" Count AS Cnt, Sum AS Su, Min AS Mi, Max AS Ma, BucketCounts AS B, ExplicitBounds AS Bo" if hist
                  else " Value")
        inner = ("SELECT TimeUnix, StartTimeUnix, ServiceName, MetricName, ResourceAttributes, Attributes AS Attrs,"
                 f"{values} FROM {source}{f' WHERE {where}' if where else ''}")
        aggregates = (" sum(Cnt) AS Count, sum(Su) AS Sum, min(Mi) AS Min, max(Ma) AS Max,"
                      " sumForEachState(B) AS BucketCounts, any(Bo) AS ExplicitBounds" if hist
                      else " count() AS Count, sum(Value) AS Sum, min(Value) AS Min, max(Value) AS Max")
        return (
            f"SELECT toStartOfInterval(toDateTime(TimeUnix), INTERVAL {self.grain_s} second) AS Time,"
            " ServiceName, MetricName,"
            " ResourceAttributes['k8s.cluster.name'] AS Cluster, ResourceAttributes['host.name'] AS Node,"
            " Attrs['gpu.index'] AS Gpu,"
            " cityHash64(Attrs) AS AttributesHash, any(Attrs) AS Attributes,"
            " min(StartTimeUnix) AS StartTime," + aggregates +
            f" FROM ({inner})"
            " GROUP BY Time, ServiceName, MetricName, Cluster, Node, Gpu, AttributesHash"
        )


#: Every rollup, in creation order.
ROLLUPS: tuple[Rollup, ...] = (
    Rollup("otel_metrics_gauge_1m", "otel_metrics_gauge", 60),
    Rollup("otel_metrics_gauge_1h", "otel_metrics_gauge", 3600, feeder="otel_metrics_gauge_1m"),
    Rollup("otel_metrics_sum_1m", "otel_metrics_sum", 60),
    Rollup("otel_metrics_sum_1h", "otel_metrics_sum", 3600, feeder="otel_metrics_sum_1m"),
    Rollup("otel_metrics_histogram_1m", "otel_metrics_histogram", 60, columns=_HISTOGRAM_COLUMNS, kind="histogram"),
    Rollup("otel_metrics_histogram_1h", "otel_metrics_histogram", 3600, feeder="otel_metrics_histogram_1m",
           columns=_HISTOGRAM_COLUMNS, kind="histogram"),
)


def _q(name: str) -> str:
    # The same quoting as exporters.schema.quote_ident (imported from there it would be circular).
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"


def view_statement(r: Rollup, db: str, on_cluster: str = "") -> str:
    """``CREATE MATERIALIZED VIEW IF NOT EXISTS`` feeding ``r`` from its raw table.

    ``db`` is the quoted database (or the ``{db}`` placeholder of a migration).

    >>> view_statement(ROLLUPS[0], "`s`").split(" AS SELECT")[0]
    'CREATE MATERIALIZED VIEW IF NOT EXISTS `s`.`otel_metrics_gauge_1m_mv` TO `s`.`otel_metrics_gauge_1m`'
    """
    return (f"CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.{_q(r.view)}{on_cluster} TO {db}.{_q(r.name)} AS "
            + r.select(f"{db}.{_q(r.reads)}"))


def backfill_statement(r: Rollup, db: str, where: str = "") -> str:
    """``INSERT INTO <rollup> SELECT ...`` from the table its view reads, optionally only rows matching ``where``.

    ``where`` is a condition on ``TimeUnix`` for a rollup of raw rows, on ``Time`` for
    one fed by a finer rollup (:attr:`Rollup.reads`). ``db`` is the quoted database or
    the ``{db}`` placeholder. Rows the view has already summarised must be left out,
    or they count twice.

    >>> backfill_statement(ROLLUPS[0], "`s`", "TimeUnix < now()").startswith("INSERT INTO `s`.`otel_metrics_gauge_1m` SELECT")
    True
    """
    return f"INSERT INTO {db}.{_q(r.name)} " + r.select(f"{db}.{_q(r.reads)}", where)


def rebuild_statements(r: Rollup, db: str, on_cluster: str = "") -> list[str]:
    """Rebuild ``r`` from everything in its raw table, then let the view keep it current.

    Drops the view, empties the table, copies every row of the table the view reads,
    and creates the view again. Exact when nothing is inserted meanwhile (``stethoscope
    up`` runs this before it takes data); rows inserted during the copy may be missed.
    Rebuild a feeder rollup before the rollups it feeds (:data:`ROLLUPS` order).

    >>> [s.split(" ")[0] for s in rebuild_statements(ROLLUPS[0], "`s`")]
    ['DROP', 'TRUNCATE', 'INSERT', 'CREATE']
    """
    return [
        f"DROP VIEW IF EXISTS {db}.{_q(r.view)}{on_cluster}",
        f"TRUNCATE TABLE IF EXISTS {db}.{_q(r.name)}{on_cluster}",
        backfill_statement(r, db),
        view_statement(r, db, on_cluster),
    ]


# ---------------------------------------------------------------- panel SQL over raw or rollup


@dataclass(frozen=True)
class Dialect:
    """The SQL fragments a panel uses, for the raw table (``grain_s = 0``) or one rollup.

    :meth:`at` gives a mapping for ``str.format``: ``table``, ``time`` (the time column),
    ``where`` (the time filter), ``node``, ``cluster``, ``gpu``, ``avg``, ``sum``, ``min``,
    ``max``, ``count``, ``start`` (earliest ``StartTimeUnix``), ``value`` and ``maxv``
    (the columns to use inside ``sumIf``/``uniqExactIf`` and similar).
    """

    raw_table: str

    def at(self, grain_s: int, *, whole: bool = False) -> Mapping[str, str]:
        """The fragments for tier ``grain_s``; ``whole`` (whole-range panels, ``grain_s = 60``)
        reads whole hours from the hourly rollup and the minutes at either end from the
        minute rollup, which gives the minute rollup's answer from far fewer rows."""
        if grain_s == 0:
            return {
                "table": self.raw_table, "time": "TimeUnix", "where": "$__timeFilter(TimeUnix)",
                "node": "ResourceAttributes['host.name']", "cluster": "ResourceAttributes['k8s.cluster.name']",
                "gpu": "Attributes['gpu.index']",
                "avg": "avg(Value)", "sum": "sum(Value)", "min": "min(Value)", "max": "max(Value)",
                "count": "count()", "start": "min(StartTimeUnix)", "value": "Value", "maxv": "Value",
                "countv": "1", "buckets": "sumForEach(BucketCounts)", "bounds": "any(ExplicitBounds)",
            }
        table = next(r.name for r in ROLLUPS if r.source == self.raw_table and r.grain_s == grain_s)
        if whole:
            hourly = next(r.name for r in ROLLUPS if r.source == self.raw_table and r.grain_s == 3600)
            first = "toStartOfInterval($__fromTime, INTERVAL 60 second)"
            h1 = f"toStartOfInterval({first} + INTERVAL 3599 second, INTERVAL 3600 second)"  # first whole hour
            h2 = "toStartOfInterval($__toTime, INTERVAL 3600 second)"  # end of the last whole hour
            table = (f"(SELECT * FROM {hourly} WHERE Time >= {h1} AND Time < {h2}"
                     f" UNION ALL SELECT * FROM {table} WHERE Time >= {first} AND Time <= $__toTime"
                     f" AND (Time < {h1} OR Time >= {h2}))")
        return {
            "table": table, "time": "Time",
            # Whole buckets that overlap the range: the edges are rounded outwards.
            "where": f"Time >= toStartOfInterval($__fromTime, INTERVAL {grain_s} second) AND Time <= $__toTime",
            "node": "Node", "cluster": "Cluster", "gpu": "Gpu",
            "avg": "sum(Sum) / sum(Count)", "sum": "sum(Sum)", "min": "min(Min)", "max": "max(Max)",
            "count": "sum(Count)", "start": "min(StartTime)", "value": "Sum", "maxv": "Max", "countv": "Count",
            "buckets": "sumForEachMerge(BucketCounts)", "bounds": "any(ExplicitBounds)",
        }


GAUGE = Dialect("otel_metrics_gauge")
SUM = Dialect("otel_metrics_sum")
#: Histograms: ``{buckets}`` and ``{bounds}`` give a bucket's summed counts and its bounds.
HISTOGRAM = Dialect("otel_metrics_histogram")

#: Tiers a panel can read, by grain in seconds (0 = raw rows).
TIERS = (0, 60, 3600)


def step_expr(wide: str = "") -> str:
    """The bucket width in seconds a time-series panel uses, as SQL that folds to a constant.

    ``$__interval_s``, or with a ``wide`` condition (see :func:`pick`) that interval rounded
    up to whole minutes, and at least one minute, when the condition holds.

    >>> step_expr()
    '$__interval_s'
    >>> step_expr("1=1")
    'if(1=1, greatest(60, intDiv($__interval_s + 59, 60) * 60), $__interval_s)'
    """
    if not wide:
        return "$__interval_s"
    return f"if({wide}, greatest(60, intDiv($__interval_s + 59, 60) * 60), $__interval_s)"


def tier_condition(grain_s: int, bucketed: bool, wide: str = "") -> str:
    """When a panel reads tier ``grain_s``: a condition on the macros that folds to a constant.

    Time-bucketed panels (``bucketed``) read the hourly rollup when their bucket width
    (:func:`step_expr`) is a whole number of hours, the minute rollup when it is a whole
    number of minutes, and raw rows otherwise, whatever the range: each bucket is then a
    whole number of rollup buckets. Whole-range panels (stats, tables) read the rollups
    (whole hours plus the minutes at the ends) when the range is longer than
    :data:`LONG_RANGE_S`, raw rows otherwise; the rollups round the range out to whole
    minutes. A ``wide`` condition (many series selected) sends both kinds to the rollups
    whatever the range and interval.

    >>> tier_condition(60, False)
    "dateDiff('second', $__fromTime, $__toTime) > 21600"
    >>> tier_condition(0, True)
    'NOT ($__interval_s % 60 = 0)'
    """
    long = f"dateDiff('second', $__fromTime, $__toTime) > {LONG_RANGE_S}"
    if wide:
        long = f"({long} OR {wide})"
    if not bucketed:
        return {0: f"NOT ({long})", 60: long}.get(grain_s, "0")
    step = step_expr(wide)
    if wide:
        step = f"({step})"
    hourly, minutely = f"{step} % 3600 = 0", f"{step} % 60 = 0"
    return {
        0: f"NOT ({minutely})",
        60: f"{minutely} AND NOT ({hourly})",
        3600: hourly,
    }[grain_s]


def pick(template: str | Mapping[int, str], dialect: Dialect, *, bucketed: bool, order_by: str = "", force: int | None = None,
         extra: Mapping[str, str] | None = None, wide: str = "") -> str:
    """One panel query over every tier: ``template`` is formatted with :meth:`Dialect.at`
    for each tier (plus ``extra``) and guarded by :func:`tier_condition`. A mapping from
    grain to template gives a tier its own SQL (it needs an entry for every tier).

    ``{use}`` in the template should be in the innermost ``WHERE`` so the unchosen
    branches read nothing; the branch is also filtered outside, so a whole-range
    aggregate over no rows does not add a row. ``force`` (a grain from :data:`TIERS`)
    makes that tier the only one, for benchmarks and tests; whole-range panels have one
    rollup tier (hours and minutes together), read for ``force=60`` or ``3600``. ``order_by`` is applied to the union.

    ``{wide}`` in the template is the ``wide`` condition (``0`` when there is none or
    ``force`` is given), for templates that draw something else for many series.
    ``{step}`` in the template is the bucket width in seconds (:func:`step_expr`) and
    ``{bucket}`` the time bucket of a row, ``$__interval_s`` and ``$__timeInterval`` of
    the tier's time column unless ``wide`` is given. ``wide`` is a condition on template
    variables that folds to a constant, true when the panel would draw too many series
    to read raw rows quickly (for example more than a few nodes selected): then the panel
    reads the rollups at any range, in buckets of whole minutes. ``force`` ignores it.

    >>> sql = pick("SELECT {max} AS m FROM {table} WHERE {use} AND {where}", GAUGE, bucketed=False, force=0)
    >>> "FROM otel_metrics_gauge WHERE 1 AND $__timeFilter(TimeUnix)" in sql, "otel_metrics_gauge_1h" in sql
    (True, True)
    >>> [line for line in sql.splitlines() if line.startswith(") WHERE")]
    [') WHERE 1', ') WHERE 0']
    >>> "toStartOfInterval(toDateTime(Time), toIntervalSecond(if(1=1, greatest(60" in pick(
    ...     "SELECT {bucket} AS t FROM {table} WHERE {use}", GAUGE, bucketed=True, wide="1=1")
    True
    """
    tiers = TIERS if bucketed else (0, 60)
    if force is not None and force not in TIERS:
        raise ValueError(f"force must be one of {TIERS}, got {force!r}")
    if force is not None and force not in tiers:
        force = 60  # a whole-range panel has no hourly tier
    if force is not None:
        wide = ""
    step = step_expr(wide)
    branches = []
    for grain in tiers:
        use = tier_condition(grain, bucketed, wide) if force is None else ("1" if grain == force else "0")
        fragments = dict(dialect.at(grain, whole=not bucketed))
        bucket = (f"toStartOfInterval(toDateTime({fragments['time']}), toIntervalSecond({step}))" if wide
                  else f"$__timeInterval({fragments['time']})")
        text = template if isinstance(template, str) else template[grain]
        body = text.format(use=use, step=step, bucket=bucket, wide=wide or "0", **fragments,
                           **(extra or {})).strip()
        branches.append(f"SELECT * FROM (\n{body}\n) WHERE {use}")
    union = "\nUNION ALL\n".join(branches)
    return f"SELECT * FROM (\n{union}\n)" + (f"\nORDER BY {order_by}" if order_by else "")
