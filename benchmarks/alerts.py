"""Alert latency: from an incident reaching the store to the signed webhook receiving the alert.

A real ``stethoscope up`` (in this process, chDB store, default ``[alerts]`` settings
apart from the webhook URL) and a local receiver that checks every signature. Each
incident is made by an *incident source* (:data:`SOURCES`); the clock starts just
before the source acts and stops when the receiver has the alert for that incident's
subject. Incidents are spaced by a random 0.3 to 1.3 s (0 to 30 s for the peer), so
they land at every phase of the runner's poll (or full run).

Sources:

* ``telemetry``: a real ``TrainingMonitor`` reports five steps and then a NaN loss to
  the OTLP endpoint; the clock starts when the request leaves. This is the issue's
  measure: telemetry reaching the collector -> the anomaly scheduler's training watch
  -> a ``training_nan`` finding -> the alert runner (woken by the scheduler) -> webhook.
* ``finding`` (the default): a ``training_nan`` finding row is written to ``findings``
  with :class:`~stethoscope.analytics.findings.FindingsWriter`, as a detector would.
  This measures finding-written -> webhook-received; it does **not** include the
  time the anomaly detectors take to turn telemetry into a finding.
* ``finding+wake``: the same, then :meth:`AlertRunner.wake` is called, as the anomaly
  scheduler's ``on_findings`` callback does once ``up`` wires it.

To measure telemetry -> webhook, add a source whose ``trigger`` sends the telemetry
(e.g. a NaN loss through a real ``TrainingMonitor`` to the service's OTLP endpoint)
and returns the subject the detector will put on the finding; everything else
(service, receiver, timing, percentiles) stays as it is.

Peer, in the same run: the runner as it was before the poll tick (``alerts.poll_interval
= 0``: new findings wait for the 30 s full run), over fewer incidents since each
takes up to 30 s.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from stethoscope._net import free_port

SECRET = "benchmark-webhook-secret"


class _Receiver:
    """Loopback webhook receiver: verifies the signature, records (subject, arrival time)."""

    def __init__(self) -> None:
        from stethoscope.alerts.signing import verify

        self.arrived: dict[str, float] = {}
        self.bad = 0
        self.cond = threading.Condition()
        rec = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                t = time.time()
                try:
                    verify(SECRET, dict(self.headers), body, t)
                    msg = json.loads(body)
                except Exception:  # noqa: BLE001 - any bad delivery is counted and reported
                    rec.bad += 1
                    self.send_response(401)
                else:
                    with rec.cond:
                        rec.arrived.setdefault(msg["subject"], t)
                        rec.cond.notify_all()
                    self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def wait(self, subject: str, timeout: float) -> float | None:
        with self.cond:
            self.cond.wait_for(lambda: subject in self.arrived, timeout)
            return self.arrived.get(subject)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _finding_source(svc: Any, i: int, wake: bool) -> tuple[float, str]:
    from stethoscope.analytics.findings import Finding, FindingsWriter

    subject = f"job=bench{i} rank=0 node=n1 gpu=0"
    t0 = time.time()
    FindingsWriter(svc.store).write([Finding(time=t0, kind="training_nan", subject=subject, severity="critical",
                                             details={"value": "loss"})])
    if wake:
        svc.alerts.wake()
    return t0, subject


def _telemetry_source(svc: Any, i: int) -> tuple[float, str]:
    """A NaN loss from a real TrainingMonitor: the clock starts when the OTLP request leaves."""
    from stethoscope.agents.sdk import TrainingMonitor

    job = f"bench{i}"
    tm = TrainingMonitor(job, rank=0, world_size=1, node="n1", gpu=0, start=False, environ={},
                         endpoint=f"http://127.0.0.1:{svc.otlp.port}")
    try:
        for k in range(5):
            tm.step(loss=2.0 - 0.01 * k, grad_norm=1.0, step_time=0.5, data_wait=0.01)
        tm.step(loss=float("nan"), grad_norm=1.0, step_time=0.5, data_wait=0.01)
        t0 = time.time()
        tm.flush()
    finally:
        tm.close()
    return t0, f"job={job}"  # a NaN is a job event: one finding for the job


#: name -> trigger(service, incident number) -> (start time, subject of the expected alert)
SOURCES: dict[str, Callable[[Any, int], tuple[float, str]]] = {
    "telemetry": _telemetry_source,
    "finding": lambda svc, i: _finding_source(svc, i, wake=False),
    "finding+wake": lambda svc, i: _finding_source(svc, i, wake=True),
}


def measure(source: str, incidents: int, settings: dict[str, Any] | None = None, seed: int = 1,
            gap: tuple[float, float] = (0.3, 1.3)) -> dict[str, Any]:
    """Latencies (s) of ``incidents`` incidents from ``source`` against a fresh ``up``."""
    from stethoscope.exporters.service import Service

    from stethoscope.config import load_config

    rec = _Receiver()
    os.environ["STETHOSCOPE_WEBHOOK_SECRET"] = SECRET
    with tempfile.TemporaryDirectory() as d:
        overrides = {"store.data_dir": str(Path(d) / "data"), "collector.otlp_http_port": free_port(),
                     "sql.port": free_port(), "alerts.webhook_url": rec.url, **(settings or {})}
        svc = Service(load_config(environ={}, overrides=overrides))
        svc.start()
        rng = random.Random(seed)
        lat: list[float] = []
        missed = 0
        try:
            time.sleep(1.0)  # let the runner load its (empty) state
            for i in range(incidents):
                time.sleep(rng.uniform(*gap))
                t0, subject = SOURCES[source](svc, i)
                t1 = rec.wait(subject, timeout=90.0)
                if t1 is None:
                    missed += 1
                else:
                    lat.append(t1 - t0)
        finally:
            svc.stop()
            rec.close()
    return {"source": source, "settings": settings or {}, "n": len(lat), "missed": missed, "bad_signatures": rec.bad,
            "latencies": lat}


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="benchmarks.alerts", description=__doc__.split("\n")[0])
    p.add_argument("--incidents", type=int, default=20)
    p.add_argument("--peer-incidents", type=int, default=5, help="incidents for the 30 s full-run-only peer (0: skip)")
    args, _ = p.parse_known_args(argv)
    runs = [measure("telemetry", args.incidents, seed=4), measure("finding", args.incidents),
            measure("finding+wake", args.incidents, seed=2)]
    if args.peer_incidents > 0:
        # spaced over a whole interval, so incidents land at every phase of the 30 s run
        runs.append(measure("finding", args.peer_incidents, {"alerts.poll_interval": "0s"}, seed=3, gap=(0.0, 30.0)))
    base = None
    print("| source | settings | incidents | p50 (s) | p95 (s) | max (s) | missed |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in runs:
        xs = r["latencies"]
        p50, p95 = _pct(xs, 0.5), _pct(xs, 0.95)
        base = p95 if base is None else base
        setting = ", ".join(f"{k} = {v}" for k, v in r["settings"].items()) or "defaults"
        print(f"| {r['source']} | {setting} | {r['n']} | {p50:.3f} | {p95:.3f} | {max(xs, default=float('nan')):.3f} "
              f"| {r['missed']} |")
        if r["bad_signatures"]:
            print(f"  ({r['bad_signatures']} deliveries failed signature verification)")
    base = _pct(runs[1]["latencies"], 0.95)  # finding -> webhook, the peer's own path
    if len(runs) == 4 and runs[3]["latencies"]:
        print(f"\np95 of the defaults vs the full-run-only peer: {_pct(runs[3]['latencies'], 0.95) / base:.0f}x lower")
    print(f"\nall latencies (s): {json.dumps({r['source'] + (' peer' if r['settings'] else ''): [round(x, 3) for x in r['latencies']] for r in runs})}")


if __name__ == "__main__":
    main()
