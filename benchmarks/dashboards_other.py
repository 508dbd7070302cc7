"""Panel and variable latency of the training, inference, drift, cost and alerts dashboards at 10M and 100M rows.

``python -m benchmarks.run dashboards_other [--rows 10000000 100000000] [--repeat 5] [--raw-repeat 1]
[--dashboards training inference drift cost alerts]``

The fleet dashboard has its own benchmark (``benchmarks/dashboards.py``); this one
measures the other five the same way: one store per dashboard and size, filled inside
chDB by ``INSERT ... SELECT ... FROM numbers(N)`` into a store made by
``ensure_schema()`` (so the rollup views fill as ingestion would), shaped like what the
SDK, the analytics and the alert runner write:

- **training**: 16 jobs of 256 ranks (4,096 ranks on 512 nodes), one exported step per
  rank every second, each step 10 gauge points (loss, gradient norm, tokens, step time,
  data wait, step, and the time of 4 phases) with the SDK's attributes (job, rank, world
  size, node, GPU), plus the ``stethoscope.train.steps`` and ``.nonfinite`` delta sums.
  ``--rows`` counts the gauge points.
- **inference**: 20 models × 3 versions × 50 pods export every 5 s (the SDK's default
  interval): requests, errors of 2 kinds and the declared cost (sums), the latency
  histogram (16 buckets), and the sampling probability (a gauge). ``--rows`` counts the
  rows of all three tables together.
- **drift**: ``--rows`` sampled predictions (16 features each) from the same 60 model
  versions, plus what the drift checks write every 5 minutes for 7 days: a
  ``feature_drift`` finding per feature and a ``dataset_drift`` and ``confidence_cv``
  finding per model version (2.2M findings); and half as many rows of the sampling
  probability each pod reports every 5 s (a gauge).
- **cost**: the GPU utilization of 4,096 GPUs every 10 s (``--rows`` of them) and half as
  many rows of the model counters of the inference shape (requests, errors, declared cost).
- **alerts**: ``--rows`` findings (all kinds and severities, far more than detectors
  write: a stress case), plus alert-state snapshots every 30 s for 7 days (10 alerts
  each), 200,000 notification attempts and 20,000 remediation decisions.

Every panel, variable and annotation query is expanded by
:func:`stethoscope.dashboards.macros.render` for 1 h, 24 h and 7 d ranges ending at the
newest row, with the interval Grafana would pick for a ~1,000-pixel panel (10 s, 2 min,
10 min), with every variable at All; and once more with one value of the dashboard's
main variable (a job, a model) where it has one. Panels that can read the rollups also
run forced onto raw rows (``force=0``), the peer. Latency is wall time of
``Store.query`` returning ``JSONCompact`` after one warm-up run; p95 over ``--repeat``
runs. Each store is removed before the next is filled.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.dashboards import RANGES, _disk_bytes, _pct, _rows_to_read, _scalar

STEP_TRAIN, STEP_MODEL, STEP_GPU = 1, 5, 10
JOBS, RANKS = 16, 256
MODELS, VERSIONS, PODS = 20, 3, 50
FEATURES = 16
GPUS = 4096
#: The value a single-value case picks for the dashboard's main variable.
ONE = {"training": ("job", "job-3"), "inference": ("model", "model-7"), "drift": ("model", "model-7"),
       "cost": ("model", "model-7")}


def _training(rows: int, end: int) -> list[str]:
    series = 10
    per_step = JOBS * RANKS * series
    points = max(1, rows // per_step)
    names = ("['stethoscope.train.loss', 'stethoscope.train.grad_norm', 'stethoscope.train.tokens', "
             "'stethoscope.train.step_time', 'stethoscope.train.data_wait', 'stethoscope.train.step', "
             "'stethoscope.train.phase.time', 'stethoscope.train.phase.time', 'stethoscope.train.phase.time', "
             "'stethoscope.train.phase.time']")
    phases = "['', '', '', '', '', '', 'data', 'forward', 'backward', 'optimizer']"
    attrs = ("map('stethoscope.train.job', concat('job-', toString(j)), 'stethoscope.train.rank', toString(r), "
             "'stethoscope.train.world_size', '256', 'host.name', concat('gpu-node-', leftPad(toString(intDiv(g, 8)), 4, '0')), "
             "'gpu.index', toString(g % 8))")
    value = ("multiIf(k = 1, 2.0 / (1 + p / 500) + 0.02 * sin(p + r), k = 2, 1 + 0.2 * sin(p / 7 + r), k = 3, 4096, "
             "k = 4, 0.5 + 0.2 * (r % 61 = 0) + 0.01 * sin(p), k = 5, 0.05 + 0.1 * (j = 5), k = 6, p, "
             "k = 7, 0.05, k = 8, 0.15, k = 9, 0.25, 0.05)")
    gauge = f"""
