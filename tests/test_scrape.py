"""The scrape collector against a local HTTP server serving Triton- and vLLM-style text."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from stethoscope.agents import Collector
from stethoscope.agents import scrape as scrape_mod
from stethoscope.agents.scrape import PrometheusScrapeCollector, otel_name
from stethoscope.errors import ConfigError

from conftest import free_port

LLAMA = "meta-llama/Llama-3.1-8B-Instruct"
GPU = "GPU-2b0c3ad1-5f7e-4c11-9f2a-0d8e61b0a7c4"

# Written for these tests in the shape Triton (:8002) and vLLM (/metrics) expose.
SERVING_TEXT = f"""\
# HELP nv_inference_request_success Number of successful inference requests, all batch sizes
# TYPE nv_inference_request_success counter
nv_inference_request_success{{model="resnet50",version="1"}} 1520
nv_inference_request_success{{model="bert_qa",version="3"}} 88
# HELP nv_inference_queue_duration_us Cumulative inference queuing duration in microseconds
# TYPE nv_inference_queue_duration_us counter
nv_inference_queue_duration_us{{model="resnet50",version="1"}} 734122
# HELP nv_gpu_utilization GPU utilization rate [0.0 - 1.0)
# TYPE nv_gpu_utilization gauge
nv_gpu_utilization{{gpu_uuid="{GPU}"}} 0.41
# HELP nv_gpu_memory_used_bytes GPU used memory, in bytes
# TYPE nv_gpu_memory_used_bytes gauge
nv_gpu_memory_used_bytes{{gpu_uuid="{GPU}"}} 9.663676416e+09
# HELP vllm:num_requests_running Number of requests currently running on GPU.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{{model_name="{LLAMA}"}} 3.0
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{{model_name="{LLAMA}"}} 48211.0
# HELP vllm:prompt_tokens_created Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_created gauge
vllm:prompt_tokens_created{{model_name="{LLAMA}"}} 1.7226e+09
# HELP vllm:e2e_request_latency_seconds Histogram of end to end request latency in seconds.
# TYPE vllm:e2e_request_latency_seconds histogram
vllm:e2e_request_latency_seconds_bucket{{le="0.3",model_name="{LLAMA}"}} 2.0
vllm:e2e_request_latency_seconds_bucket{{le="1.0",model_name="{LLAMA}"}} 9.0
vllm:e2e_request_latency_seconds_bucket{{le="+Inf",model_name="{LLAMA}"}} 12.0
vllm:e2e_request_latency_seconds_count{{model_name="{LLAMA}"}} 12.0
vllm:e2e_request_latency_seconds_sum{{model_name="{LLAMA}"}} 10.75
"""

OPENMETRICS_TEXT = """\
# TYPE ray_serve_deployment_processing_latency_ms summary
# UNIT ray_serve_deployment_processing_latency_ms ms
# HELP ray_serve_deployment_processing_latency_ms Latency for queries to be processed.
ray_serve_deployment_processing_latency_ms{deployment="llm",quantile="0.5"} 41.0
ray_serve_deployment_processing_latency_ms{deployment="llm",quantile="0.99"} 190.0
ray_serve_deployment_processing_latency_ms_sum{deployment="llm"} 5120.0
ray_serve_deployment_processing_latency_ms_count{deployment="llm"} 117
# TYPE ray_serve_num_http_requests counter
# HELP ray_serve_num_http_requests Number of HTTP requests.
ray_serve_num_http_requests_total{route="/llm"} 117
ray_serve_num_http_requests_created{route="/llm"} 1.7e9
# EOF
"""


# -- a target to scrape ------------------------------------------------------------


class Target:
    """A loopback HTTP server whose answer each test sets."""

    def __init__(self) -> None:
        self.body: str | bytes = SERVING_TEXT
        self.status = 200
        self.content_type = "text/plain; version=0.0.4; charset=utf-8"
        self.delay_s = 0.0
        self.hits = 0
        target = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                target.hits += 1
                if target.delay_s:
                    time.sleep(target.delay_s)  # a slow exporter, on the server's side
                body = target.body if isinstance(target.body, bytes) else target.body.encode()
                try:
                    self.send_response(target.status)
                    self.send_header("Content-Type", target.content_type)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:
                    pass  # the client gave up (timeout test)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/metrics"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def target() -> Iterator[Target]:
    t = Target()
    yield t
    t.stop()


class Harness:
    """A collector registered on a private provider with an in-memory reader."""

    def __init__(self, collector: PrometheusScrapeCollector) -> None:
        self.collector = collector
        self.reader = InMemoryMetricReader()
        self.provider = MeterProvider(metric_readers=[self.reader], shutdown_on_exit=False)
        collector.register(self.provider.get_meter("test"))

    def collect(self) -> dict[str, Any]:
        """One collection: metric name -> the SDK metric."""
        data = self.reader.get_metrics_data()
        return {m.name: m for rm in (data.resource_metrics if data else ()) for sm in rm.scope_metrics
                for m in sm.metrics}

    def close(self) -> None:
        self.provider.shutdown()
        self.collector.close()


@pytest.fixture
def harness_for() -> Iterator[Any]:
    made: list[Harness] = []

    def build(*targets: str, **kwargs: Any) -> Harness:
        h = Harness(PrometheusScrapeCollector(targets=targets, **kwargs))
        made.append(h)
        return h

    yield build
    for h in made:
        h.close()


class Clock:
    """Stands in for the scrape module's monotonic clock, so cycles are explicit."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def tick(self) -> None:
        self.now += 60  # past cache_s and the log rate limit


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(scrape_mod, "time", c)
    return c


