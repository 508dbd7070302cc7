"""Training and distributed anomaly detectors: behaviour, the evaluation targets on seeded scenarios,
configuration checks, and the step-table reader."""

from __future__ import annotations

import doctest
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from stethoscope.analytics import distributed, scenarios, training, training_analysis
from stethoscope.analytics.anomaly import ANOMALY_REGISTRY
from stethoscope.analytics.distributed import JobHung, StragglerRank
from stethoscope.analytics.findings import Finding
from stethoscope.analytics.scenarios import Incident, evaluate, training_run
from stethoscope.analytics.training import (
    GradientExplosion,
    InputBound,
    LossPlateau,
    LossSpike,
    PhaseShift,
    ThroughputRegression,
    TrainingNaN,
)
from stethoscope.analytics.training_analysis import (
    TrainingAnalyzer,
    analyze_steps,
    read_step_table,
)

from stethoscope.errors import ConfigError, DecodeError


def _run(det, observations):
    return [f for o in observations for f in det.update(o)]


def _alarms(findings):
    return [f for f in findings if f.severity != "info"]


def test_module_doctests():
    for mod in (training, distributed, scenarios, training_analysis):
        assert doctest.testmod(mod).failed == 0, mod.__name__


def test_every_detector_is_registered_under_its_kind():
    for name in training.TRAINING_DETECTORS + distributed.DISTRIBUTED_DETECTORS:
        det = ANOMALY_REGISTRY[name]()
        assert det.kinds == (name,) and det.name == name


# --- targets on seeded scenarios (deterministic: fixed seeds) ----------------------------


def test_every_nan_is_caught_at_its_step():
    findings, labels = [], []
    for seed in range(3):
        run = training_run("nan", seed=seed, steps=1500, count=5, job=f"j{seed}")
        findings += _run(TrainingNaN(), run.observations)
        labels += run.incidents
    ev = evaluate(findings, labels, duration_s=1.0).kinds["training_nan"]
    assert ev.incidents == 15 and ev.recall == 1.0 and ev.false_alarms == 0
    assert set(ev.delays_steps) == {0}
    assert all(f.severity == "critical" for f in findings)


@pytest.mark.parametrize(("sigma", "ranks"), [(3.0, 4), (4.0, 4), (8.0, 4), (3.0, 8)])
def test_every_loss_spike_of_3_sigma_or_more_is_caught_within_one_step(sigma, ranks):
    # a spike of the job: every rank's loss rises by sigma x one rank's noise (seeded, deterministic)
    findings, labels = [], []
    for seed in range(3):
        run = training_run("loss_spike", seed=seed, steps=2000, count=5, magnitude=sigma, job=f"j{seed}",
                           world_size=ranks)
        findings += _run(LossSpike(), run.observations)
        labels += run.incidents
    ev = evaluate(findings, labels, duration_s=1.0).kinds["loss_spike"]
    assert ev.incidents == 15 and ev.recall == 1.0
    assert max(ev.delays_steps) <= 1
    assert ev.false_alarms == 0
    assert all(f.subject.startswith("job=j") and " " not in f.subject for f in findings)


def test_a_rise_of_one_rank_alone_raises_few_alarms():
    # the same 3-sigma rise on one rank of 4 moves the job's mean 1.5 sigma of the mean: not a job spike
    found, n = [], 0
    for seed in range(3):
        run = training_run("rank_spike", seed=seed, steps=2000, count=5, job=f"j{seed}")
        found += _alarms(_run(LossSpike(), run.observations))
        n += 5
    assert n == 15 and len(found) <= 1


def test_a_10_percent_slow_rank_is_flagged_within_3_iterations_with_high_precision():
    findings, labels = [], []
    for seed in range(8):
        run = training_run("slow_rank", seed=seed, steps=700, job=f"j{seed}", magnitude=0.10)
        findings += _run(StragglerRank(), run.observations)
        labels += run.incidents
        clean = training_run("clean", seed=100 + seed, steps=700, job=f"c{seed}")
        findings += _run(StragglerRank(), clean.observations)
    ev = evaluate(findings, labels, duration_s=1.0).kinds["straggler_rank"]
    assert ev.recall == 1.0 and max(ev.delays_steps) <= 3
    assert ev.precision >= 0.95
    for f in _alarms(findings):  # names node and GPU
        assert f.details["node"] and f.details["gpu"] != "" and "node=" in f.subject and "gpu=" in f.subject


