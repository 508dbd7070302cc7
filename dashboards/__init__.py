"""Dashboards: Grafana dashboard JSON, provisioning files, and the code that pushes them.

Nothing here yet: the dashboards read the tables the foundation creates.
"""

__all__: list[str] = []
