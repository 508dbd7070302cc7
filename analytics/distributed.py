"""Distributed-training detectors: a rank against the others of its job.

``straggler_rank`` (``warning``)
    A rank's own work time per iteration (``step_time`` less the phases that wait for
    other ranks, :data:`~.training.SYNC_PHASES`; the sum of its other phases when
    given) is compared with the median of the other ranks at the same step (scored
    once every rank reported that step, or two steps later), relative to the rank's
    usual ratio to that median (an EMA, so a rank that is always a little slower
    is measured against its habit), and with the rank's own best (the lowest median
    of ``best_window`` consecutive iterations). The slowdown
    ``x = min(vs median, vs best)`` feeds a one-sided CUSUM tuned to the
    minimum effect ``min_effect`` (10%): ``S = max(0, S + x - k)`` with
    ``k = max(0.4 min_effect, 0.5 sigma)`` and an alarm when ``S > h``,
    ``h = max(min_effect, 5 sigma)``, sigma being the rank's own noise of
    ``x`` vs the median. Both references must agree, so a slowdown of the whole job
    (longer sequences) or a rank that was always a little slower is not a straggler.
    An ``info`` finding marks the recovery.

``job_hung`` (``critical``)
    A rank silent for ``factor`` (10) times its usual interval between steps (and at
    least ``min_silence_s``, 60 s) while other ranks of its job go on; ``tick(now)``
    checks every job against the wall clock, reporting a job whose ranks are all
    silent once, as ``silent_job_severity`` (``warning``: a finished job looks the
    same). A rank that reports again after such a gap (found in a file after the fact)
    gets a ``warning`` with the gap.

Examples
--------
>>> from stethoscope.analytics.scenarios import training_run
>>> run = training_run("slow_rank", seed=4, steps=600, onset=400, world_size=4, rank=1)
>>> det = StragglerRank()
>>> found = [f for o in run.observations for f in det.update(o)]
>>> [(f.kind, f.subject, f.details["detected_step"] - 400 <= 3) for f in found]
[('straggler_rank', 'job=job0 rank=1 node=node0 gpu=1', True)]
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

from .anomaly import Observation, register_anomaly, subject
from .findings import Finding
from .training import (
    SYNC_PHASES,
    Context,
    _check,
    _count,
    _finite,
    _PerRank,
    _phases,
    _positive,
)

__all__ = ["DISTRIBUTED_DETECTORS", "JobHung", "StragglerRank"]

#: Names of the detectors in this module.
DISTRIBUTED_DETECTORS = ("straggler_rank", "job_hung")


def _work_time(obs: Mapping[str, Any]) -> float | None:
    ph = _phases(obs)
    own = {k: v for k, v in ph.items() if k not in SYNC_PHASES}
    step = _finite(obs, "step_time")
    if step is not None and step > 0:
        sync = sum(v for k, v in ph.items() if k in SYNC_PHASES)
        w = step - sync
        return w if w > 0 else None
    if own:
        w = sum(own.values())
        return w if w > 0 else None
    return None


def _median(values: list[float]) -> float:
    s = sorted(values)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


@register_anomaly("straggler_rank")
class StragglerRank(_PerRank):
    """Straggler ranks: change-point (CUSUM) on the slowdown against the median of ranks and the
    rank's own best, with a minimum effect; see the module docstring."""

    name = "straggler_rank"
    kinds = ("straggler_rank",)
    method = "cusum_vs_median_and_best"

    def __init__(self, *, min_effect: float = 0.10, warmup: int = 20, best_window: int = 5,
                 noise_alpha: float = 0.02, recover: int = 10) -> None:
        problems: list[str] = []
        _positive(problems, min_effect=min_effect, noise_alpha=noise_alpha)
        _count(problems, warmup=warmup, best_window=best_window, recover=recover)
        if not noise_alpha < 1:
            problems.append("noise_alpha: must be < 1")
        _check(problems)
        super().__init__()
        self.min_effect, self.warmup, self.best_window = float(min_effect), warmup, best_window
        self.noise_alpha, self.recover = float(noise_alpha), recover
        self._latest: dict[str, dict[str, Any]] = {}

    def reset(self) -> None:
        super().reset()
        self._latest = {}

    def _update(self, c: Context, obs: Mapping[str, Any]) -> list[Finding]:
        w = _work_time(obs)
        if w is None or c.step is None:
            self.n_ignored += 1
            return []
        job = self._latest.setdefault(c.job, {"ranks": set(), "pending": {}})
        job["ranks"].add(c.rank)
        job["pending"].setdefault(c.step, {})[c.rank] = (w, c)
        out: list[Finding] = []
        # a step is scored once every rank of the job has reported it, or once two newer steps arrived
        for step in sorted(job["pending"]):
            got = job["pending"][step]
            if len(got) < len(job["ranks"]) and step > c.step - 2:
                continue
            del job["pending"][step]
            for rank, (wr, cr) in sorted(got.items(), key=lambda kv: (kv[0] is None, kv[0] or 0)):
                others = [v for q, (v, _) in got.items() if q != rank]
                out += self._score(cr, wr, others, c.time)
        return out

    def _score(self, c: Context, w: float, others: list[float], now: float) -> list[Finding]:
        st = self._state.setdefault(c.key, {"n": 0, "recent": deque(maxlen=self.best_window), "best": math.inf,
                                            "var": 0.0, "nvar": 0, "S": 0.0, "onset": None, "in": False, "quiet": 0,
                                            "habit": 0.0})
        c = Context(now, c.job, c.rank, c.node, c.gpu, c.step)
        st["n"] += 1
        ratio = w / _median(others) if others else math.nan
        x_med = ratio / st["habit"] - 1.0 if st["habit"] > 0 else math.nan
        x_best = w / st["best"] - 1.0 if math.isfinite(st["best"]) else math.nan
        if st["n"] <= self.warmup or math.isnan(x_best):
            self._learn(st, w, ratio, x_med)
            return []
        x = x_best if math.isnan(x_med) else min(x_med, x_best)
        sigma = math.sqrt(st["var"]) if st["nvar"] else 0.0
        k = max(0.4 * self.min_effect, 0.5 * sigma)
        h = max(self.min_effect, 5.0 * sigma)
        if st["S"] == 0.0:
            st["onset"] = (c.step, c.time)
        st["S"] = max(0.0, st["S"] + x - k)
        if st["S"] == 0.0:
            st["onset"] = None
        out: list[Finding] = []
        if st["in"]:
            st["quiet"] = st["quiet"] + 1 if x < self.min_effect / 2 else 0
            if st["quiet"] >= self.recover:
                st.update(S=0.0, quiet=0, onset=None, **{"in": False})
                out.append(self._finding(c, severity="info", statistic=x, threshold=self.min_effect, effect=x,
                                         details={"recovered": True, "work_time": w}))
            return out
        if st["S"] > h:
            st["in"], st["quiet"] = True, 0
            med = _median(others) if others else math.nan
            out.append(self._finding(
                c, severity="warning", statistic=st["S"], threshold=h, effect=x, onset=st["onset"] or (c.step, c.time),
                details={"slowdown_vs_median": x_med, "slowdown_vs_best": x_best, "work_time": w,
                         "median_work_time": med, "best_work_time": st["best"], "ranks_compared": len(others) + 1,
                         "min_effect": self.min_effect, "cusum_k": k, "noise": sigma}))
            return out
        if x < k:  # an ordinary iteration: keep learning the rank's best, usual ratio and noise
            self._learn(st, w, ratio, x_med)
        return out

    def _learn(self, st: dict[str, Any], w: float, ratio: float, x_med: float) -> None:
        st["recent"].append(w)
        if len(st["recent"]) == self.best_window:
            st["best"] = min(st["best"], _median(list(st["recent"])))
        if math.isnan(ratio):
            return
        n = st["nvar"]
        a = self.noise_alpha if n >= 1 / self.noise_alpha else 1.0 / (n + 1)
        st["habit"] = (1 - a) * st["habit"] + a * ratio if n else ratio
        if not math.isnan(x_med) and n:
            st["var"] = (1 - a) * st["var"] + a * x_med * x_med
        st["nvar"] = n + 1


