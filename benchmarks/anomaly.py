"""Training anomaly detection: the evaluation harness over seeded scenarios, and detector throughput.

``python -m benchmarks.run anomaly`` simulates labelled training runs
(:func:`stethoscope.analytics.scenarios.training_run`: 4 ranks, 1 s nominal steps)
and runs every training and distributed detector over them with default settings,
then prints, per finding kind, recall, precision, time and steps to detect, and
false alarms per day, plus the false alarms on clean runs and the throughput of each
detector (observations per second, one core, a Python loop), against the CUSUM of
:mod:`stethoscope.analytics.sequential` fed the same number of values as a peer.

The loss-spike section runs ``LossSpike`` alone by job size (1 to 32 ranks): recall
of 3-sigma spikes on every rank, steps to detect, alarms on spikes of one rank alone,
and false alarms per job-day on clean runs over ``--spike-job-steps`` job-steps per
size (2,000,000 by default for 4 ranks; see ``SIZES``).
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
    "rank_spike": ("loss_spike", {"count": 5, "magnitude": 3.0}),
    "gradient_explosion": ("gradient_explosion", {"count": 5}),
    "slow_rank": ("straggler_rank", {"magnitude": 0.10}),
    "input_stall": ("input_bound", {}),
    "plateau": ("loss_plateau", {}),
    "hung": ("job_hung", {}),
}


#: Loss-spike section: ranks -> clean job-steps measured (at scale 1.0) and steps per simulated run.
SIZES = {1: (500_000, 10_000), 2: (1_000_000, 10_000), 3: (500_000, 10_000), 4: (2_000_000, 10_000),
         8: (1_000_000, 5_000), 32: (250_000, 2_500)}


def _loss_spike_by_ranks(args) -> None:
    """Recall, delay and false alarms of ``LossSpike`` alone, by the number of ranks of the job."""
    from stethoscope.analytics.training import LossSpike

    def alarms(det, run):
        fs = [f for o in run.observations for f in det.update(o)] + det.flush()
        return [f for f in fs if f.severity != "info"]

    print("\nLoss spikes by job size (`LossSpike` alone, default settings): spikes of 3 sigma of one rank's noise "
          f"lasting 3 steps, {args.runs} runs x {args.steps} steps x 5 spikes per size, on every rank (`loss_spike`) "
          "or on one rank alone (`rank_spike`, no label); clean runs at 1 step/s:\n")
    print("| ranks | recall, 3 sigma on every rank | within one step | steps to detect (median / max) "
          "| alarms on a rank alone (per spike) | clean job-steps | false alarms | per job-day at 1 step/s "
          "| 95% upper bound per day |")
    print("|---:|---:|---:|---|---:|---:|---:|---:|---:|")
    rows = [(r, {}) for r in SIZES] + [(1, {"persistence": 3})]
    for ranks, opts in rows:
        fs, labels, alone, n_alone = [], [], 0, 0
        for seed in range(args.runs):
            run = training_run("loss_spike", seed=1000 + seed, steps=args.steps, world_size=ranks, job=f"s{seed}",
                               count=5, magnitude=3.0)
            fs += alarms(LossSpike(**opts), run)
            labels += run.incidents
            if ranks > 1:
                run = training_run("rank_spike", seed=1000 + seed, steps=args.steps, world_size=ranks,
                                   job=f"r{seed}", count=5, magnitude=3.0)
                alone += len(alarms(LossSpike(**opts), run))
                n_alone += 5
        k = evaluate(fs, labels, 1.0).kinds["loss_spike"]
        total, per_run = SIZES[ranks]
        total = int(total * args.spike_job_steps) if not opts else int(total * args.spike_job_steps) // 2
        fa, done, seed = 0, 0, 0
        while done < total:
            run = training_run("clean", seed=9000 + seed, steps=per_run, world_size=ranks, job=f"c{seed}")
            fa += len(alarms(LossSpike(**opts), run))
            done += per_run
            seed += 1
        days = done / 86400
        upper = _poisson_upper(fa) / days
        steps = f"{_pct(k.delays_steps, 50):.0f} / {max(k.delays_steps)}" if k.delays_steps else "-"
        name = f"{ranks}" + (" (`persistence=3`)" if opts else "")
        quick = sum(1 for d in k.delays_steps if d <= 1) / k.incidents
        print(f"| {name} | {k.recall:.3f} | {quick:.3f} | {steps} | {f'{alone / n_alone:.3f}' if n_alone else '-'} "
              f"| {done:,} "
              f"| {fa} | {fa / days:.2f} | {upper:.2f} |")


def _poisson_upper(k: int) -> float:
    """One-sided 95% upper confidence bound of a Poisson mean after ``k`` events (exact, chi-square)."""
    from scipy.stats import chi2

    return float(chi2.ppf(0.95, 2 * (k + 1)) / 2)


def _pct(values, q):
    return float(np.percentile(values, q)) if len(values) else math.nan


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=10, help="seeded runs per incident kind")
    ap.add_argument("--steps", type=int, default=3000, help="steps per incident run")
    ap.add_argument("--clean-runs", type=int, default=20, help="clean runs")
    ap.add_argument("--clean-steps", type=int, default=10000, help="steps per clean run")
    ap.add_argument("--spike-job-steps", type=float, default=1.0,
                    help="scale of the clean job-steps per job size in the loss-spike section (1.0: see SIZES)")
    ap.add_argument("--only-loss-spike", action="store_true", help="run the loss-spike section alone")
    ap.add_argument("--only-throughput", action="store_true", help="run the throughput table alone")
    args = ap.parse_args(argv)
    if args.only_loss_spike:
        _loss_spike_by_ranks(args)
        return 0
    if args.only_throughput:
        _throughput()
        return 0

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
            findings += an.flush()
            t_total += time.perf_counter() - t0
            n_obs += len(run.observations)
            labels += run.incidents
            dur += run.duration_s
        ev = evaluate(findings, labels, dur)
        k = ev.kinds.get(kind)
        if not labels:  # nothing labelled (a rise on one rank alone): every alarm of the kind is false
            fa = k.false_alarms if k else 0
            other = ", ".join(f"{n}: {s.false_alarms}" for n, s in sorted(ev.kinds.items()) if n != kind
                              and s.false_alarms)
            print(f"| {scen} | {kind} (none expected) | 0 | - | - | - | - | {kind}: {fa}"
                  f"{', ' + other if other else ''} |")
            continue
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
        findings += an.flush()
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

    _loss_spike_by_ranks(args)

    print(f"\nThroughput over all runs above (machine shared, so a lower bound): {n_obs / t_total:,.0f} "
          f"observations/s through all {len(DEFAULT_DETECTORS)} detectors. One clean run of 5,000 steps x 4 ranks, "
          "each detector alone:\n")
    _throughput()
    return 0


def _throughput() -> None:
    """Each detector alone, then all of them, over one clean run, against CUSUM updates as a peer."""
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


if __name__ == "__main__":
    raise SystemExit(main())
