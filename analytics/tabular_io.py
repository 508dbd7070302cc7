"""Reading a reference and a current table (CSV or Parquet) into columns for drift checks.

Files ending in ``.parquet`` or ``.pq`` are read with ``pyarrow.parquet``; ``.csv``,
``.tsv``, ``.txt`` (optionally ``.gz``/``.bz2``) with ``pyarrow.csv`` (tab-delimited for
``.tsv``). pyarrow is in the ``server`` extra and imported only when a file is read.

Column kinds are decided on the reference and imposed on the current table:

* integer, float and decimal columns are numeric (nulls become NaN, dropped later);
* text columns whose non-missing values are at least :data:`NUMERIC_SHARE` (95%)
  numbers are numeric too: the junk values ("n/a", "?", "12kg") are read as missing
  and counted in :attr:`Tables.non_numeric`, so a few bad cells neither crash the
  check nor turn a numeric column into a categorical one;
* everything else (text, booleans, dates) is categorical, compared as text labels.

Every problem with the inputs raises :class:`~stethoscope.errors.DecodeError` with a
message naming the file and, for mismatched schemas, the columns missing on each side.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._extras import require
from ..errors import DecodeError

__all__ = ["NUMERIC_SHARE", "Tables", "read_pair", "read_table"]

#: A text column is numeric when at least this share of its non-missing values parse as numbers.
NUMERIC_SHARE = 0.95

_CSV = (".csv", ".tsv", ".txt")
_PARQUET = (".parquet", ".pq")


@dataclass(frozen=True)
class Tables:
    """Reference and current columns with the same names, and each column's kind."""

    reference: dict[str, np.ndarray]
    current: dict[str, np.ndarray]
    kinds: dict[str, str]
    #: column -> (reference, current) counts of non-numeric text read as missing
    non_numeric: dict[str, tuple[int, int]] = field(default_factory=dict)


def read_table(path: str | Path, *, feature: str = "reading tables for drift checks",
               csv_null_values: Sequence[str] | None = None, require_rows: bool = True) -> Any:
    """The file as a ``pyarrow.Table``; :class:`DecodeError` when it cannot be read.

    CSV, TSV (also gzip- or bzip2-compressed) or Parquet, by the file's suffix.
    ``csv_null_values`` replaces pyarrow's list of the texts read as missing (for
    callers to whom ``nan`` is a value); ``require_rows=False`` leaves an empty table
    for the caller to judge. ``feature`` names the work in a missing-extra error.
    """
    path = Path(path)
    if not path.is_file():
        raise DecodeError(f"{path}: no such file")
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in (".gz", ".bz2"):
        suffixes = suffixes[:-1]
    ext = suffixes[-1] if suffixes else ""
    pa = require("pyarrow", extra="server", feature=feature)
    try:
        if ext in _PARQUET:
            table = require("pyarrow.parquet", extra="server", feature="reading Parquet").read_table(path)
        elif ext in _CSV:
            csv = require("pyarrow.csv", extra="server", feature="reading CSV")
            parse = csv.ParseOptions(delimiter="\t" if ext == ".tsv" else ",")
            convert = (csv.ConvertOptions() if csv_null_values is None else
                       csv.ConvertOptions(null_values=list(csv_null_values), strings_can_be_null=True))
            table = csv.read_csv(path, parse_options=parse, convert_options=convert)
        else:
            raise DecodeError(f"{path}: unsupported file type {ext or '(none)'!r}; use .csv, .tsv or .parquet")
    except DecodeError:
        raise
    except (pa.ArrowException, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DecodeError(f"{path}: cannot read as {ext.lstrip('.')}: {first}") from exc
    if not require_rows:
        return table
    if table.num_columns == 0:
        raise DecodeError(f"{path}: the file has no columns")
    if table.num_rows == 0:
        raise DecodeError(f"{path}: the file has no rows")
    return table


def _numeric_type(pa: Any, t: Any) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)


def _as_float(pa: Any, column: Any) -> np.ndarray:
    return column.cast(pa.float64()).to_numpy(zero_copy_only=False).astype(np.float64, copy=False)


def _parse_numbers(values: list[Any]) -> tuple[np.ndarray, int, int]:
    """Floats (NaN where missing or junk), the count of junk values and of present ones."""
    out = np.full(len(values), np.nan)
    junk = present = 0
    for i, v in enumerate(values):
        if v is None:
            continue
        present += 1
        try:
            out[i] = float(v)
        except (TypeError, ValueError):
            junk += 1
    return out, junk, present


def _labels(column: Any) -> np.ndarray:
    return np.array([None if v is None else str(v) for v in column.to_pylist()], dtype=object)


def _column(pa: Any, column: Any, kind: str | None) -> tuple[np.ndarray, str, int]:
    """Values, kind and junk count of one column; ``kind`` None means infer it."""
    t = column.type
    if _numeric_type(pa, t) and kind in (None, "numeric"):
        return _as_float(pa, column), "numeric", 0
    if (pa.types.is_string(t) or pa.types.is_large_string(t)) and kind in (None, "numeric"):
        parsed, junk, present = _parse_numbers(column.to_pylist())
        if kind == "numeric" or (present and (present - junk) / present >= NUMERIC_SHARE):
            return parsed, "numeric", junk
    if kind == "numeric" and pa.types.is_null(t):
        return np.full(len(column), np.nan), "numeric", 0
    if kind == "numeric":  # booleans, dates: not numbers; every value is junk
        return np.full(len(column), np.nan), "numeric", len(column) - column.null_count
    return _labels(column), "categorical", 0


def read_pair(reference: str | Path, current: str | Path, columns: list[str] | None = None) -> Tables:
    """Read both files, check their schemas agree, and decide each column's kind."""
    pa = require("pyarrow", extra="server", feature="reading tables for drift checks")
    ref, cur = read_table(reference), read_table(current)
    ref_names, cur_names = list(ref.column_names), list(cur.column_names)
    if columns:
        unknown = [c for c in columns if c not in ref_names and c not in cur_names]
        if unknown:
            raise DecodeError(f"--columns names columns in neither file: {', '.join(unknown)}")
        ref_names = [c for c in columns if c in ref_names]
        cur_names = [c for c in columns if c in cur_names]
    only_ref = [c for c in ref_names if c not in cur_names]
    only_cur = [c for c in cur_names if c not in ref_names]
    if only_ref or only_cur:
        parts = []
        if only_ref:
            parts.append(f"missing in current ({current}): {', '.join(only_ref)}")
        if only_cur:
            parts.append(f"missing in reference ({reference}): {', '.join(only_cur)}")
        raise DecodeError("schemas differ: " + "; ".join(parts))
    out_ref: dict[str, np.ndarray] = {}
    out_cur: dict[str, np.ndarray] = {}
    kinds: dict[str, str] = {}
    junk: dict[str, tuple[int, int]] = {}
    for name in ref_names:
        r, kind, jr = _column(pa, ref.column(name), None)
        c, _, jc = _column(pa, cur.column(name), kind)
        out_ref[name], out_cur[name], kinds[name] = r, c, kind
        if jr or jc:
            junk[name] = (jr, jc)
    return Tables(out_ref, out_cur, kinds, junk)
