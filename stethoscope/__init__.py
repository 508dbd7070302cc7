"""Stethoscope: observability and drift monitoring for GPU fleets and model services."""

__version__ = "0.1.0"
__all__ = ["__version__"]
