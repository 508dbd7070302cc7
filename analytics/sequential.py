"""Change detectors for streams: CUSUM, Page-Hinkley, ADWIN and ERT-calibrated windows.

Every detector here follows :class:`~stethoscope.analytics.detector.SequentialDetector`:

* ``update(x)`` takes one value, does O(1) amortised work and returns ``True`` on the
  step a change is detected. ``None``, NaN, +/-inf and anything ``float()`` rejects
  are counted in ``n_ignored`` and otherwise ignored; ``update`` never raises.
* ``drift_detected`` latches ``True`` at the first detection and stays so until
  ``reset()``; ``detected_at`` is ``n_seen`` (valid values, 1-based) at that step,
  so the delay after a change that starts with value number ``c`` is
  ``detected_at - c`` (see :func:`detection_delay`).
* Configuration is validated when the detector is built (``ConfigError`` listing
  every problem); nothing is validated per update.

Detectors (registered by name in :data:`STREAM_REGISTRY`, which holds factories
that build a detector with default settings):

========================  ===================================================
``"cusum"``               :class:`CUSUM`, two-sided, on standardised values
``"page_hinkley"``        :class:`PageHinkley`, with a forgetting factor
``"adwin"``               :class:`ADWIN`, adaptive window, exponential histogram
``"mean_window"``         :class:`WindowedMeanShift`, z-test, ERT-calibrated
``"ks_window"``           :class:`WindowedKS`, two-sample KS, ERT-calibrated
========================  ===================================================

The windowed tests calibrate their threshold by simulation so that false alarms
arrive on average once every ``ert`` steps; the method is described in
:mod:`stethoscope.analytics.calibrate_ert`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import math
from bisect import bisect_left, bisect_right, insort
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from stethoscope.errors import ConfigError

from .calibrate_ert import calibrate_ks_threshold, calibrate_mean_threshold

__all__ = [
    "CUSUM",
    "PageHinkley",
    "ADWIN",
    "WindowedMeanShift",
    "WindowedKS",
    "STREAM_REGISTRY",
    "register_stream",
    "detection_delay",
]

#: name -> factory building a sequential detector with its default settings.
STREAM_REGISTRY: dict[str, Callable[..., Any]] = {}


def register_stream(name: str):
    """Class decorator adding a sequential detector to :data:`STREAM_REGISTRY`."""

    def wrap(cls):
        if name in STREAM_REGISTRY:
            raise ValueError(f"stream detector {name!r} registered twice")
        STREAM_REGISTRY[name] = cls
        return cls

    return wrap


def _check(problems: list[str]) -> None:
    if problems:
        raise ConfigError(problems)


class _Stream(ABC):
    """Shared bookkeeping: bad-value filtering, counters and the latched flag."""

    name = "stream"

    def __init__(self) -> None:
        self.drift_detected = False
        self.n_seen = 0
        self.n_ignored = 0
        self.detected_at: int | None = None

    def update(self, x: Any) -> bool:
        try:
            v = float(x)
        except (TypeError, ValueError, OverflowError):
            self.n_ignored += 1
            return False
        if not math.isfinite(v):
            self.n_ignored += 1
            return False
        self.n_seen += 1
        if self._step(v):
            if not self.drift_detected:
                self.drift_detected = True
                self.detected_at = self.n_seen
            return True
        return False

    def reset(self) -> None:
        self.drift_detected = False
        self.n_seen = 0
        self.n_ignored = 0
        self.detected_at = None
        self._clear()

    @abstractmethod
    def _step(self, v: float) -> bool:
        """Implemented by each concrete detector."""

    @abstractmethod
    def _clear(self) -> None:
        """Implemented by each concrete detector."""


class _Warmup:
    """Welford mean/variance over the first ``n`` values."""

    __slots__ = ("n", "mean", "m2")

    def __init__(self) -> None:
        self.n, self.mean, self.m2 = 0, 0.0, 0.0

    def add(self, v: float) -> None:
        self.n += 1
        d = v - self.mean
        self.mean += d / self.n
        self.m2 += d * (v - self.mean)

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / (self.n - 1)) if self.n > 1 else 0.0


@register_stream("cusum")
class CUSUM(_Stream):
    """Two-sided tabular CUSUM on standardised values ``z = (x - mean) / std``.

    ``S+ = max(0, S+ + z - k)`` and ``S- = max(0, S- - z - k)``; a change is detected
    when either exceeds ``h``, after which both restart from zero. ``k`` (in units of
    the reference std) is half the shift the chart is tuned for, ``h`` the decision
    interval. The defaults ``k=0.5, h=5`` give an in-control run length of roughly
    930 steps per side (~465 two-sided) on Gaussian data and detect a 1-sigma shift
    in ~10 steps. ``mean``/``std`` are the reference; when not given they are
    estimated from the first ``warmup`` values, which are not scored.

    Examples
    --------
    >>> det = CUSUM(mean=0.0, std=1.0)
    >>> hits = [det.update(x) for x in [0.1, -0.2, 0.0] + [2.0] * 5]
    >>> det.drift_detected, det.detected_at
    (True, 7)
    """

    name = "cusum"

    def __init__(self, *, k: float = 0.5, h: float = 5.0, mean: float | None = None,
                 std: float | None = None, warmup: int = 200) -> None:
        problems = []
        if not k >= 0:
            problems.append(f"k: must be >= 0, got {k}")
        if not h > 0:
            problems.append(f"h: must be > 0, got {h}")
        if std is not None and not (std > 0 and math.isfinite(std)):
            problems.append(f"std: must be finite and > 0, got {std}")
        if mean is not None and not math.isfinite(mean):
            problems.append(f"mean: must be finite, got {mean}")
        if (mean is None or std is None) and warmup < 2:
            problems.append(f"warmup: must be >= 2 when mean/std are not given, got {warmup}")
        _check(problems)
        super().__init__()
        self.k, self.h, self.warmup = float(k), float(h), int(warmup)
        self._given = (mean, std)
        self._clear()

    def _clear(self) -> None:
        self.pos = self.neg = 0.0
        mean, std = self._given
        self._warm = None if (mean is not None and std is not None) else _Warmup()
        self.mean = mean if mean is not None else 0.0
        self.std = std if std is not None else 1.0

    def _step(self, v: float) -> bool:
        warm = self._warm
        if warm is not None:
            warm.add(v)
            if warm.n >= self.warmup:
                mean, std = self._given
                self.mean = mean if mean is not None else warm.mean
                self.std = std if std is not None else (warm.std or 1.0)
                self._warm = None
            return False
        z = (v - self.mean) / self.std
        self.pos = max(0.0, self.pos + z - self.k)
        self.neg = max(0.0, self.neg - z - self.k)
        if self.pos > self.h or self.neg > self.h:
            self.pos = self.neg = 0.0
            return True
        return False


@register_stream("page_hinkley")
class PageHinkley(_Stream):
    """Page-Hinkley test for a change in the mean.

    With ``xbar_t`` the running mean, the cumulative deviation is
    ``m_t = alpha * m_{t-1} + (x_t - xbar_t - delta)`` (``alpha`` < 1 forgets old
    deviations). An increase is detected when ``m_t - min m > lambda_``; a decrease
    (``mode="down"``/``"both"``) uses the mirrored sum. Nothing is detected before
    ``min_instances`` values. ``delta`` is the magnitude of change tolerated,
    ``lambda_`` the alarm threshold, both in the units of ``x``: scale them to the
    data (the classic ``delta=0.005, lambda_=50`` suits values of order 1 and shifts
    of order 1; on noisy data it alarms often).

    Examples
    --------
    >>> det = PageHinkley(lambda_=10.0)
    >>> for x in [0.0] * 100 + [1.0] * 50:
    ...     _ = det.update(x)
    >>> det.drift_detected, det.detected_at
    (True, 111)
    """

    name = "page_hinkley"

    def __init__(self, *, delta: float = 0.005, lambda_: float = 50.0, alpha: float = 0.9999,
                 min_instances: int = 30, mode: str = "both") -> None:
        problems = []
        if not delta >= 0:
            problems.append(f"delta: must be >= 0, got {delta}")
        if not lambda_ > 0:
            problems.append(f"lambda_: must be > 0, got {lambda_}")
        if not 0 < alpha <= 1:
            problems.append(f"alpha: must be in (0, 1], got {alpha}")
        if min_instances < 1:
            problems.append(f"min_instances: must be >= 1, got {min_instances}")
        if mode not in ("up", "down", "both"):
            problems.append(f"mode: must be 'up', 'down' or 'both', got {mode!r}")
        _check(problems)
        super().__init__()
        self.delta, self.lambda_, self.alpha = float(delta), float(lambda_), float(alpha)
        self.min_instances, self.mode = int(min_instances), mode
        self._clear()

    def _clear(self) -> None:
        self._n = 0
        self._mean = 0.0
        self._up = self._up_min = 0.0
        self._down = self._down_max = 0.0

    def _step(self, v: float) -> bool:
        self._n += 1
        self._mean += (v - self._mean) / self._n
        dev = v - self._mean
        self._up = self.alpha * self._up + (dev - self.delta)
        self._down = self.alpha * self._down + (dev + self.delta)
        self._up_min = min(self._up_min, self._up)
        self._down_max = max(self._down_max, self._down)
        if self._n < self.min_instances:
            return False
        hit = (self.mode != "down" and self._up - self._up_min > self.lambda_) or (
            self.mode != "up" and self._down_max - self._down > self.lambda_
        )
        if hit:
            self._clear()
        return hit


@register_stream("adwin")
class ADWIN(_Stream):
    """ADWIN: keep the longest recent window whose halves agree in mean.

    The window is stored as an exponential histogram: level ``i`` holds at most
    ``max_buckets`` buckets of ``2**i`` values each (count, sum and sum of squared
    deviations), so a window of ``W`` values takes O(``max_buckets * log W``)
    memory. Every ``clock`` values, every split of the window at a bucket boundary
    into an older part (``n0`` values, mean ``m0``) and a newer part (``n1``, ``m1``)
    is tested; while some split has
    ``|m0 - m1| > sqrt(2 v c / h) + 2 c / (3 h)`` with ``h = 1/(1/n0 + 1/n1)``,
    ``v`` the window variance and ``c = ln(2 ln W / delta)``, the oldest bucket is
    dropped and a change is reported. ``delta`` (default 0.002) bounds the false
    positive probability of one check. Splits leaving fewer than ``min_window``
    values on either side are not tested.

    Examples
    --------
    >>> import random
    >>> rng = random.Random(1)
    >>> det = ADWIN()
    >>> for i in range(2000):
    ...     _ = det.update(rng.gauss(0.0 if i < 1000 else 1.0, 1.0))
    >>> det.drift_detected, 1000 < det.detected_at < 1100, abs(det.mean - 1.0) < 0.15
    (True, True, True)
    """

    name = "adwin"

    def __init__(self, *, delta: float = 0.002, clock: int = 32, max_buckets: int = 5,
                 min_window: int = 5) -> None:
        problems = []
        if not 0 < delta < 1:
            problems.append(f"delta: must be in (0, 1), got {delta}")
        if clock < 1:
            problems.append(f"clock: must be >= 1, got {clock}")
        if max_buckets < 2:
            problems.append(f"max_buckets: must be >= 2, got {max_buckets}")
        if min_window < 1:
            problems.append(f"min_window: must be >= 1, got {min_window}")
        _check(problems)
        super().__init__()
        self.delta, self.clock = float(delta), int(clock)
        self.max_buckets, self.min_window = int(max_buckets), int(min_window)
        self._clear()

    def _clear(self) -> None:
        # _levels[i]: deque of [count, total, m2], oldest on the left.
        self._levels: list[deque[list[float]]] = [deque()]
        self.width = 0
        self._total = 0.0
        self._m2 = 0.0
        self._tick = 0

    @property
    def mean(self) -> float:
        """Mean of the current window (0.0 when empty)."""
        return self._total / self.width if self.width else 0.0

    @property
    def n_buckets(self) -> int:
        """Buckets held: O(log width)."""
        return sum(len(level) for level in self._levels)

    def _step(self, v: float) -> bool:
        # Add to the window statistics (Welford merge of one value).
        if self.width:
            mean = self._total / self.width
            self._m2 += (v - mean) ** 2 * self.width / (self.width + 1)
        self.width += 1
        self._total += v
        levels = self._levels
        levels[0].append([1.0, v, 0.0])
        i = 0
        while len(levels[i]) > self.max_buckets:
            a = levels[i].popleft()
            b = levels[i].popleft()
            n = a[0] + b[0]
            d = a[1] / a[0] - b[1] / b[0]
            merged = [n, a[1] + b[1], a[2] + b[2] + a[0] * b[0] / n * d * d]
            if i + 1 == len(levels):
                levels.append(deque())
            levels[i + 1].append(merged)
            i += 1
        self._tick += 1
        if self._tick < self.clock:
            return False
        self._tick = 0
        return self._cut()

    def _cut(self) -> bool:
        cut = False
        while self.width > 2 * self.min_window:
            if not self._one_cut():
                break
            cut = True
        return cut

    def _one_cut(self) -> bool:
        width = self.width
        var = self._m2 / width
        c = math.log(2.0 * math.log(width) / self.delta)
        n0, s0 = 0.0, 0.0
        total = self._total
        for level in reversed(self._levels):
            for bucket in level:
                n0 += bucket[0]
                s0 += bucket[1]
                n1 = width - n0
                if n1 < self.min_window:
                    return False
                if n0 < self.min_window:
                    continue
                inv = 1.0 / n0 + 1.0 / n1
                eps = math.sqrt(2.0 * var * c * inv) + 2.0 / 3.0 * c * inv
                if abs(s0 / n0 - (total - s0) / n1) > eps:
                    self._drop_oldest()
                    return True
        return False

    def _drop_oldest(self) -> None:
        levels = self._levels
        while not levels[-1]:
            levels.pop()
        n, s, m2 = levels[-1].popleft()
        while len(levels) > 1 and not levels[-1]:
            levels.pop()
        rest = self.width - n
        if rest <= 0:
            self.width, self._total, self._m2 = 0, 0.0, 0.0
            return
        d = s / n - (self._total - s) / rest
        self._m2 -= m2 + n * rest / self.width * d * d
        self._m2 = max(self._m2, 0.0)
        self._total -= s
        self.width = int(rest)


class _Windowed(_Stream):
    """Shared parts of the ERT-calibrated windowed tests."""

    def __init__(self, reference: Iterable[float] | None, window: int, ert: float,
                 warmup: int, seed: int) -> None:
        problems = []
        ref = None
        if reference is not None:
            try:
                raw = reference if isinstance(reference, np.ndarray) else list(reference)
                ref = np.asarray(raw, dtype=np.float64).ravel()
            except (TypeError, ValueError) as exc:
                raise ConfigError([f"reference: must be numeric values ({exc})"]) from exc
        if window < 2:
            problems.append(f"window: must be >= 2, got {window}")
        if not ert > 1:
            problems.append(f"ert: must be > 1, got {ert}")
        if ref is not None:
            ref = ref[np.isfinite(ref)]
            if ref.size < window:
                problems.append(f"reference: needs >= window ({window}) finite values, got {ref.size}")
            elif ref.std() == 0:
                problems.append("reference: is constant")
        elif warmup < max(window, 2):
            problems.append(f"warmup: must be >= window ({window}) when no reference is given, got {warmup}")
        _check(problems)
        super().__init__()
        self.window, self.ert, self.warmup, self.seed = int(window), float(ert), int(warmup), int(seed)
        self.threshold: float = math.inf
        self.statistic = 0.0
        self._given = ref
        self._ref: np.ndarray | None = None
        if ref is not None:
            self._fit(ref)
        self._clear()

    @abstractmethod
    def _fit(self, ref: np.ndarray) -> None:
        """Implemented by each concrete detector."""

    def _clear(self) -> None:
        if self._given is None:
            self._ref = None
            self._pending: list[float] = []
        self._win: deque[float] = deque()
        self._above = False
        self.statistic = 0.0
        self._clear_window()

    @abstractmethod
    def _clear_window(self) -> None:
        """Implemented by each concrete detector."""

    def _step(self, v: float) -> bool:
        if self._ref is None:
            self._pending.append(v)
            if len(self._pending) >= self.warmup:
                ref = np.asarray(self._pending)
                self._pending = []
                if ref.std() > 0:
                    self._fit(ref)
            return False
        stat = self._push(v)
        if stat is None:
            return False
        self.statistic = stat
        above = stat > self.threshold
        crossed = above and not self._above
        self._above = above
        return crossed

    @abstractmethod
    def _push(self, v: float) -> float | None:
        """Implemented by each concrete detector."""


@register_stream("mean_window")
class WindowedMeanShift(_Windowed):
    """z-test of the mean of the last ``window`` values against the reference.

    ``S_t = |mean(last w) - mu_ref| / (sd_ref / sqrt(w))``; alarms when ``S_t`` crosses
    a threshold calibrated by simulation (bootstrap streams from the reference) so
    that false alarms arrive once every ``ert`` steps on average. Without a
    ``reference``, the first ``warmup`` values become the reference. O(1) per update.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> det = WindowedMeanShift(rng.normal(size=2000), window=50, ert=1000)
    >>> stream = np.r_[rng.normal(size=300), rng.normal(1.0, 1.0, size=200)]
    >>> for x in stream:
    ...     _ = det.update(x)
    >>> det.drift_detected and 300 < det.detected_at < 400
    True
    """

    name = "mean_window"

    def __init__(self, reference: Iterable[float] | None = None, *, window: int = 50,
                 ert: float = 1000.0, warmup: int = 1000, seed: int = 0) -> None:
        super().__init__(reference, window, ert, warmup, seed)

    def _fit(self, ref: np.ndarray) -> None:
        rng = np.random.default_rng(self.seed)
        self.threshold = calibrate_mean_threshold(ref, window=self.window, ert=self.ert, rng=rng)
        self._mu = float(ref.mean())
        self._scale = float(ref.std(ddof=1)) / math.sqrt(self.window)
        self._ref = ref

    def _clear_window(self) -> None:
        self._sum = 0.0
        self._since_exact = 0

    def _push(self, v: float) -> float | None:
        win = self._win
        d = v - self._mu
        win.append(d)
        self._sum += d
        if len(win) > self.window:
            self._sum -= win.popleft()
            self._since_exact += 1
            if self._since_exact >= 100_000:  # bound round-off drift of the running sum
                self._sum = math.fsum(win)
                self._since_exact = 0
        elif len(win) < self.window:
            return None
        return abs(self._sum / self.window) / self._scale


@register_stream("ks_window")
class WindowedKS(_Windowed):
    """Two-sample KS distance between the last ``window`` values and the reference.

    Each value is mapped once, on arrival, to its rank in the sorted reference
    (two binary searches); the window keeps those ranks sorted, so an update costs
    O(log n_ref + window) — constant in the stream length. The threshold on the KS
    distance is calibrated for the target ``ert`` as for :class:`WindowedMeanShift`.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> det = WindowedKS(rng.normal(size=2000), window=50, ert=1000)
    >>> stream = np.r_[rng.normal(size=300), rng.normal(0.0, 3.0, size=200)]
    >>> for x in stream:
    ...     _ = det.update(x)
    >>> det.drift_detected and 300 < det.detected_at < 400
    True
    """

    name = "ks_window"

    def __init__(self, reference: Iterable[float] | None = None, *, window: int = 50,
                 ert: float = 1000.0, warmup: int = 1000, seed: int = 0) -> None:
        super().__init__(reference, window, ert, warmup, seed)

    def _fit(self, ref: np.ndarray) -> None:
        rng = np.random.default_rng(self.seed)
        self.threshold = calibrate_ks_threshold(ref, window=self.window, ert=self.ert, rng=rng)
        self._sorted = np.sort(ref).tolist()
        self._n_ref = float(len(self._sorted))
        self._up = (np.arange(1, self.window + 1) / self.window)
        self._down = (np.arange(0, self.window) / self.window)
        self._ref = ref

    def _clear_window(self) -> None:
        self._lo: list[float] = []
        self._hi: list[float] = []

    def _push(self, v: float) -> float | None:
        lo = bisect_left(self._sorted, v) / self._n_ref
        hi = bisect_right(self._sorted, v) / self._n_ref
        win = self._win
        win.append((lo, hi))  # type: ignore[arg-type]
        insort(self._lo, lo)
        insort(self._hi, hi)
        if len(win) > self.window:
            old_lo, old_hi = win.popleft()  # type: ignore[misc]
            del self._lo[bisect_left(self._lo, old_lo)]
            del self._hi[bisect_left(self._hi, old_hi)]
        elif len(win) < self.window:
            return None
        up = float(np.max(self._up - np.asarray(self._hi)))
        down = float(np.max(np.asarray(self._lo) - self._down))
        return max(up, down)


def detection_delay(detector: Any, stream: Iterable[Any], change_at: int) -> int | None:
    """Feed ``stream`` to a fresh-reset ``detector``; steps from the change to detection.

    ``change_at`` is the 0-based index (among valid values) of the first changed
    value. Returns ``detected_at - change_at`` (>= 1), or ``None`` when nothing is
    detected at or after the change. A detection before the change (a false alarm)
    is ignored: the detector is reset and watching continues.
    """
    detector.reset()
    offset = 0
    for x in stream:
        if detector.update(x):
            seen = offset + detector.n_seen
            if seen > change_at:
                return seen - change_at
            offset = seen
            detector.reset()
    return None
