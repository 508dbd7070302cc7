"""The dcgm-exporter collector: scrape NVIDIA's exporter and re-emit the GPU table.

dcgm-exporter's ``DCGM_FI_*`` fields are mapped onto the same names, units and
attributes the NVML collector uses (see :data:`FIELDS` and
:mod:`stethoscope.agents.gpu.names`), so dashboards do not care which source a
node runs. Unit conversions: ``FB_*`` MiB -> bytes, ``TOTAL_ENERGY_CONSUMPTION``
mJ -> J, ``*_UTIL`` percent -> ratio; ``PROF_*`` are ratios or bytes/s already.

``DCGM_FI_DEV_XID_ERRORS`` is the *last* XID value, not a count, so it becomes
the gauge ``gpu.xid.last``; counting every XID (``gpu.xid.errors``) needs NVML.
Fields not in :data:`FIELDS` pass through as gauges under their own name,
lowercased with dots (``DCGM_FI_DEV_FOO`` -> ``dcgm.fi.dev.foo``); their
instruments are created off the collection thread, so they appear from the
cycle after they are first seen.

One scrape serves a whole collection cycle. An unreachable endpoint or an
unparseable body is logged (at most once a minute), counted in
:attr:`DcgmCollector.scrape_errors`, and gives no points for that cycle.

Examples:
    >>> text = 'DCGM_FI_DEV_FB_USED{gpu="0",UUID="GPU-1",Hostname="n1"} 1024\\n'
    >>> [(o.value, dict(o.attributes)) for o in to_readings(text).get("gpu.memory.used")]
    [(1073741824, {'gpu.index': '0', 'gpu.source': 'dcgm', 'gpu.uuid': 'GPU-1'})]
    >>> DcgmCollector().name
    'dcgm'
"""

from __future__ import annotations

import logging
import math
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from urllib.parse import urlsplit

from opentelemetry.metrics import Meter
from prometheus_client.parser import text_string_to_metric_families

from stethoscope.errors import ConfigError, PluginError

from . import names as n
from .names import MetricSpec, Readings, SnapshotCache, register_instruments, throttle_states

__all__ = ["DEFAULT_URL", "DcgmCollector", "FIELDS", "LABELS", "Field", "passthrough_name", "to_readings"]

_log = logging.getLogger(__name__)

DEFAULT_URL = "http://127.0.0.1:9400/metrics"
_MiB = 1024 * 1024
_MAX_BODY = 32 * _MiB
_LOG_EVERY_S = 60.0
_MAX_PASSTHROUGH = 256


@dataclass(frozen=True)
class Field:
    """How one DCGM field maps onto the GPU table."""

    metric: str
    scale: float = 1.0
    attributes: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))


def _f(metric: str, scale: float = 1.0, attrs: Mapping[str, str] | None = None) -> Field:
    return Field(metric, scale, MappingProxyType(dict(attrs or {})))


_TX, _RX = {n.IO_DIRECTION: "tx"}, {n.IO_DIRECTION: "rx"}

