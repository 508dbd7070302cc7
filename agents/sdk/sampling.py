"""Adaptive, consistent sampling of raw prediction rows.

Each stream (``<model>/<stream>``) has a probability ``p``. A row is kept iff
its randomness ``R`` (from the request id, see :mod:`.consistent`) is at least
the threshold ``T(p_eff)``, where ``p_eff = p`` or, for an uncertain
prediction, ``p`` times the :mod:`.uncertainty` weight. Every kept row carries
its adjusted count ``1 / p_eff`` and ``th``, so sums of adjusted counts
estimate counts, and adjusted-count-weighted means and histograms are
unbiased.

Every ``adjust_interval_s`` :meth:`AdaptiveSampler.adjust`:

1. shares ``global_budget_rows_per_s`` across the streams seen
   (:func:`.allocation.allocate`: each stream wants its target, times any
   boost; when the sum is over budget, high spread and high drift get more);
2. moves each ``p`` toward its allocation the way Jaeger's adaptive sampler
   does: ``p_new = p * allocation / expected_rate``, where ``expected_rate`` is
   the sum of ``p_eff`` over the window's events per second (the expected rows
   kept, which is far less noisy than the realised count); increases are capped
   at ``+increase_cap`` (50 %) per adjustment, decreases apply at once, and
   ``p`` stays in ``[min_probability, 1]``. A stream with no events keeps its
   ``p``. With ``fixed_probability`` nothing adapts.

Targets, highest priority first: the collector's override for the stream
(:mod:`.remote`; its target, multiplied by ``boost``, until ``expires_at``),
the local ``stream_targets``, the collector's ``default_target_rows_per_s``,
the local ``target_rows_per_s``. The collector's global budget, when it sends
one, replaces the local one.

Examples:
    >>> cfg = SamplingConfig(target_rows_per_s=10, global_budget_rows_per_s=100, initial_probability=0.5)
    >>> now = [0.0]
    >>> s = AdaptiveSampler(cfg, "m", clock=lambda: now[0])
    >>> st = s.stream("default")
    >>> s.account(st, events=10_000, expected=5_000.0)   # 1000 events/s for 10 s at p=0.5
    >>> now[0] = 10.0
    >>> round(s.adjust()["default"], 6)      # wants 10 rows/s of 1000/s: p drops at once
    0.01
    >>> s.account(st, events=200, expected=2.0)          # traffic falls to 20/s
    >>> now[0] = 20.0
    >>> round(s.adjust()["default"], 6)      # would like 0.5, increase capped at +50 %
    0.015
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from stethoscope.errors import ConfigError

from .allocation import StreamDemand, allocate
from .consistent import adjusted_count, threshold_for, threshold_hex
from .remote import RemoteSampling, StreamOverride
from .uncertainty import UncertaintyConfig

__all__ = ["AdaptiveSampler", "SamplingConfig", "StreamState", "DEFAULT_STREAM"]

DEFAULT_STREAM = "default"


def _num(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class SamplingConfig:
    """How many raw rows to keep; validated as a whole by :meth:`problems`."""

    target_rows_per_s: float = 1.0
    """Default target for every stream."""
    stream_targets: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    """Per-stream targets by stream name (not ``model/stream``)."""
    global_budget_rows_per_s: float = 20.0
    initial_probability: float = 0.01
    min_probability: float = 1e-6
    increase_cap: float = 0.5
    tolerance: float = 0.0
    """Jaeger's ``delta_tolerance``: keep ``p`` when within this fraction of the allocation."""
    adjust_interval_s: float = 10.0
    fixed_probability: float | None = None
    """Sample every stream at this probability and never adapt."""
    uncertainty: UncertaintyConfig | None = None
    remote: bool = True
    """Poll ``<endpoint>/v1/sampling`` for overrides."""
    poll_interval_s: float = 30.0
    max_streams: int = 64

    def problems(self) -> list[str]:
        out: list[str] = []
        for name in ("target_rows_per_s", "global_budget_rows_per_s"):
            if not (_num(getattr(self, name)) and getattr(self, name) >= 0):
                out.append(f"sampling.{name}: must be a finite number >= 0, got {getattr(self, name)!r}")
        for name in ("adjust_interval_s", "poll_interval_s"):
            if not (_num(getattr(self, name)) and getattr(self, name) > 0):
                out.append(f"sampling.{name}: must be a finite number > 0, got {getattr(self, name)!r}")
        if not (_num(self.min_probability) and 0 < self.min_probability <= 1):
            out.append(f"sampling.min_probability: must be in (0, 1], got {self.min_probability!r}")
        elif not (_num(self.initial_probability) and self.min_probability <= self.initial_probability <= 1):
            out.append(f"sampling.initial_probability: must be in [min_probability, 1], got {self.initial_probability!r}")
        if self.fixed_probability is not None and not (_num(self.fixed_probability) and 0 < self.fixed_probability <= 1):
            out.append(f"sampling.fixed_probability: must be None or in (0, 1], got {self.fixed_probability!r}")
        if not (_num(self.increase_cap) and self.increase_cap > 0):
            out.append(f"sampling.increase_cap: must be a finite number > 0, got {self.increase_cap!r}")
        if not (_num(self.tolerance) and 0 <= self.tolerance < 1):
            out.append(f"sampling.tolerance: must be in [0, 1), got {self.tolerance!r}")
        if not isinstance(self.stream_targets, Mapping):
            out.append("sampling.stream_targets: must be a mapping of stream name to rows/s")
        else:
            for k, v in self.stream_targets.items():
                if not (isinstance(k, str) and k and _num(v) and v >= 0):
                    out.append(f"sampling.stream_targets: {k!r} -> {v!r} is not a name -> rows/s >= 0")
        if self.uncertainty is not None:
            if isinstance(self.uncertainty, UncertaintyConfig):
                out += self.uncertainty.problems()
            else:
                out.append("sampling.uncertainty: must be None or an UncertaintyConfig")
        if not (isinstance(self.max_streams, int) and not isinstance(self.max_streams, bool) and self.max_streams > 0):
            out.append(f"sampling.max_streams: must be a positive integer, got {self.max_streams!r}")
        return out

    def validate(self) -> SamplingConfig:
        problems = self.problems()
        if problems:
            raise ConfigError(problems)
        return self


