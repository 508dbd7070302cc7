"""The six Stethoscope dashboards, built as Grafana JSON.

Every panel is raw SQL against our tables (``exporters/schema.py``) with the
ClickHouse plugin's macros; filters use ``$__conditionalAll`` so "All" costs nothing.
Panels over gauges and sums read the per-minute or per-hour rollups for long ranges
(:func:`stethoscope.dashboards.rollups.pick`); ``force`` pins every such panel of a
builder to one tier (0 = raw rows, 60, 3600), for benchmarks and tests.

Examples:
    >>> [d["uid"] for d in build_all()]
    ['stethoscope-fleet', 'stethoscope-training', 'stethoscope-inference', 'stethoscope-drift', 'stethoscope-cost', 'stethoscope-alerts']
"""

from __future__ import annotations

from typing import Any

from .histogram import bucket_quantile_sql
from .panels import (
    ANNOTATION_LIMIT,
    barchart,
    constant_variable,
    custom_variable,
    dashboard,
    query_variable,
    stat,
    table,
    timeseries,
)
from .rollups import GAUGE, HISTOGRAM, ROLLUPS, SUM, pick

__all__ = [
    "DASHBOARDS",
    "DEFAULT_GPU_HOUR_PRICE",
    "IDLE_UTILIZATION",
    "alerts",
    "build_all",
    "cost",
    "drift",
    "fleet",
    "inference",
    "training",
]

Json = dict[str, Any]

DEFAULT_GPU_HOUR_PRICE = "2.50"
#: A GPU interval with mean utilization below this counts as idle in the cost dashboard.
IDLE_UTILIZATION = 0.3

_TITLES = {
    "stethoscope-fleet": "Stethoscope / Fleet and GPU health",
    "stethoscope-training": "Stethoscope / Training operations",
    "stethoscope-inference": "Stethoscope / Inference service",
    "stethoscope-drift": "Stethoscope / Model performance and drift",
    "stethoscope-cost": "Stethoscope / Cost",
    "stethoscope-alerts": "Stethoscope / Alerts and actions",
}


def _links(own: str) -> list[Json]:
    return [{"type": "link", "title": title.split(" / ", 1)[1], "url": f"/d/{uid}", "keepTime": True,
             "includeVars": False, "targetBlank": False, "icon": "dashboard", "tags": [], "asDropdown": False}
            for uid, title in _TITLES.items() if uid != own]


# ---------------------------------------------------------------- shared SQL pieces

_HOURLY_GAUGE = next(r.name for r in ROLLUPS if r.source == GAUGE.raw_table and r.grain_s == 3600)
# Filters as templates for rollups.pick: {use}, {where}, {node}, {cluster}, {gpu} are filled per tier.
_GPU_FILTER_T = (
    "$__conditionalAll({cluster} IN ($cluster), $cluster)"
    " AND $__conditionalAll({node} IN ($node), $node)"
    " AND $__conditionalAll({gpu} IN ($gpu), $gpu)"
)
_GPU_WHERE_T = "{use} AND {where} AND " + _GPU_FILTER_T
_JOB_WHERE_T = "{use} AND {where} AND $__conditionalAll(Attributes['stethoscope.train.job'] IN ($job), $job)"
_MODEL_ATTR_WHERE_T = ("{use} AND {where}"
                       " AND $__conditionalAll(Attributes['stethoscope.model'] IN ($model), $model)"
                       " AND $__conditionalAll(Attributes['stethoscope.model.version'] IN ($version), $version)")
_MODEL_ATTR_WHERE = ("$__timeFilter(TimeUnix)"
                     " AND $__conditionalAll(Attributes['stethoscope.model'] IN ($model), $model)"
                     " AND $__conditionalAll(Attributes['stethoscope.model.version'] IN ($version), $version)")
_MODEL_COL = ("$__conditionalAll(Model IN ($model), $model)"
              " AND $__conditionalAll(ModelVersion IN ($version), $version)")


_HOURLY_SUM = next(r.name for r in ROLLUPS if r.source == SUM.raw_table and r.grain_s == 3600)


def _hours_of(rollup: str, metric: str) -> str:
    """``FROM ... WHERE ...`` over an hourly rollup's rows of ``metric`` in the hours the range touches.

    Variable queries (GPUs, jobs, models) list values from here: one row per series and
    hour, where the raw table has a row per series every few seconds with the value inside
    a map (a list offered a little wider than the range costs nothing; at 100M rows the raw
    queries took 0.4 s on every dashboard load).
    """
    return (f"FROM {rollup} WHERE MetricName = '{metric}'"
            " AND Time >= toStartOfInterval($__fromTime, INTERVAL 3600 second) AND Time <= $__toTime")


_GPU_HOURS = _hours_of(_HOURLY_GAUGE, "gpu.utilization")
_REQUEST_HOURS = _hours_of(_HOURLY_SUM, "stethoscope.model.requests")


def _cluster_var() -> Json:
    return query_variable("cluster", "Cluster", f"""
        SELECT DISTINCT Cluster {_GPU_HOURS} ORDER BY 1""")


