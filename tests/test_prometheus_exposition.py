"""Prometheus exposition: OpenTelemetry -> Prometheus conversion, the HTTP endpoint, and a real Prometheus."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.metrics import Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import AggregationTemporality, MetricsData, NumberDataPoint, Sum
from opentelemetry.sdk.metrics.export import Metric as OtelMetric
from opentelemetry.sdk.metrics.export import ResourceMetrics, ScopeMetrics
from opentelemetry.sdk.metrics.view import ExponentialBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from prometheus_client.parser import text_string_to_metric_families

from stethoscope.agents import prometheus as prom_mod
from stethoscope.agents.prometheus import (
    DEFAULT_PORT,
    PrometheusExposition,
    convert,
    label_name,
    metric_name,
    unit_suffix,
)
from stethoscope.errors import ConfigError

from conftest import free_port

RESOURCE = Resource({"service.name": "stethoscope-agent", "service.namespace": "gpu",
                     "service.instance.id": "node-7", "host.name": "dgx-07", "k8s.node.name": "dgx-07"})


class Node:
    """An exposition attached to a private provider."""

    def __init__(self, resource: Resource = RESOURCE, views: tuple[View, ...] = ()) -> None:
        self.expo = PrometheusExposition(port=0)
        self.provider = MeterProvider(metric_readers=[self.expo.reader], resource=resource, views=list(views),
                                      shutdown_on_exit=False)
        self.meter = self.provider.get_meter("stethoscope.agents.test", "0.1")

    def scrape(self) -> dict[str, Any]:
        """Render and parse: family name -> family."""
        return {f.name: f for f in text_string_to_metric_families(self.expo.render().decode())}

    def close(self) -> None:
        self.provider.shutdown()
        self.expo.close()


@pytest.fixture
def node() -> Iterator[Node]:
    n = Node()
    yield n
    n.close()


def samples(family: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, labels without the scope/resource ones) -> value."""
    skip = {"otel_scope_name", "otel_scope_version", "job", "instance"}
    return {(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k not in skip))): s.value
            for s in family.samples}


# -- naming rules --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "unit", "kind", "expected"),
    [
        ("system.cpu.time", "s", "counter", "system_cpu_time_seconds"),
        ("system.memory.usage", "By", "gauge", "system_memory_usage_bytes"),
        ("system.cpu.utilization", "1", "gauge", "system_cpu_utilization_ratio"),
        ("system.network.packets", "{packet}", "counter", "system_network_packets"),
        ("gpu.transfer.rate", "By/s", "gauge", "gpu_transfer_rate_bytes_per_second"),
        ("tokens.generated", "{token}/s", "gauge", "tokens_generated_per_second"),
        ("llm.generated", "tokens", "counter", "llm_generated_tokens"),
        ("llm.tokens", "tokens", "counter", "llm_tokens"),  # never appended twice
        ("http.requests.total", "", "counter", "http_requests"),
        ("latency_seconds", "s", "histogram", "latency_seconds"),
        ("gpu.power", "W", "gauge", "gpu_power_watts"),
        ("weird--name..x", "", "gauge", "weird_name_x"),
        ("9lives", "", "gauge", "_9lives"),
        ("ratio.counter", "1", "counter", "ratio_counter"),
        ("vllm:queue", "", "gauge", "vllm:queue"),
    ],
)
def test_metric_names(name: str, unit: str, kind: str, expected: str) -> None:
    assert metric_name(name, unit, kind=kind) == expected


def test_label_names_and_unit_suffixes() -> None:
    assert [label_name(k) for k in ("gpu.uuid", "k8s.pod.name", "1st", "__x", "_ok", "a/b")] == [
        "gpu_uuid", "k8s_pod_name", "key_1st", "key__x", "_ok", "a_b"]
    assert unit_suffix("ms", gauge=False) == "milliseconds"
    assert unit_suffix("{request}", gauge=True) == ""
    assert unit_suffix("MiBy", gauge=True) == "mebibytes"
    assert DEFAULT_PORT == 9464


# -- conversion with an SDK provider ---------------------------------------------------------


