"""Training-health detectors: one training step of one rank at a time, state per ``(job, rank)``.

Each detector takes the step observations of every rank of every job (fields in
:mod:`.anomaly`) and keeps its state per ``(job, rank)`` (``loss_spike``: per job, on
the job's mean loss per step); it reports an incident once when it starts and not
again until it has ended.

========================  =========  =====================================================
name (= finding kind)     severity   method
========================  =========  =====================================================
``training_nan``          critical   NaN or infinity in ``loss`` or ``grad_norm``, or a
                                     ``nonfinite`` count above zero: at that step
``loss_spike``            warning    z of the job's mean loss per step (ranks aligned by
                                     step) against a trend-following EMA (Holt): at once
                                     at z >= 5, or two steps whose z sum to 5 x
                                     sqrt(2), and not carried by one rank alone; a job
                                     of one rank: z >= ``z`` (2.6) on ``persistence`` (2)
                                     steps in a row, or at once at ``z_immediate`` (6);
                                     any job: a loss ``max_ratio`` (10) x the highest seen
``gradient_explosion``    warning    z of ``grad_norm`` against its EMA >= ``z`` (2.5) and
                                     at least ``min_ratio`` (2) times the EMA
``loss_plateau``          warning    the loss slope over the last ``window`` steps fell to
                                     under ``stall_ratio`` of the previous window's, which
                                     was clearly negative (info: no significant progress)
``throughput_regression`` warning    mean tokens/s (else samples/s, else steps/s) over
                                     ``window`` steps ``min_drop`` (15%) below the best
                                     sustained mean of the run
``input_bound``           warning    mean ``data_wait / step_time`` over ``window`` steps
                                     above ``threshold`` (0.5); details give the phases
``phase_shift``           warning    total variation distance between the phase shares of
                                     the last ``window`` steps and the run's baseline
                                     >= ``threshold`` (0.15)
========================  =========  =====================================================

``input_bound``, ``throughput_regression``, ``loss_plateau`` and ``phase_shift`` are
symptoms of the whole job: each reports once per job while any of its ranks is in the
incident, naming the first rank that showed it.

Examples
--------
>>> det = TrainingNaN()
>>> obs = {"time": 10.0, "job": "llm", "rank": 1, "node": "n1", "gpu": 1, "step": 7, "loss": float("nan")}
>>> [(f.kind, f.subject, f.severity, f.details["step"]) for f in det.update(obs)]
[('training_nan', 'job=llm rank=1 node=n1 gpu=1', 'critical', 7)]
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from numbers import Real
from typing import Any

import numpy as np

from ..errors import ConfigError
from .anomaly import Observation, register_anomaly, subject
from .findings import Finding

__all__ = [
    "TRAINING_DETECTORS",
    "Context",
    "GradientExplosion",
    "InputBound",
    "LossPlateau",
    "LossSpike",
    "PhaseShift",
    "ThroughputRegression",
    "TrainingNaN",
    "context",
    "number",
]

#: Names of the detectors in this module, in the order a training analysis runs them.
TRAINING_DETECTORS = ("training_nan", "loss_spike", "gradient_explosion", "loss_plateau", "throughput_regression",
                      "input_bound", "phase_shift")

#: Phases that are waiting for other ranks, not a rank's own work.
SYNC_PHASES = ("comm", "allreduce", "all_reduce", "sync", "barrier", "wait")


def number(obs: Mapping[str, Any], name: str) -> float | None:
    """The field as a float (possibly NaN or infinite), or None when absent or not a number."""
    v = obs.get(name)
    if isinstance(v, bool) or not isinstance(v, (Real, np.number)):
        return None
    return float(v)


def _finite(obs: Mapping[str, Any], name: str) -> float | None:
    v = number(obs, name)
    return v if v is not None and math.isfinite(v) else None


@dataclass(frozen=True)
class Context:
    """Who and when an observation is: its time, job, rank, node, GPU and step."""

    time: float
    job: str
    rank: int | None
    node: str
    gpu: str
    step: int | None

    @property
    def key(self) -> tuple[str, int | None]:
        return (self.job, self.rank)

    @property
    def subject(self) -> str:
        return subject(job=self.job, rank=self.rank, node=self.node, gpu=self.gpu)


def _int(v: Any) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)) and math.isfinite(v) and float(v).is_integer():
        return int(v)
    if isinstance(v, str) and v.strip().lstrip("-").isdigit():
        return int(v)
    return None


def context(obs: Any) -> Context | None:
    """The observation's :class:`Context`, or None when it is not a mapping with a finite ``time``."""
    if not isinstance(obs, Mapping):
        return None
    t = number(obs, "time")
    if t is None or not math.isfinite(t):
        return None
    job, node, gpu = obs.get("job"), obs.get("node"), obs.get("gpu")
    return Context(t, "" if job is None else str(job), _int(obs.get("rank")),
                   "" if node is None else str(node), "" if gpu is None else str(gpu), _int(obs.get("step")))


def _check(problems: list[str]) -> None:
    if problems:
        raise ConfigError(problems)


def _positive(problems: list[str], **values: float) -> None:
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
            problems.append(f"{name}: must be a finite number > 0, got {v!r}")


def _count(problems: list[str], **values: int) -> None:
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            problems.append(f"{name}: must be an integer >= 1, got {v!r}")


