"""The scrape collector: Prometheus endpoints (Triton, vLLM, Ray Serve...) re-emitted through OpenTelemetry.

Each collection cycle scrapes every target once (the first callback of the
cycle scrapes, the others share its snapshot; two collections within
``cache_s`` share one), parses the text with
``prometheus_client``'s parser (OpenMetrics when the target answers with it)
and reports every sample as a point of an observable instrument.

Names. One instrument per Prometheus *sample name*, so ``MetricName`` in
ClickHouse is the name the serving framework documents (``:`` and other
characters an OpenTelemetry name may not hold become ``_``, so
``vllm:num_requests_running`` is stored as ``vllm_num_requests_running``):

=============================  ======================================  =================
Prometheus family type          samples -> instruments                  instrument kind
=============================  ======================================  =================
counter                         ``X_total`` -> ``X``                    observable counter
gauge, unknown, stateset, info  sample name as is                      observable gauge
histogram                       ``X_bucket`` (``le``), ``X_sum``,       observable counter
                                ``X_count``
summary                         ``X`` (``quantile``)                    observable gauge
                                ``X_sum``, ``X_count``                  observable counter
gaugehistogram                  ``X_bucket``, ``X_gsum``, ``X_gcount``  observable gauge
=============================  ======================================  =================

Observable instruments cannot carry explicit-bucket histograms, so a
histogram arrives as its cumulative bucket counters (query them like
Prometheus ``_bucket`` series). ``_created`` samples (and the ``X_created``
gauges older clients expose beside ``X``) are dropped. Labels become
attributes, plus ``scrape.target`` (the URL). A family's own series get a unit
from an OpenMetrics ``# UNIT`` line or the name's suffix (``_seconds`` -> ``s``,
``_bytes`` -> ``By``); ``_bucket``, ``_sum`` and ``_count`` series get none, so
re-exposing them to Prometheus gives back the original names (counters and
gauges exactly; the histogram and summary series, being counters, gain
``_total``).

Discovery. OpenTelemetry observable instruments must exist before the
collection that reports them, and one cannot be created inside a callback
(the SDK holds its collection lock there). So :meth:`register` scrapes once
and creates an instrument for every sample name it sees; a name first seen
later is registered by a short-lived thread that waits for the current
collection to end, and is reported from the next cycle on. At most
``max_instruments`` are created; later names are dropped and counted.

Failures. An unreachable target, an HTTP error, a body over ``max_bytes`` or
text that does not parse fails that target's scrape: it is counted
(:attr:`PrometheusScrapeCollector.errors`, ``prometheus.scrape.errors``),
``prometheus.scrape.up`` reports 0, and a WARNING is logged at most once a
minute per target. Callbacks never raise. Targets are scraped one after the
other, so a cycle waits at most ``timeout_s`` per unreachable target.

Examples:
    >>> PrometheusScrapeCollector(targets=["ftp://x/metrics"], timeout_s=0)
    Traceback (most recent call last):
    ...
    stethoscope.errors.ConfigError: 2 configuration problems:
      - targets: must be http(s) URLs, got 'ftp://x/metrics'
      - timeout_s: must be a number > 0, got 0
    >>> otel_name("vllm:num_requests_running"), otel_name("_private"), otel_name("ok.name-1")
    ('vllm_num_requests_running', 'prom_private', 'ok.name-1')
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from opentelemetry.metrics import CallbackOptions, Meter, Observation
from prometheus_client.openmetrics.parser import text_string_to_metric_families as _parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as _parse_text

from stethoscope.errors import ConfigError

from .prometheus import UNIT_WORDS

__all__ = ["DEFAULT_TARGET", "PrometheusScrapeCollector", "otel_name"]

_log = logging.getLogger(__name__)

DEFAULT_TARGET = "http://127.0.0.1:8002/metrics"
"""Triton Inference Server's metrics endpoint on its default port."""

_ACCEPT = "text/plain;version=0.0.4;q=0.9,application/openmetrics-text;version=1.0.0;q=0.5,*/*;q=0.1"
_BAD_OTEL = re.compile(r"[^a-zA-Z0-9_./-]")
_WORD_UNITS = {word: unit for unit, word in UNIT_WORDS.items()} | {"ratio": "1"}
_LOG_EVERY_S = 60.0
# family type -> sample suffix -> instrument kind (anything unlisted is a gauge)
_KINDS: dict[str, dict[str, str]] = {
    "counter": {"_total": "counter"},
    "histogram": {"_bucket": "counter", "_sum": "counter", "_count": "counter"},
    "summary": {"": "gauge", "_sum": "counter", "_count": "counter"},
    "gaugehistogram": {"_bucket": "gauge", "_gsum": "gauge", "_gcount": "gauge"},
}


