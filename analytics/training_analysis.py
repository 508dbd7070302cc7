"""Running every training and distributed detector over step records: a stream, a file, the store.

* :class:`TrainingAnalyzer` runs the detectors of :mod:`.training` and :mod:`.distributed`
  (by default every one, with its default settings) over step observations in time
  order; ``tick(now)`` lets the hung-job check see the wall clock.
* :func:`analyze_steps` runs a fresh analyzer over a whole table of records.
* :func:`read_step_table` reads a Parquet or CSV export of per-rank step records.
* :class:`TrainingWatch` is what the analytics scheduler of ``stethoscope up`` runs:
  it reads the ``stethoscope.train.*`` points the :class:`~stethoscope.agents.sdk.training.TrainingMonitor`
  sent since its last run, rebuilds one observation per step and rank, and returns
  the findings (the scheduler writes them).

Examples
--------
>>> from stethoscope.analytics.scenarios import training_run
>>> run = training_run("nan", seed=2, steps=500, world_size=2, rank=0, onset=420)
>>> [(f.kind, f.details["step"]) for f in analyze_steps(run.observations) if f.severity != "info"]
[('training_nan', 420)]
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DecodeError
from .anomaly import ANOMALY_REGISTRY
from .distributed import DISTRIBUTED_DETECTORS
from .findings import Finding
from .sql import literal as _lit
from .tabular_io import read_table
from .training import TRAINING_DETECTORS

__all__ = ["DEFAULT_DETECTORS", "JOB_EVENTS", "REQUIRED_COLUMNS", "StepTable", "TrainingAnalyzer", "TrainingWatch",
           "analyze_steps", "read_step_table"]

log = logging.getLogger(__name__)

#: Every training and distributed detector, in the order they run.
DEFAULT_DETECTORS = TRAINING_DETECTORS + DISTRIBUTED_DETECTORS

#: Kinds that every rank of a data-parallel job sees at the same step: reported once per job.
JOB_EVENTS = frozenset({"loss_spike", "gradient_explosion", "training_nan"})

#: Columns a step table must have.
REQUIRED_COLUMNS = ("timestamp", "job", "rank", "node", "step", "loss", "grad_norm", "step_time", "data_wait")
_NUMERIC = ("loss", "grad_norm", "step_time", "data_wait", "tokens", "samples", "lr")
_PREFIX = "stethoscope.train."


class TrainingAnalyzer:
    """The training and distributed detectors, run together over step observations.

    ``detectors``: names from :data:`~.anomaly.ANOMALY_REGISTRY` (default
    :data:`DEFAULT_DETECTORS`); ``settings``: name -> keyword arguments for that
    detector. Unknown names or settings raise :class:`~stethoscope.errors.ConfigError`
    listing every problem.
    """

    def __init__(self, detectors: Sequence[str] | None = None,
                 settings: Mapping[str, Mapping[str, Any]] | None = None, *, coalesce_steps: int = 5) -> None:
        names = list(DEFAULT_DETECTORS if detectors is None else detectors)
        settings = dict(settings or {})
        problems = [f"detectors: unknown detector {n!r}" for n in names if n not in ANOMALY_REGISTRY]
        problems += [f"settings: {n!r} is not one of the detectors run" for n in settings if n not in names]
        built = []
        for n in names:
            if n not in ANOMALY_REGISTRY:
                continue
            kwargs = settings.get(n, {})
            if not isinstance(kwargs, Mapping):
                problems.append(f"settings.{n}: must be a mapping of keyword arguments")
                continue
            try:
                built.append(ANOMALY_REGISTRY[n](**kwargs))
            except ConfigError as exc:
                problems += [f"settings.{n}.{p}" for p in exc.problems] if hasattr(exc, "problems") else [
                    f"settings.{n}: {exc}"]
            except TypeError as exc:
                problems.append(f"settings.{n}: {exc}")
        if isinstance(coalesce_steps, bool) or not isinstance(coalesce_steps, int) or coalesce_steps < 0:
            problems.append(f"coalesce_steps: must be an integer >= 0, got {coalesce_steps!r}")
        if problems:
            raise ConfigError(problems)
        self.detectors = built
        self.coalesce_steps = coalesce_steps
        #: Findings folded into their job's finding, by kind.
        self.folded: dict[str, int] = {}
        self._last_event: dict[tuple[str, str], float] = {}

    def update(self, obs: Mapping[str, Any]) -> list[Finding]:
        out: list[Finding] = []
        for d in self.detectors:
            out.extend(d.update(obs))
        return [c for c in (self._coalesce(f) for f in out) if c is not None]

    def _coalesce(self, f: Finding) -> Finding | None:
        """One finding per job for an event every rank sees at once (see :data:`JOB_EVENTS`).

        In data-parallel training a loss spike, a gradient explosion or a NaN shows on
        every rank at the same step: one page for the job, not one per rank. The first
        rank's finding becomes the job's (subject ``job=J``, the rank, node and GPU in
        ``details``); the same kind on other ranks within ``coalesce_steps`` steps of the
        last one reported is folded into it (counted in :attr:`folded`). A detector that
        judges the job itself (``loss_spike``) already reports with subject ``job=J`` and
        names the rank in its details; its findings are only folded the same way.
        """
        if f.kind not in JOB_EVENTS or f.severity == "info":
            return f
        parts = dict(p.split("=", 1) for p in f.subject.split() if "=" in p)
        job = parts.get("job")
        step = f.details.get("step") if isinstance(f.details, Mapping) else None
        if job is None or not isinstance(step, (int, float)) or isinstance(step, bool):
            return f
        key = (job, f.kind)
        last = self._last_event.get(key)
        if last is not None and abs(step - last) <= self.coalesce_steps:
            self._last_event[key] = max(step, last)
            self.folded[f.kind] = self.folded.get(f.kind, 0) + 1
            return None
        self._last_event[key] = step
        if "rank" not in parts:  # already the job's finding
            return f
        first = {k: parts[k] for k in ("rank", "node", "gpu") if k in parts}
        return replace(f, subject=f"job={job}",
                       details={**f.details, "first_rank_subject": f.subject,
                                **{f"first_{k}": v for k, v in first.items()}})

    def tick(self, now: float) -> list[Finding]:
        """Findings of the detectors that watch the clock (a hung job) at time ``now``."""
        out: list[Finding] = []
        for d in self.detectors:
            tick = getattr(d, "tick", None)
            if tick is not None:
                out.extend(tick(now))
        return [c for c in (self._coalesce(f) for f in out) if c is not None]

    def flush(self) -> list[Finding]:
        """Findings of the detectors that hold observations back (``loss_spike`` waits for every
        rank of a step): what they judge when told the data have ended."""
        out: list[Finding] = []
        for d in self.detectors:
            flush = getattr(d, "flush", None)
            if flush is not None:
                out.extend(flush())
        return [c for c in (self._coalesce(f) for f in out) if c is not None]

    def reset(self) -> None:
        for d in self.detectors:
            d.reset()
        self._last_event.clear()
        self.folded.clear()

    @property
    def n_ignored(self) -> dict[str, int]:
        return {d.name: d.n_ignored for d in self.detectors}


def _order(o: Any) -> tuple[float, float]:
    if not isinstance(o, Mapping):
        return (math.inf, 0.0)
    t, r = o.get("time"), o.get("rank")
    t = float(t) if isinstance(t, (int, float)) and not isinstance(t, bool) and not math.isnan(t) else math.inf
    r = float(r) if isinstance(r, (int, float)) and not isinstance(r, bool) else 0.0
    return (t, r)


def analyze_steps(records: Iterable[Mapping[str, Any]], analyzer: TrainingAnalyzer | None = None) -> list[Finding]:
    """Every finding over ``records`` (step observations, any order: sorted by time, then rank),
    including those judged when the records end (:meth:`TrainingAnalyzer.flush`)."""
    analyzer = analyzer or TrainingAnalyzer()
    out: list[Finding] = []
    for obs in sorted(records, key=_order):
        out.extend(analyzer.update(obs))
    out.extend(analyzer.flush())
    return out


# --- reading a step table -------------------------------------------------------------


@dataclass(frozen=True)
class StepTable:
    """Step observations read from a file, what was read as missing, and rows left out."""

    records: list[dict[str, Any]]
    rows: int
    #: column -> count of values that were not numbers (read as missing)
    non_numeric: dict[str, int] = field(default_factory=dict)
    #: reason -> rows left out (no usable timestamp, rank or step)
    dropped: dict[str, int] = field(default_factory=dict)


def _epoch(x: float) -> float | None:
    """Epoch seconds from seconds, or from milli-, micro- or nanoseconds told apart by size."""
    if not math.isfinite(x):
        return None
    for scale in (1.0, 1e3, 1e6, 1e9):
        if abs(x) < 1e11 * scale:
            return x / scale
    return None


def _parse_time(v: Any) -> float | None:
    if v is None or isinstance(v, bool):
        return None
    if isinstance(v, datetime):
        return (v if v.tzinfo else v.replace(tzinfo=UTC)).timestamp()
    if isinstance(v, (int, float)):
        return _epoch(float(v))
    s = str(v).strip()
    try:
        return _epoch(float(s))
    except ValueError:
        pass
    try:
        d = datetime.fromisoformat(s.replace("Z", "+00:00") if s.endswith("Z") else s)
    except ValueError:
        return None
    return (d if d.tzinfo else d.replace(tzinfo=UTC)).timestamp()


def _parse_number(v: Any) -> tuple[float | None, bool]:
    """(value, is_junk): None for missing; NaN/inf kept (they are the signal)."""
    if v is None:
        return None, False
    if isinstance(v, bool):
        return None, True
    if isinstance(v, (int, float)):
        return float(v), False
    s = str(v).strip()
    if not s:
        return None, False
    try:
        return float(s), False
    except ValueError:
        return None, True


def _read(path: Path) -> Any:
    # "nan" and "inf" are values here (a NaN loss is what we look for), not missing
    return read_table(path, feature="reading step tables", require_rows=False,
                      csv_null_values=("", "NULL", "null", "NA", "N/A"))


def read_step_table(path: str | Path) -> StepTable:
    """Read per-rank step records from Parquet or CSV into observations.

    Required columns: :data:`REQUIRED_COLUMNS`; optional: ``tokens``, ``samples``,
    ``lr``, ``world_size``, ``gpu`` and ``phase_<name>`` (seconds in that phase).
    ``timestamp`` is epoch seconds (milli-, micro- and nanoseconds are recognised by
    their size: above 1e11, 1e14, 1e17), an ISO 8601 string (UTC when no offset is
    given) or a timestamp column. Numeric cells that are not numbers are read as
    missing and counted; ``nan``/``inf`` are kept as such. Rows without a usable
    timestamp, rank or step are left out and counted. :class:`DecodeError` names a
    missing column, an unreadable file, or a table with no usable row.
    """
    path = Path(path)
    table = _read(path)
    names = list(table.column_names)
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        raise DecodeError(f"{path}: missing required column(s): {', '.join(missing)} "
                          f"(found: {', '.join(names) or 'none'})")
    if table.num_rows == 0:
        raise DecodeError(f"{path}: the file has no rows")
    cols = {n: table.column(n).to_pylist() for n in names}
    phase_cols = [n for n in names if n.startswith("phase_") and len(n) > 6]
    numeric = [c for c in (*_NUMERIC, "world_size") if c in cols] + phase_cols
    junk: dict[str, int] = {}
    dropped: dict[str, int] = {}
    records: list[dict[str, Any]] = []
    for i in range(table.num_rows):
        t = _parse_time(cols["timestamp"][i])
        if t is None:
            dropped["timestamp"] = dropped.get("timestamp", 0) + 1
            continue
        ints = {}
        for c in ("rank", "step"):
            v, bad = _parse_number(cols[c][i])
            if v is None or not math.isfinite(v) or not v.is_integer():
                ints = None
                dropped[c] = dropped.get(c, 0) + 1
                break
            ints[c] = int(v)
        if ints is None:
            continue
        rec: dict[str, Any] = {"time": t, "job": "" if cols["job"][i] is None else str(cols["job"][i]),
                               "node": "" if cols["node"][i] is None else str(cols["node"][i]), **ints}
        if "gpu" in cols and cols["gpu"][i] is not None:
            g = cols["gpu"][i]
            rec["gpu"] = str(int(g)) if isinstance(g, float) and g.is_integer() else str(g)
        phases = {}
        for c in numeric:
            v, bad = _parse_number(cols[c][i])
            if bad:
                junk[c] = junk.get(c, 0) + 1
            if v is None:
                continue
            if c in phase_cols:
                phases[c[6:]] = v
            elif c == "world_size":
                if math.isfinite(v):
                    rec[c] = int(v)
            else:
                rec[c] = v
        if phases:
            rec["phases"] = phases
        records.append(rec)
    if not records:
        raise DecodeError(f"{path}: no usable row (left out: "
                          + ", ".join(f"{n} without a usable {k}" for k, n in dropped.items()) + ")")
    return StepTable(records, table.num_rows, junk, dropped)


# --- the store ------------------------------------------------------------------------



def _ns(t_ns: int) -> str:
    return f"fromUnixTimestamp64Nano(toInt64({int(t_ns)}))"


class TrainingWatch:
    """Incremental training analysis over the store, one call per scheduler interval.

    Each :meth:`run` reads the ``stethoscope.train.*`` gauge points newer than the
    watermark less ``grace_s`` (the first run: the last ``lookback_s``) and the
    ``stethoscope.train.nonfinite`` sums, groups the points of one step (job, rank
    and timestamp: the SDK stamps every value of a step alike) into one observation,
    skips steps already processed (by job, rank and step number, so a late point of
    a step already seen is dropped, not processed twice), feeds them in time order to
    one persistent :class:`TrainingAnalyzer`, then calls its ``tick(now)``. It returns
    the findings and writes nothing.

    The SDK exports a NaN or infinite value as a count in the ``nonfinite`` delta sum,
    stamped at export time, and keeps the last finite value on the gauge; a
    ``training_nan`` finding from the store therefore names the latest step processed
    for that rank, the exact step lying within the export interval that ends there.

    ``loss_spike`` judges a step once every rank of the job has sent it: a step whose
    ranks arrive in different runs (the ranks export at different moments) waits
    across runs, up to its own ``grace_s`` (60 s) measured by ``now``. A rank whose
    points come more than this watch's ``grace_s`` behind the newest point is not read
    at all, so keep that grace above the SDK's export interval.
    """

    name = "training"

    def __init__(self, analyzer: TrainingAnalyzer | None = None, *, lookback_s: float = 600.0,
                 grace_s: float = 30.0, clock: Callable[[], float] | None = None) -> None:
        problems = []
        for name, v in (("lookback_s", lookback_s), ("grace_s", grace_s)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v >= 0):
                problems.append(f"{name}: must be a finite number >= 0, got {v!r}")
        if problems:
            raise ConfigError(problems)
        import time

        self.analyzer = analyzer or TrainingAnalyzer()
        self.lookback_s, self.grace_s = float(lookback_s), float(grace_s)
        self.clock = clock or time.time
        self.watermark_ns: int | None = None
        self._done: dict[tuple[str, str], int] = {}
        self._sums_seen: dict[tuple[str, str, int, str], None] = {}
        self._last_step: dict[tuple[str, str], int] = {}

    def _rows(self, store: Any, sql: str) -> list[list[Any]]:
        data = store.query(sql, "JSONCompactEachRow").data
        if isinstance(data, bytes):
            data = data.decode()
        return [json.loads(line) for line in data.splitlines() if line.strip()]

    def run(self, store: Any, now: float | None = None) -> list[Finding]:
        """Analyze what arrived since the last run; return the findings (not written)."""
        now = self.clock() if now is None else float(now)
        now_ns = int(round(now * 1e9))
        since = (now_ns - int(self.lookback_s * 1e9) if self.watermark_ns is None
                 else self.watermark_ns - int(self.grace_s * 1e9))
        attrs = ("Attributes['stethoscope.train.job'], Attributes['stethoscope.train.rank'], "
                 "Attributes['stethoscope.train.world_size'], "
                 "if(Attributes['host.name'] != '', Attributes['host.name'], ResourceAttributes['host.name']), "
                 "if(Attributes['gpu.index'] != '', Attributes['gpu.index'], Attributes['gpu.uuid'])")
        window = f"TimeUnix > {_ns(since)} AND TimeUnix <= {_ns(now_ns)}"
        gauges = self._rows(store, (
            f"SELECT MetricName, {attrs}, Attributes['stethoscope.train.phase'], toUnixTimestamp64Nano(TimeUnix), "
            f"Value FROM otel_metrics_gauge WHERE startsWith(MetricName, {_lit(_PREFIX)}) AND {window} "
            "ORDER BY TimeUnix"))
        sums = self._rows(store, (
            f"SELECT {attrs}, Attributes['stethoscope.train.value'], toUnixTimestamp64Nano(TimeUnix), Value "
            f"FROM otel_metrics_sum WHERE MetricName = {_lit(_PREFIX + 'nonfinite')} AND {window} "
            "ORDER BY TimeUnix"))
        steps: dict[tuple[str, str, int], dict[str, Any]] = {}
        newest = self.watermark_ns or since
        for name, job, rank, world, node, gpu, phase, t_ns, value in gauges:
            t_ns = int(t_ns)
            newest = max(newest, t_ns)
            obs = steps.get((job, rank, t_ns))
            if obs is None:
                obs = steps[(job, rank, t_ns)] = {"time": t_ns / 1e9, "job": job, "rank": _as_int(rank),
                                                  "world_size": _as_int(world), "node": node, "gpu": gpu}
            short = name[len(_PREFIX):]
            if short == "phase.time":
                if phase:
                    obs.setdefault("phases", {})[phase] = float(value)
            elif short == "step":
                obs["step"] = int(value)
            elif short in _NUMERIC:
                obs[short] = float(value)
        batch: list[tuple[int, int, tuple[str, str], dict[str, Any]]] = []
        for (job, rank, t_ns), obs in steps.items():
            key = (job, rank)
            if obs.get("step", t_ns) <= self._done.get(key, -1):
                continue
            batch.append((t_ns, 0, key, obs))
        for job, rank, world, node, gpu, value_name, t_ns, value in sums:
            t_ns = int(t_ns)
            newest = max(newest, t_ns)
            k = (job, rank, t_ns, value_name)
            if k in self._sums_seen or not value or value <= 0:
                continue
            self._sums_seen[k] = None
            batch.append((t_ns, 1, (job, rank), {"time": t_ns / 1e9, "job": job, "rank": _as_int(rank), "node": node,
                                    "gpu": gpu, "nonfinite": {value_name: float(value)}}))
        batch.sort(key=lambda b: (b[0], b[1], b[3].get("rank") or 0))
        out: list[Finding] = []
        for t_ns, is_sum, key, obs in batch:
            if is_sum:
                obs["step"] = self._last_step.get(key)
            else:
                self._done[key] = obs.get("step", t_ns)
                if "step" in obs:
                    self._last_step[key] = obs["step"]
            out.extend(self.analyzer.update(obs))
        out.extend(self.analyzer.tick(now))
        self.watermark_ns = newest
        cutoff = newest - int(self.grace_s * 1e9)
        self._sums_seen = {k: None for k in self._sums_seen if k[2] > cutoff}
        return out


def _as_int(v: Any) -> int | None:
    try:
        return int(v)
    except (TypeError, ValueError):
        return None