class _PerRank(ABC):
    """Shared bookkeeping: context parsing, per-(job, rank) state, ignored counts, findings."""

    name = ""
    kinds: tuple[str, ...] = ()
    method = ""
    job_level = False

    def __init__(self) -> None:
        self.n_ignored = 0
        self._state: dict[tuple[str, int | None], Any] = {}
        self._active: dict[str, set[int | None]] = {}

    def reset(self) -> None:
        self.n_ignored = 0
        self._state = {}
        self._active = {}

    def update(self, obs: Observation) -> Sequence[Finding]:
        c = context(obs)
        if c is None:
            self.n_ignored += 1
            return []
        try:
            return self._update(c, obs)
        except (TypeError, ValueError, ArithmeticError, AttributeError):  # odd field types: ignore the step
            self.n_ignored += 1
            return []

    @abstractmethod
    def _update(self, c: Context, obs: Mapping[str, Any]) -> list[Finding]:
        """The findings of one valid observation (the subclass's rule)."""

    # job-level incidents: report once per job while any rank is in one
    def _begin(self, c: Context) -> bool:
        """Mark ``c``'s rank in an incident; True when the finding should be reported."""
        if not self.job_level:
            return True
        ranks = self._active.setdefault(c.job, set())
        first = not ranks
        ranks.add(c.rank)
        return first

    def _end(self, c: Context) -> None:
        if self.job_level:
            self._active.get(c.job, set()).discard(c.rank)

    def _finding(self, c: Context, *, severity: str, statistic: float, threshold: float, effect: float = math.nan,
                 onset: tuple[int | None, float] | None = None, method: str | None = None,
                 details: Mapping[str, Any] | None = None, kind: str | None = None) -> Finding:
        step, t0 = onset if onset is not None else (c.step, c.time)
        d = {"job": c.job, "rank": c.rank, "node": c.node, "gpu": c.gpu, "step": step, "onset_time": t0,
             "detected_step": c.step, **(details or {})}
        return Finding(time=c.time, kind=kind or self.kinds[0], subject=c.subject, method=method or self.method,
                       statistic=float(statistic), threshold=float(threshold), effect=float(effect),
                       severity=severity, drifted=severity != "info", window_start=float(t0), window_end=c.time,
                       details=d)

    @classmethod
    def conformance_inputs(cls, rng: np.random.Generator, incident: bool) -> list[dict[str, Any]]:
        from .scenarios import training_run

        kind = _CONFORMANCE[cls.name] if incident else "clean"
        seed = int(rng.integers(0, 2**31))
        return training_run(kind, seed=seed, world_size=2, steps=900, onset=600, warmup=300).observations


_CONFORMANCE = {"training_nan": "nan", "loss_spike": "loss_spike", "gradient_explosion": "gradient_explosion",
                "loss_plateau": "plateau", "throughput_regression": "input_stall", "input_bound": "input_stall",
                "phase_shift": "input_stall", "straggler_rank": "slow_rank", "job_hung": "hung"}


@register_anomaly("training_nan")
class TrainingNaN(_PerRank):
    """NaN or infinity in ``loss`` or ``grad_norm``, or a ``nonfinite`` count (mapping value -> count,
    or a number) above zero: one ``critical`` finding at that step; consecutive bad steps of a rank
    are one incident."""

    name = "training_nan"
    kinds = ("training_nan",)
    method = "nonfinite"

    def _update(self, c: Context, obs: Mapping[str, Any]) -> list[Finding]:
        bad: list[str] = []
        seen = False
        for field in ("loss", "grad_norm"):
            v = number(obs, field)
            if v is not None:
                seen = True
                if not math.isfinite(v):
                    bad.append(field)
        nf = obs.get("nonfinite")
        if isinstance(nf, Mapping):
            for k, v in nf.items():
                if isinstance(v, (Real, np.number)) and not isinstance(v, bool) and v > 0:
                    bad.append(str(k))
                    seen = True
        elif isinstance(nf, (Real, np.number)) and not isinstance(nf, bool) and nf > 0:
            bad.append("nonfinite")
            seen = True
        if not seen:
            self.n_ignored += 1
            return []
        st = self._state.setdefault(c.key, {"in": False})
        if not bad:
            st["in"] = False
            return []
        if st["in"]:
            return []
        st["in"] = True
        return [self._finding(c, severity="critical", statistic=float(len(bad)), threshold=0.0,
                              details={"values": sorted(set(bad))})]


class _Holt:
    """Level + trend smoothing with an EMA of squared one-step-ahead errors, initialised by a line fit."""

    __slots__ = ("level", "n", "nvar", "trend", "var", "warm")

    def __init__(self) -> None:
        self.warm: list[float] = []
        self.level = self.trend = self.var = 0.0
        self.n = self.nvar = 0

    def start(self) -> None:
        y = np.asarray(self.warm)
        x = np.arange(len(y), dtype=np.float64)
        slope, icpt = np.polyfit(x, y, 1)
        resid = y - (icpt + slope * x)
        self.level, self.trend = float(icpt + slope * x[-1]), float(slope)
        self.var = float(resid.var(ddof=2)) if len(y) > 2 else 0.0
        self.nvar = len(y)
        self.warm = []


_SQRT2 = math.sqrt(2.0)


@dataclass(frozen=True)
class _Rules:
    """When outlying steps of a series are a spike: ``persistence`` in a row, one at
    ``z_immediate``, or two in a row each at least ``z_floor`` whose z sum to ``z_pair * sqrt(2)``."""

    persistence: int
    z_immediate: float
    z_pair: float = math.inf
    z_floor: float = math.inf


@dataclass(frozen=True)
class _Verdict:
    rule: str
    onset: tuple[int | None, float]
    steps_above: int


class _Series:
    """One loss series (a job's mean loss, step by step): its Holt model and spike bookkeeping."""

    __slots__ = ("above", "highest", "in_", "m", "prev", "quiet", "recent", "res", "run", "xs")

    def __init__(self, bias_window: int) -> None:
        self.m = _Holt()
        self.highest = -math.inf
        self.run: list[tuple[int | None, float, float]] = []
        self.in_ = False
        self.quiet = self.above = 0
        self.recent: deque[float] = deque(maxlen=5)
        self.res = _Rolling(bias_window)
        self.xs: deque[float] = deque(maxlen=bias_window)
        self.prev: tuple[int | None, float, float] | None = None


