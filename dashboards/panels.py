"""Small builders for Grafana dashboard JSON on the ClickHouse datasource plugin.

Plain dicts in, plain dicts out: no Grafana SDK. Panels get their ids and
``gridPos`` from :func:`arrange`, which flows them left to right in rows of 24.

Examples:
    >>> p = timeseries("Load", "SELECT 1", unit="percentunit")
    >>> p["targets"][0]["editorType"], p["targets"][0]["format"], p["datasource"]["uid"]
    ('sql', 0, '${datasource}')
    >>> [q["gridPos"] for q in arrange([(p, 12, 8), (stat("N", "SELECT 1"), 12, 4), (p, 24, 8)])]
    [{'h': 8, 'w': 12, 'x': 0, 'y': 0}, {'h': 4, 'w': 12, 'x': 12, 'y': 0}, {'h': 8, 'w': 24, 'x': 0, 'y': 8}]
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = [
    "ACTION_ANNOTATION_SQL",
    "ANNOTATION_LIMIT",
    "ALERT_ANNOTATION_SQL",
    "DATASOURCE",
    "FORMAT_LOGS",
    "FORMAT_TABLE",
    "FORMAT_TIME_SERIES",
    "PLUGIN_ID",
    "annotation",
    "arrange",
    "barchart",
    "constant_variable",
    "custom_variable",
    "dashboard",
    "datasource_variable",
    "findings_annotation",
    "panel",
    "query_variable",
    "stat",
    "table",
    "target",
    "timeseries",
]

PLUGIN_ID = "grafana-clickhouse-datasource"
DATASOURCE = {"type": PLUGIN_ID, "uid": "${datasource}"}
FORMAT_TIME_SERIES, FORMAT_TABLE, FORMAT_LOGS = 0, 1, 2

Json = dict[str, Any]


def target(sql: str, fmt: int = FORMAT_TIME_SERIES, ref_id: str = "A") -> Json:
    """One raw-SQL query of the ClickHouse plugin."""
    return {"datasource": dict(DATASOURCE), "editorType": "sql", "format": fmt, "rawSql": sql.strip(), "refId": ref_id}


def panel(kind: str, title: str, sql: str, fmt: int, *, unit: str = "", description: str = "",
          options: Json | None = None, custom: Json | None = None, overrides: Sequence[Json] = ()) -> Json:
    defaults: Json = {}
    if unit:
        defaults["unit"] = unit
    if custom:
        defaults["custom"] = custom
    return {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": dict(DATASOURCE),
        "targets": [target(sql, fmt)],
        "fieldConfig": {"defaults": defaults, "overrides": list(overrides)},
        "options": options or {},
    }


def timeseries(title: str, sql: str, *, unit: str = "", description: str = "", stacked: bool = False,
               bars: bool = False) -> Json:
    custom: Json = {"drawStyle": "bars" if bars else "line", "fillOpacity": 60 if bars or stacked else 10,
                    "lineWidth": 1, "spanNulls": True}
    if stacked:
        custom["stacking"] = {"mode": "normal", "group": "A"}
    return panel("timeseries", title, sql, FORMAT_TIME_SERIES, unit=unit, description=description, custom=custom,
                 options={"legend": {"displayMode": "table", "placement": "right", "calcs": ["mean", "max"]},
                          "tooltip": {"mode": "multi", "sort": "desc"}})


def barchart(title: str, sql: str, *, unit: str = "", description: str = "") -> Json:
    return panel("barchart", title, sql, FORMAT_TABLE, unit=unit, description=description,
                 options={"orientation": "horizontal", "stacking": "normal", "showValue": "auto"})


def stat(title: str, sql: str, *, unit: str = "", description: str = "", decimals: int | None = None) -> Json:
    p = panel("stat", title, sql, FORMAT_TABLE, unit=unit, description=description,
              options={"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                       "colorMode": "value", "graphMode": "none", "textMode": "auto"})
    if decimals is not None:
        p["fieldConfig"]["defaults"]["decimals"] = decimals
    return p


def table(title: str, sql: str, *, unit: str = "", description: str = "", heat: bool = False) -> Json:
    """A table panel; ``heat`` colours numeric cells by value (green to red), a heatmap in table form."""
    custom: Json = {"align": "auto", "cellOptions": {"type": "color-background" if heat else "auto"}}
    p = panel("table", title, sql, FORMAT_TABLE, unit=unit, description=description, custom=custom,
              options={"showHeader": True, "cellHeight": "sm"})
    if heat:
        p["fieldConfig"]["defaults"]["color"] = {"mode": "continuous-GrYlRd"}
    return p


def arrange(items: Iterable[tuple[Json, int, int]]) -> list[Json]:
    """Copy each ``(panel, width, height)``, give it an id and a ``gridPos``, flowing in rows of 24."""
    out: list[Json] = []
    x = y = row_h = 0
    for n, (p, w, h) in enumerate(items, start=1):
        if not 1 <= w <= 24 or h < 1:
            raise ValueError(f"panel {p.get('title')!r}: width must be 1..24 and height >= 1, got {w}x{h}")
        if x + w > 24:
            x, y, row_h = 0, y + row_h, 0
        placed = copy.deepcopy(p)
        placed["id"] = n
        placed["gridPos"] = {"h": h, "w": w, "x": x, "y": y}
        out.append(placed)
        x += w
        row_h = max(row_h, h)
    return out


def datasource_variable() -> Json:
    return {"type": "datasource", "name": "datasource", "label": "Data source", "query": PLUGIN_ID,
            "current": {}, "hide": 0, "refresh": 1, "regex": "", "options": []}


def query_variable(name: str, label: str, sql: str, *, multi: bool = True, include_all: bool = True) -> Json:
    """A variable filled by a SQL query (refreshed when the time range changes)."""
    sql = " ".join(sql.split())
    return {"type": "query", "name": name, "label": label, "datasource": dict(DATASOURCE), "query": sql,
            "definition": sql, "refresh": 2, "includeAll": include_all, "multi": multi, "sort": 1,
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]} if include_all else {},
            "options": [], "hide": 0, "regex": ""}


def constant_variable(name: str, value: str, label: str = "") -> Json:
    return {"type": "constant", "name": name, "label": label or name, "query": value, "hide": 2,
            "current": {"text": value, "value": value}, "options": [{"selected": True, "text": value, "value": value}]}


def custom_variable(name: str, label: str, values: Sequence[str]) -> Json:
    query = ",".join(values)
    return {"type": "custom", "name": name, "label": label, "query": query, "multi": True, "includeAll": True,
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]}, "hide": 0,
            "options": [{"selected": False, "text": v, "value": v} for v in values]}


def findings_annotation(sql: str) -> Json:
    """Warning and critical findings as annotations (columns ``time``, ``text``, ``tags``)."""
    return annotation("Findings", sql, "red")


def annotation(name: str, sql: str, color: str) -> Json:
    """An annotation query of the plugin: rows of ``time``, ``text`` and ``tags`` (comma-separated)."""
    return {"name": name, "enable": True, "hide": False, "iconColor": color, "datasource": dict(DATASOURCE),
            "target": target(sql, FORMAT_TABLE, "Annotations")}


#: Each annotation query returns at most this many marks, the newest: a time axis cannot show more,
#: and a busy week of findings would otherwise send millions of rows.
ANNOTATION_LIMIT = 1000

#: Alerts as the runner notified them: when each fired and resolved (once per alert, not per
#: receiver or repeat), from the outbox's ``queued`` rows, which keep the notification.
ALERT_ANNOTATION_SQL = """
SELECT min(Time) AS time,
       concat(upper(JSONExtractString(any(Body), 'status')), ' ', any(Rule), ': ',
              JSONExtractString(any(Body), 'subject')) AS text,
       concat('alert,', any(Rule), ',', JSONExtractString(any(Body), 'severity')) AS tags
