"""The node agent: collectors, resource detection and the OTLP export loop.

Examples:
    >>> from stethoscope.agents import Agent, build_resource, load_collectors
    >>> [c.name for c in load_collectors(["host"])]
    ['host']
"""

from .collector import COLLECTOR_GROUP, Collector, load_collectors
from .daemon import DEFAULT_ENDPOINT, Agent, AgentSettings, FastHint
from .delivery import DeliveryStats, Sender, SpoolingExporter
from .dryrun import DryRunExporter
from .overhead import Cadence, OverheadBudget, OverheadMeter
from .prometheus import PrometheusExposition
from .scrape import PrometheusScrapeCollector
from .spool import Spool, SpoolError, SpoolFullError
from .host import CPU_MODES, HostCollector
from .resource import K8S_ENV, build_resource, parse_resource_attributes

__all__ = [
    "Agent",
    "AgentSettings",
    "Cadence",
    "DeliveryStats",
    "DryRunExporter",
    "FastHint",
    "OverheadBudget",
    "OverheadMeter",
    "PrometheusExposition",
    "PrometheusScrapeCollector",
    "Sender",
    "Spool",
    "SpoolError",
    "SpoolFullError",
    "SpoolingExporter",
    "COLLECTOR_GROUP",
    "CPU_MODES",
    "Collector",
    "DEFAULT_ENDPOINT",
    "HostCollector",
    "K8S_ENV",
    "build_resource",
    "load_collectors",
    "parse_resource_attributes",
]
