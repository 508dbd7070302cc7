"""The ClickHouse-compatible SQL endpoint, exercised with urllib and clickhouse-connect."""

from __future__ import annotations

import gzip
import json
import urllib.error
import urllib.parse
import urllib.request

import clickhouse_connect
import pytest

from conftest import sql_url


def get(svc, params: dict, headers=None):
    req = urllib.request.Request(sql_url(svc) + "?" + urllib.parse.urlencode(params), headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read(), resp.headers
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read(), exc.headers


def post(svc, body: bytes, params: dict | None = None, headers=None):
    url = sql_url(svc) + ("?" + urllib.parse.urlencode(params) if params else "")
    req = urllib.request.Request(url, data=body, method="POST", headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read(), resp.headers
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read(), exc.headers


def test_curl_style_select_one(service):
    status, body, headers = get(service, {"query": "SELECT 1"})
    assert (status, body) == (200, b"1\n")
    assert headers["X-ClickHouse-Format"] == "TabSeparated"
    assert headers["Content-Type"].startswith("text/tab-separated-values")
    summary = json.loads(headers["X-ClickHouse-Summary"])
    assert summary["result_rows"] == "1" and int(summary["elapsed_ns"]) > 0


@pytest.mark.parametrize(
    ("fmt", "expected"),
    [
        ("JSONEachRow", b'{"n":"0","s":"a"}\n{"n":"1","s":"a"}\n'),
        ("CSVWithNames", b'"n","s"\n"0","a"\n"1","a"\n'),
        ("TabSeparatedWithNames", b"n\ts\n0\ta\n1\ta\n"),
    ],
)
def test_output_formats(service, fmt, expected):
    q = "SELECT toString(number) AS n, 'a' AS s FROM numbers(2)"
    assert get(service, {"query": q, "default_format": fmt})[1] == expected
    assert post(service, f"{q} FORMAT {fmt}".encode())[1] == expected


def test_query_param_and_body_are_joined(service):
    status, body, _ = post(service, b"FROM numbers(3)", {"query": "SELECT sum(number)"})
    assert (status, body) == (200, b"3\n")


def test_compressed_request_and_response(service):
    status, body, headers = post(
        service,
        gzip.compress(b"SELECT 'compressed'"),
        {"enable_http_compression": "1"},
        {"Content-Encoding": "gzip", "Accept-Encoding": "gzip"},
    )
    assert status == 200 and headers["Content-Encoding"] == "gzip"
    assert gzip.decompress(body) == b"compressed\n"


def test_errors_look_like_clickhouse(service):
    status, body, headers = get(service, {"query": "SELEC 1"})
    assert status == 400 and headers["X-ClickHouse-Exception-Code"] == "62"
    assert body.startswith(b"Code: 62. DB::Exception: Syntax error")
    status, body, headers = get(service, {"query": "SELECT * FROM no_such_table"})
    assert status == 404 and headers["X-ClickHouse-Exception-Code"] == "60"


@pytest.mark.parametrize(
    "query",
    [
        "INSERT INTO otel_logs (Body) VALUES ('x')",
        "DROP TABLE otel_logs",
        "  /* sneaky */ TRUNCATE TABLE otel_logs",
        "CREATE TABLE t (a Int8) ENGINE = Memory",
    ],
)
def test_read_only_by_default(service, query):
    status, body, headers = post(service, query.encode())
    assert status == 403 and headers["X-ClickHouse-Exception-Code"] == "164"
    assert b"read-only" in body


@pytest.mark.parametrize(
    "query",
    [
        "SELECT * FROM file('/etc/passwd', 'LineAsString')",
        "SELECT * FROM url('http://127.0.0.1:1/', 'CSV', 'a String')",
        "SELECT 1 SETTINGS readonly = 0",
    ],
)
def test_reads_cannot_reach_files_network_or_settings(service, query):
    status, body, _ = post(service, query.encode())
    assert status == 403 and b"readonly" in body.lower()


def test_get_is_read_only_even_when_writable(writable_service):
    status, _, _ = get(writable_service, {"query": "DROP TABLE otel_logs"})
    assert status == 403
    assert get(writable_service, {"query": "EXISTS TABLE otel_logs"})[1] == b"1\n"


def test_ping_and_unknown_path(service):
    with urllib.request.urlopen(sql_url(service) + "ping", timeout=10) as resp:
        assert resp.read() == b"Ok.\n"
    req = urllib.request.Request(sql_url(service) + "nope", data=b"SELECT 1", method="POST")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=10)
    info.value.close()
    assert info.value.code == 404


def test_clickhouse_connect_queries(service):
    client = clickhouse_connect.get_client(host="127.0.0.1", port=service.sql.port)
    try:
        assert client.command("SELECT 40 + 2") == 42
        result = client.query("SELECT number AS n, toString(number) AS s FROM numbers(3)")
        assert result.column_names == ("n", "s")
        assert result.result_rows == [(0, "0"), (1, "1"), (2, "2")]
        tables = {r[0] for r in client.query("SHOW TABLES").result_rows}
        assert {"otel_metrics_gauge", "otel_logs", "otel_metrics_exponential_histogram"} <= tables
        with pytest.raises(clickhouse_connect.driver.exceptions.DatabaseError, match="164"):
            client.insert("otel_logs", [["x"]], column_names=["Body"])
    finally:
        client.close()


def test_clickhouse_connect_inserts_when_writable(writable_service):
    client = clickhouse_connect.get_client(host="127.0.0.1", port=writable_service.sql.port)
    try:
        client.command("CREATE TABLE scratch (id UInt32, name String, tags Map(String, String)) ENGINE = MergeTree ORDER BY id")
        client.insert("scratch", [[1, "a", {"k": "v"}], [2, "b", {}]], column_names=["id", "name", "tags"])
        assert client.query("SELECT id, name, tags FROM scratch ORDER BY id").result_rows == [
            (1, "a", {"k": "v"}),
            (2, "b", {}),
        ]
        # CSV body with the INSERT in the query parameter, as curl users do it
        status, _, _ = post(writable_service, b"3,c,{}\n", {"query": "INSERT INTO scratch FORMAT CSV"})
        assert status == 200
        assert client.command("SELECT count() FROM scratch") == 3
        # bad data: rejected whole, nothing half-written
        status, body, _ = post(writable_service, b"4,d,{}\nnot-a-number,e,{}\n", {"query": "INSERT INTO scratch FORMAT CSV"})
        assert status >= 400 and b"Code:" in body
        assert client.command("SELECT count() FROM scratch") == 3
    finally:
        client.close()


def test_other_databases_are_refused_clearly(service):
    status, body, _ = get(service, {"query": "SELECT 1", "database": "elsewhere"})
    assert status == 400 and b"'elsewhere'" in body
