"""Watches that feed the fleet, serving and cost detectors from the store, for the anomaly scheduler.

Each watch has a ``name`` and ``run(store, now) -> list[Finding]``. A run reads the
points whose ``TimeUnix`` lies in ``(watermark, now - settle_s]`` (the first run:
the last ``lookback_s``), turns them into observations (see :mod:`.anomaly`), feeds
its detectors in time order (they keep their state between runs), advances the
watermark and returns the findings; the scheduler writes them. ``settle_s`` leaves
the newest seconds for the next run, so points still in the store's insert queue
are not skipped.

* :class:`FleetWatch` reads the node agent's GPU gauges and the XID and ECC counters
  from ``otel_metrics_gauge`` and ``otel_metrics_sum``. The points of one collection
  of one GPU (the instruments are read a few microseconds apart) become one
  observation. Counters may be cumulative (the agent) or delta
  (``AggregationTemporality`` 1): a cumulative series' increase is its value minus
  the previous one (its last value before the first window, then the last one seen;
  a value that went down is a reset and counts whole); a series first seen after the
  first run starts from zero.
* :class:`ServingWatch` reads ``ModelMonitor``'s delta latency histograms, request
  and error counters (summed per replica and export in SQL), and a queue-time series
  ``stethoscope.model.queue_time`` (ms; a gauge, or a histogram whose p99 is computed
  in SQL with :func:`~stethoscope.dashboards.histogram.bucket_quantile_sql`) when a
  server exports one. A replica is ``service.instance.id``.
* :class:`CostWatch` reads GPU utilization and model request counts (and the SDK's
  ``cost`` business value) for the cost detectors.

The node of a series is ``k8s.node.name`` when set, else ``host.name`` (resource
attributes), the same for GPUs and model replicas so cost can be attributed. A GPU is
its ``gpu.index``, or ``index/instance`` for a MIG instance.

Examples:
    >>> from stethoscope.config import load_config
    >>> [w.name for w in watches_from_config(load_config(environ={}))]
    ['fleet', 'serving', 'cost']
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from typing import Any

from ..dashboards.histogram import bucket_quantile_sql
from .cost import FleetCost, PredictionCost
from .findings import Finding
from .fleet import (
    GpuBusyNotWorking,
    GpuHealth,
    GpuTemperature,
    GpuThrottle,
    GpuUnderutilized,
    MemoryLeakForecast,
    PriceTable,
)
from .serving import Capacity, ErrorRate, LatencySla, LoadImbalance, QueueTime
from .sql import literal as _lit

__all__ = ["CostWatch", "FleetWatch", "ServingWatch", "watches_from_config"]

NODE = ("if(ResourceAttributes['k8s.node.name'] != '', ResourceAttributes['k8s.node.name'], "
        "ResourceAttributes['host.name'])")
REPLICA = ("if(ResourceAttributes['service.instance.id'] != '', ResourceAttributes['service.instance.id'], "
           "ResourceAttributes['host.name'])")
GPU = ("if(Attributes['gpu.mig.instance'] != '', concat(Attributes['gpu.index'], '/', Attributes['gpu.mig.instance']), "
       "Attributes['gpu.index'])")
MODEL = "Attributes['stethoscope.model']"
VERSION = "Attributes['stethoscope.model.version']"
DELTA = 1  # OTLP AggregationTemporality: 1 delta, 2 cumulative

#: Agent gauges the fleet detectors read (observation field = name without ``gpu.``).
GPU_GAUGES = ("gpu.utilization", "gpu.sm.activity", "gpu.tensor.activity", "gpu.memory.used", "gpu.memory.total",
              "gpu.temperature", "gpu.power.draw", "gpu.power.limit", "gpu.clock.sm", "gpu.throttle")


def _ts_ns(t_ns: int) -> str:
    return f"fromUnixTimestamp64Nano(toInt64({int(t_ns)}))"



def _in(names: Iterable[str]) -> str:
    return "(" + ", ".join(_lit(n) for n in names) + ")"


class _Watch(ABC):
    """Watermark handling shared by the three watches."""

    name = ""

    def __init__(self, detectors: Sequence[Any], *, lookback_s: float = 600.0, settle_s: float = 2.0) -> None:
        problems = []
        if not (isinstance(lookback_s, (int, float)) and math.isfinite(lookback_s) and lookback_s > 0):
            problems.append(f"lookback_s: must be finite and > 0, got {lookback_s!r}")
        if not (isinstance(settle_s, (int, float)) and math.isfinite(settle_s) and settle_s >= 0):
            problems.append(f"settle_s: must be finite and >= 0, got {settle_s!r}")
        if problems:
            from ..errors import ConfigError

            raise ConfigError(problems)
        self.detectors = list(detectors)
        self.lookback_s, self.settle_s = float(lookback_s), float(settle_s)
        self.watermark_ns: int | None = None
        #: Observations fed to the detectors since start.
        self.observations = 0

    @staticmethod
    def _rows(store: Any, sql: str) -> list[list[Any]]:
        data = store.query(sql, "JSONCompactEachRow").data
        return [json.loads(line) for line in data.splitlines() if line.strip()]

    def run(self, store: Any, now: float) -> list[Finding]:
        """Read the points since the watermark, feed the detectors, return their findings."""
        end = int((float(now) - self.settle_s) * 1e9)
        first = self.watermark_ns is None
        start = end - int(self.lookback_s * 1e9) if first else self.watermark_ns
        if end <= start:
            return []
        where = f"TimeUnix > {_ts_ns(start)} AND TimeUnix <= {_ts_ns(end)}"
        observations = self._observations(store, where, start, first)
        observations.sort(key=lambda o: o["time"])
        out: list[Finding] = []
        for obs in observations:
            for det in self.detectors:
                out += det.update(obs)
        self.observations += len(observations)
        self.watermark_ns = end
        return out

    @abstractmethod
    def _observations(self, store: Any, where: str, start_ns: int, first: bool) -> list[dict[str, Any]]:
        """The observations stored since ``start_ns`` that this watch's detectors read."""


