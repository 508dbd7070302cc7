"""GPU fleet anomaly detectors: heat, throttling, XID and ECC faults, idle or stalled GPUs, memory leaks.

Each detector watches GPU observations from the node agent (one mapping per GPU
per collection, see :mod:`.anomaly`) and keeps a little state per GPU, keyed by
``(node, gpu)``. Findings name the GPU as ``node=N gpu=I`` (or the node alone for
``node_unhealthy``), are reported once when an episode starts, and again at
``info`` when it ends.

========================  ===========================  =====================================
detector (registry name)  kinds                        verdict
========================  ===========================  =====================================
``gpu_temperature``       ``gpu_temperature``          above ``threshold_c`` for ``sustain_s``
``gpu_throttle``          ``gpu_throttle``             thermal or power clock-event reasons held
``gpu_health``            ``gpu_xid``,                 XID events (critical for the XIDs in
                          ``gpu_ecc_uncorrectable``,   :data:`CRITICAL_XIDS`), uncorrectable ECC,
                          ``node_unhealthy``           and the node they happened on
``gpu_underutilized``     ``gpu_underutilized``        mean utilization below ``below`` over ``window_s``
``gpu_busy_not_working``  ``gpu_busy_not_working``     utilization high while SM/tensor activity low
``memory_leak_forecast``  ``memory_leak_forecast``     robust memory trend reaches the total within
                                                       ``horizon_s``
========================  ===========================  =====================================

Examples:
    >>> det = GpuTemperature(threshold_c=85, sustain_s=20)
    >>> obs = [{"time": t, "node": "n1", "gpu": 0, "temperature": 70 if t < 30 else 90,
    ...         "throttle": {"hw_thermal_slowdown": int(t >= 30)}} for t in range(0, 100, 10)]
    >>> [(f.kind, f.subject, f.time, f.severity, f.details["cause"]) for o in obs for f in det.update(o)]
    [('gpu_temperature', 'node=n1 gpu=0', 50.0, 'warning', 'thermal')]
    >>> attribute_throttle({"sw_power_cap": 1}, temperature=60.0, threshold_c=85.0)
    'power'
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from itertools import pairwise
from statistics import NormalDist
from typing import Any

import numpy as np

from .anomaly import Observation, register_anomaly, subject
from .findings import Finding

__all__ = [
    "CRITICAL_XIDS",
    "GpuBusyNotWorking",
    "GpuHealth",
    "GpuTemperature",
    "GpuThrottle",
    "GpuUnderutilized",
    "MemoryLeakForecast",
    "PriceTable",
    "attribute_throttle",
    "theil_sen",
]

#: XID codes treated as critical: the GPU (or node) needs a reset, a reboot or service.
#: Chosen from the "resolution bucket" column of NVIDIA's Xid catalog
#: (https://docs.nvidia.com/deploy/xid-errors/analyzing-xid-catalog.html): 48 double-bit
#: ECC error, 63/64 row-remapping event/failure, 74 NVLink error, 79 GPU fallen off the
#: bus, 92 high single-bit ECC rate, 94/95 contained/uncontained ECC error. Other XIDs
#: (mostly application faults such as 13, 31, 43) are reported as warnings.
CRITICAL_XIDS: frozenset[int] = frozenset({48, 63, 64, 74, 79, 92, 94, 95})

_THERMAL = ("sw_thermal_slowdown", "hw_thermal_slowdown")
_POWER = ("sw_power_cap", "hw_power_brake_slowdown")


# --- shared helpers (also used by serving.py and cost.py) --------------------------------


def num(v: Any) -> float | None:
    """``v`` as a finite float, else None (bools, strings, NaN and None are not numbers).

    >>> num(3), num("3"), num(float("nan")), num(True)
    (3.0, None, None, None)
    """
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        return None
    f = float(v)
    return f if math.isfinite(f) else None


def label(v: Any) -> str:
    """A subject part: strings and integers as text, anything else empty."""
    if isinstance(v, bool):
        return ""
    if isinstance(v, str):
        return v
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    return ""


class _Detector(ABC):
    """Common plumbing: validates ``time``, counts what is ignored, never raises on input."""

    name = ""
    kinds: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.n_ignored = 0

    def update(self, obs: Observation) -> Sequence[Finding]:
        if not isinstance(obs, Mapping):
            self.n_ignored += 1
            return []
        t = num(obs.get("time"))
        if t is None:
            self.n_ignored += 1
            return []
        out = self._update(obs, t)
        if out is None:
            self.n_ignored += 1
            return []
        return out

    @abstractmethod
    def _update(self, obs: Observation, t: float) -> list[Finding] | None:
        """The findings of one observation at ``t``; ``None`` when it was not usable."""

    def reset(self) -> None:
        self.n_ignored = 0
        self._reset()

    @abstractmethod
    def _reset(self) -> None:
        """Forget the subclass's state (its episodes, windows, baselines)."""


