"""Simulated workloads for the SDK: a data-parallel training job and served models, with scripted incidents.

They drive the real :class:`~.training.TrainingMonitor` and
:class:`~.model.ModelMonitor` (real OTLP to a real collector); only the numbers
they report are made up. ``stethoscope demo``, the end-to-end tests and the
benchmarks use them. Times are *simulated seconds* since :meth:`start`, read from
``clock``; with a speed-up the clock runs faster than the wall and the points are
still stamped with the wall time when they were reported.

A :class:`SimulatedTrainingJob` has ``world_size`` ranks spread over ``nodes``
(``gpus_per_node`` each, rank ``r`` on node ``r // gpus_per_node``, GPU
``r % gpus_per_node``), stepping every ``step_s``: loss decaying towards a floor
with a little noise, gradient norms around 1, phases data/forward/backward/optimizer.
Incidents: :class:`SlowRank` (a rank's compute takes ``factor`` times longer),
:class:`LossSpike` (the loss and gradient norm jump for ``steps`` steps),
:class:`InputStall` (every rank waits ``data_wait_s`` for its input batch),
:class:`NaNLoss` (one step's loss is NaN).

A :class:`SimulatedModelService` serves ``replicas`` copies of one model at ``rps``
requests/s with ``d`` features drawn from a fixed distribution, a logistic-looking
prediction and confidence, and log-normal latencies. Incidents:
:class:`FeatureShift` (one feature's mean moves by ``shift`` standard deviations),
:class:`LatencyRegression` (latencies multiplied by ``factor``), :class:`ErrorBurst`
(a share of requests fail).

Examples:
    >>> job = SimulatedTrainingJob("llm", world_size=4, gpus_per_node=2, seed=1,
    ...                            incidents=[SlowRank(rank=3, start_s=10, factor=1.2)])
    >>> [job.node_of(r) for r in range(4)], job.gpu_of(3)
    (['node-0', 'node-0', 'node-1', 'node-1'], 1)
    >>> a, b = job.step_values(rank=0, step=20, t=20.0), job.step_values(rank=3, step=20, t=20.0)
    >>> round(b["compute"] / a["compute"], 1)
    1.2
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from stethoscope.errors import ConfigError

__all__ = [
    "ErrorBurst",
    "FeatureShift",
    "InputStall",
    "LatencyRegression",
    "LossSpike",
    "NaNLoss",
    "SimClock",
    "SimulatedModelService",
    "SimulatedTrainingJob",
    "SlowRank",
]


class SimClock:
    """Simulated seconds since :meth:`start`, running ``speedup`` times faster than ``time.monotonic``."""

    def __init__(self, speedup: float = 1.0, wall: Callable[[], float] = time.monotonic) -> None:
        if not (isinstance(speedup, (int, float)) and math.isfinite(speedup) and speedup > 0):
            raise ConfigError([f"speedup: must be a finite number > 0, got {speedup!r}"])
        self.speedup = float(speedup)
        self._wall = wall
        self._t0: float | None = None

    def start(self) -> None:
        if self._t0 is None:
            self._t0 = self._wall()

    def __call__(self) -> float:
        if self._t0 is None:
            return 0.0
        return (self._wall() - self._t0) * self.speedup

    def wall_delay(self, sim_s: float) -> float:
        """How many wall seconds ``sim_s`` simulated seconds take."""
        return sim_s / self.speedup


# -- training incidents --------------------------------------------------------------------


@dataclass(frozen=True)
class SlowRank:
    """From ``start_s`` (for ``duration_s``, default forever) one rank's compute takes ``factor`` times longer."""

    rank: int
    start_s: float
    factor: float = 1.15
    duration_s: float = math.inf

    def active(self, t: float) -> bool:
        return self.start_s <= t < self.start_s + self.duration_s


@dataclass(frozen=True)
class LossSpike:
    """At ``at_s`` the loss is multiplied by ``factor`` (and the gradient norm by ``2 * factor``) for ``steps`` steps."""

    at_s: float
    factor: float = 3.0
    steps: int = 2