def test_clean_runs_raise_almost_no_alarms():
    found = []
    for seed in range(2):
        run = training_run("clean", seed=50 + seed, steps=2500, job=f"c{seed}")
        found += _alarms(analyze_steps(run.observations))
    # 2 runs x 4 ranks x 2,500 steps = 20,000 rank-steps. loss_spike judges the job's mean loss
    # (about 0.1 false alarms per job-day of 86,400 steps, docs/benchmarks.md): none expected here.
    assert [(f.kind, f.subject) for f in found] == []


# --- behaviour of each detector ----------------------------------------------------------


def _obs(step, **kw):
    base = {"time": 1000.0 + step, "job": "j", "rank": 0, "node": "n0", "gpu": "0", "step": step}
    base.update(kw)
    return base


def test_nan_is_reported_once_per_incident_and_again_after_recovery():
    det = TrainingNaN()
    seq = [_obs(0, loss=1.0)] + [_obs(s, loss=math.nan) for s in range(1, 5)] + [_obs(5, loss=1.0),
                                                                                   _obs(6, grad_norm=math.inf)]
    found = _run(det, seq)
    assert [(f.details["step"], f.details["values"]) for f in found] == [(1, ["loss"]), (6, ["grad_norm"])]
    # a nonfinite count from the SDK's delta sum
    assert [f.kind for f in det.update(_obs(7, rank=3, nonfinite={"loss": 2}))] == ["training_nan"]
    assert det.update(_obs(8, rank=4, nonfinite={"loss": 0})) == []


def test_loss_spike_immediate_rules_and_no_alarm_on_a_bend():
    run = training_run("clean", seed=1, steps=400, world_size=1)
    obs = run.observations
    det = LossSpike()
    _run(det, obs[:300])
    # a single-step blow-up is reported at once (z_immediate / 10x the highest seen)
    big = dict(obs[300], loss=obs[300]["loss"] * 20)
    found = det.update(big)
    assert [f.method for f in found] == ["max_ratio"]
    # a plateau: the curve bends, which the trend follows without a spike alarm in this run
    run = training_run("plateau", seed=3, steps=1500, world_size=1, onset=600)
    assert _alarms(_run(LossSpike(), run.observations)) == []


def test_gradient_explosion_needs_z_and_ratio():
    run = training_run("gradient_explosion", seed=2, steps=800, onset=500, world_size=2, rank=1)
    found = _alarms(_run(GradientExplosion(), run.observations))
    assert [(f.subject, f.details["step"]) for f in found] == [("job=job0 rank=1 node=node0 gpu=1", 500)]
    assert found[0].effect >= 2.0


def test_plateau_warns_once_per_job():
    run = training_run("plateau", seed=4, steps=1500, onset=700)
    found = _alarms(_run(LossPlateau(), run.observations))
    assert len(found) == 1 and found[0].kind == "loss_plateau" and found[0].details["step"] >= 700


def test_input_stall_phase_shift_warns_before_input_bound_once_per_job():
    run = training_run("input_stall", seed=6, steps=900, onset=500)
    an = TrainingAnalyzer(["input_bound", "phase_shift", "throughput_regression"])
    found = _alarms(analyze_steps(run.observations, an))
    kinds = [f.kind for f in found]
    assert sorted(kinds) == ["input_bound", "phase_shift", "throughput_regression"]  # one each for the job
    by = {f.kind: f for f in found}
    assert by["phase_shift"].time < by["input_bound"].time
    assert by["phase_shift"].details["changed_most"] in ("data", "backward", "forward")
    phases = by["input_bound"].details["phases"]
    assert phases["data"]["share"] > 0.5 and set(phases) == {"data", "forward", "backward", "optimizer", "comm"}


def test_throughput_regression_against_own_best():
    obs = [_obs(s, step_time=1.0 if s < 200 else 1.3, tokens=1000.0) for s in range(300)]
    found = _alarms(_run(ThroughputRegression(), obs))
    assert len(found) == 1 and found[0].details["unit"] == "tokens/s"
    assert 200 <= found[0].details["step"] <= 230 and 0.15 <= found[0].details["drop"] <= 1 - 1 / 1.3 + 0.01