INSERT INTO otel_metrics_gauge (ServiceName, MetricName, ResourceAttributes, Attributes, StartTimeUnix, TimeUnix, Value)
SELECT concat('train-job-', toString(j)), {names}[k],
       map('service.name', concat('train-job-', toString(j)), 'host.name', concat('gpu-node-', leftPad(toString(intDiv(g, 8)), 4, '0'))),
       if({phases}[k] = '', {attrs}, mapUpdate({attrs}, map('stethoscope.train.phase', {phases}[k]))),
       toDateTime64({end - points * STEP_TRAIN}, 9),
       toDateTime64({end}, 9) - toIntervalSecond(({points} - p) * {STEP_TRAIN}) + toIntervalMillisecond(r % 1000),
       toFloat64({value})
FROM (SELECT intDiv(number, {per_step}) AS p, number % {per_step} AS s, intDiv(s, {JOBS * RANKS}) + 1 AS k,
             s % {JOBS * RANKS} AS g, intDiv(g, {RANKS}) AS j, g % {RANKS} AS r
      FROM numbers({points * per_step}))"""
    # The delta sums, exported every 5 s per rank: steps and (rarely) non-finite values.
    sums_points = max(1, points // 5)
    sums = f"""
INSERT INTO otel_metrics_sum (ServiceName, MetricName, ResourceAttributes, Attributes, StartTimeUnix, TimeUnix, Value,
                              AggregationTemporality, IsMonotonic)
SELECT concat('train-job-', toString(j)), if(k = 1, 'stethoscope.train.steps', 'stethoscope.train.nonfinite'),
       map('service.name', concat('train-job-', toString(j))),
       if(k = 1, {attrs}, mapUpdate({attrs}, map('stethoscope.train.value', 'loss'))),
       toDateTime64({end}, 9) - toIntervalSecond(({sums_points} - p) * 5 + 5),
       toDateTime64({end}, 9) - toIntervalSecond(({sums_points} - p) * 5),
       toFloat64(if(k = 1, 5, (p * 7 + g) % 100003 = 0)), 1, true
FROM (SELECT intDiv(number, {2 * JOBS * RANKS}) AS p, number % {2 * JOBS * RANKS} AS s, intDiv(s, {JOBS * RANKS}) + 1 AS k,
             s % {JOBS * RANKS} AS g, intDiv(g, {RANKS}) AS j, g % {RANKS} AS r
      FROM numbers({sums_points * 2 * JOBS * RANKS}))"""
    return [gauge, sums]


_MODEL_ATTRS = ("map('stethoscope.model', concat('model-', toString(m)), "
                "'stethoscope.model.version', toString(v + 1))")
_MODEL_RES = ("map('service.name', concat('model-', toString(m)), "
              "'k8s.pod.name', concat('model-', toString(m), '-', toString(v + 1), '-', toString(d)), "
              "'host.name', concat('serving-node-', toString(d % 64)))")
_MODEL_FROM = (f"(SELECT intDiv(number, {{per}}) AS p, number % {{per}} AS s, {{extra}} "
               f"intDiv(s % {MODELS * VERSIONS * PODS}, {VERSIONS * PODS}) AS m, "
               f"intDiv(s % {VERSIONS * PODS}, {PODS}) AS v, s % {PODS} AS d FROM numbers({{n}}))")


def _model_sums(points: int, end: int) -> str:
    streams = MODELS * VERSIONS * PODS
    per = streams * 4
    src = _MODEL_FROM.format(per=per, extra=f"intDiv(s, {streams}) + 1 AS k,", n=points * per)
    return f"""
INSERT INTO otel_metrics_sum (ServiceName, MetricName, ResourceAttributes, Attributes, StartTimeUnix, TimeUnix, Value,
                              AggregationTemporality, IsMonotonic)