@dataclass(frozen=True)
class InputStall:
    """From ``start_s`` for ``duration_s`` every rank waits ``data_wait_s`` for each input batch."""

    start_s: float
    duration_s: float
    data_wait_s: float = 0.8

    def active(self, t: float) -> bool:
        return self.start_s <= t < self.start_s + self.duration_s


@dataclass(frozen=True)
class NaNLoss:
    """At ``at_s`` one rank (``rank``; -1 for all) reports a NaN loss for one step."""

    at_s: float
    rank: int = -1


TrainingIncident = SlowRank | LossSpike | InputStall | NaNLoss


class SimulatedTrainingJob:
    """A data-parallel job of ``world_size`` ranks reporting through one TrainingMonitor each.

    ``monitor_factory(rank, node, gpu, clock) -> TrainingMonitor`` builds the
    monitors (the demo points them at its collector); ``clock`` reads simulated
    seconds. :meth:`start` steps every rank every ``step_s`` simulated seconds on
    one thread until :meth:`stop`.
    """

    def __init__(self, job: str, *, world_size: int = 32, gpus_per_node: int = 8, step_s: float = 0.5,
                 tokens_per_step: int = 32_768, seed: int = 0, incidents: Iterable[TrainingIncident] = (),
                 node_names: Sequence[str] | None = None) -> None:
        problems = []
        if not isinstance(world_size, int) or world_size < 1:
            problems.append(f"world_size: must be an integer >= 1, got {world_size!r}")
        if not isinstance(gpus_per_node, int) or gpus_per_node < 1:
            problems.append(f"gpus_per_node: must be an integer >= 1, got {gpus_per_node!r}")
        if not (isinstance(step_s, (int, float)) and step_s > 0):
            problems.append(f"step_s: must be > 0, got {step_s!r}")
        incidents = tuple(incidents)
        for inc in incidents:
            if isinstance(inc, SlowRank) and not (isinstance(world_size, int) and 0 <= inc.rank < world_size):
                problems.append(f"SlowRank: rank {inc.rank} is not a rank of a {world_size}-rank job")
        if problems:
            raise ConfigError(problems)
        self.job, self.world_size, self.gpus_per_node = job, world_size, gpus_per_node
        self.step_s, self.tokens_per_step, self.seed, self.incidents = float(step_s), tokens_per_step, seed, incidents
        n_nodes = -(-world_size // gpus_per_node)
        self.nodes = list(node_names) if node_names else [f"node-{i}" for i in range(n_nodes)]
        if len(self.nodes) < n_nodes:
            raise ConfigError([f"node_names: {n_nodes} nodes needed for {world_size} ranks, got {len(self.nodes)}"])
        self.monitors: list[Any] = []
        self.steps_done = 0
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._clock: Callable[[], float] = lambda: 0.0

    def node_of(self, rank: int) -> str:
        return self.nodes[rank // self.gpus_per_node]

    def gpu_of(self, rank: int) -> int:
        return rank % self.gpus_per_node

    def _noise(self, rank: int, step: int, key: int) -> float:
        """A standard normal value, the same for the same (seed, rank, step, key)."""
        return float(np.random.default_rng((self.seed, rank, step, key)).standard_normal())

    def step_values(self, rank: int, step: int, t: float) -> dict[str, Any]:
        """What rank ``rank`` reports for step ``step`` at simulated time ``t``."""
        loss = 1.8 + 2.2 * math.exp(-step / 400.0) + 0.02 * self._noise(0, step, 1) + 0.005 * self._noise(rank, step, 2)
        grad = 1.0 + 0.04 * self._noise(rank, step, 3)
        compute = self.step_s * 0.9 * (1.0 + 0.01 * self._noise(rank, step, 4))
        data_wait = self.step_s * 0.04 * (1.0 + 0.1 * abs(self._noise(rank, step, 5)))
        for inc in self.incidents:
            if isinstance(inc, SlowRank) and inc.rank == rank and inc.active(t):
                compute *= inc.factor
            elif isinstance(inc, LossSpike) and inc.at_s <= t and step < self._spike_step(inc) + inc.steps:
                if step >= self._spike_step(inc):
                    loss *= inc.factor
                    grad *= 2 * inc.factor
            elif isinstance(inc, InputStall) and inc.active(t):
                data_wait = inc.data_wait_s * (1.0 + 0.05 * abs(self._noise(rank, step, 6)))
            elif isinstance(inc, NaNLoss) and inc.rank in (-1, rank) and step == self._spike_step(inc):
                loss = math.nan
        phases = {"data": data_wait, "forward": compute * 0.35, "backward": compute * 0.5, "optimizer": compute * 0.15}
        return {"loss": loss, "grad_norm": grad, "lr": 3e-4, "tokens": self.tokens_per_step,
                "samples": self.tokens_per_step // 2048, "step_time": data_wait + compute, "data_wait": data_wait,
                "compute": compute, "phases": phases}

    def _spike_step(self, inc: LossSpike | NaNLoss) -> int:
        """The first step at or after the incident's time."""
        return int(math.ceil(inc.at_s / self.step_s))

    def start(self, monitor_factory: Callable[[int, str, int, Callable[[], float]], Any],
              clock: Callable[[], float]) -> None:
        self._clock = clock
        self.monitors = []
        for r in range(self.world_size):
            vt = [0.0]
            self.monitors.append((monitor_factory(r, self.node_of(r), self.gpu_of(r), lambda vt=vt: vt[0]), vt))
        self._thread = threading.Thread(target=self._run, name=f"sim-train-{self.job}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        step = 0
        while not self._stop.is_set():
            t = self._clock()
            due = int(t / self.step_s)
            while step < due and not self._stop.is_set():
                step += 1
                ts = step * self.step_s
                for rank, (tm, vt) in enumerate(self.monitors):
                    v = self.step_values(rank, step, ts)
                    for name, secs in v["phases"].items():
                        with tm.phase(name):
                            vt[0] += secs
                    tm.step(loss=v["loss"], grad_norm=v["grad_norm"], lr=v["lr"], tokens=v["tokens"],
                            samples=v["samples"], step_time=v["step_time"], data_wait=v["data_wait"])
                self.steps_done = step
            self._stop.wait(0.05)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        for tm, _ in self.monitors:
            tm.close()


# -- serving incidents ----------------------------------------------------------------------


@dataclass(frozen=True)
class FeatureShift:
    """From ``start_s`` feature ``feature`` moves by ``shift`` standard deviations."""

    start_s: float
    feature: int = 0
    shift: float = 1.0


@dataclass(frozen=True)
class LatencyRegression:
    """From ``start_s`` (for ``duration_s``) latencies are ``factor`` times longer."""

    start_s: float
    factor: float = 5.0
    duration_s: float = math.inf

    def active(self, t: float) -> bool:
        return self.start_s <= t < self.start_s + self.duration_s


@dataclass(frozen=True)
class ErrorBurst:
    """From ``start_s`` for ``duration_s`` a share ``rate`` of requests fails."""

    start_s: float
    duration_s: float
    rate: float = 0.1

    def active(self, t: float) -> bool:
        return self.start_s <= t < self.start_s + self.duration_s


ServingIncident = FeatureShift | LatencyRegression | ErrorBurst


class SimulatedModelService:
    """``replicas`` replicas of one model, each with its own ModelMonitor, serving ``rps`` requests/s in all.

    ``monitor_factory(replica) -> ModelMonitor`` builds the monitors. Requests are
    recorded in batches every ``tick_s`` simulated seconds with ``record_batch``.
    """

    def __init__(self, model: str, version: str = "1", *, replicas: int = 2, rps: float = 50.0, d: int = 8,
                 latency_ms: float = 40.0, seed: int = 0, incidents: Iterable[ServingIncident] = (),
                 tick_s: float = 0.5) -> None:
        problems = []
        if not isinstance(replicas, int) or replicas < 1:
            problems.append(f"replicas: must be an integer >= 1, got {replicas!r}")
        if not (isinstance(rps, (int, float)) and rps > 0):
            problems.append(f"rps: must be > 0, got {rps!r}")
        if not isinstance(d, int) or d < 1:
            problems.append(f"d: must be an integer >= 1, got {d!r}")
        incidents = tuple(incidents)
        for inc in incidents:
            if isinstance(inc, FeatureShift) and not (isinstance(d, int) and 0 <= inc.feature < d):
                problems.append(f"FeatureShift: feature {inc.feature} is not one of {d} features")
        if problems:
            raise ConfigError(problems)
        self.model, self.version, self.replicas, self.rps, self.d = model, version, replicas, float(rps), d
        self.latency_ms, self.seed, self.incidents, self.tick_s = latency_ms, seed, incidents, tick_s
        self.feature_names = [f"x{i}" for i in range(d)]
        self.monitors: list[Any] = []
        self.requests = 0
        self._rng = np.random.default_rng(seed)
        self._weights = np.random.default_rng(seed + 1).normal(0, 1, d)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._clock: Callable[[], float] = lambda: 0.0

    def batch(self, n: int, t: float) -> dict[str, Any]:
        """``n`` requests at simulated time ``t``: features, predictions, confidences, latencies, failures."""
        x = self._rng.normal(0.0, 1.0, (n, self.d))
        lat = self.latency_ms * np.exp(self._rng.normal(0.0, 0.35, n))
        fail = np.zeros(n, dtype=bool)
        for inc in self.incidents:
            if isinstance(inc, FeatureShift) and t >= inc.start_s:
                x[:, inc.feature] += inc.shift
            elif isinstance(inc, LatencyRegression) and inc.active(t):
                lat = lat * inc.factor
            elif isinstance(inc, ErrorBurst) and inc.active(t):
                fail = self._rng.random(n) < inc.rate
        z = x @ self._weights / math.sqrt(self.d)
        p = 1.0 / (1.0 + np.exp(-z))
        return {"features": x, "prediction": (p > 0.5).astype(float), "confidence": np.maximum(p, 1 - p),
                "latency_ms": lat, "failed": fail}

    def start(self, monitor_factory: Callable[[int], Any], clock: Callable[[], float]) -> None:
        self._clock = clock
        self.monitors = [monitor_factory(r) for r in range(self.replicas)]
        self._thread = threading.Thread(target=self._run, name=f"sim-serve-{self.model}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        ticks = 0
        share = [1.0 / self.replicas] * self.replicas
        while not self._stop.is_set():
            due = int(self._clock() / self.tick_s)
            while ticks < due and not self._stop.is_set():
                ticks += 1
                t = ticks * self.tick_s
                for r, mm in enumerate(self.monitors):
                    n = int(self._rng.poisson(self.rps * self.tick_s * share[r]))
                    if n == 0:
                        continue
                    b = self.batch(n, t)
                    ok = ~b["failed"]
                    if ok.any():
                        mm.record_batch(b["features"][ok], b["prediction"][ok], b["confidence"][ok],
                                        b["latency_ms"][ok])
                    if (~ok).any():
                        mm.error("request_failed", int((~ok).sum()))
                    self.requests += n
            self._stop.wait(0.05)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        for mm in self.monitors:
            mm.close()


def incident_time(inc: Any) -> float:
    """When an incident starts, in simulated seconds."""
    return float(getattr(inc, "start_s", getattr(inc, "at_s", 0.0)))


def describe(inc: Any) -> Mapping[str, Any]:
    """An incident as a plain mapping (its type name under ``type``)."""
    return {"type": type(inc).__name__, **{k: getattr(inc, k) for k in inc.__dataclass_fields__}}