def gpu_key(obs: Observation) -> tuple[str, str] | None:
    """``(node, gpu)`` of a GPU observation, None when neither is named."""
    node, gpu = label(obs.get("node")), label(obs.get("gpu"))
    return (node, gpu) if node or gpu else None


def _check(problems: list[str]) -> None:
    if problems:
        from ..errors import ConfigError

        raise ConfigError(problems)


def _positive(problems: list[str], name: str, v: Any, *, zero: bool = False) -> None:
    f = num(v)
    if f is None or f < 0 or (f == 0 and not zero):
        problems.append(f"{name}: must be a finite number {'>= 0' if zero else '> 0'}, got {v!r}")


def attribute_throttle(throttle: Any, temperature: float | None, threshold_c: float) -> str | None:
    """``"thermal"``, ``"power"`` or None from the clock-event reasons held and the temperature.

    ``hw_slowdown`` alone (raised by both overheating and power-brake signals) is
    attributed to heat when the GPU is above ``threshold_c``, else to power.
    """
    if not isinstance(throttle, Mapping):
        return None
    on = {k for k, v in throttle.items() if num(v)}
    if on & set(_THERMAL):
        return "thermal"
    if on & set(_POWER):
        return "power"
    if "hw_slowdown" in on:
        return "thermal" if temperature is not None and temperature > threshold_c else "power"
    return None


def theil_sen(t: np.ndarray, y: np.ndarray, confidence: float = 0.95) -> tuple[float, float, float, float]:
    """Theil-Sen fit of ``y`` on ``t``: ``(slope, intercept, slope lower bound, Kendall tau-a)``.

    The slope is the median of all pairwise slopes, the intercept the median of
    ``y - slope * t``; the lower bound is Sen's (1968) order-statistic bound at the
    two-sided ``confidence``, from the normal approximation of Kendall's S (no ties);
    tau-a is the mean sign of the pairwise differences (pairs ordered by ``t``).

    >>> t = np.arange(10.0)
    >>> [round(v, 3) for v in theil_sen(t, 2 * t + 1)]
    [2.0, 1.0, 2.0, 1.0]
    """
    n = len(t)
    i, j = _pairs(n)
    dt, dy = t[j] - t[i], y[j] - y[i]
    ok = dt > 0
    if not ok.any():
        return 0.0, float(np.median(y)) if n else 0.0, 0.0, 0.0
    slopes = np.sort(dy[ok] / dt[ok])
    m = len(slopes)
    slope = float(np.median(slopes))
    intercept = float(np.median(y - slope * t))
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    sigma = math.sqrt(n * (n - 1) * (2 * n + 5) / 18)
    lo = min(max(round((m - z * sigma) / 2) - 1, 0), m - 1)
    tau = float(np.sign(dy[ok]).mean())
    return slope, intercept, float(slopes[lo]), tau


