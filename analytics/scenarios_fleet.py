"""Labelled GPU-fleet, serving and cost runs for evaluating the fleet, serving and cost detectors.

The runs reuse :class:`~.scenarios.Incident`, :class:`~.scenarios.Scenario` and
:func:`~.scenarios.evaluate` from the training scenarios.

:func:`gpu_fleet_run` drives the node agent's own simulator
(:class:`~stethoscope.agents.gpu.simulate.SimulatedGpuCollector`, an H100 node running
a training job with checkpoint dips) on a simulated clock and turns each collection
into one observation per GPU, exactly the fields :class:`~.fleet_watch.FleetWatch`
builds from the store. Incidents:

====================  ====================================================================
``clean``             nothing happens
``sawtooth``          clean, with memory allocated and freed in 4-minute cycles on one GPU
``thermal``           cooling fails on one GPU for 10 minutes (the simulator's ThermalThrottle)
``xid``               XID 79 (fallen off the bus) on one GPU
``ecc``               one uncorrectable ECC error on one GPU
``leak``              memory grows ~10 MB/s on one GPU until it is full (MemoryLeak); the
                      label's ``details["oom_time"]`` is when it fills
``underutilized``     one GPU starves for input for 30 minutes (IdleWaitingOnInput)
``busy_not_working``  one GPU reports full utilization while its SMs idle for 10 minutes
====================  ====================================================================

:func:`serving_run` simulates replicas of one model exporting every 10 s (latency
histograms, requests, errors, queue time) with ``clean``, ``latency`` (p99 jumps above
the SLA), ``errors`` (5 % errors), ``queue`` (one replica's queue backs up),
``imbalance`` (one replica takes 2.5 times its share) or ``capacity`` (traffic
surges past 80 % of capacity). :func:`cost_run` simulates a cluster of 8-GPU nodes
for ``clean``, ``fleet_spike`` (the cluster doubles and runs idle: ``cost_spike`` and
``idle_gpu_cost``) and ``prediction_spike`` (traffic falls to a quarter on the same
GPUs: ``cost_spike`` per model).

Examples:
    >>> run = gpu_fleet_run("xid", seed=2, duration_s=1200, gpus=2)
    >>> sorted(i.kind for i in run.incidents), len(run.observations)
    (['gpu_xid', 'node_unhealthy'], 240)
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..agents.gpu.simulate import (
    H100,
    IdleWaitingOnInput,
    MemoryLeak,
    SimulatedGpuCollector,
    ThermalThrottle,
    Xid,
)
from .anomaly import subject
from .findings import Finding
from .scenarios import Incident, Scenario

__all__ = ["COST_KINDS", "FLEET_KINDS", "SERVING_KINDS", "cost_run", "detectors_for", "gpu_fleet_run", "replay",
           "serving_run"]

FLEET_KINDS = ("clean", "sawtooth", "thermal", "xid", "ecc", "leak", "underutilized", "busy_not_working")
SERVING_KINDS = ("clean", "latency", "errors", "queue", "imbalance", "capacity")
COST_KINDS = ("clean", "fleet_spike", "prediction_spike")

T0 = 1.75e9  # an arbitrary epoch second the simulated runs start at
_GAUGES = ("utilization", "sm.activity", "tensor.activity", "memory.used", "memory.total", "temperature",
           "power.draw", "power.limit", "clock.sm")


def gpu_fleet_run(kind: str, *, seed: int = 0, duration_s: float = 7200.0, interval_s: float = 10.0,
                  gpus: int = 8, node: str = "node-0") -> Scenario:
    """One node of ``gpus`` simulated H100s for ``duration_s``, collected every ``interval_s``,
    with at most one incident of ``kind`` (see the module docstring) on a random GPU."""
    if kind not in FLEET_KINDS:
        raise ValueError(f"kind must be one of {FLEET_KINDS}, got {kind!r}")
    rng = np.random.default_rng(seed)
    g = int(rng.integers(gpus))
    onset = float(rng.uniform(0.3, 0.5) * duration_s)
    subj = subject(node=node, gpu=g)
    sim_incidents: list[Any] = []
    labels: list[Incident] = []
    if kind == "thermal":
        sim_incidents.append(ThermalThrottle(gpu=g, start_s=onset, duration_s=600.0))
        labels += [Incident("gpu_temperature", subj, T0 + onset, end_time=T0 + onset + 600),
                   Incident("gpu_throttle", subj, T0 + onset, end_time=T0 + onset + 600)]
    elif kind == "xid":
        sim_incidents.append(Xid(gpu=g, at_s=onset, code=79))
        labels += [Incident("gpu_xid", subj, T0 + onset), Incident("node_unhealthy", subject(node=node), T0 + onset)]
    elif kind == "ecc":
        labels += [Incident("gpu_ecc_uncorrectable", subj, T0 + onset),
                   Incident("node_unhealthy", subject(node=node), T0 + onset)]
    elif kind == "leak":
        rate = 10e6
        sim_incidents.append(MemoryLeak(gpu=g, start_s=onset, bytes_per_s=rate))
        labels.append(Incident("memory_leak_forecast", subj, T0 + onset, details={"bytes_per_s": rate}))
    elif kind == "underutilized":
        sim_incidents.append(IdleWaitingOnInput(gpu=g, start_s=onset, duration_s=1800.0))
        labels.append(Incident("gpu_underutilized", subj, T0 + onset, end_time=T0 + onset + 1800))
    elif kind == "busy_not_working":
        labels.append(Incident("gpu_busy_not_working", subj, T0 + onset, end_time=T0 + onset + 600))
    now = [0.0]
    sim = SimulatedGpuCollector(gpus=gpus, seed=seed, incidents=sim_incidents, clock=lambda: now[0])
    sim._start = 0.0  # the simulated clock starts at 0 (register() would do this with a meter)
    out: list[dict[str, Any]] = []
    full_at: float | None = None
    seen: dict[tuple[int, int], int] = {}
    steps = int(duration_s // interval_s)
    for i in range(1, steps + 1):
        now[0] = t = i * interval_s
        readings = sim._snapshot()
        per: dict[int, dict[str, Any]] = {}
        for name in readings.names():
            for o in readings.get(name):
                a = o.attributes
                idx = int(a["gpu.index"])
                obs = per.setdefault(idx, {"time": T0 + t, "node": node, "gpu": idx, "gpu_model": a["gpu.model"]})
                field = name[4:]
                if field in _GAUGES:
                    obs[field] = float(o.value)
                elif field == "throttle":
                    obs.setdefault("throttle", {})[a["gpu.throttle.reason"]] = int(o.value)
                elif field == "xid.errors":
                    obs.setdefault("_xid", []).append((int(a["gpu.xid"]), int(o.value)))
        for idx, obs in sorted(per.items()):
            xid = obs.pop("_xid", [])
            obs["xid"] = []
            for code, count in xid:  # the simulator's counters are cumulative: report what is new
                obs["xid"] += [code] * (count - seen.get((idx, code), 0))
                seen[(idx, code)] = count
            obs["ecc.uncorrectable"] = 1.0 if kind == "ecc" and idx == g and t - interval_s < onset <= t else 0.0
            if kind == "busy_not_working" and idx == g and onset <= t < onset + 600:
                obs["sm.activity"], obs["tensor.activity"] = 0.04, 0.0
            if kind == "sawtooth" and idx == g:
                obs["memory.used"] = 40e9 + 30e9 * ((t % 240.0) / 240.0)
            full = H100.memory_bytes - 301 * 2**20  # the simulator stops 300 MiB short of the total
            if kind == "leak" and idx == g and full_at is None and obs["memory.used"] >= full:
                full_at = T0 + t
            out.append(obs)
    if kind == "leak":
        oom = full_at if full_at is not None else math.inf  # a warning up to the OOM counts as a hit
        labels[0] = Incident("memory_leak_forecast", subj, T0 + onset, end_time=oom if full_at is not None else None,
                             details={"bytes_per_s": 10e6, "oom_time": oom})
    return Scenario(f"fleet-{kind}-{seed}", out, labels, float(steps * interval_s), interval_s)


def serving_run(kind: str, *, seed: int = 0, duration_s: float = 3600.0, interval_s: float = 10.0,
                replicas: int = 3, rps: float = 40.0, sla_ms: float = 250.0,
                capacity_rps: float = 100.0) -> Scenario:
    """Replicas ``r0``.. of model ``fraud`` version ``3`` exporting every ``interval_s``; at most one
    incident of ``kind`` (see the module docstring) from a random onset for 10 minutes."""
    if kind not in SERVING_KINDS:
        raise ValueError(f"kind must be one of {SERVING_KINDS}, got {kind!r}")
    rng = np.random.default_rng(seed)
    onset = float(rng.uniform(0.3, 0.6) * duration_s)
    end = onset + 600.0
    hot = int(rng.integers(replicas))
    bounds = [5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0]
    model = subject(model="fraud", version="3")
    labels = {
        "latency": [Incident("latency_sla", model, T0 + onset, end_time=T0 + end)],
        "errors": [Incident("error_rate", model, T0 + onset, end_time=T0 + end)],
        "queue": [Incident("queue_time", subject(model="fraud", version="3", replica=f"r{hot}"), T0 + onset,
                           end_time=T0 + end)],
        "imbalance": [Incident("load_imbalance", model, T0 + onset, end_time=T0 + end)],
        "capacity": [Incident("capacity", model, T0 + onset, end_time=T0 + end, also=("latency_sla",))],
    }.get(kind, [])
    out = []
    steps = int(duration_s // interval_s)
    for i in range(1, steps + 1):
        t = i * interval_s
        on = onset <= t < end
        diurnal = 1.0 + 0.2 * math.sin(2 * math.pi * t / 3600.0)  # a gentle swing in traffic
        surge = 2.6 if kind == "capacity" and on else 1.0
        weights = np.ones(replicas)
        if kind == "imbalance" and on:
            weights[hot] = 2.5 * (replicas - 1) / (replicas - 2.5) if replicas > 2.5 else 4.0
        for r in range(replicas):
            lam = rps * diurnal * surge * interval_s * replicas * weights[r] / weights.sum()
            req = int(rng.poisson(lam))
            median = 400.0 if kind == "latency" and on else 30.0
            lat = rng.lognormal(math.log(median), 0.5, size=req)
            counts = np.bincount(np.searchsorted(bounds, lat, side="left"), minlength=len(bounds) + 1)
            p_err = 0.05 if kind == "errors" and on else 0.001
            queue = 300.0 + 50 * rng.random() if kind == "queue" and on and r == hot else 4.0 + 6.0 * rng.random()
            out.append({"time": T0 + t + 0.001 * r, "model": "fraud", "version": "3", "replica": f"r{r}",
                        "node": f"node-{r}", "requests": req, "errors": int(rng.binomial(req, p_err)),
                        "interval_s": interval_s, "queue_ms": queue,
                        "latency": {"bounds": bounds, "counts": counts.tolist()}})
    return Scenario(f"serving-{kind}-{seed}", out, labels, float(steps * interval_s), interval_s)


def cost_run(kind: str, *, seed: int = 0, duration_s: float = 4 * 3600.0, interval_s: float = 60.0,
             nodes: int = 2, rps: float = 200.0) -> Scenario:
    """``nodes`` 8-GPU H100 nodes reporting utilization every ``interval_s`` and one model served
    on the first node; ``kind`` (see the module docstring) from a random onset to the end."""
    if kind not in COST_KINDS:
        raise ValueError(f"kind must be one of {COST_KINDS}, got {kind!r}")
    rng = np.random.default_rng(seed)
    onset = float(rng.uniform(0.5, 0.7) * duration_s)
    labels = {
        "fleet_spike": [Incident("cost_spike", subject(cluster="default"), T0 + onset),
                        Incident("idle_gpu_cost", subject(cluster="default"), T0 + onset)],
        "prediction_spike": [Incident("cost_spike", subject(model="fraud", version="3"), T0 + onset)],
    }.get(kind, [])
    out: list[dict[str, Any]] = []
    steps = int(duration_s // interval_s)
    for i in range(1, steps + 1):
        t = i * interval_s
        on = t >= onset
        n_nodes = 2 * nodes if kind == "fleet_spike" and on else nodes
        for n in range(n_nodes):
            for g in range(8):
                idle = n >= nodes
                util = 0.01 if idle else float(np.clip(0.9 + 0.05 * rng.standard_normal(), 0, 1))
                out.append({"time": T0 + t, "node": f"node-{n}", "gpu": g, "gpu_model": H100.model,
                            "utilization": util})
        r = rps / 4 if kind == "prediction_spike" and on else rps
        out.append({"time": T0 + t + 0.5, "model": "fraud", "version": "3", "replica": "r0", "node": "node-0",
                    "requests": int(rng.poisson(r * interval_s)), "errors": 0, "interval_s": interval_s})
    return Scenario(f"cost-{kind}-{seed}", out, labels, float(steps * interval_s), interval_s)


def detectors_for(family: str) -> list[Any]:
    """Fresh detectors, default settings, for ``"fleet"``, ``"serving"`` or ``"cost"`` runs (the ones
    the watches of the same name run; capacity with 100 rps per replica)."""
    from .cost import FleetCost, PredictionCost
    from .fleet import (
        GpuBusyNotWorking,
        GpuHealth,
        GpuTemperature,
        GpuThrottle,
        GpuUnderutilized,
        MemoryLeakForecast,
    )
    from .serving import Capacity, ErrorRate, LatencySla, LoadImbalance, QueueTime

    if family == "fleet":
        return [GpuTemperature(), GpuThrottle(), GpuHealth(), GpuUnderutilized(), GpuBusyNotWorking(),
                MemoryLeakForecast()]
    if family == "serving":
        return [LatencySla(), ErrorRate(), QueueTime(), LoadImbalance(), Capacity(capacity_rps=100.0)]
    if family == "cost":
        return [FleetCost(), PredictionCost()]
    raise ValueError(f"family must be fleet, serving or cost, got {family!r}")


def replay(scenario: Scenario, detectors: list[Any]) -> list[Finding]:
    """Every finding of ``detectors`` on the scenario's observations, in time order."""
    out: list[Finding] = []
    for obs in scenario.observations:
        for det in detectors:
            out += det.update(obs)
    return out