class _Counters:
    """Increases of counter series, whatever their temporality."""

    def __init__(self) -> None:
        self.last: dict[tuple, float] = {}

    def seed(self, rows: Iterable[tuple[tuple, float]]) -> None:
        for key, value in rows:
            self.last.setdefault(key, float(value))

    def increase(self, key: tuple, value: float, temporality: int) -> float:
        if temporality == DELTA:
            return max(value, 0.0)
        before = self.last.get(key, 0.0)
        self.last[key] = value
        return value - before if value >= before else value


def _group(points: list[tuple[Any, ...]], gap_s: float = 1.0) -> list[dict[str, Any]]:
    """Gauge points ``(node, gpu, model, time, field, value)`` of one GPU, in time order,
    into observations: a new one starts when a field repeats or ``gap_s`` has passed."""
    out: list[dict[str, Any]] = []
    cur: dict[str, Any] | None = None
    for node, gpu, model, t, name, value in points:
        if cur is None or t - cur["time"] > gap_s or (name in cur and not isinstance(cur[name], dict)) or \
                (isinstance(name, tuple) and name[1] in cur.get(name[0], {})):
            cur = {"time": t, "node": node, "gpu": gpu, "gpu_model": model}
            out.append(cur)
        if isinstance(name, tuple):
            cur.setdefault(name[0], {})[name[1]] = value
        else:
            cur[name] = value
    return out


class FleetWatch(_Watch):
    """GPU observations for the fleet detectors (see the module docstring)."""

    name = "fleet"

    def __init__(self, detectors: Sequence[Any] | None = None, *, prices: PriceTable | None = None,
                 temperature_c: float = 85.0, underutilized_below: float = 0.3, leak_horizon_s: float = 1800.0,
                 lookback_s: float = 600.0, settle_s: float = 2.0) -> None:
        if detectors is None:
            detectors = [GpuTemperature(threshold_c=temperature_c, critical_c=max(95.0, temperature_c)),
                         GpuThrottle(threshold_c=temperature_c), GpuHealth(),
                         GpuUnderutilized(below=underutilized_below, prices=prices), GpuBusyNotWorking(),
                         MemoryLeakForecast(horizon_s=leak_horizon_s, history_s=max(1800.0, leak_horizon_s))]
        super().__init__(detectors, lookback_s=lookback_s, settle_s=settle_s)
        self.counters = _Counters()

    def _observations(self, store: Any, where: str, start_ns: int, first: bool) -> list[dict[str, Any]]:
        rows = self._rows(store, (
            f"SELECT {NODE}, {GPU}, Attributes['gpu.model'], MetricName, "
            "Attributes['gpu.throttle.reason'], toUnixTimestamp64Nano(TimeUnix), Value FROM otel_metrics_gauge "
            f"WHERE MetricName IN {_in(GPU_GAUGES)} AND {where} "
            f"ORDER BY 1, 2, 6"))
        per_gpu: dict[tuple[str, str], list[tuple[Any, ...]]] = {}
        for node, gpu, model, metric, reason, t_ns, value in rows:
            name = metric[4:]
            field: Any = ("throttle", reason) if metric == "gpu.throttle" else name
            per_gpu.setdefault((node, gpu), []).append((node, gpu, model, int(t_ns) / 1e9, field, value))
        out: list[dict[str, Any]] = []
        for points in per_gpu.values():
            out += _group(points)
        out += self._events(store, where, start_ns, first)
        return out

    def _events(self, store: Any, where: str, start_ns: int, first: bool) -> list[dict[str, Any]]:
        series = (f"{NODE}, {GPU}, MetricName, Attributes['gpu.xid'], "
                  "Attributes['gpu.ecc.type']")
        names = "('gpu.xid.errors', 'gpu.ecc.errors')"
        if first:
            self.counters.seed(
                (tuple(r[:5]), r[5]) for r in self._rows(store, (
                    f"SELECT {series}, argMax(Value, TimeUnix) FROM otel_metrics_sum "
                    f"WHERE MetricName IN {names} AND TimeUnix <= {_ts_ns(start_ns)} GROUP BY {series}")))
        rows = self._rows(store, (
            f"SELECT {series}, Attributes['gpu.model'], toUnixTimestamp64Nano(TimeUnix), Value, "
            f"AggregationTemporality FROM otel_metrics_sum WHERE MetricName IN {names} AND {where} "
            "ORDER BY 1, 2, 3, 4, 5, 7"))
        out = []
        for node, gpu, metric, xid, ecc_type, model, t_ns, value, temporality in rows:
            inc = self.counters.increase((node, gpu, metric, xid, ecc_type), float(value), int(temporality))
            if inc <= 0:
                continue
            obs: dict[str, Any] = {"time": int(t_ns) / 1e9, "node": node, "gpu": gpu, "gpu_model": model}
            if metric == "gpu.xid.errors":
                try:
                    obs["xid"] = [int(xid)] * round(inc)
                except ValueError:
                    continue
            elif ecc_type in ("uncorrected", "uncorrectable"):
                obs["ecc.uncorrectable"] = inc
            else:
                continue  # corrected ECC errors are not a fault
            out.append(obs)
        return out


