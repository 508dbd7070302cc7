"""Structural checks on dashboard JSON, reported all at once.

Examples:
    >>> from .build import build_all
    >>> problems(build_all())
    []
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from typing import Any

from .panels import PLUGIN_ID

__all__ = ["problems", "queries", "referenced_variables"]

_VAR = re.compile(r"\$(\w+)|\$\{(\w+)(?::\w+)?\}")


def referenced_variables(sql: str) -> set[str]:
    """Template variables named in ``sql`` (``$__`` macros excluded).

    >>> sorted(referenced_variables("$__timeFilter(t) AND x IN ($node) AND ${gpu} $__interval_s"))
    ['gpu', 'node']
    """
    names = {m.group(1) or m.group(2) for m in _VAR.finditer(sql)}
    return {n for n in names if not n.startswith("__")}


def queries(dash: dict[str, Any]) -> Iterator[tuple[str, int, str]]:
    """``(where, format, sql)`` for every panel target, variable query and annotation."""
    for p in dash.get("panels", []):
        for t in p.get("targets", []):
            yield f"panel {p.get('id')} {p.get('title')!r} {t.get('refId')}", int(t.get("format", 0)), t.get("rawSql", "")
    for v in dash.get("templating", {}).get("list", []):
        if v.get("type") == "query":
            yield f"variable {v['name']}", 1, v.get("query", "")
    for a in dash.get("annotations", {}).get("list", []):
        if "target" in a:
            yield f"annotation {a.get('name')!r}", int(a["target"].get("format", 1)), a["target"].get("rawSql", "")


def _ds_ok(ds: Any) -> bool:
    return ds == {"type": PLUGIN_ID, "uid": "${datasource}"}


def _dashboard_problems(d: dict[str, Any]) -> list[str]:
    uid = d.get("uid")
    out = []
    if d.get("id") is not None:
        out.append(f"{uid}: id must be null")
    if d.get("schemaVersion") != 39:
        out.append(f"{uid}: schemaVersion must be 39")
    variables = {v.get("name") for v in d.get("templating", {}).get("list", [])}
    if not any(v.get("type") == "datasource" and v.get("name") == "datasource" and v.get("query") == PLUGIN_ID
               for v in d.get("templating", {}).get("list", [])):
        out.append(f"{uid}: no datasource variable for {PLUGIN_ID}")
    ids = [p.get("id") for p in d.get("panels", [])]
    if len(ids) != len(set(ids)):
        out.append(f"{uid}: panel ids repeat: {ids}")
    cells: dict[tuple[int, int], Any] = {}
    for p in d.get("panels", []):
        name = f"{uid} panel {p.get('id')} {p.get('title')!r}"
        g = p.get("gridPos", {})
        h, w, x, y = (g.get(k) for k in ("h", "w", "x", "y"))
        if not all(isinstance(n, int) for n in (h, w, x, y)) or not (1 <= w <= 24 and h >= 1 and x >= 0 and y >= 0
                                                                    and x + w <= 24):
            out.append(f"{name}: bad gridPos {g}")
            continue
        for cx in range(x, x + w):
            for cy in range(y, y + h):
                if (cx, cy) in cells:
                    out.append(f"{name}: overlaps panel {cells[cx, cy]}")
                    break
                cells[cx, cy] = p.get("id")
            else:
                continue
            break
        if not _ds_ok(p.get("datasource")):
            out.append(f"{name}: datasource is not the ${{datasource}} variable")
        for t in p.get("targets", []):
            if not _ds_ok(t.get("datasource")) or t.get("editorType") != "sql" or t.get("format") not in (0, 1, 2):
                out.append(f"{name}: target {t.get('refId')} is not a raw-SQL ClickHouse target")
    for where, _, sql in queries(d):
        missing = referenced_variables(sql) - variables
        if missing:
            out.append(f"{uid} {where}: unknown variables {sorted(missing)}")
    return out


def problems(dashboards: Sequence[dict[str, Any]]) -> list[str]:
    """Every problem found in ``dashboards``; empty when all are sound."""
    out = []
    uids = [d.get("uid") for d in dashboards]
    if len(uids) != len(set(uids)):
        out.append(f"dashboard uids repeat: {uids}")
    titles = [d.get("title") for d in dashboards]
    if len(titles) != len(set(titles)):
        out.append(f"dashboard titles repeat: {titles}")
    for d in dashboards:
        out += _dashboard_problems(d)
        for link in d.get("links", []):
            url = link.get("url", "")
            if link.get("type") == "link" and url.startswith("/d/") and url[3:] not in uids:
                out.append(f"{d.get('uid')}: link to unknown dashboard {url}")
    return out
