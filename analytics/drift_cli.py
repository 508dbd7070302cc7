"""The ``stethoscope drift REFERENCE CURRENT`` command: a calibrated dataset check on files.

Exit status: 0 when the dataset has not drifted, 1 when it has, 2 when the inputs or
options are unusable (unreadable file, mismatched schemas, no rows, bad ``--alpha``,
or no column could be checked). ``--format json`` writes one JSON object per line:
one per column (``method``, ``statistic``, ``p_value``, ``p_adjusted``, ``effect``,
``threshold``, ``drifted``, ``n_reference``, ``n_current`` and more), then the
dataset summary (``"type": "dataset"``). A column that cannot be checked (say, all
values missing) gets ``"error"`` instead of the numbers.

Also runnable as ``python -m stethoscope.analytics.drift_cli REFERENCE CURRENT``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from ..errors import StethoscopeError

__all__ = ["add_arguments", "main", "run"]

EXIT_OK, EXIT_DRIFT, EXIT_INPUT = 0, 1, 2


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the command's arguments to ``parser`` (a subcommand parser) and return it."""
    parser.add_argument("reference", help="reference table: .csv, .tsv or .parquet")
    parser.add_argument("current", help="current table, same columns as the reference")
    parser.add_argument("--format", choices=("table", "json"), default="table",
                        help="output: aligned text (default) or JSON, one object per line")
    parser.add_argument("--columns", default=None, help="comma-separated columns to check (default: all)")
    parser.add_argument("--correction", choices=("bh", "bonferroni"), default="bh",
                        help="multiple-testing correction across columns (default: bh, Benjamini-Hochberg)")
    parser.add_argument("--alpha", type=float, default=0.05, help="significance after correction (default 0.05)")
    return parser


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _write_json(records: list[dict[str, Any]], out: TextIO) -> None:
    out.writelines(json.dumps({k: _finite(v) for k, v in rec.items()}, allow_nan=False) + "\n" for rec in records)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3g}" if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e4) else f"{value:.4f}"
    return str(value)


def _write_table(records: list[dict[str, Any]], out: TextIO) -> None:
    head = ["column", "kind", "method", "statistic", "p_value", "p_adjusted", "effect", "measure",
            "threshold", "drifted", "n_ref", "n_cur"]
    keys = ["column", "kind", "method", "statistic", "p_value", "p_adjusted", "effect", "effect_measure",
            "threshold", "drifted", "n_reference", "n_current"]
    rows, errors = [], []
    for rec in records[:-1]:
        if "error" in rec:
            errors.append(f"  {rec['column']}: {rec['error']}")
        else:
            rows.append([_fmt(rec.get(k)) for k in keys])
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    out.write("  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)).rstrip() + "\n")
    out.writelines("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() + "\n" for r in rows)
    if errors:
        out.write("columns not checked:\n" + "\n".join(errors) + "\n")
    s = records[-1]
    verdict = "DRIFT" if s["drifted"] else "no drift"
    out.write(f"dataset: {verdict}: {s['n_drifted']} of {s['n_checked']} checked columns drifted "
              f"(share {s['share']:.2f}, threshold {s['drift_share']:.2f}; {s['correction']} at alpha {s['alpha']})\n")


def run(args: argparse.Namespace, *, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run the check described by ``args``; return the exit status (0, 1 or 2)."""
    out = out or sys.stdout
    err = err or sys.stderr
    from .calibration import Calibration
    from .dataset import DatasetDrift
    from .tabular_io import read_pair

    try:
        calibration = Calibration(alpha=args.alpha, correction=args.correction)
        columns = [c.strip() for c in args.columns.split(",") if c.strip()] if args.columns else None
        if args.columns is not None and not columns:
            raise ValueError("--columns: no column names given")
        tables = read_pair(args.reference, args.current, columns)
        # the reference columns were read for this check alone: sort them in place
        report = DatasetDrift(calibration, kinds=tables.kinds).fit(tables.reference, overwrite=True).score(
            tables.current)
    except (StethoscopeError, ValueError, OSError) as exc:
        err.write(f"stethoscope drift: error: {exc}\n")
        return EXIT_INPUT
    for name, (jr, jc) in tables.non_numeric.items():
        err.write(f"stethoscope drift: column {name!r}: non-numeric values read as missing: "
                  f"{jr} in reference, {jc} in current\n")
    records = report.records()
    for rec in records[:-1]:
        if rec.get("column") in tables.non_numeric:
            rec["non_numeric_reference"], rec["non_numeric_current"] = tables.non_numeric[rec["column"]]
    if args.format == "json":
        _write_json(records, out)
    else:
        _write_table(records, out)
    if report.summary.n_checked == 0:
        err.write("stethoscope drift: error: no column could be checked\n")
        return EXIT_INPUT
    return EXIT_DRIFT if report.drifted else EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point for ``python -m stethoscope.analytics.drift_cli``."""
    parser = add_arguments(argparse.ArgumentParser(prog="stethoscope drift", description=__doc__.splitlines()[0]))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