def points(metric: Any) -> dict[tuple[tuple[str, Any], ...], float]:
    return {tuple(sorted(p.attributes.items())): p.value for p in metric.data.data_points}


def kind(metric: Any) -> str:
    data = metric.data
    return "counter" if getattr(data, "is_monotonic", False) else type(data).__name__.lower()


# -- the collector ----------------------------------------------------------------------


def test_it_is_a_collector_and_names_are_sanitised() -> None:
    c = PrometheusScrapeCollector()
    assert isinstance(c, Collector)
    assert (c.name, c.targets, c.timeout_s) == ("scrape", ("http://127.0.0.1:8002/metrics",), 2.0)
    assert otel_name("vllm:e2e_request_latency_seconds_bucket") == "vllm_e2e_request_latency_seconds_bucket"
    assert otel_name("9lives") == "prom_9lives"
    assert otel_name("x" * 300) == ""
    c.close()
    c.close()


def test_config_problems_are_reported_together() -> None:
    with pytest.raises(ConfigError) as info:
        PrometheusScrapeCollector(name="", targets=["127.0.0.1:8002/metrics", "http://ok/metrics"],
                                  timeout_s=-1, cache_s=0, max_bytes=True)
    assert len(info.value.problems) == 5
    assert "'127.0.0.1:8002/metrics'" in info.value.problems[1]
    with pytest.raises(ConfigError, match="targets"):
        PrometheusScrapeCollector(targets=[])
    assert PrometheusScrapeCollector(targets="http://a:1/metrics, http://b:2/m").targets == (
        "http://a:1/metrics", "http://b:2/m")


def test_serving_text_is_re_emitted_with_meaningful_names(target: Target, harness_for: Any) -> None:
    h = harness_for(target.url)
    got = h.collect()
    t = ("scrape.target", target.url)

    success = got["nv_inference_request_success"]
    assert kind(success) == "counter"
    assert points(success) == {
        (("model", "bert_qa"), t, ("version", "3")): 88,
        (("model", "resnet50"), t, ("version", "1")): 1520,
    }
    assert success.description.startswith("Number of successful inference requests")
    assert kind(got["nv_gpu_utilization"]) == "gauge"
    assert points(got["nv_gpu_utilization"]) == {(("gpu_uuid", GPU), t): 0.41}
    assert got["nv_gpu_memory_used_bytes"].unit == "By"

    assert points(got["vllm_num_requests_running"]) == {(("model_name", LLAMA), t): 3.0}
    tokens = got["vllm_prompt_tokens"]
    assert (kind(tokens), points(tokens)) == ("counter", {(("model_name", LLAMA), t): 48211.0})
    assert not any("created" in name for name in got)  # creation timestamps are not metrics

    buckets = got["vllm_e2e_request_latency_seconds_bucket"]
    assert kind(buckets) == "counter" and buckets.unit == ""
    assert {dict(k)["le"]: v for k, v in points(buckets).items()} == {"0.3": 2.0, "1.0": 9.0, "+Inf": 12.0}
    assert points(got["vllm_e2e_request_latency_seconds_sum"]) == {(("model_name", LLAMA), t): 10.75}
    assert got["vllm_e2e_request_latency_seconds_sum"].unit == ""  # the name carries it already
    assert points(got["vllm_e2e_request_latency_seconds_count"]) == {(("model_name", LLAMA), t): 12.0}

    assert points(got["prometheus.scrape.up"]) == {(t,): 1}
    assert points(got["prometheus.scrape.samples"]) == {(t,): 12}
    assert 0 <= points(got["prometheus.scrape.duration"])[(t,)] < 2
    assert h.collector.errors == {} and h.collector.dropped == 0


