"""The agent runtime against the real collector: no loss across outages and restarts, cadence, budget, dry run."""

from __future__ import annotations

import io
import json
import logging
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port, make_service, sql
from opentelemetry.metrics import CallbackOptions, Meter, Observation
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from stethoscope.agents import Agent, build_resource
from stethoscope.agents.daemon import FastHint
from stethoscope.agents.overhead import Cadence, OverheadMeter
from stethoscope.errors import ConfigError

class Ticks:
    """A collector whose counter goes up by one per collection: cycle k reports k."""

    name = "ticks"

    def __init__(self) -> None:
        self.n = 0
        self.fast = False

    def register(self, meter: Meter) -> None:
        meter.create_observable_counter("test.ticks", [self._observe], unit="{collection}")

    def _observe(self, _options: CallbackOptions) -> Iterable[Observation]:
        self.n += 1
        return [Observation(self.n)]

    def wants_fast(self) -> bool:
        return self.fast

    def close(self) -> None:
        pass


def wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def agent(endpoint: str, collectors: list[Any], **kw: Any) -> Agent:
    kw.setdefault("cpu_budget", None)  # pytest plus chDB is no measure of the agent's own cost
    kw.setdefault("rss_budget_bytes", None)
    kw.setdefault("retry_max_s", 0.2)
    return Agent(endpoint=endpoint, collectors=collectors, resource=build_resource(environ={}), **kw)


def stored_ticks(svc: Any) -> list[int]:
    """test.ticks values in the store, in time order."""
    out = sql(svc, "SELECT Value FROM otel_metrics_sum WHERE MetricName = 'test.ticks' ORDER BY TimeUnix")
    return [int(float(v)) for v in out.split()]


@pytest.mark.parametrize("outage_s", [1.0, 30.0])
def test_no_loss_across_a_collector_outage(tmp_path: Path, outage_s: float) -> None:
    port = free_port()
    ticks = Ticks()
    a = agent(f"http://127.0.0.1:{port}", [ticks], interval_s=0.1, spool_dir=tmp_path / "spool", timeout_s=5)
    svc = None
    try:
        a.start()
        time.sleep(outage_s)  # nothing listens: every collection goes to the spool
        wait_for(lambda: ticks.n >= 5)
        assert a.spool is not None and a.spool.pending >= 5
        assert a.delivery_stats().retries >= 1  # type: ignore[union-attr]
        svc = make_service(tmp_path, **{"collector.otlp_http_port": port})
        wait_for(lambda: a.delivery_stats().sent_records >= 5)  # type: ignore[union-attr]
        a.shutdown()  # one last collection, drained
        assert a.spool.pending == 0
        collected = ticks.n
        values = stored_ticks(svc)
        assert values == list(range(1, collected + 1))  # every cycle, once, in order
        backlog = sql(svc, "SELECT max(Value) FROM otel_metrics_gauge WHERE MetricName = 'stethoscope.agent.spool.records'")
        assert float(backlog) >= 5  # the agent reported its own backlog
    finally:
        a.shutdown()
        if svc is not None:
            svc.stop()


def test_restart_delivers_what_the_previous_agent_spooled(tmp_path: Path) -> None:
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    ticks = Ticks()
    first = agent(endpoint, [ticks], interval_s=0.05, spool_dir=tmp_path / "spool", timeout_s=0.3)
    first.start()
    wait_for(lambda: ticks.n >= 5)
    first.shutdown()  # drains for timeout_s, then gives up: the rest stays on disk
    spooled = ticks.n
    assert first.spool is not None and first.spool.pending == spooled
    svc = make_service(tmp_path, **{"collector.otlp_http_port": port})
    try:
        second = agent(endpoint, [], interval_s=60, spool_dir=tmp_path / "spool")
        try:
            assert second.flush(timeout_s=20)
        finally:
            second.shutdown()
        assert stored_ticks(svc) == list(range(1, spooled + 1))
    finally:
        svc.stop()


_CHILD = textwrap.dedent(
    """
    import sys, time
    from opentelemetry.metrics import Observation
    from stethoscope.agents import Agent, build_resource

    class Ticks:
        name = "ticks"
        n = 0
        def register(self, meter):
            meter.create_observable_counter("test.ticks", [self.observe])
        def observe(self, options):
            self.n += 1
            return [Observation(self.n)]
        def close(self):
            pass

    agent = Agent(endpoint=sys.argv[1], interval_s=0.02, collectors=[Ticks()], resource=build_resource(environ={}),
                  spool_dir=sys.argv[2], cpu_budget=None, rss_budget_bytes=None, retry_max_s=0.1)
    agent.start()
    while True:
        print(agent.spool.pending, flush=True)
        time.sleep(0.01)
    """
)


