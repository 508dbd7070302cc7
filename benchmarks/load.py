"""Load and backpressure: many simulated agents posting OTLP to ``stethoscope up`` on loopback.

``up`` runs as its own process pinned to one core, with a small in-memory queue
(``store.queue_max_rows``) so that the agents can saturate it. The agents are threads
in a few processes pinned to the other core; each posts its own request (``--points``
data points) over a keep-alive connection as fast as it is answered, and on a 429 or
503 waits exactly the ``Retry-After`` the collector sends, as the real agent's sender
does. The run lasts ``--seconds``; ``up``'s resident memory is sampled every second.

Afterwards the stored row count is compared with the points the collector
acknowledged with a 200: they must be equal (nothing acknowledged is lost, nothing
refused is stored).
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from .ingest import CLIENT_CPU, _pin, start_up
from .workload import gauge_request


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _agent_process(port: int, first: int, count: int, points: int, until: float, out) -> None:
    _pin(CLIENT_CPU)
    lock = threading.Lock()
    tally = {"ok": 0, "points": 0, "503": 0, "429": 0, "other": 0, "errors": 0, "no_retry_after": 0, "waited_s": 0.0}

    def agent(i: int) -> None:
        body = gauge_request(points, max(1, points // 10), seed=i)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while time.time() < until:
            try:
                conn.request("POST", "/v1/metrics", body, {"Content-Type": "application/x-protobuf"})
                resp = conn.getresponse()
                resp.read()
            except (OSError, http.client.HTTPException):
                conn.close()
                with lock:
                    tally["errors"] += 1
                time.sleep(0.5)
                continue
            with lock:
                if resp.status == 200:
                    tally["ok"] += 1
                    tally["points"] += points
                elif resp.status in (429, 503):
                    tally[str(resp.status)] += 1
                else:
                    tally["other"] += 1
            if resp.status in (429, 503):
                header = resp.getheader("Retry-After")
                if header is None:
                    with lock:
                        tally["no_retry_after"] += 1
                wait = min(float(header or 1), max(0.0, until - time.time()))
                with lock:
                    tally["waited_s"] += wait
                time.sleep(wait)
        conn.close()

    threads = [threading.Thread(target=agent, args=(first + k,)) for k in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.put(tally)


def run(agents: int = 100, seconds: float = 60.0, points: int = 200, queue_max_rows: int = 20_000,
        processes: int = 4) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="stethoscope-load-"))
    env = {**os.environ, "STETHOSCOPE_STORE_QUEUE_MAX_ROWS": str(queue_max_rows),
           "STETHOSCOPE_ANALYTICS_ENABLED": "false", "STETHOSCOPE_ALERTS_ENABLED": "false"}
    proc, otlp, sql = start_up(workdir / "data", env, workdir / "up.log")
    try:
        rss = [(0.0, _rss_bytes(proc.pid))]
        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()
        start = time.time()
        until = start + seconds
        per = [agents // processes + (1 if k < agents % processes else 0) for k in range(processes)]
        workers, first = [], 0
        for count in per:
            w = ctx.Process(target=_agent_process, args=(otlp, first, count, points, until, queue))
            w.start()
            workers.append(w)
            first += count
        tracked = [(0.0, _chdb_tracked(sql))]
        while time.time() < until + 1:
            time.sleep(1.0)
            rss.append((time.time() - start, _rss_bytes(proc.pid)))
            if len(rss) % 5 == 0:
                tracked.append((time.time() - start, _chdb_tracked(sql)))
        tallies = [queue.get(timeout=120) for _ in workers]
        for w in workers:
            w.join(30)
        elapsed = time.time() - start
        total = {k: sum(t[k] for t in tallies) for k in tallies[0]}
        time.sleep(1.0)  # acknowledged means stored; this only lets the last answers settle
        q = urllib.request.Request(f"http://127.0.0.1:{sql}/", data=b"SELECT count() FROM otel_metrics_gauge")
        with urllib.request.urlopen(q, timeout=60) as resp:
            stored = int(resp.read())
        rss.append((time.time() - start, _rss_bytes(proc.pid)))
        tracked.append((time.time() - start, _chdb_tracked(sql)))
        primary_keys = _sql_int(sql, "SELECT sum(primary_key_bytes_in_memory) FROM system.parts WHERE active")
    finally:
        proc.terminate()
        proc.wait(60)
        shutil.rmtree(workdir, ignore_errors=True)
    tenth = max(1, len(rss) // 10)
    early = rss[1 : 1 + tenth] or rss[:1]
    late = rss[-tenth:]
    return {
        "agents": agents, "seconds": seconds, "points_per_request": points, "queue_max_rows": queue_max_rows,
        **total, "stored": stored, "elapsed": elapsed, "acked_rate": total["points"] / seconds,
        "requests_per_s": (total["ok"] + total["503"] + total["429"]) / seconds,
        "rss_start": rss[0][1], "rss_max": max(r for _, r in rss),
        "rss_early_mean": sum(r for _, r in early) / len(early), "rss_late_mean": sum(r for _, r in late) / len(late),
        "rss_samples": len(rss),
        "chdb_tracked_start": tracked[0][1], "chdb_tracked_end": tracked[-1][1],
        "chdb_tracked_max": max(t for _, t in tracked), "primary_key_bytes": primary_keys,
    }


def _sql_int(port: int, query: str) -> int:
    q = urllib.request.Request(f"http://127.0.0.1:{port}/", data=query.encode())
    try:
        with urllib.request.urlopen(q, timeout=30) as resp:
            return int(float(resp.read().strip() or 0))
    except (OSError, ValueError):
        return -1


def _chdb_tracked(port: int) -> int:
    """Bytes chDB's own memory tracker holds (``MemoryTracking``): caches, parts, queries."""
    return _sql_int(port, "SELECT value FROM system.metrics WHERE metric = 'MemoryTracking'")


