"""Write the dashboards and provisioning files to disk, or push them to a running Grafana.

:func:`export` needs nothing beyond the standard library. :func:`push` uses
``grafana-client`` (the ``dashboards`` extra), imported only when called: it makes
sure the folder (uid ``stethoscope``) exists, then upserts every dashboard by uid
through ``POST /api/dashboards/db`` with ``overwrite: true``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._extras import require
from ..errors import StethoscopeError
from .build import DASHBOARDS
from .provisioning import FOLDER, FOLDER_UID, dashboards_yaml, datasource_yaml
from .validate import problems

__all__ = ["DashboardError", "PushResult", "export", "push", "render_files"]


class DashboardError(StethoscopeError):
    """A dashboard is invalid, or Grafana refused it."""


@dataclass(frozen=True)
class PushResult:
    """What :func:`push` did: the folder, whether it was created, and the dashboards' uids and URLs."""

    folder_uid: str
    folder_created: bool
    dashboards: tuple[tuple[str, str], ...]


def _dump(obj: Any) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def render_files() -> dict[str, str]:
    """Relative path -> text of every generated file (what :func:`export` writes).

    >>> sorted(render_files())[:2]
    ['json/alerts.json', 'json/cost.json']
    """
    files = {f"json/{stem}.json": _dump(make()) for stem, make in DASHBOARDS.items()}
    files["provisioning/datasources/stethoscope.yaml"] = datasource_yaml()
    files["provisioning/dashboards/stethoscope.yaml"] = dashboards_yaml()
    return files


def _validated() -> list[dict[str, Any]]:
    built = [make() for make in DASHBOARDS.values()]
    found = problems(built)
    if found:
        raise DashboardError("invalid dashboards:\n" + "\n".join(f"  - {p}" for p in found))
    return built


def export(directory: str | os.PathLike[str]) -> list[Path]:
    """Write ``json/*.json`` and ``provisioning/...`` under ``directory``; return the paths written."""
    _validated()
    root = Path(directory)
    written = []
    for rel, text in render_files().items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def push(grafana_url: str, folder: str = FOLDER, *, folder_uid: str = FOLDER_UID,
         credential: str | tuple[str, str] | None = None, timeout_s: float = 10.0,
         dashboards: Sequence[dict[str, Any]] | None = None) -> PushResult:
    """Upsert every dashboard into ``folder`` on the Grafana at ``grafana_url``.

    ``grafana_url`` may carry basic auth (``http://admin:admin@grafana:3000``); a token
    goes in ``credential``. Grafana errors become :class:`DashboardError`.
    """
    client = require("grafana_client", extra="dashboards", feature="Pushing dashboards to Grafana")
    items = list(dashboards) if dashboards is not None else _validated()
    api = client.GrafanaApi.from_url(grafana_url, credential=credential, timeout=timeout_s)
    errors = (client.client.GrafanaException, OSError)
    try:
        created = False
        try:
            api.folder.get_folder(folder_uid)
        except client.client.GrafanaClientError as exc:
            if getattr(exc, "status_code", None) != 404:
                raise
            api.folder.create_folder(folder, uid=folder_uid)
            created = True
        done = []
        for dash in items:
            reply = api.dashboard.update_dashboard({"dashboard": dash, "folderUid": folder_uid, "overwrite": True})
            done.append((str(dash["uid"]), str((reply or {}).get("url", ""))))
    except errors as exc:
        raise DashboardError(f"Grafana at {_redact(grafana_url)} refused the dashboards: {exc}") from exc
    return PushResult(folder_uid=folder_uid, folder_created=created, dashboards=tuple(done))


def _redact(url: str) -> str:
    """Drop credentials from a URL for messages.

    >>> _redact("http://admin:secret@grafana:3000/")
    'http://grafana:3000/'
    """
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
