"""Grafana provisioning files: the ClickHouse datasource and a file provider for the dashboards.

Written as text (no YAML library needed); the tests parse them back with PyYAML.

Examples:
    >>> print(datasource_yaml().splitlines()[0])
    apiVersion: 1
    >>> "path: /var/lib/grafana/dashboards/stethoscope" in dashboards_yaml()
    True
"""

from __future__ import annotations

__all__ = ["DATASOURCE_UID", "FOLDER", "FOLDER_UID", "dashboards_yaml", "datasource_yaml"]

DATASOURCE_UID = "stethoscope-clickhouse"
FOLDER = "Stethoscope"
FOLDER_UID = "stethoscope"


def datasource_yaml(host: str = "stethoscope", port: int = 8123, database: str = "stethoscope") -> str:
    """The datasource: our SQL endpoint (``stethoscope up`` port 8123) over the HTTP protocol."""
    return f"""apiVersion: 1
datasources:
  - name: Stethoscope
    type: grafana-clickhouse-datasource
    uid: {DATASOURCE_UID}
    isDefault: true
    editable: true
    jsonData:
      host: {host}
      port: {port}
      protocol: http
      secure: false
      username: default
      defaultDatabase: {database}
"""


def dashboards_yaml(path: str = "/var/lib/grafana/dashboards/stethoscope") -> str:
    """A file provider that loads every JSON file under ``path`` into the Stethoscope folder."""
    return f"""apiVersion: 1
providers:
  - name: stethoscope
    orgId: 1
    folder: {FOLDER}
    folderUid: {FOLDER_UID}
    type: file
    disableDeletion: false
    updateIntervalSeconds: 30
    allowUiUpdates: false
    options:
      path: {path}
      foldersFromFilesStructure: false
"""
