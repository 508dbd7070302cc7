"""Rollups: their DDL, the migration that backfills them, and panels giving the same numbers from them as from raw rows."""

from __future__ import annotations

import json
import math
import time

import pytest
from conftest import make_service
from stethoscope.dashboards import build
from stethoscope.dashboards.macros import QueryContext, Variable, render
from stethoscope.dashboards.rollups import (
    GAUGE,
    LONG_RANGE_S,
    ROLLUPS,
    TIERS,
    backfill_statement,
    pick,
    step_expr,
    tier_condition,
)
from stethoscope.exporters import schema
from stethoscope.exporters.chdb_store import ChdbStore
from test_dashboards import _fill, _rows, _values
from test_dashboards_outliers import WIDE_PANELS, with_spread

ROLLUP_NAMES = [r.name for r in ROLLUPS]


def _ddl(store, db: str = "stethoscope") -> dict[str, str]:
    rows = store.query(f"SELECT name, create_table_query FROM system.tables WHERE database = '{db}'",
                       "JSONCompactEachRow", readonly=False).data.decode().splitlines()
    return dict(json.loads(r) for r in rows)


def _tsv(store, sql: str) -> list[list[str]]:
    return [line.split("\t") for line in store.query(sql, "TabSeparated").data.decode().splitlines()]


# ---------------------------------------------------------------- DDL

def test_create_statements_make_rollups_and_views_with_the_cluster_engine_and_ttl():
    opts = schema.SchemaOptions(database="obs", cluster="main", engine="ReplicatedMergeTree", ttl_seconds=3 * 86400)
    stmts = schema.create_statements(opts)
    for r in ROLLUPS:
        (table,) = [s for s in stmts if s.startswith(f"CREATE TABLE IF NOT EXISTS `obs`.`{r.name}` ")]
        assert "ON CLUSTER `main`" in table and "ENGINE = ReplicatedAggregatingMergeTree()" in table
        assert "TTL toDateTime(Time) + toIntervalDay(3)" in table and f"ORDER BY {r.order_by}" in table
        (view,) = [s for s in stmts if f"`obs`.`{r.view}`" in s]
        assert view.startswith(f"CREATE MATERIALIZED VIEW IF NOT EXISTS `obs`.`{r.view}` ON CLUSTER `main` "
                               f"TO `obs`.`{r.name}` AS SELECT")
        assert f"FROM `obs`.`{r.reads}`" in view and f"INTERVAL {r.grain_s} second" in view
        assert stmts.index(view) > stmts.index(table)
    plain = schema.create_statements(schema.SchemaOptions())
    assert any("ENGINE = AggregatingMergeTree()" in s and "otel_metrics_gauge_1m" in s for s in plain)
    # Without its raw table a rollup gets no view (the statements would fail).
    only = schema.create_statements(schema.SchemaOptions(), [schema.ROLLUP_TABLES["otel_metrics_gauge_1m"]])
    assert not any("MATERIALIZED VIEW" in s for s in only)


@pytest.mark.parametrize(("version", "kind"), [(7, "metric"), (9, "histogram")])
def test_migrations_7_and_9_create_and_rebuild_every_rollup(version, kind):
    (m,) = [m for m in schema.MIGRATIONS if m.version == version]
    text = "\n".join(m.statements)
    for r in ROLLUPS:
        mine = r.kind == kind
        assert (f"CREATE TABLE IF NOT EXISTS {{db}}.`{r.name}`{{on_cluster}}" in text) == mine, r.name
        assert (f"DROP VIEW IF EXISTS {{db}}.`{r.view}`{{on_cluster}}" in text) == mine, r.name
        assert (f"INSERT INTO {{db}}.`{r.name}` SELECT" in text) == mine, r.name
    for stmt in m.statements:
        stmt.format(db="`x`", on_cluster="")  # no stray braces


def test_doctests():
    import doctest

    from stethoscope.dashboards import rollups

    assert doctest.testmod(rollups).failed == 0


def test_pick_rejects_an_unknown_tier():
    with pytest.raises(ValueError, match="force must be one of"):
        pick("SELECT 1 WHERE {use}", GAUGE, bucketed=True, force=300)
    assert TIERS == (0, 60, 3600)


# ---------------------------------------------------------------- migration backfill on an older store