FIELDS: Mapping[str, Field] = MappingProxyType({
    "DCGM_FI_DEV_GPU_UTIL": _f("gpu.utilization", 0.01),
    "DCGM_FI_DEV_MEM_COPY_UTIL": _f("gpu.memory_controller.utilization", 0.01),
    "DCGM_FI_DEV_ENC_UTIL": _f("gpu.encoder.utilization", 0.01),
    "DCGM_FI_DEV_DEC_UTIL": _f("gpu.decoder.utilization", 0.01),
    "DCGM_FI_DEV_GPU_TEMP": _f("gpu.temperature"),
    "DCGM_FI_DEV_MEMORY_TEMP": _f("gpu.memory.temperature"),
    "DCGM_FI_DEV_POWER_USAGE": _f("gpu.power.draw"),
    "DCGM_FI_DEV_ENFORCED_POWER_LIMIT": _f("gpu.power.limit"),
    "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION": _f("gpu.energy", 0.001),
    "DCGM_FI_DEV_SM_CLOCK": _f("gpu.clock.sm"),
    "DCGM_FI_DEV_MEM_CLOCK": _f("gpu.clock.memory"),
    "DCGM_FI_DEV_ECC_SBE_VOL_TOTAL": _f("gpu.ecc.errors", attrs={n.ECC_TYPE: "corrected"}),
    "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL": _f("gpu.ecc.errors", attrs={n.ECC_TYPE: "uncorrected"}),
    "DCGM_FI_DEV_RETIRED_SBE": _f("gpu.retired_pages", attrs={n.RETIREMENT_CAUSE: "multiple_single_bit_ecc"}),
    "DCGM_FI_DEV_RETIRED_DBE": _f("gpu.retired_pages", attrs={n.RETIREMENT_CAUSE: "double_bit_ecc"}),
    "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS": _f("gpu.remapped_rows", attrs={n.REMAP_TYPE: "correctable"}),
    "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS": _f("gpu.remapped_rows", attrs={n.REMAP_TYPE: "uncorrectable"}),
    "DCGM_FI_DEV_ROW_REMAP_PENDING": _f("gpu.row_remap.pending"),
    "DCGM_FI_DEV_ROW_REMAP_FAILURE": _f("gpu.row_remap.failure"),
    "DCGM_FI_PROF_PCIE_TX_BYTES": _f("gpu.pcie.throughput", attrs=_TX),
    "DCGM_FI_PROF_PCIE_RX_BYTES": _f("gpu.pcie.throughput", attrs=_RX),
    "DCGM_FI_DEV_PCIE_REPLAY_COUNTER": _f("gpu.pcie.replay"),
    "DCGM_FI_PROF_NVLINK_TX_BYTES": _f("gpu.nvlink.throughput", attrs=_TX),
    "DCGM_FI_PROF_NVLINK_RX_BYTES": _f("gpu.nvlink.throughput", attrs=_RX),
    "DCGM_FI_DEV_XID_ERRORS": _f("gpu.xid.last"),
    "DCGM_FI_PROF_SM_ACTIVE": _f("gpu.sm.activity"),
    "DCGM_FI_PROF_SM_OCCUPANCY": _f("gpu.sm.occupancy"),
    "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE": _f("gpu.tensor.activity"),
    "DCGM_FI_PROF_DRAM_ACTIVE": _f("gpu.dram.activity"),
    "DCGM_FI_PROF_GR_ENGINE_ACTIVE": _f("gpu.graphics_engine.activity"),
})
"""DCGM field -> GPU-table metric, scale to the table's unit, and extra attributes.

Handled apart: ``FB_USED`` + ``FB_RESERVED`` -> ``gpu.memory.used`` (NVML counts
reserved memory as used), ``FB_TOTAL`` (or the sum of used, free and reserved)
-> ``gpu.memory.total``, and the clock-event bitmask ``CLOCKS_EVENT_REASONS``
(formerly ``CLOCK_THROTTLE_REASONS``) -> one ``gpu.throttle`` series per reason.
"""

_MEMORY = {"DCGM_FI_DEV_FB_USED": "used", "DCGM_FI_DEV_FB_RESERVED": "reserved",
           "DCGM_FI_DEV_FB_FREE": "free", "DCGM_FI_DEV_FB_TOTAL": "total"}
_THROTTLE = frozenset({"DCGM_FI_DEV_CLOCKS_EVENT_REASONS", "DCGM_FI_DEV_CLOCK_THROTTLE_REASONS"})

LABELS: Mapping[str, str] = MappingProxyType({
    "gpu": n.GPU_INDEX,
    "UUID": n.GPU_UUID,
    "uuid": n.GPU_UUID,  # dcgm-exporter -o/--use-old-namespace
    "gpu_uuid": n.GPU_UUID,  # NVLink/NVSwitch series
    "pci_bus_id": n.GPU_PCI_BUS_ID,
    "device": n.GPU_DEVICE,
    "modelName": n.GPU_MODEL,
    "model_name": n.GPU_MODEL,
    "GPU_I_PROFILE": n.MIG_PROFILE,
    "GPU_I_ID": n.MIG_INSTANCE,
    "pod": n.K8S_POD_NAME,
    "namespace": n.K8S_NAMESPACE_NAME,
    "container": n.K8S_CONTAINER_NAME,
    "pod_uid": n.K8S_POD_UID,
})
"""dcgm-exporter label -> attribute. ``hostname``/``Hostname`` (the resource says
it) and label-type fields (``DCGM_FI_DRIVER_VERSION=...``) are dropped; any other
label is kept as ``dcgm.<label lowercased>``."""