class StreamState:
    """One stream's probability and the counters of its current window (mutated under the sampler lock)."""

    __slots__ = ("name", "key", "index", "rule", "events", "expected", "kept",
                 "m_n", "m_mean", "m_m2", "drift", "total_events", "total_kept", "sigma")

    def __init__(self, name: str, key: str, p: float, index: int = 0) -> None:
        self.name, self.key, self.index = name, key, index
        self.events = 0
        self.expected = 0.0
        self.kept = 0
        self.m_n = 0
        self.m_mean = 0.0
        self.m_m2 = 0.0
        self.drift = 0.0
        self.total_events = 0
        self.total_kept = 0
        self.sigma: float | None = None
        self.set_probability(p)

    def set_probability(self, p: float) -> None:
        t = threshold_for(p)
        # one attribute, replaced whole, so a reader never sees half an update
        self.rule: tuple[float, int, float, str] = (p, t, adjusted_count(t), threshold_hex(t))

    @property
    def p(self) -> float:
        return self.rule[0]

    def observe_signal(self, n: int, mean: float, m2: float) -> None:
        """Merge ``n`` values' mean and sum of squared deviations (Chan et al.)."""
        if n <= 0:
            return
        total = self.m_n + n
        delta = mean - self.m_mean
        self.m_mean += delta * n / total
        self.m_m2 += m2 + delta * delta * self.m_n * n / total
        self.m_n = total