def test_counter_updown_and_gauge(node: Node) -> None:
    node.meter.create_counter("gpu.xid.errors", unit="{error}", description="XID errors.").add(
        3, {"gpu.index": 0})
    node.meter.create_up_down_counter("inference.queue.depth", unit="{request}").add(5, {"model": "llama"})
    node.meter.create_up_down_counter("inference.queue.depth", unit="{request}").add(-2, {"model": "llama"})
    node.meter.create_gauge("gpu.temperature", unit="Cel").set(71.5, {"gpu.index": 1})
    node.meter.create_observable_gauge("gpu.utilization", unit="1", callbacks=[
        lambda options: [Observation(0.25, {"gpu.index": 0})]])

    got = node.scrape()
    assert got["gpu_xid_errors"].type == "counter"
    assert got["gpu_xid_errors"].documentation == "XID errors."
    assert samples(got["gpu_xid_errors"]) == {("gpu_xid_errors_total", (("gpu_index", "0"),)): 3}
    assert got["inference_queue_depth"].type == "gauge"
    assert samples(got["inference_queue_depth"]) == {("inference_queue_depth", (("model", "llama"),)): 3}
    assert samples(got["gpu_temperature_celsius"]) == {("gpu_temperature_celsius", (("gpu_index", "1"),)): 71.5}
    assert got["gpu_utilization_ratio"].type == "gauge"
    assert samples(got["gpu_utilization_ratio"]) == {("gpu_utilization_ratio", (("gpu_index", "0"),)): 0.25}


def test_histogram_buckets_are_cumulative(node: Node) -> None:
    h = node.meter.create_histogram("inference.latency", unit="ms",
                                    explicit_bucket_boundaries_advisory=[10, 50, 250])
    for value in (5, 7, 40, 300):
        h.record(value, {"model": "resnet50"})
    fam = node.scrape()["inference_latency_milliseconds"]
    assert fam.type == "histogram"
    m = (("model", "resnet50"),)
    buckets = {dict(s.labels)["le"]: s.value for s in fam.samples if s.name.endswith("_bucket")}
    assert buckets == {"10.0": 2, "50.0": 3, "250.0": 3, "+Inf": 4}
    got = samples(fam)
    assert got[("inference_latency_milliseconds_count", m)] == 4
    assert got[("inference_latency_milliseconds_sum", m)] == 352


def test_exponential_histogram_becomes_count_and_sum_summary() -> None:
    node = Node(views=(View(instrument_name="token.latency", aggregation=ExponentialBucketHistogramAggregation()),))
    try:
        h = node.meter.create_histogram("token.latency", unit="s")
        for value in (0.01, 0.02, 0.5):
            h.record(value)
        fam = node.scrape()["token_latency_seconds"]
        assert fam.type == "summary"
        got = samples(fam)
        assert got[("token_latency_seconds_count", ())] == 3
        assert got[("token_latency_seconds_sum", ())] == pytest.approx(0.53)
        assert not any("quantile" in s.labels for s in fam.samples)
    finally:
        node.close()


def test_attributes_become_sanitised_labels(node: Node) -> None:
    node.meter.create_counter("c").add(1, {"k8s.pod.name": "p", "k8s-pod-name": "q", "2d": True,
                                           "dims": (1, 2), "ratio": 0.5})
    (sample,) = node.scrape()["c"].samples
    assert sample.labels["k8s_pod_name"] == "q;p"  # joined in the order of the original keys
    assert (sample.labels["key_2d"], sample.labels["dims"], sample.labels["ratio"]) == ("true", "[1, 2]", "0.5")


def test_resource_gives_job_instance_and_target_info(node: Node) -> None:
    node.meter.create_counter("c").add(1)
    got = node.scrape()
    (sample,) = got["c"].samples
    assert (sample.labels["job"], sample.labels["instance"]) == ("gpu/stethoscope-agent", "node-7")
    assert (sample.labels["otel_scope_name"], sample.labels["otel_scope_version"]) == (
        "stethoscope.agents.test", "0.1")
    (info,) = got["target_info"].samples
    assert info.value == 1
    assert info.labels == {"job": "gpu/stethoscope-agent", "instance": "node-7", "host_name": "dgx-07",
                           "k8s_node_name": "dgx-07"}