def test_straggler_not_flagged_when_the_whole_job_slows():
    run = training_run("clean", seed=9, steps=600)
    obs = []
    for o in run.observations:
        if o["step"] >= 300:  # every rank 30% slower: longer sequences, not a straggler
            o = dict(o, step_time=o["step_time"] * 1.3, phases={k: v * 1.3 for k, v in o["phases"].items()})
        obs.append(o)
    assert _alarms(_run(StragglerRank(), obs)) == []


def test_straggler_recovery_is_info():
    run = training_run("slow_rank", seed=3, steps=800, onset=400, rank=2, magnitude=0.2)
    obs = []
    for o in run.observations:
        if o["rank"] == 2 and o["step"] >= 500:  # back to normal speed: scale the work phases back
            ph = dict(o["phases"])
            for k in ("forward", "backward", "optimizer"):
                ph[k] /= 1.2
            o = dict(o, phases=ph, step_time=sum(ph.values()))
        obs.append(o)
    found = _run(StragglerRank(), obs)
    assert [(f.severity, f.details["step"] >= 400) for f in found][:2] == [("warning", True), ("info", True)]


def test_job_hung_update_tick_and_resume():
    det = JobHung(min_silence_s=5.0)
    for s in range(20):
        for r in (0, 1):
            det.update(_obs(s, rank=r))
    # rank 1 goes silent; rank 0 continues: critical at 10 x 1 s (> min 5 s)
    found = []
    for s in range(20, 40):
        found += det.update(_obs(s, rank=0))
    assert [(f.subject, f.severity, f.details["step"]) for f in found] == [("job=j rank=1 node=n0 gpu=0", "critical", 19)]
    assert 1000.0 + 30 <= found[0].time <= 1000.0 + 33  # checked every quarter of the 10 s limit
    # the whole job goes quiet: tick reports the job once, as a warning
    job = det.tick(1000.0 + 39 + 11)
    assert [(f.subject, f.severity) for f in job] == [("job=j", "warning")]
    assert det.tick(1000.0 + 39 + 100) == []
    # in a file: rank 0 comes back after a gap; already reported, so no new finding
    assert det.update(_obs(200, rank=0)) == []
    det2 = JobHung(min_silence_s=5.0)
    for s in range(10):
        det2.update(_obs(s))
    gap = det2.update(_obs(100))
    assert [(f.severity, f.details["resumed"]) for f in gap] == [("warning", True)]


def test_configuration_errors_list_every_problem():
    with pytest.raises(ConfigError) as e:
        LossSpike(z=-1, persistence=0, warmup=2)
    assert len(e.value.problems) == 3
    with pytest.raises(ConfigError):
        StragglerRank(min_effect=0)
    with pytest.raises(ConfigError):
        InputBound(threshold=0.3, clear=0.5)
    with pytest.raises(ConfigError):
        PhaseShift(threshold=2)
    with pytest.raises(ConfigError) as e:
        TrainingAnalyzer(["nope", "loss_spike"], {"loss_spike": {"zz": 1}, "other": {}})
    text = "\n".join(e.value.problems)
    assert "nope" in text and "zz" in text and "other" in text


def test_evaluate_counts_consequences_neither_way():
    inc = Incident("input_bound", "job=a", onset_time=100.0, onset_step=10, also=("phase_shift",), cause_time=50.0)
    early = Finding(time=60.0, kind="phase_shift", subject="job=a rank=0", severity="warning")
    other = Finding(time=60.0, kind="phase_shift", subject="job=b rank=0", severity="warning")
    ev = evaluate([early, other], [inc], duration_s=43200.0)
    assert ev.kinds["phase_shift"].false_alarms == 1 and ev.false_alarms_per_day == 2.0
    assert ev.kinds["input_bound"].recall == 0.0


# --- reading step tables ----------------------------------------------------------------


def _csv(path, header, rows):
    path.write_text(",".join(header) + "\n" + "\n".join(",".join(str(v) for v in r) for r in rows) + "\n")
    return path


HEADER = ["timestamp", "job", "rank", "node", "step", "loss", "grad_norm", "step_time", "data_wait"]