def _node_var() -> Json:
    return query_variable("node", "Node", f"""
        SELECT DISTINCT Node {_GPU_HOURS}
        AND $__conditionalAll(Cluster IN ($cluster), $cluster) ORDER BY 1""")


def _gpu_var() -> Json:
    return query_variable("gpu", "GPU", f"""
        SELECT DISTINCT Gpu {_GPU_HOURS}
        AND $__conditionalAll(Node IN ($node), $node) ORDER BY toUInt32OrZero(Gpu)""")


def _model_vars(source: str) -> list[Json]:
    if source == "metrics":
        model = f"""SELECT DISTINCT Attributes['stethoscope.model'] {_REQUEST_HOURS} ORDER BY 1"""
        version = f"""SELECT DISTINCT Attributes['stethoscope.model.version'] {_REQUEST_HOURS}
            AND $__conditionalAll(Attributes['stethoscope.model'] IN ($model), $model) ORDER BY 1"""
    else:
        model = """SELECT DISTINCT Model FROM samples WHERE $__timeFilter(Timestamp)
            UNION DISTINCT SELECT DISTINCT Model FROM findings WHERE $__timeFilter(Time) AND Model != ''"""
        version = """SELECT DISTINCT ModelVersion FROM samples WHERE $__timeFilter(Timestamp)
            AND $__conditionalAll(Model IN ($model), $model)"""
    return [query_variable("model", "Model", model), query_variable("version", "Model version", version)]


def _annotation(model_filter: bool) -> str:
    extra = " AND $__conditionalAll(Model IN ($model), $model)" if model_filter else ""
    return f"""
SELECT Time AS time, concat(upper(Severity), ' ', Kind, ': ', Subject) AS text,
       concat(Kind, ',', Severity) AS tags
FROM findings
WHERE $__timeFilter(Time) AND Severity != 'info'{extra}
ORDER BY time DESC
LIMIT {ANNOTATION_LIMIT}"""


#: Increase of one cumulative counter series over the range. A series whose counter started
#: inside the range (StartTimeUnix, e.g. the agent's XID count) counts from zero, so its first
#: point is not lost; resets inside the range are not corrected.
_INCREASE = "if({start} >= $__fromTime, {max}, {max} - {min})"

#: Panels over GPUs read raw rows only while at most this many nodes are selected; over more
#: (or All) they read the rollups at any range, in buckets of whole minutes
#: (:func:`stethoscope.dashboards.rollups.pick`): thousands of GPU series at 10 s cost
#: seconds to read and to send, and no chart can show them apart.
MAX_RAW_NODES = 2
#: ``wide`` for :func:`~stethoscope.dashboards.rollups.pick`: All, or more than MAX_RAW_NODES nodes.
_WIDE_NODES = f"$__conditionalAll(length([$node]) > {MAX_RAW_NODES}, $node)"
#: The same for the training panels (All or more than one job) and the model panels (All or more
#: than one model): thousands of ranks or pods are summed per bucket, and reading their raw rows
#: (a map per row) over an hour took 0.3 s at 10M rows and seconds at 100M.
_WIDE_JOBS = "$__conditionalAll(length([$job]) > 1, $job)"
_WIDE_MODELS = "$__conditionalAll(length([$model]) > 1, $model)"


def _series(template: str, force: int | None, dialect=GAUGE, order_by: str = "time", wide: str = "") -> str:
    """A time-bucketed panel over raw rows or a rollup (ordered by time unless told)."""
    return pick(template, dialect, bucketed=True, order_by=order_by, force=force, wide=wide)


def _total(template: str, force: int | None, dialect=GAUGE, order_by: str = "", wide: str = "") -> str:
    """A whole-range panel (stat, table) over raw rows or the minute rollup."""
    return pick(template, dialect, bucketed=False, order_by=order_by, force=force, wide=wide)


#: With more than MAX_RAW_NODES nodes (or All) selected, a per-GPU time series draws the
#: spread of the selected GPUs (:data:`FLEET_QUANTILES`) and this many GPUs that stand out
#: over the range, instead of a line per GPU: thousands of lines cost seconds to send and
#: draw, and nobody can tell them apart.
OUTLIER_GPUS = 5
#: Quantiles across the selected GPUs' values in each bucket, and their series names.
FLEET_QUANTILES = {0.05: "fleet p5", 0.5: "fleet median", 0.95: "fleet p95"}
#: How each kind of outlier ranks GPUs over the range, from a rollup's columns.
_RANK = {"lowest mean": "sum(Sum) / sum(Count) ASC", "highest mean": "sum(Sum) / sum(Count) DESC",
         "highest max": "max(Max) DESC", "lowest min": "min(Min) ASC"}


