"""Serving anomaly detectors: latency against the SLA, error rate, queue time, replica imbalance, capacity.

Each detector watches serving observations, one per model replica per export
interval (``ModelMonitor`` exports every ``export_interval_s``)::

    {"time": t, "model": "fraud", "version": "3", "replica": "pod-a", "requests": 480,
     "errors": 2, "interval_s": 10.0, "latency": {"bounds": [...], "counts": [...]}}

``latency`` may instead carry ``p50``/``p90``/``p99`` (ms) when only quantiles are
known. Verdicts are made over a sliding window of recent intervals of all replicas
of one ``(model, version)``, so a quiet replica or a short interval does not decide
alone. Quantiles of merged explicit-bucket histograms use
:func:`stethoscope.dashboards.histogram.bucket_quantile`, the same estimate as the
dashboards' SQL.

========================  =================  =================================================
detector (registry name)  kind               verdict (``warning``, ``info`` when it clears)
========================  =================  =================================================
``latency_sla``           ``latency_sla``    windowed p99 above the model's SLA, twice running
``error_rate``            ``error_rate``     errors/requests: Wilson lower bound above the limit
``queue_time``            ``queue_time``     queue time above ``threshold_ms`` for ``sustain_s``
``load_imbalance``        ``load_imbalance`` busiest replica's share / mean share above ``ratio``
``capacity``              ``capacity``       throughput above ``target`` of replicas x capacity
========================  =================  =================================================

Examples:
    >>> det = LatencySla(sla_ms=250, window_s=30)
    >>> fast = {"bounds": [50.0, 100.0, 250.0, 500.0], "counts": [900, 100, 0, 0, 0]}
    >>> slow = {"bounds": [50.0, 100.0, 250.0, 500.0], "counts": [600, 200, 100, 100, 0]}
    >>> obs = [{"time": 10.0 * i, "model": "m", "version": "1", "replica": "r0", "requests": 1000,
    ...         "latency": fast if i < 5 else slow} for i in range(10)]
    >>> [(f.kind, f.subject, f.time, f.severity, round(f.statistic)) for o in obs for f in det.update(o)]
    [('latency_sla', 'model=m version=1', 60.0, 'warning', 462)]
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..dashboards.histogram import bucket_quantile
from .anomaly import Observation, register_anomaly, subject
from .findings import Finding
from .fleet import _check, _Detector, _Episode, _positive, label, num

__all__ = ["Capacity", "ErrorRate", "LatencySla", "LoadImbalance", "QueueTime", "wilson_lower"]


def wilson_lower(k: float, n: float, z: float = 2.326) -> float:
    """Lower end of the Wilson score interval for ``k`` successes in ``n`` trials.

    >>> round(wilson_lower(30, 1000), 4), wilson_lower(0, 0)
    (0.0198, 0.0)
    """
    if n <= 0:
        return 0.0
    p = k / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max((centre - spread) / (1 + z * z / n), 0.0)


def _model_key(obs: Observation) -> tuple[str, str] | None:
    model = label(obs.get("model"))
    return (model, label(obs.get("version"))) if model else None


def _finding(kind: str, key: tuple[str, str], t: float, severity: str, *, statistic: float, threshold: float,
             method: str, details: Mapping[str, Any], replica: str = "", effect: float = math.nan,
             since: float | None = None) -> Finding:
    labels = {"replica": replica} if replica else {}
    return Finding(time=t, kind=kind, subject=subject(model=key[0], version=key[1], replica=replica or None),
                   model=key[0], model_version=key[1], method=method, statistic=float(statistic),
                   threshold=float(threshold), effect=float(effect), severity=severity, drifted=severity != "info",
                   window_start=since if since is not None else t, window_end=t, details=dict(details),
                   labels=labels)


class _Window:
    """Recent ``(time, replica, payload)`` entries of one model version, ``window_s`` long."""

    __slots__ = ("items",)

    def __init__(self) -> None:
        self.items: deque[tuple[float, str, Any]] = deque()

    def add(self, t: float, replica: str, payload: Any, window_s: float) -> None:
        self.items.append((t, replica, payload))
        while self.items and self.items[0][0] <= t - window_s:
            self.items.popleft()


def _serving_series(rng: np.random.Generator, *, n: int = 90, replicas: int = 3, step_s: float = 10.0,
                    t0: float = 1.7e9, rps: float = 40.0, error_p=lambda i: 0.001, slow=lambda i: False,
                    share=lambda i, r: 1.0, queue=lambda i, r: 5.0) -> list[dict[str, Any]]:
    """``n`` intervals of ``replicas`` replicas of model ``fraud`` version ``3``."""
    bounds = [5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0]
    out = []
    for i in range(n):
        weights = np.array([share(i, r) for r in range(replicas)], dtype=float)
        for r in range(replicas):
            req = int(rng.poisson(rps * step_s * replicas * weights[r] / weights.sum()))
            lat = rng.lognormal(np.log(300.0 if slow(i) else 30.0), 0.4, size=req)
            counts = np.bincount(np.searchsorted(bounds, lat, side="left"), minlength=len(bounds) + 1)
            out.append({"time": t0 + i * step_s + r * 0.01, "model": "fraud", "version": "3", "replica": f"r{r}",
                        "requests": req, "errors": int(rng.binomial(req, error_p(i))), "interval_s": step_s,
                        "latency": {"bounds": bounds, "counts": counts.tolist()}, "queue_ms": queue(i, r)})
    return out


@register_anomaly("latency_sla")
class LatencySla(_Detector):
    """p99 latency of a model version over the last ``window_s`` above its SLA: ``warning``.

    Histograms of all replicas in the window are merged (same bounds) and p50, p90
    and p99 estimated from the buckets; an observation carrying only quantiles
    contributes its own ``p99`` (the largest in the window is used). A verdict needs
    ``min_requests`` in the window and holds for ``consecutive`` evaluations in a row (observations
    with the same time count once).
    ``slas`` maps a model name to its own SLA in ms.
    """

    name = "latency_sla"
    kinds = ("latency_sla",)

    def __init__(self, *, sla_ms: float = 250.0, slas: Mapping[str, float] | None = None, window_s: float = 60.0,
                 min_requests: int = 50, consecutive: int = 2) -> None:
        super().__init__()
        problems: list[str] = []
        _positive(problems, "sla_ms", sla_ms)
        _positive(problems, "window_s", window_s)
        for m, v in (slas or {}).items():
            _positive(problems, f"slas[{m!r}]", v)
        for n, v in (("min_requests", min_requests), ("consecutive", consecutive)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                problems.append(f"{n}: must be an integer >= 1, got {v!r}")
        _check(problems)
        self.sla_ms, self.slas, self.window_s = float(sla_ms), {str(k): float(v) for k, v in (slas or {}).items()}, \
            float(window_s)
        self.min_requests, self.consecutive = min_requests, consecutive
        self._win: dict[tuple[str, str], _Window] = {}
        self._over: dict[tuple[str, str], int] = {}
        self._last: dict[tuple[str, str], float] = {}
        self._active: set[tuple[str, str]] = set()

    def _reset(self) -> None:
        self._win.clear()
        self._over.clear()
        self._last.clear()
        self._active.clear()

    def sla_for(self, model: str) -> float:
        """The SLA in ms of ``model``."""
        return self.slas.get(model, self.sla_ms)

    def _update(self, obs: Observation, t: float) -> list[Finding] | None:
        key, lat = _model_key(obs), obs.get("latency")
        if key is None or not isinstance(lat, Mapping):
            return None
        bounds, counts = lat.get("bounds"), lat.get("counts")
        entry: Any
        if isinstance(bounds, (list, tuple)) and isinstance(counts, (list, tuple)) and len(counts) == len(bounds) + 1:
            b = [num(x) for x in bounds]
            c = [num(x) for x in counts]
            if any(x is None for x in b) or any(x is None or x < 0 for x in c):
                return None
            entry = ("hist", tuple(b), np.array(c, dtype=float))
        elif num(lat.get("p99")) is not None:
            n = num(obs.get("requests")) or 0.0
            entry = ("q", {q: num(lat.get(q)) for q in ("p50", "p90", "p99")}, n)
        else:
            return None
        win = self._win.setdefault(key, _Window())
        win.add(t, label(obs.get("replica")), entry, self.window_s)
        merged: dict[tuple, np.ndarray] = {}
        quantiles: list[tuple[dict, float]] = []
        for _, _, e in win.items:
            if e[0] == "hist":
                merged[e[1]] = merged[e[1]] + e[2] if e[1] in merged else e[2].copy()
            else:
                quantiles.append((e[1], e[2]))
        q: dict[str, float] = {}
        total = 0.0
        if merged:  # the bounds with most requests decide when replicas disagree on bounds
            bounds_, counts_ = max(merged.items(), key=lambda kv: kv[1].sum())
            total = float(counts_.sum())
            q = {f"p{int(p * 100)}": bucket_quantile(p, counts_.tolist(), list(bounds_)) for p in (0.5, 0.9, 0.99)}
        elif quantiles:
            total = sum(n for _, n in quantiles)
            for name in ("p50", "p90", "p99"):
                vals = [d[name] for d, _ in quantiles if d.get(name) is not None]
                q[name] = max(vals) if vals else math.nan
        if total < self.min_requests or not math.isfinite(q.get("p99", math.nan)):
            return []
        sla = self.sla_for(key[0])
        over = q["p99"] > sla
        if not over:
            self._over[key] = 0
        elif not self._over.get(key) or self._last.get(key) != t:  # exports at one moment count once
            self._over[key] = self._over.get(key, 0) + 1
            self._last[key] = t
        details = {**q, "sla_ms": sla, "requests_in_window": total, "window_s": self.window_s}
        if over and self._over[key] >= self.consecutive and key not in self._active:
            self._active.add(key)
            return [_finding("latency_sla", key, t, "warning", statistic=q["p99"], threshold=sla,
                             method="histogram_p99", effect=q["p99"] / sla, details=details)]
        if not over and key in self._active:
            self._active.discard(key)
            return [_finding("latency_sla", key, t, "info", statistic=q["p99"], threshold=sla,
                             method="histogram_p99", details={**details, "ended": True})]
        return []

    @classmethod
    def conformance_inputs(cls, rng: np.random.Generator, incident: bool) -> list[dict[str, Any]]:
        return _serving_series(rng, slow=lambda i: incident and 40 <= i < 60)


@register_anomaly("error_rate")
class ErrorRate(_Detector):
    """Errors per request of a model version over ``window_s`` above ``threshold``: ``warning``.

    The verdict needs ``min_requests`` in the window and the Wilson lower bound
    (one-sided, ``z``) of the rate above the threshold, so a handful of errors on
    little traffic does not alarm; it clears when the rate itself drops below.
    """

    name = "error_rate"
    kinds = ("error_rate",)

    def __init__(self, *, threshold: float = 0.01, window_s: float = 60.0, min_requests: int = 100,
                 z: float = 2.326) -> None:
        super().__init__()
        problems: list[str] = []
        if num(threshold) is None or not 0 < threshold < 1:
            problems.append(f"threshold: must be in (0, 1), got {threshold!r}")
        _positive(problems, "window_s", window_s)
        _positive(problems, "z", z)
        if isinstance(min_requests, bool) or not isinstance(min_requests, int) or min_requests < 1:
            problems.append(f"min_requests: must be an integer >= 1, got {min_requests!r}")
        _check(problems)
        self.threshold, self.window_s, self.min_requests, self.z = float(threshold), float(window_s), \
            min_requests, float(z)
        self._win: dict[tuple[str, str], _Window] = {}
        self._active: set[tuple[str, str]] = set()

    def _reset(self) -> None:
        self._win.clear()
        self._active.clear()

    def _update(self, obs: Observation, t: float) -> list[Finding] | None:
        key, req, err = _model_key(obs), num(obs.get("requests")), num(obs.get("errors"))
        if key is None or req is None or req < 0:
            return None
        err = max(err or 0.0, 0.0)
        win = self._win.setdefault(key, _Window())
        win.add(t, label(obs.get("replica")), (req, err), self.window_s)
        n = sum(p[0] for _, _, p in win.items)
        k = sum(p[1] for _, _, p in win.items)
        if n < self.min_requests:
            return []
        rate, low = min(k / n, 1.0), wilson_lower(min(k, n), n, self.z)
        details = {"errors": k, "requests": n, "rate": rate, "wilson_lower": low, "window_s": self.window_s}
        if low > self.threshold and key not in self._active:
            self._active.add(key)
            return [_finding("error_rate", key, t, "warning", statistic=rate, threshold=self.threshold,
                             method="wilson", effect=rate / self.threshold, details=details)]
        if rate < self.threshold and key in self._active:
            self._active.discard(key)
            return [_finding("error_rate", key, t, "info", statistic=rate, threshold=self.threshold,
                             method="wilson", details={**details, "ended": True})]
        return []

    @classmethod
    def conformance_inputs(cls, rng: np.random.Generator, incident: bool) -> list[dict[str, Any]]:
        return _serving_series(rng, error_p=lambda i: 0.08 if incident and 40 <= i < 55 else 0.002)


@register_anomaly("queue_time")
class QueueTime(_Detector):
    """Time requests wait before inference (``queue_ms``) above ``threshold_ms`` for ``sustain_s``,
    per replica: ``warning``."""

    name = "queue_time"
    kinds = ("queue_time",)

    def __init__(self, *, threshold_ms: float = 100.0, sustain_s: float = 30.0) -> None:
        super().__init__()
        problems: list[str] = []
        _positive(problems, "threshold_ms", threshold_ms)
        _positive(problems, "sustain_s", sustain_s, zero=True)
        _check(problems)
        self.threshold_ms, self.sustain_s = float(threshold_ms), float(sustain_s)
        self._state: dict[tuple[str, str, str], _Episode] = {}

    def _reset(self) -> None:
        self._state.clear()

    def _update(self, obs: Observation, t: float) -> list[Finding] | None:
        key, q = _model_key(obs), num(obs.get("queue_ms"))
        if key is None or q is None:
            return None
        replica = label(obs.get("replica"))
        ep = self._state.setdefault((*key, replica), _Episode())
        event = ep.step(t, q > self.threshold_ms, self.sustain_s)
        details = {"queue_ms": q, "threshold_ms": self.threshold_ms, "since": ep.since}
        if event == "start":
            return [_finding("queue_time", key, t, "warning", statistic=q, threshold=self.threshold_ms,
                             method="threshold", replica=replica, effect=q / self.threshold_ms, details=details,
                             since=ep.since)]
        if event == "end":
            return [_finding("queue_time", key, t, "info", statistic=q, threshold=self.threshold_ms,
                             method="threshold", replica=replica, details={**details, "ended": True})]
        return []

    @classmethod
    def conformance_inputs(cls, rng: np.random.Generator, incident: bool) -> list[dict[str, Any]]:
        return _serving_series(rng, queue=lambda i, r: 400.0 if incident and r == 1 and 30 <= i < 60
                               else 5.0 + 3 * rng.random())


@register_anomaly("load_imbalance")
class LoadImbalance(_Detector):
    """The busiest replica's request rate over the mean of all replicas, over ``window_s``,
    above ``ratio``: ``warning``.

    A replica's rate is its requests over the export intervals (``interval_s``, else
    one per observation) it reported in the window. Needs at least two replicas and
    ``min_mean_requests`` per replica in the window, so Poisson noise on light traffic
    cannot reach the ratio.
    """

    name = "load_imbalance"
    kinds = ("load_imbalance",)

    def __init__(self, *, ratio: float = 1.5, window_s: float = 300.0, min_mean_requests: float = 100.0) -> None:
        super().__init__()
        problems: list[str] = []
        if num(ratio) is None or ratio <= 1:
            problems.append(f"ratio: must be a number > 1, got {ratio!r}")
        _positive(problems, "window_s", window_s)
        _positive(problems, "min_mean_requests", min_mean_requests)
        _check(problems)
        self.ratio, self.window_s, self.min_mean_requests = float(ratio), float(window_s), float(min_mean_requests)
        self._win: dict[tuple[str, str], _Window] = {}
        self._active: set[tuple[str, str]] = set()

    def _reset(self) -> None:
        self._win.clear()
        self._active.clear()

    def _update(self, obs: Observation, t: float) -> list[Finding] | None:
        key, req = _model_key(obs), num(obs.get("requests"))
        replica = label(obs.get("replica"))
        if key is None or req is None or req < 0 or not replica:
            return None
        interval = num(obs.get("interval_s"))
        win = self._win.setdefault(key, _Window())
        win.add(t, replica, (req, interval if interval and interval > 0 else 1.0), self.window_s)
        per: dict[str, float] = {}
        span: dict[str, float] = {}
        for _, r, (n, dt) in win.items:
            per[r] = per.get(r, 0.0) + n
            span[r] = span.get(r, 0.0) + dt
        if len(per) < 2 or sum(per.values()) / len(per) < self.min_mean_requests:
            return []
        # compare rates, not counts: replicas export at slightly different moments, so the
        # window may hold one more interval of one replica than of another
        rate = {r: per[r] / span[r] for r in per}
        mean = sum(rate.values()) / len(rate)
        busiest = max(rate, key=lambda r: rate[r])
        ratio = rate[busiest] / mean
        details = {"requests_by_replica": per, "busiest": busiest, "mean_rps": mean,
                   "shares": {r: v / sum(rate.values()) for r, v in rate.items()}, "window_s": self.window_s}
        if ratio > self.ratio and key not in self._active:
            self._active.add(key)
            return [_finding("load_imbalance", key, t, "warning", statistic=ratio, threshold=self.ratio,
                             method="max_over_mean", effect=ratio, details=details)]
        if ratio <= self.ratio and key in self._active:
            self._active.discard(key)
            return [_finding("load_imbalance", key, t, "info", statistic=ratio, threshold=self.ratio,
                             method="max_over_mean", details={**details, "ended": True})]
        return []

    @classmethod
    def conformance_inputs(cls, rng: np.random.Generator, incident: bool) -> list[dict[str, Any]]:
        return _serving_series(rng, share=lambda i, r: 4.0 if incident and r == 0 and i >= 40 else 1.0)


@register_anomaly("capacity")
class Capacity(_Detector):
    """Throughput of a model version above ``target`` of its capacity: ``warning``, the scale-up signal.

    Capacity is ``capacity_rps`` per replica times the replicas seen in the window;
    throughput is each replica's requests over its reported ``interval_s`` (else the
    window), summed. ``details["desired_replicas"]`` is
    ``ceil(throughput / (capacity_rps * target))``, the replica count that brings
    utilization back to the target (the Kubernetes HPA rule). The first verdict waits
    half a window after a model version is first seen, so every replica has reported.
    """

    name = "capacity"
    kinds = ("capacity",)

    def __init__(self, *, capacity_rps: float = 100.0, target: float = 0.8, window_s: float = 60.0) -> None:
        super().__init__()
        problems: list[str] = []
        _positive(problems, "capacity_rps", capacity_rps)
        if num(target) is None or not 0 < target <= 1:
            problems.append(f"target: must be in (0, 1], got {target!r}")
        _positive(problems, "window_s", window_s)
        _check(problems)
        self.capacity_rps, self.target, self.window_s = float(capacity_rps), float(target), float(window_s)
        self._win: dict[tuple[str, str], _Window] = {}
        self._first: dict[tuple[str, str], float] = {}
        self._active: set[tuple[str, str]] = set()

    def _reset(self) -> None:
        self._win.clear()
        self._first.clear()
        self._active.clear()

    def _update(self, obs: Observation, t: float) -> list[Finding] | None:
        key, req = _model_key(obs), num(obs.get("requests"))
        if key is None or req is None or req < 0:
            return None
        interval = num(obs.get("interval_s"))
        win = self._win.setdefault(key, _Window())
        win.add(t, label(obs.get("replica")), (req, interval if interval and interval > 0 else None),
                self.window_s)
        if t - self._first.setdefault(key, t) < self.window_s / 2:
            return []  # let every replica report before judging the sum
        span = t - win.items[0][0]
        reqs: dict[str, float] = {}
        secs: dict[str, float] = {}
        for _, r, (n, dt) in win.items:
            reqs[r] = reqs.get(r, 0.0) + n
            if dt is not None:
                secs[r] = secs.get(r, 0.0) + dt
        rps = sum(n / (secs.get(r) or span) for r, n in reqs.items() if secs.get(r) or span > 0)
        if not secs and span < 0.5 * self.window_s:
            return []
        replicas = len(reqs)
        capacity = self.capacity_rps * replicas
        util = rps / capacity
        desired = max(math.ceil(rps / (self.capacity_rps * self.target)), 1)
        details = {"throughput_rps": rps, "capacity_rps": capacity, "replicas": replicas,
                   "desired_replicas": desired, "utilization": util, "target": self.target}
        if util > self.target and key not in self._active:
            self._active.add(key)
            return [_finding("capacity", key, t, "warning", statistic=util, threshold=self.target,
                             method="throughput_over_capacity", effect=rps - capacity * self.target,
                             details=details)]
        if util < 0.9 * self.target and key in self._active:
            self._active.discard(key)
            return [_finding("capacity", key, t, "info", statistic=util, threshold=self.target,
                             method="throughput_over_capacity", details={**details, "ended": True})]
        return []

    @classmethod
    def conformance_inputs(cls, rng: np.random.Generator, incident: bool) -> list[dict[str, Any]]:
        # 3 replicas of 100 rps each: 40 rps per replica is 40 % busy, 95 rps is 95 %
        return _serving_series(rng, rps=95.0) if incident else _serving_series(rng)
