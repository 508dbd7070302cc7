"""``stethoscope demo``: a simulated fleet with one of each incident, watched end to end by a real ``up``.

What runs, all in this process and all real except the numbers the simulators make up:

* ``up`` (collector, embedded chDB store, drift and anomaly analytics, alert runner)
  on free loopback ports and a temporary data directory;
* 4 nodes x 8 simulated H100s, each node a real node agent (``simulate`` collector)
  sending OTLP every 2 s;
* a 32-rank training job, one :class:`~stethoscope.agents.sdk.TrainingMonitor` per rank;
* two served models with two replicas each, one ``ModelMonitor`` per replica;
* a local webhook sink that verifies each alert's HMAC signature and records when
  it arrived.

Incidents are injected on a fixed timeline (simulated seconds; ``--speedup`` runs the
simulated clock faster): a slow rank, a loss spike, an input-pipeline stall, a GPU
memory leak, a thermal throttle, an XID, feature drift on one model, a latency
regression and a cost spike. At the end a table lists each incident, whether an
alert for it reached the webhook, after how long, the alert and the remediation
decision; alerts that match no incident are listed as false alarms. The HTML report
is written next to the summary (``--out``). The exit status is 0 only when every
incident was detected and no alert fired without one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TextIO

__all__ = ["DemoResult", "Injected", "WebhookSink", "run_demo", "scenario"]

log = logging.getLogger(__name__)

SECRET_ENV = "STETHOSCOPE_DEMO_WEBHOOK_SECRET"


# -- the webhook sink --------------------------------------------------------------------


@dataclass(frozen=True)
class Received:
    """One verified webhook delivery: when it arrived (epoch s) and its JSON body."""

    at: float
    body: Mapping[str, Any]


class WebhookSink:
    """A loopback HTTP server that accepts only correctly signed, fresh, never-seen webhook bodies."""

    def __init__(self, secret: str) -> None:
        from stethoscope.alerts.signing import ReplayCache, SignatureError, verify

        self.secret = secret
        self.received: list[Received] = []
        self.rejected: list[str] = []
        self._lock = threading.Lock()
        seen = ReplayCache()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    verify(sink.secret, dict(self.headers.items()), body, time.time(), seen=seen)
                    doc = json.loads(body)
                except (SignatureError, ValueError) as exc:
                    with sink._lock:
                        sink.rejected.append(str(exc))
                    self.send_response(401)
                    self.end_headers()
                    return
                with sink._lock:
                    sink.received.append(Received(time.time(), doc))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="demo-webhook-sink", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/alerts"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def alerts(self) -> list[Received]:
        with self._lock:
            return list(self.received)


# -- the scenario ------------------------------------------------------------------------


@dataclass(frozen=True)
class Injected:
    """One incident of the demo and how to recognise its alert.

    An alert detects it when the alert's finding kind is in ``kinds`` and its
    subject contains every part of ``subject`` (``node=node-2 gpu=5``), and it
    fired after ``at_s`` (simulated).
    """

    key: str
    title: str
    at_s: float
    kinds: tuple[str, ...]
    subject: tuple[str, ...]


@dataclass
class Scenario:
    nodes: dict[str, list[Any]]  # node name -> simulated GPU incidents
    job: Any
    services: list[Any]
    injected: list[Injected]
    extra_nodes: dict[str, float] = field(default_factory=dict)  # node -> simulated start time (cost spike)


def scenario(seed: int = 0) -> Scenario:
    """The demo's fleet and its incidents, at speed-up 1 (times in simulated seconds)."""
    from stethoscope.agents.gpu.simulate import MemoryLeak, ThermalThrottle, Xid
    from stethoscope.agents.sdk.simulate import (
        FeatureShift,
        InputStall,
        LatencyRegression,
        LossSpike,
        SimulatedModelService,
        SimulatedTrainingJob,
        SlowRank,
    )

    gib = 1 << 30
    nodes = {f"node-{i}": [] for i in range(4)}
    nodes["node-2"].append(MemoryLeak(gpu=5, start_s=20, bytes_per_s=0.02 * gib))
    nodes["node-1"].append(ThermalThrottle(gpu=3, start_s=70, duration_s=600))
    nodes["node-3"].append(Xid(gpu=0, at_s=95, code=79))
    job = SimulatedTrainingJob("llm-pretrain", world_size=32, gpus_per_node=8, step_s=0.5, seed=seed, incidents=[
        SlowRank(rank=13, start_s=60, factor=1.15),
        LossSpike(at_s=85, factor=3.0, steps=2),
        InputStall(start_s=110, duration_s=60, data_wait_s=0.8),
    ], node_names=list(nodes))
    fraud = SimulatedModelService("fraud", "3", replicas=2, rps=40, d=8, latency_ms=30, seed=seed + 10,
                                  incidents=[FeatureShift(start_s=80, feature=2, shift=1.0)])
    ranker = SimulatedModelService("ranker", "1", replicas=2, rps=40, d=8, latency_ms=45, seed=seed + 20,
                                   incidents=[LatencyRegression(start_s=120, factor=8.0)])
    injected = [
        Injected("slow_rank", "Slow rank: rank 13 on node-1 GPU 5, 15% slower", 60, ("straggler_rank",),
                 ("rank=13",)),
        Injected("loss_spike", "Loss spike: 3x for 2 steps", 85, ("loss_spike", "gradient_explosion"),
                 ("job=llm-pretrain",)),
        Injected("input_stall", "Input-pipeline stall: 0.8 s data wait per step", 110,
                 ("input_bound", "throughput_regression"), ("job=llm-pretrain",)),
        Injected("memory_leak", "GPU memory leak: node-2 GPU 5, 20 MiB/s", 20, ("memory_leak_forecast",),
                 ("node=node-2", "gpu=5")),
        Injected("thermal_throttle", "Thermal throttle: node-1 GPU 3 above 85 C", 70,
                 ("gpu_temperature", "gpu_throttle"), ("node=node-1", "gpu=3")),
        Injected("xid", "XID 79 (GPU fell off the bus): node-3 GPU 0", 95,
                 ("gpu_xid", "node_unhealthy"), ("node=node-3",)),
        Injected("feature_drift", "Feature drift: fraud v3 feature x2 shifted by 1 sd", 80,
                 ("feature_drift", "dataset_drift", "prediction_drift"), ("model=fraud",)),
        Injected("latency", "Latency regression: ranker 8x slower", 120, ("latency_sla",), ("model=ranker",)),
        Injected("cost_spike", "Cost spike: 3 more nodes (24 GPUs) join the cluster", 150,
                 ("cost_spike", "idle_gpu_cost"), ("cluster=",)),
    ]
    extra = {f"node-{i}": 150.0 for i in range(4, 7)}
    return Scenario(nodes=nodes, job=job, services=[fraud, ranker], injected=injected, extra_nodes=extra)


