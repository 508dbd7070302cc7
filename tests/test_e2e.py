"""End to end: `stethoscope up` and `stethoscope agent` as real processes, read back with clickhouse-connect."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import clickhouse_connect
import pytest

from conftest import free_port

pytestmark = pytest.mark.e2e


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "stethoscope", *args]


def _wait_healthy(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"up exited early with {proc.returncode}: {proc.stderr.read().decode()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as resp:
                if json.loads(resp.read())["status"] == "ok":
                    return
        except OSError:
            time.sleep(0.1)
    raise AssertionError("up did not become healthy")


@pytest.fixture(params=["0", "1"], ids=["native", "python"])
def up(tmp_path, request):
    otlp, sql = free_port(), free_port()
    proc = subprocess.Popen(
        _cli("up", "--data-dir", str(tmp_path / "data"), "--otlp-http-port", str(otlp), "--sql-port", str(sql)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "STETHOSCOPE_PURE_PYTHON": request.param},
    )
    try:
        _wait_healthy(otlp, proc)
        yield otlp, sql, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def test_agent_to_clickhouse_connect(up):
    otlp, sql, proc = up
    env = {**os.environ, "K8S_NODE_NAME": "gpu-node-3", "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment.name=test"}
    agent = subprocess.run(
        _cli("agent", "--endpoint", f"http://127.0.0.1:{otlp}", "--once", "--no-spool"),
        env=env, capture_output=True, timeout=120,
    )
    assert agent.returncode == 0, agent.stderr.decode()

    client = clickhouse_connect.get_client(host="127.0.0.1", port=sql)
    try:
        rows = client.query(
            "SELECT MetricName, count() FROM otel_metrics_sum WHERE ServiceName = 'stethoscope-agent' "
            "GROUP BY MetricName ORDER BY MetricName"
        ).result_rows
        names = {name for name, _ in rows}
        assert {"system.cpu.time", "system.network.io", "system.disk.io"} <= names
        modes = {r[0] for r in client.query(
            "SELECT DISTINCT Attributes['cpu.mode'] FROM otel_metrics_sum WHERE MetricName = 'system.cpu.time'"
        ).result_rows}
        assert {"user", "system", "idle", "iowait", "steal"} <= modes
        res = client.query(
            "SELECT ResourceAttributes['host.name'], ResourceAttributes['k8s.node.name'], "
            "ResourceAttributes['deployment.environment.name'], max(Value) FROM otel_metrics_sum "
            "WHERE MetricName = 'system.memory.usage' GROUP BY 1, 2, 3"
        ).result_rows
        assert len(res) == 1
        host, node, env_name, mem = res[0]
        assert host and node == "gpu-node-3" and env_name == "test" and mem > 0
        load = client.query("SELECT count() FROM otel_metrics_gauge WHERE MetricName = 'system.cpu.load_average.1m'").result_rows
        assert load[0][0] == 1  # --once exports exactly one collection
    finally:
        client.close()

    # the CLI's own sql command reads the same data
    out = subprocess.run(_cli("sql", "SELECT count() > 0 FROM otel_metrics_sum", "--url", f"http://127.0.0.1:{sql}"),
                         capture_output=True, timeout=60)
    assert out.returncode == 0 and out.stdout == b"1\n"


def test_up_stops_cleanly_and_keeps_data(tmp_path):
    otlp, sql = free_port(), free_port()
    args = _cli("up", "--data-dir", str(tmp_path / "d"), "--otlp-http-port", str(otlp), "--sql-port", str(sql))
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_healthy(otlp, proc)
        agent = subprocess.run(_cli("agent", "--endpoint", f"http://127.0.0.1:{otlp}", "--once", "--no-spool"),
                               capture_output=True, timeout=120)
        assert agent.returncode == 0, agent.stderr.decode()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_healthy(otlp, proc)
        out = subprocess.run(_cli("sql", "SELECT count() > 0 FROM otel_metrics_sum", "--url", f"http://127.0.0.1:{sql}"),
                             capture_output=True, timeout=60)
        assert out.stdout == b"1\n"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        proc.stdout.close()
        proc.stderr.close()


def test_bad_config_fails_fast_with_every_problem(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[sql]\nport = 0\n[collector]\notlp_http_port = 99999\n")
    out = subprocess.run(_cli("up", "--config", str(cfg)), capture_output=True, timeout=60)
    assert out.returncode == 2
    err = out.stderr.decode()
    assert "2 configuration problems" in err and "sql.port" in err and "collector.otlp_http_port" in err


def test_port_in_use_is_reported(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        out = subprocess.run(
            _cli("up", "--data-dir", str(tmp_path / "d"), "--otlp-http-port", str(busy), "--sql-port", str(free_port())),
            capture_output=True, timeout=60,
        )
    assert out.returncode == 2 and b"Address already in use" in out.stderr


def test_sql_command_reports_unreachable_endpoint():
    out = subprocess.run(_cli("sql", "SELECT 1", "--url", f"http://127.0.0.1:{free_port()}"), capture_output=True, timeout=60)
    assert out.returncode == 2 and b"is `stethoscope up` running?" in out.stderr


def test_agent_once_keeps_what_it_could_not_send(tmp_path):
    spool = tmp_path / "spool"
    args = ("agent", "--once", "--spool-dir", str(spool), "--interval", "1s")
    out = subprocess.run(_cli(*args, "--endpoint", f"http://127.0.0.1:{free_port()}"), capture_output=True, timeout=120)
    assert out.returncode == 1 and b"kept in the spool" in out.stderr
    # the next run, with a collector listening, delivers the spooled cycle and its own
    otlp, sql = free_port(), free_port()
    up = subprocess.Popen(_cli("up", "--data-dir", str(tmp_path / "d"), "--otlp-http-port", str(otlp), "--sql-port", str(sql)),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_healthy(otlp, up)
        out = subprocess.run(_cli(*args, "--endpoint", f"http://127.0.0.1:{otlp}"), capture_output=True, timeout=120)
        assert out.returncode == 0, out.stderr.decode()
        q = subprocess.run(_cli("sql", "SELECT count() FROM otel_metrics_gauge WHERE MetricName = 'system.cpu.load_average.1m'",
                                "--url", f"http://127.0.0.1:{sql}"), capture_output=True, timeout=60)
        assert q.stdout == b"2\n"
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(60)
        up.stdout.close()
        up.stderr.close()


def test_agent_dry_run_prints_json_lines_and_sends_nothing(tmp_path):
    out = subprocess.run(_cli("agent", "--once", "--dry-run", "--endpoint", f"http://127.0.0.1:{free_port()}"),
                         capture_output=True, timeout=120)
    assert out.returncode == 0, out.stderr.decode()
    records = [json.loads(line) for line in out.stdout.decode().splitlines()]
    assert any(r.get("metric") == "system.cpu.time" for r in records)


def test_main_job_up_with_agent_stores_host_metrics(tmp_path):
    """The README's main job: `up --with-agent` shows its own host's metrics within seconds."""
    otlp, sql = free_port(), free_port()
    proc = subprocess.Popen(
        _cli("up", "--with-agent", "--data-dir", str(tmp_path / "d"), "--otlp-http-port", str(otlp),
             "--sql-port", str(sql)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path,
    )
    try:
        _wait_healthy(otlp, proc)
        deadline = time.monotonic() + 60
        count = 0
        while time.monotonic() < deadline and count == 0:
            out = subprocess.run(_cli("sql", "SELECT count() FROM otel_metrics_sum WHERE MetricName = 'system.cpu.time'",
                                      "--url", f"http://127.0.0.1:{sql}"), capture_output=True, timeout=60)
            count = int(out.stdout or b"0")
            time.sleep(0.5)
        assert count > 0
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        proc.stdout.close()
        proc.stderr.close()


def test_alerts_check_command(tmp_path):
    ok = subprocess.run(_cli("alerts", "check"), capture_output=True, timeout=60)
    assert ok.returncode == 0 and b"default.yaml: ok" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules:\n  - name: x\n    match: {kind: gpu_temp}\n    severity: urgent\n")
    out = subprocess.run(_cli("alerts", "check", str(bad)), capture_output=True, timeout=60)
    assert out.returncode == 1
    assert f"{bad}:4: rule 'x': severity must be one of".encode() in out.stderr
    assert f"{bad}:2: rule 'x': annotations.summary is required".encode() in out.stderr