_GAUGE_ROWS = """
INSERT INTO otel_metrics_gauge (ServiceName, MetricName, ResourceAttributes, Attributes, StartTimeUnix, TimeUnix, Value)
SELECT 'agent', ['gpu.utilization', 'gpu.temperature'][number % 2 + 1],
       map('host.name', concat('node-', toString(number % 5)), 'k8s.cluster.name', 'c1'),
       map('gpu.index', toString(intDiv(number, 10) % 8)),
       toDateTime64({start}, 9), toDateTime64({start}, 9) + toIntervalMillisecond(number * 1337), (number * 7919 % 1000) / 10
FROM numbers({n})"""


_HISTOGRAM_ROWS = """
INSERT INTO otel_metrics_histogram (ServiceName, MetricName, ResourceAttributes, Attributes, StartTimeUnix, TimeUnix,
                                    Count, Sum, BucketCounts, ExplicitBounds, Min, Max, AggregationTemporality)
SELECT 'model', 'stethoscope.model.latency', map('host.name', concat('pod-', toString(number % 3))),
       map('stethoscope.model', 'fraud'), toDateTime64({start}, 9),
       toDateTime64({start}, 9) + toIntervalMillisecond(number * 3571),
       arraySum(c), arraySum(c) * 12.5, c, [5., 10., 50.], 1., 90., 1
FROM (SELECT number, CAST([number % 3, number % 5, 1, number % 2], 'Array(UInt64)') AS c FROM numbers({n}))"""


def _histogram_aggregates(store, grain: int) -> tuple[list[list[str]], list[list[str]]]:
    raw = _tsv(store, f"""
        SELECT toStartOfInterval(toDateTime(TimeUnix), INTERVAL {grain} second) AS t, ResourceAttributes['host.name'],
               sum(Count), sum(Sum), min(Min), max(Max), sumForEach(BucketCounts), any(ExplicitBounds)
        FROM otel_metrics_histogram GROUP BY ALL ORDER BY ALL""")
    rolled = _tsv(store, f"""
        SELECT Time, Node, sum(Count), sum(Sum), min(Min), max(Max), sumForEachMerge(BucketCounts), any(ExplicitBounds)
        FROM otel_metrics_histogram_{'1m' if grain == 60 else '1h'} GROUP BY ALL ORDER BY ALL""")
    return raw, rolled


def _aggregates(store, grain: int) -> tuple[list[list[str]], list[list[str]]]:
    raw = _tsv(store, f"""
        SELECT MetricName, toStartOfInterval(toDateTime(TimeUnix), INTERVAL {grain} second) AS t,
               ResourceAttributes['host.name'] AS node, Attributes['gpu.index'] AS gpu,
               count(), round(sum(Value), 6), min(Value), max(Value)
        FROM otel_metrics_gauge GROUP BY MetricName, t, node, gpu ORDER BY ALL""")
    name = f"otel_metrics_gauge_{'1m' if grain == 60 else '1h'}"
    rolled = _tsv(store, f"""
        SELECT MetricName, Time, Node, Attributes['gpu.index'] AS gpu,
               sum(Count), round(sum(Sum), 6), min(Min), max(Max)
        FROM {name} GROUP BY MetricName, Time, Node, gpu ORDER BY ALL""")
    return raw, rolled


def test_migration_7_backfills_rows_stored_before_the_rollups_existed(tmp_path):
    st = ChdbStore(tmp_path)
    try:
        old = [schema.MIGRATIONS_TABLE, *(t for t in schema.TABLES.values() if t.name not in ROLLUP_NAMES)]
        for stmt in schema.create_statements(schema.SchemaOptions(ttl_seconds=30 * 86400), old):
            st.execute(stmt)
        for version in (1, 2, 3, 4, 5, 6):
            st.execute(f"INSERT INTO schema_migrations (Version, Description, AppliedAt) VALUES ({version}, 'old', now64(3))")
        start = int(time.time()) - 3 * 3600
        st.execute(_GAUGE_ROWS.format(start=start, n=8000))  # ~3 hours of rows, several inserts' worth
        st.execute(_HISTOGRAM_ROWS.format(start=start, n=3000))
        assert not set(ROLLUP_NAMES) & set(_ddl(st))
        st.close()
        st = ChdbStore(tmp_path, schema.SchemaOptions(ttl_seconds=30 * 86400))
        assert st.ensure_schema() == [m.version for m in schema.MIGRATIONS if m.version >= 7]
        ddl = _ddl(st)
        assert {r.view for r in ROLLUPS} <= set(ddl) and "toIntervalDay(30)" in ddl["otel_metrics_gauge_1h"]
        for grain in (60, 3600):
            raw, rolled = _aggregates(st, grain)
            assert len(raw) > 10 and raw == rolled, grain
        # New rows flow through the views, and applying the schema again adds nothing twice.
        st.execute(_GAUGE_ROWS.format(start=start + 600, n=500))
        assert st.ensure_schema() == []
        for grain in (60, 3600):
            raw, rolled = _aggregates(st, grain)
            assert raw == rolled, grain
        assert _tsv(st, "SELECT sum(Count) FROM otel_metrics_gauge_1m") == [["8500"]]
        for grain in (60, 3600):  # migration 9: the histograms' bucket counts, summed per bucket
            raw, rolled = _histogram_aggregates(st, grain)
            assert len(raw) > 5 and raw == rolled, grain
        _fleet_panels_agree(st, start)
        # A hand backfill of a range (here after emptying the rollup) gives the same table again.
        st.execute("TRUNCATE TABLE otel_metrics_gauge_1h")
        st.execute(backfill_statement(ROLLUPS[1], "`stethoscope`", "Time >= toDateTime(0)"))
        raw, rolled = _aggregates(st, 3600)
        assert raw == rolled
    finally:
        st.close()


