"""Schema creation and migration, and the Store contract on the embedded backend."""

from __future__ import annotations

import json

import pytest

from stethoscope.errors import PluginError, SchemaError, StoreError
from stethoscope.exporters import schema
from stethoscope.exporters.chdb_store import ChdbStore
from stethoscope.exporters.store import open_store

_M = "Map(LowCardinality(String), String)"
_HEAD = [
    ("ResourceAttributes", _M), ("ResourceSchemaUrl", "String"), ("ScopeName", "String"),
    ("ScopeVersion", "String"), ("ScopeAttributes", _M), ("ScopeDroppedAttrCount", "UInt32"),
    ("ScopeSchemaUrl", "String"), ("ServiceName", "LowCardinality(String)"),
    ("MetricName", "LowCardinality(String)"), ("MetricDescription", "String"), ("MetricUnit", "String"),
    ("Attributes", _M), ("StartTimeUnix", "DateTime64(9)"), ("TimeUnix", "DateTime64(9)"),
]
_EX = [
    ("Exemplars.FilteredAttributes", f"Array({_M})"), ("Exemplars.TimeUnix", "Array(DateTime64(9))"),
    ("Exemplars.Value", "Array(Float64)"), ("Exemplars.SpanId", "Array(String)"), ("Exemplars.TraceId", "Array(String)"),
]
# Column names and types of the OpenTelemetry Collector's clickhouseexporter tables
# (internal/sqltemplates/*.sql), with nanosecond timestamps and LowCardinality metric names.
EXPORTER_COLUMNS = {
    "otel_metrics_gauge": _HEAD + [("Value", "Float64"), ("Flags", "UInt32")] + _EX,
    "otel_metrics_sum": _HEAD + [("Value", "Float64"), ("Flags", "UInt32")] + _EX
    + [("AggregationTemporality", "Int32"), ("IsMonotonic", "Bool")],
    "otel_metrics_histogram": _HEAD + [("Count", "UInt64"), ("Sum", "Float64"), ("BucketCounts", "Array(UInt64)"),
                                       ("ExplicitBounds", "Array(Float64)")] + _EX
    + [("Flags", "UInt32"), ("Min", "Float64"), ("Max", "Float64"), ("AggregationTemporality", "Int32")],
    "otel_metrics_exponential_histogram": _HEAD + [
        ("Count", "UInt64"), ("Sum", "Float64"), ("Scale", "Int32"), ("ZeroCount", "UInt64"),
        ("PositiveOffset", "Int32"), ("PositiveBucketCounts", "Array(UInt64)"), ("NegativeOffset", "Int32"),
        ("NegativeBucketCounts", "Array(UInt64)")] + _EX
    + [("Flags", "UInt32"), ("Min", "Float64"), ("Max", "Float64"), ("AggregationTemporality", "Int32")],
    "otel_metrics_summary": _HEAD + [("Count", "UInt64"), ("Sum", "Float64"), ("ValueAtQuantiles.Quantile", "Array(Float64)"),
                                     ("ValueAtQuantiles.Value", "Array(Float64)"), ("Flags", "UInt32")],
    "otel_logs": [
        ("Timestamp", "DateTime64(9)"), ("TimestampTime", "DateTime"), ("TraceId", "String"), ("SpanId", "String"),
        ("TraceFlags", "UInt8"), ("SeverityText", "LowCardinality(String)"), ("SeverityNumber", "UInt8"),
        ("ServiceName", "LowCardinality(String)"), ("Body", "String"), ("ResourceSchemaUrl", "LowCardinality(String)"),
        ("ResourceAttributes", _M), ("ScopeSchemaUrl", "LowCardinality(String)"), ("ScopeName", "String"),
        ("ScopeVersion", "LowCardinality(String)"), ("ScopeAttributes", _M), ("LogAttributes", _M), ("EventName", "String"),
    ],
}


