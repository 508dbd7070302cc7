"""Dataset drift check speed and memory beside a SciPy ``ks_2samp`` loop (and peers if installed).

``python -m benchmarks.drift [--rows 100000] [--cols 50] [--repeat 3]``

The data follows docs/detectors.md and the peer measurements in the drift landscape:
reference and current are independent N(0, 1) draws of ``rows x cols`` float64, with
the first 10 current columns shifted by +0.05 sigma. Everything runs in this one
process pinned to one core. Times are medians over ``--repeat`` runs, SciPy already
imported (import time is reported apart). Memory is the tracemalloc peak while the
check runs, on top of the inputs, and as a multiple of the input size.

"Raw KS decisions" are per-column ``p < 0.05`` without correction; they must equal
the SciPy loop's. "Calibrated" is the default dataset check (BH, then W1/std >= 0.1),
which by design does not flag a 0.05-sigma shift.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import os
import statistics
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np


def _pin() -> str:
    if hasattr(os, "sched_setaffinity"):
        cpu = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpu})
        return f"pinned to CPU {cpu}"
    return "not pinned (no sched_setaffinity)"


def _data(rows: int, cols: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ref = rng.standard_normal((rows, cols))
    cur = rng.standard_normal((rows, cols))
    cur[:, : min(10, cols)] += 0.05
    return ref, cur


def _timed(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(repeat):
        gc.collect()
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def _peak(fn: Callable[[], Any]) -> int:
    gc.collect()
    tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    fn()
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    return peak


def ours(ref: np.ndarray, cur: np.ndarray):
    from stethoscope.analytics import DatasetDrift

    return DatasetDrift().fit(ref).score(cur)


def scipy_loop(ref: np.ndarray, cur: np.ndarray) -> list[float]:
    import scipy.stats as st

    return [float(st.ks_2samp(ref[:, j], cur[:, j]).pvalue) for j in range(ref.shape[1])]


def _one(rows: int, cols: int, seed: int, shift: bool) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((rows, cols))
    if shift:
        x[:, : min(10, cols)] += 0.05
    return x


def _fit_then_drop(rows: int, cols: int) -> int:
    """Total traced peak when the raw reference is released after fit."""
    from stethoscope.analytics import DatasetDrift

    gc.collect()
    tracemalloc.start()
    ref = _one(rows, cols, 1, False)
    det = DatasetDrift().fit(ref)
    del ref
    det.score(_one(rows, cols, 2, True))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def _columns_in_place(rows: int, cols: int) -> tuple[int, int]:
    """Total traced peak with the reference as owned 1-D columns sorted in place (the CLI path)."""
    from stethoscope.analytics import DatasetDrift

    rng = np.random.default_rng(3)
    gc.collect()
    tracemalloc.start()
    ref = {str(j): rng.standard_normal(rows) for j in range(cols)}
    cur = {str(j): rng.standard_normal(rows) + (0.05 if j < 10 else 0.0) for j in range(cols)}
    inputs = tracemalloc.get_traced_memory()[0]
    DatasetDrift().fit(ref, overwrite=True).score(cur)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak, inputs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--cols", type=int, default=50)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)
    pinned = _pin()
    t = time.perf_counter()
    import scipy.stats  # noqa: F401  (both sides need it; its import is not the check)

    import_s = time.perf_counter() - t
    ref, cur = _data(args.rows, args.cols)
    input_bytes = ref.nbytes + cur.nbytes
    ours(ref[:200], cur[:200])  # warm caches and lazy imports on a small slice
    print(f"# drift: {args.rows:,} x {args.cols} float64 reference vs current (first 10 current columns "
          f"+0.05 sigma); {pinned}; median of {args.repeat}; scipy.stats import {import_s:.2f} s (excluded)\n")

    ours_s, report = _timed(lambda: ours(ref, cur), args.repeat)
    ours_peak = _peak(lambda: ours(ref, cur))
    from stethoscope.analytics import DatasetDrift

    fit_s, det = _timed(lambda: DatasetDrift().fit(ref), args.repeat)
    score_s, _ = _timed(lambda: det.score(cur), args.repeat)
    scipy_s, scipy_p = _timed(lambda: scipy_loop(ref, cur), args.repeat)
    scipy_peak = _peak(lambda: scipy_loop(ref, cur))

    our_p = [c.p_value for c in report.columns]
    raw_ours = [pv < 0.05 for pv in our_p]
    raw_scipy = [pv < 0.05 for pv in scipy_p]
    max_dp = max(abs(a - b) for a, b in zip(our_p, scipy_p, strict=True))
    same = raw_ours == raw_scipy

    mb = 1024 * 1024
    print("| check | seconds | peak traced MB over inputs | peak / input | columns flagged | raw KS verdicts = SciPy |")
    print("|---|---|---|---|---|---|")
    print(f"| stethoscope DatasetDrift (fit {fit_s:.3f} + score {score_s:.3f}) | **{ours_s:.3f}** | "
          f"{ours_peak / mb:.1f} | {(input_bytes + ours_peak) / input_bytes:.2f}x | "
          f"{sum(raw_ours)} raw KS p<0.05; {report.summary.n_drifted} calibrated | "
          f"{'yes' if same else 'NO'} (max |dp| {max_dp:.1e}) |")
    print(f"| SciPy ks_2samp loop | {scipy_s:.3f} | {scipy_peak / mb:.1f} | "
          f"{(input_bytes + scipy_peak) / input_bytes:.2f}x | {sum(raw_scipy)} | (reference) |")
    for label, module in (("Evidently DataDriftPreset", "evidently"), ("alibi-detect KSDrift", "alibi_detect")):
        if importlib.util.find_spec(module) is None:
            print(f"| {label} | not installed | | | | |")
        else:
            print(f"| {label} | installed; not measured here (see the drift landscape for its numbers) | | | | |")
    print(f"\nspeed-up over the SciPy loop: {scipy_s / ours_s:.1f}x; input {input_bytes / mb:.0f} MB "
          f"(sorted reference kept as fitted state: {ref.nbytes / mb:.0f} MB)")
    del report
    inp = 2 * args.rows * args.cols * 8
    peak = _fit_then_drop(args.rows, args.cols)
    print(f"fit, release the raw reference, then score: total traced peak {peak / mb:.0f} MB = "
          f"{peak / inp:.2f}x the {inp / mb:.0f} MB of reference + current")
    peak, held = _columns_in_place(args.rows, args.cols)
    print(f"columns sorted in place (fit(..., overwrite=True), as the CLI does): total traced peak "
          f"{peak / mb:.0f} MB = {peak / held:.2f}x the {held / mb:.0f} MB of inputs")

    print("\ncolumns | seconds (fit + score)")
    print("---|---")
    for cols in (args.cols // 2, args.cols, args.cols * 2):
        r, c = _data(args.rows, cols, seed=1)
        s, _ = _timed(lambda r=r, c=c: ours(r, c), args.repeat)
        print(f"{cols} | {s:.3f}")
        del r, c
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