def test_one_scrape_per_collection_cycle(target: Target, harness_for: Any, clock: Clock) -> None:
    h = harness_for(target.url, cache_s=5.0)
    assert target.hits == 1  # discovery at register
    clock.tick()
    h.collect()  # a dozen callbacks, one request
    assert target.hits == 2
    h.collect()  # within cache_s: the same snapshot
    assert target.hits == 2
    clock.tick()
    target.body = SERVING_TEXT.replace("} 1520", "} 1600")
    got = h.collect()
    assert target.hits == 3
    assert max(points(got["nv_inference_request_success"]).values()) == 1600


def test_families_that_appear_later_get_instruments(target: Target, harness_for: Any) -> None:
    target.body = "# TYPE nv_energy_consumption counter\nnv_energy_consumption{gpu_uuid=\"g0\"} 5\n"
    h = harness_for(target.url, cache_s=0.001)
    assert set(h.collector.instruments) == {"nv_energy_consumption"}
    target.body += ("# TYPE vllm:num_requests_waiting gauge\n"
                    "vllm:num_requests_waiting{model_name=\"m\"} 7\n")
    deadline = time.monotonic() + 5
    got = h.collect()
    while "vllm_num_requests_waiting" not in got:
        assert time.monotonic() < deadline, "a family seen at runtime was never registered"
        got = h.collect()
    assert points(got["vllm_num_requests_waiting"]) == {(("model_name", "m"), ("scrape.target", target.url)): 7}
    assert "nv_energy_consumption" in got


def test_openmetrics_answer_summary_and_unit(target: Target, harness_for: Any) -> None:
    target.body = OPENMETRICS_TEXT
    target.content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8"
    got = harness_for(target.url).collect()
    latency = got["ray_serve_deployment_processing_latency_ms"]
    assert kind(latency) == "gauge" and latency.unit == "ms"
    assert {dict(k)["quantile"]: v for k, v in points(latency).items()} == {"0.5": 41.0, "0.99": 190.0}
    assert kind(got["ray_serve_deployment_processing_latency_ms_sum"]) == "counter"
    assert kind(got["ray_serve_deployment_processing_latency_ms_count"]) == "counter"
    assert got["ray_serve_deployment_processing_latency_ms_count"].unit == ""
    assert points(got["ray_serve_num_http_requests"]) == {(("route", "/llm"), ("scrape.target", target.url)): 117}
    assert not any("created" in name for name in got)


def test_a_name_with_two_types_keeps_the_first(harness_for: Any) -> None:
    first, second = Target(), Target()
    try:
        first.body = "# TYPE shared_metric_total counter\nshared_metric_total 1\n"
        second.body = "# TYPE shared_metric_total gauge\nshared_metric_total 2\n# TYPE shared_metric gauge\nshared_metric 3\n"
        h = harness_for(first.url, second.url)
        got = h.collect()
        assert kind(got["shared_metric"]) == "counter"
        assert points(got["shared_metric"]) == {(("scrape.target", first.url),): 1}
        assert points(got["shared_metric_total"]) == {(("scrape.target", second.url),): 2}
        assert h.collector.dropped >= 1
    finally:
        first.stop()
        second.stop()


