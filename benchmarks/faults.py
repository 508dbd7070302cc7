"""Faults and recovery: kill -9 the collector, lose the ClickHouse backend, and measure recovery.

``python -m benchmarks.run faults [--rounds N] [--down S] [--scenario collector|backend]``

Real processes on loopback: ``stethoscope up`` (chDB), ``stethoscope agent``
with simulated GPUs and a spool, and a ``ModelMonitor`` with a spool in a child
process. Each round kills ``up`` with SIGKILL while they send, keeps it down
for a while, restarts it on the same data directory and ports, and measures

* **recovery**: from the moment the restarted collector answers ``/healthz``
  until everything the clients spooled while it was down is stored (the
  agent's retry backoff is the default, ``agent.retry_max = 30s``);
* **loss**: points the clients report as spooled minus points stored (must
  be 0), and **duplicates**: stored rows minus distinct rows (must be 0).

The process harness (:class:`UpProcess`, :class:`AgentProcess`,
:class:`SdkProcess`, :func:`stored_points`) is shared with ``tests/test_faults.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from stethoscope._net import free_port

__all__ = [
    "AgentProcess",
    "SdkProcess",
    "UpProcess",
    "distinct_points",
    "duplicate_rows",
    "free_port",
    "gauge_body",
    "main",
    "poll",
    "post",
    "stored_points",
]

METRIC_TABLES = (
    "otel_metrics_gauge",
    "otel_metrics_sum",
    "otel_metrics_histogram",
    "otel_metrics_exponential_histogram",
    "otel_metrics_summary",
)
QUIET_ENV = {
    # Only the collector and the store: the schedulers would compete for the CPU.
    "STETHOSCOPE_ANALYTICS_ENABLED": "false",
    "STETHOSCOPE_ANOMALY_ENABLED": "false",
    "STETHOSCOPE_ALERTS_ENABLED": "false",
}


def poll(check, timeout_s: float, what: str, every_s: float = 0.1):
    """Call ``check()`` until it returns something truthy; raise naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last: object = None
    while True:
        try:
            last = check()
        except (OSError, ValueError) as exc:
            last = exc
        if last and not isinstance(last, Exception):
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what} (last: {last!r})")
        time.sleep(every_s)


def _cli() -> list[str]:
    return [sys.executable, "-m", "stethoscope"]


class UpProcess:
    """``stethoscope up`` as a child process; output goes to ``<log>`` (a file, never a pipe)."""

    def __init__(self, data_dir: Path, log: Path, *, otlp_port: int | None = None, sql_port: int | None = None,
                 extra: list[str] | None = None, env: dict[str, str] | None = None,
                 ca_file: str | None = None, token: str | None = None) -> None:
        self.data_dir, self.log_path = Path(data_dir), Path(log)
        self.otlp_port = otlp_port or free_port()
        self.sql_port = sql_port or free_port()
        self.extra = list(extra or [])
        self.env = {**os.environ, **QUIET_ENV, "STETHOSCOPE_STORE_FLUSH_INTERVAL": "50ms", **(env or {})}
        self.token = token  # sent on /metrics and SQL requests
        self.context = None
        if ca_file:
            import ssl

            self.context = ssl.create_default_context(cafile=ca_file)
        self.scheme = "https" if ca_file else "http"
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.otlp_port}"

    @property
    def sql_url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.sql_port}/"

    def start(self, timeout_s: float = 60.0) -> UpProcess:
        args = [*_cli(), "up", "--data-dir", str(self.data_dir), "--otlp-http-port", str(self.otlp_port),
                "--sql-port", str(self.sql_port), *self.extra]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        self.wait_healthy(timeout_s)
        return self

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.endpoint}/healthz", timeout=2, context=self.context) as resp:
                return json.loads(resp.read()).get("status") == "ok"
        except (OSError, ValueError):
            return False

    def wait_healthy(self, timeout_s: float = 60.0) -> None:
        def check():
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"up exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            return self.healthy()

        poll(check, timeout_s, f"up on {self.endpoint} to answer /healthz")

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, whatever was in flight is cut."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def sql(self, query: str, *, timeout_s: float = 30.0) -> str:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        req = urllib.request.Request(self.sql_url + "?default_format=TabSeparated", data=query.encode(),
                                     method="POST", headers=headers)
        with urllib.request.urlopen(req, timeout=timeout_s, context=self.context) as resp:
            return resp.read().decode()

    def metric(self, name: str, labels: str = "") -> float:
        """The sum of a self-metric's samples on ``/metrics`` whose labels contain ``labels`` (0 when absent)."""
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        req = urllib.request.Request(f"{self.endpoint}/metrics", headers=headers)
        with urllib.request.urlopen(req, timeout=10, context=self.context) as resp:
            text = resp.read().decode()
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name) and (line[len(name)] in " {") and labels in line:
                total += float(line.rsplit(" ", 1)[1])
        return total


