"""The Python snippets in docs/sdk.md run as written, against a running ``up``, and their data lands.

Each ```` ```python ```` block of docs/sdk.md is run in a fresh namespace with only its
``ENDPOINT = "http://127.0.0.1:4318"`` line pointed at the test service; then the
store is queried for what that snippet should have sent.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from tests.conftest import sql

DOC = Path(__file__).resolve().parents[1] / "docs" / "sdk.md"
ENDPOINT_LINE = 'ENDPOINT = "http://127.0.0.1:4318"'


def snippets() -> dict[str, tuple[int, str]]:
    """``{section heading: (line number, code)}`` for every Python block of the page."""
    text = DOC.read_text()
    out: dict[str, tuple[int, str]] = {}
    heading = ""
    for m in re.finditer(r"^## ([^\n]+)$|^```python\n(.*?)^```$", text, re.MULTILINE | re.DOTALL):
        if m.group(1):
            heading = m.group(1).strip()
        else:
            assert heading not in out, f"two Python blocks under {heading!r}"
            out[heading] = (text.count("\n", 0, m.start(2)) + 1, m.group(2))
    return out


# What each snippet must have stored: queries, each with a check on its single number.
REQUESTS = ("SELECT sum(Value) FROM otel_metrics_sum WHERE MetricName = 'stethoscope.model.requests' "
            "AND Attributes['stethoscope.model'] = 'fraud'")
EXPECTED = {
    "A model server": [(REQUESTS, lambda n: n == 257)],  # 1 record() + a batch of 256
    "An HTTP model server": [
        (REQUESTS, lambda n: n == 50),
        # Latency measured in the handler: one histogram count per request.
        ("SELECT sum(Count) FROM otel_metrics_histogram WHERE MetricName = 'stethoscope.model.latency' "
         "AND Attributes['stethoscope.model'] = 'fraud'", lambda n: n == 50),
    ],
    "A PyTorch training loop": [
        # Every step is counted; the per-step gauges are thinned above max_steps_per_s.
        ("SELECT sum(Value) FROM otel_metrics_sum WHERE MetricName = 'stethoscope.train.steps' "
         "AND Attributes['stethoscope.train.job'] = 'demo-job'", lambda n: n == 20),
        # The torch hooks: activation statistics of layer "1" and gradient norms.
        ("SELECT count() FROM otel_metrics_gauge WHERE MetricName = 'stethoscope.train.activation.mean' "
         "AND Attributes['stethoscope.train.layer'] = '1'", lambda n: n >= 1),
        ("SELECT countIf(Value > 0) FROM otel_metrics_gauge WHERE MetricName = 'stethoscope.train.grad_norm'",
         lambda n: n >= 1),
    ],
}


def test_every_snippet_is_covered() -> None:
    assert set(snippets()) == set(EXPECTED)


@pytest.mark.parametrize("heading", sorted(EXPECTED))
def test_snippet_runs_and_its_data_lands(heading: str, service) -> None:
    line, code = snippets()[heading]
    assert code.count(ENDPOINT_LINE) == 1, f"{heading}: the snippet must set {ENDPOINT_LINE}"
    endpoint = f"http://127.0.0.1:{service.otlp.port}"
    code = code.replace(ENDPOINT_LINE, f'ENDPOINT = "{endpoint}"')
    namespace: dict = {"__name__": "__docs_snippet__"}
    exec(compile(code, f"{DOC}:{line}", "exec"), namespace)  # noqa: S102 (running the documentation)
    monitor = namespace["monitor"]
    assert getattr(monitor, "_closed", None) is True, f"{heading}: the snippet should close its monitor"
    assert not any(dict(monitor.dropped).values()), f"{heading}: the SDK dropped {dict(monitor.dropped)}"

    for query, check in EXPECTED[heading]:
        value = float(sql(service, query).strip() or 0)
        assert check(value), f"{heading}: {query} gave {value}"


# -- docs/quickstart.md: the `stethoscope sql` queries run and find what the agent sent ----

QUICKSTART = DOC.parent / "quickstart.md"


def quickstart_queries() -> list[str]:
    return re.findall(r'^\.venv/bin/stethoscope sql "([^"]+)"$', QUICKSTART.read_text(), re.MULTILINE)


def test_quickstart_queries_run_against_agent_data(service) -> None:
    from stethoscope.cli import _build_agent
    from stethoscope.config import load_config

    queries = quickstart_queries()
    assert len(queries) == 5
    cfg = load_config(environ={}, overrides={"agent.collectors": "host", "agent.spool_dir": "none"})
    agent, _ = _build_agent(cfg, f"http://127.0.0.1:{service.otlp.port}", in_process=True)
    try:
        # Two collections: rates and utilizations need a previous reading.
        assert agent.flush()
        time.sleep(0.2)
        assert agent.flush()
    finally:
        agent.shutdown()
    results = [sql(service, q) for q in queries]
    tables, gauges, cpu, network, _findings = results
    assert {"otel_metrics_gauge", "findings", "samples"} <= set(tables.split())
    assert "system.cpu.utilization" in gauges
    rows = [line.split("\t") for line in cpu.strip().splitlines()]
    assert rows and all(r[1] and 0 <= float(r[2]) <= 1 for r in rows), cpu
    assert "system.network.io" in network


# -- docs/scaling.md: the tables that stay unreplicated on a cluster -------------------------


def test_scaling_lists_the_tables_that_stay_unreplicated() -> None:
    from stethoscope.exporters.schema import SchemaOptions, create_statements

    text = (DOC.parent / "scaling.md").read_text()
    (listed,) = re.findall(r"Unreplicated tables: ([^.]+)\.", text)
    documented = set(re.findall(r"`(\w+)`", listed))
    unreplicated = set()
    for stmt in create_statements(SchemaOptions(cluster="c", engine="ReplicatedMergeTree")):
        table = re.search(r"CREATE TABLE IF NOT EXISTS `\w+`\.`(\w+)`", stmt)
        engine = re.search(r"^ENGINE = (\w+)", stmt, re.MULTILINE)
        if table and engine and not engine.group(1).startswith("Replicated"):
            unreplicated.add(table.group(1))
    assert documented == unreplicated
    assert "ON CLUSTER `stethoscope`" in text and "ENGINE = ReplicatedMergeTree()" in text


# -- links in the newcomer pages resolve ---------------------------------------------------

LINKED_PAGES = ["docs/README.md", "docs/quickstart.md", "docs/concepts.md", "docs/scaling.md", "docs/deploy.md",
                "deploy/README.md"]


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lowercase, punctuation dropped, spaces to hyphens."""
    out = set()
    for heading in re.findall(r"^#+ (.+)$", path.read_text(), re.MULTILINE):
        out.add(re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-"))
    return out


@pytest.mark.parametrize("page", LINKED_PAGES)
def test_relative_links_resolve(page: str) -> None:
    root = DOC.parents[1]
    source = root / page
    text = re.sub(r"```.*?```", "", source.read_text(), flags=re.DOTALL)
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert links
    for link in links:
        if re.match(r"[a-z]+://", link):
            continue
        target, _, anchor = link.partition("#")
        path = (source.parent / target).resolve() if target else source
        assert path.exists(), f"{page}: {link} points at a missing file"
        if anchor and path.suffix == ".md":
            assert anchor in anchors(path), f"{page}: {link}: no heading #{anchor} in {path.name}"
