"""Where the collector's memory goes under sustained saturated load.

``up`` runs in this process (analytics, anomaly and alerts off, ``store.queue_max_rows``
4,000) with :mod:`tracemalloc` on, fed by the load benchmark's simulated agents in
child processes. After a warm-up, and again at the end, it records the process RSS,
the Python heap traced by tracemalloc and chDB's own memory tracker
(``MemoryTracking``), and lists the Python allocation sites that grew most between
the two. A Python-side leak (a queue, a per-request cache, a label set without a
bound) shows up as traced memory growing; chDB's caches and merges as
``MemoryTracking``; the rest of RSS is memory the allocators keep mapped.
"""

from __future__ import annotations

import argparse
import gc
import logging
import multiprocessing
import os
import tempfile
import time
import tracemalloc

from stethoscope._net import free_port

from .load import _agent_process, _rss_bytes


def run(agents: int = 40, warmup_s: float = 50.0, seconds: float = 150.0, top: int = 5) -> dict:
    from stethoscope.config import load_config
    from stethoscope.exporters.service import Service

    workdir = tempfile.mkdtemp(prefix="stethoscope-memory-")
    port, sql_port = free_port(), free_port()
    svc = Service(load_config(environ={}, overrides={
        "store.data_dir": os.path.join(workdir, "data"), "collector.otlp_http_port": port, "sql.port": sql_port,
        "store.queue_max_rows": 4000, "analytics.enabled": False, "alerts.enabled": False,
        "anomaly.enabled": False,
    }))
    logging.getLogger("stethoscope").setLevel(logging.ERROR)  # one warning per refused burst otherwise
    svc.start()
    tracemalloc.start(8)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    until = time.time() + warmup_s + seconds + 5
    processes = 4
    per = agents // processes
    workers = [ctx.Process(target=_agent_process, args=(port, k * per, per, 200, until, queue))
               for k in range(processes)]
    for w in workers:
        w.start()

    def sample() -> tuple[tracemalloc.Snapshot, dict]:
        gc.collect()
        tracked = svc.store.query("SELECT value FROM system.metrics WHERE metric = 'MemoryTracking'", "TabSeparated")
        return tracemalloc.take_snapshot(), {
            "rss": _rss_bytes(os.getpid()), "python": tracemalloc.get_traced_memory()[0],
            "chdb": int(float(tracked.data.strip() or 0)),
        }

    try:
        time.sleep(warmup_s)
        snap1, first = sample()
        time.sleep(seconds)
        snap2, last = sample()
        growth = [
            (stat.size_diff, stat.count_diff, stat.traceback.format()[-2:])
            for stat in snap2.compare_to(snap1, "traceback")[:top]
        ]
        tallies = [queue.get(timeout=120) for _ in workers]
    finally:
        for w in workers:
            w.join(30)
        tracemalloc.stop()
        svc.stop()
    return {"agents": agents, "warmup_s": warmup_s, "seconds": seconds, "first": first, "last": last,
            "growth": growth, "acknowledged_points": sum(t["points"] for t in tallies),
            "answers_503": sum(t["503"] for t in tallies)}


def report(r: dict) -> str:
    mib = 1024 * 1024
    f, lst = r["first"], r["last"]
    lines = [
        f"{r['agents']} agents, saturated (queue 4,000 rows); samples after {r['warmup_s']:.0f} s and "
        f"{r['seconds']:.0f} s later; {r['acknowledged_points']:,} points acknowledged, {r['answers_503']:,} answers 503",
        "",
        "| memory | after warm-up | at the end | change |",
        "|---|---:|---:|---:|",
    ]
    for key, label in (("rss", "process RSS"), ("python", "Python heap (tracemalloc)"),
                       ("chdb", "chDB MemoryTracking")):
        lines.append(f"| {label} | {f[key] / mib:.1f} MiB | {lst[key] / mib:.1f} MiB | "
                     f"{(lst[key] - f[key]) / mib:+.1f} MiB |")
    lines += ["", "Python allocation sites that grew most:"]
    for size, count, where in r["growth"]:
        lines.append(f"- {size / 1024:+.0f} KiB in {count:+d} blocks at {' / '.join(w.strip() for w in where)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--agents", type=int, default=40)
    p.add_argument("--warmup", type=float, default=50.0, help="seconds before the first sample")
    p.add_argument("--seconds", type=float, default=150.0, help="seconds between the two samples")
    args, _ = p.parse_known_args(argv)
    print(report(run(args.agents, args.warmup, args.seconds)))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