def stored_points(up: UpProcess, service: str, after_ns: int | None = None) -> int:
    """Data points of ``service`` stored across every metric table (stamped after ``after_ns``, if given)."""
    when = f" AND TimeUnix > fromUnixTimestamp64Nano(toInt64({int(after_ns)}))" if after_ns is not None else ""
    union = " UNION ALL ".join(
        f"SELECT count() AS n FROM {t} WHERE ServiceName = '{service}'{when}" for t in METRIC_TABLES)
    return int(up.sql(f"SELECT sum(n) FROM ({union})").strip() or 0)


def gauge_body(service: str, points: int, time_ns: int, *, metric: str = "fault.gauge") -> bytes:
    """An OTLP ``ExportMetricsServiceRequest``: ``points`` gauge points of one series, 1 s apart from ``time_ns``."""
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
        ExportMetricsServiceRequest,
    )
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
    from opentelemetry.proto.metrics.v1.metrics_pb2 import (
        Gauge,
        Metric,
        NumberDataPoint,
        ResourceMetrics,
        ScopeMetrics,
    )
    from opentelemetry.proto.resource.v1.resource_pb2 import Resource

    pts = [NumberDataPoint(time_unix_nano=time_ns + i * 1_000_000_000, as_double=float(i)) for i in range(points)]
    return ExportMetricsServiceRequest(resource_metrics=[ResourceMetrics(
        resource=Resource(attributes=[KeyValue(key="service.name", value=AnyValue(string_value=service))]),
        scope_metrics=[ScopeMetrics(metrics=[Metric(name=metric, gauge=Gauge(data_points=pts))])],
    )]).SerializeToString()


def post(up: UpProcess, body: bytes, path: str = "/v1/metrics", token: str | None = None):
    """POST a protobuf body; return (status, Retry-After, body text)."""
    headers = {"Content-Type": "application/x-protobuf"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(up.endpoint + path, data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60, context=up.context) as resp:
            return resp.status, resp.headers.get("Retry-After"), resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.headers.get("Retry-After"), exc.read().decode("utf-8", "replace")


_KEY = "MetricName, ScopeName, Attributes, ResourceAttributes, StartTimeUnix, TimeUnix"


def distinct_points(up: UpProcess, service: str) -> int:
    """Distinct stored points of ``service``: (table, metric, scope, attributes, resource, timestamps)."""
    return sum(int(up.sql(f"SELECT uniqExact({_KEY}) FROM {t} WHERE ServiceName = '{service}'").strip())
               for t in METRIC_TABLES)


def duplicate_rows(up: UpProcess, service: str) -> tuple[int, int]:
    """(stored rows minus distinct points, most copies of any one point) for ``service``."""
    dup, most = 0, 1
    for t in METRIC_TABLES:
        extra, copies = up.sql(
            f"SELECT sum(c - 1), max(c) FROM (SELECT count() AS c FROM {t} WHERE ServiceName = '{service}' "
            f"GROUP BY {_KEY})"
        ).split()
        dup += int(extra)
        most = max(most, int(copies))
    return dup, most


_STOPPED = re.compile(
    r"agent stopped: (\d+) points spooled in (\d+) records; (\d+) records delivered; dropped (.*?); "
    r"(-?\d+) records left in the spool"
)


class AgentProcess:
    """``stethoscope agent`` with simulated GPUs and a spool, as a child process."""

    def __init__(self, endpoint: str, spool_dir: Path, log: Path, *, service: str = "fault-agent",
                 interval: str = "200ms", gpus: int = 2, retry_max: str | None = None,
                 env: dict[str, str] | None = None, extra: list[str] | None = None) -> None:
        self.service, self.log_path = service, Path(log)
        self.args = [*_cli(), "agent", "--endpoint", endpoint, "--interval", interval, "--fast-interval", interval,
                     "--collectors", "simulate", "--simulate-gpus", str(gpus), "--spool-dir", str(spool_dir),
                     "--prometheus-port", "0", "--log-level", "INFO", *(extra or [])]
        self.env = {**os.environ, "STETHOSCOPE_AGENT_SERVICE_NAME": service, "STETHOSCOPE_AGENT_CPU_BUDGET": "0",
                    "STETHOSCOPE_AGENT_RSS_BUDGET_BYTES": "0", **(env or {})}
        if retry_max:
            self.env["STETHOSCOPE_AGENT_RETRY_MAX"] = retry_max
        self.proc: subprocess.Popen | None = None

    def start(self) -> AgentProcess:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout_s: float = 60.0) -> dict:
        """SIGTERM (the agent collects once more and drains its spool), then its own totals."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"agent did not stop in {timeout_s}s:\n{self.log()[-3000:]}") from None
        m = _STOPPED.search(self.log())
        if m is None:
            raise AssertionError(f"agent printed no totals (exit {self.proc.returncode}):\n{self.log()[-3000:]}")
        return {"points": int(m[1]), "records": int(m[2]), "delivered": int(m[3]),
                "dropped": m[4], "left": int(m[5])}


_SDK_SCRIPT = r"""
import json, os, sys, time
from stethoscope.agents.sdk import ModelMonitor
endpoint, spool, stop_file, service = sys.argv[1:5]
mon = ModelMonitor("fault-model", "v1", endpoint=endpoint, feature_names=2, service_name=service,
                   export_interval_s=0.2, spool_dir=spool, timeout_s=5.0, seed=7)
