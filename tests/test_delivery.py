"""Store-and-forward delivery: retries, poison records, outages, against a scripted HTTP server."""

from __future__ import annotations

import gzip
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, MetricExportResult

from stethoscope.agents import spool as spool_mod
from stethoscope.agents.delivery import Sender, SpoolingExporter, _retry_after
from stethoscope.agents.spool import Spool


def record(i: int) -> bytes:
    """An OTLP request whose single resource says which record it is, with one gauge point."""
    req = ExportMetricsServiceRequest()
    rm = req.resource_metrics.add()
    kv = rm.resource.attributes.add()
    kv.key, kv.value.int_value = "i", i
    metric = rm.scope_metrics.add().metrics.add()
    metric.name = "test.value"
    metric.gauge.data_points.add().as_int = i
    return req.SerializeToString()


def ids(body: bytes) -> list[int]:
    req = ExportMetricsServiceRequest.FromString(body)
    return [rm.resource.attributes[0].value.int_value for rm in req.resource_metrics]


class ScriptedCollector:
    """Answers each POST with ``decide(ids in the body)``; keeps the ids it accepted, in order."""

    def __init__(self, decide: Callable[[list[int]], tuple[int, dict[str, str]]], port: int = 0) -> None:
        self.accepted: list[int] = []
        self.statuses: list[int] = []
        self.peers: set[tuple[str, int]] = set()
        self.encodings: set[str] = set()
        self.keys: list[tuple[str | None, list[int]]] = []  # (Idempotency-Key, ids) of every POST
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive

            def do_POST(self) -> None:  # noqa: N802 (http.server naming)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                encoding = self.headers.get("Content-Encoding", "")
                outer.encodings.add(encoding)
                if encoding == "gzip":
                    body = gzip.decompress(body)
                got = ids(body)
                outer.keys.append((self.headers.get("Idempotency-Key"), got))
                status, headers = decide(got)
                outer.statuses.append(status)
                outer.peers.add(self.client_address)
                if 200 <= status < 300:
                    outer.accepted.extend(got)
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/metrics"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


def ok(_ids: list[int]) -> tuple[int, dict[str, str]]:
    return 200, {}