def _gpu_series(metric: str, force: int | None, agg: str = "{avg}", outliers: str = "highest max") -> str:
    """One line per GPU, or with many nodes selected the fleet's spread and the ``outliers``.

    The outliers are ranked over the whole range from the rollups (whole hours plus the
    minutes at either end, as whole-range panels read them), then drawn bucket by
    bucket from the same rows as the spread: one pass over the panel's rows, with a few
    hundred rows returned whatever the fleet's size. The pass groups by a hash of node
    and GPU, not by the two strings, which took 3.5 times as long at 100M rows.
    """
    ranked = GAUGE.at(60, whole=True)
    names = "[" + ", ".join(f"'{n}'" for n in FLEET_QUANTILES.values()) + "]"
    levels = ", ".join(str(q) for q in FLEET_QUANTILES)
    filter_rollup = _GPU_FILTER_T.format(cluster="Cluster", node="Node", gpu="Gpu")
    return _series(f"""
SELECT {{bucket}} AS time, concat({{node}}, '/', {{gpu}}) AS gpu, {agg} AS value
FROM {{table}}
WHERE MetricName = '{metric}' AND NOT ({{wide}}) AND """ + _GPU_WHERE_T + f"""
GROUP BY time, gpu
UNION ALL
SELECT time, s.1 AS gpu, s.2 AS value
FROM (
  SELECT time, arrayConcat(arrayZip({names}, quantilesExactInclusive({levels})(value)),
                           groupArrayIf((name, value), name != '')) AS series
  FROM (
    WITH (SELECT (groupArray(key), groupArray(name)) FROM (
            SELECT cityHash64(Node, Gpu) AS key, concat(Node, '/', Gpu) AS name FROM {ranked["table"]}
            WHERE {{use}} AND {{wide}} AND MetricName = '{metric}' AND {ranked["where"]} AND {filter_rollup}
            GROUP BY Node, Gpu
            ORDER BY {_RANK[outliers]}, Node, Gpu
            LIMIT {OUTLIER_GPUS})) AS top
    SELECT time, value, transform(key, top.1, top.2, '') AS name
    FROM (
      SELECT {{bucket}} AS time, cityHash64({{node}}, {{gpu}}) AS key, {agg} AS value
      FROM {{table}}
      WHERE MetricName = '{metric}' AND {{wide}} AND """ + _GPU_WHERE_T + """
      GROUP BY time, key))
  GROUP BY time)
ARRAY JOIN series AS s""", force, wide=_WIDE_NODES)


def _gpu_description(what: str, outliers: str) -> str:
    spread = ", ".join(FLEET_QUANTILES.values())
    return (f"{what} One line per GPU while at most {MAX_RAW_NODES} nodes are selected; with more (or All), "
            f"the selected GPUs' {spread} in each bucket and the {OUTLIER_GPUS} GPUs with the {outliers} "
            "over the range.")


# Raw rows carry the throttle reason in each row's Attributes. A rollup carries it too,
# but decoding that map for millions of minute rows was the slowest part of this panel
# at 100M rows; the reason is the same for every row of a series, so the rollup tiers
# look it up once per series in the hourly rollup (thousands of rows) and join on the hash.
_THROTTLED_RAW = """
SELECT {bucket} AS time, Attributes['gpu.throttle.reason'] AS reason,
       uniqExactIf(({node}, {gpu}), {maxv} > 0) AS gpus
FROM {table}
WHERE MetricName = 'gpu.throttle' AND Attributes['gpu.throttle.reason'] != 'gpu_idle' AND """ + _GPU_WHERE_T + """
GROUP BY time, reason"""
_THROTTLED_ROLLUP = """
SELECT {bucket} AS time, reason, uniqExactIf(({node}, {gpu}), {maxv} > 0) AS gpus
FROM {table}
INNER JOIN (
  SELECT AttributesHash, any(Attributes['gpu.throttle.reason']) AS reason FROM """ + _HOURLY_GAUGE + """
  WHERE {use} AND MetricName = 'gpu.throttle'
    AND Time >= toStartOfInterval($__fromTime, INTERVAL 3600 second) AND Time <= $__toTime
  GROUP BY AttributesHash
  HAVING reason != 'gpu_idle') AS reasons USING AttributesHash
WHERE MetricName = 'gpu.throttle' AND """ + _GPU_WHERE_T + """
GROUP BY time, reason"""
_THROTTLED = {0: _THROTTLED_RAW, 60: _THROTTLED_ROLLUP, 3600: _THROTTLED_ROLLUP}


# ---------------------------------------------------------------- fleet

