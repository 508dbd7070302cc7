"""Dashboards: structure, macro expansion, and every query run against a live service with realistic data."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import make_service, otlp_url, sql
from stethoscope.agents import Agent, build_resource
from stethoscope.agents.gpu.simulate import SimulatedGpuCollector, ThermalThrottle, Xid
from stethoscope.agents.sdk import ModelMonitor, SamplingConfig, TrainingMonitor
from stethoscope.analytics.findings import Finding, FindingsWriter
from stethoscope.dashboards import DASHBOARDS, build_all, problems, render_files
from stethoscope.dashboards.histogram import bucket_quantile, bucket_quantile_sql
from stethoscope.dashboards.macros import (
    ALL,
    MacroError,
    QueryContext,
    Variable,
    apply_conditional_all,
    expand_macros,
    interpolate,
    render,
)
from stethoscope.dashboards.validate import queries, referenced_variables

HERE = Path(__file__).resolve().parents[1] / "dashboards"
CTX = QueryContext(start=1_700_000_000.25, end=1_700_003_600.75, interval_s=60)


# ---------------------------------------------------------------- generated files never drift

def test_committed_files_equal_the_builder_output():
    for rel, text in render_files().items():
        assert (HERE / rel).read_text(encoding="utf-8") == text, f"{rel} is stale: re-run export('dashboards')"
    assert sorted(p.name for p in (HERE / "json").glob("*.json")) == sorted(f"{s}.json" for s in DASHBOARDS)


def test_provisioning_files():
    ds = yaml.safe_load((HERE / "provisioning/datasources/stethoscope.yaml").read_text())
    assert ds["apiVersion"] == 1
    (src,) = ds["datasources"]
    assert src["type"] == "grafana-clickhouse-datasource" and src["uid"] == "stethoscope-clickhouse"
    assert src["jsonData"]["port"] == 8123 and src["jsonData"]["protocol"] == "http"
    assert src["jsonData"]["defaultDatabase"] == "stethoscope" and src["jsonData"]["host"]
    prov = yaml.safe_load((HERE / "provisioning/dashboards/stethoscope.yaml").read_text())
    (p,) = prov["providers"]
    assert prov["apiVersion"] == 1 and p["type"] == "file" and p["folder"] == "Stethoscope"
    assert p["options"]["path"].startswith("/")


# ---------------------------------------------------------------- structure

@pytest.fixture(scope="module")
def dashboards():
    return build_all()


def test_no_structural_problems(dashboards):
    assert problems(dashboards) == []
    assert [d["uid"] for d in dashboards] == [
        "stethoscope-fleet", "stethoscope-training", "stethoscope-inference", "stethoscope-drift",
        "stethoscope-cost", "stethoscope-alerts"]


@pytest.mark.parametrize("stem", list(DASHBOARDS))
def test_dashboard_essentials(stem):
    d = DASHBOARDS[stem]()
    assert d["id"] is None and d["schemaVersion"] == 39 and "stethoscope" in d["tags"]
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    occupied = set()
    for p in d["panels"]:
        g = p["gridPos"]
        assert 1 <= g["w"] <= 24 and g["x"] + g["w"] <= 24 and g["h"] >= 1
        cells = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & occupied, f"{p['title']} overlaps"
        occupied |= cells
        ds = {"type": "grafana-clickhouse-datasource", "uid": "${datasource}"}
        assert p["datasource"] == ds
        for t in p["targets"]:
            assert t["datasource"] == ds and t["editorType"] == "sql" and t["format"] in (0, 1, 2) and t["rawSql"]
    names = {v["name"] for v in d["templating"]["list"]}
    assert {"type": "datasource", "name": "datasource"}.items() <= d["templating"]["list"][0].items()
    for where, _, text in queries(d):
        assert referenced_variables(text) <= names, where
    findings, alerted, acted = [a for a in d["annotations"]["list"] if "target" in a]
    assert "FROM findings" in findings["target"]["rawSql"] and "Severity != 'info'" in findings["target"]["rawSql"]
    assert "FROM notification_attempts" in alerted["target"]["rawSql"] and "FROM actions" in acted["target"]["rawSql"]
    others = {f"/d/{x['uid']}" for x in build_all()} - {f"/d/{d['uid']}"}
    assert {link["url"] for link in d["links"]} == others


def test_validator_reports_every_problem_at_once(dashboards):
    bad = json.loads(json.dumps(dashboards[0]))
    bad["panels"][1]["id"] = bad["panels"][0]["id"]
    bad["panels"][2]["gridPos"] = dict(bad["panels"][0]["gridPos"])
    bad["panels"][3]["targets"][0]["rawSql"] += " AND $nope"
    bad["panels"][4]["datasource"] = {"type": "prometheus", "uid": "x"}
    found = problems([bad, dashboards[0]])
    text = "\n".join(found)
    for needle in ("uids repeat", "panel ids repeat", "overlaps", "unknown variables ['nope']", "datasource is not"):
        assert needle in text


def test_cost_dashboard_has_the_price_constant():
    (price,) = [v for v in DASHBOARDS["cost"]()["templating"]["list"] if v["name"] == "gpu_hour_price"]
    assert price["type"] == "constant" and float(price["query"]) > 0


# ---------------------------------------------------------------- macros: exact text

@pytest.mark.parametrize("macro,expected", [
    ("$__timeFilter(TimeUnix)", "TimeUnix >= toDateTime(1700000000) AND TimeUnix <= toDateTime(1700003600)"),
    ("$__timeFilter_ms(ts)",
     "ts >= fromUnixTimestamp64Milli(1700000000250) AND ts <= fromUnixTimestamp64Milli(1700003600750)"),
    ("$__dateFilter(d)", "d >= toDate('2023-11-14') AND d <= toDate('2023-11-14')"),
    ("$__timeFrom(t)", "t >= toDateTime(1700000000)"),
    ("$__timeTo(t)", "t <= toDateTime(1700003600)"),
    ("$__fromTime", "toDateTime(1700000000)"),
    ("$__toTime", "toDateTime(1700003600)"),
    ("$__fromTime_ms", "fromUnixTimestamp64Milli(1700000000250)"),
    ("$__toTime_ms", "fromUnixTimestamp64Milli(1700003600750)"),
    ("$__interval_s", "60"),
    ("$__timeInterval(TimeUnix)", "toStartOfInterval(toDateTime(TimeUnix), INTERVAL 60 second)"),
    ("$__timeInterval_ms(TimeUnix)", "toStartOfInterval(toDateTime64(TimeUnix, 3), INTERVAL 60000 millisecond)"),
])
def test_macro_expansion_text(macro, expected):
    assert expand_macros(macro, CTX) == expected


def test_interval_has_a_floor_and_dates_span_days():
    tiny = QueryContext(start=86_399, end=2 * 86_400 + 5, interval_s=0.0004)
    assert expand_macros("$__interval_s", tiny) == "1"
    assert expand_macros("$__timeInterval(t)", tiny) == "toStartOfInterval(toDateTime(t), INTERVAL 1 second)"
    assert expand_macros("$__timeInterval_ms(t)", tiny) == "toStartOfInterval(toDateTime64(t, 3), INTERVAL 1 millisecond)"
    assert expand_macros("$__dateFilter(d)", tiny) == "d >= toDate('1970-01-01') AND d <= toDate('1970-01-03')"


def test_macros_keep_surrounding_text_and_nested_arguments():
    out = expand_macros("SELECT $__timeInterval(toDateTime64(a, 9)) AS t WHERE $__timeTo(b) -- $__fromTime", CTX)
    assert out == ("SELECT toStartOfInterval(toDateTime(toDateTime64(a, 9)), INTERVAL 60 second) AS t "
                   "WHERE b <= toDateTime(1700003600) -- toDateTime(1700000000)")


def test_unknown_macro_and_bad_arguments_raise():
    with pytest.raises(MacroError):
        expand_macros("$__nope(x)", CTX)
    with pytest.raises(MacroError):
        expand_macros("$__timeFilter(a, b)", CTX)
    with pytest.raises(MacroError):
        apply_conditional_all("$__conditionalAll(x)", {})


def test_conditional_all():
    cond = "$__conditionalAll(ResourceAttributes['host.name'] IN ($node), $node)"
    assert apply_conditional_all(cond, {"node": ALL}) == "1=1"
    assert apply_conditional_all(cond, {"node": [ALL]}) == "1=1"
    assert apply_conditional_all(cond, {"node": ""}) == "1=1"
    assert apply_conditional_all(cond, {"node": "a"}) == "ResourceAttributes['host.name'] IN ($node)"
    two = f"a AND {cond} AND $__conditionalAll(f(x, y) = 1, $gpu)"
    assert apply_conditional_all(two, {"node": ALL, "gpu": "0"}) == "a AND 1=1 AND f(x, y) = 1"
    assert apply_conditional_all(cond, {}) == "ResourceAttributes['host.name'] IN ($node)"  # unknown: kept


def test_variable_interpolation():
    node = Variable("node", multi=True, include_all=True)
    price = Variable("gpu_hour_price")
    assert interpolate("x IN ($node)", {node: "a"}) == "x IN ('a')"
    assert interpolate("x IN (${node})", {node: ["a", "b'c"]}) == "x IN ('a','b\\'c')"
    assert interpolate("x IN ($node)", {node: ALL}, {"node": ["a", "b"]}) == "x IN ('a','b')"
    assert interpolate("y * $gpu_hour_price + $other", {price: "2.5"}) == "y * 2.5 + $other"
    assert interpolate("$nodes $node", {node: "a"}) == "$nodes 'a'"
    with pytest.raises(MacroError):
        interpolate("$node", {node: ALL})
    full = render("SELECT $__interval_s WHERE $__conditionalAll(n IN ($node), $node) AND $__timeFrom(t)", CTX,
                  {node: ["a"]})
    assert full == "SELECT 60 WHERE n IN ('a') AND t >= toDateTime(1700000000)"


# ---------------------------------------------------------------- quantile from buckets

def test_bucket_quantile_reference():
    assert bucket_quantile(0.5, [10, 10, 10, 10], [10, 20, 30]) == 20.0
    assert bucket_quantile(0.25, [10, 10, 10, 10], [10, 20, 30]) == 10.0
    assert bucket_quantile(0.1, [10, 10, 10, 10], [10, 20, 30]) == 4.0
    assert bucket_quantile(0.9, [10, 10, 10, 10], [10, 20, 30]) == 30.0
    assert bucket_quantile(0.5, [0, 4, 0, 0], [10, 20, 30]) == 15.0
    assert math.isnan(bucket_quantile(0.5, [0, 0], [1.0]))
    with pytest.raises(ValueError):
        bucket_quantile_sql(1.5)


# ---------------------------------------------------------------- live SQL

NODES = ("node-a", "node-b")


def _rows(svc, query: str) -> dict:
    return json.loads(sql(svc, query, fmt="JSON"))


def _wait(svc, query: str, want: int = 1, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if int(sql(svc, query).strip() or 0) >= want:
            return
        time.sleep(0.05)
    raise AssertionError(f"no data for {query}")


def _fill(svc) -> None:
    endpoint = otlp_url(svc, "")
    for n, node in enumerate(NODES):
        clock = [1000.0]
        sim = SimulatedGpuCollector(gpus=2, seed=n, clock=lambda c=clock: c[0],
                                    incidents=[Xid(gpu=1, at_s=120), ThermalThrottle(gpu=0, start_s=60, duration_s=600)])
        resource = build_resource(environ={}, extra={"host.name": node, "k8s.cluster.name": "c1"})
        agent = Agent(endpoint=endpoint, collectors=[sim], resource=resource, spool_dir=None, cpu_budget=None,
                      rss_budget_bytes=None)
        try:
            for cycle in range(4):
                clock[0] = 1000.0 + 90.0 * cycle
                assert agent.flush(timeout_s=10)
        finally:
            agent.shutdown(drain_timeout_s=0)
    rng = np.random.default_rng(3)
    for rank in range(2):
        with TrainingMonitor("llm-pretrain", rank=rank, world_size=2, node=NODES[rank], gpu=rank, endpoint=endpoint,
                             start=False, max_steps_per_s=None) as tm:
            for i in range(12):
                with tm.phase("data"):
                    pass
                with tm.phase("forward"):
                    pass
                tm.step(loss=2.0 / (i + 1), grad_norm=1.0 + 0.1 * i, lr=1e-4, tokens=4096,
                        step_time=0.5 + 0.3 * rank, data_wait=0.05 * (rank + 1))
            assert tm.flush(timeout_s=10)
    n = 600
    with ModelMonitor("fraud", "3", endpoint=endpoint, feature_names=["amount", "age"], start=False,
                      sampling=SamplingConfig(remote=False, fixed_probability=0.2), cost_per_prediction=0.0004) as mon:
        X = np.column_stack([rng.normal(100, 15, n), rng.exponential(2.0, n)])
        p = rng.random(n)
        mon.record_batch(X, p, confidences=np.maximum(p, 1 - p), latencies_ms=rng.uniform(1.0, 60.0, n),
                         request_ids=[f"req-{i}" for i in range(n)])
        mon.error("timeout")
        assert mon.flush(timeout_s=10)
    now = time.time()
    findings = [
        Finding(time=now - 60, kind="feature_drift", subject="model=fraud version=3 feature=amount", model="fraud",
                model_version="3", feature="amount", method="ks", statistic=0.31, p_value=1e-6, effect=0.31,
                threshold=0.1, severity="warning", drifted=True),
        Finding(time=now - 30, kind="feature_drift", subject="model=fraud version=3 feature=age", model="fraud",
                model_version="3", feature="age", method="ks", statistic=0.02, p_value=0.7, effect=0.02,
                threshold=0.1, severity="info"),
        Finding(time=now - 30, kind="dataset_drift", subject="model=fraud version=3", model="fraud",
                model_version="3", method="dataset", statistic=0.5, severity="critical", drifted=True),
        Finding(time=now - 20, kind="confidence_cv", subject="model=fraud version=3", model="fraud",
                model_version="3", method="cv", statistic=0.42, severity="warning", drifted=True),
    ]
    assert FindingsWriter(svc.store).write(findings) == len(findings)
    _fill_alerts(svc)
    for q in ("SELECT count() FROM otel_metrics_gauge WHERE MetricName = 'gpu.utilization'",
              "SELECT count() FROM otel_metrics_gauge WHERE MetricName = 'stethoscope.train.loss'",
              "SELECT count() FROM otel_metrics_histogram", "SELECT count() FROM samples",
              "SELECT count() FROM findings"):
        _wait(svc, q)


def _fill_alerts(svc) -> None:
    """Alert notifications from a real alert runner delivering to a signed webhook, and remediation decisions
    written by the actions audit (a dry-run scale, and a cordon refused by a guard)."""
    import tempfile
    import threading
    from http.server import ThreadingHTTPServer

    from stethoscope.alerts.actions import StoreAudit
    from stethoscope.alerts.guards import Decision
    from test_alerts_runner import _Hook, drift, runner

    _Hook.received, _Hook.errors = [], []
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    now = time.time()
    try:
        with tempfile.TemporaryDirectory(prefix="dash-alerts-") as rules_dir:
            r = runner(svc.store, Path(rules_dir), f"http://127.0.0.1:{srv.server_address[1]}/h")
            writer = FindingsWriter(svc.store)
            for t in (now - 240, now - 120, now - 60):
                writer.write([drift(t)])
                r.run_once(t)
        assert _Hook.received and not _Hook.errors
    finally:
        srv.shutdown()
        srv.server_close()
    StoreAudit(svc.store).write([
        Decision(now - 50, "a1", "scale", "serving/fraud", "LatencyP99AboveSla", "fp1", "dry_run", "", True,
                 {"replicas": "+1"}, {"plan": "replicas 2 -> 3"}),
        Decision(now - 40, "a2", "cordon", "node-a", "GpuXidCritical", "fp2", "skipped", "rate limit: 1 per 1h", False),
    ])


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    svc = make_service(tmp_path_factory.mktemp("dash"), **{"sql.writable": False})
    try:
        _fill(svc)
        yield svc
    finally:
        svc.stop()


def _context() -> QueryContext:
    now = time.time()
    return QueryContext(start=now - 3600, end=now + 300, interval_s=60)


_CONCRETE = {"cluster": "c1", "node": "node-a", "gpu": "0", "job": "llm-pretrain", "model": "fraud",
             "version": "3", "severity": "warning", "kind": "feature_drift"}


def _values(dash: dict, concrete: bool) -> dict:
    out = {}
    for v in dash["templating"]["list"]:
        var = Variable(v["name"], multi=bool(v.get("multi")), include_all=bool(v.get("includeAll")))
        if v["type"] == "constant":
            out[var] = v["query"]
        elif v["type"] in ("query", "custom"):
            out[var] = [_CONCRETE[v["name"]]] if concrete else ALL
    return out


_NUMERIC = ("Int", "UInt", "Float", "Decimal", "Nullable(Int", "Nullable(UInt", "Nullable(Float")

#: Table panels and the columns each must return.
TABLE_COLUMNS = {
    "XID and ECC errors by GPU": ["node", "gpu", "xid_errors", "xid_codes", "ecc_corrected", "ecc_uncorrected"],
    "Utilization by node and GPU": ["node", *[f"gpu_{i}" for i in range(8)]],
    "Stragglers: step time per rank vs the job median": ["job", "rank", "node", "gpu", "steps", "step_time",
                                                         "vs_median"],
    "Per model version": ["model", "version", "requests", "errors", "error_share"],
    "Per-feature drift (latest window)": ["model", "version", "feature", "method", "statistic", "p_value", "effect",
                                          "severity", "drifted", "checked"],
    "Samples by stream": ["model", "version", "stream", "sampled_rows", "estimated_predictions", "sampling_rate",
                          "uncertain_rows", "mean_confidence"],
    "Cost by node": ["node", "gpus", "gpu_hours", "idle_gpu_hours", "cost", "idle_cost", "utilization"],
    "Declared cost per 1,000 predictions, by model": ["model", "predictions", "declared_cost", "cost_per_1k"],
    "Findings": ["time", "severity", "kind", "subject", "method", "statistic", "p_value", "effect", "details"],
    "Findings by kind": ["kind", "warning", "critical"],
    "Alerts now": ["rule", "state", "subject", "since", "fired_at", "value"],
    "Alert history": ["time", "rule", "status", "severity", "subject", "receiver"],
    "Remediation audit": ["time", "action", "target", "rule", "decision", "reason", "dry_run", "result"],
}

#: Panels that must return data from the fixture (with variables concrete and All).
CORE = {"GPU utilization", "GPU memory used", "GPU temperature", "GPU power draw", "SM clock", "Mean utilization",
        "Utilization by node and GPU", "XID and ECC errors by GPU", "Loss", "Gradient norm", "Throughput",
        "Step phases", "Step time by rank", "Input-bound share", "Stragglers: step time per rank vs the job median",
        "Requests per second", "Latency p50 / p90 / p99", "Errors per second, by kind", "Per model version",
        "Per-feature drift (latest window)", "Drift statistic by feature", "Confidence coefficient of variation",
        "Predictions: sampled rows and estimated total", "Samples by stream", "GPU cost", "GPU cost over time",
        "Cost by node", "GPU cost per 1,000 predictions", "Findings over time, by severity", "Findings",
        "Declared cost per 1,000 predictions, by model", "Alerts now", "Alert history", "Remediation audit",
        "Notifications, by delivery outcome"}


def _is_numeric(t: str) -> bool:
    return t.startswith(_NUMERIC)


def _check_shape(where: str, fmt: int, meta: list[dict], title: str) -> None:
    names = [m["name"] for m in meta]
    types = [m["type"] for m in meta]
    assert len(set(names)) == len(names), f"{where}: repeated columns {names}"
    if fmt == 0:
        assert names[0] == "time" and types[0].startswith(("DateTime", "Nullable(DateTime")), f"{where}: {meta}"
        assert any(_is_numeric(t) for t in types[1:]), f"{where}: no numeric column {meta}"
        assert all(_is_numeric(t) or "String" in t for t in types[1:]), f"{where}: {meta}"
    elif title in TABLE_COLUMNS:
        assert names == TABLE_COLUMNS[title], where


@pytest.mark.e2e
@pytest.mark.parametrize("concrete", [True, False], ids=["values", "all"])
def test_every_query_runs_against_live_data(live, dashboards, concrete):
    ctx = _context()
    empty = []
    for d in dashboards:
        values = _values(d, concrete)
        for where, fmt, raw in queries(d):
            title = where.split("'")[1] if where.startswith("panel") else where
            text = render(raw, ctx, values)
            assert "$" not in text.replace("$__all", ""), f"{d['uid']} {where}: unexpanded {text}"
            try:
                result = _rows(live, text)
            except Exception as exc:  # the endpoint's error body says why
                body = getattr(exc, "read", lambda: b"")().decode(errors="replace")
                raise AssertionError(f"{d['uid']} {where} failed: {exc} {body}\n{text}") from exc
            _check_shape(f"{d['uid']} {where}", fmt, result["meta"], title)
            if where.startswith("annotation"):
                assert [m["name"] for m in result["meta"]] == ["time", "text", "tags"]
                assert result["rows"] >= 1 and all("INFO" not in r["text"] for r in result["data"])
            if title in CORE and result["rows"] == 0:
                empty.append(f"{d['uid']} {where}")
            if where.startswith("variable") and (concrete or "version" not in where):
                assert result["rows"] >= 1, f"{d['uid']} {where} offers no values"
    assert not empty, f"core panels without rows: {empty}"


@pytest.mark.e2e
def test_numbers_the_panels_show(live):
    ctx = _context()

    def one(stem: str, title: str) -> list[dict]:
        d = DASHBOARDS[stem]()
        (p,) = [p for p in d["panels"] if p["title"] == title]
        return _rows(live, render(p["targets"][0]["rawSql"], ctx, _values(d, False)))["data"]

    assert one("fleet", "GPUs reporting")[0]["gpus"] == 4
    heat = {r["node"]: r for r in one("fleet", "Utilization by node and GPU")}
    assert set(heat) == set(NODES) and heat["node-a"]["gpu_0"] is not None and heat["node-a"]["gpu_5"] is None
    errors = {(r["node"], r["gpu"]): r for r in one("fleet", "XID and ECC errors by GPU")}
    assert errors["node-a", "1"]["xid_errors"] == 1 and errors["node-a", "1"]["xid_codes"] == "79"
    assert errors["node-a", "0"]["xid_errors"] == 0
    assert one("fleet", "XID errors")[0]["xid_errors"] == 2
    throttled = {r["reason"]: r["gpus"] for r in one("fleet", "GPUs throttled, by reason")}
    assert throttled["hw_thermal_slowdown"] == 2 and throttled["sw_power_cap"] == 0
    ranks = {r["rank"]: r for r in one("training", "Stragglers: step time per rank vs the job median")}
    assert ranks[1]["step_time"] == pytest.approx(0.8) and ranks[0]["step_time"] == pytest.approx(0.5)
    assert ranks[1]["vs_median"] == pytest.approx(0.8 / 0.65)
    share = one("training", "Input-bound share")
    assert {r["job"] for r in share} == {"llm-pretrain"}
    assert sum(r["input_bound"] for r in share) / len(share) == pytest.approx((0.6 + 1.2) / (6 + 9.6), rel=0.3)
    (model,) = one("inference", "Per model version")
    assert model["requests"] == 600 and model["errors"] == 1
    (declared,) = one("cost", "Declared cost per 1,000 predictions, by model")
    assert declared["cost_per_1k"] == pytest.approx(0.4)
    drift = {r["feature"]: r for r in one("drift", "Per-feature drift (latest window)")}
    assert drift["amount"]["drifted"] and drift["amount"]["severity"] == "warning"
    (streams,) = one("drift", "Samples by stream")
    assert streams["estimated_predictions"] == pytest.approx(600, rel=0.25)
    assert streams["sampling_rate"] == pytest.approx(0.2, rel=0.25)
    assert {r["severity"] for r in one("alerts", "Findings")} >= {"warning", "critical"}
    history = one("alerts", "Alert history")
    assert {(r["rule"], r["status"], r["receiver"]) for r in history} >= {("FeatureDrift", "firing", "webhook")}
    assert "delivered" in {r["outcome"] for r in one("alerts", "Notifications, by delivery outcome")}
    audit = {r["action"]: r for r in one("alerts", "Remediation audit")}
    assert audit["cordon"]["decision"] == "skipped" and audit["cordon"]["reason"].startswith("rate limit")
    assert audit["scale"]["dry_run"] and "replicas 2 -> 3" in audit["scale"]["result"]
    now = [r for r in one("alerts", "Alerts now") if r["rule"] == "FeatureDrift"]
    assert now and now[0]["state"] == "firing" and now[0]["fired_at"]


@pytest.mark.e2e
def test_latency_quantiles_match_the_reference_on_known_buckets(live):
    cases = [([10, 10, 10, 10], [10.0, 20.0, 30.0]), ([0, 4, 0, 0], [10.0, 20.0, 30.0]),
             ([3, 0, 7, 1, 0, 2], [0.5, 1.0, 2.5, 5.0, 10.0]), ([5], []), ([0, 0, 0], [1.0, 2.0])]
    qs = (0.0, 0.1, 0.5, 0.9, 0.99, 1.0)
    for counts, bounds in cases:
        cols = ", ".join(f"{bucket_quantile_sql(q)} AS q{i}" for i, q in enumerate(qs))
        text = (f"SELECT {cols} FROM (SELECT CAST({counts} AS Array(UInt64)) AS counts, "
                f"CAST({bounds} AS Array(Float64)) AS bounds)")
        (row,) = _rows(live, text)["data"]
        for i, q in enumerate(qs):
            want, got = bucket_quantile(q, counts, bounds), row[f"q{i}"]
            if math.isnan(want):
                assert got is None or got in ("nan", "NaN") or (isinstance(got, float) and math.isnan(got))
            else:
                assert got == pytest.approx(want), (counts, bounds, q)


@pytest.mark.e2e
def test_latency_panel_agrees_with_the_recorded_latencies(live):
    d = DASHBOARDS["inference"]()
    (p,) = [p for p in d["panels"] if p["title"].startswith("Latency")]
    rows = _rows(live, render(p["targets"][0]["rawSql"], _context(), _values(d, True)))["data"]
    assert rows
    # 600 uniform(1, 60) ms latencies: the median is near 30 ms, give or take a bucket.
    p50 = max(rows, key=lambda r: r["time"])["p50"]
    assert 15 <= p50 <= 45
    assert all(r["p50"] <= r["p90"] <= r["p99"] for r in rows)
