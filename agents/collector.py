"""The collector plugin interface, and loading collectors by name.

A collector is a *source* of metrics: it creates observable instruments on the
meter it is given, and their callbacks read the underlying source (``/proc``,
NVML, a socket...) only when the SDK collects. Collectors are found through the
``stethoscope.collectors`` entry-point group; each entry point names a class
that can be built with no arguments.

Examples:
    >>> from stethoscope.agents.collector import Collector, load_collectors
    >>> [c.name for c in load_collectors(["host"])]
    ['host']
    >>> isinstance(load_collectors(["host"])[0], Collector)
    True
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Protocol, runtime_checkable

from opentelemetry.metrics import Meter

from stethoscope.errors import PluginError

__all__ = ["COLLECTOR_GROUP", "Collector", "load_collectors"]

COLLECTOR_GROUP = "stethoscope.collectors"
"""The entry-point group collectors register under."""


@runtime_checkable
class Collector(Protocol):
    """What every metrics collector provides.

    ``register`` is called once, at configuration time, and may raise; the
    callbacks of the instruments it creates run on every collection and must
    never raise. ``close`` releases whatever the collector holds (handles,
    libraries) and must be safe to call more than once.
    """

    name: str

    def register(self, meter: Meter) -> None:
        """Create this collector's observable instruments on ``meter``."""
        ...

    def close(self) -> None:
        """Release resources; idempotent."""
        ...


def _available() -> dict[str, EntryPoint]:
    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=COLLECTOR_GROUP):
        found.setdefault(ep.name, ep)  # first one wins if two dists declare a name
    return found


def load_collectors(
    names: Sequence[str], options: Mapping[str, Mapping[str, Any]] | None = None
) -> list[Collector]:
    """Build one collector per distinct name, in the order given.

    ``options`` maps a collector name to the keyword arguments its factory
    takes (for example ``{"dcgm": {"url": "http://127.0.0.1:9400/metrics"}}``).

    Raises :class:`~stethoscope.errors.PluginError` if a name is not declared
    in the ``stethoscope.collectors`` group (the message lists the available
    names), or if an entry point fails to import, to build, or builds
    something that is not a :class:`Collector`.

    >>> load_collectors(["host", "nvml-typo"])
    Traceback (most recent call last):
    ...
    stethoscope.errors.PluginError: unknown collector 'nvml-typo'; available: ...host...
    """
    if isinstance(names, str):  # a lone "host" would otherwise load "h", "o", ...
        names = [names]
    available = _available()
    wanted = list(dict.fromkeys(names))
    unknown = [n for n in wanted if n not in available]
    if unknown:
        noun = "collector" if len(unknown) == 1 else "collectors"
        listed = ", ".join(sorted(available)) or "(none installed)"
        raise PluginError(f"unknown {noun} {', '.join(map(repr, unknown))}; available: {listed}")

    collectors: list[Collector] = []
    for name in wanted:
        ep = available[name]
        try:
            factory = ep.load()
        except Exception as exc:
            raise PluginError(f"collector {name!r}: entry point {ep.value!r} failed to import: {exc}") from exc
        try:
            collector = factory(**dict((options or {}).get(name, {})))
        except Exception as exc:
            raise PluginError(f"collector {name!r}: {ep.value!r} could not be built: {exc}") from exc
        if not isinstance(collector, Collector):
            raise PluginError(
                f"collector {name!r}: {ep.value!r} built {type(collector).__name__}, "
                "which lacks name/register/close"
            )
        collectors.append(collector)
    return collectors
