"""Prometheus exposition on the agent: ``/metrics`` for a plain Prometheus to scrape.

:class:`PrometheusExposition` owns a pull-only :class:`PullReader` (attach it to
the agent's ``MeterProvider``) and a ``prometheus_client`` collector in a
registry of its own (never the global one). Each scrape collects from the SDK
and converts the OpenTelemetry points to Prometheus families, following the
OpenTelemetry "Prometheus and OpenMetrics compatibility" rules:

* names: every character outside ``[a-zA-Z0-9_:]`` becomes ``_``, runs of
  ``_`` collapse, leading and trailing ``_`` go, a leading digit gets ``_``;
* units: a UCUM unit becomes a suffix (``s`` -> ``_seconds``, ``By`` ->
  ``_bytes``, ``By/s`` -> ``_bytes_per_second``); annotations in braces
  (``{packet}``) are dropped; ``1`` becomes ``_ratio`` on gauges only; an
  unknown unit is appended sanitised; nothing is appended twice;
* monotonic cumulative sums -> ``counter`` (``_total``); non-monotonic sums
  and gauges -> ``gauge``; explicit-bucket histograms -> ``histogram``
  (cumulative ``_bucket``, ``_sum``, ``_count``); exponential histograms ->
  ``summary`` with only ``_count`` and ``_sum`` (no quantiles: the buckets are
  not converted); delta temporality cannot be exposed and is dropped;
* attributes -> labels: invalid characters become ``_``, a leading digit gets
  ``key_``, a leading ``__`` (reserved) gets ``key``; attributes that collide
  after sanitising are joined with ``;`` in the order of their original keys;
  non-string values are rendered as JSON;
* the scope -> ``otel_scope_name`` / ``otel_scope_version`` labels;
* the resource: ``service.namespace/service.name`` -> ``job``,
  ``service.instance.id`` -> ``instance`` on every sample, and every other
  resource attribute on one ``target_info`` gauge (value 1).

A scrape never raises into ``prometheus_client``: a failed collection is
counted (:attr:`PrometheusExposition.errors`, and the exposed
``stethoscope_exposition_errors_total``) and logged at most once a minute;
points that cannot be expressed are counted in :attr:`~PrometheusExposition.dropped`.

Examples:
    >>> from opentelemetry.sdk.metrics import MeterProvider
    >>> from opentelemetry.sdk.resources import Resource
    >>> expo = PrometheusExposition(port=0)
    >>> provider = MeterProvider(metric_readers=[expo.reader], shutdown_on_exit=False,
    ...                          resource=Resource({"service.name": "agent"}))
    >>> provider.get_meter("doc").create_counter("gpu.xid.errors", unit="{error}").add(2)
    >>> [line for line in expo.render().decode().splitlines() if line.startswith("gpu_")]
    ['gpu_xid_errors_total{job="agent",otel_scope_name="doc"} 2.0']
    >>> provider.shutdown(); expo.close()
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    ExponentialHistogram,
    Gauge,
    Histogram,
    MetricReader,
    MetricsData,
    Sum,
)
from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.utils import floatToGoString

from stethoscope.errors import ConfigError

__all__ = [
    "DEFAULT_PORT",
    "UNIT_WORDS",
    "PrometheusExposition",
    "PullReader",
    "convert",
    "label_name",
    "metric_name",
    "unit_suffix",
]

_log = logging.getLogger(__name__)

DEFAULT_PORT = 9464
"""The port OpenTelemetry's Prometheus exporters listen on by convention."""

UNIT_WORDS: Mapping[str, str] = {
    "d": "days", "h": "hours", "min": "minutes", "s": "seconds", "ms": "milliseconds",
    "us": "microseconds", "ns": "nanoseconds",
    "By": "bytes", "KiBy": "kibibytes", "MiBy": "mebibytes", "GiBy": "gibibytes", "TiBy": "tebibytes",
    "KBy": "kilobytes", "MBy": "megabytes", "GBy": "gigabytes", "TBy": "terabytes",
    "m": "meters", "V": "volts", "A": "amperes", "J": "joules", "W": "watts", "g": "grams",
    "Cel": "celsius", "Hz": "hertz", "%": "percent",
}
"""UCUM unit -> the word Prometheus names carry as a suffix."""