class ServingWatch(_Watch):
    """Serving observations, one per replica per export, for the serving detectors."""

    name = "serving"

    def __init__(self, detectors: Sequence[Any] | None = None, *, latency_sla_ms: float = 250.0,
                 model_slas: dict[str, float] | None = None, error_rate: float = 0.01,
                 replica_capacity_rps: float = 0.0, lookback_s: float = 600.0, settle_s: float = 2.0) -> None:
        if detectors is None:
            detectors = [LatencySla(sla_ms=latency_sla_ms, slas=model_slas), ErrorRate(threshold=error_rate),
                         QueueTime(), LoadImbalance()]
            if replica_capacity_rps > 0:
                detectors.append(Capacity(capacity_rps=replica_capacity_rps))
        super().__init__(detectors, lookback_s=lookback_s, settle_s=settle_s)
        self.counters = _Counters()
        self._last_t: dict[tuple, float] = {}

    def _observations(self, store: Any, where: str, start_ns: int, first: bool) -> list[dict[str, Any]]:
        obs: dict[tuple, dict[str, Any]] = {}

        def slot(model: str, version: str, replica: str, node: str, t_ns: int) -> dict[str, Any]:
            key = (model, version, replica, int(t_ns))
            if key not in obs:
                obs[key] = {"time": int(t_ns) / 1e9, "model": model, "version": version, "replica": replica,
                            "node": node}
            return obs[key]

        ident = f"{MODEL}, {VERSION}, {REPLICA}, {NODE}"
        for model, version, replica, node, t_ns, s_ns, temporality, counts, bounds in self._rows(store, (
                f"SELECT {ident}, toUnixTimestamp64Nano(TimeUnix), toUnixTimestamp64Nano(StartTimeUnix), "
                "AggregationTemporality, BucketCounts, ExplicitBounds FROM otel_metrics_histogram "
                f"WHERE MetricName = 'stethoscope.model.latency' AND {where} AND {MODEL} != ''")):
            if int(temporality) != DELTA:
                continue  # ModelMonitor exports delta windows; cumulative latency needs a difference of buckets
            slot(model, version, replica, node, t_ns)["latency"] = {"bounds": bounds, "counts": counts}
        for model, version, replica, node, metric, t_ns, s_ns, temporality, value in self._rows(store, (
                f"SELECT {ident}, MetricName, toUnixTimestamp64Nano(TimeUnix) AS t, "
                "toUnixTimestamp64Nano(StartTimeUnix), AggregationTemporality, sum(Value) FROM otel_metrics_sum "
                "WHERE MetricName IN ('stethoscope.model.requests', 'stethoscope.model.errors') "
                f"AND {where} AND {MODEL} != '' GROUP BY 1, 2, 3, 4, 5, 6, 7, 8 ORDER BY 6")):
            field = "requests" if metric.endswith("requests") else "errors"
            key = (model, version, replica, field)
            o = slot(model, version, replica, node, t_ns)
            o[field] = self.counters.increase(key, float(value), int(temporality))
            if field == "requests":
                prev = self._last_t.get(key)
                o["interval_s"] = ((int(t_ns) - int(s_ns)) / 1e9 if int(temporality) == DELTA
                                   else (int(t_ns) / 1e9 - prev if prev is not None else None))
                self._last_t[key] = int(t_ns) / 1e9
        p99 = bucket_quantile_sql(0.99, "BucketCounts", "ExplicitBounds")
        for model, version, replica, node, t_ns, value in self._rows(store, (
                f"SELECT {ident}, toUnixTimestamp64Nano(TimeUnix), Value FROM otel_metrics_gauge "
                f"WHERE MetricName = 'stethoscope.model.queue_time' AND {where} "
                f"UNION ALL SELECT {ident}, toUnixTimestamp64Nano(TimeUnix), {p99} FROM otel_metrics_histogram "
                f"WHERE MetricName = 'stethoscope.model.queue_time' AND {where}")):
            if isinstance(value, (int, float)) and math.isfinite(value):
                slot(model, version, replica, node, t_ns)["queue_ms"] = float(value)
        for o in obs.values():
            o.setdefault("errors", 0.0)
        return list(obs.values())


