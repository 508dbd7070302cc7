"""Fleet-dashboard panel latency at 10M and 100M rows, raw tables beside the rollups.

``python -m benchmarks.run dashboards [--rows 10000000 100000000] [--repeat 7] [--dir /tmp]``

A fleet of 4,096 GPUs (512 nodes of 8, two clusters) reports every 10 s, as the agent
does by default: 7 gauge series per GPU (utilization, memory used, temperature, power,
SM clock, and ``gpu.throttle`` for two reasons) and 3 counter series (one XID code,
corrected and uncorrected ECC). ``--rows`` counts gauge and sum rows together, so 10M
rows are about 41 minutes of the fleet and 100M about 6.8 hours. The rows are made
inside chDB by ``INSERT INTO ... SELECT ... FROM numbers(N)`` into a store created by
``ensure_schema()``, so the materialized views fill the rollups exactly as ingestion does.

Every fleet-dashboard panel is expanded by :func:`stethoscope.dashboards.macros.render`
for ranges of 1 h, 24 h and 7 d ending at the newest row, with the interval Grafana would
pick for a ~1,000-pixel panel (10 s, 2 min, 10 min), in three cases (:data:`CASES`):

- ``raw``: variables at All, every panel forced onto raw rows (``force=0``), the peer;
- ``all``: variables at All, the SQL as the dashboard runs it (it reads the rollups,
  at whole minutes, because more than ``MAX_RAW_NODES`` nodes are selected);
- ``nodes``: the dashboard's SQL with ``MAX_RAW_NODES`` nodes selected, the widest
  selection that still reads raw rows at short ranges.

Latency is wall time of ``Store.query`` returning ``JSONCompact``, after one warm-up
run; p50 and p95 over ``--repeat`` runs per panel (``--raw-repeat`` for the raw peer),
and over all panels' runs together. ``--ingest-rows N`` also times inserting N gauge
rows with and without the rollup views.

The store directory is removed afterwards. 100M rows are skipped, with the reason,
when the free disk space is less than 12 times what 10M rows took.
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

GPUS, NODES_PER_CLUSTER = 4096, 256
GAUGE_SERIES = (("gpu.utilization", ""), ("gpu.memory.used", ""), ("gpu.temperature", ""), ("gpu.power.draw", ""),
                ("gpu.clock.sm", ""), ("gpu.throttle", "hw_thermal_slowdown"), ("gpu.throttle", "sw_power_cap"))
SUM_SERIES = (("gpu.xid.errors", "79"), ("gpu.ecc.errors", "corrected"), ("gpu.ecc.errors", "uncorrected"))
STEP_S = 10
RANGES = (("1h", 3600, 10), ("24h", 86400, 120), ("7d", 7 * 86400, 600))
#: (label, force, whether the node variable is All); see the module docstring.
CASES = (("raw", 0, True), ("all", None, True), ("nodes", None, False))


def _series_sql(table: str, series: tuple[tuple[str, str], ...], points: int, end: int, counter: bool) -> str:
    """INSERT ... SELECT of ``points`` time steps of every series, time-major as agents send them."""
    per_step = GPUS * len(series)
    names = "[" + ", ".join(f"'{m}'" for m, _ in series) + "]"
    extras = "[" + ", ".join(f"'{x}'" for _, x in series) + "]"
    extra_key = "'gpu.xid'" if counter else "'gpu.throttle.reason'"
    if counter:
        # Cumulative counters: a few GPUs with XIDs, corrected ECC everywhere, uncorrected on a few.
        value = ("multiIf(k = 1, if(g % 509 = 0, intDiv(p, 360), 0), k = 2, intDiv(p * (g % 7 + 1), 100), "
                 "if(g % 997 = 0, intDiv(p, 720), 0))")
        extra_key = "if(k = 1, 'gpu.xid', 'gpu.ecc.type')"
    else:
        value = ("multiIf(k = 1, 0.55 + 0.4 * sin((p + g) / 30), k = 2, 5.0e10 + 2.0e10 * sin((p + g) / 50), "
                 "k = 3, 55 + 20 * sin((p + g) / 40), k = 4, 450 + 200 * sin((p + g) / 35), "
                 "k = 5, 1980 - 300 * ((p + g) % 97 = 0), ((p * 31 + g) % 211) < 3)")
    gpu_attrs = ("'gpu.index', toString(g % 8), 'gpu.uuid', concat('GPU-', toString(cityHash64(g))), "
                 "'gpu.name', 'NVIDIA H100 80GB HBM3', 'gpu.source', 'nvml'")
    more_cols, more_vals = (", AggregationTemporality, IsMonotonic", ", 2, true") if counter else ("", "")
    return f"""
