"""Labelled training runs for evaluating the anomaly detectors, and the scoring of findings.

:func:`training_run` simulates a data-parallel training job, step by step and rank
by rank, as the observations a :class:`~stethoscope.agents.sdk.training.TrainingMonitor`
exports (``time``, ``job``, ``rank``, ``node``, ``gpu``, ``step``, ``loss``,
``grad_norm``, ``lr``, ``tokens``, ``samples``, ``step_time``, ``data_wait``,
``phases``), with at most one kind of injected incident and its ground truth as
:class:`Incident` labels:

==================  ==========================================================
``clean``           nothing happens (the loss decays towards a floor)
``nan``             NaN loss and gradient norm on one rank for one step
``loss_spike``      the loss of every rank rises ``magnitude`` sigma (default 3;
                    sigma = ``loss_sigma``, one rank's noise) for three steps, then
                    half that for one: what a divergence or a bad batch does to a
                    data-parallel job, whose ranks share their weights
``rank_spike``      the same rise on one rank alone (a bad shard, noise): not a
                    job's loss spike, so it has no label (any ``loss_spike`` alarm
                    is false)
``gradient_explosion``  the gradient norm of one rank grows ``magnitude`` times
``slow_rank``       one rank computes ``magnitude`` (default 0.10) slower from
                    the onset; the others wait for it in ``comm``
``input_stall``     data wait of every rank grows until input dominates
``plateau``         the loss stops improving at the onset
``hung``            one rank stops reporting at the onset
==================  ==========================================================

Step time model: each rank spends ``data`` + ``forward`` + ``backward`` +
``optimizer`` on its own work, then waits in ``comm`` for the slowest rank, so every
rank's ``step_time`` is the same and a slow rank shows only in its own work time.

:func:`evaluate` scores findings against labels (any source: fleet and serving
scenarios reuse :class:`Incident` and :func:`evaluate`): a finding at ``warning`` or
above matches an incident of the same ``kind`` whose subject's ``key=value`` parts
are all in the finding's subject, within ``[onset - early_s, onset + max_delay_s]``.
Findings of a kind in the incident's ``also`` (consequences the incident may cause,
such as ``phase_shift`` during an input stall) are neither hits nor false alarms.
Everything else at ``warning`` or above is a false alarm.

Examples
--------
>>> run = training_run("nan", seed=1, steps=400, world_size=2, rank=1)
>>> [(i.kind, i.subject, i.details["rank"]) for i in run.incidents]
[('training_nan', 'job=job0', 1)]
>>> len(run.observations)
800
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .anomaly import subject
from .findings import SEVERITIES, Finding

__all__ = ["KINDS", "Evaluation", "Incident", "KindScore", "Scenario", "evaluate", "training_run"]

#: Scenario kinds :func:`training_run` generates.
KINDS = ("clean", "nan", "loss_spike", "rank_spike", "gradient_explosion", "slow_rank", "input_stall", "plateau",
         "hung")


@dataclass(frozen=True)
class Incident:
    """Ground truth for one injected incident.

    ``subject`` lists the ``key=value`` parts a matching finding's subject must
    contain (``job=j rank=3`` matches ``job=j rank=3 node=n1 gpu=3``). ``also`` names
    kinds the incident may legitimately cause as well, matched on ``also_subject``
    (default: ``subject``) from ``cause_time`` (when the injected cause began; default
    ``onset_time``) to the end of the window; they count neither way.
    """

    kind: str
    subject: str
    onset_time: float
    onset_step: int | None = None
    end_time: float | None = None
    also: tuple[str, ...] = ()
    also_subject: str | None = None
    cause_time: float | None = None
    details: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Scenario:
    """One simulated run: observations in time order, its incidents, its length in seconds."""

    name: str
    observations: list[dict[str, Any]]
    incidents: list[Incident]
    duration_s: float
    step_time_s: float


@dataclass(frozen=True)
class KindScore:
    """Scores of one finding kind. Delays are from onset to the first matching finding."""

    kind: str
    incidents: int
    detected: int
    true_findings: int
    false_alarms: int
    delays_s: tuple[float, ...]
    delays_steps: tuple[int, ...]
    false_alarms_per_day: float

    @property
    def recall(self) -> float:
        return self.detected / self.incidents if self.incidents else math.nan

    @property
    def precision(self) -> float:
        n = self.true_findings + self.false_alarms
        return self.true_findings / n if n else math.nan


@dataclass(frozen=True)
class Evaluation:
    """Scores per finding kind, plus totals over every kind."""

    kinds: dict[str, KindScore]
    duration_s: float

    @property
    def false_alarms(self) -> int:
        return sum(k.false_alarms for k in self.kinds.values())

    @property
    def false_alarms_per_day(self) -> float:
        return self.false_alarms / (self.duration_s / 86400.0) if self.duration_s > 0 else math.nan


# --- scoring ------------------------------------------------------------------------------


def _parts(s: str) -> frozenset[str]:
    return frozenset(s.split())


def _alarm(f: Finding) -> bool:
    return SEVERITIES.index(f.severity) >= SEVERITIES.index("warning")


def evaluate(findings: Iterable[Finding], labels: Sequence[Incident], duration_s: float, *,
             max_delay_s: float = 600.0, early_s: float = 0.0) -> Evaluation:
    """Precision, recall, time to detect and false alarms per day, by finding kind.

    ``duration_s`` is the monitored time the findings come from (the sum over runs),
    used for false alarms per day. Info findings are not alarms and are ignored.

    >>> inc = Incident("training_nan", "job=a rank=1", onset_time=100.0, onset_step=10)
    >>> hit = Finding(time=100.0, kind="training_nan", subject="job=a rank=1 node=n gpu=1", severity="critical",
    ...               details={"detected_step": 10})
    >>> miss = Finding(time=500.0, kind="loss_spike", subject="job=a rank=0", severity="warning")
    >>> ev = evaluate([hit, miss], [inc], duration_s=86400.0)
    >>> ev.kinds["training_nan"].recall, ev.kinds["training_nan"].delays_steps, ev.kinds["loss_spike"].false_alarms
    (1.0, (0,), 1)
    """
    alarms = sorted((f for f in findings if _alarm(f)), key=lambda f: f.time)
    first: dict[int, Finding] = {}
    stats: dict[str, dict[str, int]] = {}

    def bump(kind: str, key: str) -> None:
        stats.setdefault(kind, {"true": 0, "false": 0})[key] += 1

    label_parts = [(_parts(i.subject), _parts(i.also_subject if i.also_subject is not None else i.subject))
                   for i in labels]
    for f in alarms:
        fp = _parts(f.subject)
        # the nearest incident of this kind and subject whose onset is not after the finding (+ early_s)
        best = None
        for n, inc in enumerate(labels):
            hi = (inc.end_time if inc.end_time is not None else inc.onset_time) + max_delay_s
            if (f.kind == inc.kind and label_parts[n][0] <= fp and inc.onset_time - early_s <= f.time <= hi
                    and (best is None or inc.onset_time > labels[best].onset_time)):
                best = n
        if best is not None:
            first.setdefault(best, f)
            bump(f.kind, "true")
            continue
        excused = any(
            f.kind in inc.also and label_parts[n][1] <= fp
            and (inc.cause_time if inc.cause_time is not None else inc.onset_time) - early_s <= f.time
            <= (inc.end_time if inc.end_time is not None else inc.onset_time) + max_delay_s
            for n, inc in enumerate(labels))
        if not excused:
            bump(f.kind, "false")
    kinds = sorted({i.kind for i in labels} | set(stats))
    days = duration_s / 86400.0 if duration_s > 0 else math.nan
    out: dict[str, KindScore] = {}
    for kind in kinds:
        idx = [n for n, i in enumerate(labels) if i.kind == kind]
        hit = [n for n in idx if n in first]
        delays = tuple(max(0.0, first[n].time - labels[n].onset_time) for n in hit)
        steps = tuple(int(first[n].details["detected_step"]) - int(labels[n].onset_step) for n in hit
                      if labels[n].onset_step is not None and isinstance(first[n].details.get("detected_step"), int))
        s = stats.get(kind, {"true": 0, "false": 0})
        out[kind] = KindScore(kind, len(idx), len(hit), s["true"], s["false"], delays, steps,
                              s["false"] / days if not math.isnan(days) else math.nan)
    return Evaluation(out, float(duration_s))


# --- simulation ---------------------------------------------------------------------------


def _incident_steps(rng: np.random.Generator, steps: int, count: int, warmup: int, gap: int) -> list[int]:
    """``count`` onset steps after ``warmup``, at least ``gap`` apart."""
    span = steps - warmup - gap
    if count <= 0 or span <= 0:
        return []
    slots = max(1, span // gap)
    count = min(count, slots)
    chosen = sorted(rng.choice(slots, size=count, replace=False))
    return [warmup + int(c) * gap + int(rng.integers(0, max(1, gap // 2))) for c in chosen]


def training_run(
    kind: str = "clean",
    *,
    seed: int = 0,
    job: str = "job0",
    world_size: int = 4,
    steps: int = 2000,
    step_time_s: float = 1.0,
    start_time: float = 1.7e9,
    onset: int | None = None,
    magnitude: float | None = None,
    rank: int | None = None,
    count: int = 1,
    loss_sigma: float = 0.02,
    time_noise: float = 0.02,
    warmup: int = 300,
) -> Scenario:
    """Simulate one job of ``world_size`` ranks for ``steps`` steps with one kind of incident.

    ``onset`` is the incident's first step (default: random after ``warmup``);
    ``count`` > 1 injects several ``nan``/``loss_spike``/``rank_spike``/``gradient_explosion``
    incidents at random steps (``onset`` then ignored). ``magnitude``: sigma of a
    loss spike (3), added to each rank's noisy loss, growth of the gradient norm (5), slowdown of a slow rank
    (0.10), data-wait share reached by an input stall (0.75). ``step_time_s`` is the
    nominal step time; ``time_noise`` the relative noise of each phase.
    """
    if kind not in KINDS:
        raise ValueError(f"kind: must be one of {KINDS}, got {kind!r}")
    if world_size < 1 or steps < 10:
        raise ValueError("world_size must be >= 1 and steps >= 10")
    rng = np.random.default_rng(seed)
    W, S = world_size, steps
    victim = int(rng.integers(0, W)) if rank is None else int(rank)
    nodes = [f"node{r // 8}" for r in range(W)]
    gpus = [str(r % 8) for r in range(W)]
    subj = [subject(job=job, rank=r, node=nodes[r], gpu=gpus[r]) for r in range(W)]
    warm = min(warmup, S // 3)
    if kind in ("nan", "loss_spike", "rank_spike", "gradient_explosion") and count > 1:
        onsets = _incident_steps(rng, S, count, warm, gap=max(50, (S - warm) // (2 * count)))
    else:
        onsets = [int(onset) if onset is not None else int(rng.integers(warm, max(warm + 1, S - S // 4)))]
    onsets = [o for o in onsets if 0 <= o < S]
    first = onsets[0] if onsets else S

    # per-step, per-rank values
    s_idx = np.arange(S, dtype=np.float64)
    trend = 2.0 + 3.0 * np.exp(-s_idx / 1500.0)
    if kind == "plateau":
        trend = np.where(s_idx >= first, trend[min(first, S - 1)], trend)
    loss = trend[:, None] + rng.normal(0.0, loss_sigma, (S, W))
    grad = 1.0 * np.exp(rng.normal(0.0, 0.1, (S, W))) * (1.0 + 0.5 * np.exp(-s_idx / 500.0))[:, None]
    base = {"data": 0.03, "forward": 0.30, "backward": 0.55, "optimizer": 0.05}
    scale = step_time_s / (sum(base.values()) + 0.07)
    ph = {p: v * scale * np.exp(rng.normal(0.0, time_noise, (S, W))) for p, v in base.items()}
    comm_base = 0.07 * scale * np.exp(rng.normal(0.0, time_noise, (S, W)))
    nan_mask = np.zeros((S, W), dtype=bool)
    m = magnitude
    incidents: list[Incident] = []
    end_step = S

    def t_at(step: int) -> float:  # filled in once times are known
        return float(times[step])

    if kind == "nan":
        for o in onsets:
            nan_mask[o, victim] = True
    elif kind in ("loss_spike", "rank_spike"):
        k = 3.0 if m is None else float(m)
        who = slice(None) if kind == "loss_spike" else victim
        for o in onsets:
            for j, f in enumerate((1.0, 1.0, 1.0, 0.5)):
                if o + j < S:
                    loss[o + j, who] += k * loss_sigma * f
    elif kind == "gradient_explosion":
        g = 5.0 if m is None else float(m)
        for o in onsets:
            for j in range(3):
                if o + j < S:
                    grad[o + j, victim] *= g * (1.0 + 0.5 * j)
    elif kind == "slow_rank":
        x = 0.10 if m is None else float(m)
        for p in ("forward", "backward", "optimizer"):
            ph[p][first:, victim] *= 1.0 + x
    elif kind == "input_stall":
        target = 0.75 if m is None else float(m)
        ramp = 100
        other = sum(ph[p] for p in ("forward", "backward", "optimizer")) + comm_base
        share = np.clip((s_idx - first) / ramp, 0.0, 1.0) * (target - 0.03) + 0.03
        want = share[:, None] * other / (1.0 - share[:, None])
        ph["data"] = np.where(s_idx[:, None] >= first, np.maximum(ph["data"], want), ph["data"])
    elif kind == "hung":
        end_step = first

    work = ph["data"] + ph["forward"] + ph["backward"] + ph["optimizer"]
    barrier = work.max(axis=1, keepdims=True)
    comm = comm_base + (barrier - work)
    step_time = work + comm
    times = start_time + np.cumsum(step_time.max(axis=1))
    tokens = 8 * 4096.0

    obs: list[dict[str, Any]] = []
    for s in range(S):
        t = float(times[s])
        for r in range(W):
            if kind == "hung" and r == victim and s >= end_step:
                continue
            lv, gv = float(loss[s, r]), float(grad[s, r])
            if nan_mask[s, r]:
                lv = gv = math.nan
            obs.append({
                "time": t, "job": job, "rank": r, "world_size": W, "node": nodes[r], "gpu": gpus[r], "step": s,
                "loss": lv, "grad_norm": gv, "lr": 3e-4, "tokens": tokens, "samples": 8.0,
                "step_time": float(step_time[s, r]), "data_wait": float(ph["data"][s, r]),
                "phases": {"data": float(ph["data"][s, r]), "forward": float(ph["forward"][s, r]),
                           "backward": float(ph["backward"][s, r]), "optimizer": float(ph["optimizer"][s, r]),
                           "comm": float(comm[s, r])},
            })
    job_subj = subject(job=job)
    if kind == "nan":
        # labelled with the job: TrainingAnalyzer reports these once per job, naming the rank in details
        incidents = [Incident("training_nan", job_subj, t_at(o), o, details={"rank": victim}) for o in onsets]
    elif kind == "loss_spike":
        incidents = [Incident("loss_spike", job_subj, t_at(o), o, details={"sigma": 3.0 if m is None else m})
                     for o in onsets]
    elif kind == "gradient_explosion":
        incidents = [Incident("gradient_explosion", job_subj, t_at(o), o, also=("loss_spike",),
                              details={"rank": victim}) for o in onsets]
    elif kind == "slow_rank":
        incidents = [Incident("straggler_rank", subj[victim], t_at(first), first,
                              also=("throughput_regression", "phase_shift"), also_subject=job_subj,
                              details={"slowdown": 0.10 if m is None else m})]
    elif kind == "input_stall":
        shares = ph["data"].mean(axis=1) / step_time.mean(axis=1)
        cross = int(np.argmax(shares > 0.5)) if (shares > 0.5).any() else first
        incidents = [Incident("input_bound", job_subj, t_at(cross), cross,
                              also=("phase_shift", "throughput_regression", "straggler_rank"),
                              cause_time=t_at(first))]
    elif kind == "plateau":
        incidents = [Incident("loss_plateau", job_subj, t_at(first), first, cause_time=t_at(first))]
    elif kind == "hung":
        incidents = [Incident("job_hung", subj[victim], t_at(first), first)]
    duration = float(times[-1] - start_time + step_time[0].max())
    return Scenario(kind, obs, incidents, duration, float(step_time_s))