def fleet(force: int | None = None) -> Json:
    heat_cols = ",\n       ".join(f"sumIf({{value}}, {{gpu}} = '{i}') / sumIf({{countv}}, {{gpu}} = '{i}') AS gpu_{i}"
                                   for i in range(8))
    counters = """
  FROM {table}
  WHERE MetricName IN ('gpu.xid.errors', 'gpu.ecc.errors') AND """ + _GPU_WHERE_T
    panels = [
        (stat("GPUs reporting", _total("""
SELECT uniqExact({node}, {gpu}) AS gpus FROM {table}
WHERE MetricName = 'gpu.utilization' AND """ + _GPU_WHERE_T, force, wide=_WIDE_NODES)), 6, 4),
        (stat("Mean utilization", _total("""
SELECT {avg} AS utilization FROM {table}
WHERE MetricName = 'gpu.utilization' AND """ + _GPU_WHERE_T, force, wide=_WIDE_NODES), unit="percentunit"), 6, 4),
        (stat("Hottest GPU", _total("""
SELECT {max} AS temperature FROM {table}
WHERE MetricName = 'gpu.temperature' AND """ + _GPU_WHERE_T, force, wide=_WIDE_NODES), unit="celsius"), 6, 4),
        (stat("XID errors", _total(f"""
SELECT sum(errors) AS xid_errors FROM (
  SELECT {_INCREASE} AS errors FROM {{table}}
  WHERE MetricName = 'gpu.xid.errors' AND """ + _GPU_WHERE_T + """
  GROUP BY {node}, {gpu}, Attributes['gpu.xid'])""", force, SUM, wide=_WIDE_NODES), decimals=0), 6, 4),
        (timeseries("GPU utilization", _gpu_series("gpu.utilization", force, outliers="lowest mean"),
                    unit="percentunit", description=_gpu_description("Mean utilization.", "lowest mean")), 12, 8),
        (timeseries("GPU memory used", _gpu_series("gpu.memory.used", force, "{max}"), unit="bytes",
                    description=_gpu_description("Peak memory used.", "highest max")), 12, 8),
        (timeseries("GPU temperature", _gpu_series("gpu.temperature", force, "{max}"), unit="celsius",
                    description=_gpu_description("Peak temperature.", "highest max")), 12, 8),
        (timeseries("GPU power draw", _gpu_series("gpu.power.draw", force, outliers="highest mean"), unit="watt",
                    description=_gpu_description("Mean power draw.", "highest mean")), 12, 8),
        (timeseries("SM clock", _gpu_series("gpu.clock.sm", force, outliers="lowest min"), unit="hertz",
                    description=_gpu_description("Mean SM clock in MHz; it drops under thermal or power "
                                                 "slowdown.", "lowest min")), 12, 8),
        (timeseries("GPUs throttled, by reason", _series(_THROTTLED, force, wide=_WIDE_NODES),
                    stacked=True, bars=True), 12, 8),
        (table("XID and ECC errors by GPU", _total(f"""
SELECT node, gpu,
       sumIf(errors, MetricName = 'gpu.xid.errors') AS xid_errors,
       arrayStringConcat(arraySort(groupUniqArrayIf(xid, MetricName = 'gpu.xid.errors' AND errors > 0)), ',') AS xid_codes,
       sumIf(errors, MetricName = 'gpu.ecc.errors' AND ecc = 'corrected') AS ecc_corrected,
       sumIf(errors, MetricName = 'gpu.ecc.errors' AND ecc = 'uncorrected') AS ecc_uncorrected
FROM (
  SELECT {{node}} AS node, {{gpu}} AS gpu, MetricName, Attributes['gpu.xid'] AS xid,
         Attributes['gpu.ecc.type'] AS ecc, {_INCREASE} AS errors""" + counters + """
  GROUP BY node, gpu, MetricName, xid, ecc)
GROUP BY node, gpu""", force, SUM, order_by="xid_errors + ecc_uncorrected DESC, node, gpu", wide=_WIDE_NODES),
               description="Increase of the cumulative counters over the time range (from zero for a "
                           "counter that started inside it)."), 12, 8),
        (table("Utilization by node and GPU", _total(f"""
SELECT {{node}} AS node,
       {heat_cols}
FROM {{table}}
WHERE MetricName = 'gpu.utilization' AND """ + _GPU_WHERE_T + """
GROUP BY node""", force, order_by="node", wide=_WIDE_NODES), unit="percentunit", heat=True,
               description="Mean utilization per GPU over the range: one row per node, one cell per GPU."), 24, 8),
    ]
    return dashboard("stethoscope-fleet", _TITLES["stethoscope-fleet"], tags=["gpu"], panels=panels,
                     description="Utilization, memory, temperature, power, clocks, throttling, XID and ECC per GPU.",
                     variables=[_cluster_var(), _node_var(), _gpu_var()], annotation_sql=_annotation(False),
                     links=_links("stethoscope-fleet"))


# ---------------------------------------------------------------- training

def _train_series(metric: str, force: int | None) -> str:
    return _series(f"""
SELECT $__timeInterval({{time}}) AS time, Attributes['stethoscope.train.job'] AS job, {{avg}} AS value
FROM {{table}}
WHERE MetricName = 'stethoscope.train.{metric}' AND """ + _JOB_WHERE_T + """
GROUP BY time, job""", force, wide=_WIDE_JOBS)