_PER_UNITS: Mapping[str, str] = {
    "s": "second", "min": "minute", "m": "minute", "h": "hour", "d": "day", "w": "week",
    "mo": "month", "y": "year",
}
_BAD_NAME = re.compile(r"[^a-zA-Z0-9_:]+")
_BAD_LABEL = re.compile(r"[^a-zA-Z0-9_]+")
_UNDERSCORES = re.compile(r"__+")
_BRACES = re.compile(r"\{[^}]*\}")
_RESOURCE_TO_LABELS = ("service.name", "service.namespace", "service.instance.id")
_LOG_EVERY_S = 60.0


def _squeeze(text: str) -> str:
    return _UNDERSCORES.sub("_", text).strip("_")


def unit_suffix(unit: str | None, *, gauge: bool) -> str:
    """The Prometheus suffix for an OpenTelemetry (UCUM) unit, without the ``_``.

    >>> unit_suffix("By", gauge=False), unit_suffix("{packet}/s", gauge=False), unit_suffix("1", gauge=True)
    ('bytes', 'per_second', 'ratio')
    >>> unit_suffix("1", gauge=False), unit_suffix("{thread}", gauge=True), unit_suffix("tokens", gauge=False)
    ('', '', 'tokens')
    """
    text = _BRACES.sub("", unit or "").strip()
    if text == "1":
        return "ratio" if gauge else ""
    main, _, per = text.partition("/")
    parts = []
    if main.strip() and main.strip() != "1":
        parts.append(UNIT_WORDS.get(main.strip(), main.strip()))
    if per.strip():
        parts.append("per_" + _PER_UNITS.get(per.strip(), per.strip()))
    return _squeeze(_BAD_LABEL.sub("_", "_".join(parts)))


def metric_name(name: str, unit: str | None = None, *, kind: str = "gauge") -> str:
    """The Prometheus family name for an OpenTelemetry metric (``""`` if nothing is left).

    ``kind`` is the Prometheus type it becomes; for ``counter`` the name is
    returned without ``_total`` (``prometheus_client`` adds it to the sample).

    >>> metric_name("system.cpu.time", "s", kind="counter")
    'system_cpu_time_seconds'
    >>> metric_name("system.memory.utilization", "1"), metric_name("http.server.request.duration", "s")
    ('system_memory_utilization_ratio', 'http_server_request_duration_seconds')
    >>> metric_name("(lambda).function.executions(#)", "{call}"), metric_name("2xx.count")
    ('lambda_function_executions', '_2xx_count')
    """
    base = _squeeze(_BAD_NAME.sub("_", name))
    if kind == "counter" and base.endswith("_total"):
        base = base[: -len("_total")]
    suffix = unit_suffix(unit, gauge=kind == "gauge")
    if suffix and base and not base.endswith("_" + suffix) and base != suffix:
        base = f"{base}_{suffix}"
    if base[:1].isdigit():
        base = "_" + base
    return base


def label_name(key: str) -> str:
    """The Prometheus label name for an attribute key.

    >>> label_name("gpu.uuid"), label_name("0day"), label_name("__meta"), label_name("k8s.pod-name")
    ('gpu_uuid', 'key_0day', 'key__meta', 'k8s_pod_name')
    """
    name = _BAD_LABEL.sub("_", key)
    if name[:1].isdigit():
        return "key_" + name
    if name.startswith("__"):
        return "key" + name
    return name or "key_"