def test_kill_9_agent_then_restart_delivers_everything_once(tmp_path: Path) -> None:
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, endpoint, str(tmp_path / "spool")], stdout=subprocess.PIPE, text=True
    )
    seen = 0
    try:
        assert child.stdout is not None
        for line in child.stdout:
            seen = int(line)
            if seen >= 10:
                break
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(30)
        if child.stdout is not None:
            child.stdout.close()
    assert seen >= 10
    svc = make_service(tmp_path, **{"collector.otlp_http_port": port})
    try:
        again = agent(endpoint, [], interval_s=60, spool_dir=tmp_path / "spool")
        try:
            assert again.flush(timeout_s=20)
        finally:
            again.shutdown()
        values = stored_ticks(svc)
        assert len(values) >= seen
        assert values == list(range(1, len(values) + 1))  # no gap, no duplicate, in order
    finally:
        svc.stop()


# -- cadence and budget (no collector needed: dry run) ------------------------------------------


def test_collectors_can_ask_for_fast_collection_and_it_decays_back() -> None:
    ticks = Ticks()
    assert isinstance(ticks, FastHint)
    a = agent("http://127.0.0.1:9", [ticks], interval_s=8, fast_interval_s=1, fast_hold_s=0, dry_run=io.StringIO())
    try:
        assert a.flush() and a.interval_s == 8
        ticks.fast = True
        assert a.flush() and a.interval_s == 1
        assert a.flush() and a.interval_s == 1
        ticks.fast = False
        steps = []
        for _ in range(5):
            a.flush()
            steps.append(a.interval_s)
        assert steps == [2, 4, 8, 8, 8]
    finally:
        a.shutdown()


def test_fast_interval_is_held_then_released_on_a_fake_clock() -> None:
    cadence = Cadence(base_s=10, fast_s=1, hold_s=60)
    assert cadence.observe(0, wants_fast=True) == 1
    assert cadence.observe(59, wants_fast=False) == 1 and cadence.fast
    assert cadence.observe(61, wants_fast=False) == 2
    assert cadence.observe(62, wants_fast=True) == 1  # asked again: straight back to fast


def test_scheduler_runs_at_the_fast_interval_when_asked() -> None:
    ticks = Ticks()
    ticks.fast = True
    a = agent("http://127.0.0.1:9", [ticks], interval_s=60, fast_interval_s=0.01, dry_run=io.StringIO())
    try:
        a.flush()  # the hook is asked after a collection
        a.start()
        wait_for(lambda: ticks.n >= 20)  # with the 60 s base interval this would take 20 minutes
    finally:
        a.shutdown()


class FakeProcess:
    """A process whose CPU and memory use the test sets; its clock advances 10 s per sample."""

    def __init__(self) -> None:
        self.now = 0.0
        self.cpu_s = 0.0
        self.cpu_ratio = 0.0
        self.rss = 10 * 1024 * 1024

    def clock(self) -> float:
        self.now += 10.0
        self.cpu_s += self.cpu_ratio * 10.0
        return self.now

    def read(self) -> tuple[float, int]:
        return self.cpu_s, self.rss


def test_over_budget_backs_off_logs_once_and_recovers(caplog: pytest.LogCaptureFixture) -> None:
    proc = FakeProcess()
    meter = OverheadMeter(read=proc.read, clock=proc.clock)
    a = agent("http://127.0.0.1:9", [Ticks()], interval_s=10, dry_run=io.StringIO(),
              cpu_budget=0.01, rss_budget_bytes=60 * 1024 * 1024, overhead_meter=meter)
    try:
        proc.cpu_ratio = 0.002
        a.flush()
        assert a.interval_s == 10 and a.backoff == 1
        proc.cpu_ratio = 0.05  # five times the budget
        with caplog.at_level(logging.WARNING, logger="stethoscope.agents.daemon"):
            intervals = []
            for _ in range(6):
                a.flush()
                intervals.append(a.interval_s)
        assert intervals == [20, 40, 80, 160, 160, 160]  # x2 per window, capped at x16
        warnings = [r for r in caplog.records if "over its overhead budget" in r.getMessage()]
        assert len(warnings) == 1
        proc.cpu_ratio = 0.001  # well under: halve back
        recovered = []
        for _ in range(5):
            a.flush()
            recovered.append(a.interval_s)
        assert recovered == [80, 40, 20, 10, 10]
        proc.rss = 200 * 1024 * 1024  # memory over budget backs off as well
        a.flush()
        assert a.backoff == 2
    finally:
        a.shutdown()