_LC = "LowCardinality(String)"
# Stethoscope's own tables (exporters/schema.py), which analytics reads.
OWN_COLUMNS = {
    "samples": [
        ("Timestamp", "DateTime64(9)"), ("ServiceName", _LC), ("Model", _LC), ("ModelVersion", _LC), ("Stream", _LC),
        ("RequestId", "String"), ("Features", "Array(Float32)"), ("FeatureNames", f"Array({_LC})"),
        ("Prediction", "Float64"), ("PredictionLabel", "String"), ("Confidence", "Float64"),
        ("AdjustedCount", "Float64"), ("SamplingThreshold", "String"), ("Uncertain", "Bool"),
        ("Attributes", _M), ("ResourceAttributes", _M),
    ],
    "labels": [
        ("Timestamp", "DateTime64(9)"), ("ServiceName", _LC), ("Model", _LC), ("RequestId", "String"),
        ("Label", "Float64"), ("LabelText", "String"), ("Attributes", _M), ("ResourceAttributes", _M),
    ],
    "sampling_config": [
        ("Stream", "String"), ("Settings", "String"), ("Version", "UInt64"), ("ExpiresAt", "DateTime64(3)"),
        ("UpdatedAt", "DateTime64(3)"),
    ],
    "findings": [
        ("Time", "DateTime64(3)"), ("Kind", _LC), ("Subject", "String"), ("Model", _LC), ("ModelVersion", _LC),
        ("Feature", "String"), ("Method", _LC), ("Statistic", "Float64"), ("PValue", "Float64"),
        ("Effect", "Float64"), ("Threshold", "Float64"), ("Severity", _LC), ("Drifted", "Bool"),
        ("WindowStart", "DateTime64(3)"), ("WindowEnd", "DateTime64(3)"), ("Details", "String"), ("Labels", _M),
        ("InsertedAt", "DateTime64(3)"),
    ],
}


@pytest.mark.parametrize("table", sorted(OWN_COLUMNS))
def test_own_tables_have_their_columns(store, table):
    rows = store.query(f"DESCRIBE TABLE {table}", "JSONEachRow").data.decode().splitlines()
    assert [(r["name"], r["type"]) for r in map(json.loads, rows)] == OWN_COLUMNS[table]


def _ddl(st, database: str) -> dict[str, str]:
    out = st.query(f"SELECT name, create_table_query FROM system.tables WHERE database = '{database}'",
                   "JSONCompactEachRow", readonly=False).data.decode().splitlines()
    return {name: ddl.replace(f"{database}.", "DB.") for name, ddl in map(json.loads, out)}


def test_migration_2_and_fresh_creation_give_identical_tables(store):
    migration = next(m for m in schema.MIGRATIONS if m.version == 2)
    store.execute("CREATE DATABASE migrated")
    for stmt in migration.statements:
        store.execute(stmt.format(db="`migrated`", on_cluster=""))
    fresh, migrated = _ddl(store, "stethoscope"), _ddl(store, "migrated")
    assert set(migrated) == {"samples", "labels", "sampling_config"}
    for name, ddl in migrated.items():
        assert ddl == fresh[name]
    assert "bloom_filter" in fresh["samples"] and "bloom_filter" in fresh["labels"]
    assert "ReplacingMergeTree(Version)" in fresh["sampling_config"]


def test_an_older_store_is_migrated_and_reapplying_is_harmless(tmp_path):
    st = ChdbStore(tmp_path)
    try:
        old = [schema.MIGRATIONS_TABLE, *(t for t in schema.TABLES.values()
                                          if t.name not in ("samples", "labels", "sampling_config", "findings"))]
        for stmt in schema.create_statements(schema.SchemaOptions(), old):
            st.execute(stmt)
        st.execute("INSERT INTO schema_migrations (Version, Description, AppliedAt) VALUES (1, 'initial', now64(3))")
        assert "samples" not in _ddl(st, "stethoscope")
        assert st.ensure_schema() == [m.version for m in schema.MIGRATIONS if m.version >= 2]
        assert {"samples", "labels", "sampling_config"} <= set(_ddl(st, "stethoscope"))
        st.query("INSERT INTO labels (RequestId, Label) VALUES ('r1', 1)", readonly=False)
        for stmt in next(m for m in schema.MIGRATIONS if m.version == 2).statements:  # once more, by hand
            st.execute(stmt.format(db="`stethoscope`", on_cluster=""))
        assert st.ensure_schema() == []
        assert st.query("SELECT RequestId, Label FROM labels", "TabSeparated").data == b"r1\t1\n"
    finally:
        st.close()


def test_migration_3_and_fresh_creation_give_identical_findings_tables(store):
    migration = next(m for m in schema.MIGRATIONS if m.version == 3)
    store.execute("CREATE DATABASE migrated")
    for stmt in migration.statements:
        store.execute(stmt.format(db="`migrated`", on_cluster=""))
    fresh, migrated = _ddl(store, "stethoscope"), _ddl(store, "migrated")
    assert set(migrated) == {"findings"}
    assert migrated["findings"] == fresh["findings"]
    assert "ORDER BY (Kind, Model, Time)" in fresh["findings"]


