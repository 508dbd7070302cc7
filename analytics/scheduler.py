"""The drift scheduler: every interval, compare each model stream's latest window with a reference.

For each ``(Model, ModelVersion, Stream)`` with rows in the current window
``[now - window, now)`` of ``samples``, :meth:`DriftScheduler.run_once` reads the
feature vectors of the current and the reference window (one query each, as
Parquet, into a float64 ``n x d`` array), runs :class:`~.dataset.DatasetDrift`
and writes, in one batch to ``findings``:

* one ``feature_drift`` finding per feature (``warning`` when it drifted, else ``info``);
* one ``dataset_drift`` summary (``warning`` when the dataset drifted);
* one ``confidence_cv`` finding when the current window has confidences;
* one ``prediction_drift`` finding (:class:`~.performance.PredictionDrift` on the
  ``Prediction`` column: KS for numeric scores, chi-squared for class labels, i.e.
  ``PredictionLabel`` strings or integral numbers with at most ``max_classes``
  distinct values);
* instead of the feature, prediction and confidence findings, one ``info``
  ``dataset_drift`` finding with method ``insufficient_data`` when either window
  has fewer than ``min_rows`` rows;
* one ``accuracy_drop`` finding once labels have arrived for at least
  ``min_labels`` rows of both windows: samples are joined to ``labels`` on
  ``(Model, RequestId)`` in SQL (the latest label of a request wins) and the
  realized metric of the current window is compared with the reference window's
  (:class:`~.performance.PerformanceDrop`: accuracy for classification, MAE for
  regression, or the configured ``metric``; ``warning`` when the relative drop is
  above ``max_drop``, 5% by default, and significant); ``details`` carry both
  windows' accuracy and macro F1 (classification) or MAE (regression);
* per ``(Model, Stream)`` whose current window holds two or more versions that
  share request ids: one ``shadow_disagreement`` finding per non-primary version
  (the primary is the version with the most rows), from
  :class:`~.performance.ShadowAgreement` on the rows joined by ``RequestId`` in SQL.

References kept as sketches (:mod:`.references`), with ``sketch_reference``:

* ``"rolling"``: each run stores the sketch of the current window's rows (kind
  ``reference_sketch``) and compares the current window with the sketch stored
  for the window that ended by the current one's start;
* ``"version"``: the first sketch stored for a model version and stream stays
  its reference;
* ``"fixed:NAME"``: the latest snapshot saved under ``NAME`` by :meth:`DriftScheduler.snapshot`
  (for any version of the model);

each writes one ``sketch_drift`` finding per feature (:class:`~.references.SketchDrift`:
KS bounds from the histograms, with the error bound in ``details``) and one
``sketch_prediction_drift`` finding (frequent class labels: chi-squared; numeric
predictions: KS bounds); the sketch
check reads only the current window's rows (the exact row checks above still read
the reference window's rows where they exist). With ``sketch_metrics`` (on by default) the SDK's
exported per-feature exponential histograms (``stethoscope.model.feature``, delta
temporality, every request, unsampled) of the current window are compared with
those of the previous window: ``sketch_drift`` findings labelled ``{"source": "otel"}``.

Rows moved per window are capped at ``max_rows`` (a deterministic pseudo-random
subset chosen in SQL by ``ORDER BY cityHash64(RequestId, Timestamp) LIMIT
max_rows``); ``details["n_window_current"]`` holds the window's full row count
when it was capped. :mod:`.pushdown` computes counts, quantiles, histograms and
ClickHouse's own KS test over whole windows without moving rows; when a window
was capped, each ``feature_drift`` finding also carries ``details["full_window_ks"]``,
ClickHouse's KS statistic and (asymptotic) p-value over every row of both windows.

The reference is ``"previous"`` (``[now - 2 window, now - window)``) or ``"first"``
(the first ``window`` of data of that model version and stream, cut off where the
current window starts so the two never overlap).

Sampled rows and ``AdjustedCount``: the SDK samples uniformly within a stream, so
the rows of a window are a simple random sample of that stream's predictions and
the two-sample tests apply to them as they are. ``AdjustedCount`` (how many
predictions a row stands for) matters for totals and rates, not for comparing two
distributions, and is not used here. A stream whose sampling rate changes within a
window is still compared correctly as long as the rate does not depend on the
feature values.

Rows whose feature vector is shorter or longer than the first row's are left out
and counted in ``details["dropped_rows"]``. Features are named by the first row's
``FeatureNames`` when it has one name per feature, else ``f0`` ... ``f{d-1}``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._extras import require
from .._periodic import Periodic
from .calibration import Calibration
from .dataset import ColumnError, DatasetDrift
from .findings import Finding, FindingsWriter, from_drift_result, subject_of
from .performance import (
    METRICS,
    ConfidenceCV,
    PerformanceDrop,
    PredictionDrift,
    ShadowAgreement,
    f1_macro,
)
from .pushdown import SAMPLE_ORDER, PushDown, WindowSpec
from .references import ReferenceSketch, ReferenceStore, SketchDrift
from .sql import literal as _lit
from .sql import ts_ms as _ts

__all__ = ["PERFORMANCE_METRICS", "REFERENCES", "DriftScheduler"]

log = logging.getLogger(__name__)

#: How the reference window is chosen.
REFERENCES = ("previous", "first")
#: ``metric`` settings for the ``accuracy_drop`` check: ``auto`` picks accuracy or MAE.
PERFORMANCE_METRICS = ("auto", *METRICS)




@dataclass(frozen=True)
class _Window:
    """One window's rows: features ``n x d`` (float64), confidences, rows left out."""

    start: float
    end: float
    features: np.ndarray
    confidence: np.ndarray
    dropped: int
    prediction: np.ndarray = field(default_factory=lambda: np.empty(0))
    total: int = -1  # rows in the window when more than max_rows were there, else -1

    @property
    def n(self) -> int:
        return int(self.features.shape[0])