n = 0
while not os.path.exists(stop_file):
    for _ in range(20):
        mon.record([n % 7, n % 3], float(n % 2), confidence=0.9, latency_ms=1.0 + n % 5)
        n += 1
    time.sleep(0.02)
drained = mon.flush(60.0)
mon.close(30.0)  # exports once more and drains
exporter = mon._delivery._metric_exporter
out = {"records": n, "points": exporter.exported_points, "dropped": dict(exporter.dropped_points),
       "drained": drained}
print("SDK-TOTALS " + json.dumps(out), flush=True)
"""


class SdkProcess:
    """A ``ModelMonitor`` with a spool in a child process, recording until told to stop."""

    def __init__(self, endpoint: str, spool_dir: Path, log: Path, *, service: str = "fault-sdk") -> None:
        self.service, self.log_path = service, Path(log)
        self.stop_file = Path(spool_dir).with_name(Path(spool_dir).name + ".stop")
        self.args = [sys.executable, "-c", _SDK_SCRIPT, endpoint, str(spool_dir), str(self.stop_file), service]
        self.proc: subprocess.Popen | None = None

    def start(self) -> SdkProcess:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT)
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout_s: float = 90.0) -> dict:
        assert self.proc is not None
        self.stop_file.touch()
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"SDK child did not stop in {timeout_s}s:\n{self.log()[-3000:]}") from None
        for line in self.log().splitlines():
            if line.startswith("SDK-TOTALS "):
                return json.loads(line[len("SDK-TOTALS "):])
        raise AssertionError(f"SDK child printed no totals (exit {self.proc.returncode}):\n{self.log()[-3000:]}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


# -- the benchmark -----------------------------------------------------------------------------


def _round(root: Path, down_s: float, retry_max: str | None) -> dict:
    up = UpProcess(root / "data", root / "up.log").start()
    agent = AgentProcess(up.endpoint, root / "agent-spool", root / "agent.log", retry_max=retry_max).start()
    sdk = SdkProcess(up.endpoint, root / "sdk-spool", root / "sdk.log").start()
    try:
        poll(lambda: stored_points(up, agent.service) > 0 and stored_points(up, sdk.service) > 0, 120,
             "the first points of both clients")
        time.sleep(1.0)
        up.kill()
        killed_at = time.monotonic()
        time.sleep(down_s)
        up.start()
        healthy_at = time.monotonic()
        # Recovered once rows arrive that were collected while the collector was down.
        down_ns = time.time_ns() - int((time.monotonic() - killed_at) * 1e9)
        mid = down_ns + int(down_s * 0.5e9)
        poll(lambda: all(stored_points(up, s, after_ns=mid) > 0 for s in (agent.service, sdk.service)),
             120, "rows collected during the outage")
        recovered_at = time.monotonic()
        a, s = agent.stop(), sdk.stop()
        poll(lambda: stored_points(up, agent.service) >= a["points"] and stored_points(up, sdk.service) >= s["points"],
             60, "the final drain")
        return {
            "down_s": round(healthy_at - killed_at, 1),
            "recover_s": round(recovered_at - healthy_at, 1),
            "agent_points": a["points"], "agent_lost": a["points"] - distinct_points(up, agent.service),
            "agent_dups": duplicate_rows(up, agent.service)[0],
            "sdk_points": s["points"], "sdk_lost": s["points"] - distinct_points(up, sdk.service),
            "sdk_dups": duplicate_rows(up, sdk.service)[0],
            "redone": _redone_batches(up.log()),
            "replays": int(up.metric("stethoscope_duplicate_requests_total")),
        }
    finally:
        for p in (agent, sdk):
            if p.proc is not None and p.proc.poll() is None:
                p.proc.kill()
                p.proc.wait()
        up.stop()


def _redone_batches(log: str) -> int:
    """Batches the restarted collector took back from its ingest journal (from its log)."""
    import re

    return sum(int(n) for n in re.findall(r"(\d+) batch\(es\) were not confirmed stored", log))


def _backend_round(root: Path, down_s: float) -> dict:
    """The ClickHouse server backend (a second up's writable SQL endpoint) killed and restarted."""
    backend = UpProcess(root / "backend", root / "backend.log", extra=["--sql-writable"]).start()
    front = UpProcess(root / "front", root / "front.log",
                      extra=["--clickhouse-url", f"http://127.0.0.1:{backend.sql_port}"]).start()
    agent = AgentProcess(front.endpoint, root / "agent-spool", root / "agent.log").start()
    sdk = SdkProcess(front.endpoint, root / "sdk-spool", root / "sdk.log").start()
    try:
        poll(lambda: stored_points(backend, agent.service) > 0 and stored_points(backend, sdk.service) > 0, 120,
             "the first points of both clients")
        time.sleep(1.0)
        backend.kill()
        killed_at, killed_ns = time.monotonic(), time.time_ns()
        time.sleep(down_s)
        backend.start()
        healthy_at = time.monotonic()
        mid = killed_ns + int(down_s * 0.5e9)
        poll(lambda: all(stored_points(backend, s, after_ns=mid) > 0 for s in (agent.service, sdk.service)),
             120, "rows collected during the outage")
        recovered_at = time.monotonic()
        a, s = agent.stop(), sdk.stop()
        poll(lambda: stored_points(backend, agent.service) >= a["points"]
             and stored_points(backend, sdk.service) >= s["points"], 60, "the final drain")
        return {
            "down_s": round(healthy_at - killed_at, 1),
            "recover_s": round(recovered_at - healthy_at, 1),
            "agent_points": a["points"], "agent_lost": a["points"] - distinct_points(backend, agent.service),
            "agent_dups": duplicate_rows(backend, agent.service)[0],
            "sdk_points": s["points"], "sdk_lost": s["points"] - distinct_points(backend, sdk.service),
            "sdk_dups": duplicate_rows(backend, sdk.service)[0],
            "rejects": int(front.metric("stethoscope_rejects_total")),
            "replays": int(front.metric("stethoscope_duplicate_requests_total")),
            "held": front.log().count("is kept in the ingest journal"),
        }
    finally:
        for p in (agent, sdk):
            if p.proc is not None and p.proc.poll() is None:
                p.proc.kill()
                p.proc.wait()
        front.stop()
        backend.stop()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="benchmarks.run faults")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--down", type=float, default=10.0, help="seconds the collector stays down")
    p.add_argument("--scenario", choices=["collector", "backend"], default="collector",
                   help="kill -9 the collector, or the ClickHouse server backend behind it")
    args, _ = p.parse_known_args(argv)
    if args.scenario == "backend":
        print(f"ClickHouse server backend (a second up's SQL endpoint) killed with SIGKILL while an agent and a "
              f"ModelMonitor send through up --clickhouse-url; down {args.down:.0f} s; default settings")
        print("| round | down s | recover s | 503 answers | batches held in journal | replays recognised | "
              "agent points | lost | dups | SDK points | lost | dups |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for i in range(args.rounds):
            with tempfile.TemporaryDirectory(prefix="stethoscope-faults-") as tmp:
                r = _backend_round(Path(tmp), args.down)
            print(f"| {i + 1} | {r['down_s']} | {r['recover_s']} | {r['rejects']} | {r['held']} | {r['replays']} | "
                  f"{r['agent_points']} | "
                  f"{r['agent_lost']} | {r['agent_dups']} | {r['sdk_points']} | {r['sdk_lost']} | {r['sdk_dups']} |",
                  flush=True)
        return
    print(f"kill -9 of up while an agent (2 simulated GPUs, 200 ms interval) and a ModelMonitor send; "
          f"down {args.down:.0f} s; agent.retry_max default (30s)")
    print("| round | down s | recover s | batches redone from journal | replays recognised | "
          "agent points | lost | dups | SDK points | lost | dups |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for i in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="stethoscope-faults-") as tmp:
            r = _round(Path(tmp), args.down, None)
        print(f"| {i + 1} | {r['down_s']} | {r['recover_s']} | {r['redone']} | {r['replays']} | "
              f"{r['agent_points']} | {r['agent_lost']} | "
              f"{r['agent_dups']} | {r['sdk_points']} | {r['sdk_lost']} | {r['sdk_dups']} |", flush=True)


if __name__ == "__main__":
    main()