SELECT concat('model-', toString(m)),
       ['stethoscope.model.requests', 'stethoscope.model.errors', 'stethoscope.model.errors', 'stethoscope.model.business'][k],
       {_MODEL_RES},
       multiIf(k = 2, mapUpdate({_MODEL_ATTRS}, map('stethoscope.error.kind', 'timeout')),
               k = 3, mapUpdate({_MODEL_ATTRS}, map('stethoscope.error.kind', 'invalid_input')),
               k = 4, mapUpdate({_MODEL_ATTRS}, map('stethoscope.business.name', 'cost')), {_MODEL_ATTRS}),
       toDateTime64({end}, 9) - toIntervalSecond(({points} - p) * {STEP_MODEL} + {STEP_MODEL}),
       toDateTime64({end}, 9) - toIntervalSecond(({points} - p) * {STEP_MODEL}) + toIntervalMillisecond(d * 17),
       toFloat64(multiIf(k = 1, 100 + (m * 13 + d) % 50, k = 2, (p + d) % 97 = 0, k = 3, (p + m) % 211 = 0,
                         0.04 * (100 + (m * 13 + d) % 50))), 1, true
FROM {src}"""


def _model_histograms(points: int, end: int) -> str:
    streams = MODELS * VERSIONS * PODS
    src = _MODEL_FROM.format(per=streams, extra="", n=points * streams)
    bounds = "[1., 2., 5., 10., 20., 30., 50., 75., 100., 150., 200., 300., 500., 1000., 2000.]"
    counts = ("arrayMap(i -> toUInt64(greatest(0, round(40 * exp(-pow((i - 6 - (m % 3)) / 2.0, 2))))), "
              "range(16))")
    return f"""
INSERT INTO otel_metrics_histogram (ServiceName, MetricName, ResourceAttributes, Attributes, StartTimeUnix, TimeUnix,
                                    Count, Sum, BucketCounts, ExplicitBounds, Min, Max, AggregationTemporality)
SELECT concat('model-', toString(m)), 'stethoscope.model.latency', {_MODEL_RES}, {_MODEL_ATTRS},
       toDateTime64({end}, 9) - toIntervalSecond(({points} - p) * {STEP_MODEL} + {STEP_MODEL}),
       toDateTime64({end}, 9) - toIntervalSecond(({points} - p) * {STEP_MODEL}) + toIntervalMillisecond(d * 17),
       arraySum(c), arraySum(c) * 40.0, c, {bounds}, 0.8, 900., 1
FROM (SELECT *, {counts} AS c FROM {src})"""


def _model_gauges(points: int, end: int) -> str:
    streams = MODELS * VERSIONS * PODS
    src = _MODEL_FROM.format(per=streams, extra="", n=points * streams)
    return f"""
INSERT INTO otel_metrics_gauge (ServiceName, MetricName, ResourceAttributes, Attributes, StartTimeUnix, TimeUnix, Value)
SELECT concat('model-', toString(m)), 'stethoscope.model.sampling.probability', {_MODEL_RES},
       mapUpdate({_MODEL_ATTRS}, map('stethoscope.stream', 'default')),
       toDateTime64({end}, 9) - toIntervalSecond(({points} - p) * {STEP_MODEL} + {STEP_MODEL}),
       toDateTime64({end}, 9) - toIntervalSecond(({points} - p) * {STEP_MODEL}) + toIntervalMillisecond(d * 17),
       0.01 + 0.002 * (m % 5)
FROM {src}"""


def _inference(rows: int, end: int) -> list[str]:
    points = max(1, rows // (MODELS * VERSIONS * PODS * 6))
    return [_model_sums(points, end), _model_histograms(points, end), _model_gauges(points, end)]


def _findings(rows: int, end: int, span_s: int) -> str:
    kinds = ("['feature_drift', 'dataset_drift', 'confidence_cv', 'gpu_xid', 'loss_spike', 'latency_p99', "
             "'throughput_regression', 'cost_spike']")
    return f"""
INSERT INTO findings (Time, Kind, Subject, Model, ModelVersion, Feature, Method, Statistic, PValue, Effect, Threshold,
                      Severity, Drifted, WindowStart, WindowEnd, Details, InsertedAt)
SELECT t, {kinds}[k + 1], concat('model=model-', toString(m), ' version=', toString(v + 1), ' feature=f', toString(f)),
       concat('model-', toString(m)), toString(v + 1), if(k = 0, concat('f', toString(f)), ''), 'ks',
       (number % 1000) / 1000.0, pow(10, -(number % 12)), (number % 1000) / 1000.0, 0.1,
       ['info', 'info', 'info', 'warning', 'warning', 'critical'][number % 6 + 1], number % 3 = 0,
       t - INTERVAL 1 HOUR, t, '{{"n_current": 5000}}', t