FROM notification_attempts
WHERE $__timeFilter(Time) AND Status = 'queued' AND JSONExtractString(Body, 'reason') != 'repeat'
GROUP BY Fingerprint, JSONExtractString(Body, 'status'), JSONExtractFloat(Body, 'starts_at')
ORDER BY time DESC
LIMIT """ + str(ANNOTATION_LIMIT)

#: Every remediation decision (taken, dry run, refused by a guard, failed) from the ``actions`` audit.
ACTION_ANNOTATION_SQL = """
SELECT Time AS time,
       concat(Action, ' ', Target, ': ', Decision, if(Reason != '', concat(' (', Reason, ')'), '')) AS text,
       concat('action,', Action, ',', Decision) AS tags
FROM actions
WHERE $__timeFilter(Time)
ORDER BY time DESC
LIMIT """ + str(ANNOTATION_LIMIT)


_BUILTIN_ANNOTATION = {
    "builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"}, "enable": True, "hide": True,
    "iconColor": "rgba(0, 211, 255, 1)", "name": "Annotations & Alerts", "type": "dashboard",
}


def dashboard(uid: str, title: str, *, description: str, panels: Sequence[tuple[Json, int, int]],
              variables: Sequence[Json], annotation_sql: str, links: Sequence[Json], tags: Sequence[str] = ()) -> Json:
    """A whole dashboard; ``id`` stays null so Grafana matches it by ``uid``.

    Every dashboard carries three annotation queries: ``annotation_sql`` (its findings),
    the alerts notified (:data:`ALERT_ANNOTATION_SQL`) and the remediation decisions
    (:data:`ACTION_ANNOTATION_SQL`).
    """
    return {
        "id": None,
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["stethoscope", *tags],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-6h", "to": "now"},
        "refresh": "1m",
        "templating": {"list": [datasource_variable(), *variables]},
        "annotations": {"list": [dict(_BUILTIN_ANNOTATION), findings_annotation(annotation_sql),
                                 annotation("Alerts", ALERT_ANNOTATION_SQL, "orange"),
                                 annotation("Remediation actions", ACTION_ANNOTATION_SQL, "purple")]},
        "links": list(links),
        "panels": arrange(panels),
    }
