"""The interface of the training, fleet, serving and cost anomaly detectors.

Drift detectors compare two samples (:class:`~.detector.BatchDetector`) or watch
one number at a time (:class:`~.detector.SequentialDetector`). Anomaly detectors
watch *observations*: one training step of one rank, one collection of one GPU,
one export interval of one model replica. Each is a plain mapping with a ``time``
(seconds since the epoch, UTC) and whatever fields its source has; a detector
reads the fields it needs and ignores the rest::

    det = ANOMALY_REGISTRY["loss_spike"]()
    for obs in observations:               # in time order
        for finding in det.update(obs):    # zero or more Findings, never raises
            ...
    det.reset()

``update`` returns :class:`~.findings.Finding` objects directly, so what a
detector concludes goes to the ``findings`` table and to alert rules unchanged.
A finding's ``kind`` is one of the detector's ``kinds``; its ``subject`` names
what is affected (``job=llm rank=3 node=n1 gpu=0``, ``node=n1 gpu=2``,
``model=fraud version=3``); ``statistic``, ``threshold`` and ``effect`` are the
numbers the verdict was made on, ``details`` the evidence (values, baseline,
onset step or time). A detector reports an incident once when it starts
(``warning`` or ``critical``) and may report it again, at ``info``, when it ends.

Observation fields by source (a detector must cope with any of them missing or
non-finite, counting what it ignored in ``n_ignored``):

* training step (``TrainingMonitor``): ``job``, ``rank``, ``world_size``, ``node``,
  ``gpu``, ``step``, ``loss``, ``grad_norm``, ``lr``, ``tokens``, ``samples``,
  ``step_time`` (s), ``data_wait`` (s), ``phases`` (mapping phase -> seconds);
* GPU (node agent): ``node``, ``gpu``, ``gpu_model``, then the agent's metric names
  without the ``gpu.`` prefix: ``utilization`` (0..1), ``sm.activity``,
  ``tensor.activity``, ``memory.used``, ``memory.total`` (bytes), ``temperature``
  (deg C), ``power.draw`` (W), ``throttle`` (mapping reason -> 0/1), ``xid``
  (list of new XID codes), ``ecc.uncorrectable`` (new errors), ...;
* serving (``ModelMonitor``): ``model``, ``version``, ``replica``, ``requests``,
  ``errors``, ``latency`` (histogram: ``bounds``/``counts`` or quantiles
  ``p50``/``p90``/``p99`` in ms), ``queue_ms``, ...

Every detector registered in :data:`ANOMALY_REGISTRY` passes the conformance
suite in ``tests/test_anomaly_conformance.py``; a detector class provides
``conformance_inputs(rng, incident)`` returning a list of observations, clean when
``incident`` is False and containing one incident it must find when True.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from .findings import Finding

__all__ = ["ANOMALY_REGISTRY", "AnomalyDetector", "Observation", "register_anomaly", "subject"]

#: One observation: ``time`` plus the fields of its source (see the module docstring).
Observation = Mapping[str, Any]


@runtime_checkable
class AnomalyDetector(Protocol):
    """Watches observations of one kind of source and reports findings."""

    name: str
    kinds: tuple[str, ...]
    n_ignored: int

    def update(self, obs: Observation) -> Sequence[Finding]: ...

    def reset(self) -> None: ...


#: name -> factory building an anomaly detector with its default settings.
ANOMALY_REGISTRY: dict[str, Callable[..., Any]] = {}


def register_anomaly(name: str):
    """Class decorator adding an anomaly detector to :data:`ANOMALY_REGISTRY` under ``name``."""

    def wrap(cls):
        if name in ANOMALY_REGISTRY:
            raise ValueError(f"anomaly detector {name!r} registered twice")
        ANOMALY_REGISTRY[name] = cls
        return cls

    return wrap


def subject(**parts: Any) -> str:
    """``job=llm rank=3 node=n1`` from keyword parts in order, leaving out empty ones.

    >>> subject(job="llm", rank=3, node="", gpu=None)
    'job=llm rank=3'
    """
    return " ".join(f"{k}={v}" for k, v in parts.items() if v is not None and v != "")