# -- the run -----------------------------------------------------------------------------


@dataclass
class Outcome:
    incident: Injected
    detected: bool
    after_s: float | None
    alert: str
    action: str


@dataclass
class DemoResult:
    outcomes: list[Outcome]
    false_alarms: list[Mapping[str, Any]]
    report_path: Path | None
    summary_path: Path | None

    @property
    def ok(self) -> bool:
        return all(o.detected for o in self.outcomes) and not self.false_alarms


def _alert_kind(body: Mapping[str, Any], rule_kinds: Mapping[str, tuple[str, ...]]) -> tuple[str, ...]:
    return rule_kinds.get(str(body.get("rule", "")), ())


def match_alerts(injected: Sequence[Injected], alerts: Sequence[Received], rule_kinds: Mapping[str, tuple[str, ...]],
                 started_at: Mapping[str, float]) -> tuple[dict[str, Received], list[Mapping[str, Any]]]:
    """First firing alert per incident, and the firing alerts that match none."""
    first: dict[str, Received] = {}
    unmatched: list[Mapping[str, Any]] = []
    for rec in sorted(alerts, key=lambda r: r.at):
        body = rec.body
        if body.get("status") != "firing":
            continue
        kinds = _alert_kind(body, rule_kinds)
        text = " ".join([str(body.get("subject", ""))] + [f"{k}={v}" for k, v in dict(body.get("labels") or {}).items()])
        hits = [inc for inc in injected if set(kinds) & set(inc.kinds) and all(p in text for p in inc.subject)
                and inc.key in started_at and rec.at >= started_at[inc.key] - 1.0]
        if not hits:
            unmatched.append(body)
        for inc in hits:
            first.setdefault(inc.key, rec)
    return first, unmatched


