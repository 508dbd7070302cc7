"""Configuration layering and validation."""

from __future__ import annotations

import pytest

from stethoscope.config import describe, load_config
from stethoscope.errors import ConfigError


def test_defaults():
    cfg = load_config(environ={})
    assert (cfg.collector.host, cfg.collector.otlp_http_port, cfg.sql.port) == ("127.0.0.1", 4318, 8123)
    assert cfg.store.data_dir == "./stethoscope-data" and cfg.sql.writable is False
    assert cfg.agent.endpoint == "http://127.0.0.1:4318" and cfg.agent.collectors == ("host", "gpu")


def test_file_then_env_then_flags(tmp_path):
    f = tmp_path / "s.toml"
    f.write_text('log_level = "DEBUG"\n[sql]\nport = 9001\nwritable = true\n[store]\ndata_dir = "/from/file"\nttl = "30d"\n'
                 '[agent]\ncollectors = ["host", "nvml"]\n')
    cfg = load_config(f, environ={"STETHOSCOPE_SQL_PORT": "9002", "STETHOSCOPE_STORE_DATA_DIR": "/from/env"},
                      overrides={"store.data_dir": "/from/flag", "sql.port": None})
    assert cfg.sql.port == 9002 and cfg.sql.writable is True
    assert cfg.store.data_dir == "/from/flag" and cfg.store.ttl == "30d"
    assert cfg.agent.collectors == ("host", "nvml") and cfg.log_level == "DEBUG"


def test_every_problem_is_reported_at_once(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text('[sql]\nport = 70000\nwritabel = true\n[nosuch]\nx = 1\n[collector]\nmax_body_bytes = "big"\n')
    with pytest.raises(ConfigError) as info:
        load_config(f, environ={"STETHOSCOPE_AGENT_ENDPOINT": "ftp://x", "STETHOSCOPE_SQL_WRITABLE": "maybe"})
    problems = info.value.problems
    assert len(problems) == 6, problems
    text = str(info.value)
    for needle in ("unknown key sql.writabel", "unknown key 'nosuch'", "sql.port (config file", "1..65535, got 70000",
                   "collector.max_body_bytes", "expected an integer, got 'big'",
                   "agent.endpoint (env STETHOSCOPE_AGENT_ENDPOINT): expected an http:// or https:// URL",
                   "sql.writable (env STETHOSCOPE_SQL_WRITABLE): expected true or false"):
        assert needle in text


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "none.toml", environ={})
    broken = tmp_path / "broken.toml"
    broken.write_text("[sql\nport=1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(broken, environ={})


def test_cross_checks():
    with pytest.raises(ConfigError, match="both 5000"):
        load_config(environ={}, overrides={"sql.port": 5000, "collector.otlp_http_port": 5000})
    with pytest.raises(ConfigError, match="store.cluster needs store.clickhouse_url"):
        load_config(environ={}, overrides={"store.cluster": "c1"})


def test_describe_lists_every_setting_with_help():
    rows = describe()
    keys = {r[0] for r in rows}
    assert {"store.data_dir", "collector.otlp_http_port", "sql.port", "sql.writable", "agent.endpoint"} <= keys
    assert all(r[3] for r in rows)
    assert ("sql.port", "STETHOSCOPE_SQL_PORT", 8123) == rows[[r[0] for r in rows].index("sql.port")][:3]


def test_configuration_reference_doc_is_current():
    from pathlib import Path

    from stethoscope.config import reference_markdown

    doc = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
    assert doc.read_text() == reference_markdown(), "regenerate: stethoscope config list --markdown > docs/configuration.md"