class AdaptiveSampler:
    """Per-stream probabilities for one model; see the module docstring.

    ``lock`` guards the streams' counters; the model monitor passes its own so
    that accounting rides on the lock it already holds.
    """

    def __init__(self, config: SamplingConfig, model: str, *, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time, lock: threading.Lock | None = None) -> None:
        self.config = config.validate()
        self.model = model
        self.lock = lock or threading.Lock()
        self._clock = clock
        self._wall = wall
        self._streams: dict[str, StreamState] = {}
        self._overrides: Mapping[str, StreamOverride] = MappingProxyType({})
        self._remote_budget: float | None = None
        self._remote_default: float | None = None
        self._window_start = clock()
        self.allocations: Mapping[str, float] = MappingProxyType({})
        self.remote_version = 0

    # -- the hot path ----------------------------------------------------------------------

    def stream(self, name: str) -> StreamState:
        """The state for ``name``, created on first use (call with ``lock`` held or before sharing).

        Past ``max_streams`` new names fold into the default stream.
        """
        st = self._streams.get(name)
        if st is None:
            if len(self._streams) >= self.config.max_streams and name != DEFAULT_STREAM:
                return self.stream(DEFAULT_STREAM)
            p = self.config.fixed_probability or self.config.initial_probability
            st = self._streams[name] = StreamState(name, f"{self.model}/{name}", p, len(self._streams))
        return st

    def account(self, st: StreamState, events: int, expected: float, kept: int = 0) -> None:
        """Count a window's events, their summed ``p_eff`` and the rows kept (lock held)."""
        st.events += events
        st.expected += expected
        st.kept += kept

    # -- the background thread -------------------------------------------------------------

    def target_of(self, name: str) -> float:
        """Local per-stream target, else the collector's default, else the local default."""
        if name in self.config.stream_targets:
            return float(self.config.stream_targets[name])
        if self._remote_default is not None:
            return self._remote_default
        return float(self.config.target_rows_per_s)

    def budget(self) -> float:
        return self._remote_budget if self._remote_budget is not None else self.config.global_budget_rows_per_s

    def apply_remote(self, remote: RemoteSampling) -> None:
        """Install overrides from the collector (takes effect at the next :meth:`adjust`)."""
        prefix = self.model + "/"
        with self.lock:
            self._overrides = MappingProxyType({
                k[len(prefix):]: v for k, v in remote.streams.items()
                if k.startswith(prefix) and k[len(prefix):] and "/" not in k[len(prefix):]
            })
            self._remote_budget = remote.global_budget_rows_per_s
            self._remote_default = remote.default_target_rows_per_s
            self.remote_version = remote.version
        for name in self._overrides:
            with self.lock:
                self.stream(name)

    def set_drift(self, stream: str, score: float) -> None:
        """Tell the allocator how much ``stream`` is drifting (>= 0; 0 is none)."""
        if _num(score):
            with self.lock:
                self.stream(stream).drift = max(0.0, float(score))

    def adjust(self) -> dict[str, float]:
        """Close the window: re-allocate the budget and move every ``p``; returns the new ``p`` by stream."""
        cfg = self.config
        now = self._clock()
        wall = self._wall()
        with self.lock:
            window = max(1e-9, now - self._window_start)
            self._window_start = now
            snap = []
            for st in self._streams.values():
                sigma = math.sqrt(st.m_m2 / (st.m_n - 1)) if st.m_n > 1 else None
                snap.append((st, st.events, st.expected, sigma))
                st.total_events += st.events
                st.total_kept += st.kept
                st.events, st.expected, st.kept = 0, 0.0, 0
                st.m_n, st.m_mean, st.m_m2 = 0, 0.0, 0.0
            overrides = self._overrides
        if cfg.fixed_probability is not None:
            return {st.name: st.p for st, *_ in snap}
        demands: dict[str, StreamDemand] = {}
        for st, events, _, sigma in snap:
            if sigma is not None:
                st.sigma = sigma
            target, boost = self.target_of(st.name), 1.0
            ov = overrides.get(st.name)
            if ov is not None and ov.active(wall):
                target = ov.target_rows_per_s if ov.target_rows_per_s is not None else target
                boost = ov.boost
            demands[st.name] = StreamDemand(target=target, rate=events / window, sigma=st.sigma,
                                            drift=st.drift, boost=boost)
        shares = allocate(demands, self.budget())
        self.allocations = MappingProxyType(shares)
        out: dict[str, float] = {}
        for st, events, expected, _ in snap:
            p = st.p
            if events > 0:
                share = shares.get(st.name, 0.0)
                rate = expected / window
                if share <= 0:
                    p = cfg.min_probability
                elif not (cfg.tolerance and abs(rate - share) / share < cfg.tolerance):
                    wanted = p * share / rate if rate > 0 else p * (1.0 + cfg.increase_cap)
                    p = min(wanted, p * (1.0 + cfg.increase_cap))
                p = min(1.0, max(cfg.min_probability, p))
                if p != st.p:
                    st.set_probability(p)
            out[st.name] = st.p
        return out

    def probabilities(self) -> Mapping[str, float]:
        return MappingProxyType({name: st.p for name, st in self._streams.items()})

    def streams(self) -> tuple[StreamState, ...]:
        return tuple(self._streams.values())