class DriftScheduler(Periodic):
    """Runs the drift checks on ``samples`` every ``interval_s`` and writes ``findings``.

    ``run_once`` may be called directly (tests, one-off jobs); ``start`` runs it on a
    daemon thread until ``stop``. The thread never dies on an error: each kind of
    error is logged once with its traceback, later ones at debug level, and counted
    in :attr:`errors`.
    """

    _thread_name = "stethoscope-drift"
    _run_name = "drift run"
    _log = log

    def __init__(
        self,
        store: Any,
        *,
        interval_s: float = 300,
        window_s: float = 3600,
        reference: str = "previous",
        min_rows: int = 200,
        calibration: Calibration | None = None,
        clock: Callable[[], float] = time.time,
        max_rows: int = 100_000,
        min_labels: int = 100,
        metric: str = "auto",
        max_drop: float = 0.05,
        max_classes: int = 20,
        min_shadow_rows: int = 50,
        min_agreement: float = 0.95,
        sketch_reference: str = "none",
        sketch_metrics: bool = True,
    ) -> None:
        problems = []
        if not (interval_s > 0 and math.isfinite(interval_s)):
            problems.append(f"interval_s: must be finite and > 0, got {interval_s!r}")
        if not (window_s > 0 and math.isfinite(window_s)):
            problems.append(f"window_s: must be finite and > 0, got {window_s!r}")
        if reference not in REFERENCES:
            problems.append(f"reference: must be one of {REFERENCES}, got {reference!r}")
        if isinstance(min_rows, bool) or not isinstance(min_rows, int) or min_rows < 2:
            problems.append(f"min_rows: must be an integer >= 2, got {min_rows!r}")
        for name, value, lo in (("max_rows", max_rows, 2), ("min_labels", min_labels, 2),
                                ("max_classes", max_classes, 2), ("min_shadow_rows", min_shadow_rows, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                problems.append(f"{name}: must be an integer >= {lo}, got {value!r}")
        if metric not in PERFORMANCE_METRICS:
            problems.append(f"metric: must be one of {PERFORMANCE_METRICS}, got {metric!r}")
        if not (isinstance(max_drop, (int, float)) and 0 <= max_drop < 1):
            problems.append(f"max_drop: must be a number in [0, 1), got {max_drop!r}")
        if not (isinstance(min_agreement, (int, float)) and 0 <= min_agreement <= 1):
            problems.append(f"min_agreement: must be a number in [0, 1], got {min_agreement!r}")
        if not (sketch_reference in ("none", "rolling", "version")
                or (isinstance(sketch_reference, str) and sketch_reference.startswith("fixed:")
                    and len(sketch_reference) > len("fixed:"))):
            problems.append(f"sketch_reference: must be none, rolling, version or fixed:NAME, got {sketch_reference!r}")
        if problems:
            from ..errors import ConfigError

            raise ConfigError(problems)
        self.store = store
        self.interval_s = float(interval_s)
        self.window_s = float(window_s)
        self.reference = reference
        self.min_rows = min_rows
        self.calibration = calibration or Calibration()
        self.clock = clock
        self.max_rows, self.min_labels, self.metric = max_rows, min_labels, metric
        self.max_drop, self.max_classes = float(max_drop), max_classes
        self.min_shadow_rows, self.min_agreement = min_shadow_rows, float(min_agreement)
        self.sketch_reference, self.sketch_metrics = sketch_reference, bool(sketch_metrics)
        self.references = ReferenceStore(store)
        self.sketch_drift = SketchDrift(alpha=self.calibration.alpha, correction=self.calibration.correction)
        self.writer = FindingsWriter(store)
        self._init_periodic()  # errors: caught by the loop or per stream, by exception type name

    @classmethod
    def from_config(cls, store: Any, analytics: Any, **overrides: Any) -> DriftScheduler:
        """The scheduler an ``[analytics]`` section (:class:`stethoscope.config.AnalyticsConfig`) describes."""
        from stethoscope.config import parse_duration

        a = analytics
        settings: dict[str, Any] = {
            "interval_s": parse_duration(a.interval), "window_s": parse_duration(a.window), "reference": a.reference,
            "min_rows": a.min_rows, "calibration": Calibration(alpha=a.alpha, correction=a.correction),
        }
        for key, name in (("max_rows", "max_rows"), ("min_labels", "min_labels"), ("performance_metric", "metric"),
                          ("max_performance_drop", "max_drop"), ("shadow_min_agreement", "min_agreement"),
                          ("sketch_reference", "sketch_reference"), ("sketch_metrics", "sketch_metrics")):
            if hasattr(a, key):
                settings[name] = getattr(a, key)
        settings.update(overrides)
        return cls(store, **settings)

    # --- one run -------------------------------------------------------------------------

    def run_once(self, now: float | None = None) -> list[Finding]:
        """Check every stream with rows in ``[now - window, now)``; write and return the findings.

        A stream that fails (a query error, bad data) is logged and skipped; the
        others are still checked and written.
        """
        now = self.clock() if now is None else float(now)
        start = now - self.window_s
        findings: list[Finding] = []
        self._windows: dict[tuple[str, str, str, float, float], _Window] = {}  # reads shared by this run's checks
        streams = self._streams(start, now)
        for model, version, stream, names, _ in streams:
            where = f"{model}/{version}/{stream}"
            findings += self._guarded(f"drift check of {where}", self._check, model, version, stream, names, now)
            if self.sketch_reference != "none":
                findings += self._guarded(f"sketch check of {where}", self._sketch_check, model, version, stream,
                                          names, now)
            findings += self._guarded(f"accuracy check of {where}", self._performance, model, version, stream, now)
        groups: dict[tuple[str, str], list[tuple[str, int]]] = {}
        for model, version, stream, _, rows in streams:
            groups.setdefault((model, stream), []).append((version, rows))
        for (model, stream), versions in groups.items():
            if len(versions) >= 2:
                findings += self._guarded(f"shadow check of {model}/{stream}", self._shadow, model, stream,
                                          versions, now)
        if self.sketch_metrics:
            findings += self._guarded("drift check of exported feature sketches", self._otel_sketches, now)
        self._windows = {}
        self.writer.write(findings)
        return findings

    def _guarded(self, what: str, check: Callable[..., list[Finding]], *args: Any) -> list[Finding]:
        """``check(*args)``, or no findings when it fails: logged and counted, so one broken
        stream or check does not hide the others."""
        try:
            return check(*args)
        except Exception as exc:  # noqa: BLE001 - any failure of one check is recorded, never fatal
            self._record_error(exc, what)
            return []

    def _where(self, model: str, version: str, stream: str, start: float | None = None,
               end: float | None = None) -> str:
        cond = [f"Model = {_lit(model)}", f"ModelVersion = {_lit(version)}", f"Stream = {_lit(stream)}"]
        if start is not None:
            cond.append(f"Timestamp >= {_ts(start)}")
        if end is not None:
            cond.append(f"Timestamp < {_ts(end)}")
        return " AND ".join(cond)

    def _rows(self, sql: str) -> list[list[Any]]:
        data = self.store.query(sql, "JSONCompactEachRow").data
        return [json.loads(line) for line in data.splitlines() if line.strip()]

    def _streams(self, start: float, end: float) -> list[tuple[str, str, str, list[str], int]]:
        rows = self._rows(
            "SELECT Model, ModelVersion, Stream, argMin(FeatureNames, Timestamp), count() FROM samples "
            f"WHERE Timestamp >= {_ts(start)} AND Timestamp < {_ts(end)} "
            "GROUP BY Model, ModelVersion, Stream ORDER BY Model, ModelVersion, Stream"
        )
        return [(str(m), str(v), str(s), [str(n) for n in names], int(c)) for m, v, s, names, c in rows]

    def _reference_window(self, model: str, version: str, stream: str, now: float) -> tuple[float, float]:
        w = self.window_s
        if self.reference == "previous":
            return now - 2 * w, now - w
        first = self._rows(
            f"SELECT toUnixTimestamp64Milli(min(Timestamp)) FROM samples WHERE {self._where(model, version, stream)}"
        )
        t0 = int(first[0][0]) / 1000 if first else now - w
        return t0, min(t0 + w, now - w)

    def _fetch(self, model: str, version: str, stream: str, start: float, end: float) -> _Window:
        cache = getattr(self, "_windows", None)
        key = (model, version, stream, start, end)
        if cache is not None and key in cache:
            return cache[key]
        window = self._read(model, version, stream, start, end)
        if cache is not None:
            cache[key] = window
        return window

    def _read(self, model: str, version: str, stream: str, start: float, end: float) -> _Window:
        if end <= start:
            return _Window(start, end, np.empty((0, 0)), np.empty(0), 0)
        pa = require("pyarrow", extra="server", feature="drift checks on stored samples")
        pq = require("pyarrow.parquet", extra="server", feature="drift checks on stored samples")
        where = self._where(model, version, stream, start, end)
        data = self.store.query(
            "SELECT Features, Confidence, Prediction, PredictionLabel FROM samples "
            f"WHERE {where} ORDER BY {_SAMPLE_ORDER} LIMIT {self.max_rows} FORMAT Parquet",
            "Parquet",
        ).data
        if not data:
            return _Window(start, end, np.empty((0, 0)), np.empty(0), 0)
        table = pq.read_table(pa.BufferReader(data))
        total = -1
        if table.num_rows >= self.max_rows:
            total = int(self._rows(f"SELECT count() FROM samples WHERE {where}")[0][0])
        feats = table.column("Features").combine_chunks()
        conf = table.column("Confidence").to_numpy().astype(np.float64)
        pred = _predictions(table.column("Prediction").to_numpy().astype(np.float64),
                            table.column("PredictionLabel").to_pylist(), self.max_classes)
        if len(feats) == 0:
            return _Window(start, end, np.empty((0, 0)), conf, 0, pred, total)
        lengths = np.asarray(feats.value_lengths().fill_null(0))
        flat = np.asarray(feats.flatten(), dtype=np.float64)
        d = int(lengths[0])
        keep = lengths == d
        if keep.all():
            matrix = flat.reshape(len(lengths), d)
        else:
            offsets = np.concatenate(([0], np.cumsum(lengths)))[:-1]
            idx = offsets[keep][:, None] + np.arange(d)[None, :]
            matrix = flat[idx] if d else np.empty((int(keep.sum()), 0))
            conf, pred = conf[keep], pred[keep]
        return _Window(start, end, matrix, conf, int((~keep).sum()), pred, total)

    def _check(self, model: str, version: str, stream: str, names: list[str], now: float) -> list[Finding]:
        labels = {"stream": stream}
        cur = self._fetch(model, version, stream, now - self.window_s, now)
        ref_start, ref_end = self._reference_window(model, version, stream, now)
        ref = self._fetch(model, version, stream, ref_start, ref_end)
        common = {"time": now, "model": model, "model_version": version, "window_start": cur.start,
                  "window_end": cur.end, "labels": labels}
        window_details = {"reference": self.reference, "reference_start": ref.start, "reference_end": ref.end,
                          "n_reference": ref.n, "n_current": cur.n,
                          "dropped_rows": {"reference": ref.dropped, "current": cur.dropped}}
        for key, w in (("n_window_reference", ref), ("n_window_current", cur)):
            if w.total >= 0:
                window_details[key] = w.total
        d = cur.features.shape[1] if cur.n else 0
        if ref.n < self.min_rows or cur.n < self.min_rows or d == 0 or ref.features.shape[1] != d:
            reason = "insufficient data"
            if cur.n >= self.min_rows and ref.n >= self.min_rows:
                reason = "no features" if d == 0 else "feature count differs between windows"
            return [Finding(kind="dataset_drift", subject=subject_of(model, version, labels), method="insufficient_data",
                            severity="info", details={**window_details, "reason": reason, "min_rows": self.min_rows},
                            **common)]
        cols = names if len(names) == d and len(set(names)) == d else [f"f{j}" for j in range(d)]
        report = DatasetDrift(self.calibration).fit(
            {c: ref.features[:, j] for j, c in enumerate(cols)}
        ).score({c: cur.features[:, j] for j, c in enumerate(cols)})
        full: dict[int, Any] = {}
        if ref.total >= 0 or cur.total >= 0:  # capped: ClickHouse's KS over every row of both windows
            for r in PushDown(self.store).ks(WindowSpec(model, version, stream, ref.start, ref.end),
                                             WindowSpec(model, version, stream, cur.start, cur.end)):
                full[r.index] = {"statistic": r.statistic, "p_value": r.p_value, "n_reference": r.n_reference,
                                 "n_current": r.n_current, "method": "clickhouse kolmogorovSmirnovTest asymp"}
        out: list[Finding] = []
        for j, item in enumerate(report.columns):
            if isinstance(item, ColumnError):
                out.append(Finding(kind="feature_drift", subject=subject_of(model, version, labels, item.column),
                                   feature=item.column, method="error", severity="info",
                                   details={**window_details, "error": item.message}, **common))
                continue
            out.append(from_drift_result(
                item, kind="feature_drift", model=model, version=version, feature=str(item.column),
                window_start=cur.start, window_end=cur.end, time=now, labels=labels,
                details_extra={**window_details, "full_window_ks": full[j]} if j in full else window_details,
            ))
        s = report.summary
        out.append(Finding(
            kind="dataset_drift", subject=subject_of(model, version, labels), method="dataset", statistic=s.share,
            effect=s.share, threshold=s.drift_share, severity="warning" if s.drifted else "info", drifted=s.drifted,
            details={**window_details, "n_columns": s.n_columns, "n_checked": s.n_checked, "n_drifted": s.n_drifted,
                     "n_errors": s.n_errors, "alpha": s.alpha, "correction": s.correction,
                     "drifted_features": [c.column for c in report.columns if c.drifted]},
            **common,
        ))
        out += self._confidence(model, version, labels, ref, cur, window_details, now)
        out += self._prediction(model, version, labels, ref, cur, window_details, now)
        return out

    def _prediction(self, model: str, version: str, labels: dict[str, str], ref: _Window, cur: _Window,
                    window_details: dict[str, Any], now: float) -> list[Finding]:
        a, b = ref.prediction, cur.prediction
        if a.dtype.kind != b.dtype.kind:  # one window numeric, the other labels: compare as classes
            a, b = a.astype(str), b.astype(str)
        if _usable(a) < 2 or _usable(b) < 2:
            return []
        mode = "numeric" if a.dtype.kind == "f" else "class"
        result = PredictionDrift(mode=mode).fit(a).score(b)
        return [from_drift_result(
            result, kind="prediction_drift", model=model, version=version, feature="", window_start=cur.start,
            window_end=cur.end, time=now, labels=labels, details_extra=window_details,
        )]

    # --- references as sketches ---------------------------------------------------------

    @staticmethod
    def _names(names: list[str], d: int) -> list[str]:
        return names if len(names) == d and len(set(names)) == d else [f"f{j}" for j in range(d)]

    def _sketch_of(self, model: str, version: str, stream: str, names: list[str], start: float,
                   end: float) -> ReferenceSketch | None:
        w = self._fetch(model, version, stream, start, end)
        if w.n == 0 or w.features.shape[1] == 0:
            return None
        return ReferenceSketch.from_rows(w.features, self._names(names, w.features.shape[1]), predictions=w.prediction)

    def snapshot(self, name: str, model: str, version: str, stream: str, start: float, end: float) -> ReferenceSketch:
        """Sketch the rows of ``[start, end)`` once and store them as the fixed reference ``name``."""
        names = next((n for m, v, s, n, _ in self._streams(start, end) if (m, v, s) == (model, version, stream)), [])
        sketch = self._sketch_of(model, version, stream, names, start, end)
        if sketch is None:
            raise ValueError(f"snapshot {name!r}: no rows of {model}/{version}/{stream} in [{start}, {end})")
        self.references.save(name, model, version, stream, sketch, window_start=start, window_end=end,
                             time=self.clock())
        return sketch

    def _sketch_check(self, model: str, version: str, stream: str, names: list[str], now: float) -> list[Finding]:
        start = now - self.window_s
        cur = self._sketch_of(model, version, stream, names, start, now)
        if cur is None:
            return []
        out: list[Finding] = []
        mode = self.sketch_reference
        if mode == "rolling":
            name, got = "rolling", self.references.load("rolling", model, version, stream, ending_by=start)
            out.append(self.references.finding("rolling", model, version, stream, cur, window_start=start,
                                               window_end=now, time=now))
        elif mode == "version":
            name, got = "version", self.references.load("version", model, version, stream)
            if got is None:
                out.append(self.references.finding("version", model, version, stream, cur, window_start=start,
                                                   window_end=now, time=now))
        else:
            name = mode[len("fixed:"):]
            got = self.references.load(name, model, None, stream)
        if got is None:
            return out
        ref, ref_start, ref_end = got
        labels = {"stream": stream, "reference": name}
        extra = {"reference": name, "reference_start": ref_start, "reference_end": ref_end,
                 "reference_source": ref.source}
        for result in self.sketch_drift.compare(ref, cur):
            out.append(from_drift_result(result, kind="sketch_drift", model=model, version=version,
                                         feature=str(result.column), window_start=start, window_end=now, time=now,
                                         labels=labels, details_extra=extra))
        pred = self.sketch_drift.compare_predictions(ref, cur)
        if pred is not None:
            out.append(from_drift_result(pred, kind="sketch_prediction_drift", model=model, version=version,
                                         feature="", window_start=start, window_end=now, time=now, labels=labels,
                                         details_extra=extra))
        return out

    def _otel_window(self, start: float, end: float) -> dict[tuple[str, str], tuple[list[str], list]]:
        rows = self._rows(
            "SELECT Attributes['stethoscope.model'], Attributes['stethoscope.model.version'], "
            "Attributes['stethoscope.feature.name'], toInt64OrZero(Attributes['stethoscope.feature.index']), "
            "Scale, ZeroCount, PositiveOffset, PositiveBucketCounts, NegativeOffset, NegativeBucketCounts, "
            "Count, Sum, Min, Max FROM otel_metrics_exponential_histogram "
            "WHERE MetricName = 'stethoscope.model.feature' AND AggregationTemporality = 1 "
            f"AND TimeUnix >= {_ts(start)} AND TimeUnix < {_ts(end)}"
        )
        out: dict[tuple[str, str], tuple[list[str], list]] = {}
        for (model, version, feature, index, scale, zero, poff, pos, noff, neg, count, total, lo, hi) in rows:
            names, points = out.setdefault((str(model), str(version)), ([], []))
            key = str(feature) or f"f{index}"
            if key not in names:
                names.append(key)
            points.append((names.index(key), {
                "scale": scale, "zero_count": zero, "positive_offset": poff, "positive_counts": pos,
                "negative_offset": noff, "negative_counts": neg, "count": count, "sum": total or 0.0,
                "min": math.inf if lo is None else lo, "max": -math.inf if hi is None else hi}))
        return out

    def _otel_sketches(self, now: float) -> list[Finding]:
        start = now - self.window_s
        current = self._otel_window(start, now)
        if not current:
            return []
        previous = self._otel_window(start - self.window_s, start)
        out: list[Finding] = []
        for (model, version), (names, points) in current.items():
            if (model, version) not in previous:
                continue
            ref_names, ref_points = previous[(model, version)]
            cur = ReferenceSketch.from_points(points, names)
            ref = ReferenceSketch.from_points(ref_points, ref_names)
            labels = {"source": "otel"}
            extra = {"reference": "previous", "reference_start": start - self.window_s, "reference_end": start,
                     "reference_source": "otel"}
            for result in self.sketch_drift.compare(ref, cur):
                out.append(from_drift_result(result, kind="sketch_drift", model=model, version=version,
                                             feature=str(result.column), window_start=start, window_end=now,
                                             time=now, labels=labels, details_extra=extra))
        return out

    # --- realized performance -----------------------------------------------------------

    def _labelled(self, model: str, version: str, stream: str, start: float, end: float) -> list[list[Any]]:
        """(Prediction, PredictionLabel, Label, LabelText) of the window's rows that have a label."""
        if end <= start:
            return []
        where = self._where(model, version, stream, start, end)
        return self._rows(
            "SELECT s.Prediction, s.PredictionLabel, l.Label, l.LabelText FROM "
            f"(SELECT RequestId, Prediction, PredictionLabel FROM samples WHERE {where} AND RequestId != '' "
            f"ORDER BY {_SAMPLE_ORDER} LIMIT {self.max_rows}) AS s "
            "INNER JOIN (SELECT RequestId, argMax(Label, Timestamp) AS Label, argMax(LabelText, Timestamp) AS LabelText "
            f"FROM labels WHERE Model = {_lit(model)} AND RequestId IN "
            f"(SELECT RequestId FROM samples WHERE {where} AND RequestId != '') GROUP BY RequestId) AS l "
            "ON s.RequestId = l.RequestId"
        )

    def _performance(self, model: str, version: str, stream: str, now: float) -> list[Finding]:
        cur_rows = self._labelled(model, version, stream, now - self.window_s, now)
        if len(cur_rows) < self.min_labels:
            return []
        ref_start, ref_end = self._reference_window(model, version, stream, now)
        ref_rows = self._labelled(model, version, stream, ref_start, ref_end)
        if len(ref_rows) < self.min_labels:
            return []
        classes = _is_classification(ref_rows + cur_rows, self.max_classes)
        metric = self.metric if self.metric != "auto" else ("accuracy" if classes else "mae")
        binary = metric in ("f1", "roc_auc")  # positive class 1: read labels and predictions as numbers
        if binary and any(r[1] or r[3] for r in ref_rows + cur_rows):
            raise ValueError(f"performance metric {metric!r} needs numeric labels and predictions (positive class 1), "
                             "got text labels")
        ref_t, ref_p = _truth_and_prediction(ref_rows, classes and not binary)
        cur_t, cur_p = _truth_and_prediction(cur_rows, classes and not binary)
        if metric == "roc_auc":  # needs scores: the numeric Prediction is the positive-class score
            ref_in: tuple = (ref_t, (ref_p >= 0.5).astype(np.int64), ref_p)
            cur_in: tuple = (cur_t, (cur_p >= 0.5).astype(np.int64), cur_p)
        else:
            ref_in, cur_in = (ref_t, ref_p), (cur_t, cur_p)
        result = PerformanceDrop(metric=metric, max_drop=self.max_drop).fit(ref_in).score(cur_in)
        extra: dict[str, Any] = {"reference": self.reference, "reference_start": ref_start, "reference_end": ref_end,
                                 "n_labelled_reference": len(ref_rows), "n_labelled_current": len(cur_rows),
                                 "task": "classification" if classes else "regression"}
        if classes:
            extra.update(f1_macro_reference=f1_macro(ref_t, ref_p), f1_macro_current=f1_macro(cur_t, cur_p))
        labels = {"stream": stream}
        return [from_drift_result(
            result, kind="accuracy_drop", model=model, version=version, feature="",
            window_start=now - self.window_s, window_end=now, time=now, labels=labels, details_extra=extra,
        )]

    # --- shadow / canary ----------------------------------------------------------------

    def _shadow(self, model: str, stream: str, versions: list[tuple[str, int]], now: float) -> list[Finding]:
        start = now - self.window_s
        primary = min(versions, key=lambda vr: (-vr[1], vr[0]))[0]
        out: list[Finding] = []
        for version, rows in versions:
            if version == primary:
                continue
            side = ("SELECT RequestId, any(Prediction) AS Prediction, any(PredictionLabel) AS PredictionLabel "
                    "FROM samples WHERE {} AND RequestId != '' GROUP BY RequestId")
            joined = self._rows(
                "SELECT a.RequestId, a.Prediction, a.PredictionLabel, b.Prediction, b.PredictionLabel FROM "
                f"({side.format(self._where(model, primary, stream, start, now))}) AS a INNER JOIN "
                f"({side.format(self._where(model, version, stream, start, now))}) AS b ON a.RequestId = b.RequestId "
                f"ORDER BY cityHash64(a.RequestId) LIMIT {self.max_rows}"
            )
            if len(joined) < self.min_shadow_rows:
                continue
            ids = np.array([str(r[0]) for r in joined], dtype=object)
            a = _predictions(_floats([r[1] for r in joined]), [r[2] for r in joined], self.max_classes)
            b = _predictions(_floats([r[3] for r in joined]), [r[4] for r in joined], self.max_classes)
            if a.dtype.kind != b.dtype.kind:
                a, b = a.astype(str), b.astype(str)
            mode = "numeric" if a.dtype.kind == "f" else "class"
            result = ShadowAgreement(min_agreement=self.min_agreement, mode=mode).fit((ids, a)).score((ids, b))
            labels = {"stream": stream}
            out.append(from_drift_result(
                result, kind="shadow_disagreement", model=model, version=version, feature="", window_start=start,
                window_end=now, time=now, labels=labels,
                details_extra={"primary_version": primary, "shadow_version": version, "rows_shadow": rows,
                               "rows_primary": dict(versions)[primary]},
            ))
        return out

    def _confidence(self, model: str, version: str, labels: dict[str, str], ref: _Window, cur: _Window,
                    window_details: dict[str, Any], now: float) -> list[Finding]:
        if np.isfinite(cur.confidence).sum() < 2:
            return []
        base = ref.confidence if np.isfinite(ref.confidence).sum() >= 2 else cur.confidence
        result = ConfidenceCV().fit(base).score(cur.confidence)
        return [from_drift_result(
            result, kind="confidence_cv", model=model, version=version, feature="", window_start=cur.start,
            window_end=cur.end, time=now, labels=labels, details_extra=window_details,
        )]


_SAMPLE_ORDER = SAMPLE_ORDER


def _floats(values: list[Any]) -> np.ndarray:
    return np.array([math.nan if v is None else float(v) for v in values], dtype=np.float64)


def _class_name(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def _predictions(numbers: np.ndarray, texts: list[Any], max_classes: int) -> np.ndarray:
    """A window's predictions: float64 scores, or an object array of class names (``None`` = missing).

    Any non-empty ``PredictionLabel`` makes the window's predictions class labels (a
    number is then named like ``"1"``); integral numbers with at most ``max_classes``
    distinct values are class labels too; otherwise the numbers are scores.
    """
    if any(t for t in texts):
        return np.array([t if t else (None if not math.isfinite(x) else _class_name(x))
                         for x, t in zip(numbers, texts)], dtype=object)
    finite = numbers[np.isfinite(numbers)]
    if finite.size and np.all(finite == np.round(finite)) and np.unique(finite).size <= max_classes:
        return np.array([_class_name(x) if math.isfinite(x) else None for x in numbers], dtype=object)
    return numbers


def _usable(a: np.ndarray) -> int:
    if a.dtype.kind == "f":
        return int(np.isfinite(a).sum())
    return int(sum(v is not None and v != "None" for v in a))


def _is_classification(rows: list[list[Any]], max_classes: int) -> bool:
    """Text labels or predictions, or integral numbers with at most ``max_classes`` values on both sides."""
    if any(r[1] or r[3] for r in rows):
        return True
    values = _floats([r[0] for r in rows] + [r[2] for r in rows])
    values = values[np.isfinite(values)]
    return bool(values.size) and bool(np.all(values == np.round(values))) and np.unique(values).size <= max_classes


def _truth_and_prediction(rows: list[list[Any]], classes: bool) -> tuple[np.ndarray, np.ndarray]:
    """(y_true, y_pred): class names for classification, floats for regression (missing: None / NaN)."""
    if classes:
        def name(num: Any, text: Any) -> Any:
            if text:
                return str(text)
            return None if num is None or not math.isfinite(float(num)) else _class_name(float(num))
        return (np.array([name(r[2], r[3]) for r in rows], dtype=object),
                np.array([name(r[0], r[1]) for r in rows], dtype=object))
    return _floats([r[2] for r in rows]), _floats([r[0] for r in rows])