def test_no_target_info_without_other_resource_attributes() -> None:
    node = Node(resource=Resource({"service.name": "x"}))
    try:
        node.meter.create_counter("c").add(1)
        got = node.scrape()
        assert "target_info" not in got
        assert got["c"].samples[0].labels["job"] == "x" and "instance" not in got["c"].samples[0].labels
    finally:
        node.close()


def test_host_collector_through_the_exposition(node: Node) -> None:
    from stethoscope.agents.host import HostCollector

    host = HostCollector()
    host.register(node.provider.get_meter("stethoscope.agents.host"))
    got = node.scrape()
    assert got["system_cpu_time_seconds"].type == "counter"
    assert {s.labels["cpu_mode"] for s in got["system_cpu_time_seconds"].samples} >= {"user", "system", "idle"}
    assert got["system_memory_usage_bytes"].type == "gauge"
    assert "system_cpu_logical_count" in got
    host.close()


def _sum_metrics(*metrics: tuple[str, str, bool, AggregationTemporality]) -> MetricsData:
    point = NumberDataPoint(attributes={}, start_time_unix_nano=0, time_unix_nano=1, value=1)
    built = [OtelMetric(name=n, description="", unit=u, data=Sum([point], temporality, monotonic))
             for n, u, monotonic, temporality in metrics]
    return MetricsData([ResourceMetrics(Resource({}), [ScopeMetrics(InstrumentationScope("s"), built, "")], "")])


def test_delta_counters_and_type_clashes_are_dropped() -> None:
    cumulative, delta = AggregationTemporality.CUMULATIVE, AggregationTemporality.DELTA
    families, dropped = convert(_sum_metrics(
        ("delta.requests", "", True, delta),
        ("queue.size", "", False, cumulative),
        ("queue-size", "", True, cumulative),  # same Prometheus name, other type
    ))
    assert [(f.name, f.type) for f in families] == [("queue_size", "gauge")]
    assert dropped == 2
    assert convert(None) == ([], 0)


# -- never raising into prometheus_client ------------------------------------------------------