FROM (SELECT number, toDateTime64({end}, 3) - toIntervalMillisecond(intDiv(number * {span_s * 1000}, {rows})) AS t,
             number % 8 AS k, intDiv(number, 8) % {MODELS} AS m, intDiv(number, {8 * MODELS}) % {VERSIONS} AS v,
             intDiv(number, {8 * MODELS * VERSIONS}) % {FEATURES} AS f
      FROM numbers({rows}))"""


def _drift(rows: int, end: int) -> list[str]:
    streams = MODELS * VERSIONS
    span = 7 * 86400
    samples = f"""
INSERT INTO samples (Timestamp, ServiceName, Model, ModelVersion, Stream, RequestId, Features, FeatureNames, Prediction,
                     PredictionLabel, Confidence, AdjustedCount, SamplingThreshold, Uncertain, Attributes,
                     ResourceAttributes)
SELECT toDateTime64({end}, 9) - toIntervalMillisecond(intDiv(number * {span * 1000}, {rows})),
       concat('model-', toString(m)), concat('model-', toString(m)), toString(v + 1), 'default',
       concat('req-', toString(number)),
       arrayMap(i -> toFloat32(sin(number * (i + 1)) * 10 + i), range({FEATURES})),
       arrayMap(i -> concat('f', toString(i)), range({FEATURES})),
       (number % 100) / 100.0, '', 0.5 + (number % 50) / 100.0, 100.0, '00ff', number % 20 = 0, map(),
       map('service.name', concat('model-', toString(m)))
FROM (SELECT number, number % {streams} AS s, intDiv(s, {VERSIONS}) AS m, s % {VERSIONS} AS v FROM numbers({rows}))"""
    checks = 7 * 24 * 12  # every 5 minutes for 7 days
    per_check = MODELS * VERSIONS * (FEATURES + 2)
    findings = f"""
INSERT INTO findings (Time, Kind, Subject, Model, ModelVersion, Feature, Method, Statistic, PValue, Effect, Threshold,
                      Severity, Drifted, WindowStart, WindowEnd, Details, InsertedAt)
SELECT t, multiIf(f < {FEATURES}, 'feature_drift', f = {FEATURES}, 'dataset_drift', 'confidence_cv'),
       concat('model=model-', toString(m), ' version=', toString(v + 1)), concat('model-', toString(m)),
       toString(v + 1), if(f < {FEATURES}, concat('f', toString(f)), ''), if(f < {FEATURES}, 'ks', 'share'),
       ((c * 7 + f) % 100) / 200.0, pow(10, -((c + f) % 9)), ((c * 7 + f) % 100) / 200.0, 0.1,
       if((c + f) % 17 = 0, 'warning', 'info'), (c + f) % 17 = 0, t - INTERVAL 1 HOUR, t, '{{}}', t
FROM (SELECT toDateTime64({end}, 3) - toIntervalSecond(({checks} - c) * 300) AS t, c, s % {FEATURES + 2} AS f,
             intDiv(s, {(FEATURES + 2) * VERSIONS}) AS m, intDiv(s, {FEATURES + 2}) % {VERSIONS} AS v
      FROM (SELECT intDiv(number, {per_check}) AS c, number % {per_check} AS s FROM numbers({checks * per_check})))"""
    # The sampling probability each pod reports every 5 s: half as many rows as samples.
    return [samples, findings, _model_gauges(max(1, rows // 2 // (MODELS * VERSIONS * PODS)), end)]


def _cost(rows: int, end: int) -> list[str]:
    from benchmarks.dashboards import GAUGE_SERIES, _series_sql

    points = max(1, rows // GPUS)
    gpu = _series_sql("otel_metrics_gauge", GAUGE_SERIES[:1], points, end, counter=False)
    return [gpu, _model_sums(max(1, rows // 2 // (MODELS * VERSIONS * PODS * 4)), end)]


def _alerts(rows: int, end: int) -> list[str]:
    span = 7 * 86400
    snaps = span // 30
    alerts = f"""
INSERT INTO alerts (Fingerprint, Kind, Rule, State, Version, Body)
SELECT if(i = 0, '', concat('fp', toString(i))), if(i = 0, 'snapshot', 'alert'), if(i = 0, '', concat('Rule', toString(i % 4))),
       if(i = 0, '', if(i % 3 = 0, 'pending', 'firing')), toUInt64(({end} - ({snaps} - c) * 30) * 1000),
       if(i = 0, '{{}}', concat('{{"active_since": ', toString({end} - 3600 - i), ', "fired_at": ', toString({end} - 3000 - i),
          ', "subject": "node=gpu-node-', toString(i), '", "value": 1.5}}'))