class CostWatch(_Watch):
    """GPU utilization and model requests for the cost detectors."""

    name = "cost"

    def __init__(self, detectors: Sequence[Any] | None = None, *, prices: PriceTable | None = None,
                 idle_below: float = 0.3, lookback_s: float = 600.0, settle_s: float = 2.0) -> None:
        if detectors is None:
            detectors = [FleetCost(prices=prices, idle_below=idle_below), PredictionCost(prices=prices)]
        super().__init__(detectors, lookback_s=lookback_s, settle_s=settle_s)
        self.counters = _Counters()

    def _observations(self, store: Any, where: str, start_ns: int, first: bool) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for node, gpu, model, t_ns, value in self._rows(store, (
                f"SELECT {NODE}, {GPU}, Attributes['gpu.model'], "
                "toUnixTimestamp64Nano(TimeUnix), Value FROM otel_metrics_gauge "
                f"WHERE MetricName = 'gpu.utilization' AND {where}")):
            out.append({"time": int(t_ns) / 1e9, "node": node, "gpu": gpu, "gpu_model": model, "utilization": value})
        ident = f"{MODEL}, {VERSION}, {REPLICA}, {NODE}"
        per: dict[tuple, dict[str, Any]] = {}
        for model, version, replica, node, metric, t_ns, temporality, value in self._rows(store, (
                f"SELECT {ident}, MetricName, toUnixTimestamp64Nano(TimeUnix), AggregationTemporality, sum(Value) "
                "FROM otel_metrics_sum WHERE (MetricName = 'stethoscope.model.requests' OR "
                "(MetricName = 'stethoscope.model.business' AND Attributes['stethoscope.business.name'] = 'cost')) "
                f"AND {where} AND {MODEL} != '' GROUP BY 1, 2, 3, 4, 5, 6, 7 ORDER BY 6")):
            field = "requests" if metric.endswith("requests") else "cost"
            o = per.setdefault((model, version, replica, t_ns), {
                "time": int(t_ns) / 1e9, "model": model, "version": version, "replica": replica, "node": node})
            o[field] = self.counters.increase((model, version, replica, field), float(value), int(temporality))
        out += [o for o in per.values() if "requests" in o]
        return out


def _pairs(entries: Iterable[str]) -> dict[str, float]:
    out = {}
    for e in entries:
        name, _, value = e.rpartition("=")
        out[name.strip()] = float(value)
    return out


def watches_from_config(cfg: Any) -> list[Any]:
    """The fleet, serving and cost watches configured by ``cfg.anomaly`` (validated by the config)."""
    from ..config import parse_duration

    a = cfg.anomaly
    prices = PriceTable.parse(a.gpu_prices)
    lookback = parse_duration(a.lookback)
    return [
        FleetWatch(prices=prices, temperature_c=a.temperature_c, underutilized_below=a.underutilized_below,
                   leak_horizon_s=parse_duration(a.leak_horizon), lookback_s=lookback),
        ServingWatch(latency_sla_ms=a.latency_sla_ms, model_slas=_pairs(a.model_slas), error_rate=a.error_rate,
                     replica_capacity_rps=a.replica_capacity_rps, lookback_s=lookback),
        CostWatch([FleetCost(prices=prices, idle_below=a.underutilized_below,
                             bucket_s=parse_duration(a.cost_bucket), warmup=a.cost_warmup,
                             sustain_buckets=a.cost_idle_buckets),
                   PredictionCost(prices=prices)], lookback_s=lookback),
    ]