def _print_table(rows: Sequence[Sequence[str]], out: TextIO) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for j, r in enumerate(rows):
        out.write("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() + "\n")
        if j == 0:
            out.write("  ".join("-" * w for w in widths) + "\n")


def run_demo(*, duration_s: float = 420.0, speedup: float = 1.0, out_dir: str | os.PathLike[str] = ".",
             data_dir: str | os.PathLike[str] | None = None, progress: TextIO = sys.stdout,
             seed: int = 0) -> DemoResult:
    """Run the demo for ``duration_s`` wall seconds; see the module docstring."""
    from stethoscope.agents.daemon import Agent
    from stethoscope.agents.gpu.simulate import SimulatedGpuCollector
    from stethoscope.agents.resource import build_resource
    from stethoscope.agents.sdk import ModelMonitor, TrainingMonitor
    from stethoscope.agents.sdk.simulate import SimClock
    from stethoscope.alerts.rules import load_rules
    from stethoscope.config import load_config
    from stethoscope.exporters.service import Service

    from . import alerts as alerts_pkg

    from .errors import ConfigError

    problems = []
    if not (isinstance(duration_s, (int, float)) and math.isfinite(duration_s) and duration_s > 0):
        problems.append(f"duration: must be > 0 seconds, got {duration_s!r}")
    if not (isinstance(speedup, (int, float)) and math.isfinite(speedup) and 0 < speedup <= 20):
        problems.append(f"speedup: must be in (0, 20], got {speedup!r}")
    if problems:
        raise ConfigError(problems)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = None
    if data_dir is None:
        tmp = tempfile.mkdtemp(prefix="stethoscope-demo-")
        data_dir = tmp
    secret = secrets.token_hex(16)
    sink = WebhookSink(secret)
    sink.start()
    sc = scenario(seed)
    clock = SimClock(speedup)
    overrides = {
        "store.data_dir": str(data_dir),
        "store.flush_interval": "100ms",
        "collector.otlp_http_port": _free_port(),
        "sql.port": _free_port(),
        "collector.sampling_default_target": 40.0,
        "analytics.interval": "10s",
        "analytics.window": "60s",
        "analytics.min_rows": 400,
        "alerts.interval": "2s",
        "alerts.webhook_url": sink.url,
        "alerts.webhook_secret_env": SECRET_ENV,
    }
    overrides.update(_optional_overrides())
    cfg = load_config(environ={}, overrides=overrides)
    previous_secret = os.environ.get(SECRET_ENV)
    os.environ[SECRET_ENV] = secret  # the alert runner reads webhook secrets from the environment
    service = Service(cfg)
    agents: list[Any] = []
    stop_all: list[Callable[[], None]] = []
    started_wall = time.time()
    started_at: dict[str, float] = {}
    result: DemoResult | None = None
    try:
        service.start()
        endpoint = f"http://127.0.0.1:{service.otlp.port}"
        progress.write(f"stethoscope demo: up on {endpoint} (SQL http://127.0.0.1:{service.sql.port}), "
                       f"data in {data_dir}; {duration_s:g} s at speed-up {speedup:g}\n")
        progress.write(f"  fleet: {len(sc.nodes)} nodes x 8 simulated H100s, a {sc.job.world_size}-rank training job, "
                       f"{len(sc.services)} models x 2 replicas; {len(sc.injected)} incidents on the timeline\n")
        progress.flush()
        clock.start()

        def start_node(i: int, node: str, incidents: Sequence[Any]) -> None:
            sim = SimulatedGpuCollector(gpus=8, seed=seed * 100 + i, incidents=incidents, clock=clock)
            agent = Agent(endpoint=endpoint, interval_s=2.0, collectors=[sim], cpu_budget=None, rss_budget_bytes=None,
                          resource=build_resource(extra={"host.name": node}, environ={}), fast_interval_s=1.0)
            agent.start()
            agents.append(agent)
            stop_all.append(agent.shutdown)

        for i, (node, incidents) in enumerate(sc.nodes.items()):
            start_node(i, node, incidents)
        pending_nodes = dict(sc.extra_nodes)

        def training_monitor(rank: int, node: str, gpu: int, vclock: Callable[[], float]) -> Any:
            return TrainingMonitor(sc.job.job, rank=rank, world_size=sc.job.world_size, node=node, gpu=gpu,
                                   endpoint=endpoint, export_interval_s=1.0, clock=vclock, environ={})

        sc.job.start(training_monitor, clock)
        stop_all.append(sc.job.stop)
        for svc in sc.services:
            def model_monitor(replica: int, svc: Any = svc) -> Any:
                return ModelMonitor(svc.model, svc.version, endpoint=endpoint, feature_names=svc.feature_names,
                                    export_interval_s=2.0, seed=replica, environ={},
                                    resource_attributes={"service.instance.id": f"{svc.model}-{replica}",
                                                         "host.name": f"serve-{replica}"})
            svc.start(model_monitor, clock)
            stop_all.append(svc.stop)

        rule_kinds = {r.name: tuple(r.match.kinds) for r in load_rules([alerts_pkg.DEFAULT_RULES])
                      if r.match is not None}
        deadline = started_wall + duration_s
        last_line = 0.0
        told: set[str] = set()
        while time.time() < deadline:
            now_sim = clock()
            for node, at in list(pending_nodes.items()):
                if now_sim >= at:
                    del pending_nodes[node]
                    start_node(len(agents), node, [])
            for inc in sc.injected:
                if inc.key not in started_at and now_sim >= inc.at_s:
                    started_at[inc.key] = time.time()
                    progress.write(f"  [{time.time() - started_wall:5.0f} s] injected: {inc.title}\n")
            first, unmatched = match_alerts(sc.injected, sink.alerts(), rule_kinds, started_at)
            for key, rec in first.items():
                if key not in told:
                    told.add(key)
                    progress.write(f"  [{rec.at - started_wall:5.0f} s] alert {rec.body.get('rule')} "
                                   f"({rec.body.get('subject')}): {rec.at - started_at[key]:.0f} s after injection\n")
            if time.time() - last_line >= 10:
                last_line = time.time()
                written = _finding_counts(service.store)
                progress.write(f"  [{time.time() - started_wall:5.0f} s] training step {sc.job.steps_done}, "
                               f"{sum(s.requests for s in sc.services)} requests, "
                               f"{len(first)}/{len(sc.injected)} incidents alerted, {len(unmatched)} other alerts, "
                               f"{written} warning findings\n")
                progress.flush()
            time.sleep(0.5)
        result = _finish(sc, sink, rule_kinds, started_at, service, out, started_wall, duration_s, progress)
    finally:
        for stop in reversed(stop_all):
            try:
                stop()
            except Exception as exc:  # a failed simulator must not keep the store open
                log.warning("demo: stopping a simulator failed: %s", exc)
        service.stop()
        sink.stop()
        if previous_secret is None:
            os.environ.pop(SECRET_ENV, None)
        else:
            os.environ[SECRET_ENV] = previous_secret
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return result


def _optional_overrides() -> dict[str, Any]:
    """Demo settings for sections that exist in this build (anomaly detection, remediation)."""
    from stethoscope.config import Config

    names = {f.name for f in Config.__dataclass_fields__.values()}
    out: dict[str, Any] = {}
    if "anomaly" in names:
        # Cost is counted in 15 s buckets instead of 5 min ones, so that a spike can be seen in minutes; idle cost
        # needs 4 of them (1 min), so the 30 s every simulated GPU spends loading its job is not reported as idle.
        out.update({"anomaly.interval": "2s", "anomaly.cost_bucket": "15s", "anomaly.cost_warmup": 4,
                    "anomaly.cost_idle_buckets": 4})
    return out


def _finding_counts(store: Any) -> int:
    try:
        text = store.query("SELECT count() FROM findings WHERE Severity != 'info'", "TabSeparated").data
        return int(text.decode().strip() or 0)
    except Exception:  # progress only
        return -1


def _free_port() -> int:
    from ._net import free_port

    return free_port()


def _finish(sc: Scenario, sink: WebhookSink, rule_kinds: Mapping[str, tuple[str, ...]], started_at: dict[str, float],
            service: Any, out: Path, started_wall: float, duration_s: float, progress: TextIO) -> DemoResult:
    from stethoscope.dashboards.report import build_report, store_query

    first, unmatched = match_alerts(sc.injected, sink.alerts(), rule_kinds, started_at)
    outcomes = []
    for inc in sc.injected:
        rec = first.get(inc.key)
        after = rec.at - started_at[inc.key] if rec is not None and inc.key in started_at else None
        outcomes.append(Outcome(inc, rec is not None, after, str(rec.body.get("rule", "")) if rec else "",
                                _action_for(service, rec)))
    rows = [["incident", "detected", "after", "alert", "action"]]
    for o in outcomes:
        rows.append([o.incident.title, "yes" if o.detected else "NO",
                     f"{o.after_s:.0f} s" if o.after_s is not None else "-", o.alert or "-", o.action or "-"])
    progress.write("\n")
    _print_table(rows, progress)
    if unmatched:
        progress.write(f"\nfalse alarms ({len(unmatched)}): alerts that match no injected incident\n")
        for body in unmatched:
            progress.write(f"  {body.get('rule')} {body.get('subject')}\n")
    report_path = out / "stethoscope-demo-report.html"
    try:
        report_path.write_text(build_report(store_query(service.store), since_s=max(duration_s, 60.0) + 60,
                                            title="Stethoscope demo"))
    except Exception as exc:
        progress.write(f"report not written: {exc}\n")
        report_path = None
    summary_path = out / "stethoscope-demo-summary.json"
    summary_path.write_text(json.dumps({
        "incidents": [{"key": o.incident.key, "title": o.incident.title, "detected": o.detected,
                       "after_s": o.after_s, "alert": o.alert, "action": o.action} for o in outcomes],
        "false_alarms": [dict(b) for b in unmatched],
    }, indent=2, default=str) + "\n")
    detected = sum(o.detected for o in outcomes)
    progress.write(f"\n{detected}/{len(outcomes)} incidents detected, {len(unmatched)} false alarms; "
                   f"report {report_path}, summary {summary_path}\n")
    progress.flush()
    return DemoResult(outcomes, unmatched, report_path, summary_path)


def _action_for(service: Any, rec: Received | None) -> str:
    """The remediation decision audited for the alert (by fingerprint), e.g. ``cordon node-3: dry_run``."""
    fp = str(rec.body.get("fingerprint", "")) if rec is not None else ""
    if not fp or any(c not in "0123456789abcdef" for c in fp):
        return ""
    try:
        data = service.store.query(
            f"SELECT Action, Target, Decision FROM actions WHERE Fingerprint = '{fp}' ORDER BY Time LIMIT 1",
            "JSONEachRow").data
    except Exception:  # a store without the actions table: no remediation to show
        return ""
    rows = [json.loads(line) for line in data.splitlines() if line.strip()]
    return ", ".join(f"{r['Action']} {r['Target']}: {r['Decision']}" for r in rows)
