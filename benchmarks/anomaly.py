"""Training anomaly detection: the evaluation harness over seeded scenarios, and detector throughput.

``python -m benchmarks.run anomaly`` simulates labelled training runs
(:func:`stethoscope.analytics.scenarios.training_run`: 4 ranks, 1 s nominal steps)
and runs every training and distributed detector over them with default settings,
then prints, per finding kind, recall, precision, time and steps to detect, and
false alarms per day, plus the false alarms on clean runs and the throughput of each
detector (observations per second, one core, a Python loop), against the CUSUM of
:mod:`stethoscope.analytics.sequential` fed the same number of values as a peer.
"""

from __future__ import annotations

import os

if hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

import argparse
import math
import time

import numpy as np
from stethoscope.analytics.anomaly import ANOMALY_REGISTRY
from stethoscope.analytics.scenarios import evaluate, training_run
from stethoscope.analytics.sequential import CUSUM
from stethoscope.analytics.training_analysis import DEFAULT_DETECTORS, TrainingAnalyzer

INCIDENTS = {  # scenario kind -> (finding kind, generator options)
    "nan": ("training_nan", {"count": 5}),
    "loss_spike": ("loss_spike", {"count": 5, "magnitude": 3.0}),
    "gradient_explosion": ("gradient_explosion", {"count": 5}),
    "slow_rank": ("straggler_rank", {"magnitude": 0.10}),
    "input_stall": ("input_bound", {}),
    "plateau": ("loss_plateau", {}),
    "hung": ("job_hung", {}),
}


