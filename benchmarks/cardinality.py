"""Cost of the collector's cardinality limit: decoding with and without it, side by side.

The limit is applied inside the metrics encoder (``encode_metrics(body, state)``),
so the cost is the encoder's time with a ``CardinalityState`` against its time
without one, on the same requests, for the C kernel and for its Python twin:

* ``ingest``: the requests of ``benchmarks.ingest`` (10k gauge points, 500 series over
  25 metric names, 4 attributes per point; a new node in every request), limit 2000:
  every set is new to the limiter and kept, the hash table grows to 4,000 sets;
* ``flood``: 10k points of one metric, each with a fresh ``request.id`` attribute
  (the label flood the limit is for), limit 2000: after the first 1,999 sets every
  point is folded and its row rewritten with the overflow attribute.

Rounds alternate with and without the limit (a fresh state each round) so that a
shared machine's noise hits both alike. Times are the thread's CPU time
(``time.thread_time``), less disturbed by other processes than wall time; the
table gives the fastest round of each (the median is in the JSON line).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from .workload import gauge_request


def flood_request(seed: int, points: int = 10_000) -> bytes:
    """One request of ``points`` points of ``http.requests``, each with its own ``request.id``."""
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

    req = ExportMetricsServiceRequest()
    rm = req.resource_metrics.add()
    rm.resource.attributes.append(KeyValue(key="service.name", value=AnyValue(string_value="api")))
    m = rm.scope_metrics.add().metrics.add(name="http.requests", unit="1")
    m.sum.aggregation_temporality, m.sum.is_monotonic = 1, True
    for i in range(points):
        dp = m.sum.data_points.add(as_int=1, time_unix_nano=1_700_000_000_000_000_000 + i)
        dp.attributes.extend(
            [
                KeyValue(key="http.route", value=AnyValue(string_value="/v1/predict")),
                KeyValue(key="http.status_code", value=AnyValue(int_value=200)),
                KeyValue(key="request.id", value=AnyValue(string_value=f"req-{seed:04d}-{i:08d}-7f3a")),
            ]
        )
    return req.SerializeToString()


def _measure(module, requests: list[bytes], rounds: int, limit: int) -> dict:
    plain, limited = [], []
    folded = series = 0
    clock = time.thread_time
    for _ in range(rounds):
        start = clock()
        for body in requests:
            module.encode_metrics(body)
        plain.append(clock() - start)
        state = module.CardinalityState(limit, 1000, 0x5EED)
        start = clock()
        for body in requests:
            module.encode_metrics(body, state)
        limited.append(clock() - start)
        folded, _, series, _ = state.take()
    points = sum(sum(rows for rows, _ in module.encode_metrics(b).values()) for b in requests)
    p, q = min(plain), min(limited)
    return {
        "points": points,
        "plain_rate": points / p,
        "limited_rate": points / q,
        "cost": q / p - 1,
        "median_cost": statistics.median(limited) / statistics.median(plain) - 1,
        "folded": folded,
        "series": series,
    }


def run(requests_n: int = 20, rounds: int = 15, python_requests: int = 2, limit: int = 2000) -> dict:
    from stethoscope.native import implementation

    workloads = {
        "ingest": [gauge_request(seed=i) for i in range(requests_n)],
        "flood": [flood_request(seed=i) for i in range(requests_n)],
    }
    out: dict = {"limit": limit, "rounds": rounds}
    for name, reqs in workloads.items():
        out[name] = {
            "native": _measure(implementation("native"), reqs, rounds, limit),
            "python": _measure(implementation("python"), reqs[:python_requests], max(3, rounds // 2), limit),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=20, help="requests of 10k points per workload (default 20)")
    p.add_argument("--rounds", type=int, default=15, help="alternating rounds for the C kernel (default 15)")
    p.add_argument("--python-requests", type=int, default=2, help="requests for the slower Python twin (default 2)")
    args = p.parse_args(argv)
    r = run(args.requests, args.rounds, args.python_requests)
    print(f"| workload | encoder | points | without limit, points/s | with limit {r['limit']}, points/s "
          "| cost | folded | sets tracked |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name in ("ingest", "flood"):
        for impl in ("native", "python"):
            m = r[name][impl]
            print(f"| {name} | {'C kernel' if impl == 'native' else 'Python twin'} | {m['points']:,} "
                  f"| {m['plain_rate']:,.0f} | {m['limited_rate']:,.0f} | {m['cost']:+.1%} "
                  f"| {m['folded']:,} | {m['series']:,} |")
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
