"""The drift scheduler: every interval, compare each model stream's latest window with a reference.

For each ``(Model, ModelVersion, Stream)`` with rows in the current window
``[now - window, now)`` of ``samples``, :meth:`DriftScheduler.run_once` reads the
feature vectors of the current and the reference window (one query each, as
Parquet, into a float64 ``n x d`` array), runs :class:`~.dataset.DatasetDrift`
and writes, in one batch to ``findings``:

* one ``feature_drift`` finding per feature (``warning`` when it drifted, else ``info``);
* one ``dataset_drift`` summary (``warning`` when the dataset drifted);
* one ``confidence_cv`` finding when the current window has confidences;
* instead of all that, one ``info`` ``dataset_drift`` finding with method
  ``insufficient_data`` when either window has fewer than ``min_rows`` rows.

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
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._extras import require
from .._periodic import Periodic
from .calibration import Calibration
from .dataset import ColumnError, DatasetDrift
from .findings import Finding, FindingsWriter, from_drift_result, subject_of
from .performance import ConfidenceCV

__all__ = ["DriftScheduler", "REFERENCES"]

log = logging.getLogger(__name__)

#: How the reference window is chosen.
REFERENCES = ("previous", "first")


def _lit(s: str) -> str:
    """A ClickHouse string literal."""
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _ts(t: float) -> str:
    return f"fromUnixTimestamp64Milli(toInt64({int(round(t * 1000))}))"


@dataclass(frozen=True)
class _Window:
    """One window's rows: features ``n x d`` (float64), confidences, rows left out."""

    start: float
    end: float
    features: np.ndarray
    confidence: np.ndarray
    dropped: int

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
        self.writer = FindingsWriter(store)
        self._init_periodic()  # errors: caught by the loop or per stream, by exception type name

    # --- one run -------------------------------------------------------------------------

    def run_once(self, now: float | None = None) -> list[Finding]:
        """Check every stream with rows in ``[now - window, now)``; write and return the findings.

        A stream that fails (a query error, bad data) is logged and skipped; the
        others are still checked and written.
        """
        now = self.clock() if now is None else float(now)
        start = now - self.window_s
        findings: list[Finding] = []
        for model, version, stream, names in self._streams(start, now):
            try:
                findings += self._check(model, version, stream, names, now)
            except Exception as exc:  # one broken stream must not hide the others
                self._record_error(exc, f"drift check of {model}/{version}/{stream}")
        self.writer.write(findings)
        return findings

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

    def _streams(self, start: float, end: float) -> list[tuple[str, str, str, list[str]]]:
        rows = self._rows(
            "SELECT Model, ModelVersion, Stream, argMin(FeatureNames, Timestamp) FROM samples "
            f"WHERE Timestamp >= {_ts(start)} AND Timestamp < {_ts(end)} "
            "GROUP BY Model, ModelVersion, Stream ORDER BY Model, ModelVersion, Stream"
        )
        return [(str(m), str(v), str(s), [str(n) for n in names]) for m, v, s, names in rows]

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
        if end <= start:
            return _Window(start, end, np.empty((0, 0)), np.empty(0), 0)
        pa = require("pyarrow", extra="server", feature="drift checks on stored samples")
        pq = require("pyarrow.parquet", extra="server", feature="drift checks on stored samples")
        data = self.store.query(
            "SELECT Features, Confidence FROM samples "
            f"WHERE {self._where(model, version, stream, start, end)} ORDER BY Timestamp FORMAT Parquet",
            "Parquet",
        ).data
        if not data:
            return _Window(start, end, np.empty((0, 0)), np.empty(0), 0)
        table = pq.read_table(pa.BufferReader(data))
        feats = table.column("Features").combine_chunks()
        conf = table.column("Confidence").to_numpy().astype(np.float64)
        if len(feats) == 0:
            return _Window(start, end, np.empty((0, 0)), conf, 0)
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
            conf = conf[keep]
        return _Window(start, end, matrix, conf, int((~keep).sum()))

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
        out: list[Finding] = []
        for item in report.columns:
            if isinstance(item, ColumnError):
                out.append(Finding(kind="feature_drift", subject=subject_of(model, version, labels, item.column),
                                   feature=item.column, method="error", severity="info",
                                   details={**window_details, "error": item.message}, **common))
                continue
            out.append(from_drift_result(
                item, kind="feature_drift", model=model, version=version, feature=str(item.column),
                window_start=cur.start, window_end=cur.end, time=now, labels=labels,
                details_extra=window_details,
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
