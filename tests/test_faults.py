"""Faults and recovery with real processes on loopback (issue 10, item 4).

``stethoscope up``, ``stethoscope agent`` (simulated GPUs, a spool) and a
``ModelMonitor`` with a spool run as child processes; the faults are real:
SIGKILL of the collector mid-batch, the ClickHouse server backend going away,
a full file system under the data directory and under the spool, and clients
whose clocks are wrong. The assertions are about what was stored, never about
how fast: every wait polls with a generous timeout. Recovery times are measured
in ``benchmarks/faults.py`` and reported in docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the benchmarks package holds the harness

from stethoscope.agents.delivery import Sender
from stethoscope.agents.spool import Spool, SpoolFullError

from benchmarks.faults import (
    AgentProcess,
    SdkProcess,
    UpProcess,
    distinct_points,
    duplicate_rows,
    gauge_body,
    poll,
    post,
    stored_points,
)

pytestmark = pytest.mark.e2e


def _cleanup(*procs) -> None:
    for p in procs:
        if p is None or p.proc is None or p.proc.poll() is not None:
            continue
        if isinstance(p, UpProcess):
            p.stop()
        else:
            p.proc.kill()
            p.proc.wait()


def test_kill_9_of_up_mid_batch_loses_nothing(tmp_path):
    up = UpProcess(tmp_path / "data", tmp_path / "up.log")
    agent = sdk = None
    try:
        up.start()
        agent = AgentProcess(up.endpoint, tmp_path / "agent-spool", tmp_path / "agent.log", retry_max="1s").start()
        sdk = SdkProcess(up.endpoint, tmp_path / "sdk-spool", tmp_path / "sdk.log").start()
        poll(lambda: stored_points(up, agent.service) > 0 and stored_points(up, sdk.service) > 0, 60,
             "the first points of the agent and the SDK")
        before = stored_points(up, agent.service)
        # Both clients send every 200 ms: a SIGKILL now cuts requests and inserts in flight.
        poll(lambda: stored_points(up, agent.service) > before, 30, "another agent batch")
        up.kill()
        killed_ns = time.time_ns()
        time.sleep(1.0)  # a real outage: both clients keep collecting into their spools
        up.start()
        # Rows collected while the collector was down arrive from the spools.
        poll(lambda: stored_points(up, agent.service, after_ns=killed_ns) > 0
             and stored_points(up, sdk.service, after_ns=killed_ns) > 0, 60, "the spooled outage rows")
        a = agent.stop()
        s = sdk.stop()
        assert a["dropped"] == "nothing" and a["left"] == 0, a
        assert s["dropped"] == {} and s["drained"], s
        for sub in ("metrics", "logs"):  # nothing left behind in the SDK's spools either
            spool = Spool(tmp_path / "sdk-spool" / sub)
            assert spool.pending == 0
            spool.close()
        assert a["points"] > 0 and s["points"] > 0
        # No loss: every point the clients spooled is stored, and nothing else.
        assert distinct_points(up, agent.service) == a["points"]
        assert distinct_points(up, sdk.service) == s["points"]
        # Exactly once: a batch cut by the SIGKILL is inserted again from the ingest journal
        # with its tokens, and a request whose 200 never reached the client is replayed under
        # the same Idempotency-Key and recognised (docs/reliability.md).
        for svc in (agent.service, sdk.service):
            assert duplicate_rows(up, svc) == (0, 1), svc
        # The restarted store kept what the first process had stored (same data directory).
        assert int(up.sql(f"SELECT count() FROM otel_metrics_gauge WHERE ServiceName = '{agent.service}' "
                          f"AND TimeUnix < fromUnixTimestamp64Nano(toInt64({killed_ns}))").strip()) > 0
    finally:
        _cleanup(agent, sdk, up)


def test_clickhouse_backend_outage_buffers_refuses_and_recovers_without_loss(tmp_path):
    # The "ClickHouse server" is a second up's writable SQL endpoint (the ClickHouse HTTP
    # interface, as in tests/test_store.py); the collector in front reaches it with clickhouse-connect.
    backend = UpProcess(tmp_path / "backend", tmp_path / "backend.log", extra=["--sql-writable"])
    front = agent = sdk = None
    try:
        backend.start()
        front = UpProcess(tmp_path / "front", tmp_path / "front.log",
                          extra=["--clickhouse-url", f"http://127.0.0.1:{backend.sql_port}"],
                          env={"STETHOSCOPE_STORE_QUEUE_MAX_ROWS": "300", "STETHOSCOPE_STORE_INSERT_ATTEMPTS": "3"})
        front.start()
        agent = AgentProcess(front.endpoint, tmp_path / "agent-spool", tmp_path / "agent.log", retry_max="1s").start()
        sdk = SdkProcess(front.endpoint, tmp_path / "sdk-spool", tmp_path / "sdk.log").start()
        poll(lambda: stored_points(backend, agent.service) > 0 and stored_points(backend, sdk.service) > 0, 60,
             "the first points through the front collector")
        backend.kill()
        killed_ns = time.time_ns()
        # The collector retries each batch with its insert token, then answers 503 with
        # Retry-After; with a full queue it refuses at once (saturated). The clients spool.
        poll(lambda: front.metric("stethoscope_rejects_total") > 0, 60, "503 answers while the backend is down")
        poll(lambda: front.metric("stethoscope_batches_total", 'outcome="retried"') > 0, 60,
             "the collector retrying a batch with its token")
        assert front.proc.poll() is None  # /healthz says the store is down, the process keeps serving
        backend.start()  # same data directory and port
        poll(lambda: stored_points(backend, agent.service, after_ns=killed_ns) > 0
             and stored_points(backend, sdk.service, after_ns=killed_ns) > 0, 90, "the spooled outage rows")
        a, s = agent.stop(), sdk.stop()
        assert a["dropped"] == "nothing" and a["left"] == 0, a
        assert s["dropped"] == {} and s["drained"], s
        for svc, spooled in ((agent.service, a["points"]), (sdk.service, s["points"])):
            assert distinct_points(backend, svc) == spooled  # no loss
            # Exactly once: the batch the outage interrupted stays in the front collector's
            # journal and is retried with its tokens until the backend is back; clients'
            # replays carry the same Idempotency-Key (docs/reliability.md).
            assert duplicate_rows(backend, svc) == (0, 1), svc
        log = front.log()
        assert "could not store" in log or "failed (attempt" in log  # the outage is logged
    finally:
        _cleanup(agent, sdk, front, backend)


@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    """A small tmpfs at ``path`` (a real file system that fills up), unmounted afterwards."""
    path.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        pytest.skip("the mount binary is missing")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root): {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def fill(directory: Path, leave_bytes: int = 0) -> Path:
    """Write a filler file until the file system has ``leave_bytes`` or less free."""
    filler = directory / "filler"
    chunk = b"\0" * 65536
    with open(filler, "wb") as fh:
        try:
            while True:
                st = os.statvfs(directory)
                free = st.f_bavail * st.f_frsize
                if free <= leave_bytes:
                    break
                fh.write(chunk[: max(1, min(len(chunk), free - leave_bytes))])
                fh.flush()
        except OSError:
            pass
    return filler


def test_full_disk_under_the_spool_is_a_clear_error_and_the_records_replay(tmp_path):
    t0 = time.time_ns() - 3600 * 10**9
    with tmpfs(tmp_path / "spoolfs", "1m") as fs:
        filler = fill(fs, leave_bytes=96 * 1024)
        spool = Spool(fs / "spool", max_bytes=8 << 20)
        kept, error = [], None
        for i in range(10_000):
            body = gauge_body("full-spool", 20, t0 + i * 20 * 10**9)
            try:
                spool.append(body, weight=20)
            except SpoolFullError as exc:
                error = exc
                break
            kept.append(body)
        assert error is not None and "disk full, record dropped" in str(error), error
        assert kept and spool.pending == len(kept)  # the spool stays usable and consistent
        spool.close()
        filler.unlink()
        spool = Spool(fs / "spool", max_bytes=8 << 20)  # reopen: every record intact, in order
        assert [rec for _, rec in spool.peek(len(kept) + 10, 1 << 30)] == kept
        kept.append(gauge_body("full-spool", 20, t0 + len(kept) * 20 * 10**9))
        spool.append(kept[-1], weight=20)  # room again: appends work
        up = UpProcess(tmp_path / "data", tmp_path / "up.log")
        sender = Sender(spool, up.endpoint + "/v1/metrics", backoff_max_s=1.0)
        try:
            up.start()
            sender.start()
            assert sender.wait_drained(60)
            assert stored_points(up, "full-spool") == 20 * len(kept)
            assert duplicate_rows(up, "full-spool") == (0, 1)
        finally:
            sender.shutdown(0)
            spool.close()
            up.stop()


def test_full_disk_under_the_data_dir_answers_503_and_corrupts_nothing(tmp_path):
    with tmpfs(tmp_path / "datafs", "48m") as fs:
        up = UpProcess(fs / "data", tmp_path / "up.log")
        try:
            up.start()
            t0 = time.time_ns() - 7200 * 10**9
            assert post(up, gauge_body("full-data", 50, t0))[0] == 200
            filler = fill(fs)
            big = gauge_body("full-data", 3000, t0 + 100 * 10**9)
            status, retry_after, text = post(up, big)
            assert status == 503 and retry_after and int(retry_after) > 0, (status, text)
            assert "could not store" in text
            assert up.proc.poll() is None  # still running
            assert up.metric("stethoscope_rejects_total", 'reason="store_error"') >= 1
            assert "could not store" in up.log()  # logged
            filler.unlink()
            # Space again: the client's retry of the same request is stored.
            poll(lambda: post(up, big)[0] == 200, 60, "the insert to work once space is free")
            assert stored_points(up, "full-data") == 3050
            up.stop()  # and the store opens again with everything in it
            up.start()
            assert stored_points(up, "full-data") == 3050
            assert duplicate_rows(up, "full-data") == (0, 1)
        finally:
            up.stop()


def test_clock_skew_is_stored_as_sent_counted_and_kept_out_of_current_windows(tmp_path):
    up = UpProcess(tmp_path / "data", tmp_path / "up.log")
    try:
        up.start()
        now = time.time_ns()
        offsets = {"skew-ahead": 600, "skew-behind": -600, "skew-none": 0}
        for i, (service, offset) in enumerate(offsets.items()):
            if i:
                time.sleep(1.1)  # the check samples at most one request a second
            assert post(up, gauge_body(service, 10, now + offset * 10**9 - 10 * 10**9))[0] == 200
        # Stored with the client's timestamps, whatever the collector's clock says.
        for service, offset in offsets.items():
            first = int(up.sql(f"SELECT min(toUnixTimestamp64Nano(TimeUnix)) FROM otel_metrics_gauge "
                               f"WHERE ServiceName = '{service}'"))
            assert first == now + offset * 10**9 - 10 * 10**9
        # Counted: points more than 5 minutes off, by direction; the on-time points are not.
        poll(lambda: up.metric("stethoscope_points_clock_skew_total", 'direction="future"') == 10, 30, "future")
        poll(lambda: up.metric("stethoscope_points_clock_skew_total", 'direction="past"') == 10, 30, "past")
        assert up.metric("stethoscope_points_clock_skew_total") == 20
        assert "stored as sent" in up.log()
        # Analytics windows are closed on both ends by the collector's clock (TimeUnix > now - w
        # AND TimeUnix <= now): the last 5 minutes hold exactly the on-time points.
        window = up.sql(
            "SELECT ServiceName, count() FROM otel_metrics_gauge WHERE ServiceName LIKE 'skew-%' AND "
            "TimeUnix > now64(9) - INTERVAL 5 MINUTE AND TimeUnix <= now64(9) GROUP BY ServiceName"
        ).split()
        assert window == ["skew-none", "10"]
    finally:
        up.stop()


def _make_pki(d: Path) -> dict[str, str]:
    """A CA and a server certificate for 127.0.0.1, made with the openssl binary."""
    d.mkdir()

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=60)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=faults CA",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    (d / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
                                  "extendedKeyUsage=serverAuth\n")
    openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=server")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.pem", "-days", "2", "-extfile", "server.ext")
    return {name: str(d / name) for name in ("ca.pem", "server.pem", "server.key")}


def test_agent_token_env_and_ca_file_and_sql_token_env_against_a_secured_up(tmp_path):
    """Item 1's leftovers: the agent takes its token from ``agent.token_env`` and its CA from ``agent.ca_file``."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl binary makes the test certificates")
    from test_auth import TOKENS, write_tokens
    pki = _make_pki(tmp_path / "pki")
    tokens = write_tokens(tmp_path / "tokens.toml")
    up = UpProcess(tmp_path / "data", tmp_path / "up.log", ca_file=pki["ca.pem"], token=TOKENS["reader"][0],
                   env={"STETHOSCOPE_AUTH_TOKENS_FILE": tokens, "STETHOSCOPE_TLS_CERT_FILE": pki["server.pem"],
                        "STETHOSCOPE_TLS_KEY_FILE": pki["server.key"]})
    good = bad = None
    try:
        up.start()
        env = {"STETHOSCOPE_AGENT_TOKEN_ENV": "NODE_TOKEN", "NODE_TOKEN": TOKENS["agent"][0],
               "STETHOSCOPE_AGENT_CA_FILE": pki["ca.pem"]}
        good = AgentProcess(up.endpoint, tmp_path / "good-spool", tmp_path / "good.log", service="tok-good",
                            retry_max="1s", env=env).start()
        bad = AgentProcess(up.endpoint, tmp_path / "bad-spool", tmp_path / "bad.log", service="tok-bad",
                           retry_max="1s", env={**env, "NODE_TOKEN": "not-a-token-3f9a"}).start()
        poll(lambda: stored_points(up, "tok-good") > 0, 60, "the agent with the right token")
        poll(lambda: "HTTP 401" in bad.log(), 60, "the wrong token's 401")
        a = good.stop()
        assert a["dropped"] == "nothing" and a["left"] == 0
        assert distinct_points(up, "tok-good") == a["points"]
        b = bad.stop(timeout_s=30)
        assert b["delivered"] == 0 and b["left"] > 0  # kept spooled for when the token is fixed
        assert stored_points(up, "tok-bad") == 0
        for text in (good.log(), bad.log(), up.log()):
            assert TOKENS["agent"][0] not in text and "not-a-token-3f9a" not in text
        # stethoscope sql --token-env NAME (the token never goes on the command line)
        cli = [sys.executable, "-m", "stethoscope", "sql", "SELECT count() > 0 FROM otel_metrics_gauge",
               "--url", up.sql_url, "--ca-file", pki["ca.pem"]]
        ok = subprocess.run([*cli, "--token-env", "READ_TOKEN"], capture_output=True, text=True, timeout=60, check=False,
                            env={**os.environ, "READ_TOKEN": TOKENS["reader"][0]})
        assert ok.returncode == 0 and ok.stdout.strip() == "1", ok.stderr
        refused = subprocess.run(cli, capture_output=True, text=True, timeout=60, check=False)
        assert refused.returncode == 1 and "token" in refused.stderr.lower(), refused.stderr
        unset = subprocess.run([*cli, "--token-env", "NO_SUCH_VAR_J"], capture_output=True, text=True, timeout=60,
                               check=False,
                               env={k: v for k, v in os.environ.items() if k != "NO_SUCH_VAR_J"})
        assert unset.returncode == 2 and "NO_SUCH_VAR_J" in unset.stderr
    finally:
        _cleanup(good, bad, up)


def test_agent_token_and_ca_file_are_validated_with_the_rest(tmp_path):
    from stethoscope.agents import Agent
    from stethoscope.agents.resource import build_resource

    from stethoscope.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        Agent(endpoint="https://127.0.0.1:9", collectors=[], resource=build_resource(environ={}),
              token="two\nlines", ca_file=str(tmp_path / "missing.pem"), interval_s=0)
    text = str(info.value)
    assert "token: must be a string without line breaks" in text and "two" not in text
    assert f"ca_file: no such file: '{tmp_path / 'missing.pem'}'" in text and "interval_s" in text
