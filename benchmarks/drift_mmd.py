"""MMD permutation test, ERT calibration and stream update cost, on one core.

``python -m benchmarks.drift_mmd`` prints markdown tables. BLAS threads are capped
at one and the process is pinned to one CPU before NumPy loads; time is the best of
``--repeat`` runs, peak memory comes from a separate run under ``tracemalloc``
(NumPy reports its buffers to it).
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS"):
    os.environ[_var] = "1"
if hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

import argparse  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402
from collections.abc import Callable  # noqa: E402

import numpy as np  # noqa: E402

from stethoscope.analytics.multivariate import MMD  # noqa: E402
from stethoscope.analytics.sequential import STREAM_REGISTRY, WindowedKS, WindowedMeanShift  # noqa: E402


def _best(fn: Callable[[], object], repeat: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def _peak_mib(fn: Callable[[], object]) -> float:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=5000, help="rows per sample")
    ap.add_argument("--d", type=int, default=32, help="columns")
    ap.add_argument("--permutations", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.n, args.d))
    y = rng.normal(size=(args.n, args.d))
    y[:, 0] += 0.1
    print(f"# one core ({platform.processor() or platform.machine()}), Python {platform.python_version()}, "
          f"NumPy {np.__version__}; data 2 x {args.n} x {args.d} float64 "
          f"({2 * x.nbytes / 2**20:.1f} MiB), shift 0.1 sd in one column\n")

    print("## MMD permutation test\n")
    print("| computation | rows per sample | permutations | time (s) | peak memory (MiB) | MMD^2 | p-value |")
    print("|---|---|---|---|---|---|---|")
    cases = [("rff", args.n, 512), ("rff", args.n, 1024), ("rff", args.n, 2048), ("exact", 1000, 1024)]
    for method, n, features in cases:
        xs, ys = x[:n], y[:n]
        det = MMD(method=method, n_permutations=args.permutations, n_features=features, seed=0)

        def run() -> object:
            return det.fit(xs).score(ys)

        seconds, result = _best(run, args.repeat)
        peak = _peak_mib(run)
        label = f"random features D={features}" if method == "rff" else "exact kernel"
        print(f"| {label} | {n} | {args.permutations} | {seconds:.3f} | {peak:.0f} | "
              f"{result.statistic:.5f} | {result.p_value:.4f} |")

    print("\n## ERT calibration (reference 5,000 values, window 50)\n")
    print("| test | target ERT | time (s) | threshold |")
    print("|---|---|---|---|")
    ref = rng.normal(size=5000)
    for cls in (WindowedMeanShift, WindowedKS):
        for ert in (1000, 10_000):
            seconds, det = _best(lambda: cls(ref, window=50, ert=ert, seed=0), args.repeat)
            print(f"| {cls.name} | {ert:,} | {seconds:.3f} | {det.threshold:.4f} |")

    print("\n## Stream updates (Python loop, 200,000 Gaussian values)\n")
    print("| detector | updates/s |")
    print("|---|---|")
    stream = rng.normal(size=200_000).tolist()
    for name, factory in STREAM_REGISTRY.items():
        det = factory(reference=ref) if name in ("mean_window", "ks_window") else factory()

        def feed() -> object:
            det.reset()
            for v in stream:
                det.update(v)
            return det

        seconds, _ = _best(feed, 1)
        print(f"| {name} | {len(stream) / seconds:,.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