def training(force: int | None = None) -> Json:
    job_var = query_variable("job", "Job", f"""
        SELECT DISTINCT Attributes['stethoscope.train.job'] {_hours_of(_HOURLY_GAUGE, 'stethoscope.train.step')}
        ORDER BY 1""")
    panels = [
        (timeseries("Loss", _train_series("loss", force)), 12, 8),
        (timeseries("Gradient norm", _train_series("grad_norm", force)), 12, 8),
        (timeseries("Throughput", _series("""
SELECT {bucket} AS time, Attributes['stethoscope.train.job'] AS job,
       sumIf({value}, MetricName = 'stethoscope.train.tokens') / {step} AS tokens_per_s
FROM {table}
WHERE MetricName = 'stethoscope.train.tokens' AND """ + _JOB_WHERE_T + """
GROUP BY time, job""", force, wide=_WIDE_JOBS), unit="short", description="Tokens per second, summed over ranks."), 12, 8),
        (timeseries("Step phases", _series("""
SELECT {bucket} AS time, Attributes['stethoscope.train.phase'] AS phase, {avg} AS seconds
FROM {table}
WHERE MetricName = 'stethoscope.train.phase.time' AND """ + _JOB_WHERE_T + """
GROUP BY time, phase""", force, wide=_WIDE_JOBS), unit="s", stacked=True, bars=True,
                    description="Mean time per step in each phase."), 12, 8),
        (timeseries("Step time by rank", _series("""
SELECT {bucket} AS time, concat('rank ', Attributes['stethoscope.train.rank']) AS rank,
       {avg} AS step_time
FROM {table}
WHERE MetricName = 'stethoscope.train.step_time' AND """ + _JOB_WHERE_T + """
GROUP BY time, rank""", force, wide=_WIDE_JOBS), unit="s"), 12, 8),
        (timeseries("Input-bound share", _series("""
SELECT {bucket} AS time, Attributes['stethoscope.train.job'] AS job,
       sumIf({value}, MetricName = 'stethoscope.train.data_wait')
         / nullIf(sumIf({value}, MetricName = 'stethoscope.train.step_time'), 0) AS input_bound
FROM {table}
WHERE MetricName IN ('stethoscope.train.data_wait', 'stethoscope.train.step_time') AND """ + _JOB_WHERE_T + """
GROUP BY time, job""", force, wide=_WIDE_JOBS), unit="percentunit", description="Share of step time spent waiting for data."), 12, 8),
        (table("Stragglers: step time per rank vs the job median", _total("""
SELECT job, rank, node, gpu, steps, step_time,
       step_time / median(step_time) OVER (PARTITION BY job) AS vs_median
FROM (
  SELECT Attributes['stethoscope.train.job'] AS job, toUInt32OrZero(Attributes['stethoscope.train.rank']) AS rank,
         any(Attributes['host.name']) AS node, any(Attributes['gpu.index']) AS gpu,
         {count} AS steps, {avg} AS step_time
  FROM {table}
  WHERE MetricName = 'stethoscope.train.step_time' AND """ + _JOB_WHERE_T + """
  GROUP BY job, rank)""", force, order_by="vs_median DESC, job, rank", wide=_WIDE_JOBS),
               description="A rank well above 1.0 slows every synchronous step."), 24, 8),
        (stat("Non-finite values", _total("""
SELECT {sum} AS nonfinite FROM {table}
WHERE MetricName = 'stethoscope.train.nonfinite' AND """ + _JOB_WHERE_T, force, SUM, wide=_WIDE_JOBS), decimals=0), 12, 4),
        (stat("Latest step", _total("""
SELECT {max} AS step FROM {table}
WHERE MetricName = 'stethoscope.train.step' AND """ + _JOB_WHERE_T, force, wide=_WIDE_JOBS), decimals=0), 12, 4),
    ]
    return dashboard("stethoscope-training", _TITLES["stethoscope-training"], tags=["training"], panels=panels,
                     description="Loss, gradient norm, throughput, step phases, stragglers and input stalls.",
                     variables=[job_var], annotation_sql=_annotation(False), links=_links("stethoscope-training"))


# ---------------------------------------------------------------- inference

def _latency_sql(force: int | None) -> str:
    quantiles = ",\n       ".join(f"{bucket_quantile_sql(q)} AS p{round(q * 100)}" for q in (0.5, 0.9, 0.99))
    return _series(f"""
SELECT t AS time,
       {quantiles}
FROM (
  SELECT {{bucket}} AS t, {{buckets}} AS counts, {{bounds}} AS bounds
  FROM {{table}}
  WHERE MetricName = 'stethoscope.model.latency' AND """ + _MODEL_ATTR_WHERE_T + """
  GROUP BY t)""", force, HISTOGRAM, wide=_WIDE_MODELS)


