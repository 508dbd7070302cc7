"""The demo's parts: the signed-webhook sink, matching alerts to incidents, the scenario, the CLI's checks."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import pytest
from stethoscope.agents.sdk.simulate import SimClock, SimulatedModelService, SimulatedTrainingJob, SlowRank
from stethoscope.alerts.signing import sign_headers
from stethoscope.demo import Injected, Received, WebhookSink, match_alerts, run_demo, scenario
from stethoscope.errors import ConfigError

from stethoscope import cli


def _post(url: str, body: bytes, headers: dict[str, str]) -> int:
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_sink_accepts_only_signed_fresh_bodies():
    sink = WebhookSink("s3cret")
    sink.start()
    try:
        body = json.dumps({"status": "firing", "rule": "R", "subject": "node=n1"}).encode()
        headers = sign_headers("s3cret", body, time.time())
        assert _post(sink.url, body, headers) == 200
        assert _post(sink.url, body, headers) == 401  # replay
        assert _post(sink.url, body, sign_headers("wrong", body, time.time())) == 401
        assert _post(sink.url, body + b" ", sign_headers("s3cret", body, time.time())) == 401  # tampered
        assert _post(sink.url, body, {}) == 401
        got = sink.alerts()
        assert [r.body["rule"] for r in got] == ["R"]
        assert len(sink.rejected) == 4
    finally:
        sink.stop()


INJ = [Injected("slow", "slow rank", 10, ("straggler_rank",), ("rank=13",)),
       Injected("leak", "leak", 20, ("memory_leak_forecast",), ("node=node-2", "gpu=5"))]
RULES = {"Straggler": ("straggler_rank",), "Leak": ("memory_leak_forecast",), "Hot": ("gpu_temperature",)}


def test_match_alerts_pairs_kind_and_subject_and_flags_the_rest():
    started = {"slow": 100.0, "leak": 200.0}
    alerts = [
        Received(150.0, {"status": "firing", "rule": "Straggler", "subject": "job=j rank=13 node=node-1 gpu=5"}),
        Received(151.0, {"status": "firing", "rule": "Straggler", "subject": "job=j rank=13 node=node-1 gpu=5"}),
        Received(190.0, {"status": "firing", "rule": "Leak", "subject": "node=node-2 gpu=5"}),  # before injection
        Received(230.0, {"status": "firing", "rule": "Leak", "subject": "node=node-2 gpu=5"}),
        Received(240.0, {"status": "resolved", "rule": "Hot", "subject": "node=node-0 gpu=1"}),  # not firing: ignored
        Received(250.0, {"status": "firing", "rule": "Hot", "subject": "node=node-0 gpu=1"}),
        Received(260.0, {"status": "firing", "rule": "Straggler", "subject": "job=j rank=1 node=node-0 gpu=1"}),
    ]
    first, unmatched = match_alerts(INJ, alerts, RULES, started)
    assert first["slow"].at == 150.0 and first["leak"].at == 230.0
    assert [(b["rule"], b["subject"]) for b in unmatched] == [
        ("Leak", "node=node-2 gpu=5"), ("Hot", "node=node-0 gpu=1"), ("Straggler", "job=j rank=1 node=node-0 gpu=1")]


def test_match_alerts_reads_subject_parts_from_labels_too():
    alerts = [Received(150.0, {"status": "firing", "rule": "Leak", "subject": "gpu=5", "labels": {"node": "node-2"}})]
    first, unmatched = match_alerts(INJ, alerts, RULES, {"leak": 100.0})
    assert "leak" in first and not unmatched


def test_scenario_has_one_of_each_incident_and_valid_placement():
    sc = scenario()
    keys = {i.key for i in sc.injected}
    assert keys >= {"slow_rank", "loss_spike", "input_stall", "memory_leak", "thermal_throttle", "xid",
                    "feature_drift", "latency"}
    assert sc.job.world_size == 32 and len(sc.nodes) == 4
    slow = next(i for i in sc.job.incidents if isinstance(i, SlowRank))
    inj = next(i for i in sc.injected if i.key == "slow_rank")
    assert f"rank={slow.rank}" in inj.subject
    assert f"{sc.job.node_of(slow.rank)} GPU {sc.job.gpu_of(slow.rank)}" in inj.title


def test_simulated_job_and_service_inject_what_they_say():
    job = SimulatedTrainingJob("j", world_size=4, gpus_per_node=2, seed=3, incidents=[SlowRank(rank=2, start_s=5)])
    before, after = job.step_values(2, 5, 4.0), job.step_values(2, 15, 7.5)
    other = job.step_values(1, 15, 7.5)
    assert after["compute"] / other["compute"] == pytest.approx(1.15, rel=0.05)
    assert before["compute"] / job.step_values(1, 5, 4.0)["compute"] == pytest.approx(1.0, rel=0.05)
    from stethoscope.agents.sdk.simulate import FeatureShift, LatencyRegression

    svc = SimulatedModelService("m", d=3, seed=1, incidents=[FeatureShift(10, feature=1, shift=2.0),
                                                           LatencyRegression(20, factor=4.0)])
    a, b = svc.batch(4000, 0.0), svc.batch(4000, 25.0)
    assert b["features"][:, 1].mean() - a["features"][:, 1].mean() == pytest.approx(2.0, abs=0.15)
    assert abs(b["features"][:, 0].mean() - a["features"][:, 0].mean()) < 0.15
    assert (b["latency_ms"].mean() / a["latency_ms"].mean()) == pytest.approx(4.0, rel=0.1)


def test_bad_settings_are_named():
    with pytest.raises(ConfigError, match="speedup"):
        SimClock(0)
    with pytest.raises(ConfigError, match="rank 9"):
        SimulatedTrainingJob("j", world_size=4, incidents=[SlowRank(rank=9, start_s=1)])
    with pytest.raises(ConfigError, match="duration"):
        run_demo(duration_s=-1)
    assert cli.main(["demo", "--duration", "0"]) == 2


@pytest.mark.e2e
def test_a_short_demo_catches_the_early_incidents_and_nothing_else(tmp_path):
    """60 s at speed-up 2 passes the slow rank (simulated 60 s): it must be alerted, nothing may fire falsely."""
    import io

    out = io.StringIO()
    result = run_demo(duration_s=60, speedup=2.0, out_dir=tmp_path, progress=out)
    text = out.getvalue()
    by_key = {o.incident.key: o for o in result.outcomes}
    assert by_key["slow_rank"].detected, text
    assert by_key["slow_rank"].alert == "TrainingStragglerRank"
    assert result.false_alarms == [], text
    assert not result.ok  # the cost spike (simulated 150 s) never happened, so the run is not a pass
    summary = json.loads(result.summary_path.read_text())
    assert {i["key"] for i in summary["incidents"]} == set(by_key)
    html = result.report_path.read_text()
    assert html.startswith("<!DOCTYPE html>") and "Stethoscope demo" in html
    assert "incidents detected" in text and "injected: Slow rank" in text
