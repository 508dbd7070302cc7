"""Cost detectors: GPU cost per hour, idle-GPU cost, cost per 1,000 predictions, cost spikes.

Prices come from a :class:`~.fleet.PriceTable` (USD per GPU-hour by GPU model, with a
default). Both detectors count cost in fixed time buckets (``bucket_s``): a GPU seen
at least once in a bucket costs its price for the whole bucket. A bucket is closed,
and judged, when the first observation of a later bucket arrives.

``fleet_cost`` watches GPU observations:

* ``gpu_cost`` (``info``) per node every ``report_s``: cost per hour by GPU model;
* ``idle_gpu_cost`` (``warning``) for the cluster when GPUs whose mean utilization in
  the bucket is below ``idle_below`` make up at least ``idle_share`` of the cost, for
  ``sustain_buckets`` buckets in a row; the details carry the idle cost of the window;
* ``cost_spike`` (``warning``) for the cluster when cost per hour exceeds ``ratio`` times
  its exponential moving average (after ``warmup`` buckets) by at least ``min_delta``.

``prediction_cost`` watches GPU and serving observations together and attributes
each node's GPU cost to the models served on it, in proportion to their requests
there (a serving observation names its node in ``node``); a model whose observations
carry ``cost`` (the SDK's ``cost_per_prediction`` business value) uses that instead.
It reports ``cost_per_prediction`` (``info``, USD per 1,000 predictions) each bucket,
and ``cost_spike`` for ``model=M version=V`` when that figure jumps above its average.

Examples:
    >>> det = FleetCost(bucket_s=60, report_s=120)
    >>> obs = [{"time": float(t), "node": "n1", "gpu": g, "gpu_model": "NVIDIA H100 80GB HBM3",
    ...         "utilization": 0.9} for t in range(0, 130, 10) for g in range(8)]
    >>> [(f.kind, f.subject, f.time, f.statistic) for o in obs for f in det.update(o)]
    [('gpu_cost', 'node=n1', 120.0, 24.0)]
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .anomaly import Observation, register_anomaly, subject
from .findings import Finding
from .fleet import (
    DEFAULT_PRICES,
    PriceTable,
    _check,
    _Detector,
    _gpu_series,
    _positive,
    gpu_key,
    label,
    num,
)

__all__ = ["FleetCost", "PredictionCost"]


@dataclass
class _Bucket:
    index: int
    gpus: dict[tuple[str, str], list[Any]] = field(default_factory=dict)  # key -> [model, util sum, n]
    models: dict[tuple[str, str], dict[str, list[float]]] = field(default_factory=dict)  # model -> node -> [req, cost]


class _Bucketed(_Detector):
    def __init__(self, bucket_s: float, prices: PriceTable | None, problems: list[str]) -> None:
        """``problems`` found by the subclass are reported together with these."""
        super().__init__()
        _positive(problems, "bucket_s", bucket_s)
        _check(problems)
        self.bucket_s = float(bucket_s)
        self.prices = prices or DEFAULT_PRICES
        self._bucket: _Bucket | None = None

    def _advance(self, t: float) -> list[Finding] | None:
        """Close the open bucket when ``t`` is past it; None when ``t`` is before it."""
        b = math.floor(t / self.bucket_s)
        out: list[Finding] = []
        if self._bucket is None:
            self._bucket = _Bucket(b)
        elif b < self._bucket.index:
            return None
        elif b > self._bucket.index:
            out = self._close(self._bucket, (self._bucket.index + 1) * self.bucket_s)
            self._bucket = _Bucket(b)
        return out

    def _add_gpu(self, obs: Observation) -> bool:
        key = gpu_key(obs)
        if key is None or self._bucket is None:
            return False
        util = num(obs.get("utilization"))
        slot = self._bucket.gpus.setdefault(key, [label(obs.get("gpu_model")), 0.0, 0])
        if util is not None:
            slot[1] += util
            slot[2] += 1
        return True

    @abstractmethod
    def _close(self, bucket: _Bucket, end: float) -> list[Finding]:
        """The findings of a bucket that ended at ``end``."""


@register_anomaly("fleet_cost")
class FleetCost(_Bucketed):
    """GPU cost per node, idle-GPU cost and cost spikes for a cluster; see the module docstring."""

    name = "fleet_cost"
    kinds = ("gpu_cost", "idle_gpu_cost", "cost_spike")

    def __init__(self, *, prices: PriceTable | None = None, bucket_s: float = 300.0, report_s: float = 3600.0,
                 idle_below: float = 0.3, idle_share: float = 0.25, sustain_buckets: int = 2,
                 ratio: float = 1.5, alpha: float = 0.1, warmup: int = 6, min_delta: float = 1.0,
                 cluster: str = "default") -> None:
        problems: list[str] = []
        _positive(problems, "report_s", report_s)
        for n, v in (("idle_below", idle_below), ("idle_share", idle_share), ("alpha", alpha)):
            if num(v) is None or not 0 < v <= 1:
                problems.append(f"{n}: must be in (0, 1], got {v!r}")
        for n, v in (("sustain_buckets", sustain_buckets), ("warmup", warmup)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                problems.append(f"{n}: must be an integer >= 1, got {v!r}")
        if num(ratio) is None or ratio <= 1:
            problems.append(f"ratio: must be a number > 1, got {ratio!r}")
        _positive(problems, "min_delta", min_delta, zero=True)
        super().__init__(bucket_s, prices, problems)
        self.report_s, self.idle_below, self.idle_share = float(report_s), float(idle_below), float(idle_share)
        self.sustain_buckets, self.ratio, self.alpha, self.warmup = sustain_buckets, float(ratio), float(alpha), warmup
        self.min_delta, self.cluster = float(min_delta), cluster
        self._reset()

    def _reset(self) -> None:
        self._bucket = None
        self._idle_run = 0
        self._idle_cost = 0.0
        self._idle_active = False
        self._ema: float | None = None
        self._seen = 0
        self._spike = False

    def _update(self, obs: Observation, t: float) -> list[Finding] | None:
        if gpu_key(obs) is None:
            return None
        out = self._advance(t)
        if out is None or not self._add_gpu(obs):
            return None
        return out

    def _cluster_finding(self, kind: str, t: float, severity: str, statistic: float, threshold: float,
                         method: str, details: Mapping[str, Any], start: float) -> Finding:
        return Finding(time=t, kind=kind, subject=subject(cluster=self.cluster), method=method,
                       statistic=float(statistic), threshold=float(threshold), severity=severity,
                       drifted=severity != "info", window_start=start, window_end=t, details=dict(details),
                       labels={"cluster": self.cluster})

    def _close(self, bucket: _Bucket, end: float) -> list[Finding]:
        out: list[Finding] = []
        start = end - self.bucket_s
        per_node: dict[str, dict[str, list[float]]] = {}
        total = idle = 0.0
        idle_gpus = []
        for (node, gpu), (model, usum, n) in sorted(bucket.gpus.items()):
            price = self.prices.price(model)
            total += price
            slot = per_node.setdefault(node, {}).setdefault(model, [0, 0.0])
            slot[0] += 1
            slot[1] += price
            if n and usum / n < self.idle_below:
                idle += price
                idle_gpus.append(subject(node=node, gpu=gpu))
        if end % self.report_s < 1e-6 * self.report_s:
            for node, models in per_node.items():
                cost = sum(c for _, c in models.values())
                out.append(Finding(time=end, kind="gpu_cost", subject=subject(node=node), method="price_table",
                                   statistic=cost, threshold=0.0, severity="info", window_start=start,
                                   window_end=end, labels={"node": node},
                                   details={"usd_per_hour": cost, "by_model": {m: {"gpus": g, "usd_per_hour": c}
                                                                               for m, (g, c) in models.items()}}))
        # idle GPUs
        share = idle / total if total else 0.0
        if share >= self.idle_share:
            self._idle_run += 1
            self._idle_cost += idle * self.bucket_s / 3600
        else:
            if self._idle_active:
                out.append(self._cluster_finding("idle_gpu_cost", end, "info", share, self.idle_share, "idle_share",
                                                 {"idle_usd_per_hour": idle, "ended": True}, start))
            self._idle_run, self._idle_cost, self._idle_active = 0, 0.0, False
        if self._idle_run >= self.sustain_buckets and not self._idle_active:
            self._idle_active = True
            out.append(self._cluster_finding(
                "idle_gpu_cost", end, "warning", share, self.idle_share, "idle_share",
                {"idle_usd_per_hour": idle, "total_usd_per_hour": total, "idle_gpus": idle_gpus,
                 "idle_usd_in_window": self._idle_cost, "window_s": self._idle_run * self.bucket_s,
                 "idle_below": self.idle_below}, end - self._idle_run * self.bucket_s))
        # cost spikes against the moving average
        if self._ema is not None and self._seen >= self.warmup:
            r = total / self._ema if self._ema > 0 else math.inf
            details = {"usd_per_hour": total, "baseline_usd_per_hour": self._ema, "ratio": r}
            if r > self.ratio and total - self._ema >= self.min_delta and not self._spike:
                self._spike = True
                out.append(self._cluster_finding("cost_spike", end, "warning", r, self.ratio, "ema_ratio",
                                                 details, start))
            elif self._spike and r < 1 + (self.ratio - 1) / 2:
                self._spike = False
                out.append(self._cluster_finding("cost_spike", end, "info", r, self.ratio, "ema_ratio",
                                                 {**details, "ended": True}, start))
        self._ema = total if self._ema is None else self._ema + self.alpha * (total - self._ema)
        self._seen += 1
        return out

    @classmethod
    def conformance_inputs(cls, rng: np.random.Generator, incident: bool) -> list[dict[str, Any]]:
        # two 8-GPU nodes for 2 hours, one reading per GPU per minute; the incident: two more
        # nodes join after 80 minutes (cost doubles, above the spike ratio) and sit idle
        out = []
        nodes = ["node-a", "node-b", "node-c", "node-d"]
        for i in range(120):
            t = 1.7e9 + 60.0 * i
            for node in nodes[:4 if incident and i >= 80 else 2]:
                for g in range(8):
                    idle = node in ("node-c", "node-d")
                    out.append({"time": t, "node": node, "gpu": g, "gpu_model": "NVIDIA H100 80GB HBM3",
                                "utilization": 0.01 if idle else float(np.clip(0.9 + 0.05 * rng.standard_normal(),
                                                                               0, 1))})
        return out


@register_anomaly("prediction_cost")
class PredictionCost(_Bucketed):
    """Cost per 1,000 predictions per model version, and its spikes; see the module docstring."""

    name = "prediction_cost"
    kinds = ("cost_per_prediction", "cost_spike")

    def __init__(self, *, prices: PriceTable | None = None, bucket_s: float = 600.0, ratio: float = 1.5,
                 alpha: float = 0.2, warmup: int = 3, min_requests: int = 100) -> None:
        problems: list[str] = []
        if num(ratio) is None or ratio <= 1:
            problems.append(f"ratio: must be a number > 1, got {ratio!r}")
        if num(alpha) is None or not 0 < alpha <= 1:
            problems.append(f"alpha: must be in (0, 1], got {alpha!r}")
        for n, v in (("warmup", warmup), ("min_requests", min_requests)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                problems.append(f"{n}: must be an integer >= 1, got {v!r}")
        super().__init__(bucket_s, prices, problems)
        self.ratio, self.alpha, self.warmup, self.min_requests = float(ratio), float(alpha), warmup, min_requests
        self._reset()

    def _reset(self) -> None:
        self._bucket = None
        self._ema: dict[tuple[str, str], float] = {}
        self._seen: dict[tuple[str, str], int] = {}
        self._spike: set[tuple[str, str]] = set()

    def _update(self, obs: Observation, t: float) -> list[Finding] | None:
        model = label(obs.get("model"))
        if model:
            req = num(obs.get("requests"))
            if req is None or req < 0:
                return None
            out = self._advance(t)
            if out is None or self._bucket is None:
                return None
            key = (model, label(obs.get("version")))
            slot = self._bucket.models.setdefault(key, {}).setdefault(label(obs.get("node")), [0.0, 0.0])
            slot[0] += req
            slot[1] += max(num(obs.get("cost")) or 0.0, 0.0)
            return out
        if gpu_key(obs) is None:
            return None
        out = self._advance(t)
        if out is None or not self._add_gpu(obs):
            return None
        return out

    def _close(self, bucket: _Bucket, end: float) -> list[Finding]:
        hours = self.bucket_s / 3600
        node_cost: dict[str, float] = {}
        for (node, _), (model, _, _) in bucket.gpus.items():
            node_cost[node] = node_cost.get(node, 0.0) + self.prices.price(model) * hours
        node_requests: dict[str, float] = {}
        for nodes in bucket.models.values():
            for node, (req, _) in nodes.items():
                node_requests[node] = node_requests.get(node, 0.0) + req
        out: list[Finding] = []
        for key, nodes in sorted(bucket.models.items()):
            requests = sum(r for r, _ in nodes.values())
            direct = sum(c for _, c in nodes.values())
            if direct > 0:
                cost, method = direct, "reported_cost"
            else:
                cost = sum(node_cost.get(n, 0.0) * r / node_requests[n] for n, (r, _) in nodes.items()
                           if node_requests.get(n))
                method = "gpu_share"
            if requests < self.min_requests or cost <= 0:
                continue  # not attributable in this bucket
            per_k = 1000 * cost / requests
            base = {"usd": cost, "predictions": requests, "usd_per_1k": per_k, "method": method,
                    "nodes": sorted(n for n in nodes if n)}
            common = {"model": key[0], "model_version": key[1], "window_start": end - self.bucket_s,
                      "window_end": end, "method": method}
            subj = subject(model=key[0], version=key[1])
            out.append(Finding(time=end, kind="cost_per_prediction", subject=subj, statistic=per_k, threshold=0.0,
                               severity="info", details=base, **common))
            ema = self._ema.get(key)
            if ema is not None and self._seen.get(key, 0) >= self.warmup:
                r = per_k / ema
                if r > self.ratio and key not in self._spike:
                    self._spike.add(key)
                    out.append(Finding(time=end, kind="cost_spike", subject=subj, statistic=r,
                                       threshold=self.ratio, severity="warning", drifted=True,
                                       details={**base, "baseline_usd_per_1k": ema, "ratio": r}, **common))
                elif key in self._spike and r < 1 + (self.ratio - 1) / 2:
                    self._spike.discard(key)
                    out.append(Finding(time=end, kind="cost_spike", subject=subj, statistic=r,
                                       threshold=self.ratio, severity="info",
                                       details={**base, "baseline_usd_per_1k": ema, "ratio": r, "ended": True},
                                       **common))
            self._ema[key] = per_k if ema is None else ema + self.alpha * (per_k - ema)
            self._seen[key] = self._seen.get(key, 0) + 1
        return out

    @classmethod
    def conformance_inputs(cls, rng: np.random.Generator, incident: bool) -> list[dict[str, Any]]:
        # one 8-GPU node serving one model for 3 hours; the incident: traffic falls to a quarter
        # after 2 hours while the GPUs stay, so each prediction costs four times as much
        gpus = [_gpu_series(rng, n=180, step_s=60.0, gpu=lambda i, t, g=g: g) for g in range(8)]
        out: list[dict[str, Any]] = []
        for i in range(180):
            out += [series[i] for series in gpus]
            rps = 50.0 if incident and i >= 120 else 200.0
            out.append({"time": gpus[0][i]["time"] + 0.5, "model": "fraud", "version": "3", "node": "node-a",
                        "replica": "r0", "requests": int(rng.poisson(rps * 60)), "errors": 0})
        return out