class _Job:
    """Step alignment of one job: losses per pending step and rank, the ranks seen, the series."""

    __slots__ = ("done", "first", "n_max", "n_w", "newest", "outliers", "pending", "ranks", "series", "silent",
                 "skipped", "var_w", "world")

    def __init__(self, bias_window: int) -> None:
        self.pending: dict[int, dict[int | None, tuple[float, Context]]] = {}
        self.first: dict[int, float] = {}  # pending step -> time it was first seen
        self.skipped: dict[int, set[int | None]] = {}  # pending step -> ranks that went past it without it
        self.ranks: dict[int | None, int] = {}  # rank -> highest step it reported
        self.silent: set[int | None] = set()  # ranks not waited for (missing from a step evaluated at its grace)
        self.done: int | None = None  # the last step evaluated
        self.newest = -math.inf
        self.n_max = 0
        self.var_w, self.n_w = 0.0, 0  # variance of the losses across ranks within a step
        self.outliers: set[int | None] = set()
        self.series = _Series(bias_window)
        self.world = 0  # ranks the job says it has (``world_size``), trusted until a step runs out of grace


@register_anomaly("loss_spike")
class LossSpike(_PerRank):
    """Loss spikes of a job, judged on its mean loss per step; one finding per job and spike.

    In data-parallel training every rank holds the same weights, so a real spike (a
    divergence, a learning-rate mistake, a bad batch everyone trains on) lifts the
    loss of every rank at the same step, while the noise of each rank's batch is its
    own. The detector therefore collects the losses of a job by step and judges the
    mean over the ranks that reported it: its noise falls with the square root of the
    rank count and a common spike does not, so a spike of 3 sigma of one rank's noise
    is 6 sigma of the mean on 4 ranks.

    **Step alignment.** A step is judged when every rank of the job (those seen, or
    ``world_size`` when the observations give it) has reported it or gone past it (a
    rank that skips a step, for example when the SDK thins steps, is not waited for).
    A late rank holds a step at most ``grace_s`` (60 s, by the observations' times, or
    by the wall clock given to :meth:`tick`); a step judged
    at its grace without a rank marks that rank silent, and it is not waited for until
    it reports again. At most ``max_pending`` (256) steps per job wait; beyond that the
    oldest is judged. A loss of a step already judged is dropped and counted in
    :attr:`n_late`; a rank that goes back many steps at a newer time (a restart from a
    checkpoint) starts the job's series afresh. :meth:`flush` judges whatever waits
    (the end of a file). Observations without a ``step`` are ignored (counted).

    **The series.** The expected mean loss is Holt's level + trend (smoothing ``alpha``,
    ``beta``), fitted by a straight line to the first ``warmup`` steps; sigma is the
    root of the mean squared prediction error (a running mean, then an EMA with weight
    ``var_alpha``), raised for a step that fewer ranks reported than usual by the
    spread of the losses across ranks. A step with z >= ``z`` (2.6) is outlying; it is
    a candidate when its mean loss is also ``z_jump`` (1.5) sigma above the median of
    the last five ordinary steps (a slow bend of the curve, which the trend follows
    late, is not a spike). The first ``persistence + 1`` outlying steps in a row leave
    the baseline alone; later ones move it only as far as the threshold (a clipped,
    Huber-like update). A mean error above ``bias`` (0.6) sigma over ``bias_window``
    (50) ordinary steps refits level and trend (the curve bent: a plateau, a schedule
    change); ``rebase_after`` (100) outlying steps in a row restart the warmup.

    **When a candidate is a spike.** For a job of several ranks: z >= ``job_z_immediate``
    (5) at once; or two steps in a row, each at least ``job_z_floor`` (2) sigma, whose
    z add up to ``job_z_pair`` (5) x sqrt(2), reported on the second (one step after
    the onset); or ``job_persistence`` (3) candidates in a row; or a mean ``max_ratio``
    (10) times the highest seen; and, with three ranks or more, the mean of the other
    ranks without the one that rose most must be ``job_z_rest`` (1.5) sigma up as well
    (agreement: one rank alone is not the job). On simulated Gaussian noise these fire
    about once in 500,000 to 1,000,000 steps (docs/benchmarks.md). A job of one rank
    has nothing to pool and keeps the rules of a single series: ``persistence`` (2)
    candidates in a row, or z >= ``z_immediate`` (6), or ``max_ratio``; for one rank the
    two targets (3-sigma spikes within one step, few false alarms a day) conflict, and
    docs/anomaly-detectors.md gives the measured trade-off.

    The finding's subject is the job; ``details`` name the rank whose loss rose most at
    the step judged (``rank``, ``node``, ``gpu`` and ``first_rank``, ``first_node``,
    ``first_gpu``, ``first_rank_subject``), how many ranks reported (``ranks``) and how
    many of them were 3 sigma above the expected loss on their own (``ranks_above``).
    A rank whose loss alone stands ``rank_z`` (6) sigma of the spread across ranks
    above the mean of the others, while the job's mean shows no spike, is reported at
    ``info`` (method ``rank_outlier``, the rank as subject): a bad shard or a faulty
    device on one rank, worth a look, not a page.

    Examples
    --------
    >>> det = LossSpike()
    >>> found = []
    >>> for step in range(200):
    ...     for rank in range(4):
    ...         noise = ((step * 7 + rank * 13) % 11 - 5) * 0.004
    ...         loss = 3.0 - 0.001 * step + noise + (0.5 if step in (150, 151) else 0.0)
    ...         found += det.update({"time": 100.0 + step, "job": "llm", "rank": rank, "node": "n0", "gpu": rank,
    ...                              "step": step, "loss": loss})
    >>> [(f.subject, f.details["step"], f.details["detected_step"], f.details["ranks"]) for f in found]
    [('job=llm', 150, 150, 4)]
    """

    name = "loss_spike"
    kinds = ("loss_spike",)
    method = "holt_z"

    def __init__(self, *, z: float = 2.6, persistence: int = 2, z_immediate: float = 6.0, max_ratio: float = 10.0,
                 warmup: int = 50, alpha: float = 0.03, beta: float = 0.02, var_alpha: float = 0.001,
                 rebase_after: int = 100, z_jump: float = 1.5, bias_window: int = 50, bias: float = 0.6,
                 job_z_immediate: float = 5.0, job_z_pair: float = 5.0, job_z_floor: float = 2.0,
                 job_persistence: int = 3, job_z_rest: float = 1.5, rank_z: float = 6.0, grace_s: float = 60.0,
                 max_pending: int = 256) -> None:
        problems: list[str] = []
        _positive(problems, z=z, z_jump=z_jump, z_immediate=z_immediate, max_ratio=max_ratio, alpha=alpha, beta=beta,
                  var_alpha=var_alpha, job_z_immediate=job_z_immediate, job_z_pair=job_z_pair,
                  job_z_floor=job_z_floor, job_z_rest=job_z_rest, rank_z=rank_z, grace_s=grace_s)
        _count(problems, persistence=persistence, rebase_after=rebase_after, job_persistence=job_persistence,
               max_pending=max_pending)
        if isinstance(bias_window, bool) or not isinstance(bias_window, int) or bias_window < 5:
            problems.append(f"bias_window: must be an integer >= 5, got {bias_window!r}")
        _positive(problems, bias=bias)
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 5:
            problems.append(f"warmup: must be an integer >= 5, got {warmup!r}")
        for name, v in (("alpha", alpha), ("beta", beta), ("var_alpha", var_alpha)):
            if isinstance(v, (int, float)) and not v < 1:
                problems.append(f"{name}: must be < 1")
        _check(problems)
        super().__init__()
        self.z, self.persistence, self.z_immediate, self.max_ratio = float(z), persistence, float(z_immediate), float(max_ratio)
        self.warmup, self.alpha, self.beta, self.var_alpha, self.rebase_after = warmup, alpha, beta, var_alpha, rebase_after
        self.z_jump, self.bias_window, self.bias = float(z_jump), bias_window, float(bias)
        self.rank_z, self.grace_s, self.max_pending = float(rank_z), float(grace_s), max_pending
        self.job_z_rest = float(job_z_rest)
        self._single = _Rules(persistence, float(z_immediate))
        self._pooled = _Rules(job_persistence, float(job_z_immediate), float(job_z_pair), float(job_z_floor))
        self._jobs: dict[str, _Job] = {}
        #: Losses dropped because their step had already been judged.
        self.n_late = 0

    def reset(self) -> None:
        super().reset()
        self._jobs = {}
        self.n_late = 0

    @property
    def pending(self) -> int:
        """Steps waiting for a rank, over every job (at most ``max_pending + 1`` per job)."""
        return sum(len(j.pending) for j in self._jobs.values())

    # --- step alignment -------------------------------------------------------------

    def _update(self, c: Context, obs: Mapping[str, Any]) -> list[Finding]:
        x = _finite(obs, "loss")
        if x is None or c.step is None:
            self.n_ignored += 1
            return []
        job = self._jobs.get(c.job)
        if job is None:
            job = self._jobs[c.job] = _Job(self.bias_window)
        if job.done is not None and c.step <= job.done:
            if c.step < job.done - 1 and c.time > job.newest:  # went back at a newer time: a restart
                old, job = job, _Job(self.bias_window)
                job.ranks = {r: c.step - 1 for r in old.ranks}
                job.world = old.world
                self._jobs[c.job] = job
            else:
                self.n_late += 1
                job.ranks.setdefault(c.rank, c.step)  # known from now on, waited for from the next step
                job.silent.discard(c.rank)
                return []
        top = job.ranks.get(c.rank)
        if top is None or c.step > top:
            low = -math.inf if top is None else top
            for s, slot in job.pending.items():  # pending steps this rank went past without reporting
                if low < s < c.step and c.rank not in slot:
                    job.skipped.setdefault(s, set()).add(c.rank)
        job.ranks[c.rank] = c.step if top is None else max(top, c.step)
        job.silent.discard(c.rank)
        job.newest = max(job.newest, c.time)
        world = obs.get("world_size")
        if job.world >= 0 and isinstance(world, int) and not isinstance(world, bool) and 0 < world <= 1 << 20:
            job.world = max(job.world, world)
        slot = job.pending.get(c.step)
        if slot is None:
            slot = job.pending[c.step] = {}
            job.first[c.step] = c.time
        slot[c.rank] = (x, c)
        return self._drain(job, job.newest)

    def _drain(self, job: _Job, now: float, final: bool = False) -> list[Finding]:
        out: list[Finding] = []
        while job.pending:
            s = min(job.pending)
            slot = job.pending[s]
            skipped = job.skipped.get(s, ())
            expected = max(len(job.ranks), job.world) - len(job.silent)
            aged = now - job.first[s] > self.grace_s
            if not (final or aged or len(job.pending) > self.max_pending
                    or len(slot) + sum(1 for r in skipped if r not in slot) >= expected):
                break
            del job.pending[s], job.first[s]
            job.skipped.pop(s, None)
            if aged:  # ranks missing from a step judged at its grace are not waited for again until they report
                job.silent.update(r for r in job.ranks if r not in slot and r not in skipped)
                job.world = -1  # nor ranks never seen, whatever world_size says
            job.done = s
            out.extend(self._judge_step(job, s, slot))
        return out

    def tick(self, now: float) -> list[Finding]:
        """Judge the steps that have waited longer than ``grace_s`` at wall-clock time ``now``."""
        out: list[Finding] = []
        for job in self._jobs.values():
            try:
                out.extend(self._drain(job, float(now)))
            except (TypeError, ValueError, ArithmeticError):  # never raise from the scheduler's tick
                self.n_ignored += 1
        return out

    def flush(self) -> list[Finding]:
        """Judge every step still waiting for a rank (the end of the data)."""
        out: list[Finding] = []
        for job in self._jobs.values():
            try:
                out.extend(self._drain(job, job.newest, final=True))
            except (TypeError, ValueError, ArithmeticError):
                self.n_ignored += 1
        return out

    # --- judging one step -------------------------------------------------------------

    def _judge_step(self, job: _Job, step: int, slot: Mapping[int | None, tuple[float, Context]]) -> list[Finding]:
        n = len(slot)
        total, t = 0.0, -math.inf
        top_x, top_c = next(iter(slot.values()))
        for x, c in slot.values():
            total += x
            t = max(t, c.time)
            if x > top_x:
                top_x, top_c = x, c
        mean = total / n
        job.n_max = max(job.n_max, n)
        pooled = job.n_max > 1
        spread = job.var_w if job.n_w >= 20 else 0.0
        extra = spread * (1.0 / n - 1.0 / job.n_max) if pooled else 0.0
        z, pred, sd, v = self._judge(job.series, mean, step, t, self._pooled if pooled else self._single, extra)
        if n >= 2 and z < self.z:  # the spread across ranks, from ordinary steps
            var = sum((x - mean) ** 2 for x, _ in slot.values()) / (n - 1)
            if job.n_w >= 20:
                var = min(var, 16.0 * job.var_w)
            job.n_w += 1
            a = max(1.0 / job.n_w, 0.01)
            job.var_w = (1 - a) * job.var_w + a * var
        c = Context(t, top_c.job, top_c.rank, top_c.node, top_c.gpu, step)
        if v is not None and n >= 3:
            # agreement: without the rank that rose most, the others' mean must rise too
            rest = (total - top_x) / (n - 1)
            var_rest = sd * sd + spread * (1.0 / (n - 1) - 1.0 / n)
            z_rest = (rest - pred) / math.sqrt(var_rest) if var_rest > 0 else math.inf
            if z_rest < self.job_z_rest:
                job.series.in_ = False
                v = None
        if v is not None:
            sd_rank = math.sqrt(sd * sd + spread * (1.0 - 1.0 / job.n_max)) if pooled else sd
            above = sum(1 for x, _ in slot.values() if sd_rank > 0 and (x - pred) / sd_rank >= 3.0)
            f = self._finding(
                c, severity="warning", statistic=z if math.isfinite(z) else 1e300, threshold=self.z,
                effect=mean / pred if pred else math.nan, onset=v.onset, method=v.rule,
                details={"loss": mean, "expected": pred, "sigma": sd, "z": z, "highest": job.series.highest,
                         "steps_above": v.steps_above, "ranks": n, "ranks_above": above, "rank_loss": top_x,
                         "first_rank": "" if c.rank is None else str(c.rank), "first_node": c.node,
                         "first_gpu": c.gpu, "first_rank_subject": c.subject})
            return [replace(f, subject=subject(job=c.job))]
        if n < 2 or job.n_w < 20 or spread <= 0 or job.series.in_:  # (during a job spike: part of it)
            return []
        sd_dev = math.sqrt(spread * (1.0 + 1.0 / (n - 1)))
        if job.outliers:
            for r in list(job.outliers):
                xr = slot.get(r)
                if xr is None or (xr[0] - (total - xr[0]) / (n - 1)) / sd_dev < self.z:
                    job.outliers.discard(r)
        z_rank = (top_x - (total - top_x) / (n - 1)) / sd_dev
        if z_rank >= self.rank_z and top_c.rank not in job.outliers:
            job.outliers.add(top_c.rank)
            return [self._finding(c, severity="info", statistic=z_rank, threshold=self.rank_z, effect=top_x - mean,
                                  method="rank_outlier",
                                  details={"loss": top_x, "mean_of_others": (total - top_x) / (n - 1),
                                           "spread": math.sqrt(spread), "ranks": n})]
        return []

    def _judge(self, s: _Series, x: float, step: int | None, t: float, rules: _Rules,
               extra_var: float) -> tuple[float, float, float, _Verdict | None]:
        """Judge ``x``, the next value of series ``s``: (z, expected, sigma, verdict or None)."""
        m = s.m
        if m.n == 0:
            m.warm.append(x)
            s.highest = max(s.highest, x)
            if len(m.warm) == self.warmup:
                m.start()
                m.n = 1
            return 0.0, x, 0.0, None
        pred = m.level + m.trend
        resid = x - pred
        var = m.var + max(extra_var, 0.0)
        sd = math.sqrt(var) if var > 0 else 0.0
        z = resid / sd if sd > 0 else (math.inf if resid > 0 else 0.0)
        ratio_hit = s.highest > 0 and x >= self.max_ratio * s.highest
        prev, s.prev = s.prev, (step, t, z)
        verdict = None
        if z >= self.z or ratio_hit:
            s.above += 1
            jump = (x - _median(list(s.recent))) / sd if s.recent and sd > 0 else math.inf
            run = s.run
            if jump >= self.z_jump or ratio_hit:
                run.append((step, t, z))
                s.quiet = 0
            else:
                run.clear()
            pair = (bool(run) and prev is not None and prev[2] >= rules.z_floor and z >= rules.z_floor
                    and (prev[2] + z) / _SQRT2 >= rules.z_pair)
            if run and not s.in_ and (len(run) >= rules.persistence or z >= rules.z_immediate or ratio_hit or pair):
                s.in_ = True
                if ratio_hit:
                    rule = "max_ratio"
                elif z >= rules.z_immediate:
                    rule = "z_immediate"
                elif len(run) >= rules.persistence:
                    rule = "z_persistent"
                else:
                    rule = "z_pair"
                onset = (run[0][0], run[0][1])
                if rule == "z_pair" and len(run) < 2 and prev is not None:
                    onset = (prev[0], prev[1])
                verdict = _Verdict(rule, onset, len(run))
            if s.above >= self.rebase_after:  # a lasting change of level: learn it anew
                s.m, s.run, s.above, s.in_ = _Holt(), [], 0, False
                s.m.warm.append(x)
                return z, pred, sd, verdict
            if s.above > rules.persistence + 1:  # not a short spike: follow, clipped (a bend, not a spike)
                self._learn(s, pred, min(x, pred + self.z * sd), self.z * sd)
            elif m.var > 0:  # the variance takes the error clipped at the threshold (winsorized), so that
                # leaving outlying steps out does not shrink sigma
                a = max(self.var_alpha, 1.0 / (m.nvar + 1))
                m.var = (1 - a) * m.var + a * self.z * self.z * m.var
            return z, pred, sd, verdict
        s.above = 0
        s.recent.append(x)
        s.run = []
        if s.in_:
            s.quiet += 1
            if s.quiet >= 3:
                s.in_ = False
        s.highest = max(s.highest, x)
        self._learn(s, pred, x, resid)
        return z, pred, sd, None

    def _learn(self, s: _Series, pred: float, x: float, resid: float) -> None:
        m = s.m
        s.res.add(resid)
        s.xs.append(x)
        if s.res.full and abs(s.res.mean) > self.bias * math.sqrt(m.var):
            # the curve bent (a plateau, a schedule change): refit level and trend to the recent losses
            y = np.fromiter(s.xs, dtype=np.float64)
            tt = np.arange(len(y), dtype=np.float64)
            slope, icpt = np.polyfit(tt, y, 1)
            m.level, m.trend = float(icpt + slope * tt[-1]), float(slope)
            s.res = _Rolling(self.bias_window)
            return
        level = self.alpha * x + (1 - self.alpha) * pred
        m.trend = self.beta * (level - m.level) + (1 - self.beta) * m.trend
        m.level = level
        m.nvar += 1
        a = max(self.var_alpha, 1.0 / m.nvar)  # a running mean until 1 / var_alpha errors, then an EMA
        m.var = (1 - a) * m.var + a * resid * resid


