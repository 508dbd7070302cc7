"""``TrainingMonitor``: per-step training signals with sub-second timestamps.

Call :meth:`TrainingMonitor.step` once per optimizer step and wrap the parts of
the step in :meth:`TrainingMonitor.phase`. Each step becomes one data point
per value, timestamped when ``step`` was called, on these gauges:

===================================  =====  ====================================
``stethoscope.train.loss``           1      last finite loss
``stethoscope.train.grad_norm``      1      global gradient norm
``stethoscope.train.lr``             1      learning rate
``stethoscope.train.tokens``         1      tokens in the step
``stethoscope.train.samples``        1      samples in the step
``stethoscope.train.step_time``      s      given, else time since the previous step
``stethoscope.train.data_wait``      s      given, else the ``data`` phase
``stethoscope.train.phase.time``     s      per phase (attribute ``stethoscope.train.phase``)
``stethoscope.train.step``           1      the step counter
``stethoscope.train.<name>``         1      values from :meth:`observe` (the torch hooks)
===================================  =====  ====================================

plus delta sums ``stethoscope.train.steps`` and ``stethoscope.train.nonfinite``
(attribute ``stethoscope.train.value``: which value was NaN or infinite). A
non-finite value is the signal, not noise: it is counted, the step is always
exported, and the gauge keeps the last finite value. Steps are buffered and
exported in batches every ``export_interval_s``; above ``max_steps_per_s``
steps are thinned (every step still counts, non-finite ones are always kept).
Every point carries ``stethoscope.train.job``, ``.rank``, ``.world_size`` and,
when given, ``host.name`` (node) and ``gpu.index``/``gpu.uuid``, so steps join
with the node agent's GPU metrics.

Examples:
    >>> clock = iter([0.0, 0.125, 0.125, 0.5, 0.75, 1.25]).__next__   # a fake perf_counter
    >>> from stethoscope.agents.sdk.memory import InMemoryExporter
    >>> tm = TrainingMonitor("llm-7b", rank=0, world_size=8, gpu=3, start=False, clock=clock,
    ...                      metric_exporter=InMemoryExporter())
    >>> with tm.phase("data"):
    ...     pass
    >>> with tm.phase("forward"):
    ...     pass
    >>> tm.step(loss=2.5, lr=3e-4)
    True
    >>> tm.step(loss=float("nan"))
    True
    >>> tm.flush()
    True
    >>> [p.value for p in tm.metric_exporter.points("stethoscope.train.loss")]
    [2.5, 2.5]
    >>> [p.value for p in tm.metric_exporter.points("stethoscope.train.step_time")]
    [0.5, 0.5]
    >>> [(dict(p.attributes)["stethoscope.train.value"], p.value)
    ...  for p in tm.metric_exporter.points("stethoscope.train.nonfinite")]
    [('loss', 1)]
    >>> tm.close()
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Gauge,
    Metric,
    MetricExporter,
    NumberDataPoint,
    Sum,
)

from stethoscope.errors import ConfigError

from ..daemon import DEFAULT_ENDPOINT
from ..resource import build_resource
from .drops import DropCounter
from .export import Delivery
from .lifecycle import closer

__all__ = ["TrainingMonitor", "TrainingMonitorSettings", "STEP_VALUES"]

_log = logging.getLogger("stethoscope.agents.sdk")

STEP_VALUES: Mapping[str, str] = MappingProxyType({
    "loss": "1", "grad_norm": "1", "lr": "1", "tokens": "1", "samples": "1", "step_time": "s", "data_wait": "s",
})
"""The values :meth:`TrainingMonitor.step` takes, with their units."""
_PREFIX = "stethoscope.train."
MiB = 1024 * 1024


def _pos(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


@dataclass(frozen=True)
class TrainingMonitorSettings:
    """Everything a :class:`TrainingMonitor` is built from; :meth:`problems` lists every mistake."""

    job: str
    rank: int = 0
    world_size: int = 1
    node: str | None = None
    gpu: str | None = None
    endpoint: str = DEFAULT_ENDPOINT
    service_name: str | None = None
    export_interval_s: float = 5.0
    max_steps_per_s: float | None = 100.0
    """Export at most this many steps per second (None: every step)."""
    max_buffered_steps: int = 50_000
    resource_attributes: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    headers: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    timeout_s: float = 10.0
    spool_dir: str | None = None

    def problems(self) -> list[str]:
        out = []
        if not (isinstance(self.job, str) and self.job):
            out.append(f"job: must be a non-empty string, got {self.job!r}")
        if not (isinstance(self.world_size, int) and not isinstance(self.world_size, bool) and self.world_size > 0):
            out.append(f"world_size: must be a positive integer, got {self.world_size!r}")
        elif not (isinstance(self.rank, int) and not isinstance(self.rank, bool) and 0 <= self.rank < self.world_size):
            out.append(f"rank: must be an integer in [0, world_size), got {self.rank!r}")
        if not (isinstance(self.endpoint, str) and self.endpoint.startswith(("http://", "https://"))):
            out.append(f"endpoint: must be an http(s) base URL, got {self.endpoint!r}")
        for name in ("export_interval_s", "max_steps_per_s", "timeout_s"):
            if name == "max_steps_per_s" and self.max_steps_per_s is None:
                continue
            if not _pos(getattr(self, name)):
                out.append(f"{name}: must be a finite number > 0, got {getattr(self, name)!r}")
        if not (isinstance(self.max_buffered_steps, int) and self.max_buffered_steps > 0):
            out.append(f"max_buffered_steps: must be a positive integer, got {self.max_buffered_steps!r}")
        for what in ("resource_attributes", "headers"):
            m = getattr(self, what)
            if not (isinstance(m, Mapping) and all(isinstance(k, str) and isinstance(v, str) for k, v in m.items())):
                out.append(f"{what}: must map strings to strings")
        return out


class _Step:
    __slots__ = ("number", "time_ns", "values", "phases", "extra")

    def __init__(self, number: int, time_ns: int, values: dict[str, float], phases: dict[str, float],
                 extra: list[tuple[str, float, tuple[tuple[str, Any], ...]]]) -> None:
        self.number, self.time_ns, self.values, self.phases, self.extra = number, time_ns, values, phases, extra


class TrainingMonitor:
    """Monitor one rank of a training job; see the module docstring.

    ``clock`` (seconds, monotonic; default ``time.perf_counter``) times phases
    and steps, ``wall_clock`` (ns; default ``time.time_ns``) stamps the points:
    tests pass fakes. ``start=False`` runs no thread; call :meth:`flush`.
    """

    def __init__(
        self,
        job: str,
        rank: int = 0,
        world_size: int = 1,
        *,
        node: str | None = None,
        gpu: int | str | None = None,
        endpoint: str = DEFAULT_ENDPOINT,
        service_name: str | None = None,
        export_interval_s: float = 5.0,
        max_steps_per_s: float | None = 100.0,
        max_buffered_steps: int = 50_000,
        resource_attributes: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        timeout_s: float = 10.0,
        spool_dir: str | os.PathLike[str] | None = None,
        start: bool = True,
        clock: Callable[[], float] = time.perf_counter,
        wall_clock: Callable[[], int] = time.time_ns,
        environ: Mapping[str, str] | None = None,
        metric_exporter: MetricExporter | None = None,
    ) -> None:
        settings = TrainingMonitorSettings(
            job=job, rank=rank, world_size=world_size, node=node, gpu=None if gpu is None else str(gpu),
            endpoint=endpoint, service_name=service_name, export_interval_s=export_interval_s,
            max_steps_per_s=max_steps_per_s, max_buffered_steps=max_buffered_steps,
            resource_attributes=MappingProxyType(dict(resource_attributes or {})),
            headers=MappingProxyType(dict(headers or {})), timeout_s=timeout_s,
            spool_dir=os.fspath(spool_dir) if spool_dir is not None else None,
        )
        problems = settings.problems()
        if problems:
            raise ConfigError(problems)
        self.settings = settings
        self._clock = clock
        self._wall = wall_clock
        attrs: dict[str, Any] = {_PREFIX + "job": job, _PREFIX + "rank": rank, _PREFIX + "world_size": world_size}
        if node:
            attrs["host.name"] = node
        if settings.gpu is not None:
            attrs["gpu.uuid" if settings.gpu.startswith(("GPU-", "MIG-")) else "gpu.index"] = settings.gpu
        self.attributes: Mapping[str, Any] = MappingProxyType(attrs)
        self._lock = threading.Lock()
        self._cycle_lock = threading.Lock()
        self._drops = DropCounter(f"TrainingMonitor({job!r}, rank={rank})")
        self._steps: deque[_Step] = deque()
        self._step_no = 0
        self._last_step_at: float | None = None
        self._last_kept_at = -math.inf
        self._min_gap = 1.0 / settings.max_steps_per_s if settings.max_steps_per_s else 0.0
        self._last_finite: dict[str, float] = {}
        self._phases: dict[str, float] = {}
        self._phase_stack: list[str] = []
        self._observed: dict[tuple[str, tuple[tuple[str, Any], ...]], float] = {}
        self._step_hooks: list[Callable[[], Mapping[str, Any] | None]] = []
        self._nonfinite: dict[str, int] = {}
        self._steps_in_window = 0
        self._window_start = wall_clock()
        extra = dict(settings.resource_attributes)
        if service_name is not None:
            extra["service.name"] = service_name
        resource = build_resource(service_name=service_name or job, extra=extra, environ=environ)
        self.metric_exporter = metric_exporter
        self._delivery = Delivery(endpoint, resource, headers=settings.headers, timeout_s=timeout_s,
                                  spool_dir=settings.spool_dir, metric_exporter=metric_exporter)
        self._closed = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._atexit: Callable[[], None] | None = None
        if start:
            self._thread = threading.Thread(target=self._run, name=f"stethoscope-train-{job}", daemon=True)
            self._thread.start()
            self._atexit = closer(self)
            atexit.register(self._atexit)

    # -- state -----------------------------------------------------------------------------

    @property
    def dropped(self) -> Mapping[str, int]:
        return self._drops.snapshot()

    @property
    def steps(self) -> int:
        """Steps recorded so far."""
        return self._step_no

    @property
    def nonfinite(self) -> Mapping[str, int]:
        """Non-finite values not yet exported, by value name."""
        with self._lock:
            return MappingProxyType(dict(self._nonfinite))

    # -- the hot path ----------------------------------------------------------------------

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time a phase of the current step (``data``, ``forward``, ``backward``, ``optimizer``...).

        Nested phases each get their own (inclusive) time; re-entering a phase
        already open counts only the outermost; a phase seen twice in a step
        (gradient accumulation) adds up.
        """
        if not isinstance(name, str) or not name:
            self._drops.add("bad_phase", 1, repr(name)[:40])
            yield
            return
        stack = self._phase_stack
        if name in stack:
            yield
            return
        stack.append(name)
        t0 = self._clock()
        try:
            yield
        finally:
            dt = self._clock() - t0
            if stack and stack[-1] == name:
                stack.pop()
            elif name in stack:
                stack.remove(name)
            self._phases[name] = self._phases.get(name, 0.0) + dt

    def observe(self, name: str, value: Any, **attributes: Any) -> None:
        """Attach ``value`` to the next step as gauge ``stethoscope.train.<name>`` (never raises)."""
        try:
            v = float(value)
        except (TypeError, ValueError):
            self._drops.add("wrong_type", 1, f"observe({name!r})")
            return
        if not math.isfinite(v):
            with self._lock:
                self._nonfinite[name] = self._nonfinite.get(name, 0) + 1
            return
        key = tuple(sorted((str(k), a if isinstance(a, (str, bool, int, float)) else str(a))
                           for k, a in attributes.items()))
        with self._lock:
            self._observed[(name, key)] = v  # the latest value per step wins

    def add_step_hook(self, hook: Callable[[], Mapping[str, Any] | None]) -> Callable[[], None]:
        """Call ``hook()`` at the start of every :meth:`step`; returns a function that removes it.

        The hook may :meth:`observe` values, and may return defaults for
        ``step``'s arguments (``{"grad_norm": 1.7}``) that apply when the
        caller did not pass them. A hook that raises is counted and skipped.
        """
        self._step_hooks.append(hook)

        def remove() -> None:
            if hook in self._step_hooks:
                self._step_hooks.remove(hook)

        return remove

    def step(self, loss: Any = None, grad_norm: Any = None, lr: Any = None, tokens: Any = None,
             samples: Any = None, step_time: Any = None, data_wait: Any = None) -> bool:
        """Close a step; returns True (False only after :meth:`close`). Never raises."""
        try:
            if self._closed:
                self._drops.add("closed")
                return False
            for hook in tuple(self._step_hooks):
                try:
                    defaults = hook()
                except Exception as exc:
                    self._drops.add("hook_error", 1, f"{type(exc).__name__}: {exc}")
                    continue
                if defaults:
                    grad_norm = defaults.get("grad_norm") if grad_norm is None else grad_norm
            now = self._clock()
            wall = self._wall()
            phases, self._phases = self._phases, {}
            if step_time is None:
                if self._last_step_at is not None:
                    step_time = now - self._last_step_at
                elif phases:
                    step_time = sum(phases.values())
            self._last_step_at = now
            if data_wait is None and "data" in phases:
                data_wait = phases["data"]
            given = {"loss": loss, "grad_norm": grad_norm, "lr": lr, "tokens": tokens, "samples": samples,
                     "step_time": step_time, "data_wait": data_wait}
            values: dict[str, float] = {}
            bad: list[str] = []
            for name, raw in given.items():
                if raw is None:
                    continue
                try:
                    v = float(raw)
                except (TypeError, ValueError):
                    self._drops.add("wrong_type", 1, f"step({name}={type(raw).__name__})")
                    continue
                if math.isfinite(v):
                    values[name] = self._last_finite[name] = v
                else:
                    bad.append(name)
                    if name in self._last_finite:
                        values[name] = self._last_finite[name]
            with self._lock:
                self._step_no += 1
                self._steps_in_window += 1
                observed = [(name, v, key) for (name, key), v in self._observed.items()]
                self._observed = {}
                for name in bad:
                    self._nonfinite[name] = self._nonfinite.get(name, 0) + 1
                if bad or not self._min_gap or now - self._last_kept_at >= self._min_gap:
                    if len(self._steps) >= self.settings.max_buffered_steps:
                        self._drops.add("buffer_full")
                    else:
                        self._last_kept_at = now
                        self._steps.append(_Step(self._step_no, wall, values, phases, observed))
            return True
        except Exception as exc:  # never raise into the training loop
            self._drops.add("internal_error", 1, f"{type(exc).__name__}: {exc}")
            return True

    # -- export ----------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.wait(self.settings.export_interval_s):
            try:
                with self._cycle_lock:
                    self._export()
            except Exception as exc:
                _log.warning("TrainingMonitor(%r): export failed: %s", self.settings.job, exc)

    def _export(self) -> bool:
        now = self._wall()
        with self._lock:
            steps = list(self._steps)
            self._steps.clear()
            nonfinite, self._nonfinite = self._nonfinite, {}
            n_steps, self._steps_in_window = self._steps_in_window, 0
            start, self._window_start = self._window_start, now
        base = dict(self.attributes)
        series: dict[tuple[str, tuple], list[NumberDataPoint]] = {}

        def add(name: str, extra: tuple, t: int, value: float) -> None:
            attrs = {**base, **dict(extra)} if extra else base
            series.setdefault((name, extra), []).append(
                NumberDataPoint(attributes=attrs, start_time_unix_nano=0, time_unix_nano=t, value=value))

        for s in steps:
            add("step", (), s.time_ns, s.number)
            for name, v in s.values.items():
                add(name, (), s.time_ns, v)
            for ph, secs in s.phases.items():
                add("phase.time", ((_PREFIX + "phase", ph),), s.time_ns, secs)
            for name, v, extra in s.extra:
                add(name, extra, s.time_ns, v)
        by_name: dict[str, list[NumberDataPoint]] = {}
        for (name, _), points in series.items():
            by_name.setdefault(name, []).extend(points)
        metrics = [
            Metric(name=_PREFIX + name, description=f"Training {name.replace('_', ' ')} per step",
                   unit=STEP_VALUES.get(name, "s" if name == "phase.time" else "1"), data=Gauge(data_points=points))
            for name, points in by_name.items()
        ]
        for name, table, key in (("steps", {None: n_steps} if n_steps else {}, None),
                                 ("nonfinite", nonfinite, _PREFIX + "value")):
            if table:
                metrics.append(Metric(name=_PREFIX + name, description=f"Training {name}", unit="1", data=Sum(
                    data_points=[NumberDataPoint(attributes={**base, key: k} if key else base,
                                                 start_time_unix_nano=start, time_unix_nano=now, value=v)
                                 for k, v in table.items()],
                    aggregation_temporality=AggregationTemporality.DELTA, is_monotonic=True)))
        return self._delivery.export_metrics(metrics)

    def flush(self, timeout_s: float | None = None) -> bool:
        """Export the buffered steps now; True if delivered."""
        if self._closed:
            return False
        try:
            with self._cycle_lock:
                ok = self._export()
            return self._delivery.flush(timeout_s) and ok
        except Exception as exc:
            _log.warning("TrainingMonitor(%r).flush failed: %s", self.settings.job, exc)
            return False

    def close(self, timeout_s: float | None = None) -> None:
        """Stop, export what is buffered, shut the exporter down; idempotent."""
        if self._closed:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.settings.timeout_s + 2.0)
        self.flush(timeout_s)
        self._closed = True
        self._delivery.shutdown(timeout_s)
        if self._atexit is not None:
            atexit.unregister(self._atexit)

    def __enter__(self) -> TrainingMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
