"""``stethoscope report``: one self-contained HTML file whose figures match the data."""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import time
from html.parser import HTMLParser

import pytest
from conftest import make_service, sql, sql_url
from stethoscope.analytics.findings import Finding, FindingsWriter
from stethoscope.dashboards import report
from stethoscope.dashboards.report import (
    MAX_TABLE_ROWS,
    add_arguments,
    build_report,
    parse_duration,
    store_query,
)
from test_dashboards import _fill

HOSTILE = "<img src=x onerror=alert(1)>"
VOID = {"meta", "br", "img", "hr", "input", "link", "col", "area", "base", "source", "wbr"}
SVG_SELF_CLOSING = {"rect", "circle", "polyline", "line", "path"}


class _Checker(HTMLParser):
    """Fails on mismatched tags; collects the figures (data-key -> value text) and every tag and attribute."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.tags: list[tuple[str, dict]] = []
        self.figures: dict[str, str] = {}
        self.sections: dict[str, str] = {}
        self._figure: str | None = None
        self._in_value = False
        self._section: str | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag == "div" and a.get("class") == "fig":
            self._figure = a["data-key"]
        if tag == "span" and a.get("class") == "value" and self._figure:
            self._in_value = True
            self.figures[self._figure] = ""
        if tag == "section":
            self._section = a["id"]
            self.sections[self._section] = ""
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag not in VOID | SVG_SELF_CLOSING:
            self.errors.append(f"self-closed <{tag}/>")

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
            return
        self.stack.pop()
        if tag == "span":
            self._in_value = False
        if tag == "section":
            self._section = None

    def handle_data(self, data):
        if self._in_value and self._figure:
            self.figures[self._figure] += data
        if self._section:
            self.sections[self._section] += data


def _check(html: str) -> _Checker:
    c = _Checker()
    c.feed(html)
    c.close()
    assert not c.errors, c.errors[:5]
    assert c.stack == [], f"unclosed: {c.stack}"
    assert html.startswith("<!DOCTYPE html>")
    assert not [t for t, _ in c.tags if t in ("script", "iframe", "object", "embed", "link", "img")]
    lower = html.lower()
    assert "http:" not in lower and "https:" not in lower and "url(" not in lower and "@import" not in lower
    for tag, attrs in c.tags:
        assert not any(k.startswith("on") for k in attrs), (tag, attrs)
        assert "src" not in attrs, (tag, attrs)
        assert attrs.get("href", "#").startswith("#"), (tag, attrs)
    assert set(c.sections) == {"fleet", "training", "inference", "drift", "cost", "alerts"}
    return c


def _one(svc, query: str) -> dict:
    (row,) = [json.loads(line) for line in sql(svc, query, fmt="JSONEachRow").splitlines()]
    return row


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    # The anomaly watches write findings every few seconds, so critical findings would
    # keep arriving between the report and the queries that check it.
    svc = make_service(tmp_path_factory.mktemp("report"), **{"sql.writable": False, "anomaly.enabled": False})
    try:
        _fill(svc)
        hostile = Finding(time=time.time() - 10, kind="feature_drift", subject=f"model={HOSTILE}", model=HOSTILE,
                          model_version="1", feature="</td><script>alert(2)</script>", method="ks", statistic=0.5,
                          p_value=1e-9, effect=0.5, threshold=0.1, severity="critical", drifted=True)
        assert FindingsWriter(svc.store).write([hostile]) == 1
        deadline = time.monotonic() + 20
        while _one(svc, "SELECT count() AS n FROM findings")["n"] < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        yield svc
    finally:
        svc.stop()


@pytest.fixture(scope="module")
def page(live) -> tuple[str, _Checker]:
    html = build_report(store_query(live.store), since_s=3600, now=time.time() + 300, title=f"Incident {HOSTILE}")
    return html, _check(html)


def test_a_period_without_data_says_so_everywhere(live):
    """A period before any data: every section says so, none fails."""
    html = build_report(report.http_query(sql_url(live)), since_s=3600, now=time.time() - 30 * 86400)
    c = _check(html)
    for key, text in c.sections.items():
        assert "no data in this period" in text, key
    assert "query failed" not in html and not c.figures


@pytest.mark.e2e
def test_figures_match_independent_queries(live, page):
    html, c = page
    gpus = _one(live, "SELECT uniqExact(ResourceAttributes['host.name'], Attributes['gpu.index']) AS n "
                      "FROM otel_metrics_gauge WHERE MetricName = 'gpu.utilization'")["n"]
    assert int(c.figures["gpus"]) == int(gpus) == 4
    xid = _one(live, "SELECT sum(m) AS n FROM (SELECT max(Value) AS m FROM otel_metrics_sum "
                     "WHERE MetricName = 'gpu.xid.errors' GROUP BY ResourceAttributes['host.name'], "
                     "Attributes['gpu.index'], Attributes['gpu.xid'])")["n"]
    assert int(c.figures["xid"]) == int(xid) == 2
    drifted = _one(live, "SELECT countIf(d) AS n, count() AS total FROM (SELECT argMax(Drifted, Time) AS d "
                         "FROM findings WHERE Kind = 'feature_drift' GROUP BY Model, ModelVersion, Feature)")
    assert int(c.figures["drifted"]) == int(drifted["n"]) == 2
    assert int(c.figures["features"]) == int(drifted["total"]) == 3
    assert int(c.figures["ranks"]) == 2 and c.figures["slowest"].startswith("rank 1 (llm-pretrain)")
    assert c.figures["requests"].replace(",", "") == "600"
    hottest = _one(live, "SELECT max(Value) AS t FROM otel_metrics_gauge WHERE MetricName = 'gpu.temperature'")["t"]
    assert c.figures["temp_max"] == report._fmt(hottest, "°C")
    severities = {r["Severity"]: r["n"] for r in map(json.loads, sql(
        live, "SELECT Severity, count() AS n FROM findings WHERE Severity != 'info' GROUP BY Severity",
        fmt="JSONEachRow").splitlines())}
    assert int(c.figures["findings_critical"]) == int(severities["critical"]) == 2
    assert int(c.figures["findings_warning"]) == int(severities["warning"])
    assert float(c.figures["last_loss"]) == pytest.approx(2.0 / 12, rel=1e-3)
    assert c.figures["latency_p99"].endswith("ms") and c.figures["gpu_cost"].startswith("$")
    firing = _one(live, "SELECT countIf(State = 'firing') AS n FROM alerts "
                        "WHERE Kind = 'alert' AND Version = (SELECT max(Version) FROM alerts)")["n"]
    assert int(c.figures["alerts_firing"]) == int(firing) >= 1
    assert int(c.figures["actions"]) == 2 and "rate limit: 1 per 1h" in c.sections["alerts"]
    assert "FeatureDrift" in c.sections["alerts"]
    assert "no data in this period" not in " ".join(c.sections[s] for s in ("fleet", "training", "inference"))
    assert html.count("<svg") == 9 and "query failed" not in html
    assert len(html) < 200_000, "the report is a summary, not a dump"
    old = _check(build_report(store_query(live.store), since_s=3600, now=time.time() - 30 * 86400))
    assert all("no data in this period" in text for text in old.sections.values())


@pytest.mark.e2e
def test_hostile_values_are_escaped(page):
    html, c = page
    assert HOSTILE not in html and "<script>" not in html
    assert "&lt;img src=x onerror=alert(1)&gt;" in html  # shown, as text
    assert HOSTILE in c.sections["drift"] and HOSTILE in c.sections["alerts"]


@pytest.mark.e2e
def test_cli_writes_the_file_over_http(live, tmp_path):
    out = tmp_path / "r.html"
    args = add_arguments(argparse.ArgumentParser()).parse_args(
        ["--since", "2h", "--out", str(out), "--url", sql_url(live)])
    buf = io.StringIO()
    assert report.run(args, out=buf) == 0 and str(out) in buf.getvalue()
    c = _check(out.read_text(encoding="utf-8"))
    assert int(c.figures["gpus"]) == 4 and int(c.figures["xid"]) == 2


def test_a_failing_query_stays_in_its_section():
    def query(text: str) -> list[dict]:
        if "FROM findings" in text:
            raise report.ReportError("Code: 60. Table findings <b>does not exist</b>")
        return []

    html = build_report(query, since_s=600, now=1_700_000_000)
    c = _check(html)
    assert "query failed" in c.sections["drift"] and "<b>does not exist</b>" in c.sections["alerts"]
    assert "<b>" not in html and "&lt;b&gt;does not exist" in html  # escaped, shown as text
    for key in ("fleet", "training", "inference", "cost"):
        assert "no data in this period" in c.sections[key], key


def test_unreachable_endpoint_exits_2(tmp_path, capsys):
    args = add_arguments(argparse.ArgumentParser()).parse_args(
        ["--out", str(tmp_path / "x.html"), "--url", "http://127.0.0.1:9", "--timeout", "2"])
    assert report.run(args) == 2 and not (tmp_path / "x.html").exists()
    assert "cannot reach" in capsys.readouterr().err


def test_arguments_are_checked_up_front():
    assert parse_duration("1h") == 3600 and parse_duration("15m") == 900
    for bad in ("", "0", "-1h", "soon", "1y"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_duration(bad)
    with pytest.raises(ValueError):
        build_report(lambda s: [], since_s=60, gpu_hour_price="1 OR 1=1")
    with pytest.raises(ValueError):
        build_report(lambda s: [], since_s=0)


def test_tables_are_capped():
    rows = [{"Severity": "warning", "findings": 1, "time": "2023-11-14 22:13:20", "severity": "warning",
             "kind": f"k{i}", "subject": "s", "details": "x" * 5000} for i in range(40)]
    html = build_report(lambda s: rows if "FROM findings" in s else [], since_s=3600, now=1_700_000_000)
    c = _check(html)
    assert f"showing {MAX_TABLE_ROWS} of 40 rows" in c.sections["alerts"] and "x" * 200 not in html


@pytest.mark.skipif(not os.path.exists("/usr/bin/chromium"), reason="/usr/bin/chromium not installed (scripts/system-deps.sh installs it): PNG render skipped")
def test_renders_to_png_in_headless_chromium(page, tmp_path):
    src, png = tmp_path / "r.html", tmp_path / "r.png"
    src.write_text(page[0], encoding="utf-8")
    subprocess.run([shutil.which("chromium") or "/usr/bin/chromium", "--headless", "--no-sandbox", "--disable-gpu",
                    "--disable-quic", "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
                    f"--screenshot={png}", "--window-size=1200,3000", src.as_uri()], check=True, timeout=120,
                   capture_output=True)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1200, 3000)
    assert len(data) > 50_000  # charts and tables drawn, not a blank page


def test_docstring_examples_run():
    import doctest

    from stethoscope.dashboards import report_svg

    for mod in (report, report_svg):
        assert doctest.testmod(mod).failed == 0
