"""Synthetic OTLP workloads shared by the benchmarks."""

from __future__ import annotations

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue


def _kv(key: str, value: AnyValue) -> KeyValue:
    return KeyValue(key=key, value=value)


def gauge_request(points: int = 10_000, series: int = 500, *, kind: str = "gauge", seed: int = 0) -> bytes:
    """One export of ``points`` data points over ``series`` GPU series (like one node agent's batch).

    Each point carries 4 attributes (GPU index and UUID, node, model), each resource the
    usual semantic-convention attributes.
    """
    req = ExportMetricsServiceRequest()
    rm = req.resource_metrics.add()
    rm.resource.attributes.extend(
        [
            _kv("service.name", AnyValue(string_value="stethoscope-agent")),
            _kv("host.name", AnyValue(string_value=f"gpu-node-{seed}")),
            _kv("k8s.node.name", AnyValue(string_value=f"gpu-node-{seed}")),
        ]
    )
    sm = rm.scope_metrics.add()
    sm.scope.name = "stethoscope.agents.nvml"
    sm.scope.version = "0.1.0"
    per_series = points // series
    t0 = 1_700_000_000_000_000_000 + seed * 10**12
    for s in range(series):
        m = sm.metrics.add()
        m.name = f"gpu.metric.{s % 25}"
        m.unit = "1"
        body = m.gauge if kind == "gauge" else m.sum
        if kind == "sum":
            m.sum.aggregation_temporality = 2
            m.sum.is_monotonic = True
        for i in range(per_series):
            dp = body.data_points.add()
            dp.time_unix_nano = t0 + i * 1_000_000_000
            dp.start_time_unix_nano = t0
            dp.as_double = (s * 7 + i) % 100 / 3.0
            dp.attributes.extend(
                [
                    _kv("gpu.index", AnyValue(int_value=s % 8)),
                    _kv("gpu.uuid", AnyValue(string_value=f"GPU-{seed:04d}-{s % 8:04d}-5b8e-fff7-98038103d269")),
                    _kv("node", AnyValue(string_value=f"gpu-node-{seed}")),
                    _kv("model", AnyValue(string_value="NVIDIA H100 80GB HBM3")),
                ]
            )
    return req.SerializeToString()