FROM (SELECT intDiv(number, 11) AS c, number % 11 AS i FROM numbers({snaps * 11}))"""
    attempts = f"""
INSERT INTO notification_attempts (Time, OutboxId, Notifier, Fingerprint, Rule, Status, Attempt, HttpStatus, Error,
                                   NextAttemptAt, Body)
SELECT toDateTime64({end}, 3) - toIntervalMillisecond(intDiv(number * {span * 1000}, 200000)),
       concat('ob', toString(intDiv(number, 2))), ['webhook', 'slack', 'pagerduty', 'alertmanager'][number % 4 + 1],
       concat('fp', toString(intDiv(number, 8) % 500)), concat('Rule', toString(number % 4)),
       if(number % 2 = 0, 'queued', ['delivered', 'delivered', 'retry', 'failed'][intDiv(number, 2) % 4 + 1]),
       1, 200, '', toDateTime64(0, 3),
       if(number % 2 = 0, concat('{{"status": "', if(number % 16 = 0, 'resolved', 'firing'), '", "reason": "new", ',
          '"severity": "warning", "subject": "node=gpu-node-', toString(number % 512), '", "starts_at": ',
          toString({end} - intDiv(number, 8) * 3), '}}'), '')
FROM numbers(200000)"""
    actions = f"""
INSERT INTO actions (Time, ActionId, Action, Target, Rule, Fingerprint, Decision, Reason, DryRun, Params, Result,
                     IdempotencyKey)
SELECT toDateTime64({end}, 3) - toIntervalMillisecond(intDiv(number * {span * 1000}, 20000)), concat('a', toString(number)),
       ['cordon', 'scale', 'retrain'][number % 3 + 1], concat('gpu-node-', toString(number % 512)),
       concat('Rule', toString(number % 4)), concat('fp', toString(number % 500)),
       ['dry_run', 'taken', 'skipped', 'failed'][number % 4 + 1], if(number % 4 = 2, 'rate limit: 1 per 1h', ''),
       number % 4 = 0, '{{}}', '{{}}', concat('k', toString(number))