INSERT INTO {table} (ServiceName, MetricName, ResourceAttributes, Attributes, StartTimeUnix, TimeUnix, Value{more_cols})
SELECT 'stethoscope-agent', {names}[k],
       map('host.name', concat('gpu-node-', leftPad(toString(intDiv(g, 8)), 4, '0')),
           'k8s.cluster.name', concat('cluster-', toString(intDiv(g, {NODES_PER_CLUSTER * 8}))),
           'service.name', 'stethoscope-agent', 'os.type', 'linux'),
       if({extras}[k] = '', map({gpu_attrs}), map({gpu_attrs}, {extra_key}, {extras}[k])),
       toDateTime64({end - points * STEP_S}, 9),
       toDateTime64({end}, 9) - toIntervalSecond(({points} - p) * {STEP_S}) + toIntervalMillisecond(g % 1000),
       toFloat64({value}){more_vals}
FROM (SELECT number, intDiv(number, {per_step}) AS p, number % {per_step} AS s,
             intDiv(s, {GPUS}) + 1 AS k, s % {GPUS} AS g
      FROM numbers({points * per_step}))"""


def _fill(store, rows: int, end: int) -> dict:
    per_step = GPUS * (len(GAUGE_SERIES) + len(SUM_SERIES))
    points = max(1, rows // per_step)
    t = time.perf_counter()
    store.execute(_series_sql("otel_metrics_gauge", GAUGE_SERIES, points, end, counter=False))
    store.execute(_series_sql("otel_metrics_sum", SUM_SERIES, points, end, counter=True))
    fill_s = time.perf_counter() - t
    deadline = time.monotonic() + 300  # let background merges settle, as in a store that has been running
    while time.monotonic() < deadline and _scalar(store, "SELECT count() FROM system.merges") > 0:
        time.sleep(2)
    counts = {name: _scalar(store, f"SELECT count() FROM {name}") for name in (
        "otel_metrics_gauge", "otel_metrics_sum", "otel_metrics_gauge_1m", "otel_metrics_gauge_1h",
        "otel_metrics_sum_1m", "otel_metrics_sum_1h")}
    parts = _scalar(store, "SELECT count() FROM system.parts WHERE active AND database = currentDatabase()")
    return {"points": points, "span_s": points * STEP_S, "fill_s": fill_s, "rows": counts,
            "active_parts": parts}


def _scalar(store, sql: str) -> int:
    return int(store.query(sql, "TabSeparated", readonly=False).data.split()[0])


def _rows_to_read(store, sql: str) -> dict[str, int]:
    """Rows ClickHouse plans to read per table (``EXPLAIN ESTIMATE``): the unchosen branches read none."""
    out = {}
    for line in store.query("EXPLAIN ESTIMATE " + sql, "TabSeparated").data.decode().splitlines():
        _, table, _, rows, _ = line.split("\t")
        if int(rows):
            out[table] = out.get(table, 0) + int(rows)
    return out


def _disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def _panels(force: int | None) -> list[tuple[str, str]]:
    from stethoscope.dashboards.build import fleet

    return [(p["title"], p["targets"][0]["rawSql"]) for p in fleet(force)["panels"]]


def _measure(store, end: int, repeat: int, raw_repeat: int) -> list[dict]:
    from stethoscope.dashboards.build import MAX_RAW_NODES
    from stethoscope.dashboards.macros import ALL, QueryContext, Variable, render

    every = {Variable(n, multi=True, include_all=True): ALL for n in ("cluster", "node", "gpu")}
    # Nodes far apart in the fleet, as a person picking a few would; one per cluster where possible.
    nodes = [f"gpu-node-{i * (GPUS // 8) // MAX_RAW_NODES:04d}" for i in range(MAX_RAW_NODES)]
    few = {**every, Variable("node", multi=True, include_all=True): nodes}
    out = []
    for label, span, interval in RANGES:
        ctx = QueryContext(start=end - span, end=end, interval_s=interval)
        for case, force, at_all in CASES:
            for title, raw in _panels(force):
                sql = render(raw, ctx, every if at_all else few)
                first = store.query(sql, "JSONCompact")
                times = []
                for _ in range(raw_repeat if case == "raw" else repeat):
                    t = time.perf_counter()
                    store.query(sql, "JSONCompact")
                    times.append(time.perf_counter() - t)
                rows = json.loads(first.data)["rows"]
                out.append({"range": label, "tier": case, "panel": title,
                            "p50_ms": 1000 * statistics.median(times), "p95_ms": 1000 * _pct(times, 0.95),
                            "times_ms": [1000 * x for x in times], "rows_read": _rows_to_read(store, sql),
                            "result_rows": rows})
    return out


def _report(rows: int, info: dict, results: list[dict]) -> None:
    print(f"\n### {rows:,} rows requested: {info['rows']['otel_metrics_gauge']:,} gauge + "
          f"{info['rows']['otel_metrics_sum']:,} sum rows, {info['points']} steps of {STEP_S} s "
          f"({info['span_s'] / 3600:.1f} h); filled in {info['fill_s']:.0f} s; {info['disk_mb']:.0f} MB on disk; "
          f"{info['active_parts']} active parts")
    r = info["rows"]
    print(f"rollup rows: gauge 1m {r['otel_metrics_gauge_1m']:,}, 1h {r['otel_metrics_gauge_1h']:,}; "
          f"sum 1m {r['otel_metrics_sum_1m']:,}, 1h {r['otel_metrics_sum_1h']:,}\n")
    from stethoscope.dashboards.build import MAX_RAW_NODES

    few = f"{MAX_RAW_NODES} nodes"
    print(f"load average before the panels: {info['load_before']}, after: {os.getloadavg()[0]:.1f}\n")
    print("| range | panel | raw p95 (All) | dashboard p95 (All) | raw/dashboard | dashboard p95 "
          f"({few}) | rows to read: raw / dashboard (All) / dashboard ({few}) "
          "| result rows raw / dashboard (All) |")
    print("|---|---|---:|---:|---:|---:|---|---:|")
    by = {(x["range"], x["tier"], x["panel"]): x for x in results}
    for label, _, _ in RANGES:
        for title in dict.fromkeys(x["panel"] for x in results):
            a, b, c = by[label, "raw", title], by[label, "all", title], by[label, "nodes", title]
            print(f"| {label} | {title} | {a['p95_ms']:.0f} | {b['p95_ms']:.0f} | "
                  f"{a['p95_ms'] / max(b['p95_ms'], 1e-3):.1f}x | {c['p95_ms']:.0f} | "
                  f"{_fmt(a['rows_read'])} / {_fmt(b['rows_read'])} / {_fmt(c['rows_read'])} | "
                  f"{a['result_rows']:,} / {b['result_rows']:,} |")
    print("\n| range | case | p50 (all panels) | p95 (all panels) | slowest panel p95 | panels with p95 <= 300 ms |")
    print("|---|---|---:|---:|---:|---:|")
    for label, _, _ in RANGES:
        for case, _, _ in CASES:
            sel = [x for x in results if x["range"] == label and x["tier"] == case]
            allt = [t for x in sel for t in x["times_ms"]]
            worst = max(sel, key=lambda x: x["p95_ms"])
            ok = sum(x["p95_ms"] <= 300 for x in sel)
            print(f"| {label} | {case} | {statistics.median(allt):.0f} | {_pct(allt, 0.95):.0f} | "
                  f"{worst['p95_ms']:.0f} ({worst['panel']}) | {ok} of {len(sel)} |")


def _fmt(read: dict[str, int]) -> str:
    return " + ".join(f"{n:,} ({t.removeprefix('otel_metrics_')})" for t, n in sorted(read.items())) or "0"


def run_size(rows: int, repeat: int, base: Path, raw_repeat: int) -> tuple[dict, list[dict]]:
    from stethoscope.exporters.chdb_store import ChdbStore

    work = Path(tempfile.mkdtemp(prefix="stethoscope-bench-dash-", dir=base))
    store = ChdbStore(work / "data")
    try:
        store.ensure_schema()
        end = int(time.time()) // 60 * 60
        info = _fill(store, rows, end)
        info["disk_mb"] = _disk_bytes(work) / 1e6
        info["load_before"] = f"{os.getloadavg()[0]:.1f}"
        results = _measure(store, end, repeat, raw_repeat)
    finally:
        store.close()
        shutil.rmtree(work, ignore_errors=True)
    return info, results


def ingest_overhead(rows: int, base: Path, rounds: int = 3) -> None:
    """Insert time of the same rows with and without the rollup views, alternating stores."""
    from stethoscope.dashboards.rollups import ROLLUPS
    from stethoscope.exporters.chdb_store import ChdbStore

    times: dict[bool, list[float]] = {True: [], False: []}
    end = int(time.time()) // 60 * 60
    for _ in range(rounds):
        for views in (False, True):
            work = Path(tempfile.mkdtemp(prefix="stethoscope-bench-dash-", dir=base))
            store = ChdbStore(work / "data")
            try:
                store.ensure_schema()
                if not views:
                    for r in ROLLUPS:
                        store.execute(f"DROP VIEW {r.view}")
                per_step = GPUS * len(GAUGE_SERIES)
                t = time.perf_counter()
                store.execute(_series_sql("otel_metrics_gauge", GAUGE_SERIES, max(1, rows // per_step), end, False))
                times[views].append(time.perf_counter() - t)
            finally:
                store.close()
                shutil.rmtree(work, ignore_errors=True)
    without, with_ = statistics.median(times[False]), statistics.median(times[True])
    print(f"\n### ingest: {rows:,} gauge rows by INSERT ... SELECT, median of {rounds}: {without:.1f} s without the "
          f"views, {with_:.1f} s with them ({with_ / without:.2f}x)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="+", default=[10_000_000, 100_000_000])
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--raw-repeat", type=int, help="runs per panel for the raw peer (default: --repeat); "
                   "at 100M rows a raw panel takes seconds")
    p.add_argument("--dir", default=tempfile.gettempdir(), help="where the temporary store goes")
    p.add_argument("--json", help="also write every measurement to this file")
    p.add_argument("--ingest-rows", type=int, default=0,
                   help="also time inserting this many gauge rows with and without the rollup views")
    args = p.parse_args(argv)
    base = Path(args.dir)
    print(f"# dashboards: {os.cpu_count()} CPUs; free disk under {base}: {shutil.disk_usage(base).free / 1e9:.0f} GB; "
          f"{args.repeat} runs per panel after one warm-up; load average {os.getloadavg()[0]:.1f}")
    per_row = None
    everything = {}
    for rows in sorted(args.rows):
        free = shutil.disk_usage(base).free
        if per_row is not None and per_row * rows * 12 > free:
            print(f"\n### {rows:,} rows: skipped: needs about {per_row * rows / 1e9:.1f} GB, and 12 times that "
                  f"({per_row * rows * 12 / 1e9:.0f} GB) is more than the {free / 1e9:.0f} GB free")
            continue
        info, results = run_size(rows, args.repeat, base, args.raw_repeat or args.repeat)
        per_row = info["disk_mb"] * 1e6 / max(1, rows)
        _report(rows, info, results)
        everything[rows] = {"info": info, "results": results}
    if args.ingest_rows:
        ingest_overhead(args.ingest_rows, base)
    if args.json:
        Path(args.json).write_text(json.dumps(everything, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
