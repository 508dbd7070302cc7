"""Run benchmarks by name: ``python -m benchmarks.run [ingest ...]`` (default: all)."""

from __future__ import annotations

import argparse
import importlib
import platform
import sys

BENCHMARKS = {
    "ingest": "benchmarks.ingest",
    "agent": "benchmarks.agent",
    "sdk": "benchmarks.sdk",
    "drift": "benchmarks.drift",
    "drift_mmd": "benchmarks.drift_mmd",
    "drift_pushdown": "benchmarks.drift_pushdown",
    "anomaly": "benchmarks.anomaly",
    "anomaly_fleet": "benchmarks.anomaly_fleet",
    "alerts": "benchmarks.alerts",
    "dashboards": "benchmarks.dashboards",
    "dashboards_other": "benchmarks.dashboards_other",
    "load": "benchmarks.load",
    "cardinality": "benchmarks.cardinality",
    "faults": "benchmarks.faults",
    "memory": "benchmarks.memory",
    "store_check": "benchmarks.store_check",
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("names", nargs="*", choices=[*BENCHMARKS, []], help="benchmarks to run")
    args, rest = p.parse_known_args(argv)
    import chdb

    import stethoscope

    print(f"# machine: {platform.machine()}, {platform.processor() or 'cpu'}, {len(__import__('os').sched_getaffinity(0))} cores; "
          f"Python {platform.python_version()}; stethoscope {stethoscope.__version__}; chDB {chdb.__version__} "
          f"(ClickHouse {chdb.engine_version})")
    for name in args.names or list(BENCHMARKS):
        print(f"\n## {name}\n")
        importlib.import_module(BENCHMARKS[name]).main(rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