FROM numbers(20000)"""
    return [_findings(rows, end, span), alerts, attempts, actions]


FILLS = {"training": _training, "inference": _inference, "drift": _drift, "cost": _cost, "alerts": _alerts}
TABLES = ("otel_metrics_gauge", "otel_metrics_sum", "otel_metrics_histogram", "samples", "findings", "alerts",
          "notification_attempts", "actions")


def _queries(stem: str, force: int | None) -> list[tuple[str, str]]:
    from stethoscope.dashboards.build import DASHBOARDS
    from stethoscope.dashboards.validate import queries

    builder = DASHBOARDS[stem]
    d = builder(force) if stem != "alerts" else builder()
    return [(where, sql) for where, _, sql in queries(d)]


def _values(stem: str, one: bool) -> dict:
    from stethoscope.dashboards.build import DASHBOARDS, DEFAULT_GPU_HOUR_PRICE
    from stethoscope.dashboards.macros import ALL, Variable

    out = {}
    for v in DASHBOARDS[stem]()["templating"]["list"]:
        if v["type"] == "datasource":
            continue
        var = Variable(v["name"], multi=bool(v.get("multi")), include_all=bool(v.get("includeAll")))
        if v["type"] == "constant":
            out[var] = v.get("query", DEFAULT_GPU_HOUR_PRICE)
        elif one and stem in ONE and v["name"] == ONE[stem][0]:
            out[var] = [ONE[stem][1]]
        else:
            out[var] = ALL
    return out


def _time(store, sql: str, repeat: int) -> tuple[list[float], int]:
    first = store.query(sql, "JSONCompact")
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        store.query(sql, "JSONCompact")
        times.append(1000 * (time.perf_counter() - t))
    return times, json.loads(first.data)["rows"]


def measure(store, stem: str, end: int, repeat: int, raw_repeat: int) -> list[dict]:
    from stethoscope.dashboards.macros import QueryContext, render

    out = []
    has_tiers = stem != "alerts"
    for label, span, interval in RANGES:
        ctx = QueryContext(start=end - span, end=end, interval_s=interval)
        cases = [("all", None, False)] + ([("one", None, True)] if stem in ONE else [])
        if has_tiers:
            cases.append(("raw", 0, False))
        for case, force, one in cases:
            values = _values(stem, one)
            for where, raw in _queries(stem, force):
                if case == "raw" and "UNION ALL" not in raw:
                    continue  # no tiers: the same SQL as "all"
                sql = render(raw, ctx, values)
                times, rows = _time(store, sql, raw_repeat if case == "raw" else repeat)
                out.append({"range": label, "case": case, "query": where, "p50_ms": statistics.median(times),
                            "p95_ms": _pct(times, 0.95), "result_rows": rows,
                            "rows_read": sum(_rows_to_read(store, sql).values())})
    return out


def run_one(stem: str, rows: int, repeat: int, raw_repeat: int, base: Path) -> tuple[dict, list[dict]]:
    from stethoscope.exporters.chdb_store import ChdbStore

    work = Path(tempfile.mkdtemp(prefix=f"stethoscope-bench-{stem}-", dir=base))
    store = ChdbStore(work / "data")
    try:
        store.ensure_schema()
        end = int(time.time()) // 60 * 60
        t = time.perf_counter()
        for sql in FILLS[stem](rows, end):
            store.execute(sql)
        fill_s = time.perf_counter() - t
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and _scalar(store, "SELECT count() FROM system.merges") > 0:
            time.sleep(2)
        counts = {n: _scalar(store, f"SELECT count() FROM {n}") for n in TABLES}
        info = {"fill_s": fill_s, "rows": {k: v for k, v in counts.items() if v}, "disk_mb": _disk_bytes(work) / 1e6,
                "load_before": os.getloadavg()[0]}
        results = measure(store, stem, end, repeat, raw_repeat)
        info["load_after"] = os.getloadavg()[0]
    finally:
        store.close()
        shutil.rmtree(work, ignore_errors=True)
    return info, results


def report(stem: str, rows: int, info: dict, results: list[dict]) -> None:
    held = ", ".join(f"{n} {c:,}" for n, c in info["rows"].items())
    print(f"\n### {stem}, {rows:,} rows requested: {held}; filled in {info['fill_s']:.0f} s; "
          f"{info['disk_mb']:.0f} MB on disk; load average {info['load_before']:.1f} before, "
          f"{info['load_after']:.1f} after\n")
    print("| range | case | queries | p95 ≤ 300 ms | slowest p95 (ms) | slowest query | its rows read | its result rows |")
    print("|---|---|---:|---:|---:|---|---:|---:|")
    for label, _, _ in RANGES:
        for case in ("all", "one", "raw"):
            sel = [x for x in results if x["range"] == label and x["case"] == case]
            if not sel:
                continue
            worst = max(sel, key=lambda x: x["p95_ms"])
            ok = sum(x["p95_ms"] <= 300 for x in sel)
            print(f"| {label} | {case} | {len(sel)} | {ok} | {worst['p95_ms']:.0f} | {worst['query']} | "
                  f"{worst['rows_read']:,} | {worst['result_rows']:,} |")
    slow = sorted((x for x in results if x["case"] != "raw" and x["p95_ms"] > 300), key=lambda x: -x["p95_ms"])
    if slow:
        print("\nOver 300 ms (dashboard SQL):\n")
        for x in slow:
            print(f"- {x['range']} {x['case']}: {x['query']}: p95 {x['p95_ms']:.0f} ms, {x['rows_read']:,} rows read, "
                  f"{x['result_rows']:,} returned")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="+", default=[10_000_000, 100_000_000])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--raw-repeat", type=int, default=1)
    p.add_argument("--dashboards", nargs="+", default=list(FILLS), choices=list(FILLS))
    p.add_argument("--dir", default=tempfile.gettempdir())
    p.add_argument("--json", help="also write every measurement to this file")
    args = p.parse_args(argv)
    print(f"# dashboards_other: {os.cpu_count()} CPUs; {args.repeat} runs per query after one warm-up "
          f"({args.raw_repeat} for the raw peer); load average {os.getloadavg()[0]:.1f}")
    everything = []
    for rows in sorted(args.rows):
        for stem in args.dashboards:
            info, results = run_one(stem, rows, args.repeat, args.raw_repeat, Path(args.dir))
            report(stem, rows, info, results)
            everything.append({"dashboard": stem, "rows": rows, "info": info, "results": results})
    if args.json:
        Path(args.json).write_text(json.dumps(everything, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