_DROP_LABELS = frozenset({"hostname", "Hostname"})


def _attributes(labels: Mapping[str, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in labels.items():
        if not value or key in _DROP_LABELS or key.startswith("DCGM_FI_"):
            continue
        out[LABELS.get(key) or f"dcgm.{key.lower()}"] = value
    out[n.SOURCE] = "dcgm"
    return out


def passthrough_name(field_name: str) -> str:
    """The instrument name an unmapped field passes through under.

    >>> passthrough_name("DCGM_FI_DEV_VGPU_LICENSE_STATUS")
    'dcgm.fi.dev.vgpu.license.status'
    """
    return field_name.lower().replace("_", ".")


def to_readings(text: str) -> Readings:
    """Map a dcgm-exporter scrape onto the GPU table.

    Raises ValueError when ``text`` is not Prometheus text or holds no ``DCGM_`` sample.
    """
    memory: dict[tuple[tuple[str, str], ...], dict[str, float]] = {}
    out = Readings()
    seen = 0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name, value = sample.name, float(sample.value)
            if family.type == "counter" and name == family.name + "_total":
                name = family.name  # the parser appends _total to counter samples
            if not name.startswith("DCGM_"):
                continue
            seen += 1
            if math.isnan(value):
                continue
            attrs = _attributes(sample.labels)
            if name in _MEMORY:
                memory.setdefault(tuple(sorted(attrs.items())), {})[_MEMORY[name]] = value
            elif name in _THROTTLE:
                for reason, on in throttle_states(int(value)).items():
                    out.add("gpu.throttle", on, {**attrs, n.THROTTLE_REASON: reason})
            elif name in FIELDS:
                spec = FIELDS[name]
                scaled = value * spec.scale
                if spec.metric.startswith("gpu.row_remap."):
                    scaled = int(bool(value))
                elif spec.scale == 1.0 and value.is_integer():
                    scaled = int(value)
                out.add(spec.metric, scaled, {**attrs, **spec.attributes})
            else:
                out.add(passthrough_name(name), value, attrs)
    if not seen:
        raise ValueError("no DCGM_ sample in the scrape")
    for key, fb in memory.items():
        attrs = dict(key)
        reserved = fb.get("reserved", 0.0)
        if "used" in fb:
            out.add("gpu.memory.used", int((fb["used"] + reserved) * _MiB), attrs)
        if "free" in fb:
            out.add("gpu.memory.free", int(fb["free"] * _MiB), attrs)
        if "total" in fb:
            out.add("gpu.memory.total", int(fb["total"] * _MiB), attrs)
        elif "used" in fb and "free" in fb:
            out.add("gpu.memory.total", int((fb["used"] + fb["free"] + reserved) * _MiB), attrs)
    return out


def _describe(exc: BaseException, timeout_s: float) -> str:
    """A short reason for a failed scrape, for logs and the detection line."""
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code}"
    reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, (TimeoutError, socket.timeout)):
        return f"no answer within {timeout_s:g} s"
    if isinstance(reason, ValueError):
        return f"unparseable scrape: {reason}"
    return str(reason) or type(reason).__name__


