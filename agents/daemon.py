"""The agent runtime: collectors -> MeterProvider -> spool -> OTLP/HTTP (protobuf).

:class:`AgentSettings` is the frozen, validated configuration; :class:`Agent`
builds the running pipeline from it. The meter provider is private to the
agent (the global provider is never set). Instead of the SDK's fixed-interval
reader, the agent's own scheduler thread drives a manual reader:

* every ``interval_s`` normally, every ``fast_interval_s`` while a collector's
  optional :class:`FastHint` hook (``wants_fast()``) says its signal is moving,
  doubling back to the base interval ``fast_hold_s`` after the last request;
* backed off (x2 per 10 s window, up to x16) while the agent's own process is
  over its budget (``cpu_budget`` of one core, ``rss_budget_bytes``).

With ``spool_dir`` every collection is appended to an on-disk
:class:`~.spool.Spool` and a :class:`~.delivery.Sender` thread delivers it,
so collector outages and agent restarts lose nothing; without it collections
go straight to the SDK's ``OTLPMetricExporter``. With ``dry_run`` they are
printed as JSON lines and nothing is sent. The agent reports on itself with
``stethoscope.agent.*`` metrics (see :mod:`.overhead`).

Examples:
    >>> AgentSettings(endpoint="ftp://collector", interval_s=0).problems()
    ["endpoint: must be an http(s) URL, got 'ftp://collector'", 'interval_s: must be a finite number > 0, got 0']
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol, TextIO, runtime_checkable
from urllib.parse import urlsplit

from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricExporter, MetricExportResult, MetricReader, MetricsData
from opentelemetry.sdk.resources import Resource

from stethoscope.errors import ConfigError, PluginError

from .collector import Collector
from .delivery import DeliveryStats, Sender, SpoolingExporter, bearer_headers
from .dryrun import DryRunExporter
from .overhead import AgentVitals, Cadence, OverheadBudget, OverheadMeter, Verdict, register_self_metrics
from .spool import Spool, SpoolError

__all__ = ["Agent", "AgentSettings", "DEFAULT_ENDPOINT", "FastHint", "METRICS_PATH"]

_log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "http://127.0.0.1:4318"
METRICS_PATH = "/v1/metrics"
MiB = 1024 * 1024


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


@runtime_checkable
class FastHint(Protocol):
    """Optional collector hook: return True while its signal changes quickly.

    The agent asks after every collection; while any collector says yes (and
    for ``fast_hold_s`` after) it collects every ``fast_interval_s``. It must
    be cheap and must not raise (an exception counts as "no" and is logged once).
    """

    def wants_fast(self) -> bool: ...


@dataclass(frozen=True)
class AgentSettings:
    """What an :class:`Agent` needs; :meth:`problems` lists every mistake at once."""

    endpoint: str = DEFAULT_ENDPOINT
    interval_s: float = 10.0
    timeout_s: float = 10.0
    headers: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    spool_dir: str | None = None
    spool_max_bytes: int = 256 * MiB
    fast_interval_s: float = 1.0
    fast_hold_s: float = 60.0
    cpu_budget: float | None = 0.01
    rss_budget_bytes: int | None = 60 * MiB
    retry_max_s: float = 30.0
    gzip: bool = False

    @property
    def metrics_url(self) -> str:
        """Where the exporter posts: the endpoint plus ``/v1/metrics``."""
        return self.endpoint.rstrip("/") + METRICS_PATH

    def problems(self) -> list[str]:
        """Every configuration problem, empty when the settings are usable."""
        out: list[str] = []
        try:
            url = urlsplit(self.endpoint) if isinstance(self.endpoint, str) else None
        except ValueError:
            url = None
        if url is None or url.scheme not in ("http", "https") or not url.hostname:
            out.append(f"endpoint: must be an http(s) URL, got {self.endpoint!r}")
        elif url.path.rstrip("/").endswith(METRICS_PATH):
            out.append(f"endpoint: give the base URL, {METRICS_PATH} is appended; got {self.endpoint!r}")
        elif url.query or url.fragment:
            out.append(f"endpoint: must not carry a query or fragment, got {self.endpoint!r}")
        for name in ("interval_s", "timeout_s", "fast_interval_s", "retry_max_s"):
            if not _positive(getattr(self, name)):
                out.append(f"{name}: must be a finite number > 0, got {getattr(self, name)!r}")
        items = self.headers.items() if isinstance(self.headers, Mapping) else [("<not a mapping>", None)]
        bad = [k for k, v in items if not (isinstance(k, str) and k and isinstance(v, str))]
        if bad:
            out.append(f"headers: names and values must be non-empty strings, bad: {bad!r}")
        if self.spool_dir is not None and not (isinstance(self.spool_dir, str) and self.spool_dir):
            out.append(f"spool_dir: must be a directory path or None, got {self.spool_dir!r}")
        if not (_positive_int(self.spool_max_bytes) and self.spool_max_bytes >= 64 * 1024):
            out.append(f"spool_max_bytes: must be an integer >= 65536, got {self.spool_max_bytes!r}")
        if not (_positive(self.fast_hold_s) or self.fast_hold_s == 0) or isinstance(self.fast_hold_s, bool):
            out.append(f"fast_hold_s: must be a finite number >= 0, got {self.fast_hold_s!r}")
        if self.cpu_budget is not None and not _positive(self.cpu_budget):
            out.append(f"cpu_budget: must be None or a fraction of one core > 0, got {self.cpu_budget!r}")
        if self.rss_budget_bytes is not None and not _positive_int(self.rss_budget_bytes):
            out.append(f"rss_budget_bytes: must be None or an integer > 0, got {self.rss_budget_bytes!r}")
        return out


class _ManualReader(MetricReader):
    """A reader that collects only when told to, and hands the result to an exporter."""

    def __init__(self, exporter: MetricExporter) -> None:
        super().__init__(
            preferred_temporality=exporter._preferred_temporality,
            preferred_aggregation=exporter._preferred_aggregation,
        )
        self._exporter = exporter
        self.last_result: MetricExportResult | None = None

    def _receive_metrics(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any) -> None:
        try:
            self.last_result = self._exporter.export(metrics_data, timeout_millis=timeout_millis)
        except Exception as exc:  # an exporter must not take the scheduler down
            _log.warning("export failed: %s", exc)
            self.last_result = MetricExportResult.FAILURE

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        self._exporter.shutdown(timeout_millis=timeout_millis)


class Agent:
    """Collect from ``collectors`` on an adaptive schedule and deliver to ``endpoint`` over OTLP/HTTP.

    All settings are keyword-only and validated together; a
    :class:`~stethoscope.errors.ConfigError` lists every problem. Collectors are
    registered on meters named ``stethoscope.agents.<collector name>``; a
    collector whose ``register`` fails raises
    :class:`~stethoscope.errors.PluginError` and nothing is left running. An
    unusable ``spool_dir`` raises :class:`~.spool.SpoolError`. No thread runs
    until :meth:`start` (or :meth:`run_forever`); :meth:`flush` and
    :meth:`export_once` work without it.

    ``token`` is sent as ``Authorization: Bearer`` and ``ca_file`` is the CA
    bundle that verifies an ``https`` endpoint, on either export path; the
    token is never logged. ``extra_readers`` are attached to the same meter
    provider (a Prometheus exposition reader, say). ``overhead_meter`` replaces the psutil
    measurement of this process (tests inject a fake).

    Examples:
        >>> from stethoscope.agents.resource import build_resource
        >>> agent = Agent(endpoint="http://127.0.0.1:9", collectors=[], resource=build_resource(environ={}))
        >>> agent.settings.metrics_url
        'http://127.0.0.1:9/v1/metrics'
        >>> agent.interval_s
        10.0
        >>> agent.shutdown()
        >>> agent.flush()
        False
    """

    def __init__(
        self,
        *,
        endpoint: str = DEFAULT_ENDPOINT,
        interval_s: float = 10.0,
        collectors: Sequence[Collector],
        resource: Resource,
        timeout_s: float = 10.0,
        headers: Mapping[str, str] | None = None,
        spool_dir: str | os.PathLike[str] | None = None,
        spool_max_bytes: int = 256 * MiB,
        fast_interval_s: float = 1.0,
        fast_hold_s: float = 60.0,
        cpu_budget: float | None = 0.01,
        rss_budget_bytes: int | None = 60 * MiB,
        retry_max_s: float = 30.0,
        gzip: bool = False,
        extra_readers: Sequence[MetricReader] = (),
        dry_run: TextIO | None = None,
        overhead_meter: OverheadMeter | None = None,
        token: str | None = None,
        ca_file: str | None = None,
    ) -> None:
        settings = AgentSettings(
            endpoint=endpoint,
            interval_s=interval_s,
            timeout_s=timeout_s,
            headers=MappingProxyType(dict(headers or {})),
            spool_dir=os.fspath(spool_dir) if isinstance(spool_dir, os.PathLike) else spool_dir,
            spool_max_bytes=spool_max_bytes,
            fast_interval_s=fast_interval_s,
            fast_hold_s=fast_hold_s,
            cpu_budget=cpu_budget,
            rss_budget_bytes=rss_budget_bytes,
            retry_max_s=retry_max_s,
            gzip=bool(gzip),
        )
        problems = settings.problems()
        collectors = list(collectors)
        bad = [repr(c) for c in collectors if not isinstance(c, Collector)]
        if bad:
            problems.append(f"collectors: not collectors (need name/register/close): {', '.join(bad)}")
        names = [getattr(c, "name", None) for c in collectors]
        dupes = sorted({str(n) for n in names if names.count(n) > 1})
        if dupes:
            problems.append(f"collectors: names must be unique, repeated: {', '.join(dupes)}")
        if not isinstance(resource, Resource):
            problems.append(f"resource: must be an opentelemetry.sdk.resources.Resource, got {type(resource).__name__}")
        extra_readers = list(extra_readers)
        odd = [type(r).__name__ for r in extra_readers if not isinstance(r, MetricReader)]
        if odd:
            problems.append(f"extra_readers: must be MetricReader instances, got {', '.join(odd)}")
        if dry_run is not None and not callable(getattr(dry_run, "write", None)):
            problems.append(f"dry_run: must be a text stream, got {type(dry_run).__name__}")
        if token is not None and (not isinstance(token, str) or any(c in token for c in "\r\n")):
            problems.append("token: must be a string without line breaks")
        if ca_file and not os.path.isfile(ca_file):
            problems.append(f"ca_file: no such file: {ca_file!r}")
        if problems:
            raise ConfigError(problems)

        self.settings = settings
        self.collectors: tuple[Collector, ...] = tuple(collectors)
        self._lock = threading.Lock()
        self._cycle_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._final_collection = True
        self._logged: set[str] = set()

        self.spool: Spool | None = None
        self._sender: Sender | None = None
        exporter: MetricExporter
        if dry_run is not None:
            exporter = DryRunExporter(dry_run)
        elif settings.spool_dir is not None:
            self.spool = Spool(settings.spool_dir, max_bytes=settings.spool_max_bytes)
            self._sender = Sender(
                self.spool,
                settings.metrics_url,
                headers=settings.headers,
                timeout_s=settings.timeout_s,
                gzip_body=settings.gzip,
                backoff_initial_s=min(0.5, settings.retry_max_s),
                backoff_max_s=settings.retry_max_s,
                token=token or None,
                ca_file=ca_file or None,
            )
            exporter = SpoolingExporter(self.spool, on_append=self._sender.wake)
        else:
            tls = {"certificate_file": ca_file} if ca_file else {}
            exporter = OTLPMetricExporter(
                endpoint=settings.metrics_url, timeout=settings.timeout_s,
                headers={**dict(settings.headers), **bearer_headers(token)}, **tls,
            )
        self._exporter = exporter
        self._reader = _ManualReader(exporter)
        self._cadence = Cadence(settings.interval_s, settings.fast_interval_s, hold_s=settings.fast_hold_s)
        self._meter = overhead_meter or OverheadMeter()
        self._meter.sample()  # the baseline, so the first collection already reports CPU
        self._budget = OverheadBudget(settings.cpu_budget, settings.rss_budget_bytes)
        self._vitals = AgentVitals(interval_s=self._cadence.interval_s)
        self._provider = MeterProvider(
            metric_readers=[self._reader, *extra_readers], resource=resource, shutdown_on_exit=True
        )
        register_self_metrics(self._provider.get_meter("stethoscope.agent"), lambda: self._vitals)
        self._hints: list[tuple[str, Callable[[], bool]]] = []
        for collector in self.collectors:
            try:
                collector.register(self._provider.get_meter(f"stethoscope.agents.{collector.name}"))
            except Exception as exc:
                self._final_collection = False
                self.shutdown()
                raise PluginError(f"collector {collector.name!r} failed to register: {exc}") from exc
            hint = getattr(collector, "wants_fast", None)
            if callable(hint):
                self._hints.append((collector.name, hint))

    # -- state -------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once :meth:`shutdown` has run."""
        return self._closed

    @property
    def interval_s(self) -> float:
        """The collection interval now in force (fast, base, or backed off)."""
        return self._cadence.interval_s

    @property
    def backoff(self) -> int:
        """The over-budget multiplier on the interval (1 when within budget)."""
        return self._cadence.backoff

    def delivery_stats(self) -> DeliveryStats | None:
        """The sender's counters, or None when not spooling."""
        return self._sender.stats() if self._sender is not None else None

    def dropped_points(self) -> dict[str, int]:
        """Data points lost so far, by reason."""
        out: dict[str, int] = {}
        if isinstance(self._exporter, SpoolingExporter):
            out.update(self._exporter.dropped_points)
        if self._sender is not None:
            for reason, n in self._sender.stats().dropped_points.items():
                out[reason] = out.get(reason, 0) + n
        if self.spool is not None and self.spool.dropped_weight:
            out["spool_full"] = self.spool.dropped_weight
        return out

    # -- running -----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the scheduler (and, when spooling, the sender); idempotent."""
        with self._lock:
            if self._closed or self._thread is not None:
                return
            if self._sender is not None:
                self._sender.start()
            self._thread = threading.Thread(target=self._schedule, name="stethoscope-agent", daemon=True)
            self._thread.start()

    def _schedule(self) -> None:
        # The first collection within a second: an operator who just installed the
        # agent sees data at once, not one base interval later.
        next_at = time.monotonic() + min(self._cadence.interval_s, 1.0)
        while not self._stop.wait(max(0.0, next_at - time.monotonic())):
            started = time.monotonic()
            self._cycle()
            next_at = max(started + self._cadence.interval_s, time.monotonic())

    def _cycle(self) -> bool:
        """One collection: measure self, collect and export, then pick the next interval."""
        with self._cycle_lock:
            usage = self._meter.sample()
            self._refresh_vitals(usage)
            self._reader.last_result = None
            try:
                self._reader.collect(timeout_millis=self.settings.timeout_s * 1000)
            except Exception as exc:
                self._log_once("collect", "collection failed: %s", exc)
            ok = self._reader.last_result in (MetricExportResult.SUCCESS, None)
            self._cadence.observe(time.monotonic(), self._wants_fast())
            verdict = self._budget.judge(usage)
            if verdict is Verdict.OVER and self._cadence.back_off():
                self._log_once(
                    "budget",
                    "agent over its overhead budget (cpu %.3f of a core, budget %s; rss %d B, budget %s): "
                    "collecting every %.3gs until it is back under",
                    usage.cpu_ratio if usage else 0.0, self.settings.cpu_budget,
                    usage.rss_bytes if usage else 0, self.settings.rss_budget_bytes, self._cadence.interval_s,
                )
            elif verdict is Verdict.WELL_UNDER and self._cadence.relax():
                _log.debug("agent back under budget: interval %.3gs", self._cadence.interval_s)
            return ok

    def _wants_fast(self) -> bool:
        wanted = False
        for name, hint in self._hints:
            try:
                wanted = bool(hint()) or wanted
            except Exception as exc:
                self._log_once(f"hint:{name}", "collector %r: wants_fast() failed: %s", name, exc)
        return wanted

    def _refresh_vitals(self, usage: Any) -> None:
        spool = self.spool
        self._vitals = AgentVitals(
            interval_s=self._cadence.interval_s,
            usage=usage or self._meter.latest,
            rss_bytes=self._meter.rss_bytes,
            spool_bytes=spool.size_bytes if spool is not None else None,
            spool_records=spool.pending if spool is not None else None,
            dropped_points=MappingProxyType(self.dropped_points()),
        )

    def _log_once(self, key: str, message: str, *args: Any) -> None:
        if key in self._logged:
            _log.debug(message, *args)
        else:
            self._logged.add(key)
            _log.warning(message, *args)

    def flush(self, timeout_s: float | None = None) -> bool:
        """Collect now and deliver; True if everything was delivered within ``timeout_s``.

        Defaults to the agent's ``timeout_s``. When spooling, waits for the
        spool to drain (older records included). Never raises; returns False
        after :meth:`shutdown`.
        """
        if self._closed:
            return False
        timeout = self.settings.timeout_s if timeout_s is None else timeout_s
        try:
            ok = self._cycle()
        except Exception as exc:
            _log.warning("agent flush failed: %s", exc)
            return False
        if self._sender is not None:
            self._sender.start()
            return self._sender.wait_drained(timeout) and ok
        return ok

    def export_once(self) -> bool:
        """Collect and export exactly once, then shut down; True if the export worked.

        For ``stethoscope agent --once`` (and ``--once --dry-run``). When
        spooling, whatever could not be delivered within ``timeout_s`` stays
        in the spool for the next start.
        """
        if self._closed:
            return False
        ok = self.flush()
        self._final_collection = False
        self.shutdown(drain_timeout_s=0.0)
        return ok

    def run_forever(self, stop: threading.Event) -> None:
        """Start, block until ``stop`` is set (or the thread is interrupted), then shut down.

        Shutting down exports one final collection.
        """
        try:
            self.start()
            stop.wait()
        finally:
            self.shutdown()

    def shutdown(self, drain_timeout_s: float | None = None) -> None:
        """Stop collecting, drain the spool for a bounded time, close.

        An agent that was started collects one last time first (one that was
        only ever flushed by hand does not).

        ``drain_timeout_s`` defaults to ``timeout_s``; what is not delivered by
        then stays in the spool. Closes every collector. Idempotent.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
        self._stop.set()
        if thread is not None:
            thread.join(self.settings.timeout_s + 1.0)
        if self._final_collection and thread is not None:
            try:
                self._cycle()
            except Exception as exc:
                _log.warning("final collection failed: %s", exc)
        if self._sender is not None:
            drain = self.settings.timeout_s if drain_timeout_s is None else drain_timeout_s
            if drain > 0:
                self._sender.start()
            self._sender.shutdown(drain_timeout_s=drain)
        try:
            self._provider.shutdown(timeout_millis=self.settings.timeout_s * 1000)
        except Exception as exc:
            _log.warning("agent shutdown: %s", exc)
        if isinstance(self._exporter, SpoolingExporter) and self._sender is not None:
            stats = self._sender.stats()
            try:
                left = self.spool.pending if self.spool is not None else 0
            except SpoolError:
                left = -1
            _log.info(
                "agent stopped: %d points spooled in %d records; %d records delivered; dropped %s; "
                "%d records left in the spool",
                self._exporter.exported_points, self._exporter.exported_records, stats.sent_records,
                self.dropped_points() or "nothing", left,
            )
        if self.spool is not None:
            self.spool.close()
        for collector in self.collectors:
            try:
                collector.close()
            except Exception as exc:
                _log.warning("collector %r failed to close: %s", collector.name, exc)
