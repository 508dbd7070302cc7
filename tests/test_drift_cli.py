"""The ``stethoscope drift`` command body on CSV and Parquet files."""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from stethoscope.analytics.drift_cli import add_arguments, run


def _args(*argv: str) -> argparse.Namespace:
    return add_arguments(argparse.ArgumentParser()).parse_args(list(argv))


def _run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = run(_args(*argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def _write_csv(path, columns: dict) -> str:
    names = list(columns)
    rows = zip(*(columns[n] for n in names), strict=True)
    path.write_text(",".join(names) + "\n" + "\n".join(",".join(str(v) for v in r) for r in rows) + "\n")
    return str(path)


@pytest.fixture
def frames():
    rng = np.random.default_rng(0)
    n = 3000
    ref = {"a": rng.normal(size=n), "b": rng.normal(size=n), "color": rng.choice(["red", "blue"], n)}
    same = {"a": rng.normal(size=n), "b": rng.normal(size=n), "color": rng.choice(["red", "blue"], n)}
    shifted = {"a": rng.normal(1, 1, n), "b": rng.normal(1, 1, n), "color": rng.choice(["red", "blue"], n)}
    return ref, same, shifted


def test_csv_no_drift_exits_0_and_drift_exits_1(tmp_path, frames):
    ref, same, shifted = frames
    r = _write_csv(tmp_path / "ref.csv", ref)
    code, out, _ = _run(r, _write_csv(tmp_path / "same.csv", same))
    assert code == 0 and "dataset: no drift" in out
    code, out, _ = _run(r, _write_csv(tmp_path / "shift.csv", shifted), "--format", "json")
    assert code == 1
    lines = [json.loads(line) for line in out.splitlines()]
    assert [x.get("column") for x in lines[:-1]] == ["a", "b", "color"]
    for key in ("method", "statistic", "p_value", "p_adjusted", "effect", "threshold", "drifted",
                "n_reference", "n_current"):
        assert key in lines[0]
    assert lines[0]["method"] == "ks" and lines[2]["method"] == "chi2"
    assert lines[-1]["type"] == "dataset" and lines[-1]["drifted"] is True and lines[-1]["n_drifted"] == 2


def test_parquet_columns_correction_and_alpha(tmp_path, frames):
    ref, _, shifted = frames
    pq.write_table(pa.table(ref), tmp_path / "r.parquet")
    pq.write_table(pa.table(shifted), tmp_path / "c.parquet")
    code, out, _ = _run(str(tmp_path / "r.parquet"), str(tmp_path / "c.parquet"), "--columns", "a,color",
                        "--correction", "bonferroni", "--alpha", "0.01", "--format", "json")
    lines = [json.loads(line) for line in out.splitlines()]
    assert code == 1 and [x.get("column") for x in lines[:-1]] == ["a", "color"]
    assert lines[-1]["correction"] == "bonferroni" and lines[-1]["alpha"] == 0.01


def test_schema_mismatch_names_the_columns(tmp_path, frames):
    ref, same, _ = frames
    cur = {"a": same["a"], "extra": same["b"]}
    code, _, err = _run(_write_csv(tmp_path / "r.csv", ref), _write_csv(tmp_path / "c.csv", cur))
    assert code == 2
    assert "missing in current" in err and "b, color" in err and "missing in reference" in err and "extra" in err


@pytest.mark.parametrize("problem", ["empty", "header_only", "missing_file", "bad_alpha", "bad_type", "no_columns"])
def test_input_errors_exit_2_with_a_message(tmp_path, frames, problem):
    ref = _write_csv(tmp_path / "r.csv", frames[0])
    cur = ref
    extra: tuple[str, ...] = ()
    if problem == "empty":
        (tmp_path / "e.csv").write_text("")
        cur = str(tmp_path / "e.csv")
    elif problem == "header_only":
        (tmp_path / "h.csv").write_text("a,b,color\n")
        cur = str(tmp_path / "h.csv")
    elif problem == "missing_file":
        cur = str(tmp_path / "nope.csv")
    elif problem == "bad_alpha":
        extra = ("--alpha", "1.5")
    elif problem == "bad_type":
        (tmp_path / "x.json").write_text("{}")
        cur = str(tmp_path / "x.json")
    elif problem == "no_columns":
        extra = ("--columns", "zzz")
    code, out, err = _run(ref, cur, *extra)
    assert code == 2 and err.startswith("stethoscope drift: error: ") and out == ""


def test_junk_in_a_numeric_column_is_read_as_missing(tmp_path):
    rng = np.random.default_rng(1)
    ref = {"x": [f"{v:.4f}" for v in rng.normal(size=500)]}
    cur_vals = [f"{v:.4f}" for v in rng.normal(size=500)]
    cur_vals[:5] = ["n/a", "?", "12kg", "oops", "-"]
    code, out, err = _run(_write_csv(tmp_path / "r.csv", ref), _write_csv(tmp_path / "c.csv", {"x": cur_vals}),
                          "--format", "json")
    col = json.loads(out.splitlines()[0])
    assert code == 0 and col["method"] == "ks" and col["n_current"] < 500
    assert col["non_numeric_current"] >= 3 and "non-numeric values read as missing" in err


def test_all_missing_column_is_reported_not_fatal(tmp_path, frames):
    ref, same, _ = frames
    cur = dict(same)
    cur["b"] = [""] * len(cur["b"])
    code, out, _ = _run(_write_csv(tmp_path / "r.csv", ref), _write_csv(tmp_path / "c.csv", cur), "--format", "json")
    lines = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and "error" in lines[1] and "current column 'b'" in lines[1]["error"]
    assert lines[-1]["n_errors"] == 1 and lines[-1]["n_checked"] == 2


def test_module_entry_point(tmp_path, frames):
    ref, _, shifted = frames
    r, c = _write_csv(tmp_path / "r.csv", ref), _write_csv(tmp_path / "c.csv", shifted)
    proc = subprocess.run([sys.executable, "-m", "stethoscope.analytics.drift_cli", r, c, "--format", "table"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout.splitlines()[0].split()[:3] == ["column", "kind", "method"]
    assert "dataset: DRIFT: 2 of 3" in proc.stdout