def _fleet_panels_agree(st, data_start: int) -> None:
    """Fleet gauge panels over ~3 hours of rows: raw and rollups agree, whole hours included."""
    from stethoscope.dashboards.macros import ALL, Variable

    values = {Variable(n, multi=True, include_all=True): ALL for n in ("cluster", "node", "gpu")}
    titles = {"GPUs reporting", "Mean utilization", "Hottest GPU", "Utilization by node and GPU", "GPU utilization",
              "GPU temperature"}
    # Whole-range panels from a minute mid-hour (whole hours come from the hourly rollup, the
    # ends from the minute one); bucketed ones at 10 min and, from a whole hour, at 1 h.
    mid = (data_start + 17 * 60) // 60 * 60
    hour = data_start // 3600 * 3600
    for start, interval, grain, want in ((mid, 600, 60, 6), (hour, 3600, 3600, 2)):
        ctx = QueryContext(start=start, end=data_start + 4 * 3600, interval_s=interval)
        compared = 0
        for (title, raw_sql), (_, roll_sql) in zip(_titled(build.fleet(0)), _titled(build.fleet(grain)), strict=True):
            if title not in titles or (grain == 3600 and "$__timeInterval" not in raw_sql):
                continue
            raw = json.loads(st.query(render(raw_sql, ctx, values), "JSON").data)["data"]
            rolled = json.loads(st.query(render(roll_sql, ctx, values), "JSON").data)["data"]
            assert raw and _same(raw, rolled), f"{title} at {interval}s: {_diff(raw, rolled)}"
            compared += 1
        assert compared == want


def _diff(a: list[dict], b: list[dict]) -> str:
    na, nb = dict(_normal(a)), dict(_normal(b))
    return (f"{len(a)} vs {len(b)} rows; only raw {sorted(set(na) - set(nb))[:3]}, only rollup "
            f"{sorted(set(nb) - set(na))[:3]}; differing {[(k, na[k], nb[k]) for k in na if k in nb and na[k] != nb[k]][:3]}")


def _titled(d: dict) -> list[tuple[str, str]]:
    return [(p["title"], p["targets"][0]["rawSql"]) for p in d["panels"]]


def test_ttl_changes_reach_the_rollups(tmp_path):
    st = ChdbStore(tmp_path, schema.SchemaOptions(ttl_seconds=7 * 86400))
    try:
        st.ensure_schema()
        assert "toIntervalDay(7)" in _ddl(st)["otel_metrics_sum_1m"]
    finally:
        st.close()
    st = ChdbStore(tmp_path, schema.SchemaOptions(ttl_seconds=2 * 86400))
    try:
        assert st.ensure_schema() == []
        ddl = _ddl(st)
        assert all("toIntervalDay(2)" in ddl[name] for name in ROLLUP_NAMES)
    finally:
        st.close()


# ---------------------------------------------------------------- panels: rollup == raw on OTLP data

@pytest.fixture(scope="module")
def live(tmp_path_factory):
    svc = make_service(tmp_path_factory.mktemp("rollups"), **{"sql.writable": False})
    try:
        _fill(svc)
        yield svc
    finally:
        svc.stop()


_BUILDERS = {"fleet": build.fleet, "training": build.training, "inference": build.inference, "drift": build.drift,
             "cost": build.cost}


