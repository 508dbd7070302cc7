"""Per-GPU fleet panels with many nodes selected: the fleet's spread and the outlier GPUs, not a line per GPU."""

from __future__ import annotations

import json
import time
from collections import defaultdict

import numpy as np
import pytest
from stethoscope.dashboards.build import FLEET_QUANTILES, MAX_RAW_NODES, OUTLIER_GPUS, fleet
from stethoscope.dashboards.macros import ALL, QueryContext, Variable, render
from stethoscope.exporters.chdb_store import ChdbStore

NODES = [f"node-{i}" for i in range(4)]
GPUS_PER_NODE = 8
POINTS, STEP_S = 30, 10
#: Panel title -> (metric, how a bucket aggregates the points, how GPUs are ranked over the range).
PANELS = {
    "GPU utilization": ("gpu.utilization", "avg", "lowest mean"),
    "GPU memory used": ("gpu.memory.used", "max", "highest max"),
    "GPU temperature": ("gpu.temperature", "max", "highest max"),
    "GPU power draw": ("gpu.power.draw", "avg", "highest mean"),
    "SM clock": ("gpu.clock.sm", "avg", "lowest min"),
}
_VAR = {name: Variable(name, multi=True, include_all=True) for name in ("cluster", "node", "gpu")}


def _values(nodes=ALL) -> dict:
    return {_VAR["cluster"]: ALL, _VAR["node"]: nodes, _VAR["gpu"]: ALL}


@pytest.fixture(scope="module")
def fleet_store(tmp_path_factory):
    """32 GPUs on 4 nodes, 30 points each of every per-GPU metric, with values that differ per GPU and per point."""
    store = ChdbStore(tmp_path_factory.mktemp("outliers") / "data")
    store.ensure_schema()
    end = int(time.time()) // 60 * 60
    rng = np.random.default_rng(11)
    data = {}  # (metric, node, gpu) -> [(unix time, value)]
    rows = []
    for metric, _, _ in PANELS.values():
        scale = rng.permutation(len(NODES) * GPUS_PER_NODE)  # GPU order must not decide the ranking
        for n, node in enumerate(NODES):
            for g in range(GPUS_PER_NODE):
                level = 1.0 + scale[n * GPUS_PER_NODE + g]
                points = []
                for i in range(POINTS):
                    t = end - POINTS * STEP_S + i * STEP_S
                    v = float(np.round(level + rng.normal(0, 0.8), 6))
                    points.append((t, v))
                    rows.append(f"('stethoscope-agent', '{metric}', map('host.name', '{node}', 'k8s.cluster.name', "
                                f"'c1'), map('gpu.index', '{g}'), toDateTime64({t}, 9), toDateTime64({t}, 9), {v})")
                data[metric, node, str(g)] = points
    store.execute("INSERT INTO otel_metrics_gauge (ServiceName, MetricName, ResourceAttributes, Attributes, "
                  "StartTimeUnix, TimeUnix, Value) VALUES " + ", ".join(rows))
    try:
        yield store, data, end
    finally:
        store.close()


def _panel(title: str, force=None) -> str:
    (p,) = [p for p in fleet(force)["panels"] if p["title"] == title]
    return p["targets"][0]["rawSql"]


def _run(store, title: str, end: int, values: dict, force=None) -> list[dict]:
    ctx = QueryContext(start=end - 3600, end=end + 60, interval_s=60)
    return json.loads(store.query(render(_panel(title, force), ctx, values), "JSON").data)["data"]