@register_anomaly("gradient_explosion")
class GradientExplosion(_PerRank):
    """Gradient-norm explosion: z >= ``z`` (2.5) against an EMA (``alpha``) of ``grad_norm``
    and its EMA variance, and at least ``min_ratio`` (2) times the EMA. Outlying steps do
    not move the EMA; ``rebase_after`` in a row restart the warmup."""

    name = "gradient_explosion"
    kinds = ("gradient_explosion",)
    method = "ema_z"

    def __init__(self, *, z: float = 2.5, min_ratio: float = 2.0, warmup: int = 50, alpha: float = 0.02,
                 rebase_after: int = 100) -> None:
        problems: list[str] = []
        _positive(problems, z=z, min_ratio=min_ratio, alpha=alpha)
        _count(problems, warmup=warmup, rebase_after=rebase_after)
        if not alpha < 1:
            problems.append("alpha: must be < 1")
        _check(problems)
        super().__init__()
        self.z, self.min_ratio, self.warmup, self.alpha, self.rebase_after = float(z), float(min_ratio), warmup, alpha, rebase_after

    def _update(self, c: Context, obs: Mapping[str, Any]) -> list[Finding]:
        x = _finite(obs, "grad_norm")
        if x is None:
            self.n_ignored += 1
            return []
        st = self._state.setdefault(c.key, {"warm": [], "mean": 0.0, "var": 0.0, "in": False, "run": 0,
                                            "onset": None})
        if st["warm"] is not None:
            st["warm"].append(x)
            if len(st["warm"]) >= self.warmup:
                w = np.asarray(st["warm"])
                st["mean"], st["var"], st["warm"] = float(w.mean()), float(w.var()), None
            return []
        mean, sd = st["mean"], math.sqrt(st["var"])
        z = (x - mean) / sd if sd > 0 else (math.inf if x > mean else 0.0)
        ratio = x / mean if mean > 0 else math.inf
        if z >= self.z and ratio >= self.min_ratio:
            st["run"] += 1
            if st["onset"] is None:
                st["onset"] = (c.step, c.time)
            out = []
            if not st["in"]:
                st["in"] = True
                out.append(self._finding(c, severity="warning", statistic=z if math.isfinite(z) else 1e300,
                                         threshold=self.z, effect=ratio, onset=st["onset"],
                                         details={"grad_norm": x, "ema": mean, "sigma": sd, "ratio": ratio,
                                                  "min_ratio": self.min_ratio}))
            if st["run"] >= self.rebase_after:
                self._state[c.key] = {"warm": [x], "mean": 0.0, "var": 0.0, "in": False, "run": 0, "onset": None}
            return out
        st["run"], st["onset"] = 0, None
        st["in"] = False
        d = x - mean
        st["mean"] = mean + self.alpha * d
        st["var"] = (1 - self.alpha) * (st["var"] + self.alpha * d * d)
        return []


