"""The in-process SDK: monitor a model server or a training job from inside it.

* :class:`ModelMonitor` -- per-feature sketches (OpenTelemetry exponential
  histograms), prediction/confidence distributions, latency, errors, business
  sums, and adaptively sampled raw rows with adjusted counts;
* :class:`TrainingMonitor` -- per-step loss, gradient norm, learning rate,
  throughput and phase timings, with sub-second timestamps;
* :func:`watch` -- PyTorch hooks (extra ``torch``, imported lazily).

Everything is sent over OTLP/HTTP to a Stethoscope collector (``stethoscope up``
or the node agent's endpoint). See ``docs/sdk.md``.

Examples:
    >>> from stethoscope.agents.sdk import SamplingConfig, UncertaintyConfig
    >>> SamplingConfig(target_rows_per_s=-1, uncertainty=UncertaintyConfig(boost=0.5)).problems()
    ['sampling.target_rows_per_s: must be a finite number >= 0, got -1', 'uncertainty.boost: must be a finite number >= 1, got 0.5']
"""

from .allocation import StreamDemand, allocate
from .consistent import adjusted_count, randomness, threshold_for, threshold_hex
from .drops import DropCounter
from .memory import InMemoryExporter
from .model import DEFAULT_LATENCY_BOUNDS_MS, LABEL_EVENT, SAMPLE_EVENT, ModelMonitor, ModelMonitorSettings
from .remote import RemoteSampling, SamplingConfigPoller, StreamOverride
from .sampling import AdaptiveSampler, SamplingConfig
from .torch import Watch, watch
from .training import TrainingMonitor, TrainingMonitorSettings
from .uncertainty import LabelCandidate, LabelingQueue, UncertaintyConfig

__all__ = [
    "AdaptiveSampler",
    "DEFAULT_LATENCY_BOUNDS_MS",
    "DropCounter",
    "InMemoryExporter",
    "LABEL_EVENT",
    "LabelCandidate",
    "LabelingQueue",
    "ModelMonitor",
    "ModelMonitorSettings",
    "RemoteSampling",
    "SAMPLE_EVENT",
    "SamplingConfig",
    "SamplingConfigPoller",
    "StreamDemand",
    "StreamOverride",
    "TrainingMonitor",
    "TrainingMonitorSettings",
    "UncertaintyConfig",
    "Watch",
    "adjusted_count",
    "allocate",
    "randomness",
    "threshold_for",
    "threshold_hex",
    "watch",
]
