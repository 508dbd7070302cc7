"""Cost of the collector's cardinality limiter, beside the C decoder, on the ingest workload.

The same requests as ``benchmarks.ingest`` (10k gauge points, 500 series, 4 attributes
per point; a new node, so new series, in every request) go through
``CardinalityLimiter.apply`` (limit 2000: the first requests fill it, the later ones
overflow) and through the C decoding kernel alone.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from .workload import gauge_request


def run(requests_n: int = 20) -> dict:
    from stethoscope.exporters.cardinality import CardinalityLimiter
    from stethoscope.native import implementation

    requests = [gauge_request(seed=i) for i in range(requests_n)]
    points = 10_000 * requests_n
    limiter = CardinalityLimiter(2000)
    start = time.perf_counter()
    for body in requests:
        limiter.apply(body)
    limiter_s = time.perf_counter() - start
    encode = implementation("native").encode_metrics
    start = time.perf_counter()
    for body in requests:
        encode(body)
    decode_s = time.perf_counter() - start
    return {"points": points, "limiter_rate": points / limiter_s, "decode_rate": points / decode_s,
            "overflowed": limiter.overflowed_points, "series": limiter.series}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=20, help="requests of 10k points (default 20)")
    r = run(p.parse_args(argv).requests)
    print("| measurement | datapoints/s |\n|---|---:|")
    print(f"| cardinality limiter (Python, limit 2000) | {r['limiter_rate']:,.0f} |")
    print(f"| decode only, C kernel | {r['decode_rate']:,.0f} |")
    print(f"\nlimiter / decode = {r['limiter_rate'] / r['decode_rate']:.3f}; points folded {r['overflowed']:,} "
          f"of {r['points']:,}; series tracked {r['series']:,}")
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