def otel_name(prometheus_name: str) -> str:
    """The instrument name for a Prometheus sample name (``""`` if it cannot be one)."""
    name = _BAD_OTEL.sub("_", prometheus_name)
    if name and not name[0].isalpha():
        name = "prom_" + name.lstrip("_")
    return name if 0 < len(name) <= 255 else ""


def _unit(family_unit: str, family_name: str, suffix: str) -> str:
    """The UCUM unit of one sample's instrument.

    Only the family's own series get one (``X``, ``X_total``): a derived
    series (``X_bucket``, ``X_sum``...) is named after the family, so a unit
    would make the Prometheus exposition append a second suffix.
    """
    if suffix not in ("", "_total"):
        return ""
    if family_unit:
        return _WORD_UNITS.get(family_unit, family_unit)
    return _WORD_UNITS.get(family_name.rpartition("_")[2], "") if "_" in family_name else ""


@dataclass(frozen=True)
class _Spec:
    """One instrument to create."""

    name: str
    kind: str  # counter | gauge
    unit: str
    description: str


@dataclass
class _Snapshot:
    taken: float
    points: dict[str, list[Observation]] = field(default_factory=dict)
    specs: dict[str, _Spec] = field(default_factory=dict)  # every sample name seen, by lower-cased name
    up: dict[str, tuple[int, float, int]] = field(default_factory=dict)  # target -> (up, seconds, samples)