def _long_context(interval_s: float) -> QueryContext:
    now = time.time()
    start = (int(now) - LONG_RANGE_S - 2 * 3600) // 3600 * 3600  # whole hours, so no bucket is cut at the start
    return QueryContext(start=start, end=now + 300, interval_s=interval_s)


def _normal(rows: list[dict]) -> list[tuple]:
    """Rows as (text fields, numbers), sorted; JSON gives 52.0 as 52, so ints count as numbers."""
    out = []
    for r in rows:
        keys = tuple(str(v) for v in r.values() if isinstance(v, bool) or not isinstance(v, int | float))
        nums = tuple(float(v) for v in r.values() if isinstance(v, int | float) and not isinstance(v, bool))
        out.append((keys, nums))
    return sorted(out, key=lambda x: (x[0], tuple(round(n, 6) for n in x[1])))


def _same(a: list[dict], b: list[dict]) -> bool:
    na, nb = _normal(a), _normal(b)
    if [k for k, _ in na] != [k for k, _ in nb]:
        return False
    for (_, x), (_, y) in zip(na, nb, strict=True):
        for u, v in zip(x, y, strict=True):
            if not (u == pytest.approx(v, rel=1e-9, abs=1e-12) or (math.isnan(u) and math.isnan(v))):
                return False
    return True


def _panel_rows(svc, stem: str, force: int | None, ctx: QueryContext, concrete: bool) -> dict[str, list[dict]]:
    d = _BUILDERS[stem](force)
    values = _values(d, concrete)
    out = {}
    for p in d["panels"]:
        text = p["targets"][0]["rawSql"]
        if "UNION ALL" in text:
            out[p["title"]] = _rows(svc, render(text, ctx, values))["data"]
    return out


@pytest.mark.e2e
@pytest.mark.parametrize("concrete", [True, False], ids=["values", "all"])
@pytest.mark.parametrize("stem", list(_BUILDERS))
def test_rollups_give_the_raw_numbers(live, stem, concrete):
    for interval, grain in ((60, 60), (3600, 3600)):
        ctx = _long_context(interval)
        raw = _panel_rows(live, stem, 0, ctx, concrete)
        rolled = _panel_rows(live, stem, grain, ctx, concrete)
        chosen = _panel_rows(live, stem, None, ctx, concrete)
        assert raw and set(raw) == set(rolled) == set(chosen)
        empty = sorted(t for t, rows in raw.items() if not rows)
        assert not empty, f"{stem}: panels without rows, so nothing compared: {empty}"
        for title in raw:
            assert _same(raw[title], rolled[title]), f"{stem} {title!r} at {grain}s: {raw[title]} != {rolled[title]}"
            want = raw[title]
            if stem == "fleet" and not concrete and title in WIDE_PANELS:  # All: the spread and the outliers
                want = with_spread(want)
            assert _same(want, chosen[title]), f"{stem} {title!r}: the long range did not read the same numbers"


@pytest.mark.e2e
def test_tier_conditions_choose_exactly_one_tier(live):
    long, short = LONG_RANGE_S + 60, LONG_RANGE_S
    cases = [(short, 10, 0), (short, 60, 60), (long, 30, 0), (long, 90, 0), (long, 60, 60), (long, 600, 60),
             (short, 3600, 3600), (long, 7200, 3600)]
    for span, interval, want in cases:
        ctx = QueryContext(start=1_700_000_000, end=1_700_000_000 + span, interval_s=interval)
        cols = ", ".join(f"{tier_condition(g, True)} AS b{g}, {tier_condition(g, False)} AS w{g}" for g in TIERS)
        (row,) = _rows(live, render(f"SELECT {cols}", ctx))["data"]
        assert [g for g in TIERS if row[f"b{g}"]] == [want], (span, interval)
        assert [g for g in TIERS if row[f"w{g}"]] == [0 if span <= LONG_RANGE_S else 60], (span, interval)

    # A wide selection reads a rollup at any range and interval: the bucket is rounded up to whole minutes.
    wide_cases = [(short, 10, 60), (short, 60, 60), (short, 90, 60), (long, 3599, 3600), (short, 3600, 3600)]
    for span, interval, want in wide_cases:
        ctx = QueryContext(start=1_700_000_000, end=1_700_000_000 + span, interval_s=interval)
        for wide, narrow_want in (("1=1", want), ("0", None)):
            cols = ", ".join(f"{tier_condition(g, True, wide)} AS b{g}, {tier_condition(g, False, wide)} AS w{g}"
                             for g in TIERS)
            (row,) = _rows(live, render(f"SELECT {cols}, {step_expr(wide)} AS step", ctx))["data"]
            if narrow_want is None:  # not wide: exactly the plain conditions
                assert row["step"] == interval
                continue
            assert [g for g in TIERS if row[f"b{g}"]] == [want], (span, interval)
            assert [g for g in TIERS if row[f"w{g}"]] == [60], (span, interval)
            assert row["step"] % 60 == 0 and interval <= row["step"] < interval + 60