def test_self_metrics_are_exported_with_everything_else() -> None:
    proc = FakeProcess()
    proc.cpu_ratio = 0.004
    extra = InMemoryMetricReader()
    out = io.StringIO()
    a = agent("http://127.0.0.1:9", [Ticks()], dry_run=out, overhead_meter=OverheadMeter(read=proc.read, clock=proc.clock),
              extra_readers=[extra])
    a.export_once()
    rows = [json.loads(line) for line in out.getvalue().splitlines()]
    by_name = {r["metric"]: r for r in rows}
    assert by_name["stethoscope.agent.cpu.utilization"]["value"] == pytest.approx(0.004)
    assert by_name["stethoscope.agent.memory.rss"] == {**by_name["stethoscope.agent.memory.rss"], "value": proc.rss, "unit": "By"}
    assert by_name["stethoscope.agent.interval"]["value"] == 10.0
    assert by_name["stethoscope.agent.interval"]["unit"] == "s"
    # the extra reader sees the same instruments
    data = extra.get_metrics_data()
    names = {m.name for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics}
    assert {"test.ticks", "stethoscope.agent.interval"} <= names


def test_dry_run_prints_json_lines_and_sends_nothing(tmp_path: Path) -> None:
    from test_delivery import ScriptedCollector

    server = ScriptedCollector(lambda _ids: (200, {}))
    out = io.StringIO()
    try:
        endpoint = server.url.removesuffix("/v1/metrics")
        a = agent(endpoint, [Ticks()], dry_run=out, spool_dir=tmp_path / "spool")
        assert a.export_once() is True
        assert a.closed
    finally:
        server.close()
    assert server.statuses == []  # nothing was sent
    assert not (tmp_path / "spool").exists()  # and nothing spooled
    rows = [json.loads(line) for line in out.getvalue().splitlines()]
    (tick,) = [r for r in rows if r["metric"] == "test.ticks"]
    assert tick["kind"] == "sum" and tick["value"] == 1 and tick["monotonic"] is True
    assert tick["unit"] == "{collection}" and tick["scope"] == "stethoscope.agents.ticks"
    assert tick["resource"]["service.name"] == "stethoscope-agent"
    assert tick["time"].endswith("+00:00") and isinstance(tick["time_unix_nano"], int)
    assert all({"metric", "kind", "unit", "attributes", "time", "resource"} <= set(r) for r in rows)


def test_new_settings_are_validated_together() -> None:
    with pytest.raises(ConfigError) as info:
        agent("http://127.0.0.1:9", [], spool_max_bytes=10, fast_interval_s=0, cpu_budget=-1,
              rss_budget_bytes=0, extra_readers=[object()], dry_run=42)
    assert len(info.value.problems) == 6


def test_shutdown_with_collector_down_is_bounded(tmp_path: Path) -> None:
    a = agent(f"http://127.0.0.1:{free_port()}", [Ticks()], interval_s=60, spool_dir=tmp_path / "spool",
              timeout_s=0.3)
    a.start()
    started = time.monotonic()
    a.shutdown()
    assert time.monotonic() - started < 5
    assert a.spool is not None and a.spool.pending == 1  # the final collection waits on disk


def test_collection_keeps_going_while_the_sender_is_stuck(tmp_path: Path) -> None:
    """A collector that accepts connections but never answers must not slow collection down."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    ticks = Ticks()
    a = agent(f"http://127.0.0.1:{listener.getsockname()[1]}", [ticks], interval_s=0.02,
              spool_dir=tmp_path / "spool", timeout_s=30)
    try:
        a.start()
        wait_for(lambda: ticks.n >= 20)
        assert a.spool is not None and a.spool.pending >= 19
    finally:
        stopper = threading.Thread(target=a.shutdown, kwargs={"drain_timeout_s": 0.1})
        stopper.start()
        listener.close()
        stopper.join(60)