def _pct(values, q):
    return float(np.percentile(values, q)) if len(values) else math.nan


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=10, help="seeded runs per incident kind")
    ap.add_argument("--steps", type=int, default=3000, help="steps per incident run")
    ap.add_argument("--clean-runs", type=int, default=20, help="clean runs")
    ap.add_argument("--clean-steps", type=int, default=10000, help="steps per clean run")
    args = ap.parse_args(argv)

    print(f"Scenarios: 4 ranks per job, 1 s nominal step, loss noise sigma 0.02, phase-time noise 2%; "
          f"{args.runs} runs x {args.steps} steps per incident kind, {args.clean_runs} clean runs x "
          f"{args.clean_steps} steps. Every detector with default settings.\n")
    print("| scenario | finding kind | incidents | recall | precision | steps to detect (median / max) "
          "| time to detect, s (median / max) | other alarms (kind: n) |")
    print("|---|---|---:|---:|---:|---|---|---|")
    n_obs, t_total = 0, 0.0
    for scen, (kind, opts) in INCIDENTS.items():
        findings, labels, dur = [], [], 0.0
        for seed in range(args.runs):
            run = training_run(scen, seed=1000 + seed, steps=args.steps, job=f"{scen}{seed}", **opts)
            an = TrainingAnalyzer()
            t0 = time.perf_counter()
            for o in run.observations:
                findings += an.update(o)
            t_total += time.perf_counter() - t0
            n_obs += len(run.observations)
            labels += run.incidents
            dur += run.duration_s
        ev = evaluate(findings, labels, dur)
        k = ev.kinds[kind]
        other = ", ".join(f"{n}: {s.false_alarms}" for n, s in sorted(ev.kinds.items()) if n != kind and s.false_alarms)
        steps = f"{_pct(k.delays_steps, 50):.0f} / {max(k.delays_steps)}" if k.delays_steps else "-"
        secs = f"{_pct(k.delays_s, 50):.1f} / {max(k.delays_s):.1f}" if k.delays_s else "-"
        print(f"| {scen} | {kind} | {k.incidents} | {k.recall:.3f} | {k.precision:.3f} | {steps} | {secs} "
              f"| {other or '-'} |")

    print("\nClean runs (no incident): every alarm (warning or critical) is false.\n")
    findings, dur, rank_steps = [], 0.0, 0
    for seed in range(args.clean_runs):
        run = training_run("clean", seed=5000 + seed, steps=args.clean_steps, job=f"clean{seed}")
        an = TrainingAnalyzer()
        t0 = time.perf_counter()
        for o in run.observations:
            findings += an.update(o)
        t_total += time.perf_counter() - t0
        n_obs += len(run.observations)
        dur += run.duration_s
        rank_steps += len(run.observations)
    ev = evaluate(findings, [], dur)
    days = dur / 86400
    print("| finding kind | false alarms | per job-day (4 ranks, 1 step/s) | per million rank-steps |")
    print("|---|---:|---:|---:|")
    for name, s in sorted(ev.kinds.items()):
        print(f"| {name} | {s.false_alarms} | {s.false_alarms / days:.2f} | {s.false_alarms / rank_steps * 1e6:.1f} |")
    total = ev.false_alarms
    per_ms = total / rank_steps * 1e6
    print(f"| all | {total} | {total / days:.2f} | {per_ms:.1f} |")
    if total:
        budget = 0.5 / (per_ms / 1e6) / 86400  # rank-steps per second at which 0.5 false alarms/day holds
        print(f"\n{rank_steps:,} rank-steps ({days:.2f} job-days at 1 step/s). At the measured rate, 0.5 false "
              f"alarms per day holds up to {budget:.2f} rank-steps/s (e.g. {budget / 4:.2f} steps/s for a 4-rank "
              f"job, one step every {4 / budget:.1f} s).")
    else:
        print(f"\n{rank_steps:,} rank-steps ({days:.2f} job-days at 1 step/s), no false alarm.")

    # the persistence knob of loss_spike: 3 steps instead of 2 (a spike is then reported 2 steps after onset)
    from stethoscope.analytics.training import LossSpike

    print("\nThe loss-spike trade-off, same clean runs and the loss-spike runs above (3 sigma, lasting 3 steps), "
          "by `persistence`:\n")
    print("| persistence | recall (3 sigma) | steps to detect (max) | false alarms per million rank-steps |")
    print("|---:|---:|---:|---:|")
    for p in (2, 3):
        fs, labels = [], []
        for seed in range(args.runs):
            run = training_run("loss_spike", seed=1000 + seed, steps=args.steps, job=f"s{seed}", count=5, magnitude=3.0)
            det = LossSpike(persistence=p)
            fs += [f for o in run.observations for f in det.update(o)]
            labels += run.incidents
        k = evaluate(fs, labels, 1.0).kinds["loss_spike"]
        fa = 0
        for seed in range(args.clean_runs):
            run = training_run("clean", seed=5000 + seed, steps=args.clean_steps, job=f"clean{seed}")
            det = LossSpike(persistence=p)
            fa += sum(1 for o in run.observations for f in det.update(o) if f.severity != "info")
        print(f"| {p} | {k.recall:.3f} | {max(k.delays_steps) if k.delays_steps else '-'} | {fa / rank_steps * 1e6:.1f} |")

    print(f"\nThroughput over all runs above (machine shared, so a lower bound): {n_obs / t_total:,.0f} "
          f"observations/s through all {len(DEFAULT_DETECTORS)} detectors. One clean run of 5,000 steps x 4 ranks, "
          "each detector alone:\n")
    run = training_run("clean", seed=1, steps=5000)
    obs = run.observations
    cusum = CUSUM(warmup=50)
    vals = [o["loss"] for o in obs]
    t0 = time.perf_counter()
    for v in vals:
        cusum.update(v)
    peer = len(vals) / (time.perf_counter() - t0)
    print("| detector | observations/s | time per observation, us | x CUSUM update |")
    print("|---|---:|---:|---:|")
    for name in DEFAULT_DETECTORS:
        det = ANOMALY_REGISTRY[name]()
        t0 = time.perf_counter()
        for o in obs:
            det.update(o)
        rate = len(obs) / (time.perf_counter() - t0)
        print(f"| {name} | {rate:,.0f} | {1e6 / rate:.1f} | {peer / rate:.1f} |")
    an = TrainingAnalyzer()
    t0 = time.perf_counter()
    for o in obs:
        an.update(o)
    rate = len(obs) / (time.perf_counter() - t0)
    print(f"| all {len(DEFAULT_DETECTORS)} (TrainingAnalyzer) | {rate:,.0f} | {1e6 / rate:.1f} | {peer / rate:.1f} |")
    print(f"| (peer) sequential CUSUM, one value | {peer:,.0f} | {1e6 / peer:.2f} | 1.0 |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