def test_failed_collection_is_counted_not_raised(node: Node, monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    node.meter.create_counter("c").add(1)

    def boom(timeout_s: float) -> None:
        raise RuntimeError("collection exploded")

    monkeypatch.setattr(node.expo.reader, "pull", boom)
    caplog.set_level(logging.WARNING, logger="stethoscope.agents.prometheus")
    for _ in range(3):
        got = node.scrape()
    assert "c" not in got
    assert got["stethoscope_exposition_errors"].samples[0].value == 3
    assert node.expo.errors == 3
    assert len([r for r in caplog.records if "collection exploded" in r.getMessage()]) == 1


def test_callback_that_raises_does_not_break_the_scrape(node: Node) -> None:
    def bad(options: Any) -> list[Observation]:
        raise ValueError("bad callback")

    node.meter.create_observable_gauge("bad.gauge", callbacks=[bad])
    node.meter.create_counter("good").add(2)
    assert samples(node.scrape()["good"]) == {("good_total", ()): 2}


def test_unattached_or_shut_down_reader_serves_only_self_metrics(caplog: pytest.LogCaptureFixture) -> None:
    expo = PrometheusExposition(port=0)
    with caplog.at_level(logging.ERROR):  # the SDK warns about collecting unattached
        got = {f.name for f in text_string_to_metric_families(expo.render().decode())}
    assert got == {"stethoscope_exposition_errors"}
    node = Node()
    node.meter.create_counter("c").add(1)
    node.provider.shutdown()
    assert "c" not in node.scrape()
    node.expo.close()


def test_settings_are_checked_together() -> None:
    with pytest.raises(ConfigError) as info:
        PrometheusExposition(host="", port=70000, timeout_s=0)
    assert len(info.value.problems) == 3


# -- the HTTP endpoint ---------------------------------------------------------------------


def test_serves_metrics_over_http(node: Node) -> None:
    node.meter.create_counter("served").add(7)
    node.expo.start()
    node.expo.start()  # idempotent
    assert node.expo.port > 0 and node.expo.url.endswith(f":{node.expo.port}/metrics")
    with urllib.request.urlopen(node.expo.url, timeout=5) as resp:
        body = resp.read().decode()
        assert resp.headers["Content-Type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(body)}
    assert samples(families["served"]) == {("served_total", ()): 7}
    node.expo.close()
    node.expo.close()


def test_port_in_use_is_a_config_error(node: Node) -> None:
    node.expo.start()
    other = PrometheusExposition(port=node.expo.port)
    with pytest.raises(ConfigError, match="cannot listen"):
        other.start()


# -- a real Prometheus server ------------------------------------------------------------------


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=2) as resp:
        return json.load(resp)


def _poll(what: str, check: Callable[[], Any], deadline: float, proc: subprocess.Popen[bytes], log: Path) -> Any:
    last: Any = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"prometheus exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
        try:
            last = check()
            if last:
                return last
        except OSError as exc:  # not listening yet
            last = exc
        time.sleep(0.1)  # a poll interval, not a wait for something
    pytest.fail(f"timed out waiting for {what}; last: {last!r}\n{log.read_text()[-2000:]}")


@pytest.mark.e2e
def test_real_prometheus_scrapes_the_agent(node: Node, tmp_path: Path) -> None:
    binary = shutil.which("prometheus") or ("/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None)
    if binary is None:
        pytest.skip("the prometheus binary is missing: apt-get install -y --no-install-recommends prometheus")
    node.meter.create_counter("gpu.test.requests", unit="{request}").add(42, {"model.name": "llama"})
    node.meter.create_gauge("gpu.memory.used", unit="By").set(2**30, {"gpu.index": 0})
    kernel = node.meter.create_histogram("gpu.kernel.duration", unit="s", explicit_bucket_boundaries_advisory=[0.1, 1])
    for seconds in (0.05, 0.5, 3):
        kernel.record(seconds)
    node.expo.start()
    web = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1m\n"
        "scrape_configs:\n  - job_name: node-agent\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{node.expo.port}']\n"
    )
    log = tmp_path / "prometheus.log"
    base = f"http://127.0.0.1:{web}"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--web.listen-address=127.0.0.1:{web}",
             f"--storage.tsdb.path={tmp_path / 'tsdb'}", "--log.level=warn"],
            stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path,
        )
    try:
        deadline = time.monotonic() + 20

        def target_up() -> Any:
            targets = _get_json(base + "/api/v1/targets")["data"]["activeTargets"]
            return targets and targets[0]["health"] == "up" and targets[0]

        target = _poll("the target to be up", target_up, deadline, proc, log)
        assert target["labels"]["job"] == "node-agent" and target["lastError"] == ""

        def query(expr: str) -> Callable[[], Any]:
            def run() -> Any:
                url = base + "/api/v1/query?" + urllib.parse.urlencode({"query": expr})
                return _get_json(url)["data"]["result"]
            return run

        (series,) = _poll("the counter", query('gpu_test_requests_total{model_name="llama"}'), deadline, proc, log)
        assert float(series["value"][1]) == 42
        assert series["metric"]["exported_job"] == "gpu/stethoscope-agent"  # ours, beside the scrape job's
        assert series["metric"]["exported_instance"] == "node-7"
        (memory,) = _poll("the gauge", query("gpu_memory_used_bytes"), deadline, proc, log)
        assert float(memory["value"][1]) == 2**30
        (count,) = _poll("the histogram", query("gpu_kernel_duration_seconds_count"), deadline, proc, log)
        assert float(count["value"][1]) == 3
        buckets = _poll("its buckets", query("gpu_kernel_duration_seconds_bucket"), deadline, proc, log)
        assert sorted(float(b["value"][1]) for b in buckets) == [1, 2, 3]
        (info,) = _poll("target_info", query("target_info"), deadline, proc, log)
        assert info["metric"]["host_name"] == "dgx-07"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    assert node.expo.errors == 0


def test_public_names_import() -> None:
    for name in prom_mod.__all__:
        assert getattr(prom_mod, name) is not None