def wait_for(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    s = Spool(tmp_path / "spool")
    yield s
    s.close()


def fast_sender(spool: Spool, url: str, **kw: Any) -> Sender:
    kw.setdefault("backoff_initial_s", 0.01)
    kw.setdefault("backoff_max_s", 0.05)
    kw.setdefault("timeout_s", 5.0)
    kw.setdefault("rng", random.Random(7))
    return Sender(spool, url, **kw)


@pytest.mark.parametrize("batch", [1, 64])
def test_503_then_200_delivers_everything_in_order_exactly_once(spool: Spool, batch: int) -> None:
    refusals = [4]

    def decide(_ids: list[int]) -> tuple[int, dict[str, str]]:
        if refusals[0] > 0:
            refusals[0] -= 1
            return 503, {"Retry-After": "0"}
        return 200, {}

    server = ScriptedCollector(decide)
    for i in range(1, 21):
        spool.append(record(i))
    sender = fast_sender(spool, server.url, batch_max_records=batch)
    try:
        sender.start()
        assert sender.wait_drained(20)
        stats = sender.stats()
    finally:
        sender.shutdown(0)
        server.close()
    assert server.accepted == list(range(1, 21))
    assert stats.retries == 4 and stats.sent_records == 20 and not stats.dropped
    assert stats.last_error is not None and stats.last_error.startswith("HTTP 503")
    if batch > 1:
        assert len(server.peers) == 1  # one kept-alive connection


def test_a_retry_resends_the_same_records_under_the_same_idempotency_key(spool: Spool) -> None:
    gate = threading.Event()
    first_try = threading.Event()

    def decide(got: list[int]) -> tuple[int, dict[str, str]]:
        if not gate.is_set():
            first_try.set()
            return 503, {"Retry-After": "0"}
        return 200, {}

    server = ScriptedCollector(decide)
    for i in range(1, 4):
        spool.append(record(i))
    sender = fast_sender(spool, server.url, batch_max_records=64)
    try:
        sender.start()
        first_try.wait(10)
        for i in range(4, 8):  # more records arrive while the first request is being retried
            spool.append(record(i))
        gate.set()
        assert sender.wait_drained(20)
    finally:
        sender.shutdown(0)
        server.close()
    refused = [k for k, got in server.keys if got == [1, 2, 3]]
    assert len(refused) >= 2 and len(set(refused)) == 1  # the same range, the same key, every time
    key = refused[0]
    assert key == f"{spool.identity}:1-3"
    assert [got for k, got in server.keys if k != key] == [[4, 5, 6, 7]]
    assert server.accepted == list(range(1, 8))


def test_a_restarted_sender_resends_the_request_it_had_in_flight_under_its_key(tmp_path: Path) -> None:
    """The process died after sending records 1-3 and before reading the answer."""
    server = ScriptedCollector(lambda got: (503, {"Retry-After": "0"}))
    first = Spool(tmp_path / "spool")
    identity = first.identity
    for i in range(1, 4):
        first.append(record(i))
    sender = fast_sender(first, server.url)
    sender.start()
    wait_for(lambda: len(server.keys) >= 1)
    sender.shutdown(0)
    first.close()
    server.close()
    again = Spool(tmp_path / "spool")
    try:
        assert again.identity == identity and again.inflight == 3
        for i in range(4, 8):
            again.append(record(i))
        server = ScriptedCollector(ok)
        sender = fast_sender(again, server.url)
        try:
            sender.start()
            assert sender.wait_drained(20)
        finally:
            sender.shutdown(0)
            server.close()
    finally:
        again.close()
    assert server.keys == [(f"{identity}:1-3", [1, 2, 3]), (f"{identity}:4-7", [4, 5, 6, 7])]


def test_rejected_record_is_dropped_counted_and_the_next_goes_through(
    spool: Spool, caplog: pytest.LogCaptureFixture
) -> None:
    def decide(got: list[int]) -> tuple[int, dict[str, str]]:
        return (400, {}) if 5 in got or 9 in got else (200, {})

    server = ScriptedCollector(decide)
    for i in range(1, 13):
        spool.append(record(i))
    sender = fast_sender(spool, server.url, batch_max_records=4)
    try:
        with caplog.at_level("WARNING", logger="stethoscope.agents.delivery"):
            sender.start()
            assert sender.wait_drained(20)
        stats = sender.stats()
    finally:
        sender.shutdown(0)
        server.close()
    assert server.accepted == [1, 2, 3, 4, 6, 7, 8, 10, 11, 12]
    assert dict(stats.dropped) == {"http_400": 2}
    assert dict(stats.dropped_points) == {"http_400": 2}
    assert stats.sent_records == 10
    assert len([r for r in caplog.records if "rejected" in r.getMessage()]) == 1  # once per status


def test_connection_refused_is_retried_until_the_collector_appears(spool: Spool) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for i in range(1, 6):
        spool.append(record(i))
    sender = fast_sender(spool, f"http://127.0.0.1:{port}/v1/metrics")
    server = None
    try:
        sender.start()
        wait_for(lambda: sender.stats().retries >= 3)
        assert spool.pending == 5
        assert "Connection" in (sender.stats().last_error or "")
        server = ScriptedCollector(ok, port=port)
        assert sender.wait_drained(20)
    finally:
        sender.shutdown(0)
        if server is not None:
            server.close()
    assert server.accepted == [1, 2, 3, 4, 5]


def test_other_5xx_is_retried_a_few_times_then_dropped(spool: Spool) -> None:
    server = ScriptedCollector(lambda got: (500, {}) if got == [2] else (200, {}))
    for i in range(1, 4):
        spool.append(record(i))
    sender = fast_sender(spool, server.url, batch_max_records=1, max_attempts=3)
    try:
        sender.start()
        assert sender.wait_drained(20)
        stats = sender.stats()
    finally:
        sender.shutdown(0)
        server.close()
    assert server.accepted == [1, 3]
    assert server.statuses.count(500) == 3
    assert dict(stats.dropped) == {"http_500": 1}


def test_gzip_bodies(spool: Spool) -> None:
    server = ScriptedCollector(ok)
    for i in range(1, 4):
        spool.append(record(i))
    sender = fast_sender(spool, server.url, gzip_body=True)
    try:
        sender.start()
        assert sender.wait_drained(20)
    finally:
        sender.shutdown(0)
        server.close()
    assert server.accepted == [1, 2, 3] and server.encodings == {"gzip"}


def test_shutdown_is_bounded_and_leaves_the_rest_spooled(tmp_path: Path) -> None:
    server = ScriptedCollector(lambda _ids: (503, {"Retry-After": "60"}))
    spool = Spool(tmp_path / "spool")
    spool.append(record(1))
    sender = fast_sender(spool, server.url)
    sender.start()
    wait_for(lambda: sender.stats().retries >= 1)
    started = time.monotonic()
    assert sender.shutdown(drain_timeout_s=0.2) is False
    assert time.monotonic() - started < 5
    spool.close()
    server.close()
    with Spool(tmp_path / "spool") as again:
        assert again.peek(5) == [(1, record(1))]


def test_retry_after_forms() -> None:
    assert _retry_after("7", now=0) == 7.0
    assert _retry_after(None, now=0) is None
    assert _retry_after("soon", now=0) is None
    now = time.time()
    assert _retry_after(formatdate(now + 30, usegmt=True), now=now) == pytest.approx(30, abs=1.5)


# -- the exporter half -------------------------------------------------------------------------


def _collection() -> tuple[MeterProvider, InMemoryMetricReader]:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    counter = provider.get_meter("t").create_counter("test.count")
    counter.add(1, {"k": "a"})
    counter.add(2, {"k": "b"})
    return provider, reader


def test_spooling_exporter_appends_otlp_protobuf_and_returns_at_once(spool: Spool) -> None:
    woken = []
    exporter = SpoolingExporter(spool, on_append=lambda: woken.append(1))
    provider, reader = _collection()
    try:
        assert exporter.export(reader.get_metrics_data()) is MetricExportResult.SUCCESS
    finally:
        provider.shutdown()
    ((seq, body),) = spool.peek(5)
    request = ExportMetricsServiceRequest.FromString(body)
    (metric,) = request.resource_metrics[0].scope_metrics[0].metrics
    assert metric.name == "test.count" and len(metric.sum.data_points) == 2
    assert woken == [1] and spool.stats().pending_weight == 2


def test_spooling_exporter_counts_a_full_disk_and_never_raises(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    def full(fd: int, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(spool_mod, "_write_all", full)
    exporter = SpoolingExporter(spool)
    provider, reader = _collection()
    try:
        data = reader.get_metrics_data()
        assert exporter.export(data) is MetricExportResult.FAILURE
        assert exporter.export(data) is MetricExportResult.FAILURE
    finally:
        provider.shutdown()
    assert exporter.dropped_points == {"spool_error": 4}
    assert spool.pending == 0
