"""The SDK against a real in-process collector (``stethoscope up`` with chDB), read back through SQL."""

from __future__ import annotations

import time

import numpy as np
import pytest

from conftest import make_service, otlp_url, sql
from stethoscope.agents.sdk import ModelMonitor, SamplingConfig, TrainingMonitor
from stethoscope.agents.sdk.consistent import randomness_many, threshold_for
from stethoscope.agents.sdk.sketch import sketch_kernels

pytestmark = pytest.mark.e2e


def _endpoint(svc) -> str:
    return otlp_url(svc, "")


def _wait_rows(svc, query: str, want: int, timeout: float = 30.0) -> list[list[str]]:
    deadline = time.monotonic() + timeout
    rows: list[list[str]] = []
    while time.monotonic() < deadline:
        body = sql(svc, query).strip()
        rows = [line.split("\t") for line in body.splitlines()] if body else []
        if len(rows) >= want:
            return rows
        time.sleep(0.1)
    raise AssertionError(f"wanted {want} rows from {query!r}, got {rows}")


def _table_exists(svc, name: str) -> bool:
    return sql(svc, f"EXISTS TABLE {name}").strip() == "1"


@pytest.fixture
def collector(tmp_path):
    svc = make_service(tmp_path)
    yield svc
    svc.stop()


def test_model_monitor_sketches_latency_and_sums_arrive(collector):
    rng = np.random.default_rng(7)
    n = 2000
    X = np.column_stack([rng.normal(100.0, 15.0, n), rng.exponential(2.0, n), rng.normal(0.0, 1.0, n)])
    preds = rng.random(n)
    latencies = rng.uniform(1.0, 40.0, n)
    with ModelMonitor("churn", "7", endpoint=_endpoint(collector), feature_names=["spend", "tenure", "score"],
                      start=False, sampling=SamplingConfig(remote=False)) as mon:
        assert mon.record_batch(X, preds, confidences=preds, latencies_ms=latencies) == n
        mon.business("revenue", 1.25)
        mon.business("revenue", 2.5)
        mon.error("timeout")
        assert mon.flush(timeout_s=10)

    kernels = sketch_kernels()
    expected = kernels.state_type(3)
    kernels.update(X, expected)
    rows = _wait_rows(collector, """
        SELECT Attributes['stethoscope.feature.name'], Count, Scale, ZeroCount,
               arraySum(PositiveBucketCounts) + arraySum(NegativeBucketCounts), AggregationTemporality, ServiceName
        FROM otel_metrics_exponential_histogram WHERE MetricName = 'stethoscope.model.feature'
        ORDER BY toInt32(Attributes['stethoscope.feature.index'])""", 3)
    assert [r[0] for r in rows] == ["spend", "tenure", "score"]
    for col, row in enumerate(rows):
        want = expected.buckets(col)
        assert int(row[1]) == n == want.count
        assert int(row[2]) == want.scale
        assert int(row[3]) + int(row[4]) == n
        assert row[5] == "1"  # DELTA
        assert row[6] == "churn"

    (pred,) = _wait_rows(collector, "SELECT Count FROM otel_metrics_exponential_histogram "
                                    "WHERE MetricName = 'stethoscope.model.prediction'", 1)
    assert int(pred[0]) == n
    (lat,) = _wait_rows(collector, "SELECT Count, arraySum(BucketCounts), Min, Max, Sum FROM otel_metrics_histogram "
                                   "WHERE MetricName = 'stethoscope.model.latency'", 1)
    assert int(lat[0]) == int(lat[1]) == n
    assert float(lat[2]) == pytest.approx(latencies.min()) and float(lat[3]) == pytest.approx(latencies.max())
    assert float(lat[4]) == pytest.approx(latencies.sum())
    sums = dict((r[0], float(r[1])) for r in _wait_rows(collector, """
        SELECT concat(MetricName, ':', Attributes['stethoscope.business.name'], Attributes['stethoscope.error.kind']),
               Value FROM otel_metrics_sum WHERE MetricName LIKE 'stethoscope.model.%'""", 3))
    assert sums["stethoscope.model.business:revenue"] == pytest.approx(3.75)
    assert sums["stethoscope.model.errors:timeout"] == 1
    assert sums["stethoscope.model.requests:"] == n