@lru_cache(maxsize=64)
def _pairs(n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.triu_indices(n, 1)


class PriceTable:
    """USD per GPU-hour by GPU model name, with a default for models not listed.

    >>> p = PriceTable({"NVIDIA H100 80GB HBM3": 3.0}, default=2.0)
    >>> p.price("NVIDIA H100 80GB HBM3"), p.price("Tesla T4")
    (3.0, 2.0)
    >>> PriceTable.parse(["NVIDIA A100-SXM4-80GB=1.8", "default=1.0"]).price("x")
    1.0
    """

    def __init__(self, prices: Mapping[str, float] | None = None, *, default: float = 2.0) -> None:
        problems: list[str] = []
        for model, price in (prices or {}).items():
            _positive(problems, f"price of {model!r}", price, zero=True)
        _positive(problems, "default price", default, zero=True)
        _check(problems)
        self.prices = {str(k): float(v) for k, v in (prices or {}).items()}
        self.default = float(default)

    @classmethod
    def parse(cls, entries: Iterable[str]) -> PriceTable:
        """From ``"MODEL=PRICE"`` strings; ``default=PRICE`` sets the default."""
        prices: dict[str, float] = {}
        default = 2.0
        problems = []
        for e in entries:
            model, sep, price = str(e).rpartition("=")
            try:
                value = float(price)
            except ValueError:
                value = math.nan
            if not sep or not model.strip() or not (math.isfinite(value) and value >= 0):
                problems.append(f"gpu price {e!r}: expected MODEL=USD_PER_HOUR with a number >= 0")
                continue
            if model.strip() == "default":
                default = value
            else:
                prices[model.strip()] = value
        _check(problems)
        return cls(prices, default=default)

    def price(self, model: str) -> float:
        """USD per hour for one GPU of ``model``."""
        return self.prices.get(model, self.default)


#: Prices used when none are configured: illustrative on-demand cloud figures, not quotes.
DEFAULT_PRICES = PriceTable({"NVIDIA H100 80GB HBM3": 3.0, "NVIDIA A100-SXM4-80GB": 1.8}, default=2.0)


class _Episode:
    """A condition that must hold for ``sustain_s`` before it counts, then until it clears."""

    __slots__ = ("active", "peak", "severity", "since")

    def __init__(self) -> None:
        self.since: float | None = None
        self.active = False
        self.peak = -math.inf
        self.severity = ""

    def step(self, t: float, holds: bool, sustain_s: float) -> str:
        """``"start"``, ``"end"`` or ``""`` for this observation."""
        if holds:
            if self.since is None:
                self.since = t
            if not self.active and t - self.since >= sustain_s:
                self.active = True
                return "start"
            return ""
        self.since, self.peak = None, -math.inf
        if self.active:
            self.active = False
            self.severity = ""
            return "end"
        return ""


def _gpu_finding(kind: str, key: tuple[str, str], t: float, severity: str, *, statistic: float,
                 threshold: float, method: str, details: Mapping[str, Any], effect: float = math.nan,
                 since: float | None = None) -> Finding:
    return Finding(time=t, kind=kind, subject=subject(node=key[0], gpu=key[1]), method=method,
                   statistic=float(statistic), threshold=float(threshold), effect=float(effect),
                   severity=severity, drifted=severity != "info",
                   window_start=since if since is not None else t, window_end=t,
                   details=dict(details), labels={"node": key[0], "gpu": key[1]})


# --- synthetic inputs for the conformance suite -----------------------------------------


def _gpu_series(rng: np.random.Generator, n: int = 120, step_s: float = 10.0, t0: float = 1.7e9,
                **overrides: Any) -> list[dict[str, Any]]:
    """``n`` observations of one busy, healthy H100 every ``step_s``; ``overrides`` maps a
    field to a function ``(i, t) -> value`` replacing the healthy value."""
    out = []
    total = 81559 * (1 << 20)
    for i in range(n):
        t = t0 + i * step_s
        util = float(np.clip(0.95 + 0.02 * rng.standard_normal(), 0, 1))
        o: dict[str, Any] = {
            "time": t, "node": "node-a", "gpu": 0, "gpu_model": "NVIDIA H100 80GB HBM3",
            "utilization": util, "sm.activity": util * 0.85, "tensor.activity": util * 0.6,
            "memory.used": 63e9 + 64e6 * rng.standard_normal(), "memory.total": total,
            "temperature": 75 + 1.5 * rng.standard_normal(), "power.draw": 640.0, "power.limit": 700.0,
            "clock.sm": 1980.0, "throttle": {r: 0 for r in (*_THERMAL, *_POWER, "hw_slowdown", "gpu_idle")},
            "xid": [], "ecc.uncorrectable": 0,
        }
        for k, f in overrides.items():
            o[k] = f(i, t)
        out.append(o)
    return out


# --- detectors ----------------------------------------------------------------------------


@register_anomaly("gpu_temperature")
class GpuTemperature(_Detector):
    """GPU temperature above ``threshold_c`` for ``sustain_s``: ``warning``, ``critical`` at
    ``critical_c``; the details say whether clocks are held down by heat or power."""

    name = "gpu_temperature"
    kinds = ("gpu_temperature",)

    def __init__(self, *, threshold_c: float = 85.0, critical_c: float = 95.0, sustain_s: float = 30.0) -> None:
        super().__init__()
        problems: list[str] = []
        _positive(problems, "threshold_c", threshold_c)
        _positive(problems, "critical_c", critical_c)
        _positive(problems, "sustain_s", sustain_s, zero=True)
        if num(critical_c) is not None and num(threshold_c) is not None and critical_c < threshold_c:
            problems.append(f"critical_c: must be >= threshold_c ({threshold_c}), got {critical_c}")
        _check(problems)
        self.threshold_c, self.critical_c, self.sustain_s = float(threshold_c), float(critical_c), float(sustain_s)
        self._state: dict[tuple[str, str], _Episode] = {}

    def _reset(self) -> None:
        self._state.clear()

    def _update(self, obs: Observation, t: float) -> list[Finding] | None:
        key, temp = gpu_key(obs), num(obs.get("temperature"))
        if key is None or temp is None:
            return None
        ep = self._state.setdefault(key, _Episode())
        event = ep.step(t, temp > self.threshold_c, self.sustain_s)
        if ep.since is not None:
            ep.peak = max(ep.peak, temp)
        cause = attribute_throttle(obs.get("throttle"), temp, self.threshold_c)
        details = {"temperature_c": temp, "peak_c": ep.peak if ep.since is not None else temp,
                   "threshold_c": self.threshold_c, "cause": cause or "none",
                   "clock_sm_mhz": num(obs.get("clock.sm")), "since": ep.since}
        severity = "critical" if temp >= self.critical_c else "warning"
        if event == "start" or (ep.active and severity == "critical" and ep.severity == "warning"):
            ep.severity = severity
            return [_gpu_finding("gpu_temperature", key, t, severity, statistic=temp, threshold=self.threshold_c,
                                 method="threshold", effect=temp - self.threshold_c, details=details,
                                 since=ep.since)]
        if event == "end":
            return [_gpu_finding("gpu_temperature", key, t, "info", statistic=temp, threshold=self.threshold_c,
                                 method="threshold", details={**details, "ended": True})]
        return []

    @classmethod
    def conformance_inputs(cls, rng: np.random.Generator, incident: bool) -> list[dict[str, Any]]:
        if not incident:
            return _gpu_series(rng)
        hot = lambda i, t: 60 <= i < 90
        return _gpu_series(rng, temperature=lambda i, t: 88 + rng.random() * 3 if hot(i, t) else 75.0,
                           throttle=lambda i, t: {"hw_thermal_slowdown": int(hot(i, t))})


@register_anomaly("gpu_throttle")
class GpuThrottle(_Detector):
    """Clocks held down by a thermal or power clock-event reason for ``sustain_s``: ``warning``.

    The cause comes from :func:`attribute_throttle`; ``gpu_idle`` and application
    clock settings are not throttling and are ignored.
    """

    name = "gpu_throttle"
    kinds = ("gpu_throttle",)

    def __init__(self, *, threshold_c: float = 85.0, sustain_s: float = 30.0) -> None:
        super().__init__()
        problems: list[str] = []
        _positive(problems, "threshold_c", threshold_c)
        _positive(problems, "sustain_s", sustain_s, zero=True)
        _check(problems)
        self.threshold_c, self.sustain_s = float(threshold_c), float(sustain_s)
        self._state: dict[tuple[str, str], _Episode] = {}

    def _reset(self) -> None:
        self._state.clear()

    def _update(self, obs: Observation, t: float) -> list[Finding] | None:
        key, throttle = gpu_key(obs), obs.get("throttle")
        if key is None or not isinstance(throttle, Mapping):
            return None
        temp = num(obs.get("temperature"))
        cause = attribute_throttle(throttle, temp, self.threshold_c)
        ep = self._state.setdefault(key, _Episode())
        event = ep.step(t, cause is not None, self.sustain_s)
        reasons = sorted(k for k, v in throttle.items() if num(v) and k != "gpu_idle")
        details = {"cause": cause or "none", "reasons": reasons, "temperature_c": temp,
                   "clock_sm_mhz": num(obs.get("clock.sm")), "power_w": num(obs.get("power.draw")),
                   "power_limit_w": num(obs.get("power.limit")), "since": ep.since}
        if event == "start":
            return [_gpu_finding("gpu_throttle", key, t, "warning", statistic=float(len(reasons)), threshold=1.0,
                                 method=f"{cause}_throttle", details=details, since=ep.since)]
        if event == "end":
            return [_gpu_finding("gpu_throttle", key, t, "info", statistic=0.0, threshold=1.0,
                                 method="throttle_cleared", details={**details, "ended": True})]
        return []

    @classmethod
    def conformance_inputs(cls, rng: np.random.Generator, incident: bool) -> list[dict[str, Any]]:
        if not incident:  # brief power-cap blips shorter than the sustain window are not reported
            return _gpu_series(rng, throttle=lambda i, t: {"sw_power_cap": int(i % 40 == 7), "gpu_idle": 0})
        return _gpu_series(rng, throttle=lambda i, t: {"sw_power_cap": int(50 <= i < 80)},
                           **{"clock.sm": lambda i, t: 1500.0 if 50 <= i < 80 else 1980.0})


@register_anomaly("gpu_health")
class GpuHealth(_Detector):
    """XID events, uncorrectable ECC errors, and the nodes they make unhealthy.

    ``xid`` is the list of XID codes that happened since the previous observation,
    ``ecc.uncorrectable`` the number of new uncorrectable ECC errors. Each XID gives a
    ``gpu_xid`` finding (``critical`` when in ``critical_xids``, else ``warning``); new
    uncorrectable errors a ``critical`` ``gpu_ecc_uncorrectable``; the first critical
    event on a node a ``critical`` ``node_unhealthy`` for ``node=N`` (once, until reset).
    """

    name = "gpu_health"
    kinds = ("gpu_xid", "gpu_ecc_uncorrectable", "node_unhealthy")

    def __init__(self, *, critical_xids: Iterable[int] = CRITICAL_XIDS) -> None:
        super().__init__()
        self.critical_xids = frozenset(int(x) for x in critical_xids)
        self._unhealthy: set[str] = set()

    def _reset(self) -> None:
        self._unhealthy.clear()

    def _update(self, obs: Observation, t: float) -> list[Finding] | None:
        key = gpu_key(obs)
        xids_raw, ecc = obs.get("xid"), num(obs.get("ecc.uncorrectable"))
        xids = [int(x) for x in xids_raw if num(x) is not None] if isinstance(xids_raw, (list, tuple)) else None
        if key is None or (xids is None and ecc is None):
            return None
        out: list[Finding] = []
        critical: list[str] = []
        for code in xids or ():
            severity = "critical" if code in self.critical_xids else "warning"
            out.append(_gpu_finding("gpu_xid", key, t, severity, statistic=float(code), threshold=0.0, method="xid",
                                    details={"xid": code, "critical": severity == "critical",
                                             "catalog": "https://docs.nvidia.com/deploy/xid-errors/"}))
            if severity == "critical":
                critical.append(f"xid {code}")
        if ecc is not None and ecc > 0:
            out.append(_gpu_finding("gpu_ecc_uncorrectable", key, t, "critical", statistic=ecc, threshold=0.0,
                                    method="ecc", details={"new_errors": ecc}))
            critical.append(f"{ecc:g} uncorrectable ECC errors")
        node = key[0]
        if critical and node not in self._unhealthy:
            self._unhealthy.add(node)
            out.append(Finding(time=t, kind="node_unhealthy", subject=subject(node=node or "unknown"),
                               method="gpu_faults", statistic=float(len(critical)), threshold=1.0,
                               severity="critical", drifted=True, window_start=t, window_end=t,
                               details={"gpu": key[1], "causes": critical}, labels={"node": node}))
        return out

    @classmethod
    def conformance_inputs(cls, rng: np.random.Generator, incident: bool) -> list[dict[str, Any]]:
        return _gpu_series(rng, xid=lambda i, t: [79] if incident and i == 60 else [])


@register_anomaly("gpu_underutilized")
class GpuUnderutilized(_Detector):
    """Mean utilization below ``below`` over the last ``window_s``: ``warning`` with the idle cost.

    The window must be covered (its oldest sample at least ``0.9 * window_s`` old)
    before a verdict; the idle cost per hour is the GPU's price from ``prices``.
    """

    name = "gpu_underutilized"
    kinds = ("gpu_underutilized",)

    def __init__(self, *, below: float = 0.3, window_s: float = 600.0, prices: PriceTable | None = None) -> None:
        super().__init__()
        problems: list[str] = []
        if num(below) is None or not 0 < below <= 1:
            problems.append(f"below: must be in (0, 1], got {below!r}")
        _positive(problems, "window_s", window_s)
        _check(problems)
        self.below, self.window_s = float(below), float(window_s)
        self.prices = prices or DEFAULT_PRICES
        self._samples: dict[tuple[str, str], deque[tuple[float, float]]] = {}
        self._active: set[tuple[str, str]] = set()

    def _reset(self) -> None:
        self._samples.clear()
        self._active.clear()

    def _update(self, obs: Observation, t: float) -> list[Finding] | None:
        key, util = gpu_key(obs), num(obs.get("utilization"))
        if key is None or util is None:
            return None
        q = self._samples.setdefault(key, deque())
        if q and t < q[-1][0]:
            return None  # out of order
        q.append((t, util))
        while q and q[0][0] < t - self.window_s:
            q.popleft()
        if t - q[0][0] < 0.9 * self.window_s:
            return []
        mean = sum(u for _, u in q) / len(q)
        model = label(obs.get("gpu_model"))
        price = self.prices.price(model)
        details = {"mean_utilization": mean, "window_s": self.window_s, "gpu_model": model,
                   "price_usd_per_hour": price, "idle_cost_usd_per_hour": price * (1 - mean),
                   "samples": len(q)}
        if mean < self.below and key not in self._active:
            self._active.add(key)
            return [_gpu_finding("gpu_underutilized", key, t, "warning", statistic=mean, threshold=self.below,
                                 method="window_mean", effect=self.below - mean, details=details, since=q[0][0])]
        if mean >= self.below and key in self._active:
            self._active.discard(key)
            return [_gpu_finding("gpu_underutilized", key, t, "info", statistic=mean, threshold=self.below,
                                 method="window_mean", details={**details, "ended": True})]
        return []

    @classmethod
    def conformance_inputs(cls, rng: np.random.Generator, incident: bool) -> list[dict[str, Any]]:
        # clean: checkpoint dips (15 s at 8 % every 5 min) are not under-use
        dip = lambda i, t: 0.08 if i % 30 == 29 else 0.95
        if not incident:
            return _gpu_series(rng, utilization=dip)
        return _gpu_series(rng, utilization=lambda i, t: 0.02 if 40 <= i < 110 else dip(i, t))


@register_anomaly("gpu_busy_not_working")
class GpuBusyNotWorking(_Detector):
    """Utilization above ``busy`` while SM activity (tensor activity when SM activity is not
    reported) stays below ``activity_below``, for ``sustain_s``: ``warning``.

    ``gpu.utilization`` only says a kernel was resident; a GPU spinning in a
    synchronisation or a tiny kernel looks fully busy while doing almost no work.
    """

    name = "gpu_busy_not_working"
    kinds = ("gpu_busy_not_working",)

    def __init__(self, *, busy: float = 0.8, activity_below: float = 0.2, sustain_s: float = 120.0) -> None:
        super().__init__()
        problems: list[str] = []
        for n, v in (("busy", busy), ("activity_below", activity_below)):
            if num(v) is None or not 0 < v <= 1:
                problems.append(f"{n}: must be in (0, 1], got {v!r}")
        _positive(problems, "sustain_s", sustain_s, zero=True)
        _check(problems)
        self.busy, self.activity_below, self.sustain_s = float(busy), float(activity_below), float(sustain_s)
        self._state: dict[tuple[str, str], _Episode] = {}

    def _reset(self) -> None:
        self._state.clear()

    def _update(self, obs: Observation, t: float) -> list[Finding] | None:
        key, util = gpu_key(obs), num(obs.get("utilization"))
        sm, tensor = num(obs.get("sm.activity")), num(obs.get("tensor.activity"))
        activity, source = (sm, "sm.activity") if sm is not None else (tensor, "tensor.activity")
        if key is None or util is None or activity is None:
            return None
        ep = self._state.setdefault(key, _Episode())
        event = ep.step(t, util >= self.busy and activity < self.activity_below, self.sustain_s)
        details = {"utilization": util, "activity": activity, "activity_source": source,
                   "sm_activity": sm, "tensor_activity": tensor, "since": ep.since}
        if event == "start":
            return [_gpu_finding("gpu_busy_not_working", key, t, "warning", statistic=activity,
                                 threshold=self.activity_below, method="utilization_vs_activity",
                                 effect=util - activity, details=details, since=ep.since)]
        if event == "end":
            return [_gpu_finding("gpu_busy_not_working", key, t, "info", statistic=activity,
                                 threshold=self.activity_below, method="utilization_vs_activity",
                                 details={**details, "ended": True})]
        return []

    @classmethod
    def conformance_inputs(cls, rng: np.random.Generator, incident: bool) -> list[dict[str, Any]]:
        stuck = lambda i, t: incident and 50 <= i < 90
        return _gpu_series(rng, **{"sm.activity": lambda i, t: 0.05 if stuck(i, t) else 0.8,
                                   "tensor.activity": lambda i, t: 0.0 if stuck(i, t) else 0.55})


@register_anomaly("memory_leak_forecast")
class MemoryLeakForecast(_Detector):
    """A rising trend in GPU memory used, forecast to reach the total within ``horizon_s``.

    Per GPU the last ``history_s`` of ``(time, memory.used)`` are kept. A drop of more
    than ``release_share`` of the total between two samples is a *release* (memory
    freed). The verdict is made on:

    * the samples since the last release and within the last ``fit_window_s``, when
      fewer than two releases are in the history: a Theil-Sen slope (median of pairwise
      slopes, robust to outliers, see :func:`theil_sen`) whose lower confidence bound
      (``confidence``) is above zero, Kendall's tau at least ``min_tau`` (growth is
      steady, not one step), a span of at least ``min_span_s``;
    * the peaks between releases otherwise (an allocate-and-free sawtooth): the same
      fit on the peaks, at least three of them, so a sawtooth whose peaks stay level
      never warns and one whose peaks climb does.

    Time to out-of-memory is ``(total - fitted now) / slope``; below ``horizon_s`` the
    detector warns once, and reports ``info`` when the trend goes away (a release that
    is not part of a sawtooth, or the forecast beyond twice the horizon). The fit runs at
    most every ``refit_s`` per GPU, on at most ``max_points`` samples (evenly thinned),
    so a fleet costs little.
    """

    name = "memory_leak_forecast"
    kinds = ("memory_leak_forecast",)

    def __init__(self, *, horizon_s: float = 1800.0, history_s: float = 1800.0, min_span_s: float = 300.0,
                 min_points: int = 8, min_tau: float = 0.6, confidence: float = 0.99,
                 release_share: float = 0.02, refit_s: float = 30.0, max_points: int = 90,
                 fit_window_s: float = 600.0) -> None:
        super().__init__()
        problems: list[str] = []
        for n, v in (("horizon_s", horizon_s), ("history_s", history_s), ("min_span_s", min_span_s),
                     ("fit_window_s", fit_window_s)):
            _positive(problems, n, v)
        _positive(problems, "refit_s", refit_s, zero=True)
        if isinstance(max_points, bool) or not isinstance(max_points, int) or max_points < min_points:
            problems.append(f"max_points: must be an integer >= min_points, got {max_points!r}")
        if isinstance(min_points, bool) or not isinstance(min_points, int) or min_points < 3:
            problems.append(f"min_points: must be an integer >= 3, got {min_points!r}")
        for n, v in (("min_tau", min_tau), ("confidence", confidence), ("release_share", release_share)):
            if num(v) is None or not 0 < v < 1:
                problems.append(f"{n}: must be in (0, 1), got {v!r}")
        _check(problems)
        self.horizon_s, self.history_s, self.min_span_s = float(horizon_s), float(history_s), float(min_span_s)
        self.min_points, self.min_tau, self.confidence = min_points, float(min_tau), float(confidence)
        self.release_share, self.refit_s, self.max_points = float(release_share), float(refit_s), max_points
        self.fit_window_s = float(fit_window_s)
        self._fitted: dict[tuple[str, str], float] = {}
        self._hist: dict[tuple[str, str], deque[tuple[float, float]]] = {}
        self._releases: dict[tuple[str, str], deque[int]] = {}
        self._count: dict[tuple[str, str], int] = {}
        self._active: set[tuple[str, str]] = set()

    def _reset(self) -> None:
        self._fitted.clear()
        self._hist.clear()
        self._releases.clear()
        self._count.clear()
        self._active.clear()

    def _update(self, obs: Observation, t: float) -> list[Finding] | None:
        key, used, total = gpu_key(obs), num(obs.get("memory.used")), num(obs.get("memory.total"))
        if key is None or used is None or total is None or total <= 0 or used < 0:
            return None
        hist = self._hist.setdefault(key, deque())
        rel = self._releases.setdefault(key, deque())
        if hist and t <= hist[-1][0]:
            return None
        n = self._count.get(key, 0)  # absolute index of this sample
        released = bool(hist) and hist[-1][1] - used > self.release_share * total
        hist.append((t, used))
        if released:
            rel.append(n)
        self._count[key] = n + 1
        while hist and hist[0][0] < t - self.history_s:
            hist.popleft()
        first = n + 1 - len(hist)
        while rel and rel[0] <= first:
            rel.popleft()
        if t - self._fitted.get(key, -math.inf) < self.refit_s and not (released and key in self._active):
            return []  # a trend fit at most every refit_s per GPU: the forecast moves slowly
        self._fitted[key] = t
        verdict = self._forecast(list(hist), [r - first for r in rel], total)
        if released and key in self._active and len(rel) < 2:  # in a sawtooth, releases are the rhythm
            self._active.discard(key)
            return [self._finding(key, t, "info", total, used, verdict, ended="memory released")]
        if verdict is None:
            return []
        if verdict["tto_s"] < self.horizon_s and key not in self._active:
            self._active.add(key)
            return [self._finding(key, t, "warning", total, used, verdict)]
        if key in self._active and verdict["tto_s"] > 2 * self.horizon_s:
            self._active.discard(key)
            return [self._finding(key, t, "info", total, used, verdict, ended="trend gone")]
        return []

    def _finding(self, key: tuple[str, str], t: float, severity: str, total: float, used: float,
                 verdict: dict[str, Any] | None, ended: str = "") -> Finding:
        v = verdict or {"tto_s": math.inf, "slope": 0.0, "mode": "none"}
        details = {"memory_used_bytes": used, "memory_total_bytes": total, "horizon_s": self.horizon_s,
                   **{k: (None if isinstance(x, float) and not math.isfinite(x) else x) for k, x in v.items()}}
        if math.isfinite(v["tto_s"]):
            details["forecast_oom_time"] = t + v["tto_s"]
        if ended:
            details["ended"] = ended
        return _gpu_finding("memory_leak_forecast", key, t, severity,
                            statistic=v["tto_s"] if math.isfinite(v["tto_s"]) else -1.0,
                            threshold=self.horizon_s, method=f"theil_sen_{v['mode']}", effect=float(v["slope"]),
                            details=details)

    def _forecast(self, hist: list[tuple[float, float]], releases: list[int], total: float) -> dict[str, Any] | None:
        if len(releases) >= 2:
            peaks = []
            for a, b in pairwise(releases):  # the complete teeth between two releases
                seg = hist[a:b]
                if seg:
                    peaks.append(max(seg, key=lambda p: p[1]))
            last = hist[releases[-1]:]  # the tooth still growing counts once it tops the previous peak
            if last and (not peaks or max(p[1] for p in last) > peaks[-1][1]):
                peaks.append(max(last, key=lambda p: p[1]))
            return self._fit(peaks, total, "peaks", min_points=3, min_span=0.0)
        start = releases[-1] if releases else 0
        recent = [p for p in hist[start:] if p[0] >= hist[-1][0] - self.fit_window_s]
        return self._fit(recent, total, "trend", min_points=self.min_points, min_span=self.min_span_s)

    def _fit(self, pts: list[tuple[float, float]], total: float, mode: str, *, min_points: int,
             min_span: float) -> dict[str, Any] | None:
        if len(pts) < min_points or pts[-1][0] - pts[0][0] < min_span:
            return None
        if len(pts) > self.max_points:  # evenly thinned, the newest point kept: O(max_points^2) pairs
            keep = np.linspace(0, len(pts) - 1, self.max_points).round().astype(int)
            pts = [pts[i] for i in keep]
        t = np.array([p[0] for p in pts]) - pts[0][0]
        y = np.array([p[1] for p in pts])
        slope, intercept, low, tau = theil_sen(t, y, self.confidence)
        if not (low > 0 and slope > 0 and tau >= self.min_tau):
            return {"tto_s": math.inf, "slope": float(slope), "slope_low": float(low), "tau": tau, "mode": mode,
                    "points": len(pts)}
        now_fit = intercept + slope * t[-1]
        tto = max(total - max(now_fit, y[-1]), 0.0) / slope
        return {"tto_s": float(tto), "slope": float(slope), "slope_low": float(low), "tau": tau, "mode": mode,
                "points": len(pts)}

    @classmethod
    def conformance_inputs(cls, rng: np.random.Generator, incident: bool) -> list[dict[str, Any]]:
        if not incident:
            # flat memory, then an allocate-and-free sawtooth with level peaks (4-minute teeth)
            return _gpu_series(rng, n=240, **{"memory.used": lambda i, t: 63e9 + 64e6 * rng.standard_normal()
                                              if i < 120 else 50e9 + 20e9 * ((i % 24) / 24)})
        # a leak of 12 MB/s from 10 minutes in: 18 GB of headroom is gone ~25 minutes later
        return _gpu_series(rng, n=240, **{"memory.used": lambda i, t: 63e9 + 64e6 * rng.standard_normal()
                                          + (12e6 * (i - 60) * 10 if i > 60 else 0.0)})
