"""``stethoscope report``: the six dashboards as one self-contained HTML file.

For people without Grafana and for attaching to incident tickets. The figures,
charts and tables come from the dashboards' own panel SQL (:mod:`.build`, expanded
with :func:`.macros.render` for the report's time range, every variable at All),
plus a few small queries of our own. The HTML has no scripts and no external
references: inline CSS and inline SVG only; every value is escaped.

A section without data says "no data in this period"; a section whose query fails
shows the error and the others still render.

Examples:
    >>> html = build_report(lambda sql: [], since_s=3600, now=1_700_000_000)
    >>> html.count("no data in this period")
    6
    >>> parse_duration("90m"), parse_duration("2d"), parse_duration("45")
    (5400.0, 172800.0, 45.0)
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, tzinfo
from functools import cache
from html import escape
from typing import Any, TextIO
from zoneinfo import ZoneInfo

from ..errors import StethoscopeError
from .build import DASHBOARDS, DEFAULT_GPU_HOUR_PRICE
from .histogram import bucket_quantile_sql
from .macros import ALL, QueryContext, Variable, render
from .report_svg import PALETTE, line_chart

__all__ = ["MAX_TABLE_ROWS", "ReportError", "add_arguments", "build_report", "http_query", "parse_duration", "run",
           "store_query"]

Row = dict[str, Any]
Query = Callable[[str], list[Row]]

#: Tables show at most this many rows (the report is a summary, not a data dump).
MAX_TABLE_ROWS = 15
_MAX_CELL = 120
NO_DATA = "no data in this period"


class ReportError(StethoscopeError):
    """The SQL endpoint could not be reached or answered with an error."""


# ---------------------------------------------------------------- query functions

def _json_rows(body: bytes) -> list[Row]:
    return [json.loads(line) for line in body.decode("utf-8").splitlines() if line.strip()]


def http_query(url: str, *, timeout: float = 60.0) -> Query:
    """A query function that POSTs SQL to a ClickHouse HTTP interface (``default_format=JSONEachRow``)."""
    endpoint = url.rstrip("/") + "/?" + urllib.parse.urlencode({"default_format": "JSONEachRow"})

    def query(sql: str) -> list[Row]:
        req = urllib.request.Request(endpoint, data=sql.encode("utf-8"), method="POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return _json_rows(resp.read())
        except urllib.error.HTTPError as exc:
            raise ReportError(exc.read().decode("utf-8", "replace").strip()[:500] or str(exc)) from exc
        except (urllib.error.URLError, OSError) as exc:
            raise ReportError(f"cannot reach {url}: {getattr(exc, 'reason', exc)}") from exc

    return query


def store_query(store: Any) -> Query:
    """A query function over a :class:`~stethoscope.exporters.store.Store` (read-only)."""
    return lambda sql: _json_rows(store.query(sql, "JSONEachRow", readonly=True).data)


# ---------------------------------------------------------------- values

def _f(v: Any) -> float | None:
    if v is None or isinstance(v, bool):
        return None if v is None else float(v)
    try:
        out = float(v)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _fmt(v: Any, unit: str = "") -> str:
    x = _f(v)
    if x is None:
        plain = v is None or isinstance(v, (int, float)) or str(v).lower().lstrip("+-") in ("nan", "inf")
        return "–" if plain else str(v)
    if unit == "percent":
        return f"{x:.1%}"
    if unit == "usd":
        return f"${x:,.2f}"
    if unit == "int":
        return f"{x:,.0f}"
    text = f"{x:,.0f}" if x == int(x) and abs(x) < 1e15 else f"{x:.4g}"
    return f"{text} {unit}".strip()


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return _fmt(v)
    text = "" if v is None else str(v)
    return text if len(text) <= _MAX_CELL else text[:_MAX_CELL - 1] + "…"


def _truthy(v: Any) -> bool:
    return v in (True, 1, "1", "true", "True")


# ---------------------------------------------------------------- queries

@cache
def _dashboard(stem: str) -> dict[str, Any]:
    return DASHBOARDS[stem]()


class _Runner:
    def __init__(self, query: Query, ctx: QueryContext, price: str, tz: tzinfo) -> None:
        self.query, self.ctx, self.price, self.tz = query, ctx, price, tz

    def panel(self, stem: str, title: str) -> list[Row]:
        """Rows of one dashboard panel, every variable at All."""
        d = _dashboard(stem)
        (p,) = [p for p in d["panels"] if p["title"] == title]
        values: dict[Variable, Any] = {}
        for v in d["templating"]["list"]:
            var = Variable(v["name"], multi=bool(v.get("multi")), include_all=bool(v.get("includeAll")))
            if v["type"] == "constant":
                values[var] = self.price if v["name"] == "gpu_hour_price" else v["query"]
            elif v["type"] in ("query", "custom"):
                values[var] = ALL
        return self.query(render(p["targets"][0]["rawSql"], self.ctx, values))

    def sql(self, text: str) -> list[Row]:
        return self.query(render(text, self.ctx))

    def one(self, stem: str, title: str, col: str) -> Any:
        rows = self.panel(stem, title)
        return rows[0].get(col) if rows else None

    def epoch(self, v: Any) -> float | None:
        if isinstance(v, (int, float)):
            return float(v)
        try:
            return datetime.fromisoformat(str(v)).replace(tzinfo=self.tz).timestamp()
        except ValueError:
            return None


# ---------------------------------------------------------------- one section's body

class _Body:
    def __init__(self, r: _Runner) -> None:
        self.r, self.parts, self.figures, self.has_data = r, [], [], False

    def figure(self, key: str, label: str, value: Any, unit: str = "") -> None:
        self.figures.append(f'<div class="fig" data-key="{escape(key)}"><span class="label">{escape(label)}</span>'
                            f'<span class="value">{escape(_fmt(value, unit) if unit != "text" else str(value))}</span>'
                            "</div>")

    def chart(self, title: str, rows: list[Row], value_cols: Sequence[str]) -> None:
        series: dict[str, list[tuple[float, float]]] = {}
        for row in rows:
            t = self.r.epoch(row.get("time"))
            labels = " ".join(str(v) for k, v in row.items() if k != "time" and k not in value_cols)
            for col in value_cols:
                v = _f(row.get(col))
                if t is None or v is None:
                    continue
                name = _cell(f"{labels} {col}".strip() if len(value_cols) > 1 or not labels else labels)
                series.setdefault(name, []).append((t, v))
        if not series:
            self.parts.append(f'<div class="chart"><h3>{escape(title)}</h3><p class="empty">{NO_DATA}</p></div>')
            return
        self.has_data = True
        more = (f'<p class="note">{len(PALETTE)} of {len(series)} series shown</p>'
                if len(series) > len(PALETTE) else "")
        svg = line_chart(series, start=self.r.ctx.start, end=self.r.ctx.end, label=title)
        self.parts.append(f'<div class="chart"><h3>{escape(title)}</h3>{svg}{more}</div>')

    def table(self, title: str, rows: list[Row], drop: Sequence[str] = ()) -> None:
        head = f"<h3>{escape(title)}</h3>"
        if not rows:
            self.parts.append(f'<div class="table">{head}<p class="empty">{NO_DATA}</p></div>')
            return
        self.has_data = True
        cols = [c for c in rows[0] if c not in drop]
        body = "".join("<tr>" + "".join(f"<td>{escape(_cell(row.get(c)))}</td>" for c in cols) + "</tr>"
                       for row in rows[:MAX_TABLE_ROWS])
        note = (f'<p class="note">showing {MAX_TABLE_ROWS} of {len(rows)} rows</p>'
                if len(rows) > MAX_TABLE_ROWS else "")
        self.parts.append(f'<div class="table">{head}<table><thead><tr>'
                          + "".join(f"<th>{escape(c)}</th>" for c in cols)
                          + f"</tr></thead><tbody>{body}</tbody></table>{note}</div>")


# ---------------------------------------------------------------- the six sections

def _fleet(b: _Body) -> None:
    r = b.r
    util = r.panel("fleet", "GPU utilization")
    b.figure("gpus", "GPUs reporting", r.one("fleet", "GPUs reporting", "gpus"), "int")
    b.figure("util_mean", "Mean utilization", r.one("fleet", "Mean utilization", "utilization"), "percent")
    (peak,) = r.sql("SELECT max(Value) AS peak FROM otel_metrics_gauge "
                    "WHERE MetricName = 'gpu.utilization' AND $__timeFilter(TimeUnix)") or [{}]
    b.figure("util_max", "Max utilization", peak.get("peak") if util else None, "percent")
    b.figure("temp_max", "Max temperature", r.one("fleet", "Hottest GPU", "temperature"), "°C")
    b.figure("xid", "XID errors", r.one("fleet", "XID errors", "xid_errors"), "int")
    (thr,) = r.sql("SELECT uniqExactIf((ResourceAttributes['host.name'], Attributes['gpu.index']), Value > 0) AS gpus "
                   "FROM otel_metrics_gauge WHERE MetricName = 'gpu.throttle' "
                   "AND Attributes['gpu.throttle.reason'] != 'gpu_idle' AND $__timeFilter(TimeUnix)") or [{}]
    b.figure("throttled", "Throttled GPUs", thr.get("gpus"), "int")
    b.chart("GPU utilization", util, ["value"])
    b.chart("GPU temperature", r.panel("fleet", "GPU temperature"), ["value"])
    b.table("XID and ECC errors by GPU", r.panel("fleet", "XID and ECC errors by GPU"))


def _training(b: _Body) -> None:
    r = b.r
    ranks = r.panel("training", "Stragglers: step time per rank vs the job median")
    b.figure("ranks", "Training ranks", len(ranks), "int")
    losses = r.sql("SELECT Attributes['stethoscope.train.job'] AS job, argMax(Value, TimeUnix) AS loss "
                   "FROM otel_metrics_gauge WHERE MetricName = 'stethoscope.train.loss' AND $__timeFilter(TimeUnix) "
                   "GROUP BY job ORDER BY job")
    b.figure("last_loss", "Last loss", losses[0]["loss"] if len(losses) == 1 else
             ", ".join(f"{x['job']}: {_fmt(x['loss'])}" for x in losses[:4]) or None,
             "" if len(losses) <= 1 else "text")
    slow = max(ranks, key=lambda x: _f(x.get("vs_median")) or 0.0) if ranks else None
    b.figure("slowest", "Slowest rank vs median",
             f"rank {slow['rank']} ({slow['job']}): {_fmt(slow['vs_median'])}×" if slow else "–", "text")
    b.figure("step", "Latest step", r.one("training", "Latest step", "step") if ranks else None, "int")
    b.figure("nonfinite", "Non-finite values", r.one("training", "Non-finite values", "nonfinite"), "int")
    b.chart("Loss", r.panel("training", "Loss"), ["value"])
    b.chart("Step time by rank (s)", r.panel("training", "Step time by rank"), ["step_time"])
    b.table("Stragglers: step time per rank vs the job median", ranks)


def _inference(b: _Body) -> None:
    r = b.r
    b.figure("requests", "Requests", r.one("inference", "Requests", "requests"), "int")
    b.figure("error_share", "Error share", r.one("inference", "Error share", "error_share"), "percent")
    b.figure("latency_mean", "Mean latency", r.one("inference", "Mean latency", "latency_ms"), "ms")
    (p99,) = r.sql(f"SELECT {bucket_quantile_sql(0.99)} AS p99 FROM ("
                   "SELECT sumForEach(BucketCounts) AS counts, any(ExplicitBounds) AS bounds "
                   "FROM otel_metrics_histogram WHERE MetricName = 'stethoscope.model.latency' "
                   "AND $__timeFilter(TimeUnix))") or [{}]
    b.figure("latency_p99", "p99 latency", p99.get("p99"), "ms")
    b.chart("Requests per second", r.panel("inference", "Requests per second"), ["rps"])
    b.chart("Latency p50 / p90 / p99 (ms)", r.panel("inference", "Latency p50 / p90 / p99"), ["p50", "p90", "p99"])
    b.table("Per model version", r.panel("inference", "Per model version"))


def _drift(b: _Body) -> None:
    r = b.r
    features = r.panel("drift", "Per-feature drift (latest window)")
    b.figure("drifted", "Drifted features", sum(_truthy(x.get("drifted")) for x in features), "int")
    b.figure("features", "Features checked", len(features), "int")
    b.chart("Drift statistic by feature", r.panel("drift", "Drift statistic by feature"), ["value"])
    b.table("Per-feature drift (latest window)", features)
    b.table("Samples by stream", r.panel("drift", "Samples by stream"))


def _cost(b: _Body) -> None:
    r = b.r
    over_time = r.panel("cost", "GPU cost over time")
    b.figure("gpu_hours", "GPU hours", r.one("cost", "GPU hours", "gpu_hours"), "")
    b.figure("gpu_cost", f"GPU cost (at ${r.price}/GPU hour)", r.one("cost", "GPU cost", "cost"), "usd")
    b.figure("idle_cost", "Idle cost", r.one("cost", "Idle cost", "idle_cost"), "usd")
    b.figure("cost_per_1k", "GPU cost per 1,000 predictions",
             r.one("cost", "GPU cost per 1,000 predictions", "cost_per_1k"), "usd")
    b.chart("GPU cost over time (USD per interval)", over_time, ["busy_and_idle", "idle"])
    b.table("Cost by node", r.panel("cost", "Cost by node"))


def _alerts(b: _Body) -> None:
    r = b.r
    counts = r.sql("SELECT Severity AS severity, count() AS findings FROM findings "
                   "WHERE $__timeFilter(Time) AND Severity != 'info' GROUP BY severity ORDER BY severity")
    by = {str(x["severity"]): x["findings"] for x in counts}
    for sev in ("critical", "warning", *sorted(set(by) - {"critical", "warning"})):
        b.figure(f"findings_{sev}", f"{sev.capitalize()} findings", by.get(sev, 0), "int")
    # The alert state at the end of the period: the newest snapshot taken inside it (the dashboard's
    # "Alerts now" panel shows the newest one whatever the range).
    alerts_now = r.sql(
        "SELECT Rule AS rule, State AS state, JSONExtractString(Body, 'subject') AS subject, "
        "toDateTime64(JSONExtractFloat(Body, 'active_since'), 3) AS since FROM alerts "
        "WHERE Kind = 'alert' AND Version = (SELECT max(Version) FROM alerts WHERE Kind = 'snapshot' "
        "AND Version >= toUnixTimestamp($__fromTime) * 1000 AND Version <= toUnixTimestamp($__toTime) * 1000) "
        "ORDER BY state = 'firing' DESC, since DESC")
    b.figure("alerts_firing", "Alerts firing at the end", sum(x.get("state") == "firing" for x in alerts_now), "int")
    audit = r.panel("alerts", "Remediation audit")
    b.figure("actions", "Remediation decisions", len(audit), "int")
    b.chart("Findings over time, by severity", r.panel("alerts", "Findings over time, by severity"), ["findings"])
    b.table("Alerts at the end of the period", alerts_now)
    b.table("Latest findings", r.panel("alerts", "Findings"), drop=("details",))
    b.table("Alert history", r.panel("alerts", "Alert history"))
    b.table("Remediation audit", audit, drop=("result",))


_SECTIONS: tuple[tuple[str, str, Callable[[_Body], None]], ...] = (
    ("fleet", "Fleet and GPU health", _fleet),
    ("training", "Training", _training),
    ("inference", "Inference", _inference),
    ("drift", "Model performance and drift", _drift),
    ("cost", "Cost", _cost),
    ("alerts", "Alerts and findings", _alerts),
)

_CSS = """body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px;margin:0}h2{border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:28px}h3{font-size:14px;margin:8px 0 4px}
.meta{color:#666}.figs{display:flex;flex-wrap:wrap;gap:10px}.fig{border:1px solid #ddd;border-radius:6px;padding:8px 12px;min-width:130px}
.fig .label{display:block;color:#666;font-size:12px}.fig .value{font-size:20px;font-weight:600}
.grid{display:flex;flex-wrap:wrap;gap:16px}.chart,.table{margin-top:8px}table{border-collapse:collapse;font-size:12px}
td,th{border:1px solid #ddd;padding:2px 6px;text-align:left}th{background:#f3f3f3}.empty,.note{color:#888;font-style:italic}
.error{color:#b00;background:#fee;padding:8px;border-radius:4px;white-space:pre-wrap}
.legend{font-size:11px}.key{margin-right:10px}.key i{display:inline-block;width:10px;height:10px;margin-right:3px}"""


def _section(key: str, title: str, fill: Callable[[_Body], None], r: _Runner) -> str:
    b = _Body(r)
    try:
        fill(b)
    except Exception as exc:  # noqa: BLE001 - any failure of the caller's query function stays in its section
        content = f'<p class="error">query failed: {escape(type(exc).__name__)}: {escape(str(exc)[:500])}</p>'
    else:
        content = (f'<div class="figs">{"".join(b.figures)}</div><div class="grid">{"".join(b.parts)}</div>'
                   if b.has_data else f'<p class="empty">{NO_DATA}</p>')
    return f'<section id="{key}"><h2>{escape(title)}</h2>{content}</section>'


def _server_tz(query: Query) -> tzinfo:
    """The zone ClickHouse prints DateTime values in (UTC when it cannot be asked)."""
    try:
        rows = query("SELECT timezone() AS tz")
        return ZoneInfo(str(rows[0]["tz"])) if rows else UTC
    except Exception:  # noqa: BLE001 - a broken endpoint shows up in every section instead
        return UTC


def build_report(query: Query, *, since_s: float, now: float | None = None,
                 title: str = "Stethoscope report", gpu_hour_price: str = DEFAULT_GPU_HOUR_PRICE) -> str:
    """The whole report over ``[now - since_s, now]`` as one HTML document.

    ``query`` runs one SQL statement and returns its rows as dicts (see :func:`http_query`
    and :func:`store_query`).
    """
    if since_s <= 0:
        raise ValueError(f"since_s must be positive, got {since_s}")
    if not re.fullmatch(r"\d+(\.\d+)?", gpu_hour_price):  # it goes into the SQL: digits only
        raise ValueError(f"gpu_hour_price must be a plain decimal number, got {gpu_hour_price!r}")
    end = time.time() if now is None else float(now)
    ctx = QueryContext(start=end - since_s, end=end, interval_s=max(60.0, since_s / 60))
    r = _Runner(query, ctx, gpu_hour_price, _server_tz(query))

    def stamp(t: float) -> str:
        return datetime.fromtimestamp(t, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")

    toc = " · ".join(f'<a href="#{k}">{escape(t)}</a>' for k, t, _ in _SECTIONS)
    sections = "".join(_section(k, t, fill, r) for k, t, fill in _SECTIONS)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f'<style>{_CSS}</style></head><body><header><h1>{escape(title)}</h1>'
            f'<p class="meta">{escape(stamp(ctx.start))} to {escape(stamp(ctx.end))} '
            f'({escape(_fmt(since_s / 3600))} h, {int(ctx.interval_s)} s intervals) · generated '
            f'{escape(stamp(time.time()))}</p><nav>{toc}</nav></header>{sections}</body></html>\n')


# ---------------------------------------------------------------- CLI

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


def parse_duration(text: str) -> float:
    """``90s``, ``30m``, ``1h``, ``2d``, ``1w`` or plain seconds; positive."""
    text = text.strip().lower()
    try:
        value = float(text[:-1]) * _UNITS[text[-1]] if text and text[-1] in _UNITS else float(text)
    except ValueError:
        value = math.nan
    if not value > 0:
        raise argparse.ArgumentTypeError(f"not a positive duration: {text!r} (try 30m, 1h, 2d)")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--since", type=parse_duration, default=3600.0, help="time range back from now (default 1h)")
    parser.add_argument("--out", default="report.html", help="HTML file to write (default report.html)")
    parser.add_argument("--url", default="http://127.0.0.1:8123", help="SQL endpoint (default http://127.0.0.1:8123)")
    parser.add_argument("--title", default="Stethoscope report")
    parser.add_argument("--gpu-hour-price", default=DEFAULT_GPU_HOUR_PRICE,
                        help=f"USD per GPU hour for the cost section (default {DEFAULT_GPU_HOUR_PRICE})")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per query (default 60)")
    return parser


def run(args: argparse.Namespace, *, out: TextIO | None = None) -> int:
    """Write the report; 2 when the endpoint cannot be reached at all."""
    out = out or sys.stdout
    query = http_query(args.url, timeout=args.timeout)
    try:
        query("SELECT 1")
    except ReportError as exc:
        print(f"stethoscope report: {exc} (is `stethoscope up` running?)", file=sys.stderr)
        return 2
    text = build_report(query, since_s=args.since, title=args.title, gpu_hour_price=args.gpu_hour_price)
    with open(args.out, "w", encoding="utf-8") as fh:
        fh.write(text)
    print(f"{args.out}\t{len(text.encode('utf-8'))} bytes", file=out)
    return 0