def test_read_step_table_csv_iso_and_epoch_junk_and_nan(tmp_path):
    p = _csv(tmp_path / "s.csv", HEADER + ["phase_forward", "gpu"], [
        ["2024-05-01T00:00:00Z", "j", 0, "n0", 1, 2.5, 1.0, 1.0, 0.1, 0.5, 3],
        ["2024-05-01T00:00:01", "j", 0, "n0", 2, "nan", 1.0, 1.0, 0.1, 0.5, 3],
        ["1714521602.5", "j", 0, "n0", 3, "oops", 1.0, 1.0, 0.1, 0.5, 3],
        ["not a time", "j", 0, "n0", 4, 2.4, 1.0, 1.0, 0.1, 0.5, 3],
        ["1714521603500", "j", 0, "n0", 6, 2.4, 1.0, 1.0, 0.1, 0.5, 3],
        ["2024-05-01T00:00:05Z", "j", "x", "n0", 5, 2.4, 1.0, 1.0, 0.1, 0.5, 3],
    ])
    t = read_step_table(p)
    assert t.rows == 6 and len(t.records) == 4
    assert t.records[0]["time"] == 1714521600.0 and t.records[1]["time"] == 1714521601.0
    assert t.records[2]["time"] == 1714521602.5 and t.records[3]["time"] == 1714521603.5  # milliseconds
    assert math.isnan(t.records[1]["loss"]) and "loss" not in t.records[2]
    assert t.non_numeric == {"loss": 1} and t.dropped == {"timestamp": 1, "rank": 1}
    assert t.records[0]["phases"] == {"forward": 0.5} and t.records[0]["gpu"] == "3"


def test_read_step_table_parquet_with_timestamp_type(tmp_path):
    import datetime as dt

    cols = {c: [] for c in HEADER}
    for s in range(3):
        cols["timestamp"].append(dt.datetime(2024, 5, 1, 0, 0, s))
        for c, v in (("job", "j"), ("rank", 1), ("node", "n1"), ("step", s), ("loss", 1.0), ("grad_norm", 1.0),
                     ("step_time", 1.0), ("data_wait", 0.1)):
            cols[c].append(v)
    pq.write_table(pa.table(cols), tmp_path / "s.parquet")
    t = read_step_table(tmp_path / "s.parquet")
    assert [r["time"] for r in t.records] == [1714521600.0, 1714521601.0, 1714521602.0]


def test_read_step_table_errors_name_the_problem(tmp_path):
    with pytest.raises(DecodeError, match="missing required column.*grad_norm"):
        read_step_table(_csv(tmp_path / "a.csv", [c for c in HEADER if c != "grad_norm"], [[1] * 8]))
    with pytest.raises(DecodeError, match="no such file"):
        read_step_table(tmp_path / "nope.csv")
    with pytest.raises(DecodeError, match="unsupported file type"):
        read_step_table(_csv(tmp_path / "a.json", HEADER, [[1] * 9]))
    with pytest.raises(DecodeError, match="no usable row"):
        read_step_table(_csv(tmp_path / "b.csv", HEADER, [["x", "j", 0, "n", 1, 1, 1, 1, 0]]))


# --- a public trace with a known straggler ------------------------------------------------


def _pai_job1():
    """Alibaba PAI job 1 (tests/fixtures/alibaba_pai/README.md) as step observations."""
    import csv
    from pathlib import Path

    path = Path(__file__).parent / "fixtures" / "alibaba_pai" / "job_1_norm.csv"
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    times = sorted({int(r["time"]) for r in rows})
    step = {t: i for i, t in enumerate(times)}
    obs = [{"time": 1.7e9 + int(r["time"]), "job": "pai-job1", "rank": int(r["worker"]),
            "node": f"worker{r['worker']}", "step": step[int(r["time"])],
            "step_time": int(r["batch_time_norm"]) / 1000.0} for r in rows]
    return sorted(obs, key=lambda o: (o["time"], o["rank"]))