def test_unreachable_target_is_counted_and_logged_rate_limited(
    harness_for: Any, target: Target, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    dead = f"http://127.0.0.1:{free_port()}/metrics"
    caplog.set_level(logging.WARNING, logger="stethoscope.agents.scrape")
    h = harness_for(dead, target.url)
    clock.now += 5  # cycles within a minute: one warning
    got = h.collect()
    clock.now += 5
    got = h.collect()
    assert points(got["prometheus.scrape.up"]) == {(("scrape.target", dead),): 0,
                                                   (("scrape.target", target.url),): 1}
    errors = points(got["prometheus.scrape.errors"])
    assert errors[(("error.type", "connect"), ("scrape.target", dead))] >= 3
    assert h.collector.errors[dead] >= 3
    assert "nv_inference_request_success" in got  # the healthy target is unaffected
    warnings = [r.getMessage() for r in caplog.records if dead in r.getMessage()]
    assert len(warnings) == 1  # rate-limited
    clock.tick()
    h.collect()
    warnings = [r.getMessage() for r in caplog.records if dead in r.getMessage()]
    assert len(warnings) == 2 and "2 more failures" in warnings[1]


@pytest.mark.parametrize(
    ("setup", "reason"),
    [
        (dict(status=500, body="oops"), "http"),
        (dict(body="<html><body>Not metrics</body></html>"), "parse"),
        (dict(body="# TYPE x counter\nx{a=\"b} 1\n"), "parse"),
        (dict(body=b"ok 1\n\xff\xfe 2\n"), "parse"),
        (dict(body="big 1\n" * 200), "too_large"),
        (dict(delay_s=1.0), "timeout"),
    ],
    ids=["http-500", "html", "broken-label", "not-utf8", "too-large", "slow"],
)
def test_bad_answers_fail_the_scrape_without_raising(target: Target, harness_for: Any,
                                                     setup: dict[str, Any], reason: str) -> None:
    for key, value in setup.items():
        setattr(target, key, value)
    h = harness_for(target.url, timeout_s=0.3, max_bytes=1000)
    got = h.collect()
    assert points(got["prometheus.scrape.up"]) == {(("scrape.target", target.url),): 0}
    assert (("error.type", reason), ("scrape.target", target.url)) in points(got["prometheus.scrape.errors"])
    assert set(got) <= {"prometheus.scrape.up", "prometheus.scrape.duration", "prometheus.scrape.samples",
                        "prometheus.scrape.errors"}


def test_instrument_limit_drops_and_counts(target: Target, harness_for: Any, clock: Clock) -> None:
    target.body = "".join(f"# TYPE family_{i} gauge\nfamily_{i} {i}\n" for i in range(5))
    h = harness_for(target.url, max_instruments=3)
    clock.tick()
    got = h.collect()
    assert len([n for n in got if n.startswith("family_")]) == 3
    assert h.collector.dropped == 2


def test_close_stops_scraping(target: Target, harness_for: Any) -> None:
    h = harness_for(target.url, cache_s=0.001)
    h.collector.close()
    hits = target.hits
    got = h.collect()
    assert target.hits == hits
    assert "nv_inference_request_success" not in got


def test_counters_and_gauges_keep_their_names_through_the_exposition(target: Target) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from stethoscope.agents.prometheus import PrometheusExposition

    expo = PrometheusExposition(port=0)
    provider = MeterProvider(metric_readers=[expo.reader], shutdown_on_exit=False)
    collector = PrometheusScrapeCollector(targets=[target.url])
    collector.register(provider.get_meter("stethoscope.agents.scrape"))
    try:
        exposed = {s.name: s for f in text_string_to_metric_families(expo.render().decode()) for s in f.samples}
        for name in ("nv_inference_request_success_total", "nv_inference_queue_duration_us_total",
                     "nv_gpu_utilization", "nv_gpu_memory_used_bytes", "vllm_num_requests_running",
                     "vllm_prompt_tokens_total", "vllm_e2e_request_latency_seconds_sum_total"):
            assert name in exposed, name
        assert exposed["vllm_prompt_tokens_total"].labels["model_name"] == LLAMA
        assert exposed["vllm_prompt_tokens_total"].labels["scrape_target"] == target.url
    finally:
        provider.shutdown()
        collector.close()
