"""In-process SDK cost per feature value, beside the OpenTelemetry SDK, prometheus_client and whylogs.

All in one process on the same data (1024 rows × 64 positive features, float64), pinned to one
core, best of several repeats (``--repeats``):

* ``ModelMonitor.record_batch`` on the 1024×64 array (sketch per feature, sampling);
* ``ModelMonitor.record`` of one 64-feature row with prediction, confidence, latency and a
  request id (array and list features), and with features and prediction only; per call
  and per value, and against 64 calls of each peer (one row's worth);
* OpenTelemetry SDK ``Histogram.record`` of each value (one attribute: the feature),
  with the default explicit buckets and with the exponential aggregation;
* prometheus_client ``Histogram.observe`` of each value (a labelled child per feature);
* whylogs ``why.log(DataFrame)`` of the same batch (skipped if whylogs is not installed:
  ``pip install 'stethoscope[bench]'``).

Exporters are in-memory: this measures the caller's cost, not the network.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

N, D = 1024, 64


def _best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def run(repeats: int = 7) -> dict:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {0})
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.metrics.view import ExponentialBucketHistogramAggregation, View
    from prometheus_client import CollectorRegistry, Histogram

    from stethoscope.agents.sdk import ModelMonitor
    from stethoscope.agents.sdk.memory import InMemoryExporter

    rng = np.random.default_rng(0)
    x = rng.lognormal(size=(N, D))  # positive: OpenTelemetry histograms refuse negative values
    preds = rng.random(N)
    conf = rng.random(N)
    out: dict = {"rows": N, "features": D}

    from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter

    # default sampling (1% of rows kept at first): the kept rows' cost is part of record()
    mon = ModelMonitor("bench", "1", feature_names=D, start=False, metric_exporter=InMemoryExporter(),
                       log_exporter=InMemoryLogRecordExporter(), seed=1)
    try:
        mon.record_batch(x, preds, confidences=conf)  # warm-up: first-batch allocation
        t = _best(lambda: mon.record_batch(x, preds, confidences=conf), repeats)
        out["record_batch_ns_per_value"] = t / (N * D) * 1e9
        rows = [x[i] for i in range(256)]
        lists = [row.tolist() for row in rows]
        p, c = preds[:256].tolist(), conf[:256].tolist()
        lat = (rng.random(256) * 20.0).tolist()
        rids = [f"request-{i:08d}" for i in range(256)]

        def singles() -> None:  # the whole signature, as a model server calls it
            for i, row in enumerate(rows):
                mon.record(row, p[i], c[i], lat[i], rids[i])

        def singles_list() -> None:
            for i, row in enumerate(lists):
                mon.record(row, p[i], c[i], lat[i], rids[i])

        def singles_bare() -> None:  # features and prediction only (no id: the SDK draws the randomness)
            for i, row in enumerate(rows):
                mon.record(row, p[i])

        t = _best(singles, repeats)
        out["record_us_per_call"] = t / len(rows) * 1e6
        out["record_ns_per_value"] = t / (len(rows) * D) * 1e9
        out["record_list_us_per_call"] = _best(singles_list, repeats) / len(rows) * 1e6
        out["record_bare_us_per_call"] = _best(singles_bare, repeats) / len(rows) * 1e6
        # the kernel call alone (what record() wraps): fresh states, same rows and arguments
        from stethoscope.agents.sdk.sketch import sketch_kernels
        from stethoscope.native.sketch import _threshold_of

        k = sketch_kernels()
        fs, os_, stats = k.state_type(D), k.state_type(2), k.row_stats(mon._bounds, seed=1)
        rr, blk, thr = k.record_row, stats.block, _threshold_of(0.01)

        def kernel_only() -> None:
            for i, row in enumerate(rows):
                rr(row, fs, p[i], c[i], lat[i], rids[i], os_, blk, 0.01, thr)

        out["record_row_kernel_us_per_call"] = _best(kernel_only, repeats) / len(rows) * 1e6
        out["dropped"] = dict(mon.dropped)
        out["sampled_share"] = mon.sampler.stream("default").rule[0]
    finally:
        mon.close()

    def otel(aggregation) -> float:
        views = [View(instrument_name="*", aggregation=aggregation)] if aggregation else []
        provider = MeterProvider(metric_readers=[InMemoryMetricReader()], views=views)
        hist = provider.get_meter("bench").create_histogram("feature")
        attrs = [{"feature": f"f{j}"} for j in range(D)]
        rows = x[:64].tolist()

        def rec() -> None:
            for row in rows:
                for j, v in enumerate(row):
                    hist.record(v, attrs[j])

        try:
            rec()
            return _best(rec, repeats) / (64 * D) * 1e9
        finally:
            provider.shutdown()

    out["otel_explicit_ns_per_value"] = otel(None)
    out["otel_exponential_ns_per_value"] = otel(ExponentialBucketHistogramAggregation(max_size=160, max_scale=20))

    registry = CollectorRegistry()
    prom = Histogram("feature", "feature values", ["feature"], registry=registry)
    children = [prom.labels(feature=f"f{j}") for j in range(D)]
    rows = x[:256].tolist()

    def observe() -> None:
        for row in rows:
            for j, v in enumerate(row):
                children[j].observe(v)

    out["prometheus_client_ns_per_value"] = _best(observe, repeats) / (256 * D) * 1e9

    try:
        import pandas as pd
        import whylogs as why
    except ImportError:
        out["whylogs_ns_per_value"] = None
    else:
        frame = pd.DataFrame(x, columns=[f"f{j}" for j in range(D)])
        why.log(frame)
        out["whylogs_ns_per_value"] = _best(lambda: why.log(frame), max(2, repeats // 2)) / (N * D) * 1e9
        out["whylogs_version"] = why.__version__
    # Overhead of one record() per request against a 1 ms inference at 1,000 requests/s.
    out["overhead_share_of_1ms_inference"] = out["record_us_per_call"] / 1000.0
    # One 64-feature row through each peer: 64 histogram calls.
    out["otel_explicit_us_per_row"] = out["otel_explicit_ns_per_value"] * D / 1000.0
    out["otel_exponential_us_per_row"] = out["otel_exponential_ns_per_value"] * D / 1000.0
    out["prometheus_client_us_per_row"] = out["prometheus_client_ns_per_value"] * D / 1000.0
    return out


def report(r: dict) -> str:
    rows = [
        ("ModelMonitor.record_batch, 1024×64", r["record_batch_ns_per_value"]),
        ("ModelMonitor.record, one 64-feature row", r["record_ns_per_value"]),
        ("OpenTelemetry SDK Histogram.record, explicit buckets", r["otel_explicit_ns_per_value"]),
        ("OpenTelemetry SDK Histogram.record, exponential", r["otel_exponential_ns_per_value"]),
        ("prometheus_client Histogram.observe", r["prometheus_client_ns_per_value"]),
    ]
    if r.get("whylogs_ns_per_value") is not None:
        rows.append((f"whylogs {r['whylogs_version']} why.log(DataFrame), 1024×64", r["whylogs_ns_per_value"]))
    lines = ["| per feature value | ns | vs record_batch |", "|---|---:|---:|"]
    base = r["record_batch_ns_per_value"]
    lines += [f"| {name} | {ns:,.1f} | {ns / base:,.0f}× |" for name, ns in rows]
    lines += ["", f"record() per call: {r['record_us_per_call']:.2f} µs; that is "
              f"{r['overhead_share_of_1ms_inference'] * 100:.2f}% of a 1 ms inference at 1,000 requests/s"]
    one = r["record_us_per_call"]
    lines += ["", "| one 64-feature row | µs | vs record() |", "|---|---:|---:|",
              f"| ModelMonitor.record(array, prediction, confidence, latency_ms, request_id) | {one:.2f} | 1× |",
              f"| same, features as a list | {r['record_list_us_per_call']:.2f} | "
              f"{r['record_list_us_per_call'] / one:.2f}× |",
              f"| ModelMonitor.record(array, prediction) | {r['record_bare_us_per_call']:.2f} | "
              f"{r['record_bare_us_per_call'] / one:.2f}× |",
              f"| the record_row kernel call alone (full arguments) | {r['record_row_kernel_us_per_call']:.2f} | "
              f"{r['record_row_kernel_us_per_call'] / one:.2f}× |"]
    for name, key in (("OpenTelemetry SDK Histogram.record ×64, explicit", "otel_explicit_us_per_row"),
                      ("OpenTelemetry SDK Histogram.record ×64, exponential", "otel_exponential_us_per_row"),
                      ("prometheus_client Histogram.observe ×64", "prometheus_client_us_per_row")):
        lines.append(f"| {name} | {r[key]:,.1f} | {r[key] / one:,.0f}× |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    r = run(args.repeats)
    print(report(r))
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