@pytest.mark.e2e
def test_panels_really_read_the_rollup_for_long_ranges_and_many_nodes(live):
    """Emptying the rollups empties the panels that should read them, and only those (so the choice is not a no-op)."""
    now = time.time()
    short = QueryContext(start=now - 3600, end=now + 300, interval_s=60)
    d = build.fleet()
    (p,) = [p for p in d["panels"] if p["title"] == "GPUs reporting"]
    sql = p["targets"][0]["rawSql"]
    node = Variable("node", multi=True, include_all=True)
    every, one, three = _values(d, False), {**_values(d, False), node: ["node-a"]}, _values(d, False)
    three[node] = ["node-a", "node-b", "node-c"]  # more than MAX_RAW_NODES: read as many
    # What each reads when the rollups are full, and whether it should read them.
    cases = [(short, one, 2, False), (short, every, 4, True), (short, three, 4, True),
             (_long_context(60), one, 2, True), (_long_context(60), every, 4, True)]
    for ctx, values, gpus, _ in cases:
        assert _rows(live, render(sql, ctx, values))["data"][0]["gpus"] == gpus
    gauges = [r for r in ROLLUPS if r.source == "otel_metrics_gauge"]
    for r in gauges:
        live.store.execute(f"TRUNCATE TABLE {r.name}")
    try:
        for ctx, values, gpus, rolled in cases:
            assert _rows(live, render(sql, ctx, values))["data"][0]["gpus"] == (0 if rolled else gpus)
    finally:
        # Refilling the minute rollup refills the hourly one too: its view reads the minute rollup.
        live.store.execute(backfill_statement(gauges[0], "`stethoscope`"))
        assert _rows(live, render(sql, _long_context(60), every))["data"][0]["gpus"] == 4


@pytest.mark.e2e
@pytest.mark.parametrize("stem", ["fleet", "cost", "training", "inference"])
def test_many_nodes_read_the_rollups_in_whole_minutes_with_the_raw_numbers(live, stem):
    """All nodes (jobs, models) over a short range at 10 s: the minute rollup, and the raw rows' numbers at 1 min."""
    start = (int(time.time()) - 3 * 3600) // 60 * 60
    at10 = QueryContext(start=start, end=time.time() + 300, interval_s=10)
    at60 = QueryContext(start=start, end=at10.end, interval_s=60)
    chosen = _panel_rows(live, stem, None, at10, False)
    raw = _panel_rows(live, stem, 0, at60, False)
    assert chosen and set(chosen) == set(raw)
    assert not [t for t, rows in raw.items() if not rows]
    for title, rows in raw.items():
        want = with_spread(rows) if stem == "fleet" and title in WIDE_PANELS else rows  # All: spread and outliers
        assert _same(want, chosen[title]), f"{stem} {title!r}: {rows} != {chosen[title]}"
    # Buckets of whole minutes with All; one node stays on raw rows at 10 s buckets.
    d = _BUILDERS[stem]()
    wide_panel = {"fleet": "GPU utilization", "cost": "GPU cost over time", "training": "Loss",
                  "inference": "Requests per second"}[stem]
    (p,) = [p for p in d["panels"] if p["title"] == wide_panel]
    wide = _rows(live, render(p["targets"][0]["rawSql"], at10, _values(d, False)))["data"]
    assert wide and all(str(r["time"]).endswith(":00") for r in wide)
    name, value = {"training": ("job", "llm-pretrain"), "inference": ("model", "fraud")}.get(stem, ("node", "node-a"))
    one = {**_values(d, False), Variable(name, multi=True, include_all=True): [value]}
    narrow = _rows(live, render(p["targets"][0]["rawSql"], at10, one))["data"]
    (raw_p,) = [x for x in _BUILDERS[stem](0)["panels"] if x["title"] == p["title"]]
    assert narrow and _same(narrow, _rows(live, render(raw_p["targets"][0]["rawSql"], at10, one))["data"])
