"""The ``stethoscope analyze training FILE`` command: the training detectors over an exported run.

``FILE`` is a Parquet or CSV table of per-rank step records (columns at least
``timestamp, job, rank, node, step, loss, grad_norm, step_time, data_wait``; see
:func:`~.training_analysis.read_step_table`). Every training and distributed detector
runs over it in time order; each finding is printed, with ``--format json`` as one
JSON object per line: ``kind``, ``severity``, ``subject``, ``job``, ``rank``,
``node``, ``gpu``, ``step`` (onset), ``onset_time`` and ``time`` (epoch seconds and
ISO 8601), ``method``, ``statistic``, ``threshold``, ``effect`` and ``evidence``
(the detector's details).

``--config`` is a JSON file (or inline JSON) ``{"detectors": [names], "settings":
{name: {option: value}}}``, both keys optional.

Exit status: 0 when the analysis ran (with or without findings), 2 when the file or
the options are unusable; the message names what was wrong.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from ..errors import StethoscopeError

__all__ = ["add_arguments", "finding_record", "main", "run"]

EXIT_OK, EXIT_INPUT = 0, 2


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``analyze`` subcommands to ``parser`` and return it."""
    sub = parser.add_subparsers(dest="analyze_command", required=True)
    tr = sub.add_parser("training", help="run the training and distributed detectors on a step table")
    tr.add_argument("file", help="per-rank step records: .csv, .tsv or .parquet")
    tr.add_argument("--format", choices=("table", "json"), default="table",
                    help="output: aligned text (default) or JSON, one object per finding per line")
    tr.add_argument("--config", default=None,
                    help='JSON file or inline JSON: {"detectors": [...], "settings": {name: {...}}}')
    tr.add_argument("--min-severity", choices=("info", "warning", "critical"), default="info",
                    help="leave out findings below this severity (default: info, all)")
    return parser


def _iso(t: float | None) -> str | None:
    if t is None or not isinstance(t, (int, float)) or not math.isfinite(t):
        return None
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if hasattr(v, "item") and callable(v.item):
        return _clean(v.item())
    return v


def finding_record(f: Any) -> dict[str, Any]:
    """One finding as the JSON object the command prints."""
    d = dict(f.details)
    onset = d.get("onset_time")
    return _clean({
        "kind": f.kind, "severity": f.severity, "subject": f.subject, "job": d.get("job"), "rank": d.get("rank"),
        "node": d.get("node") or None, "gpu": d.get("gpu") or None, "step": d.get("step"),
        "onset_time": onset, "onset": _iso(onset), "time": f.time, "detected": _iso(f.time), "method": f.method,
        "statistic": f.statistic, "threshold": f.threshold, "effect": f.effect,
        "evidence": {k: v for k, v in d.items() if k not in ("job", "rank", "node", "gpu", "step", "onset_time")},
    })


def _config(raw: str | None) -> tuple[list[str] | None, dict[str, Any]]:
    if raw is None:
        return None, {}
    text = raw
    if not raw.lstrip().startswith("{"):
        p = Path(raw)
        if not p.is_file():
            raise ValueError(f"--config: no such file {raw!r} (give a JSON file or inline JSON)")
        text = p.read_text()
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--config: not valid JSON: {exc}") from exc
    if not isinstance(cfg, dict):
        raise ValueError("--config: must be a JSON object")
    unknown = sorted(set(cfg) - {"detectors", "settings"})
    if unknown:
        raise ValueError(f"--config: unknown key(s) {', '.join(unknown)}; expected detectors, settings")
    detectors = cfg.get("detectors")
    if detectors is not None and not (isinstance(detectors, list) and all(isinstance(d, str) for d in detectors)):
        raise ValueError("--config: detectors must be a list of names")
    settings = cfg.get("settings", {})
    if not isinstance(settings, dict):
        raise ValueError("--config: settings must be an object")
    return detectors, settings


def _write_table(records: list[dict[str, Any]], out: TextIO) -> None:
    head = ["onset", "severity", "kind", "subject", "rank", "node", "step", "statistic", "method"]
    rows = []
    for r in records:
        stat = r["statistic"]
        rows.append([str(r["onset"] or "-"), r["severity"], r["kind"], r["subject"],
                     "-" if r["rank"] is None else str(r["rank"]), r["node"] or "-",
                     "-" if r["step"] is None else str(r["step"]),
                     "-" if stat is None else f"{stat:.4g}", r["method"] or "-"])
    widths = [max(len(h), *(len(x[i]) for x in rows)) if rows else len(h) for i, h in enumerate(head)]
    out.write("  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)).rstrip() + "\n")
    out.writelines("  ".join(c.ljust(w) for c, w in zip(x, widths, strict=True)).rstrip() + "\n" for x in rows)


def run(args: argparse.Namespace, *, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run ``analyze training``; return the exit status (0 or 2)."""
    out = out or sys.stdout
    err = err or sys.stderr
    from .findings import SEVERITIES
    from .training_analysis import TrainingAnalyzer, analyze_steps, read_step_table

    try:
        detectors, settings = _config(args.config)
        analyzer = TrainingAnalyzer(detectors, settings)
        table = read_step_table(args.file)
    except (StethoscopeError, ValueError, OSError) as exc:
        err.write(f"stethoscope analyze training: error: {exc}\n")
        return EXIT_INPUT
    for col, n in sorted(table.non_numeric.items()):
        err.write(f"stethoscope analyze training: column {col!r}: {n} non-numeric value(s) read as missing\n")
    for why, n in sorted(table.dropped.items()):
        err.write(f"stethoscope analyze training: {n} row(s) left out: no usable {why}\n")
    floor = SEVERITIES.index(args.min_severity)
    findings = [f for f in analyze_steps(table.records, analyzer) if SEVERITIES.index(f.severity) >= floor]
    records = [finding_record(f) for f in sorted(findings, key=lambda f: (f.details.get("onset_time") or f.time,
                                                                            f.kind, f.subject))]
    if args.format == "json":
        out.writelines(json.dumps(r, allow_nan=False, sort_keys=False) + "\n" for r in records)
    else:
        _write_table(records, out)
        out.write(f"{len(records)} finding(s) in {len(table.records)} step record(s)\n")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point for ``python -m stethoscope.analytics.analyze_cli training FILE``."""
    parser = add_arguments(argparse.ArgumentParser(prog="stethoscope analyze", description=__doc__.splitlines()[0]))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
