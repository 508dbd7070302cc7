"""Analytics: detectors with one interface, windowing, the scheduler and findings.

Nothing here yet: the drift and anomaly detectors build on the foundation's store.
"""

__all__: list[str] = []