def test_public_trace_straggler_is_flagged():
    obs = _pai_job1()
    assert len(obs) == 3000
    # default settings (10% minimum effect): worker 6 is flagged when it slows, at about 1,810 s
    found = _alarms(_run(StragglerRank(), obs))
    w6 = [f for f in found if f.details["rank"] == 6]
    assert w6 and 1780 <= w6[0].details["onset_time"] - 1.7e9 <= 1830
    assert w6[0].details["slowdown_vs_median"] > 0.5 and "node=worker6" in w6[0].subject
    # the workers of this trace also wander 10-15% for minutes; at a 20% minimum effect the
    # known straggler is the only one
    strict = _alarms(_run(StragglerRank(min_effect=0.2), obs))
    assert [(f.details["rank"], f.details["step"]) for f in strict] == [(6, w6[0].details["step"])]


def _dp(steps, ranks=8, *, seed=5, sigma=0.02, spikes=(), spike_ranks=None, skip=None):
    """Step observations of a data-parallel job: noisy losses around 2.0, ``spikes`` maps step -> added loss."""
    import numpy as np

    rng = np.random.default_rng(seed)
    obs = []
    for step in steps:
        for rank in range(ranks):
            if skip is not None and skip(rank, step):
                continue
            loss = 2.0 + sigma * rng.standard_normal()
            if step in dict(spikes) and (spike_ranks is None or rank in spike_ranks):
                loss += dict(spikes)[step]
            obs.append({"time": 1000.0 + step + rank * 1e-3, "job": "dp", "rank": rank, "node": f"n{rank // 4}",
                        "gpu": rank % 4, "step": step, "loss": loss, "grad_norm": 1.0, "step_time": 1.0,
                        "data_wait": 0.01, "world_size": ranks})
    return obs


def test_a_spike_on_every_rank_is_one_finding_for_the_job_at_its_step():
    obs = _dp(range(1, 601), spikes={300: 6.0, 301: 6.0, 500: 6.0})
    analyzer = TrainingAnalyzer(detectors=["loss_spike"])
    spikes = [f for f in analyze_steps(obs, analyzer) if f.kind == "loss_spike" and f.severity != "info"]
    assert [(f.subject, f.details["step"], f.details["detected_step"]) for f in spikes] == [
        ("job=dp", 300, 300), ("job=dp", 500, 500)]
    # reported when the last rank of the step arrived, naming the rank whose loss rose most
    at_300 = [o for o in obs if o["step"] == 300]
    top = max(at_300, key=lambda o: o["loss"])
    assert spikes[0].time == max(o["time"] for o in at_300)
    assert spikes[0].details["first_rank"] == str(top["rank"]) and spikes[0].details["rank"] == top["rank"]
    assert spikes[0].details["first_node"] == top["node"] and spikes[0].details["ranks"] == 8
    assert spikes[0].details["ranks_above"] == 8


def test_a_3_sigma_spike_of_the_job_is_caught_where_each_rank_alone_is_not_sure():
    # 3 sigma of one rank's noise on all 8 ranks: 8.5 sigma of the job's mean loss, caught at its step
    obs = _dp(range(1, 401), seed=9, spikes={300: 0.06, 301: 0.06, 302: 0.06})
    found = _alarms(_run(LossSpike(), obs))
    assert [(f.subject, f.details["step"], f.details["detected_step"]) for f in found] == [("job=dp", 300, 300)]


def test_a_rise_on_one_rank_alone_is_not_a_job_spike():
    # 5 sigma on one rank of 8 for three steps: noise or a bad shard, not the job's loss
    obs = _dp(range(1, 401), seed=3, spikes={300: 0.10, 301: 0.10, 302: 0.10}, spike_ranks={5})
    assert _alarms(_run(LossSpike(), obs)) == []
    # 100 sigma on one rank: the job's mean moves a lot, the other ranks do not: info for that rank, no alarm
    obs = _dp(range(1, 401), seed=3, spikes={300: 2.0, 301: 2.0}, spike_ranks={5})
    found = _run(LossSpike(), obs)
    assert _alarms(found) == []
    assert [(f.severity, f.method, f.subject, f.details["step"]) for f in found] == [
        ("info", "rank_outlier", "job=dp rank=5 node=n1 gpu=1", 300)]


