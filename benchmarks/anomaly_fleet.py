"""Fleet, serving and cost anomaly detection on labelled simulated runs: precision, recall, time to
detect, false alarms per day, the memory-leak lead time, and naive threshold rules as the peer.

Every scenario kind of :mod:`stethoscope.analytics.scenarios_fleet` is run with ``--seeds``
seeds (random onset and GPU or replica), the detectors at their default settings
(``detectors_for``), and scored per run with :func:`stethoscope.analytics.scenarios.evaluate`
(cost runs with ``max_delay_s`` 1,800 s: they are judged on 5- and 10-minute buckets).
The peer rules, run on the same observations, are what a dashboard alert would do:
one reading of ``memory.used`` above 95 % of the total; one export interval's p99 above
the SLA; one export interval's error rate above 1 %.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

from stethoscope.analytics import scenarios_fleet as sf
from stethoscope.analytics.scenarios import evaluate
from stethoscope.dashboards.histogram import bucket_quantile

FAMILIES: dict[str, tuple[tuple[str, ...], Callable[..., sf.Scenario]]] = {
    "fleet": (sf.FLEET_KINDS, sf.gpu_fleet_run),
    "serving": (sf.SERVING_KINDS, sf.serving_run),
    "cost": (sf.COST_KINDS, sf.cost_run),
}


def _peer_leak(run: sf.Scenario) -> float | None:
    """Seconds before OOM at which "memory.used > 95 % of total" first fires on the leaking GPU."""
    inc = run.incidents[0]
    for o in run.observations:
        if f"gpu={o['gpu']}" in inc.subject.split() and o["memory.used"] > 0.95 * o["memory.total"]:
            return inc.details["oom_time"] - o["time"]
    return None


def _peer_serving(run: sf.Scenario) -> dict[str, int]:
    """Intervals (per replica) where the single-interval p99 rule or error-rate rule fires outside an incident."""
    out = {"latency_sla": 0, "error_rate": 0}
    spans = {i.kind: (i.onset_time, i.end_time or i.onset_time) for i in run.incidents}
    for o in run.observations:
        lat = o["latency"]
        p99 = bucket_quantile(0.99, lat["counts"], lat["bounds"])
        for kind, fired in (("latency_sla", p99 > 250.0), ("error_rate", o["requests"] and
                                                           o["errors"] / o["requests"] > 0.01)):
            lo, hi = spans.get(kind, (math.inf, -math.inf))
            if fired and not lo <= o["time"] <= hi + 60:
                out[kind] += 1
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=5, help="runs per scenario kind")
    args = p.parse_args(argv)
    rows: dict[str, dict[str, list]] = {}
    lead: list[float] = []
    peer_lead: list[float] = []
    peer_fa: dict[str, int] = {"latency_sla": 0, "error_rate": 0}
    serving_days = 0.0
    for family, (kinds, make) in FAMILIES.items():
        days = 0.0
        n_obs = 0
        t_det = 0.0
        fam_rows: dict[str, list] = {}
        for kind in kinds:
            for seed in range(args.seeds):
                run = make(kind, seed=seed)
                dets = sf.detectors_for(family)
                t = time.process_time()  # CPU time: the machine may be shared
                findings = sf.replay(run, dets)
                t_det += time.process_time() - t
                n_obs += len(run.observations)
                days += run.duration_s / 86400
                ev = evaluate(findings, run.incidents, run.duration_s,
                              max_delay_s=1800.0 if family == "cost" else 600.0)
                for k, s in ev.kinds.items():
                    r = fam_rows.setdefault(k, [0, 0, 0, 0, []])
                    r[0] += s.incidents
                    r[1] += s.detected
                    r[2] += s.true_findings
                    r[3] += s.false_alarms
                    r[4] += list(s.delays_s)
                if kind == "leak":
                    inc = run.incidents[0]
                    warn = [f.time for f in findings if f.kind == "memory_leak_forecast" and f.severity == "warning"]
                    if warn:
                        lead.append(inc.details["oom_time"] - warn[0])
                    pl = _peer_leak(run)
                    if pl is not None:
                        peer_lead.append(pl)
                if family == "serving":
                    for k, v in _peer_serving(run).items():
                        peer_fa[k] += v
        if family == "serving":
            serving_days = days
        rows[family] = {k: [*v, days] for k, v in fam_rows.items()}
        print(f"# {family}: {len(kinds)} kinds x {args.seeds} seeds, {days * 24:.1f} h simulated, "
              f"{n_obs:,} observations, detectors {n_obs / t_det:,.0f} observations per CPU second")
    print("\n| family | kind | incidents | recall | precision | median TTD (s) | max TTD (s) | false alarms/day |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for family, kinds in rows.items():
        for kind, (inc, det, true, false, delays, days) in sorted(kinds.items()):
            recall = f"{det / inc:.2f}" if inc else "-"
            precision = f"{true / (true + false):.2f}" if true + false else "-"
            med = f"{statistics.median(delays):.0f}" if delays else "-"
            mx = f"{max(delays):.0f}" if delays else "-"
            print(f"| {family} | `{kind}` | {inc} | {recall} | {precision} | {med} | {mx} | {false / days:.2f} |")
    if lead:
        print(f"\nmemory leak (10 MB/s): warned {min(lead) / 60:.1f} to {max(lead) / 60:.1f} min before OOM "
              f"(median {statistics.median(lead) / 60:.1f}); peer rule 'used > 95 %' fired "
              f"{statistics.median(peer_lead) / 60:.1f} min before (median), "
              f"{statistics.median(lead) / statistics.median(peer_lead):.1f}x less warning")
    print(f"peer single-interval rules on serving runs, false alarms/day: p99 > SLA "
          f"{peer_fa['latency_sla'] / serving_days:.0f}, error rate > 1 % {peer_fa['error_rate'] / serving_days:.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