def _expected(data: dict, metric: str, agg: str, rank: str, nodes: list[str]) -> tuple[list[str], dict]:
    """The outlier GPUs and the per-minute quantiles across GPUs, from the raw points."""
    agg_fn = np.mean if agg == "avg" else np.max
    series = {f"{node}/{gpu}": pts for (m, node, gpu), pts in data.items() if m == metric and node in nodes}
    rank_fn = {"lowest mean": lambda v: np.mean(v), "highest mean": lambda v: -np.mean(v),
               "highest max": lambda v: -np.max(v), "lowest min": lambda v: np.min(v)}[rank]
    order = sorted(series, key=lambda k: (rank_fn([v for _, v in series[k]]), *k.split("/")))
    per_minute = defaultdict(list)
    for pts in series.values():
        by_minute = defaultdict(list)
        for t, v in pts:
            by_minute[t // 60 * 60].append(v)
        for minute, vs in by_minute.items():
            per_minute[minute].append(agg_fn(vs))
    bands = {minute: dict(zip(FLEET_QUANTILES.values(), np.quantile(vs, list(FLEET_QUANTILES)), strict=True))
             for minute, vs in per_minute.items()}
    return order[:OUTLIER_GPUS], bands


def _minute(row: dict) -> int:
    return int(time.mktime(time.strptime(row["time"], "%Y-%m-%d %H:%M:%S")) - time.timezone)


@pytest.mark.parametrize("title", list(PANELS))
def test_all_nodes_draw_the_spread_and_the_outliers(fleet_store, title):
    store, data, end = fleet_store
    metric, agg, rank = PANELS[title]
    rows = _run(store, title, end, _values())
    outliers, bands = _expected(data, metric, agg, rank, NODES)
    lines = {r["gpu"] for r in rows}
    assert lines == set(FLEET_QUANTILES.values()) | set(outliers), (title, lines, outliers)
    minutes = {_minute(r) for r in rows}
    assert minutes == set(bands)
    assert len(rows) == len(minutes) * (len(FLEET_QUANTILES) + OUTLIER_GPUS)
    for r in rows:
        if r["gpu"] in bands[_minute(r)]:
            assert r["value"] == pytest.approx(bands[_minute(r)][r["gpu"]], rel=1e-9), (title, r)
    # An outlier's line is that GPU's own value per minute.
    first = outliers[0]
    node, gpu = first.split("/")
    agg_fn = np.mean if agg == "avg" else np.max
    for r in (r for r in rows if r["gpu"] == first):
        own = [v for t, v in data[metric, node, gpu] if t // 60 * 60 == _minute(r)]
        assert r["value"] == pytest.approx(agg_fn(own), rel=1e-9)


def test_a_few_nodes_keep_one_line_per_gpu_and_more_are_wide(fleet_store):
    store, data, end = fleet_store
    few = NODES[:MAX_RAW_NODES]
    rows = _run(store, "GPU temperature", end, _values(few))
    assert {r["gpu"] for r in rows} == {f"{n}/{g}" for n in few for g in range(GPUS_PER_NODE)}
    more = NODES[:MAX_RAW_NODES + 1]
    rows = _run(store, "GPU temperature", end, _values(more))
    outliers, bands = _expected(data, "gpu.temperature", "max", "highest max", more)
    assert {r["gpu"] for r in rows} == set(FLEET_QUANTILES.values()) | set(outliers)
    assert all(n in more for n in {r["gpu"].split("/")[0] for r in rows if "/" in r["gpu"]})
    median = next(r for r in rows if r["gpu"] == "fleet median")
    assert median["value"] == pytest.approx(bands[_minute(median)]["fleet median"], rel=1e-9)


def test_a_pinned_tier_keeps_one_line_per_gpu(fleet_store):
    store, _, end = fleet_store
    for force in (0, 60):
        rows = _run(store, "GPU power draw", end, _values(), force)
        assert len({r["gpu"] for r in rows}) == len(NODES) * GPUS_PER_NODE
        assert not any(r["gpu"].startswith("fleet") for r in rows)


#: The fleet panels that draw the spread and the outliers when many nodes are selected.
WIDE_PANELS = frozenset(PANELS)


def with_spread(per_gpu: list[dict]) -> list[dict]:
    """What a wide panel shows, from its one-line-per-GPU rows, for a fleet of at most OUTLIER_GPUS GPUs
    (every GPU is then an outlier): those rows plus the quantiles across GPUs per bucket."""
    assert len({r["gpu"] for r in per_gpu}) <= OUTLIER_GPUS, "too many GPUs to know the outliers from the lines"
    by_time = defaultdict(list)
    for r in per_gpu:
        by_time[r["time"]].append(r["value"])
    spread = [{"time": t, "gpu": name, "value": float(q)} for t, vs in by_time.items()
              for name, q in zip(FLEET_QUANTILES.values(), np.quantile(vs, list(FLEET_QUANTILES)), strict=True)]
    return per_gpu + spread
