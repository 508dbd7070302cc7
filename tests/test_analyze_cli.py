"""``stethoscope analyze training FILE``: findings as JSON or a table, exit 2 with a clear message on bad input."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from stethoscope.analytics.scenarios import training_run

from stethoscope.cli import main

COLUMNS = ["timestamp", "job", "rank", "node", "gpu", "step", "loss", "grad_norm", "step_time", "data_wait", "tokens"]


def _rows(*runs):
    for run in runs:
        for o in run.observations:
            row = [o["time"], o["job"], o["rank"], o["node"], o["gpu"], o["step"], o["loss"], o["grad_norm"],
                   o["step_time"], o["data_wait"], o["tokens"]]
            yield row + [o["phases"][p] for p in ("data", "forward", "backward", "optimizer", "comm")]


def _write_csv(path, *runs):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(COLUMNS + ["phase_data", "phase_forward", "phase_backward", "phase_optimizer", "phase_comm"])
        w.writerows(_rows(*runs))
    return str(path)


@pytest.fixture
def incidents_csv(tmp_path):
    slow = training_run("slow_rank", seed=1, steps=500, onset=350, rank=2, job="slow")
    nan = training_run("nan", seed=2, steps=500, onset=420, rank=1, job="nan")
    return _write_csv(tmp_path / "steps.csv", slow, nan)


def _cli(capsys, *argv):
    code = main(["analyze", "training", *argv])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_json_one_object_per_finding(incidents_csv, capsys):
    code, out, err = _cli(capsys, incidents_csv, "--format", "json", "--min-severity", "warning")
    assert code == 0, err
    recs = [json.loads(line) for line in out.splitlines()]
    got = sorted((r["kind"], r["subject"], r["step"], r["severity"]) for r in recs)
    assert got == [("straggler_rank", "job=slow rank=2 node=node0 gpu=2", 350, "warning"),
                   ("training_nan", "job=nan", 420, "critical")]  # one finding per job; the rank in the fields
    nan = next(r for r in recs if r["kind"] == "training_nan")
    assert nan["rank"] == 1 and nan["node"] == "node0"
    straggler = next(r for r in recs if r["kind"] == "straggler_rank")
    assert straggler["rank"] == 2 and straggler["node"] == "node0" and straggler["gpu"] == "2"
    assert straggler["onset"].endswith("Z") and straggler["onset_time"] <= straggler["time"]
    assert straggler["evidence"]["slowdown_vs_median"] > 0.05 and "detected_step" in straggler["evidence"]


def test_table_and_parquet(tmp_path, capsys):
    run = training_run("loss_spike", seed=3, steps=600, onset=450, rank=0, magnitude=5)
    cols = {c: [] for c in COLUMNS}
    for row in _rows(run):
        for c, v in zip(COLUMNS, row):
            cols[c].append(v)
    pq.write_table(pa.table(cols), tmp_path / "s.parquet")
    code, out, err = _cli(capsys, str(tmp_path / "s.parquet"))
    assert code == 0, err
    assert "loss_spike" in out and "job=job0 " in out and " rank " in out and out.rstrip().endswith("step record(s)")


def test_clean_run_prints_no_alarm(tmp_path, capsys):
    path = _write_csv(tmp_path / "c.csv", training_run("clean", seed=4, steps=600))
    code, out, _ = _cli(capsys, path, "--format", "json", "--min-severity", "warning")
    assert code == 0 and out == "", out


def test_config_selects_detectors_and_settings(incidents_csv, capsys):
    cfg = json.dumps({"detectors": ["training_nan"], "settings": {}})
    code, out, _ = _cli(capsys, incidents_csv, "--format", "json", "--config", cfg)
    assert code == 0 and [json.loads(x)["kind"] for x in out.splitlines()] == ["training_nan"]
    code, out, err = _cli(capsys, incidents_csv, "--config", '{"settings": {"loss_spike": {"z": -1}}}')
    assert code == 2 and "z: must be" in err and out == ""
    code, _, err = _cli(capsys, incidents_csv, "--config", "no-such.json")
    assert code == 2 and "no such file" in err


def test_bad_input_exit_2_with_the_reason(tmp_path, capsys):
    p = tmp_path / "bad.csv"
    p.write_text("timestamp,job,rank\n1,j,0\n")
    code, _, err = _cli(capsys, str(p))
    assert code == 2 and "missing required column(s): node, step, loss" in err
    code, _, err = _cli(capsys, str(tmp_path / "none.csv"))
    assert code == 2 and "no such file" in err


def test_junk_is_counted_on_stderr(tmp_path, capsys):
    p = tmp_path / "j.csv"
    p.write_text("timestamp,job,rank,node,step,loss,grad_norm,step_time,data_wait\n"
                 "2024-01-01T00:00:00Z,j,0,n,1,oops,1,1,0.1\n"
                 "2024-01-01T00:00:01Z,j,0,n,2,nan,1,1,0.1\n")
    code, out, err = _cli(capsys, str(p), "--format", "json")
    assert code == 0 and "column 'loss': 1 non-numeric value(s)" in err
    assert [json.loads(x)["kind"] for x in out.splitlines()] == ["training_nan"]


def test_subprocess_bad_input_has_no_traceback(tmp_path):
    p = tmp_path / "bad.parquet"
    p.write_bytes(b"not parquet")
    proc = subprocess.run([sys.executable, "-m", "stethoscope.cli", "analyze", "training", str(p)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "cannot read as parquet" in proc.stderr
