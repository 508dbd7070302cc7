"""Cost of the chDB store's check for silently failed inserts (``system.errors`` after each insert).

``ChdbStore.insert`` reads the counters of the disk-write errors after every
insert, because chDB 4.4 reports an insert on a full disk as done. This times
inserts of the ingest workload's gauge rows (RowBinary from the C kernel) into
``otel_metrics_gauge``, in batches of 200 points (one small agent request) and of
10,000 points (a collector batch), with the check and with it skipped, rounds
alternating; it reports the median time per insert.

Run with ``python -m benchmarks.store_check``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time

from .workload import gauge_request


def run(inserts: int = 30) -> dict:
    from stethoscope.exporters.chdb_store import ChdbStore
    from stethoscope.exporters.otlp import MetricsDecoder

    decoder = MetricsDecoder("native")
    out: dict = {"inserts_per_case": inserts}
    with tempfile.TemporaryDirectory() as d:
        store = ChdbStore(d)
        try:
            store.ensure_schema()
            checked = store._check_written
            for points in (200, 10_000):
                parts, _ = decoder.decode(gauge_request(points=points, series=min(500, points), seed=points))
                (_table, rows, data), = parts
                times: dict[str, list[float]] = {"with check": [], "without check": []}
                for i in range(inserts):
                    for mode in ("with check", "without check") if i % 2 else ("without check", "with check"):
                        store._check_written = checked if mode == "with check" else (lambda: None)
                        start = time.perf_counter()
                        store.insert_raw("INSERT INTO otel_metrics_gauge", data, "RowBinary")
                        times[mode].append(time.perf_counter() - start)
                store._check_written = checked
                med = {k: statistics.median(v) for k, v in times.items()}
                out[str(points)] = {
                    "rows": rows,
                    "with_ms": med["with check"] * 1e3,
                    "without_ms": med["without check"] * 1e3,
                    "check_ms": (med["with check"] - med["without check"]) * 1e3,
                }
        finally:
            store.close()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--inserts", type=int, default=30, help="inserts per case and mode (default 30)")
    r = run(p.parse_args(argv).inserts)
    print("| points per insert | without check, ms | with check, ms | check, ms |")
    print("|---:|---:|---:|---:|")
    for points in ("200", "10000"):
        m = r[points]
        print(f"| {int(points):,} | {m['without_ms']:.2f} | {m['with_ms']:.2f} | {m['check_ms']:+.2f} |")
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