def _median(values: list[float]) -> float:
    s = sorted(values)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def _slope(y: np.ndarray) -> tuple[float, float]:
    """Least-squares slope of ``y`` against 0..n-1 and its t statistic."""
    n = len(y)
    x = np.arange(n, dtype=np.float64) - (n - 1) / 2
    sxx = float(x @ x)
    b = float(x @ (y - y.mean())) / sxx
    resid = y - y.mean() - b * x
    se = math.sqrt(float(resid @ resid) / max(n - 2, 1) / sxx)
    return b, (b / se if se > 0 else (-math.inf if b < 0 else math.inf if b > 0 else 0.0))


@register_anomaly("loss_plateau")
class LossPlateau(_PerRank):
    """The loss stopped improving: every ``window // 4`` steps, fit the slope of the last
    ``window`` losses and of the ``window`` before. ``warning`` when the earlier slope was
    clearly negative (t <= -``t_progress``, 6) and the latest is above ``stall_ratio`` (0.2)
    of it and not significantly negative (t > -2): progress stopped abruptly. ``info``, once,
    when a run shows no significant progress at all (the usual end of training)."""

    name = "loss_plateau"
    kinds = ("loss_plateau",)
    method = "slope_ratio"
    job_level = True

    def __init__(self, *, window: int = 200, t_progress: float = 6.0, stall_ratio: float = 0.2) -> None:
        problems: list[str] = []
        _positive(problems, t_progress=t_progress, stall_ratio=stall_ratio)
        if isinstance(window, bool) or not isinstance(window, int) or window < 8:
            problems.append(f"window: must be an integer >= 8, got {window!r}")
        _check(problems)
        super().__init__()
        self.window, self.t_progress, self.stall_ratio = window, float(t_progress), float(stall_ratio)

    def _update(self, c: Context, obs: Mapping[str, Any]) -> list[Finding]:
        x = _finite(obs, "loss")
        if x is None:
            self.n_ignored += 1
            return []
        st = self._state.setdefault(c.key, {"buf": deque(maxlen=2 * self.window), "n": 0, "in": False,
                                            "info": False, "steps": deque(maxlen=2 * self.window)})
        st["buf"].append(x)
        st["steps"].append((c.step, c.time))
        st["n"] += 1
        if len(st["buf"]) < 2 * self.window or st["n"] % max(1, self.window // 4):
            return []
        y = np.fromiter(st["buf"], dtype=np.float64)
        b1, t1 = _slope(y[: self.window])
        b2, t2 = _slope(y[self.window:])
        if t2 <= -self.t_progress and st["in"]:
            st["in"] = False
            self._end(c)
        details = {"slope_before": b1, "t_before": t1, "slope_now": b2, "t_now": t2, "window": self.window,
                   "mean_loss": float(y[self.window:].mean())}
        if not st["in"] and t1 <= -self.t_progress and b2 >= self.stall_ratio * b1 and t2 > -2.0:
            st["in"] = True
            if self._begin(c):
                return [self._finding(c, severity="warning", statistic=b2 / b1, threshold=self.stall_ratio,
                                      effect=b2, onset=st["steps"][self.window], details=details)]
        elif not st["info"] and not st["in"] and t1 > -2.0 and t2 > -2.0:
            st["info"] = True
            return [self._finding(c, severity="info", statistic=t2, threshold=-2.0, effect=b2,
                                  onset=st["steps"][0], method="no_progress", details=details)]
        return []


class _Rolling:
    """Running mean over the last ``n`` values."""

    __slots__ = ("buf", "total")

    def __init__(self, n: int) -> None:
        self.buf: deque[float] = deque(maxlen=n)
        self.total = 0.0

    def add(self, v: float) -> None:
        if len(self.buf) == self.buf.maxlen:
            self.total -= self.buf[0]
        self.buf.append(v)
        self.total += v

    @property
    def full(self) -> bool:
        return len(self.buf) == self.buf.maxlen

    @property
    def mean(self) -> float:
        return self.total / len(self.buf) if self.buf else math.nan


@register_anomaly("throughput_regression")
class ThroughputRegression(_PerRank):
    """Throughput against the run's own best: tokens/s (``tokens / step_time``), else
    samples/s, else steps/s. The baseline is the highest mean over ``window`` (30) steps
    seen after ``skip`` (20) steps; a ``warning`` when the mean falls ``min_drop`` (15%)
    below it, cleared at half that drop."""

    name = "throughput_regression"
    kinds = ("throughput_regression",)
    method = "rolling_mean_vs_best"
    job_level = True

    def __init__(self, *, window: int = 30, min_drop: float = 0.15, skip: int = 20) -> None:
        problems: list[str] = []
        _count(problems, window=window)
        if isinstance(skip, bool) or not isinstance(skip, int) or skip < 0:
            problems.append(f"skip: must be an integer >= 0, got {skip!r}")
        if not (isinstance(min_drop, (int, float)) and 0 < min_drop < 1):
            problems.append(f"min_drop: must be in (0, 1), got {min_drop!r}")
        _check(problems)
        super().__init__()
        self.window, self.min_drop, self.skip = window, float(min_drop), skip

    def _update(self, c: Context, obs: Mapping[str, Any]) -> list[Finding]:
        st_time = _finite(obs, "step_time")
        if st_time is None or st_time <= 0:
            self.n_ignored += 1
            return []
        unit = "steps/s"
        work = 1.0
        for field, u in (("tokens", "tokens/s"), ("samples", "samples/s")):
            v = _finite(obs, field)
            if v is not None and v > 0:
                work, unit = v, u
                break
        rate = work / st_time
        st = self._state.setdefault(c.key, {"roll": _Rolling(self.window), "n": 0, "best": 0.0, "in": False,
                                            "recent": deque(maxlen=self.window), "unit": unit})
        st["n"] += 1
        if st["n"] <= self.skip or unit != st["unit"]:
            return []
        st["roll"].add(rate)
        st["recent"].append((c.step, c.time, rate))
        if not st["roll"].full:
            return []
        mean, best = st["roll"].mean, st["best"]
        floor = (1 - self.min_drop) * best
        if not st["in"]:
            if best > 0 and mean < floor:
                st["in"] = True
                if self._begin(c):
                    onset = next(((s, t) for s, t, r in st["recent"] if r < floor), (c.step, c.time))
                    return [self._finding(c, severity="warning", statistic=mean / best, threshold=1 - self.min_drop,
                                          effect=1 - mean / best, onset=onset,
                                          details={"rate": mean, "baseline": best, "unit": unit, "drop": 1 - mean / best,
                                                   "window": self.window})]
            st["best"] = max(best, mean)
        elif mean >= (1 - self.min_drop / 2) * best:
            st["in"] = False
            self._end(c)
        return []


def _phases(obs: Mapping[str, Any]) -> dict[str, float]:
    ph = obs.get("phases")
    if not isinstance(ph, Mapping):
        return {}
    out = {}
    for k, v in ph.items():
        if isinstance(v, (Real, np.number)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0:
            out[str(k)] = float(v)
    return out


@register_anomaly("input_bound")
class InputBound(_PerRank):
    """Input-bound verdict: the mean share of step time spent waiting for data
    (``data_wait``, else the ``data`` phase, over ``step_time``) over the last ``window``
    (20) steps above ``threshold`` (0.5); cleared below ``clear`` (0.4). Details give the
    mean phase breakdown (seconds and shares) over the window."""

    name = "input_bound"
    kinds = ("input_bound",)
    method = "data_wait_share"
    job_level = True

    def __init__(self, *, window: int = 20, threshold: float = 0.5, clear: float = 0.4) -> None:
        problems: list[str] = []
        _count(problems, window=window)
        if not (isinstance(threshold, (int, float)) and 0 < threshold < 1):
            problems.append(f"threshold: must be in (0, 1), got {threshold!r}")
        if not (isinstance(clear, (int, float)) and 0 < clear <= threshold):
            problems.append(f"clear: must be in (0, threshold], got {clear!r}")
        _check(problems)
        super().__init__()
        self.window, self.threshold, self.clear = window, float(threshold), float(clear)

    def _update(self, c: Context, obs: Mapping[str, Any]) -> list[Finding]:
        st_time = _finite(obs, "step_time")
        ph = _phases(obs)
        wait = _finite(obs, "data_wait")
        if wait is None:
            wait = ph.get("data")
        if st_time is None or st_time <= 0 or wait is None or wait < 0:
            self.n_ignored += 1
            return []
        st = self._state.setdefault(c.key, {"roll": _Rolling(self.window), "in": False,
                                            "recent": deque(maxlen=self.window)})
        share = min(wait / st_time, 1.0)
        st["roll"].add(share)
        st["recent"].append((c.step, c.time, share, st_time, ph))
        if not st["roll"].full:
            return []
        mean = st["roll"].mean
        if not st["in"] and mean > self.threshold:
            st["in"] = True
            if self._begin(c):
                recent = st["recent"]
                total = sum(r[3] for r in recent)
                secs: dict[str, float] = {}
                for r in recent:
                    for k, v in r[4].items():
                        secs[k] = secs.get(k, 0.0) + v
                breakdown = {k: {"seconds": v / len(recent), "share": v / total} for k, v in sorted(secs.items())}
                onset = next(((s, t) for s, t, sh, _, _ in recent if sh > self.threshold), (c.step, c.time))
                return [self._finding(c, severity="warning", statistic=mean, threshold=self.threshold, effect=mean,
                                      onset=onset, details={"data_wait_share": mean,
                                                            "step_time": total / len(recent), "phases": breakdown,
                                                            "window": self.window})]
        elif st["in"] and mean < self.clear:
            st["in"] = False
            self._end(c)
        return []


@register_anomaly("phase_shift")
class PhaseShift(_PerRank):
    """Early warning that the phase signature changed: the shares of step time per phase
    (``phases``), averaged over the last ``window`` (20) steps, against their mean over
    ``baseline`` (100) steps after ``skip`` (20); a ``warning`` when the total variation
    distance reaches ``threshold`` (0.15), cleared at half of it."""

    name = "phase_shift"
    kinds = ("phase_shift",)
    method = "total_variation"
    job_level = True

    def __init__(self, *, window: int = 20, baseline: int = 100, skip: int = 20, threshold: float = 0.15) -> None:
        problems: list[str] = []
        _count(problems, window=window, baseline=baseline)
        if isinstance(skip, bool) or not isinstance(skip, int) or skip < 0:
            problems.append(f"skip: must be an integer >= 0, got {skip!r}")
        if not (isinstance(threshold, (int, float)) and 0 < threshold < 1):
            problems.append(f"threshold: must be in (0, 1), got {threshold!r}")
        _check(problems)
        super().__init__()
        self.window, self.baseline, self.skip, self.threshold = window, baseline, skip, float(threshold)

    def _update(self, c: Context, obs: Mapping[str, Any]) -> list[Finding]:
        ph = _phases(obs)
        total = sum(ph.values())
        if len(ph) < 2 or total <= 0:
            self.n_ignored += 1
            return []
        shares = {k: v / total for k, v in ph.items()}
        st = self._state.setdefault(c.key, {"n": 0, "base": {}, "nb": 0, "recent": deque(maxlen=self.window),
                                            "in": False})
        st["n"] += 1
        if st["n"] <= self.skip:
            return []
        if st["nb"] < self.baseline:
            for k, v in shares.items():
                st["base"][k] = st["base"].get(k, 0.0) + v
            st["nb"] += 1
            return []
        st["recent"].append((c.step, c.time, shares))
        if len(st["recent"]) < self.window:
            return []
        cur: dict[str, float] = {}
        for _, _, sh in st["recent"]:
            for k, v in sh.items():
                cur[k] = cur.get(k, 0.0) + v / self.window
        base = {k: v / st["nb"] for k, v in st["base"].items()}
        tv = 0.5 * sum(abs(cur.get(k, 0.0) - base.get(k, 0.0)) for k in set(cur) | set(base))
        if not st["in"] and tv >= self.threshold:
            st["in"] = True
            if self._begin(c):
                return [self._finding(c, severity="warning", statistic=tv, threshold=self.threshold, effect=tv,
                                      onset=st["recent"][0][:2],
                                      details={"baseline_shares": base, "current_shares": cur,
                                               "changed_most": max(set(cur) | set(base),
                                                                   key=lambda k: abs(cur.get(k, 0) - base.get(k, 0)))})]
        elif st["in"] and tv < self.threshold / 2:
            st["in"] = False
            self._end(c)
        return []