def inference(force: int | None = None) -> Json:
    panels = [
        (stat("Requests", _total("""
SELECT {sum} AS requests FROM {table}
WHERE MetricName = 'stethoscope.model.requests' AND """ + _MODEL_ATTR_WHERE_T, force, SUM, wide=_WIDE_MODELS), decimals=0), 8, 4),
        (stat("Error share", _total("""
SELECT sumIf({value}, MetricName = 'stethoscope.model.errors')
       / nullIf(sumIf({value}, MetricName = 'stethoscope.model.requests'), 0) AS error_share
FROM {table}
WHERE MetricName IN ('stethoscope.model.errors', 'stethoscope.model.requests') AND """ + _MODEL_ATTR_WHERE_T,
                                      force, SUM, wide=_WIDE_MODELS), unit="percentunit"), 8, 4),
        (stat("Mean latency", _total("""
SELECT sum(Sum) / nullIf(sum(Count), 0) AS latency_ms FROM {table}
WHERE MetricName = 'stethoscope.model.latency' AND """ + _MODEL_ATTR_WHERE_T, force, HISTOGRAM, wide=_WIDE_MODELS),
              unit="ms"), 8, 4),
        (timeseries("Requests per second", _series("""
SELECT {bucket} AS time,
       concat(Attributes['stethoscope.model'], ' v', Attributes['stethoscope.model.version']) AS model,
       {sum} / {step} AS rps
FROM {table}
WHERE MetricName = 'stethoscope.model.requests' AND """ + _MODEL_ATTR_WHERE_T + """
GROUP BY time, model""", force, SUM, wide=_WIDE_MODELS), unit="reqps"), 12, 8),
        (timeseries("Latency p50 / p90 / p99", _latency_sql(force), unit="ms",
                    description="Quantiles interpolated inside the latency histogram's buckets."), 12, 8),
        (timeseries("Errors per second, by kind", _series("""
SELECT {bucket} AS time, Attributes['stethoscope.error.kind'] AS kind,
       {sum} / {step} AS errors
FROM {table}
WHERE MetricName = 'stethoscope.model.errors' AND """ + _MODEL_ATTR_WHERE_T + """
GROUP BY time, kind""", force, SUM, wide=_WIDE_MODELS), unit="reqps", stacked=True), 12, 8),
        (table("Per model version", _total("""
SELECT Attributes['stethoscope.model'] AS model, Attributes['stethoscope.model.version'] AS version,
       sumIf({value}, MetricName = 'stethoscope.model.requests') AS requests,
       sumIf({value}, MetricName = 'stethoscope.model.errors') AS errors,
       errors / nullIf(requests, 0) AS error_share
FROM {table}
WHERE MetricName IN ('stethoscope.model.requests', 'stethoscope.model.errors') AND """ + _MODEL_ATTR_WHERE_T + """
GROUP BY model, version""", force, SUM, order_by="requests DESC", wide=_WIDE_MODELS)), 12, 8),
    ]
    return dashboard("stethoscope-inference", _TITLES["stethoscope-inference"], tags=["models"], panels=panels,
                     description="Request rate, latency quantiles from the histogram buckets, and errors.",
                     variables=_model_vars("metrics"), annotation_sql=_annotation(True),
                     links=_links("stethoscope-inference"))


# ---------------------------------------------------------------- drift

def _finding_series(kind: str, series: str, value: str = "max(Statistic)") -> str:
    return f"""
SELECT $__timeInterval(Time) AS time, {series} AS series, {value} AS value
FROM findings
WHERE Kind = '{kind}' AND $__timeFilter(Time) AND {_MODEL_COL}
GROUP BY time, series
ORDER BY time"""


def drift(force: int | None = None) -> Json:
    panels = [
        (table("Per-feature drift (latest window)", f"""
SELECT Model AS model, ModelVersion AS version, Feature AS feature,
       argMax(Method, Time) AS method, argMax(Statistic, Time) AS statistic, argMax(PValue, Time) AS p_value,
       argMax(Effect, Time) AS effect, argMax(Severity, Time) AS severity, argMax(Drifted, Time) AS drifted,
       max(Time) AS checked
FROM findings
WHERE Kind = 'feature_drift' AND $__timeFilter(Time) AND {_MODEL_COL}
GROUP BY model, version, feature
ORDER BY drifted DESC, effect DESC""", description="The most recent feature_drift finding per feature."), 24, 8),
        (timeseries("Drift statistic by feature",
                    _finding_series("feature_drift", "concat(Model, ' ', Feature)")), 12, 8),
        (timeseries("Share of drifted features",
                    _finding_series("dataset_drift", "concat(Model, ' v', ModelVersion)"), unit="percentunit"), 12, 8),
        (timeseries("Confidence coefficient of variation",
                    _finding_series("confidence_cv", "concat(Model, ' v', ModelVersion)")), 12, 8),
        (timeseries("Predictions: sampled rows and estimated total", f"""
SELECT $__timeInterval(Timestamp) AS time, count() AS sampled_rows, sum(AdjustedCount) AS estimated_predictions
FROM samples
WHERE $__timeFilter(Timestamp) AND {_MODEL_COL}
GROUP BY time
ORDER BY time"""), 12, 8),
        (timeseries("Sampling probability", _series("""
SELECT {bucket} AS time, concat(Attributes['stethoscope.model'], '/', Attributes['stethoscope.stream']) AS stream,
       {avg} AS probability
FROM {table}
WHERE MetricName = 'stethoscope.model.sampling.probability' AND """ + _MODEL_ATTR_WHERE_T + """
GROUP BY time, stream""", force, wide=_WIDE_MODELS), unit="percentunit"), 12, 8),
        (table("Samples by stream", f"""
SELECT Model AS model, ModelVersion AS version, Stream AS stream, count() AS sampled_rows,
       sum(AdjustedCount) AS estimated_predictions, sampled_rows / nullIf(estimated_predictions, 0) AS sampling_rate,
       countIf(Uncertain) AS uncertain_rows, avg(Confidence) AS mean_confidence
FROM samples
WHERE $__timeFilter(Timestamp) AND {_MODEL_COL}
GROUP BY model, version, stream
ORDER BY estimated_predictions DESC"""), 12, 8),
    ]
    return dashboard("stethoscope-drift", _TITLES["stethoscope-drift"], tags=["models", "drift"], panels=panels,
                     description="Per-feature drift findings, drift over time, confidence CV and sampled rows.",
                     variables=_model_vars("samples"), annotation_sql=_annotation(True),
                     links=_links("stethoscope-drift"))


