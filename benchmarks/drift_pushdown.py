"""Push-down and sketch references against moving raw rows, on one large window pair.

``python -m benchmarks.drift_pushdown [--rows N] [--features D]`` (default 2 x 500,000
rows x 10 features in an embedded chDB store, feature 1 shifted by 0.02 sigma) prints
a markdown table comparing, for the same per-feature KS check:

* ``pushdown``: ClickHouse's ``kolmogorovSmirnovTest`` for every feature in one query
  (:meth:`stethoscope.analytics.pushdown.PushDown.ks`), only (D, p) per feature moves;
* ``rows + scipy``: read both windows' feature arrays as Parquet (what the scheduler
  does when a window is below ``max_rows``) and run SciPy's ``ks_2samp`` per column;
* ``sketch``: the reference as a stored sketch (:mod:`stethoscope.analytics.references`),
  the current window sketched from its rows, then the KS bounds from the histograms.

Bytes moved are the sizes of the answers the store returned. The store runs in this
process (chDB), with as many threads as it takes; SciPy runs on one thread.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
from stethoscope.analytics.pushdown import PushDown, WindowSpec
from stethoscope.analytics.references import ReferenceSketch, SketchDrift
from stethoscope.exporters.chdb_store import ChdbStore

NOW = 1_718_000_000.0
HOUR = 3600.0


def _fill(store: ChdbStore, n: int, d: int, start: float, shift: float, seed: int) -> None:
    feats = ", ".join(
        f"toFloat32(randNormal({shift if j == 1 else 0.0}, 1., {seed * 1000 + j}))" for j in range(d))
    store.execute(
        "INSERT INTO samples (Timestamp, Model, ModelVersion, Stream, RequestId, Features, AdjustedCount) "
        f"SELECT fromUnixTimestamp64Milli(toInt64({int(start * 1000)} + number * {int(HOUR * 1000) // n})), "
        f"'bench', '1', 'default', toString(number + {seed} * 100000000), [{feats}], 1.0 FROM numbers({n})"
    )


def _matrix(store: ChdbStore, w: WindowSpec) -> tuple[np.ndarray, int]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = store.query(f"SELECT Features FROM samples WHERE {w.where()} FORMAT Parquet", "Parquet").data
    col = pq.read_table(pa.BufferReader(data)).column("Features").combine_chunks()
    d = len(col[0])
    return np.asarray(col.flatten(), dtype=np.float64).reshape(len(col), d), len(data)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=500_000)
    p.add_argument("--features", type=int, default=10)
    args, _ = p.parse_known_args(argv)
    n, d = args.rows, args.features
    from scipy import stats

    with tempfile.TemporaryDirectory() as tmp:
        store = ChdbStore(f"{tmp}/data")
        store.ensure_schema()
        try:
            _fill(store, n, d, NOW - 2 * HOUR, 0.0, 1)
            _fill(store, n, d, NOW - HOUR, 0.02, 2)
            ref_w = WindowSpec("bench", "1", "default", NOW - 2 * HOUR, NOW - HOUR)
            cur_w = WindowSpec("bench", "1", "default", NOW - HOUR, NOW)
            moved = []

            class _Counting:  # the store, counting the bytes of each answer
                def query(self, sql, fmt):
                    res = store.query(sql, fmt)
                    moved.append(len(res.data))
                    return res

            pd = PushDown(_Counting())
            pd.ks(ref_w, cur_w)  # warm up
            moved.clear()

            t = time.perf_counter()
            push = pd.ks(ref_w, cur_w, method="asymp")
            t_push = time.perf_counter() - t

            t = time.perf_counter()
            ref, ref_bytes = _matrix(store, ref_w)
            cur, cur_bytes = _matrix(store, cur_w)
            t_read = time.perf_counter() - t
            t = time.perf_counter()
            scipy_res = [stats.ks_2samp(ref[:, j], cur[:, j]) for j in range(d)]
            t_scipy = time.perf_counter() - t

            ref_sketch = ReferenceSketch.from_rows(ref, [f"f{j}" for j in range(d)])
            stored = ref_sketch.to_json()
            t = time.perf_counter()
            loaded = ReferenceSketch.from_json(stored)
            cur_sketch = ReferenceSketch.from_rows(cur, [f"f{j}" for j in range(d)])
            t_build = time.perf_counter() - t
            t = time.perf_counter()
            sk = SketchDrift().compare(loaded, cur_sketch)
            t_sketch = time.perf_counter() - t
        finally:
            store.close()

    max_dd = max(abs(a.statistic - b.statistic) for a, b in zip(push, scipy_res))
    inside = all(r.statistic - 1e-12 <= s.statistic <= r.details["statistic_high"] + 1e-12
                 for r, s in zip(sk, scipy_res))
    worst = max(r.details["ks_error_bound"] for r in sk)
    print(f"2 windows x {n:,} rows x {d} features (Float32), feature 1 shifted by 0.02 sigma\n")
    print("| path | seconds | bytes moved to Python | result |")
    print("|---|---:|---:|---|")
    print(f"| pushdown: ClickHouse `kolmogorovSmirnovTest`, one query | {t_push:.2f} | {sum(moved):,} "
          f"| D equal to SciPy's within {max_dd:.1e} |")
    print(f"| rows + SciPy: read both windows as Parquet | {t_read:.2f} | {ref_bytes + cur_bytes:,} | |")
    print(f"| rows + SciPy: `ks_2samp` per column | {t_scipy:.2f} | | reference |")
    print(f"| sketch: load reference JSON + sketch current rows | {t_build:.2f} | {len(stored):,} (reference) | |")
    print(f"| sketch: KS bounds from histograms | {t_sketch:.3f} | | exact D inside the bounds: {inside}; "
          f"largest bound width {worst:.4f} |")
    flagged = [j for j, r in enumerate(push) if r.p_value < 0.05]
    print(f"\nfeatures with p < 0.05: pushdown {flagged}, SciPy {[j for j, r in enumerate(scipy_res) if r.pvalue < 0.05]}, "
          f"sketch (D_lo, BH) {[j for j, r in enumerate(sk) if r.details['p_adjusted'] < 0.05]}")


if __name__ == "__main__":
    main()
