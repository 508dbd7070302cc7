"""GPU metrics for the node agent: NVML, dcgm-exporter, or a simulator, one metric table.

Every source emits the names, units and attributes in :data:`METRICS`
(``gpu.utilization``, ``gpu.memory.used``, ``gpu.throttle`` ...; the table is in
``docs/gpu-metrics.md``), tagged with ``gpu.source``. Collectors, by entry-point
name:

* ``nvml`` -> :class:`NvmlCollector`: the driver's NVML library (nvidia-ml-py);
  the richest source (per-process memory, XID counts, MIG, Hopper GPM).
* ``dcgm`` -> :class:`DcgmCollector`: scrapes a running dcgm-exporter.
* ``simulate`` -> :class:`SimulatedGpuCollector`: realistic H100 series and
  scripted incidents, for machines without GPUs.
* ``gpu`` -> :class:`GpuCollector`: picks one of the above for the node it runs
  on, and never fails a node that has no GPU.

Examples:
    >>> from stethoscope.agents.gpu import METRICS_BY_NAME, GpuCollector
    >>> METRICS_BY_NAME["gpu.memory.used"].unit
    'By'
    >>> GpuCollector(simulate_gpus=1).source
    'undecided'
"""

from .dcgm import DEFAULT_URL as DEFAULT_DCGM_URL
from .dcgm import DcgmCollector
from .detect import GpuCollector, GpuDetection, detect_gpu_collector
from .names import METRICS, METRICS_BY_NAME, THROTTLE_REASONS, MetricSpec
from .nvml import NvmlCollector, ProcessContainer, parse_cgroup
from .simulate import IdleWaitingOnInput, MemoryLeak, SimulatedGpuCollector, ThermalThrottle, Xid

__all__ = [
    "DEFAULT_DCGM_URL",
    "DcgmCollector",
    "GpuCollector",
    "GpuDetection",
    "IdleWaitingOnInput",
    "METRICS",
    "METRICS_BY_NAME",
    "MemoryLeak",
    "MetricSpec",
    "NvmlCollector",
    "ProcessContainer",
    "SimulatedGpuCollector",
    "THROTTLE_REASONS",
    "ThermalThrottle",
    "Xid",
    "detect_gpu_collector",
    "parse_cgroup",
]