def test_a_late_rank_is_waited_for_and_a_silent_one_is_not_forever():
    # rank 3's steps arrive 20 steps late (within the 60 s grace): the step waits and is judged complete
    obs = _dp(range(1, 401), ranks=4, seed=4, spikes={300: 0.1, 301: 0.1, 302: 0.1})
    late = sorted(obs, key=lambda o: o["time"] + (20.0 if o["rank"] == 3 else 0.0))
    det = LossSpike()
    found = _alarms(_run(det, late))
    assert [(f.details["step"], f.details["ranks"]) for f in found] == [(300, 4)] and det.n_late == 0
    assert found[0].time == 1300.003 and found[0].details["detected_step"] == 300  # on rank 3's step 300
    # rank 3 goes silent at step 100: steps wait at most the grace, then not at all
    obs = [o for o in _dp(range(1, 401), ranks=4, seed=4, spikes={300: 0.1, 301: 0.1, 302: 0.1})
           if not (o["rank"] == 3 and o["step"] > 100)]
    det = LossSpike(grace_s=30.0)
    waited = []
    for o in obs:
        det.update(o)
        waited.append(det.pending)
    assert max(waited) <= 32 and waited[-1] <= 1
    det = LossSpike(grace_s=30.0)
    found = _alarms(_run(det, obs))
    assert [(f.details["step"], f.details["ranks"], f.time) for f in found] == [(300, 3, 1300.002)]


def test_ranks_that_skip_steps_are_not_waited_for_and_memory_is_bounded():
    # rank 1 reports every third step only (the SDK thins fast steps): the others' steps are judged at once
    obs = _dp(range(1, 401), ranks=4, seed=6, spikes={301: 0.06, 302: 0.06},
              skip=lambda r, s: r == 1 and s % 3 != 0)
    det = LossSpike()
    found = _alarms(_run(det, obs))
    assert [(f.details["step"], f.details["detected_step"], f.details["ranks"]) for f in found] == [(301, 301, 3)]
    assert det.pending == 1  # step 400, which rank 1 has neither reported nor gone past
    assert det.flush() == [] and det.pending == 0
    # one rank far ahead of a rank that stays active (same timestamps, so no grace runs out): bounded
    det = LossSpike(max_pending=64)
    det.update({"time": 1.0, "job": "j", "rank": 1, "step": 0, "loss": 1.0})
    for s in range(1, 2000):
        det.update({"time": 1.0, "job": "j", "rank": 0, "step": s, "loss": 1.0 + 0.01 * (s * 7 % 5)})
        assert det.pending <= 65
    # what still waits at the end of the data is judged by flush()
    assert det.flush() == [] and det.pending == 0


def test_a_restart_from_a_checkpoint_starts_the_series_afresh():
    obs = _dp(range(1, 301), ranks=2, seed=8)
    # the job crashed at step 300 and resumed from step 200, 500 s later, at the loss it had then plus a bump
    again = [dict(o, time=o["time"] + 500.0, loss=o["loss"] + 0.3) for o in _dp(range(200, 301), ranks=2, seed=9)]
    det = LossSpike()
    assert _alarms(_run(det, obs + again)) == [] and det.n_late == 0


def test_the_late_ranks_of_a_step_are_judged_at_the_end_of_a_file():
    obs = _dp(range(1, 201), ranks=4, seed=2, spikes={199: 6.0, 200: 6.0})
    obs = [o for o in obs if not (o["rank"] == 2 and o["step"] >= 199)]  # rank 2's last two steps are missing
    analyzer = TrainingAnalyzer(detectors=["loss_spike"])
    found = _alarms(analyze_steps(obs, analyzer))
    assert [(f.subject, f.details["step"], f.details["ranks"]) for f in found] == [("job=dp", 199, 3)]


def test_steps_held_for_a_silent_rank_are_judged_on_tick():
    # rank 3 stops after step 200; the spike at 250 waits for it, then the wall clock passes the grace
    obs = [o for o in _dp(range(1, 252), ranks=4, seed=12, spikes={250: 0.1, 251: 0.1})
           if not (o["rank"] == 3 and o["step"] > 200)]
    analyzer = TrainingAnalyzer(detectors=["loss_spike"])
    assert _alarms([f for o in obs for f in analyzer.update(o)]) == []
    assert analyzer.tick(1000.0 + 201 + 55) == []  # within the grace (60 s) of step 201: still waiting
    found = _alarms(analyzer.tick(1000.0 + 201 + 61))
    assert [(f.subject, f.details["step"], f.details["ranks"]) for f in found] == [("job=dp", 250, 3)]
