"""The agent runtime: collectors -> MeterProvider -> OTLP/HTTP (protobuf) exporter.

:class:`AgentSettings` is the frozen, validated configuration; :class:`Agent`
builds the running pipeline from it. The meter provider is private to the
agent (the global provider is never set), and its periodic reader's thread
starts as soon as the agent is built.

Examples:
    >>> AgentSettings(endpoint="ftp://collector", interval_s=0).problems()
    ["endpoint: must be an http(s) URL, got 'ftp://collector'", 'interval_s: must be a finite number > 0, got 0']
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricExportResult, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource

from stethoscope.errors import ConfigError, PluginError

from .collector import Collector

__all__ = ["Agent", "AgentSettings", "DEFAULT_ENDPOINT", "METRICS_PATH"]

_log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "http://127.0.0.1:4318"
METRICS_PATH = "/v1/metrics"


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


@dataclass(frozen=True)
class AgentSettings:
    """What an :class:`Agent` needs; :meth:`problems` lists every mistake at once."""

    endpoint: str = DEFAULT_ENDPOINT
    interval_s: float = 10.0
    timeout_s: float = 10.0
    headers: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

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
        if not _positive(self.interval_s):
            out.append(f"interval_s: must be a finite number > 0, got {self.interval_s!r}")
        if not _positive(self.timeout_s):
            out.append(f"timeout_s: must be a finite number > 0, got {self.timeout_s!r}")
        items = self.headers.items() if isinstance(self.headers, Mapping) else [("<not a mapping>", None)]
        bad = [k for k, v in items if not (isinstance(k, str) and k and isinstance(v, str))]
        if bad:
            out.append(f"headers: names and values must be non-empty strings, bad: {bad!r}")
        return out


class Agent:
    """Periodically collect from ``collectors`` and export to ``endpoint`` over OTLP/HTTP.

    All settings are keyword-only and validated together; a
    :class:`~stethoscope.errors.ConfigError` lists every problem. Collectors are
    registered on meters named ``stethoscope.agents.<collector name>``; a
    collector whose ``register`` fails raises
    :class:`~stethoscope.errors.PluginError` and nothing is left running.

    Examples:
        >>> from stethoscope.agents.resource import build_resource
        >>> agent = Agent(endpoint="http://127.0.0.1:9", collectors=[], resource=build_resource(environ={}))
        >>> agent.settings.metrics_url
        'http://127.0.0.1:9/v1/metrics'
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
    ) -> None:
        settings = AgentSettings(endpoint, interval_s, timeout_s, MappingProxyType(dict(headers or {})))
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
        if problems:
            raise ConfigError(problems)

        self.settings = settings
        self.collectors: tuple[Collector, ...] = tuple(collectors)
        self._lock = threading.Lock()
        self._closed = False
        self._exporter = _RecordingExporter(
            endpoint=settings.metrics_url,
            timeout=settings.timeout_s,
            headers=dict(settings.headers),
        )
        self._reader = PeriodicExportingMetricReader(
            self._exporter,
            export_interval_millis=settings.interval_s * 1000,
            export_timeout_millis=settings.timeout_s * 1000,
        )
        self._provider = MeterProvider(metric_readers=[self._reader], resource=resource, shutdown_on_exit=True)
        for collector in self.collectors:
            try:
                collector.register(self._provider.get_meter(f"stethoscope.agents.{collector.name}"))
            except Exception as exc:
                self.shutdown()
                raise PluginError(f"collector {collector.name!r} failed to register: {exc}") from exc

    @property
    def closed(self) -> bool:
        """True once :meth:`shutdown` has run."""
        return self._closed

    def start(self) -> None:
        """Nothing to do: the periodic reader starts with the agent. Kept for symmetry."""

    def flush(self, timeout_s: float | None = None) -> bool:
        """Collect and export now; True if that worked within ``timeout_s``.

        Defaults to the agent's ``timeout_s``. Never raises; returns False
        after :meth:`shutdown`.
        """
        if self._closed:
            return False
        timeout = self.settings.timeout_s if timeout_s is None else timeout_s
        self._exporter.failed = False
        try:
            collected = self._provider.force_flush(timeout_millis=timeout * 1000)
        except Exception as exc:
            _log.warning("agent flush failed: %s", exc)
            return False
        return bool(collected) and not self._exporter.failed

    def export_once(self) -> bool:
        """Collect and export exactly once, then shut down; True if the export worked.

        For ``stethoscope agent --once``: shutting down already exports a final
        collection, so flushing first would send every point twice.
        """
        if self._closed:
            return False
        self._exporter.failed = False
        self.shutdown()
        return self._exporter.exported and not self._exporter.failed

    def run_forever(self, stop: threading.Event) -> None:
        """Block until ``stop`` is set (or the thread is interrupted), then shut down.

        Shutting down exports one final collection.
        """
        try:
            stop.wait()
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        """Stop the reader (it exports a last collection) and close every collector; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            self._provider.shutdown(timeout_millis=self.settings.timeout_s * 1000)
        except Exception as exc:
            _log.warning("agent shutdown: %s", exc)
        for collector in self.collectors:
            try:
                collector.close()
            except Exception as exc:
                _log.warning("collector %r failed to close: %s", collector.name, exc)


class _RecordingExporter(OTLPMetricExporter):
    """The SDK reader swallows export results; remember whether one failed."""

    failed = False
    exported = False

    def export(self, metrics_data: Any, timeout_millis: float | None = 10_000, **kwargs: Any) -> MetricExportResult:
        result = super().export(metrics_data, timeout_millis=timeout_millis, **kwargs)
        self.exported = True
        if result is not MetricExportResult.SUCCESS:
            self.failed = True
        return result
