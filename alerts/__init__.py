"""Alerts: rule files, rule evaluation and alert state, notifiers and guarded actions.

Nothing here yet: rules consume the findings the analytics service will write.
"""

__all__: list[str] = []
