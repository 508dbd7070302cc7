"""OTLP ingest throughput end to end, beside the raw chDB insert rate of the same rows.

Three measurements in one run, each on the same pre-built requests (10k data points
each, 500 series of 20 points, 4 attributes per point):

* ``decode``: OTLP protobuf to RowBinary alone, the C kernel and its Python twin;
* ``chdb_raw``: those rows inserted straight into chDB (``send_insert`` RowBinary,
  one insert per request), in a process pinned to one core;
* ``e2e``: ``stethoscope up`` pinned to one core, fed over HTTP by concurrent
  clients on the other core; counted from the first request to the last answer,
  and checked against the row count in the store afterwards. Run twice: with the
  ingest journal (the default, every batch written and fsynced before its insert)
  and without it (``store.journal = false``), to show what exactly-once costs.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from stethoscope._net import free_port

from .workload import gauge_request

SERVER_CPU, CLIENT_CPU = 0, 1



def _pin(cpu: int) -> None:
    if hasattr(os, "sched_setaffinity") and cpu < os.cpu_count():
        os.sched_setaffinity(0, {cpu})


def _decode_rate(requests: list[bytes], impl: str) -> float:
    from stethoscope.native import implementation

    encode = implementation(impl).encode_metrics
    points = 0
    start = time.perf_counter()
    for body in requests:
        points += sum(rows for rows, _ in encode(body).values())
    return points / (time.perf_counter() - start)


def _raw_chdb(workdir: Path, requests: list[bytes]) -> dict:
    """Child process: insert the decoded rows straight into chDB, one insert per request."""
    _pin(SERVER_CPU)
    from stethoscope.exporters.chdb_store import ChdbStore
    from stethoscope.exporters.schema import METRIC_TABLES
    from stethoscope.native import implementation

    encode = implementation("native").encode_metrics
    batches = []
    for body in requests:  # decoding is not part of the raw rate
        for kind, (rows, data) in encode(body).items():
            batches.append((METRIC_TABLES[kind], rows, data))
    store = ChdbStore(workdir / "raw")
    store.ensure_schema()
    conn = store._rw  # straight to chDB: no batching, no HTTP, no Store wrapper
    points = 0
    start = time.perf_counter()
    for i, (table, rows, data) in enumerate(batches):
        cols = ", ".join(f"`{c}`" for c in table.column_names)
        ins = conn.send_insert(
            f"INSERT INTO stethoscope.{table.name} ({cols}) SETTINGS insert_deduplication_token = 'raw-{i}'", "RowBinary"
        )
        ins.append(data)
        ins.finish()
        points += rows
    elapsed = time.perf_counter() - start
    stored = int(store.query("SELECT count() FROM otel_metrics_gauge", "TabSeparated").data)
    # The floor under any ingest path: chDB parsing the same RowBinary into a Null table.
    store.execute("CREATE TABLE stethoscope.gauge_null AS stethoscope.otel_metrics_gauge ENGINE = Null")
    cols = ", ".join(f"`{c}`" for c in METRIC_TABLES["gauge"].column_names)
    start = time.perf_counter()
    for _, _, data in batches:
        ins = conn.send_insert(f"INSERT INTO stethoscope.gauge_null ({cols})", "RowBinary")
        ins.append(data)
        ins.finish()
    parse_only = points / (time.perf_counter() - start)
    store.close()
    return {"points": points, "seconds": elapsed, "rate": points / elapsed, "stored": stored,
            "parse_only_rate": parse_only}


def start_up(data_dir: Path, env: dict[str, str], log_path: Path) -> tuple[subprocess.Popen, int, int]:
    """``stethoscope up`` pinned to the server core, logging to a file (a full pipe would stall
    its logging); waits for ``/healthz``. Returns the process and its OTLP and SQL ports."""
    otlp, sql = free_port(), free_port()
    cmd = [sys.executable, "-m", "stethoscope", "up", "--data-dir", str(data_dir),
           "--otlp-http-port", str(otlp), "--sql-port", str(sql), "--log-level", "WARNING"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, env=env,
                                preexec_fn=lambda: _pin(SERVER_CPU))
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{otlp}/healthz", timeout=2):
                return proc, otlp, sql
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("up did not start: " + log_path.read_text()) from None
            time.sleep(0.2)


def _e2e(workdir: Path, requests: list[bytes], clients: int, journal: bool = True) -> dict:
    name = "e2e" if journal else "e2e-nojournal"
    env = {**os.environ, "STETHOSCOPE_STORE_JOURNAL": "true" if journal else "false"}
    proc, otlp, sql = start_up(workdir / name, env, workdir / f"{name}.log")
    try:
        _pin(CLIENT_CPU)
        queue = list(enumerate(requests))
        lock = threading.Lock()
        failures: list[str] = []

        def client() -> None:
            conn = http.client.HTTPConnection("127.0.0.1", otlp, timeout=120)
            while True:
                with lock:
                    if not queue:
                        break
                    _, body = queue.pop()
                conn.request("POST", "/v1/metrics", body, {"Content-Type": "application/x-protobuf"})
                resp = conn.getresponse()
                resp.read()
                if resp.status != 200:
                    failures.append(f"HTTP {resp.status}")
            conn.close()

        threads = [threading.Thread(target=client) for _ in range(clients)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - start
        q = urllib.request.Request(f"http://127.0.0.1:{sql}/", data=b"SELECT count() FROM otel_metrics_gauge")
        with urllib.request.urlopen(q, timeout=60) as resp:
            stored = int(resp.read())
    finally:
        proc.terminate()
        proc.wait(60)
    points = 10_000 * len(requests)
    return {"points": points, "seconds": elapsed, "rate": points / elapsed, "stored": stored,
            "failures": len(failures), "clients": clients}


def run(requests_n: int = 40, clients: int = 4) -> dict:
    requests = [gauge_request(seed=i) for i in range(requests_n)]
    out: dict = {"requests": requests_n, "points_per_request": 10_000}
    out["decode_native"] = _decode_rate(requests, "native")
    out["decode_python"] = _decode_rate(requests[: max(2, requests_n // 10)], "python")
    workdir = Path(tempfile.mkdtemp(prefix="stethoscope-bench-"))
    try:
        raw = subprocess.run([sys.executable, "-m", "benchmarks.ingest", "--raw-child", str(workdir),
                              "--requests", str(requests_n)], capture_output=True, text=True, check=True)
        out["chdb_raw"] = json.loads(raw.stdout.strip().splitlines()[-1])
        out["e2e_nojournal"] = _e2e(workdir, requests, clients, journal=False)
        out["e2e"] = _e2e(workdir, requests, clients)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    out["ratio_e2e_to_raw"] = out["e2e"]["rate"] / out["chdb_raw"]["rate"]
    out["ratio_journal"] = out["e2e"]["rate"] / out["e2e_nojournal"]["rate"]
    return out


def report(r: dict) -> str:
    return "\n".join([
        "| measurement | datapoints/s |",
        "|---|---:|",
        f"| decode only, C kernel | {r['decode_native']:,.0f} |",
        f"| decode only, Python twin | {r['decode_python']:,.0f} |",
        f"| chDB parsing the same RowBinary into a Null table (1 core) | {r['chdb_raw']['parse_only_rate']:,.0f} |",
        f"| chDB raw insert of the same rows (1 core) | {r['chdb_raw']['rate']:,.0f} |",
        f"| end to end: OTLP/HTTP -> up -> chDB (up on 1 core, {r['e2e']['clients']} clients), journal | {r['e2e']['rate']:,.0f} |",
        f"| same, without the journal (`store.journal = false`) | {r['e2e_nojournal']['rate']:,.0f} |",
        "",
        f"with journal / without = {r['ratio_journal']:.2f}",
        f"end to end / raw chDB = {r['ratio_e2e_to_raw']:.2f}; rows stored {r['e2e']['stored']:,} of "
        f"{r['e2e']['points']:,}; failed requests {r['e2e']['failures']}",
    ])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=40, help="requests of 10k points (default 40)")
    p.add_argument("--clients", type=int, default=4, help="concurrent HTTP clients (default 4)")
    p.add_argument("--raw-child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.raw_child:
        requests = [gauge_request(seed=i) for i in range(args.requests)]
        print(json.dumps(_raw_chdb(Path(args.raw_child), requests)))
        return 0
    r = run(args.requests, args.clients)
    print(report(r))
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