# ---------------------------------------------------------------- cost

_GPU_INTERVALS = """
  SELECT {bucket} AS t, {node} AS node, {gpu} AS gpu, {avg} AS util
  FROM {table}
  WHERE MetricName = 'gpu.utilization' AND """ + _GPU_WHERE_T + """
  GROUP BY t, node, gpu"""
_HOURS = "count() * {step} / 3600"
_IDLE_HOURS = f"countIf(util < {IDLE_UTILIZATION}) * {{step}} / 3600"


def cost(force: int | None = None) -> Json:
    # Requests over the range from the sum rollups (whole hours plus the minutes at either end).
    whole = SUM.at(60, whole=True)
    requests = f"""(SELECT sum(Sum) FROM {whole["table"]}
   WHERE MetricName = 'stethoscope.model.requests' AND {whole["where"]}
   AND $__conditionalAll(Attributes['stethoscope.model'] IN ($model), $model))"""
    panels = [
        (stat("GPU hours", _series(f"SELECT {_HOURS} AS gpu_hours FROM ({_GPU_INTERVALS})", force, order_by="",
                                   wide=_WIDE_NODES), decimals=1), 6, 4),
        (stat("GPU cost", _series(f"SELECT {_HOURS} * $gpu_hour_price AS cost FROM ({_GPU_INTERVALS})", force,
                                  order_by="", wide=_WIDE_NODES), unit="currencyUSD"), 6, 4),
        (stat("Idle cost", _series(f"SELECT {_IDLE_HOURS} * $gpu_hour_price AS idle_cost FROM ({_GPU_INTERVALS})",
                                   force, order_by="", wide=_WIDE_NODES),
              unit="currencyUSD", description=f"GPU intervals with mean utilization below {IDLE_UTILIZATION}."), 6, 4),
        (stat("GPU cost per 1,000 predictions", _series(f"""
SELECT {_HOURS} * $gpu_hour_price / nullIf({requests} / 1000, 0) AS cost_per_1k
FROM ({_GPU_INTERVALS})""", force, order_by="", wide=_WIDE_NODES), unit="currencyUSD"), 6, 4),
        (timeseries("GPU cost over time", _series(f"""
SELECT t AS time, {_HOURS} * $gpu_hour_price AS busy_and_idle, {_IDLE_HOURS} * $gpu_hour_price AS idle
FROM ({_GPU_INTERVALS})
GROUP BY t""", force, wide=_WIDE_NODES), unit="currencyUSD", bars=True), 24, 8),
        (table("Cost by node", _series(f"""
SELECT node, uniqExact(gpu) AS gpus, {_HOURS} AS gpu_hours, {_IDLE_HOURS} AS idle_gpu_hours,
       gpu_hours * $gpu_hour_price AS cost, idle_gpu_hours * $gpu_hour_price AS idle_cost, avg(util) AS utilization
FROM ({_GPU_INTERVALS})
GROUP BY node""", force, order_by="cost DESC", wide=_WIDE_NODES)), 12, 8),
        (table("Declared cost per 1,000 predictions, by model", _total("""
SELECT Attributes['stethoscope.model'] AS model,
       sumIf({value}, MetricName = 'stethoscope.model.requests') AS predictions,
       sumIf({value}, MetricName = 'stethoscope.model.business'
                      AND Attributes['stethoscope.business.name'] = 'cost') AS declared_cost,
       declared_cost / nullIf(predictions, 0) * 1000 AS cost_per_1k
FROM {table}
WHERE MetricName IN ('stethoscope.model.requests', 'stethoscope.model.business') AND {use} AND {where}
  AND $__conditionalAll(Attributes['stethoscope.model'] IN ($model), $model)
GROUP BY model""", force, SUM, order_by="predictions DESC", wide=_WIDE_MODELS),
               description="From the SDK's cost_per_prediction (business metric 'cost')."), 12, 8),
    ]
    model_var = query_variable("model", "Model", f"""
        SELECT DISTINCT Attributes['stethoscope.model'] {_REQUEST_HOURS} ORDER BY 1""")
    return dashboard("stethoscope-cost", _TITLES["stethoscope-cost"], tags=["cost"], panels=panels,
                     description="GPU hours times $gpu_hour_price, idle cost, and cost per 1,000 predictions.",
                     variables=[_cluster_var(), _node_var(), _gpu_var(), model_var,
                                constant_variable("gpu_hour_price", DEFAULT_GPU_HOUR_PRICE, "Price per GPU hour")],
                     annotation_sql=_annotation(False), links=_links("stethoscope-cost"))