class DcgmCollector:
    """GPU metrics scraped from dcgm-exporter; registered as the ``dcgm`` collector.

    ``url`` is the exporter's ``/metrics``; ``timeout_s`` bounds one scrape;
    ``max_age_s`` is how long one scrape serves the instrument callbacks.
    """

    def __init__(self, *, name: str = "dcgm", url: str = DEFAULT_URL, timeout_s: float = 2.0,
                 max_age_s: float = 0.5, clock: Callable[[], float] = time.monotonic) -> None:
        problems = []
        if urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).netloc:
            problems.append(f"dcgm.url: must be an http(s) URL, got {url!r}")
        if not isinstance(timeout_s, (int, float)) or not 0 < timeout_s < math.inf:
            problems.append(f"dcgm.timeout_s: must be a number > 0, got {timeout_s!r}")
        if problems:
            raise ConfigError(problems)
        self.name, self.url, self.timeout_s = name, url, float(timeout_s)
        self._clock = clock
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # node-local: no proxy
        self._cache = SnapshotCache(self._snapshot, max_age_s=max_age_s, clock=clock)
        self._lock = threading.Lock()
        self._scrape_errors = 0
        self._last_logged: float | None = None
        self._meter: Meter | None = None
        self._passthrough: set[str] = set()
        self._registrar: threading.Thread | None = None
        self._closed = False

    @property
    def scrape_errors(self) -> int:
        """Failed scrapes (unreachable, HTTP error, unparseable) since construction."""
        with self._lock:
            return self._scrape_errors

    def probe(self) -> None:
        """Scrape once; raise :class:`~stethoscope.errors.PluginError` with a short reason if that fails."""
        try:
            to_readings(self._fetch())
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise PluginError(_describe(exc, self.timeout_s)) from exc

    def register(self, meter: Meter) -> None:
        """Create the GPU-table instruments on ``meter``; no I/O happens here."""
        self._meter = meter
        register_instruments(meter, self._cache.get)

    def wants_fast(self) -> bool:
        """True while a GPU signal moves fast; the agent then collects at its fast interval."""
        return self._cache.moving

    def close(self) -> None:
        """Stop serving points; idempotent."""
        self._closed = True
        registrar = self._registrar
        if registrar is not None:
            registrar.join(timeout=5)
        self._cache.clear()

    # -- scraping ---------------------------------------------------------------------

    def _fetch(self) -> str:
        with self._opener.open(self.url, timeout=self.timeout_s) as response:
            body = response.read(_MAX_BODY + 1)
        if len(body) > _MAX_BODY:
            raise ValueError(f"scrape larger than {_MAX_BODY // _MiB} MiB")
        return body.decode("utf-8")

    def _snapshot(self) -> Readings:
        if self._closed:
            return Readings()
        try:
            readings = to_readings(self._fetch())
        except Exception as exc:  # unreachable, HTTP error, garbage: no points this cycle
            self._failed(_describe(exc, self.timeout_s))
            return Readings()
        self._pass_through(readings)
        return readings

    def _failed(self, reason: str) -> None:
        now = self._clock()
        with self._lock:
            self._scrape_errors += 1
            count = self._scrape_errors
            due = self._last_logged is None or now - self._last_logged >= _LOG_EVERY_S
            if due:
                self._last_logged = now
        if due:
            _log.warning("dcgm collector: scraping %s failed: %s (%d failures so far; "
                         "logged at most once a minute)", self.url, reason, count)

    def _pass_through(self, readings: Readings) -> None:
        """Create instruments for fields first seen now, on a helper thread.

        Instruments cannot be created from inside a collection callback (the SDK
        holds its lock while it runs them), so a short-lived thread creates them
        once this collection ends; they report from the next cycle.
        """
        meter = self._meter
        if meter is None:
            return
        new = [name for name in readings.names()
               if name not in n.METRICS_BY_NAME and name not in self._passthrough]
        if not new:
            return
        room = _MAX_PASSTHROUGH - len(self._passthrough)
        if len(new) > room:
            _log.warning("dcgm collector: more than %d unmapped DCGM fields; ignoring %s",
                         _MAX_PASSTHROUGH, ", ".join(sorted(new[room:])))
            self._passthrough.update(new[room:])
            new = new[:room]
        self._passthrough.update(new)
        specs = [MetricSpec(name, "", "gauge", "dcgm-exporter field passed through unmapped.") for name in new]
        previous = self._registrar

        def create() -> None:
            if previous is not None:
                previous.join()
            register_instruments(meter, self._cache.get, specs=specs)

        self._registrar = threading.Thread(target=create, name=f"{self.name}-passthrough", daemon=True)
        self._registrar.start()
