"""``ModelMonitor``: feature and prediction distributions, latency, errors and sampled rows.

The hot path never raises and never does I/O. :meth:`ModelMonitor.record`
is one call into the sketch kernel (``record_row``, C with a NumPy twin) under
a short lock: it validates the row, updates every feature's exponential
histogram, the prediction/confidence histograms, the latency histogram and
the stream's counters, and makes the sampling decision; Python only acts on
what it reports (drops, class labels, kept rows). :meth:`ModelMonitor.record_batch`
does the same for ``n`` rows with the batched kernels. The background thread
exports every ``export_interval_s`` (``buffer_rows`` is accepted but no longer
used: nothing is buffered).
Bad values are counted in :attr:`ModelMonitor.dropped` by reason:

``wrong_type``, ``wrong_shape``        the row was dropped
``nonfinite_feature``                  that value left out of its sketch (the row is kept)
``nonfinite_prediction``, ``bad_confidence``, ``bad_latency``
                                       that value left out (the row is kept)
``bad_label``, ``bad_business``, ``bad_error_kind``
                                       the call was ignored
``row_queue_full``                     a sampled row was lost before export
``closed``                             called after :meth:`ModelMonitor.close`

Everything exported is **delta** temporality: each point covers exactly one
export window (``StartTimeUnix`` = the previous export, ``TimeUnix`` = this
one). Per-window distributions are what drift analytics compares, longer
windows are a merge (sum of counts), and a sketch whose range widens in one
window does not lose resolution for ever after, as a cumulative one would.
With ``spool_dir`` windows survive collector outages on disk.

Examples:
    >>> import numpy as np
    >>> from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter
    >>> from stethoscope.agents.sdk.memory import InMemoryExporter
    >>> m = ModelMonitor("fraud", "3", feature_names=["amount", "age"], start=False,
    ...                  sampling=SamplingConfig(remote=False), metric_exporter=InMemoryExporter(),
    ...                  log_exporter=InMemoryLogRecordExporter())
    >>> m.record([12.5, 40.0], 0.93, confidence=0.93, latency_ms=4.2, request_id="req-1")
    True
    >>> m.record([float("nan"), 40.0], 0.1)
    True
    >>> m.record([1.0, 2.0, 3.0], 0.5)
    False
    >>> sorted(m.dropped.items())
    [('nonfinite_feature', 1), ('wrong_shape', 1)]
    >>> m.record_batch(np.ones((100, 2)), np.zeros(100))
    100
    >>> m.flush()
    True
    >>> sorted({metric.name for metric in m.metric_exporter.metrics()})[:3]
    ['stethoscope.model.confidence', 'stethoscope.model.feature', 'stethoscope.model.latency']
    >>> m.close()
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import numpy as np
from opentelemetry.sdk._logs.export import LogRecordExporter
from opentelemetry.sdk.metrics.export import Metric, MetricExporter

from stethoscope.errors import ConfigError

from ..daemon import DEFAULT_ENDPOINT
from ..resource import build_resource
from .consistent import MAX_RANDOMNESS, adjusted_count, randomness_many, threshold_for, threshold_hex
from .consistent import thresholds as thresholds_of
from .drops import DropCounter
from .export import Delivery
from .lifecycle import closer
from .model_settings import DEFAULT_LATENCY_BOUNDS_MS, ModelMonitorSettings, finite_number
from .remote import SamplingConfigPoller
from .sampling import DEFAULT_STREAM, AdaptiveSampler, SamplingConfig
from .sketch import (
    ROW_BAD_CONFIDENCE,
    ROW_BAD_LATENCY,
    ROW_BAD_PREDICTION,
    ROW_BOOSTED,
    ROW_KEPT,
    ROW_LABEL,
    ROW_NONFINITE_UNIT,
    ROW_SLOW,
    ROW_WRONG_SHAPE,
    SketchBank,
    sketch_kernels,
)
from .uncertainty import LabelCandidate, LabelingQueue, confidence_and_uncertainty, uncertainty_many
from .window import Window, exp_metric, window_metrics, without_attribute

__all__ = ["ModelMonitor", "ModelMonitorSettings", "DEFAULT_LATENCY_BOUNDS_MS", "SAMPLE_EVENT", "LABEL_EVENT"]

_log = logging.getLogger("stethoscope.agents.sdk")

SAMPLE_EVENT = "stethoscope.sample"
LABEL_EVENT = "stethoscope.label"
_NAN = float("nan")
_INF = math.inf
_NINF = -math.inf
_ATTR_TYPES = (str, bool, int, float)
MiB = 1024 * 1024
_BAD = object()


class ModelMonitor:
    """Monitor one model version in-process; see the module docstring.

    ``feature_names`` is a sequence of names, a number of features, or None
    (fixed by the first valid record, named ``f0``, ``f1``...). Anything not in
    the signature is keyword-only and validated with the rest; a
    :class:`~stethoscope.errors.ConfigError` lists every problem at once.

    ``environ`` (default :data:`os.environ`) is read for resource attributes and,
    by the sampling poller, for the OTLP exporter's ``OTEL_EXPORTER_OTLP_HEADERS``
    and ``..._CERTIFICATE`` variables when ``headers`` gives no credentials.

    ``start=False`` runs no background thread: call :meth:`flush` yourself.
    ``metric_exporter``/``log_exporter`` replace the OTLP exporters (tests).
    """

    def __init__(
        self,
        model: str,
        version: str = "",
        *,
        endpoint: str = DEFAULT_ENDPOINT,
        feature_names: Sequence[str] | int | None = None,
        service_name: str | None = None,
        export_interval_s: float = 10.0,
        sampling: SamplingConfig | None = None,
        resource_attributes: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        timeout_s: float = 10.0,
        spool_dir: str | os.PathLike[str] | None = None,
        spool_max_bytes: int = 64 * MiB,
        latency_bounds_ms: Sequence[float] = DEFAULT_LATENCY_BOUNDS_MS,
        buffer_rows: int = 256,
        max_pending_rows: int = 10_000,
        cost_per_prediction: float | None = None,
        max_names: int = 64,
        start: bool = True,
        seed: int | None = None,
        environ: Mapping[str, str] | None = None,
        metric_exporter: MetricExporter | None = None,
        log_exporter: LogRecordExporter | None = None,
    ) -> None:
        problems: list[str] = []
        names: tuple[str, ...] | None
        if isinstance(feature_names, int) and not isinstance(feature_names, bool):
            names = tuple(f"f{i}" for i in range(feature_names)) if feature_names > 0 else ()
            self._named = False
        elif feature_names is None:
            names, self._named = None, False
        elif isinstance(feature_names, Sequence) and not isinstance(feature_names, str):
            names, self._named = tuple(feature_names), True
        else:
            names, self._named = (), True
            problems.append(f"feature_names: must be a sequence of names or a count, got {feature_names!r}")
        settings = ModelMonitorSettings(
            model=model, version=version, endpoint=endpoint, feature_names=names, service_name=service_name,
            export_interval_s=export_interval_s, sampling=sampling if sampling is not None else SamplingConfig(),
            resource_attributes=MappingProxyType(dict(resource_attributes or {})),
            headers=MappingProxyType(dict(headers or {})), timeout_s=timeout_s,
            spool_dir=os.fspath(spool_dir) if spool_dir is not None else None, spool_max_bytes=spool_max_bytes,
            latency_bounds_ms=tuple(latency_bounds_ms) if isinstance(latency_bounds_ms, Sequence) else (),
            buffer_rows=buffer_rows, max_pending_rows=max_pending_rows, cost_per_prediction=cost_per_prediction,
            max_names=max_names,
        )
        problems += settings.problems()
        if problems:
            raise ConfigError(problems)
        self.settings = settings
        self.model, self.version = model, version
        self._kernels = sketch_kernels()
        self._lock = threading.Lock()
        self._cycle_lock = threading.Lock()
        self._drops = DropCounter(f"ModelMonitor({model!r})")
        self._rng = random.Random(seed)
        self._np_rng = np.random.default_rng(seed)
        self.sampler = AdaptiveSampler(settings.sampling, model, lock=self._lock)
        unc = settings.sampling.uncertainty
        self._unc = unc
        self._min_u = unc.min_uncertainty if unc is not None else math.inf
        self._boost1 = (unc.boost - 1.0) if unc is not None else 0.0
        self.labeling_queue = LabelingQueue(unc.queue_size if unc is not None else 1)
        self._bounds = np.asarray(settings.latency_bounds_ms, dtype=np.float64)
        self._rows: deque[tuple] = deque()
        self._max_rows = settings.max_pending_rows
        self._d: int | None = None
        self._names: tuple[str, ...] = ()
        self._window = Window(len(self._bounds), time.time_ns())
        self._outputs = SketchBank(self._kernels, [
            self._base_attrs({"stethoscope.output": "prediction"}),
            self._base_attrs({"stethoscope.output": "confidence"}),
        ])
        self._ostate = self._outputs.state
        self._record_row = self._kernels.record_row
        self._row_stats_type = self._kernels.row_stats
        self._default = self.sampler.stream(DEFAULT_STREAM)
        self._streams = {DEFAULT_STREAM: self._default}
        # per stream name: (stream state, its RowStats block, the RowStats); record() counts into the block
        # and _fold_locked() moves the counts into the window and the sampler
        self._row_streams: dict[str, tuple[Any, np.ndarray, Any]] = {}
        self._fstate: Any = None
        if names:
            self._setup(len(names), names)

        attrs = dict(settings.resource_attributes)
        if service_name is not None:
            attrs["service.name"] = service_name
        resource = build_resource(service_name=service_name or model, extra=attrs, environ=environ)
        self.service_name = str(resource.attributes.get("service.name", model))
        self.metric_exporter = metric_exporter
        self._delivery = Delivery(
            settings.endpoint, resource, headers=settings.headers, timeout_s=settings.timeout_s,
            spool_dir=settings.spool_dir, spool_max_bytes=settings.spool_max_bytes,
            metric_exporter=metric_exporter, log_exporter=log_exporter,
        )
        self._poller = (SamplingConfigPoller(settings.endpoint, self.service_name, timeout_s=min(5.0, timeout_s),
                                             headers=settings.headers, environ=environ)
                        if settings.sampling.remote else None)
        self._dropped_exported: dict[str, int] = {}
        self._closed = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._atexit: Callable[[], None] | None = None
        self._logged: set[str] = set()
        if start:
            self.start()

    # -- setup -----------------------------------------------------------------------------

    def _base_attrs(self, extra: Mapping[str, Any]) -> dict[str, Any]:
        return {"stethoscope.model": self.model, "stethoscope.model.version": self.version, **extra}

    def _setup(self, d: int, names: Sequence[str] | None = None) -> None:
        self._names = tuple(names) if names else tuple(f"f{i}" for i in range(d))
        self._features = SketchBank(self._kernels, [
            self._base_attrs({"stethoscope.feature.name": n, "stethoscope.feature.index": i})
            for i, n in enumerate(self._names)
        ])
        self._fstate = self._features.state
        self._d = d

    def start(self) -> None:
        """Start the background thread (export, sampling adjustment, config polling); idempotent."""
        if self._thread is None and not self._closed:
            self._thread = threading.Thread(target=self._run, name=f"stethoscope-model-{self.model}", daemon=True)
            self._thread.start()
            self._atexit = closer(self)
            atexit.register(self._atexit)

    # -- state -----------------------------------------------------------------------------

    @property
    def dropped(self) -> Mapping[str, int]:
        """Values and calls dropped so far, by reason."""
        return self._drops.snapshot()

    @property
    def feature_names(self) -> tuple[str, ...]:
        return self._names

    @property
    def closed(self) -> bool:
        return self._closed

    def _drop(self, reason: str, n: int = 1, detail: str = "") -> bool:
        self._drops.add(reason, n, detail)
        return False

    # -- the hot path ----------------------------------------------------------------------

    def record(self, features: Any, prediction: Any, confidence: Any = None, latency_ms: Any = None,
               request_id: Any = None, *, stream: str = DEFAULT_STREAM, **attributes: Any) -> bool:
        """Record one prediction; True if it was taken (never raises).

        ``features`` is a 1-D array or sequence of ``d`` numbers; ``prediction``
        a number or a class label (str); ``confidence`` a number in [0, 1] or a
        vector of class probabilities; ``attributes`` ride on the row if it is
        sampled (they are not metric attributes).

        One call into the sketch kernel (``record_row``) validates the row,
        updates every feature's histogram, the prediction/confidence
        histograms, the latency histogram and the stream's counters, and makes
        the sampling decision; Python only handles what that call reports
        (drops, a class label, a kept row).
        """
        try:
            entry = self._row_streams.get(stream)
            if entry is None:
                entry = self._row_entry(stream, features)
                if entry is None:
                    return False
            u = None
            if confidence is not None and type(confidence) is not float:
                confidence, u = self._confidence(confidence)
            rule = entry[0].rule
            lock = self._lock
            lock.acquire()  # cheaper than ``with`` on the hot path; try/finally costs nothing when nothing raises
            try:
                code = self._record_row(features, self._fstate, prediction, confidence, latency_ms, request_id,
                                        self._ostate, entry[1], rule[0], rule[1], u)
            finally:
                lock.release()
            if code == 0:
                return True
            return self._after_row(code, entry, rule, features, prediction, confidence, u, latency_ms, request_id,
                                   attributes)
        except Exception as exc:  # the hot path never raises
            return self._drop("internal_error", 1, f"{type(exc).__name__}: {exc}")

    def _row_entry(self, stream: str, features: Any) -> tuple[Any, np.ndarray, Any] | None:
        """The row counters of ``stream`` (first use of a name, or the first row ever); None if dropped."""
        if self._closed:
            return self._drop("closed") or None
        if self._d is None:
            arr = self._as_row(features)
            if arr is None:
                return None
            if arr.ndim != 1 or arr.shape[0] == 0:
                return self._drop("wrong_shape", 1, f"features shape {arr.shape}") or None
            with self._lock:
                if self._d is None:
                    self._setup(arr.shape[0])
        with self._lock:
            st = self._streams.get(stream)
            if st is None:
                st = self._stream(stream)
            entry = self._row_streams.get(st.name)
            if entry is None:
                stats = self._row_stats_type(self._bounds, self._min_u, self._boost1, seed=self._rng.getrandbits(64))
                entry = self._row_streams[st.name] = (st, stats.block, stats)
        return entry

    def _as_row(self, features: Any) -> np.ndarray | None:
        """``features`` as a float64 array, or None when they cannot be (counted as ``wrong_type``)."""
        if features is None:
            return self._drop("wrong_type", 1, "features: None") or None
        if isinstance(features, np.ndarray) and features.dtype.kind not in "fiub":
            return self._drop("wrong_type", 1, f"features dtype {features.dtype}") or None
        try:
            return np.asarray(features, dtype=np.float64)
        except (TypeError, ValueError, OverflowError) as exc:
            return self._drop("wrong_type", 1, f"features: {exc}") or None

    def _confidence(self, confidence: Any) -> tuple[float | None, float | None]:
        """A confidence that is not a float: ``(confidence, uncertainty)``, or ``(None, None)`` (counted)."""
        try:
            return confidence_and_uncertainty(confidence)
        except (TypeError, ValueError) as exc:
            self._drop("bad_confidence", 1, str(exc))
            return None, None

    def _after_row(self, code: int, entry: tuple, rule: tuple, features: Any, prediction: Any, confidence: Any,
                   u: Any, latency_ms: Any, request_id: Any, attributes: Mapping[str, Any]) -> bool:
        """What ``record_row`` reported beyond "recorded, not kept": drops, a label, a kept row."""
        if code < 0:
            if code == ROW_SLOW:
                arr = self._as_row(features)
                if arr is None:
                    return False
                with self._lock:  # a float64 array now: never ROW_SLOW again
                    code = self._record_row(arr, self._fstate, prediction, confidence, latency_ms, request_id,
                                            self._ostate, entry[1], rule[0], rule[1], u)
                return code == 0 or self._after_row(code, entry, rule, arr, prediction, confidence, u, latency_ms,
                                                    request_id, attributes)
            if code == ROW_WRONG_SHAPE:
                shape = getattr(features, "shape", None)
                if shape is None:
                    shape = (len(features),) if isinstance(features, (list, tuple)) else "?"
                return self._drop("wrong_shape", 1, f"features shape {shape}, want ({self._d},)")
            return self._drop("wrong_type", 1, f"features ({type(features).__name__}) or prediction "
                                               f"({type(prediction).__name__}) hold something that is no number")
        label = prediction if code & ROW_LABEL else None
        if label is not None:
            with self._lock:
                self._count_name(self._window.classes, label)
        if code & ROW_BAD_PREDICTION:
            self._drop("nonfinite_prediction")
        if code & ROW_BAD_CONFIDENCE:
            self._drop("bad_confidence", 1, repr(confidence)[:40])
        if code & ROW_BAD_LATENCY:
            self._drop("bad_latency", 1, repr(latency_ms)[:40])
        nonfinite = code // ROW_NONFINITE_UNIT
        if nonfinite:
            self._drops.add("nonfinite_feature", nonfinite)
        if code & ROW_KEPT:
            p, t, adj, th = rule
            conf = _NAN if confidence is None or code & ROW_BAD_CONFIDENCE else float(confidence)
            if u is None:
                u = 1.0 - conf
            boosted = bool(code & ROW_BOOSTED)
            if boosted:
                t = threshold_for(min(1.0, p * (1.0 + self._boost1 * u)))
                adj, th = adjusted_count(t), threshold_hex(t)
            if label is None:
                pred = _NAN if code & ROW_BAD_PREDICTION else float(prediction)
            else:
                pred = label
            rid = "" if request_id is None else request_id if type(request_id) is str else str(request_id)
            values = features.tolist() if isinstance(features, np.ndarray) else [float(x) for x in features]
            self._keep(time.time_ns(), entry[0].name, rid, values, pred, conf, u, adj, th, boosted, attributes)
        return True

    def record_batch(self, features_2d: Any, predictions: Any, confidences: Any = None, latencies_ms: Any = None,
                     request_ids: Any = None, *, stream: str = DEFAULT_STREAM, **attributes: Any) -> int:
        """Record ``n`` predictions at once; returns how many rows were taken (never raises).

        ``features_2d`` is ``n x d``; the other arrays have length ``n``
        (``confidences`` may be ``n x K`` class probabilities). A wrong-shaped
        companion array is dropped (counted) and the rows are kept.
        """
        try:
            if self._closed:
                return int(self._drop("closed"))
            try:
                X = np.asarray(features_2d, dtype=np.float64)
            except (TypeError, ValueError) as exc:
                return int(self._drop("wrong_type", 1, f"features_2d: {exc}"))
            if X.ndim != 2 or X.shape[0] == 0:
                return int(self._drop("wrong_shape", 1, f"features_2d shape {X.shape}"))
            n, d = X.shape
            if self._d is None:
                with self._lock:
                    if self._d is None:
                        self._setup(d)
            if d != self._d:
                return int(self._drop("wrong_shape", n, f"features_2d shape {X.shape}, want (n, {self._d})"))
            labels = None
            pred = _column(predictions, n)
            if pred is _BAD:
                return int(self._drop("wrong_shape", n, "predictions: need one per row"))
            if pred.dtype.kind in "USO":
                labels, pred = pred.astype(str), np.full(n, _NAN)
            else:
                pred = pred.astype(np.float64, copy=False)
                bad = n - int(np.count_nonzero(np.isfinite(pred)))
                if bad:
                    self._drop("nonfinite_prediction", bad)
            conf = u = None
            if confidences is not None:
                carr = np.asarray(confidences) if not isinstance(confidences, np.ndarray) else confidences
                if carr.shape[:1] != (n,) or carr.ndim > 2 or carr.dtype.kind not in "fiu":
                    self._drop("bad_confidence", n, f"confidences shape {carr.shape}")
                else:
                    conf, u = uncertainty_many(carr)
                    bad = n - int(np.count_nonzero(np.isfinite(conf)))
                    if bad:
                        self._drop("bad_confidence", bad)
            lat = None
            if latencies_ms is not None:
                lat = _column(latencies_ms, n)
                if lat is _BAD or lat.dtype.kind not in "fiu":
                    self._drop("bad_latency", n, "latencies_ms: need one number per row")
                    lat = None
                else:
                    lat = lat.astype(np.float64, copy=False)
                    with np.errstate(invalid="ignore"):
                        ok = np.isfinite(lat) & (lat >= 0)
                    if not ok.all():
                        self._drop("bad_latency", n - int(ok.sum()))
                        lat = lat[ok]
            rids = None
            if request_ids is not None:
                rids = _ids(request_ids, n)
                if rids is None:
                    self._drop("bad_request_ids", 1, "request_ids: need one per row")
            if rids is None:
                r = self._np_rng.integers(0, MAX_RANDOMNESS, size=n, dtype=np.uint64, endpoint=True)
            else:
                r = randomness_many(rids)
            with self._lock:
                st = self._streams.get(stream) or self._stream(stream)
                p = st.rule[0]
            if u is not None and self._unc is not None:
                weights = self._unc.weights(u)
                boosted = weights > 1.0
                p_eff = np.minimum(1.0, p * weights)
            else:
                boosted = None
                p_eff = np.full(n, p)
            t = thresholds_of(p_eff)
            kept = r >= t
            n_kept = int(np.count_nonzero(kept))
            expected = float(p_eff.sum())
            with self._lock:
                w = self._window
                dropped = self._features.update(X)
                outs = np.empty((n, 2))
                outs[:, 0] = pred
                outs[:, 1] = conf if conf is not None else _NAN
                self._outputs.update(outs)
                if lat is not None and lat.size:
                    self._add_latency(w, lat)
                w.requests += n
                if labels is not None:
                    values, counts = np.unique(labels, return_counts=True)
                    for v, c in zip(values.tolist(), counts.tolist()):
                        self._count_name(w.classes, v, c)
                st.events += n
                st.expected += expected
                st.kept += n_kept
                if n_kept:
                    w.sampled[st.name] = w.sampled.get(st.name, 0) + n_kept
                sig = pred if labels is None else conf
                if sig is not None:
                    _observe(st, sig)
            if dropped:
                self._drops.add("nonfinite_feature", dropped)
            if n_kept:
                now = time.time_ns()
                for j in np.flatnonzero(kept).tolist():
                    tj = int(t[j])
                    flag = bool(boosted[j]) if boosted is not None else False
                    self._keep(now, st.name, rids[j] if rids is not None else "", X[j].tolist(),
                               labels[j] if labels is not None else float(pred[j]),
                               float(conf[j]) if conf is not None else _NAN,
                               float(u[j]) if u is not None else _NAN,
                               adjusted_count(tj), threshold_hex(tj), flag, attributes)
            return n
        except Exception as exc:  # the hot path never raises
            return int(self._drop("internal_error", 1, f"{type(exc).__name__}: {exc}"))

    def record_label(self, request_id: Any, label: Any) -> bool:
        """Send the ground truth for ``request_id`` (a number or a class label); never raises."""
        if self._closed:
            return self._drop("closed")
        if isinstance(label, (np.floating, np.integer)):
            label = float(label)
        if not (isinstance(label, str) or finite_number(label)) or request_id is None:
            return self._drop("bad_label", 1, f"label {label!r} for request {request_id!r}")
        attrs = {"stethoscope.model": self.model, "stethoscope.model.version": self.version,
                 "stethoscope.request_id": str(request_id),
                 "stethoscope.label": label if isinstance(label, str) else float(label)}
        return self._enqueue((LABEL_EVENT, time.time_ns(), attrs))

    def error(self, kind: str = "error", n: int = 1) -> None:
        """Count ``n`` errors of ``kind`` (exported as ``stethoscope.model.errors``)."""
        if not (isinstance(kind, str) and kind) or not isinstance(n, int) or n < 0:
            self._drop("bad_error_kind", 1, repr(kind)[:40])
            return
        with self._lock:
            self._count_name(self._window.errors, kind, n)

    def business(self, name: str, value: float = 1.0) -> None:
        """Add ``value`` to the business sum ``name`` (revenue, cost, conversions...)."""
        if not (isinstance(name, str) and name) or not finite_number(value):
            self._drop("bad_business", 1, f"{name!r}={value!r}")
            return
        with self._lock:
            b = self._window.business
            if name not in b and len(b) >= self.settings.max_names:
                name = "other"
            b[name] = b.get(name, 0.0) + value

    def set_drift(self, score: float, stream: str = DEFAULT_STREAM) -> None:
        """Tell the sampler how much ``stream`` drifts (0 = none); drifting streams get more rows."""
        self.sampler.set_drift(stream, score)

    # -- hot-path helpers (lock held unless noted) ----------------------------------------------

    def _stream(self, name: str) -> Any:
        if not isinstance(name, str) or not name or "/" in name:
            name = DEFAULT_STREAM
        st = self.sampler.stream(name)
        self._streams[name] = st
        return st

    def _count_name(self, table: dict[str, int], name: str, n: int = 1) -> None:
        if name not in table and len(table) >= self.settings.max_names:
            name = "other"
        table[name] = table.get(name, 0) + n

    def _add_latency(self, w: Window, lat: np.ndarray) -> None:
        idx = np.searchsorted(self._bounds, lat, side="left")
        w.lat_counts += np.bincount(idx, minlength=len(self._bounds) + 1)
        w.lat_sum += float(lat.sum())
        w.lat_n += int(lat.size)
        w.lat_min = min(w.lat_min, float(lat.min()))
        w.lat_max = max(w.lat_max, float(lat.max()))

    def _fold_locked(self) -> None:
        """Move what single-row records counted (per stream) into the window and the sampler."""
        w = self._window
        for st, _, stats in self._row_streams.values():
            t = stats.take()
            if not t.requests:
                continue
            w.requests += t.requests
            self.sampler.account(st, t.events, t.expected, t.kept)
            if t.kept:
                w.sampled[st.name] = w.sampled.get(st.name, 0) + t.kept
            if t.lat_n:
                w.lat_counts += t.lat_counts
                w.lat_sum += t.lat_sum
                w.lat_n += t.lat_n
                w.lat_min = min(w.lat_min, t.lat_min)
                w.lat_max = max(w.lat_max, t.lat_max)
            if t.sig_n:
                st.observe_signal(t.sig_n, t.sig_mean, t.sig_m2)

    def _keep(self, now: int, stream: str, rid: str, features: list, prediction: float | str, conf: float,
              u: float, adj: float, th: str, flagged: bool, attributes: Mapping[str, Any]) -> None:
        """A sampled row: build its record attributes and queue it (no lock needed)."""
        attrs: dict[str, Any] = {
            "stethoscope.model": self.model,
            "stethoscope.model.version": self.version,
            "stethoscope.stream": stream,
            "stethoscope.request_id": rid,
            "stethoscope.features": features,
            "stethoscope.prediction": prediction,
            "stethoscope.adjusted_count": adj,
            "stethoscope.sampling.threshold": th,
        }
        if self._named:
            attrs["stethoscope.feature_names"] = list(self._names)
        if conf == conf:
            attrs["stethoscope.confidence"] = conf
        if flagged:
            attrs["stethoscope.uncertainty"] = True
            self.labeling_queue.put(LabelCandidate(self.model, self.version, stream, rid, now, tuple(features),
                                                   prediction, conf, u, adj))
        for k, v in attributes.items():
            attrs[k] = _attribute_value(v)
        self._enqueue((SAMPLE_EVENT, now, attrs))

    def _enqueue(self, item: tuple) -> bool:
        if len(self._rows) >= self._max_rows:
            return self._drop("row_queue_full")
        self._rows.append(item)
        return True

    # -- the background side -----------------------------------------------------------------

    def _run(self) -> None:
        cfg = self.settings
        now = time.monotonic()
        next_export = now + cfg.export_interval_s
        next_adjust = now + cfg.sampling.adjust_interval_s
        next_poll = now
        while not self._stop.wait(min(1.0, cfg.export_interval_s)):
            now = time.monotonic()
            try:
                with self._cycle_lock:
                    self._emit_rows()
                    if self._poller is not None and now >= next_poll:
                        remote = self._poller.poll()
                        if remote is not None:
                            self.sampler.apply_remote(remote)
                        interval = (remote.poll_interval_s if remote and remote.poll_interval_s
                                    else cfg.sampling.poll_interval_s)
                        next_poll = now + interval
                    if now >= next_adjust:
                        with self._lock:
                            self._fold_locked()
                        self.sampler.adjust()
                        next_adjust = now + cfg.sampling.adjust_interval_s
                    if now >= next_export:
                        self._export()
                        next_export = now + cfg.export_interval_s
            except Exception as exc:  # the thread must outlive any bug
                if "loop" not in self._logged:
                    self._logged.add("loop")
                    _log.exception("ModelMonitor(%r): background cycle failed: %s", self.model, exc)

    def _emit_rows(self) -> None:
        rows = self._rows
        while rows:
            try:
                event, ts, attrs = rows.popleft()
            except IndexError:
                break
            self._delivery.emit(event, ts, attrs)

    def _export(self) -> bool:
        now = time.time_ns()
        with self._lock:
            self._fold_locked()
            if self._d is not None:
                fstate = self._features.swap()
                self._fstate = self._features.state
            else:
                fstate = None
            ostate = self._outputs.swap()
            self._ostate = self._outputs.state
            w, self._window = self._window, Window(len(self._bounds), now)
            probs = {st.name: st.rule[0] for st in self.sampler.streams()}
        start = w.start_ns
        metrics: list[Metric] = []
        try:
            if fstate is not None:
                points = self._features.points(fstate, start, now)
                if points:
                    metrics.append(exp_metric("stethoscope.model.feature", "Feature values, one histogram per feature",
                                        "1", points))
            outs = self._outputs.points(ostate, start, now)
            for col_name, unit in (("prediction", "1"), ("confidence", "1")):
                pts = [p for p in outs if p.attributes["stethoscope.output"] == col_name]
                if pts:
                    pts = [without_attribute(p, "stethoscope.output") for p in pts]
                    metrics.append(exp_metric(f"stethoscope.model.{col_name}", f"Model {col_name}s", unit, pts))
        finally:
            with self._lock:
                if fstate is not None:
                    self._features.recycle(fstate)
                self._outputs.recycle(ostate)
        cost = self.settings.cost_per_prediction
        if cost is not None and w.requests:
            w.business["cost"] = w.business.get("cost", 0.0) + cost * w.requests
        metrics += window_metrics(w, self._base_attrs({}), self._bounds, now, probs, self._dropped_delta())
        return self._delivery.export_metrics(metrics)

    def _dropped_delta(self) -> dict[str, int]:
        now = dict(self._drops.snapshot())
        out = {k: v - self._dropped_exported.get(k, 0) for k, v in now.items() if v > self._dropped_exported.get(k, 0)}
        self._dropped_exported = now
        return out

    def flush(self, timeout_s: float | None = None) -> bool:
        """Export everything recorded so far and push sampled rows out; True if it all went."""
        if self._closed:
            return False
        try:
            with self._cycle_lock:
                self._emit_rows()
                ok = self._export()
            return self._delivery.flush(timeout_s) and ok
        except Exception as exc:
            _log.warning("ModelMonitor(%r).flush failed: %s", self.model, exc)
            return False

    def close(self, timeout_s: float | None = None) -> None:
        """Stop the thread, export one last time and shut the exporters down; idempotent."""
        if self._closed:
            return
        self.flush(timeout_s)
        self._closed = True
        self._row_streams = {}  # record() now takes its slow path, which sees the monitor closed
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.settings.timeout_s + 2.0)
        self._delivery.shutdown(timeout_s)
        if self._atexit is not None:
            atexit.unregister(self._atexit)

    def __enter__(self) -> ModelMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ModelMonitor({self.model!r}, {self.version!r}, features={self._d}, service={self.service_name!r})"


def _attribute_value(v: Any) -> Any:
    """An OTLP-legal attribute value: primitives and homogeneous sequences pass, the rest become ``str``."""
    if isinstance(v, _ATTR_TYPES):
        return v
    if isinstance(v, (list, tuple)) and v:
        kind = type(v[0])
        if kind in _ATTR_TYPES and all(type(x) is kind for x in v):
            return list(v)
    return str(v)


def _ids(values: Any, n: int) -> list[str] | None:
    """Request ids as a list of ``n`` strings, or None when they are not that."""
    if isinstance(values, np.ndarray):
        if values.ndim != 1:
            return None
        values = values.tolist()
    elif not isinstance(values, (list, tuple)):
        try:
            values = list(values)
        except TypeError:
            return None
    if len(values) != n:
        return None
    if all(type(v) is str for v in values):
        return values if isinstance(values, list) else list(values)
    return [v if isinstance(v, str) else str(v) for v in values]


def _column(values: Any, n: int) -> Any:
    arr = values if isinstance(values, np.ndarray) else np.asarray(values)
    if arr.ndim != 1 or arr.shape[0] != n:
        return _BAD
    return arr


def _observe(st: Any, values: np.ndarray) -> None:
    v = values[np.isfinite(values)]
    if v.size:
        mean = float(v.mean())
        st.observe_signal(int(v.size), mean, float(((v - mean) ** 2).sum()))