@register_anomaly("job_hung")
class JobHung:
    """Hung jobs: a rank silent for ``factor`` times its usual step interval; see the module
    docstring. ``update`` uses each observation's time as "now" for the other ranks of its
    job; :meth:`tick` checks every job at a given wall-clock time."""

    name = "job_hung"
    kinds = ("job_hung",)

    def __init__(self, *, factor: float = 10.0, min_silence_s: float = 60.0, min_intervals: int = 5,
                 alpha: float = 0.1, silent_job_severity: str = "warning") -> None:
        problems: list[str] = []
        _positive(problems, factor=factor, min_silence_s=min_silence_s, alpha=alpha)
        _count(problems, min_intervals=min_intervals)
        if silent_job_severity not in ("info", "warning", "critical"):
            problems.append(f"silent_job_severity: must be info, warning or critical, got {silent_job_severity!r}")
        _check(problems)
        self.factor, self.min_silence_s, self.min_intervals = float(factor), float(min_silence_s), min_intervals
        self.alpha, self.silent_job_severity = float(alpha), silent_job_severity
        self.reset()

    def reset(self) -> None:
        self.n_ignored = 0
        self._jobs: dict[str, dict[int | None, dict[str, Any]]] = {}
        self._next_check: dict[str, float] = {}

    conformance_inputs = classmethod(_PerRank.conformance_inputs.__func__)  # type: ignore[attr-defined]

    def _limit(self, r: dict[str, Any]) -> float:
        return max(self.factor * r["usual"], self.min_silence_s)

    def update(self, obs: Observation) -> Sequence[Finding]:
        from .training import context

        c = context(obs)
        if c is None:
            self.n_ignored += 1
            return []
        ranks = self._jobs.setdefault(c.job, {})
        r = ranks.get(c.rank)
        out: list[Finding] = []
        if r is None:
            ranks[c.rank] = {"last": c.time, "step": c.step, "usual": 0.0, "n": 0, "reported": False, "ctx": c}
        elif c.time >= r["last"]:
            gap = c.time - r["last"]
            if gap > 0:
                if r["n"] >= self.min_intervals and gap > self._limit(r) and not r["reported"]:
                    out.append(self._finding(c, r, "warning", gap, {"resumed": True, "silence_s": gap}))
                elif gap <= self._limit(r) or r["n"] < self.min_intervals:
                    a = self.alpha if r["n"] >= self.min_intervals else 1.0 / (r["n"] + 1)
                    r["usual"] = (1 - a) * r["usual"] + a * gap
                    r["n"] += 1
            r.update(last=c.time, step=c.step, reported=False, ctx=c)
        if c.time >= self._next_check.get(c.job, -math.inf):
            out += self._check(c.job, c.time, whole_job=False)
        return out

    def tick(self, now: float) -> list[Finding]:
        """Findings for ranks (or whole jobs) silent too long at wall-clock time ``now``."""
        try:
            now = float(now)
        except (TypeError, ValueError):
            return []
        if not math.isfinite(now):
            return []
        out: list[Finding] = []
        for job in list(self._jobs):
            out += self._check(job, now, whole_job=True)
        return out

    def _check(self, job: str, now: float, *, whole_job: bool) -> list[Finding]:
        ranks = self._jobs.get(job, {})
        armed = [r for r in ranks.values() if r["n"] >= self.min_intervals]
        if armed:
            self._next_check[job] = now + 0.25 * min(self._limit(r) for r in armed)
        silent = [r for r in armed if now - r["last"] > self._limit(r)]
        new = [r for r in silent if not r["reported"]]
        if not new:
            return []
        for r in new:
            r["reported"] = True
        if whole_job and len(silent) == len(ranks):
            first = min(silent, key=lambda r: r["last"])
            c = first["ctx"]
            jc = Context(now, job, None, "", "", None)
            f = Finding(time=now, kind="job_hung", subject=subject(job=job), method="silence",
                        statistic=now - first["last"], threshold=self._limit(first), effect=math.nan,
                        severity=self.silent_job_severity, drifted=True, window_start=first["last"], window_end=now,
                        details={"job": jc.job, "all_ranks_silent": True, "ranks": len(ranks), "step": c.step,
                                 "onset_time": first["last"], "silence_s": now - first["last"]})
            return [f]
        out = []
        for r in new:
            c = r["ctx"]
            here = Context(now, c.job, c.rank, c.node, c.gpu, c.step)
            out.append(self._finding(here, r, "critical", now - r["last"], {"silence_s": now - r["last"]}))
        return out

    def _finding(self, c: Context, r: dict[str, Any], severity: str, silence: float,
                 extra: Mapping[str, Any]) -> Finding:
        limit = self._limit(r)
        return Finding(time=c.time, kind="job_hung", subject=c.subject, method="silence", statistic=float(silence),
                       threshold=float(limit), effect=silence / r["usual"] if r["usual"] > 0 else math.nan,
                       severity=severity, drifted=True, window_start=r["last"], window_end=c.time,
                       details={"job": c.job, "rank": c.rank, "node": c.node, "gpu": c.gpu, "step": r["step"],
                                "onset_time": r["last"], "detected_step": c.step if extra.get("resumed") else None,
                                "usual_interval_s": r["usual"], **extra})