def test_a_store_from_before_findings_gets_migration_3(tmp_path):
    opts = schema.SchemaOptions(ttl_seconds=7 * 86400)
    st = ChdbStore(tmp_path, opts)
    try:
        old = [schema.MIGRATIONS_TABLE, *(t for t in schema.TABLES.values() if t.name != "findings")]
        for stmt in schema.create_statements(opts, old):
            st.execute(stmt)
        for version in (1, 2):
            st.execute(f"INSERT INTO schema_migrations (Version, Description, AppliedAt) VALUES ({version}, 'old', now64(3))")
        st.query("INSERT INTO labels (Timestamp, RequestId, Label) VALUES (now64(9), 'r1', 1)", readonly=False)
        assert "findings" not in _ddl(st, "stethoscope")
        assert st.ensure_schema() == [m.version for m in schema.MIGRATIONS if m.version >= 3]
        ddl = _ddl(st, "stethoscope")
        assert "toIntervalDay(7)" in ddl["findings"]  # TTL like the other tables
        assert st.ensure_schema() == []
        assert st.query("SELECT RequestId, Label FROM labels", "TabSeparated").data == b"r1\t1\n"
        assert st.query("SELECT count() FROM findings", "TabSeparated").data == b"0\n"
    finally:
        st.close()


@pytest.mark.parametrize("table", sorted(EXPORTER_COLUMNS))
def test_tables_match_the_collector_exporter(store, table):
    rows = store.query(f"DESCRIBE TABLE {table}", "JSONEachRow").data.decode().splitlines()
    got = [(r["name"], r["type"]) for r in map(json.loads, rows)]
    assert got == EXPORTER_COLUMNS[table]


def test_ensure_schema_is_idempotent_and_records_migrations(store):
    assert store.ensure_schema() == []  # the fixture already applied everything
    assert store.ensure_schema() == []
    versions = store.query("SELECT Version, Description FROM schema_migrations FINAL ORDER BY Version", "JSONEachRow").data
    assert [json.loads(x)["Version"] for x in versions.splitlines()] == [m.version for m in schema.MIGRATIONS]


def test_ttl_is_applied_changed_and_removed(tmp_path):
    def ttl_of(st, table="otel_metrics_gauge"):
        ddl = st.query(f"SELECT create_table_query FROM system.tables WHERE database = 'stethoscope' AND name = '{table}'",
                       "TabSeparatedRaw").data.decode()
        return ddl.split(" TTL ", 1)[1].split(" SETTINGS", 1)[0] if " TTL " in ddl else None

    st = ChdbStore(tmp_path, schema.SchemaOptions(ttl_seconds=7 * 86400))
    try:
        st.ensure_schema()
        assert ttl_of(st) == "toDateTime(TimeUnix) + toIntervalDay(7)"
        assert ttl_of(st, "otel_logs") == "toDateTime(TimestampTime) + toIntervalDay(7)"
        assert ttl_of(st, "samples") == "toDateTime(Timestamp) + toIntervalDay(7)"
        assert ttl_of(st, "labels") == "toDateTime(Timestamp) + toIntervalDay(7)"
        assert ttl_of(st, "sampling_config") is None  # overrides expire by themselves
    finally:
        st.close()
    st = ChdbStore(tmp_path, schema.SchemaOptions(ttl_seconds=12 * 3600))
    try:
        st.ensure_schema()
        assert ttl_of(st) == "toDateTime(TimeUnix) + toIntervalHour(12)"
        assert ttl_of(st, "samples") == "toDateTime(Timestamp) + toIntervalHour(12)"
    finally:
        st.close()
    st = ChdbStore(tmp_path, schema.SchemaOptions(ttl_seconds=0))
    try:
        st.ensure_schema()
        assert ttl_of(st) is None
    finally:
        st.close()


def test_cluster_ddl_uses_on_cluster_and_the_engine():
    stmts = schema.create_statements(schema.SchemaOptions(cluster="gpu_fleet", engine="ReplicatedMergeTree"))
    assert stmts[0] == "CREATE DATABASE IF NOT EXISTS `stethoscope` ON CLUSTER `gpu_fleet`"
    gauge = next(s for s in stmts if "`otel_metrics_gauge`" in s)
    assert "`stethoscope`.`otel_metrics_gauge` ON CLUSTER `gpu_fleet`" in gauge
    assert "ENGINE = ReplicatedMergeTree()" in gauge
    assert "non_replicated_deduplication_window" not in gauge  # replicated tables deduplicate anyway


def test_insert_token_makes_a_retried_batch_idempotent(store):
    data = b"".join(
        b"\x00\x00" + bytes([1]) + b"\x01k" + bytes([1]) + bytes([48 + i]) for i in range(3)
    )  # SeverityText='', SeverityNumber=0, LogAttributes={'k': '<i>'}
    cols = ("SeverityText", "SeverityNumber", "LogAttributes")
    assert store.insert("otel_logs", cols, data, token="batch-1") == 3
    store.insert("otel_logs", cols, data, token="batch-1")  # the retry
    assert store.query("SELECT count() FROM otel_logs", "TabSeparated").data == b"3\n"
    store.insert("otel_logs", cols, data, token="batch-2")
    assert store.query("SELECT count() FROM otel_logs", "TabSeparated").data == b"6\n"