def report(r: dict) -> str:
    mib = 1024 * 1024
    return "\n".join([
        "| measurement | value |",
        "|---|---:|",
        f"| simulated agents / run length | {r['agents']} / {r['seconds']:.0f} s |",
        f"| points per request / queue_max_rows | {r['points_per_request']} / {r['queue_max_rows']:,} |",
        f"| requests answered per second | {r['requests_per_s']:,.0f} |",
        f"| acknowledged (200) requests / points per second held | {r['ok']:,} / {r['acked_rate']:,.0f} |",
        f"| 503 answers / 429 answers / without Retry-After | {r['503']:,} / {r['429']:,} / {r['no_retry_after']} |",
        f"| other statuses / connection errors | {r['other']} / {r['errors']} |",
        f"| rows stored / points acknowledged | {r['stored']:,} / {r['points']:,} |",
        f"| up RSS: at start / mean of first 10% / mean of last 10% / max | {r['rss_start'] / mib:.0f} / "
        f"{r['rss_early_mean'] / mib:.0f} / {r['rss_late_mean'] / mib:.0f} / {r['rss_max'] / mib:.0f} MiB |",
        f"| chDB MemoryTracking: at start / at end / max (every 5 s) | {r['chdb_tracked_start'] / mib:.0f} / "
        f"{r['chdb_tracked_end'] / mib:.0f} / {r['chdb_tracked_max'] / mib:.0f} MiB |",
        f"| primary keys in memory at the end (system.parts) | {r['primary_key_bytes'] / mib:.1f} MiB |",
    ])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--agents", type=int, default=100, help="simulated agents (default 100)")
    p.add_argument("--seconds", type=float, default=60.0, help="run length (default 60)")
    p.add_argument("--points", type=int, default=200, help="data points per request (default 200)")
    p.add_argument("--queue-max-rows", type=int, default=20_000, help="up's store.queue_max_rows (default 20000)")
    p.add_argument("--processes", type=int, default=4, help="client processes the agents are spread over")
    args = p.parse_args(argv)
    r = run(args.agents, args.seconds, args.points, args.queue_max_rows, args.processes)
    print(report(r))
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