class _ScrapeFailed(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class PrometheusScrapeCollector:
    """Scrape Prometheus endpoints and re-emit their samples; registered as ``scrape``.

    ``targets`` are http(s) URLs of ``/metrics`` endpoints; ``timeout_s``
    bounds each request. Settings are checked together and a
    :class:`~stethoscope.errors.ConfigError` lists every problem.
    """

    def __init__(
        self,
        name: str = "scrape",
        targets: Sequence[str] = (DEFAULT_TARGET,),
        timeout_s: float = 2.0,
        *,
        cache_s: float = 1.0,
        max_instruments: int = 1000,
        max_bytes: int = 16 * 1024 * 1024,
    ) -> None:
        if isinstance(targets, str):
            targets = [t for t in targets.split(",") if t.strip()]
        targets = tuple(t.strip() if isinstance(t, str) else t for t in targets)
        problems = []
        if not isinstance(name, str) or not name.strip():
            problems.append(f"name: must be a non-empty string, got {name!r}")
        bad = [t for t in targets if not _is_http_url(t)]
        if bad or not targets:
            problems.append(f"targets: must be http(s) URLs, got {', '.join(map(repr, bad)) or 'none'}")
        for label, value, floor in (("timeout_s", timeout_s, 0), ("cache_s", cache_s, 0),
                                    ("max_instruments", max_instruments, 0), ("max_bytes", max_bytes, 0)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > floor:
                problems.append(f"{label}: must be a number > {floor}, got {value!r}")
        if problems:
            raise ConfigError(problems)
        self.name = name
        self.targets: tuple[str, ...] = tuple(dict.fromkeys(targets))
        self.timeout_s = float(timeout_s)
        self._cache_s = float(cache_s)
        self._max_instruments = int(max_instruments)
        self._max_bytes = int(max_bytes)
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # targets are local
        self._lock = threading.Lock()  # guards the state below
        self._scrape_lock = threading.Lock()  # one scrape at a time
        self._snap: _Snapshot | None = None
        self._meter: Meter | None = None
        self._instruments: dict[str, str] = {}  # lower-cased name -> kind
        self._pending: dict[str, _Spec] = {}
        self._refused: set[str] = set()  # names over max_instruments, never created
        self._registrar: threading.Thread | None = None
        self._errors: dict[str, int] = {}
        self._error_kinds: dict[tuple[str, str], int] = {}
        self._dropped = 0
        self._log_state: dict[str, tuple[float, int]] = {}  # target -> (last logged, suppressed)
        self._limit_warned = False
        self._closed = False

    # -- public state -----------------------------------------------------------

    @property
    def errors(self) -> dict[str, int]:
        """Failed scrapes per target since construction (a copy); ``(collector)`` counts internal errors."""
        with self._lock:
            return dict(self._errors)

    @property
    def dropped(self) -> int:
        """Samples not re-emitted: type clashes, unusable names, over ``max_instruments``."""
        with self._lock:
            return self._dropped

    @property
    def instruments(self) -> dict[str, str]:
        """Instruments created so far: lower-cased name -> ``counter`` or ``gauge`` (a copy)."""
        with self._lock:
            return dict(self._instruments)

    def register(self, meter: Meter) -> None:
        """Create the scrape-health instruments, scrape once and create one instrument per sample name."""
        guard = self._guard
        meter.create_observable_gauge("prometheus.scrape.up", callbacks=[guard(self._up(0))], unit="",
                                      description="1 if the last scrape of scrape.target worked, else 0.")
        meter.create_observable_gauge("prometheus.scrape.duration", callbacks=[guard(self._up(1))], unit="s",
                                      description="How long the last scrape of scrape.target took.")
        meter.create_observable_gauge("prometheus.scrape.samples", callbacks=[guard(self._up(2))],
                                      unit="{sample}", description="Samples in the last scrape of scrape.target.")
        meter.create_observable_counter("prometheus.scrape.errors", callbacks=[guard(self._error_points)],
                                        unit="{error}", description="Failed scrapes by scrape.target and error.type.")
        snap = self._snapshot()  # no meter yet: nothing is queued for the registrar thread
        self._meter = meter
        self._create(snap.specs.values())

    def close(self) -> None:
        """Stop registering new instruments and forget the snapshot; idempotent."""
        with self._lock:
            self._closed = True
            registrar, self._registrar = self._registrar, None
            self._snap = None
        if registrar is not None and registrar is not threading.current_thread():
            registrar.join(timeout=5)

    # -- callbacks ----------------------------------------------------------------

    def _guard(self, read: Callable[[], Iterable[Observation]]) -> Callable[[CallbackOptions], list[Observation]]:
        def callback(options: CallbackOptions) -> list[Observation]:
            try:
                return list(read())
            except Exception as exc:  # a callback must never raise
                self._fail("(collector)", "internal", exc)
                return []

        return callback

    def _points(self, key: str) -> Callable[[], Iterable[Observation]]:
        return lambda: self._snapshot().points.get(key, ())

    def _up(self, index: int) -> Callable[[], Iterable[Observation]]:
        def read() -> Iterable[Observation]:
            for target, status in self._snapshot(lead=index == 0).up.items():
                yield Observation(status[index], {"scrape.target": target})

        return read

    def _error_points(self) -> Iterable[Observation]:
        with self._lock:
            counts = dict(self._error_kinds)
        return [Observation(n, {"scrape.target": t, "error.type": k}) for (t, k), n in counts.items()]

    # -- scraping -----------------------------------------------------------------

    def _snapshot(self, *, lead: bool = False) -> _Snapshot:
        """This cycle's snapshot.

        The cycle's leader (``prometheus.scrape.up``, registered first, so its
        callback runs first in every collection) scrapes unless the snapshot is
        younger than ``cache_s`` (two readers collecting back to back share
        one); every other callback reads what the leader left, so one
        collection sees one consistent snapshot.
        """
        with self._scrape_lock:
            snap = self._snap
            if snap is not None and not (lead and time.monotonic() - snap.taken >= self._cache_s):
                return snap
            if self._closed:
                return _Snapshot(time.monotonic())
            snap = self._scrape_all()
            self._snap = snap
        self._schedule(snap)
        return snap

    def _scrape_all(self) -> _Snapshot:
        snap = _Snapshot(0.0)
        with self._lock:
            known = dict(self._instruments)
            known.update(dict.fromkeys(self._refused, "refused"))
        for target in self.targets:
            started = time.monotonic()
            try:
                families = self._fetch(target)
            except _ScrapeFailed as exc:
                self._fail(target, exc.reason, exc)
                snap.up[target] = (0, time.monotonic() - started, 0)
                continue
            n = self._add_families(snap, target, families, known)
            snap.up[target] = (1, time.monotonic() - started, n)
            self._recovered(target)
        snap.taken = time.monotonic()
        return snap

    def _fetch(self, target: str) -> list[Any]:
        request = urllib.request.Request(target, headers={"Accept": _ACCEPT, "User-Agent": "stethoscope-agent"})
        try:
            with self._opener.open(request, timeout=self.timeout_s) as resp:
                body = resp.read(self._max_bytes + 1)
                content_type = resp.headers.get("Content-Type", "")
        except urllib.error.HTTPError as exc:
            raise _ScrapeFailed("http", f"HTTP {exc.code}") from exc
        except urllib.error.URLError as exc:
            timed_out = isinstance(exc.reason, TimeoutError)
            raise _ScrapeFailed("timeout" if timed_out else "connect", str(exc.reason)) from exc
        except TimeoutError as exc:
            raise _ScrapeFailed("timeout", f"no answer within {self.timeout_s}s") from exc
        except (OSError, ValueError) as exc:  # reset connections, malformed responses
            raise _ScrapeFailed("connect", repr(exc)) from exc
        if len(body) > self._max_bytes:
            raise _ScrapeFailed("too_large", f"body over {self._max_bytes} bytes")
        try:
            text = body.decode("utf-8")
            parse = _parse_openmetrics if "openmetrics" in content_type else _parse_text
            return list(parse(text))
        except Exception as exc:  # the parsers raise ValueError, and worse on odd input
            raise _ScrapeFailed("parse", repr(exc)) from exc

    def _add_families(self, snap: _Snapshot, target: str, families: list[Any], known: dict[str, str]) -> int:
        typed = {f.name for f in families if f.type in ("counter", "histogram", "summary", "gaugehistogram")}
        count = dropped = 0
        for family in families:
            if family.name.endswith("_created") and family.name[: -len("_created")] in typed:
                continue  # a creation timestamp exposed as its own gauge
            suffixes = _KINDS.get(family.type, {})
            for sample in family.samples:
                rest = sample.name[len(family.name):] if sample.name.startswith(family.name) else None
                if rest == "_created" or (family.type == "counter" and rest != "_total"):
                    continue
                kind = suffixes.get(rest or "", "gauge") if rest is not None else "gauge"
                value = float(sample.value)
                if math.isnan(value):
                    continue
                name = otel_name(sample.name[: -len(rest)] if family.type == "counter" and rest else sample.name)
                key = name.lower()
                spec = snap.specs.get(key)
                if not name or (key in known and known[key] != kind) or (spec and spec.kind != kind):
                    # no usable name, a type clash, or refused over max_instruments
                    dropped += 1
                    continue
                if spec is None:
                    unit = _unit(family.unit, family.name, rest or "")
                    snap.specs[key] = _Spec(name, kind, unit, family.documentation)
                snap.points.setdefault(key, []).append(
                    Observation(value, {**sample.labels, "scrape.target": target}))
                count += 1
        if dropped:
            with self._lock:
                self._dropped += dropped
        return count

    # -- instruments ----------------------------------------------------------------

    def _schedule(self, snap: _Snapshot) -> None:
        """Queue instruments for names not seen before; a thread creates them after this collection."""
        with self._lock:
            if self._meter is None or self._closed:
                return
            new = {k: s for k, s in snap.specs.items()
                   if k not in self._instruments and k not in self._pending and k not in self._refused}
            if not new:
                return
            self._pending.update(new)
            if self._registrar is not None and self._registrar.is_alive():
                return
            self._registrar = threading.Thread(target=self._drain, name=f"stethoscope-{self.name}-register",
                                               daemon=True)
            self._registrar.start()

    def _drain(self) -> None:
        while True:
            with self._lock:
                specs = list(self._pending.values())
                self._pending.clear()
            if not specs:
                return
            self._create(specs)

    def _create(self, specs: Iterable[_Spec]) -> None:
        meter = self._meter
        for spec in specs:
            key = spec.name.lower()
            with self._lock:
                if meter is None or self._closed or key in self._instruments:
                    continue
                if len(self._instruments) >= self._max_instruments:
                    self._refused.add(key)
                    first, self._limit_warned = not self._limit_warned, True
                    if first:
                        _log.warning("scrape collector %r: max_instruments=%d reached; new names are dropped",
                                     self.name, self._max_instruments)
                    continue
                self._instruments[key] = spec.kind
            create = meter.create_observable_counter if spec.kind == "counter" else meter.create_observable_gauge
            create(spec.name, callbacks=[self._guard(self._points(key))], unit=spec.unit,
                   description=spec.description)

    # -- failures -------------------------------------------------------------------

    def _fail(self, target: str, reason: str, exc: BaseException) -> None:
        now = time.monotonic()
        with self._lock:
            self._errors[target] = self._errors.get(target, 0) + 1
            self._error_kinds[(target, reason)] = self._error_kinds.get((target, reason), 0) + 1
            last, suppressed = self._log_state.get(target, (float("-inf"), 0))
            if now - last < _LOG_EVERY_S:
                self._log_state[target] = (last, suppressed + 1)
                return
            self._log_state[target] = (now, 0)
        more = f" ({suppressed} more failures since the last report)" if suppressed else ""
        _log.warning("scrape collector %r: scraping %s failed: %s%s", self.name, target, exc, more)

    def _recovered(self, target: str) -> None:
        with self._lock:
            was_failing = target in self._log_state
            self._log_state.pop(target, None)
        if was_failing:
            _log.info("scrape collector %r: %s answers again", self.name, target)


def _is_http_url(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        parts = urlsplit(value)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)