def test_bad_insert_raises_and_writes_nothing(store):
    with pytest.raises(StoreError, match="insert failed") as info:
        store.insert("otel_logs", ("Body",), b"\x05ab", token="t")
    assert info.value.code == 33  # CANNOT_READ_ALL_DATA
    assert store.query("SELECT count() FROM otel_logs", "TabSeparated").data == b"0\n"


def test_full_disk_insert_raises_naming_the_directory_and_stores_nothing(tmp_path):
    """chDB 4.4 reports an insert on a full disk as done; the store must not."""
    from test_faults import fill, tmpfs

    data = b"".join(
        b"\x00\x00" + bytes([1]) + b"\x01k" + bytes([1]) + bytes([48 + i % 10]) for i in range(2000)
    )
    cols = ("SeverityText", "SeverityNumber", "LogAttributes")
    with tmpfs(tmp_path / "fs", "48m") as fs:
        st = ChdbStore(fs / "data")
        try:
            st.ensure_schema()
            assert st.insert("otel_logs", cols, data, token="before") == 2000
            filler = fill(fs)
            with pytest.raises(StoreError, match="could not write under " + str(fs / "data")) as info:
                st.insert("otel_logs", cols, data, token="full")
            assert info.value.code == 243 and "NOT_ENOUGH_SPACE" in str(info.value)
            assert st.query("SELECT count() FROM otel_logs", "TabSeparated").data == b"2000\n"
            filler.unlink()
            assert st.insert("otel_logs", cols, data, token="full") == 2000  # the retry, with space again
            assert st.query("SELECT count() FROM otel_logs", "TabSeparated").data == b"4000\n"
        finally:
            st.close()


def test_readonly_queries_cannot_write(store):
    with pytest.raises(StoreError) as info:
        store.query("INSERT INTO otel_logs (Body) VALUES ('x')")
    assert info.value.code == 164
    store.query("INSERT INTO otel_logs (Body) VALUES ('x')", readonly=False)
    assert store.query("SELECT Body FROM otel_logs", "TabSeparated").data == b"x\n"


def test_closed_store_says_so(tmp_path):
    st = ChdbStore(tmp_path)
    st.close()
    with pytest.raises(StoreError, match="closed"):
        st.query("SELECT 1")
    assert st.ping() is False


def test_schema_error_wraps_store_errors(store, monkeypatch):
    monkeypatch.setattr(schema, "MIGRATIONS", (schema.Migration(99, "broken", ("ALTER TABLE {db}.nope ADD COLUMN x Int8",)),))
    import stethoscope.exporters.store as store_mod

    monkeypatch.setattr(store_mod, "MIGRATIONS", schema.MIGRATIONS)
    with pytest.raises(SchemaError, match="could not create or migrate"):
        store.ensure_schema()


def test_store_plugins_load_and_unknown_is_named(tmp_path):
    with pytest.raises(PluginError, match="unknown store 'nosuch'; available: chdb, clickhouse"):
        open_store("nosuch")
    st = open_store("chdb", data_dir=tmp_path)
    try:
        assert isinstance(st, ChdbStore)
    finally:
        st.close()


def test_clickhouse_backend_through_a_clickhouse_http_interface(writable_service):
    """The server backend against a ClickHouse HTTP interface (ours, over chDB)."""
    from stethoscope.exporters.clickhouse_store import ClickHouseStore

    st = ClickHouseStore(f"http://default:@127.0.0.1:{writable_service.sql.port}")
    try:
        assert st.ensure_schema() == []  # same database, already migrated by the service
        assert st.ping()
        data = b"\x00\x00\x00"  # one row: SeverityText '', SeverityNumber 0, LogAttributes {}
        cols = ("SeverityText", "SeverityNumber", "LogAttributes")
        st.insert("otel_logs", cols, data, token="remote-1")
        st.insert("otel_logs", cols, data, token="remote-1")
        assert st.query("SELECT count() FROM otel_logs", "TabSeparated").data == b"1\n"
        with pytest.raises(StoreError) as info:
            st.query("SELEC 1")
        assert info.value.code == 62
    finally:
        st.close()


def test_clickhouse_backend_unreachable_is_reported():
    from stethoscope.errors import StoreUnavailable
    from stethoscope.exporters.clickhouse_store import ClickHouseStore

    from conftest import free_port

    with pytest.raises(StoreUnavailable, match="unreachable|cannot reach"):
        ClickHouseStore(f"http://127.0.0.1:{free_port()}", timeout_s=2)