# ---------------------------------------------------------------- alerts

_ALERT_WHERE = ("$__timeFilter(Time) AND Severity != 'info'"
                " AND $__conditionalAll(Severity IN ($severity), $severity)"
                " AND $__conditionalAll(Kind IN ($kind), $kind)")


def alerts() -> Json:
    kind_var = query_variable("kind", "Kind", """
        SELECT DISTINCT Kind FROM findings WHERE $__timeFilter(Time) AND Severity != 'info' ORDER BY 1""")
    panels = [
        (timeseries("Findings over time, by severity", f"""
SELECT $__timeInterval(Time) AS time, Severity AS severity, count() AS findings
FROM findings
WHERE {_ALERT_WHERE}
GROUP BY time, severity
ORDER BY time""", stacked=True, bars=True), 16, 8),
        (barchart("Findings by kind", f"""
SELECT Kind AS kind, countIf(Severity = 'warning') AS warning, countIf(Severity = 'critical') AS critical
FROM findings
WHERE {_ALERT_WHERE}
GROUP BY kind
ORDER BY critical + warning DESC"""), 8, 8),
        (table("Findings", f"""
SELECT Time AS time, Severity AS severity, Kind AS kind, Subject AS subject, Method AS method,
       Statistic AS statistic, PValue AS p_value, Effect AS effect, Details AS details
FROM findings
WHERE {_ALERT_WHERE}
ORDER BY time DESC
LIMIT 500"""), 24, 12),
        (table("Alerts now", """
SELECT Rule AS rule, State AS state, JSONExtractString(Body, 'subject') AS subject,
       toDateTime64(JSONExtractFloat(Body, 'active_since'), 3) AS since,
       if(JSONHas(Body, 'fired_at') AND JSONType(Body, 'fired_at') != 'Null',
          toDateTime64(JSONExtractFloat(Body, 'fired_at'), 3), NULL) AS fired_at,
       JSONExtract(Body, 'value', 'Nullable(Float64)') AS value
FROM alerts
WHERE Kind = 'alert' AND Version = (SELECT max(Version) FROM alerts)
ORDER BY state = 'firing' DESC, since DESC""",
               description="The alert runner's newest state snapshot: pending and firing alerts, whatever the "
                           "time range."), 24, 6),
        (timeseries("Notifications, by delivery outcome", """
SELECT $__timeInterval(Time) AS time, Status AS outcome, count() AS attempts
FROM notification_attempts
WHERE $__timeFilter(Time) AND Status != 'queued'
GROUP BY time, outcome
ORDER BY time""", stacked=True, bars=True,
                    description="Delivery attempts to Alertmanager, webhooks, PagerDuty and Slack: delivered, "
                                "retry (tried again later), failed (refused for good), expired (gave up)."), 12, 8),
        (table("Alert history", """
SELECT Time AS time, Rule AS rule, JSONExtractString(Body, 'status') AS status,
       JSONExtractString(Body, 'severity') AS severity, JSONExtractString(Body, 'subject') AS subject,
       Notifier AS receiver
FROM notification_attempts
WHERE $__timeFilter(Time) AND Status = 'queued'
ORDER BY time DESC
LIMIT 500""", description="Every notification the runner queued (firing, repeat, resolved), per receiver."), 12, 8),
        (table("Remediation audit", """
SELECT Time AS time, Action AS action, Target AS target, Rule AS rule, Decision AS decision, Reason AS reason,
       DryRun AS dry_run, Result AS result
FROM actions
WHERE $__timeFilter(Time)
ORDER BY time DESC
LIMIT 500""", description="Every remediation decision: taken, dry run, pending approval, refused by a guard "
                          "(and which), or failed."), 24, 10),
    ]
    return dashboard("stethoscope-alerts", _TITLES["stethoscope-alerts"], tags=["alerts"], panels=panels,
                     description="Warning and critical findings over time and as a table.",
                     variables=[custom_variable("severity", "Severity", ["warning", "critical"]), kind_var],
                     annotation_sql=_annotation(False), links=_links("stethoscope-alerts"))


#: File stem -> builder.
DASHBOARDS = {"fleet": fleet, "training": training, "inference": inference, "drift": drift, "cost": cost,
              "alerts": alerts}


def build_all() -> list[Json]:
    """Every dashboard, in :data:`DASHBOARDS` order."""
    return [make() for make in DASHBOARDS.values()]