def test_training_steps_land_in_gauges_with_sub_second_ordering(collector):
    with TrainingMonitor("llm", rank=1, world_size=2, gpu=0, node="node-a", endpoint=_endpoint(collector),
                         start=False, max_steps_per_s=1e6) as tm:
        for i in range(20):
            with tm.phase("forward"):
                time.sleep(0.002)
            tm.step(loss=1.0 / (i + 1), lr=1e-3, tokens=4096)
        assert tm.flush(timeout_s=10)
    rows = _wait_rows(collector, """
        SELECT Value, toUnixTimestamp64Nano(TimeUnix), Attributes['stethoscope.train.rank'], Attributes['gpu.index']
        FROM otel_metrics_gauge WHERE MetricName = 'stethoscope.train.loss' ORDER BY TimeUnix""", 20)
    values = [float(r[0]) for r in rows]
    assert values == pytest.approx([1.0 / (i + 1) for i in range(20)])
    stamps = [int(r[1]) for r in rows]
    assert stamps == sorted(stamps) and len(set(stamps)) == 20
    assert stamps[-1] - stamps[0] < 5 * 10**9  # all within a few seconds: sub-second resolution
    assert any(s % 10**9 for s in stamps)
    assert {r[2] for r in rows} == {"1"} and {r[3] for r in rows} == {"0"}
    steps = _wait_rows(collector, "SELECT max(Value) FROM otel_metrics_gauge WHERE MetricName = 'stethoscope.train.step'", 1)
    assert float(steps[0][0]) == 20
    phases = _wait_rows(collector, "SELECT count() FROM otel_metrics_gauge "
                                   "WHERE MetricName = 'stethoscope.train.phase.time' AND Value >= 0.002", 1)
    assert int(phases[0][0]) == 20


def test_sampled_rows_and_labels_land_in_their_tables(collector):
    if not _table_exists(collector, "samples"):
        pytest.skip("the collector has no `samples` table yet (exporters/ side of contract B); "
                    "enabled at integration")
    n = 400
    X = np.arange(n * 2, dtype=np.float64).reshape(n, 2)
    ids = [f"req-{i}" for i in range(n)]
    with ModelMonitor("ranker", "2", endpoint=_endpoint(collector), feature_names=["a", "b"], start=False,
                      sampling=SamplingConfig(fixed_probability=0.25, remote=False)) as mon:
        assert mon.record_batch(X, np.full(n, 0.5), confidences=np.full(n, 0.8), request_ids=ids, region="eu") == n
        assert mon.record([1.0, 2.0], "cat", request_id="4bf92f3577b34da6a3ce929d0e0e4736") is True
        assert mon.record_label("req-3", 1.0)
        assert mon.record_label("req-4", "dog")
        assert mon.flush(timeout_s=10)
    kept = [i for i, r in enumerate(randomness_many(ids).tolist()) if r >= threshold_for(0.25)]
    rows = _wait_rows(collector, """
        SELECT RequestId, Features, FeatureNames, Prediction, Confidence, AdjustedCount, SamplingThreshold, Stream,
               Attributes['region'], Model, ModelVersion
        FROM samples WHERE RequestId LIKE 'req-%' ORDER BY toInt32(substring(RequestId, 5))""", len(kept))
    assert [r[0] for r in rows] == [f"req-{i}" for i in kept]
    first = rows[0]
    i = kept[0]
    assert first[1] == f"[{2 * i},{2 * i + 1}]" and first[2] == "['a','b']"
    assert float(first[3]) == 0.5 and float(first[4]) == pytest.approx(0.8)
    assert float(first[5]) == 4.0 and first[6] == "c" and first[7] == "default"
    assert first[8:] == ["eu", "ranker", "2"]
    labels = _wait_rows(collector, "SELECT RequestId, Label, LabelText FROM labels ORDER BY RequestId", 2)
    assert labels[0][:2] == ["req-3", "1"] and labels[1][0] == "req-4" and labels[1][2] == "dog"


def test_collector_override_boosts_a_stream(collector):
    import json
    import urllib.request

    req = urllib.request.Request(_endpoint(collector) + "/v1/sampling/boosted/default", method="PUT",
                                 data=json.dumps({"target_rows_per_s": 50, "boost": 2, "ttl_s": 600,
                                                  "reason": "drift"}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200
    with ModelMonitor("boosted", endpoint=_endpoint(collector), feature_names=1, start=False,
                      sampling=SamplingConfig(global_budget_rows_per_s=1000)) as mon:
        remote = mon._poller.poll()
        assert remote is not None and remote.streams["boosted/default"].boost == 2.0
        assert mon._poller.poll() is None and mon._poller.not_modified == 1  # ETag: 304
        mon.sampler.apply_remote(remote)
        mon.record_batch(np.zeros((1000, 1)), np.zeros(1000))
        mon.sampler.adjust()
        assert mon.sampler.allocations["default"] == pytest.approx(100.0)  # 50 rows/s x boost 2


def _doc_snippets() -> list[str]:
    import pathlib
    import re

    text = (pathlib.Path(__file__).parent.parent / "docs" / "sdk.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.parametrize("index", range(len(_doc_snippets())))
def test_docs_snippets_run_against_a_collector(collector, index):
    code = _doc_snippets()[index]
    if "import torch" in code:
        pytest.importorskip("torch")
    code = code.replace('ENDPOINT = "http://127.0.0.1:4318"', f'ENDPOINT = "{_endpoint(collector)}"')
    exec(compile(code, f"docs/sdk.md[{index}]", "exec"), {"__name__": "docs_snippet"})