def _label_value(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return floatToGoString(value) if isinstance(value, float) else str(value)
    if isinstance(value, (bytes, bytearray)):
        return value.decode("utf-8", "replace")
    if isinstance(value, Sequence):
        return json.dumps([v if isinstance(v, (str, int, float, bool)) else str(v) for v in value])
    return str(value)


def _labels(attributes: Mapping[str, Any] | None) -> dict[str, str]:
    """Attributes -> labels; keys that collide after sanitising are joined with ``;``."""
    grouped: dict[str, list[tuple[str, str]]] = {}
    for key, value in (attributes or {}).items():
        grouped.setdefault(label_name(str(key)), []).append((str(key), _label_value(value)))
    return {name: ";".join(v for _, v in sorted(pairs)) for name, pairs in grouped.items()}


class PullReader(MetricReader):
    """A metric reader that collects only when :meth:`pull` is called.

    Temporality is cumulative for every instrument (the reader default), which
    is what Prometheus expects.
    """

    def __init__(self) -> None:
        super().__init__()
        self._pull_lock = threading.Lock()
        self._received: MetricsData | None = None
        self._shut = False

    def _receive_metrics(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any) -> None:
        self._received = metrics_data  # only ever set inside pull(), under its lock

    def pull(self, timeout_s: float = 10.0) -> MetricsData | None:
        """Collect now; None before the reader is attached or after shutdown. May raise."""
        if self._shut:
            return None
        with self._pull_lock:
            self._received = None
            self.collect(timeout_millis=timeout_s * 1000)
            data, self._received = self._received, None
        return data

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        self._shut = True


@dataclass
class _Family:
    kind: str  # counter | gauge | histogram | summary
    help: str
    unit: str
    samples: list[tuple[dict[str, str], Any]] = field(default_factory=list)

    def build(self, name: str) -> Metric:
        keys = sorted({k for labels, _ in self.samples for k in labels})
        unit = self.unit if name.endswith("_" + self.unit) else ""
        if self.kind == "histogram":
            fam: Metric = HistogramMetricFamily(name, self.help, labels=keys, unit=unit)
        elif self.kind == "summary":
            fam = SummaryMetricFamily(name, self.help, labels=keys, unit=unit)
        elif self.kind == "counter":
            fam = CounterMetricFamily(name, self.help, labels=keys, unit=unit)
        else:
            fam = GaugeMetricFamily(name, self.help, labels=keys, unit=unit)
        for labels, value in self.samples:
            values = [labels.get(k, "") for k in keys]  # "" is the same as absent to Prometheus
            if self.kind == "histogram":
                buckets, total = value
                fam.add_metric(values, buckets, total)  # type: ignore[attr-defined]
            elif self.kind == "summary":
                count, total = value
                fam.add_metric(values, count_value=count, sum_value=total)  # type: ignore[attr-defined]
            else:
                fam.add_metric(values, value)  # type: ignore[attr-defined]
        return fam


@dataclass
class _Conversion:
    families: dict[str, _Family] = field(default_factory=dict)
    target_info: list[dict[str, str]] = field(default_factory=list)
    dropped: int = 0

    def add(self, name: str, kind: str, help: str, unit: str, labels: dict[str, str], value: Any) -> None:
        fam = self.families.get(name)
        if fam is None:
            fam = self.families[name] = _Family(kind, help, unit)
        elif fam.kind != kind:  # two metrics map to one name with different types
            self.dropped += 1
            return
        fam.samples.append((labels, value))


def _cumulative_buckets(point: Any) -> list[tuple[str, float]]:
    out, running = [], 0
    for bound, count in zip(point.explicit_bounds, point.bucket_counts):
        running += count
        out.append((floatToGoString(bound), running))
    out.append(("+Inf", point.count))
    return out


def convert(data: MetricsData | None) -> tuple[list[Metric], int]:
    """OpenTelemetry metrics -> Prometheus families, and how many points were dropped."""
    conv = _Conversion()
    for rm in data.resource_metrics if data else ():
        res = dict(rm.resource.attributes)
        common: dict[str, str] = {}
        if res.get("service.name"):
            ns = res.get("service.namespace")
            common["job"] = f"{ns}/{res['service.name']}" if ns else str(res["service.name"])
        if res.get("service.instance.id"):
            common["instance"] = str(res["service.instance.id"])
        info = _labels({k: v for k, v in res.items() if k not in _RESOURCE_TO_LABELS})
        if info:
            conv.target_info.append({**info, **common})
        for sm in rm.scope_metrics:
            scope = {"otel_scope_name": sm.scope.name}
            if sm.scope.version:
                scope["otel_scope_version"] = sm.scope.version
            for metric in sm.metrics:
                _convert_metric(conv, metric, {**scope, **common})
    out = [fam.build(name) for name, fam in conv.families.items() if name]
    if conv.target_info:
        info_family = GaugeMetricFamily("target_info", "Target metadata", labels=sorted(
            {k for labels in conv.target_info for k in labels}))
        for labels in conv.target_info:
            info_family.add_metric([labels.get(k, "") for k in info_family._labelnames], 1)
        out.append(info_family)
    return out, conv.dropped


def _convert_metric(conv: _Conversion, metric: Any, extra: dict[str, str]) -> None:
    data, help_ = metric.data, metric.description or metric.name
    if isinstance(data, Sum):
        if data.aggregation_temporality != AggregationTemporality.CUMULATIVE and data.is_monotonic:
            conv.dropped += len(data.data_points)
            return
        kind = "counter" if data.is_monotonic else "gauge"
    elif isinstance(data, Gauge):
        kind = "gauge"
    elif isinstance(data, Histogram):
        kind = "histogram"
    elif isinstance(data, ExponentialHistogram):
        kind = "summary"
    else:
        conv.dropped += len(getattr(data, "data_points", ()))
        return
    if kind in ("histogram", "summary") and data.aggregation_temporality != AggregationTemporality.CUMULATIVE:
        conv.dropped += len(data.data_points)
        return
    name = metric_name(metric.name, metric.unit, kind=kind)
    unit = unit_suffix(metric.unit, gauge=kind == "gauge")
    if not name:
        conv.dropped += len(data.data_points)
        return
    for point in data.data_points:
        labels = {**_labels(point.attributes), **extra}
        if kind == "histogram":
            value: Any = (_cumulative_buckets(point), point.sum)
        elif kind == "summary":
            value = (point.count, point.sum)
        else:
            value = point.value
        conv.add(name, kind, help_, unit, labels, value)


class _ScrapeCollector:
    """The ``prometheus_client`` side: converts at scrape time, never raises."""

    def __init__(self, owner: PrometheusExposition) -> None:
        self._owner = owner

    def describe(self) -> list[Metric]:
        return []  # keeps register() from collecting

    def collect(self) -> Iterator[Metric]:
        families: Iterable[Metric] = ()
        try:
            families, dropped = convert(self._owner.reader.pull(self._owner.timeout_s))
            self._owner._count(dropped=dropped)
        except Exception as exc:  # a scrape must never fail inside prometheus_client
            self._owner._count(error=exc)
        yield from families
        errors = CounterMetricFamily("stethoscope_exposition_errors",
                                     "Scrapes of the agent whose collection failed.")
        errors.add_metric([], self._owner.errors)
        yield errors


class PrometheusExposition:
    """Serve the agent's metrics at ``http://host:port/metrics`` in the Prometheus format.

    Attach :attr:`reader` to the agent's ``MeterProvider``, then :meth:`start`.
    ``port=0`` picks a free port (see :attr:`port` after :meth:`start`).
    Settings are checked together; a :class:`~stethoscope.errors.ConfigError`
    lists every problem.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = DEFAULT_PORT, *, timeout_s: float = 10.0) -> None:
        problems = []
        if not isinstance(host, str) or not host.strip():
            problems.append(f"host: must be a non-empty address, got {host!r}")
        if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
            problems.append(f"port: must be a port number 0..65535, got {port!r}")
        if not isinstance(timeout_s, (int, float)) or isinstance(timeout_s, bool) or not timeout_s > 0:
            problems.append(f"timeout_s: must be a number > 0, got {timeout_s!r}")
        if problems:
            raise ConfigError(problems)
        self.host, self.timeout_s = host, float(timeout_s)
        self._port = port
        self.reader = PullReader()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_ScrapeCollector(self))
        self._lock = threading.Lock()
        self._errors = self._dropped = 0
        self._suppressed = 0
        self._last_log = float("-inf")
        self._server: Any = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The port served on (the bound one once started, so ``port=0`` resolves)."""
        return self._server.server_address[1] if self._server is not None else self._port

    @property
    def url(self) -> str:
        """The ``/metrics`` URL."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    @property
    def errors(self) -> int:
        """Scrapes whose collection raised."""
        with self._lock:
            return self._errors

    @property
    def dropped(self) -> int:
        """Points that had no Prometheus form (delta temporality, type clashes)."""
        with self._lock:
            return self._dropped

    def render(self) -> bytes:
        """One scrape, as the Prometheus text format (what ``GET /metrics`` answers)."""
        return generate_latest(self.registry)

    def start(self) -> None:
        """Listen and serve ``/metrics`` on a daemon thread; idempotent."""
        if self._server is not None:
            return
        try:
            self._server, self._thread = start_http_server(self._port, addr=self.host, registry=self.registry)
        except OSError as exc:
            raise ConfigError(f"prometheus exposition: cannot listen on {self.host}:{self._port}: "
                              f"{exc.strerror or exc}") from exc
        _log.info("prometheus exposition on %s", self.url)

    def close(self) -> None:
        """Stop serving; idempotent. The reader is shut down with its provider."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _count(self, *, dropped: int = 0, error: BaseException | None = None) -> None:
        now = time.monotonic()
        with self._lock:
            self._dropped += dropped
            if error is None:
                return
            self._errors += 1
            if now - self._last_log < _LOG_EVERY_S:
                self._suppressed += 1
                return
            suppressed, self._suppressed, self._last_log = self._suppressed, 0, now
        _log.warning("prometheus exposition: collection failed (%d similar failures not logged): %r",
                     suppressed, error)
