"""Dashboards: Grafana dashboard JSON, provisioning files, and the code that pushes them.

:func:`build_all` builds the six dashboards (``dashboards/json/*.json`` are their
exported copies); :func:`export` writes them with the provisioning files;
:func:`push` upserts them into a running Grafana (needs the ``dashboards`` extra).
"""

from .build import DASHBOARDS, build_all
from .macros import ALL, QueryContext, Variable, render
from .push import DashboardError, PushResult, export, push, render_files
from .validate import problems

__all__ = ["ALL", "DASHBOARDS", "DashboardError", "PushResult", "QueryContext", "Variable", "build_all", "export",
           "problems", "push", "render", "render_files"]
