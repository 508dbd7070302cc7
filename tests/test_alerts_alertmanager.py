"""The Alertmanager notifier against a real ``prometheus-alertmanager`` on loopback.

Runs the Debian binary as formats-and-wire.md section 6 describes: free ports, gossip
off (``--cluster.listen-address=``), a temporary storage path, and a webhook receiver
on a local http.server. Skipped when the binary is not installed.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from stethoscope.alerts import AlertEngine, AlertmanagerNotifier, load_rules
from stethoscope.analytics.findings import Finding
from tests.conftest import free_port

BINARY = Path("/usr/bin/prometheus-alertmanager")

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        not BINARY.exists(),
        reason="prometheus-alertmanager is not installed (apt-get install --no-install-recommends prometheus-alertmanager)",
    ),
]


@pytest.fixture
def receiver():
    got: queue.Queue = queue.Queue()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            got.put((self.path, json.loads(self.rfile.read(int(self.headers["Content-Length"])))))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    t.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/alert", got
    server.shutdown()
    server.server_close()
    t.join(5)


@pytest.fixture
def alertmanager(tmp_path, receiver):
    url, _ = receiver
    am = tmp_path / "am"
    (am / "data").mkdir(parents=True)
    (am / "alertmanager.yml").write_text(
        "route: {receiver: webhook, group_by: ['alertname'], group_wait: 1s, group_interval: 1s, repeat_interval: 1h}\n"
        "receivers:\n"
        "  - name: webhook\n"
        f"    webhook_configs: [{{url: '{url}', send_resolved: true}}]\n"
    )
    port = free_port()
    log = open(tmp_path / "alertmanager.log", "wb")
    proc = subprocess.Popen(
        [str(BINARY), f"--config.file={am / 'alertmanager.yml'}", f"--web.listen-address=127.0.0.1:{port}",
         "--cluster.listen-address=", f"--storage.path={am / 'data'}"],
        stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, env={**os.environ, "HOME": str(tmp_path)},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                with urllib.request.urlopen(base + "/-/ready", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("alertmanager did not become ready:\n" + (tmp_path / "alertmanager.log").read_text()[-2000:])
            time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


def next_payload(got: queue.Queue, status: str, timeout: float = 15.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            path, doc = got.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            break
        if doc.get("status") == status:
            return doc
    pytest.fail(f"no {status!r} webhook payload within {timeout}s")


def test_notifier_fires_and_resolves_through_real_alertmanager(alertmanager, receiver):
    _, got = receiver
    rules = [r for r in load_rules([Path(__file__).resolve().parents[1] / "alerts" / "rules" / "default.yaml"])
             if r.name == "GpuXidCritical"]
    eng = AlertEngine(rules)
    xid = Finding(time=0, kind="gpu_xid", subject="gpu=GPU-1", severity="critical", labels={"node": "n1", "gpu": "GPU-1"})
    t0 = time.time()
    (firing,) = eng.evaluate([xid], now=t0)
    notifier = AlertmanagerNotifier(alertmanager, generator_url="http://stethoscope.local/alerts", timeout=5)
    d = notifier.send(firing)
    assert d.ok and d.status == 200, d.reason

    with urllib.request.urlopen(alertmanager + "/api/v2/alerts", timeout=5) as r:
        active = json.loads(r.read())
    (alert,) = active
    assert alert["labels"]["alertname"] == "GpuXidCritical" and alert["labels"]["node"] == "n1"
    assert alert["status"]["state"] == "active"
    assert alert["annotations"]["summary"] == firing.annotations["summary"]
    assert alert["generatorURL"] == "http://stethoscope.local/alerts"

    doc = next_payload(got, "firing")
    assert doc["version"] == "4" and doc["receiver"] == "webhook"
    assert doc["groupKey"] == '{}:{alertname="GpuXidCritical"}'
    (a,) = doc["alerts"]
    assert a["status"] == "firing" and a["labels"]["gpu"] == "GPU-1" and a["endsAt"] == "0001-01-01T00:00:00Z"

    assert notifier.send_many(eng.firing(now=time.time())).ok  # re-post while active
    (resolved,) = eng.evaluate([], now=time.time())
    assert notifier.send(resolved).ok
    doc = next_payload(got, "resolved")
    assert doc["alerts"][0]["status"] == "resolved" and doc["alerts"][0]["labels"]["alertname"] == "GpuXidCritical"
