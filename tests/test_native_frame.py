"""Native results at the client's protocol revision, as clickhouse-go (Grafana's plugin over HTTP) asks for them.

The oracle is clickhouse-driver's own Native block reader (an independent
implementation of ClickHouse's TCP protocol), fed the bytes the SQL endpoint sends
and told the revision the client asked for; its values must equal the endpoint's
JSON answer to the same query.
"""

from __future__ import annotations

import gzip
import json
import urllib.error
import urllib.parse
import urllib.request

import pytest
from conftest import make_service, sql_url
from stethoscope.exporters.native_frame import NativeFrameError, parse_type, reframe

# clickhouse-driver (the dev extra) is the oracle: its reader for the TCP protocol's blocks.
from clickhouse_driver.bufferedreader import CompressedBufferedReader
from clickhouse_driver.connection import ServerInfo
from clickhouse_driver.context import Context
from clickhouse_driver.streams.native import BlockInputStream

#: What clickhouse-go v2.38+ sends (proto.DBMS_TCP_PROTOCOL_VERSION), and clickhouse-connect's probe.
GO_REVISION, CONNECT_REVISION = 54460, 54405


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    svc = make_service(tmp_path_factory.mktemp("native"))
    try:
        yield svc
    finally:
        svc.stop()


def _post(svc, query: str, **params) -> tuple[bytes, dict]:
    url = sql_url(svc) + "?" + urllib.parse.urlencode(params)
    req = urllib.request.Request(url, data=query.encode(), method="POST",
                                 headers={"Accept-Encoding": "gzip", "X-ClickHouse-User": "grafana"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        body = resp.read()
        if resp.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        return body, dict(resp.headers)


def _decode(data: bytes, revision: int) -> tuple[list[tuple[str, str]], list[tuple], int]:
    """Columns, rows and block count, read by clickhouse-driver at ``revision``."""
    ctx = Context()
    ctx.server_info = ServerInfo("ClickHouse", 26, 9, 2, revision, "UTC", "up", revision)
    ctx.settings = {}
    ctx.client_settings = {"strings_as_bytes": False, "strings_encoding": "utf-8", "use_numpy": False,
                           "namedtuple_as_json": False, "input_format_null_as_default": False}
    chunks = [data]

    def next_chunk() -> bytes:
        if not chunks:
            raise EOFError
        return chunks.pop()

    stream = BlockInputStream(CompressedBufferedReader(next_chunk, max(1, len(data))), ctx)
    columns, rows, blocks, seen = [], [], 0, 0
    while seen < len(data):
        block = stream.read()
        blocks += 1
        columns = columns or block.columns_with_types
        rows.extend(block.get_rows())
        seen = stream.fin.position + (len(data) - stream.fin.current_buffer_size)
    return columns, rows, blocks


def _json(svc, query: str) -> tuple[list[dict], list[dict]]:
    body, _ = _post(svc, query + " FORMAT JSONCompact", database="stethoscope")
    doc = json.loads(body)
    return doc["meta"], doc["data"]


#: Expressions covering every layout the framer walks; each is checked as its own column.
TYPES = {
    "u8": "toUInt8(number % 200)", "i64": "toInt64(number) - 5", "f64": "number / 7",
    "f32": "toFloat32(number) / 3", "u128": "toUInt128(number) * 1000000000000", "i256": "toInt256(number) - 3",
    "boolean": "number % 2 = 0", "s": "concat('v', toString(number), repeat('x', number % 300))",
    "fs": "toFixedString(toString(number % 10), 3)", "lc": "toLowCardinality(toString(number % 5))",
    "lcn": "toLowCardinality(if(number % 3 = 0, NULL, toString(number % 4)))",
    "n": "if(number % 2 = 0, NULL, number)", "ns": "if(number % 3 = 0, NULL, toString(number))",
    "arr": "range(number % 4)", "arr2": "[range(number % 3), [number]]",
    "arrn": "[if(number % 2 = 0, NULL, toString(number)), 'a']", "arrlc": "[toLowCardinality(toString(number % 3))]",
    "m": "map('k', toString(number), 'j', 'v')", "mlc": "map(toLowCardinality('host.name'), toString(number % 3))",
    "t": "tuple(number, toString(number), [1.5])", "nt": "CAST(tuple(number, 'x'), 'Tuple(a UInt64, `b c` String)')",
    "d": "toDate('2026-01-01') + number % 1000", "d32": "toDate32('1950-01-01') + number % 1000",
    "dt": "toDateTime(1700000000 + number, 'UTC')", "dt64": "toDateTime64(1700000000.5 + number, 3, 'Europe/Paris')",
    "dec": "toDecimal64(number, 4) / 3", "dec2": "CAST(number, 'Decimal(40, 2)')",
    "uuid": "toUUID('61f0c404-5cb3-11e7-907b-a6006ad3dba0')", "ip4": "toIPv4('10.0.0.1')", "ip6": "toIPv6('::1')",
    "e8": "CAST(if(number % 2 = 0, 'a', 'b'), 'Enum8(\\'a\\' = 1, \\'b\\' = -2)')",
    "e16": "CAST('x, y', 'Enum16(\\'x, y\\' = 300)')", "nothing": "NULL", "empty": "[]",
    "point": "CAST((1.5, 2.5), 'Point')", "ring": "CAST([(0., 0.), (1., 1.)], 'Ring')",
}


@pytest.mark.e2e
@pytest.mark.parametrize("revision", [GO_REVISION, CONNECT_REVISION])
def test_every_layout_reads_back_as_the_json_answer(up, revision):
    for alias, expr in TYPES.items():
        query = f"SELECT {expr} AS {alias} FROM numbers(40)"
        body, headers = _post(up, query, default_format="Native", client_protocol_version=revision,
                              database="stethoscope")
        columns, rows, _ = _decode(body, revision)
        meta, want = _json(up, query)
        # (chDB names DateTime('UTC') without its zone in Native, the bytes are passed on as they are)
        assert [c[0] for c in columns] == [alias] and columns[0][1].split("(")[0] == meta[0]["type"].split("(")[0]
        assert len(rows) == 40 == len(want), alias
        assert headers["X-ClickHouse-Format"] == "Native"
        if alias in ("u8", "i64", "s", "lc", "lcn", "ns", "fs", "arr", "arr2", "arrn", "arrlc", "m", "mlc", "nothing",
                     "empty", "boolean", "e8", "e16"):
            got = [r[0] for r in rows]
            expected = [w[0] for w in want]
            if alias == "fs":
                got, expected = [v.rstrip("\x00") for v in got], [v.rstrip("\x00") for v in expected]
            if alias in ("m", "mlc"):
                got = [dict(v) for v in got]
            if alias == "u8" or alias == "i64":
                expected = [int(v) for v in expected]
            assert got == expected, alias


@pytest.mark.e2e
def test_wide_rows_many_blocks_and_an_empty_result(up):
    cols = ", ".join(f"{e} AS {a}" for a, e in TYPES.items())
    query = f"SELECT {cols} FROM numbers(150000)"  # chDB sends it in several blocks
    body, _ = _post(up, query, default_format="Native", client_protocol_version=GO_REVISION, database="stethoscope")
    columns, rows, blocks = _decode(body, GO_REVISION)
    assert [c[0] for c in columns] == list(TYPES) and len(rows) == 150000 and blocks > 1
    assert rows[-1][list(TYPES).index("s")].startswith("v149999")
    body, _ = _post(up, "SELECT number AS x, 'a' AS s FROM numbers(10) WHERE x > 100", default_format="Native",
                    client_protocol_version=GO_REVISION)
    columns, rows, _ = _decode(body, GO_REVISION) if body else ([], [], 0)
    assert rows == []


@pytest.mark.e2e
def test_the_hello_and_dashboard_style_queries_clickhouse_go_sends(up):
    body, _ = _post(up, "SELECT displayName(), version(), revision(), timezone()", default_format="Native",
                    client_protocol_version=GO_REVISION, database="stethoscope")
    _, rows, _ = _decode(body, GO_REVISION)
    (name, version, revision, tz), = rows
    assert version.count(".") == 3 and revision > CONNECT_REVISION and tz
    # Compressed as the plugin asks for it, and without a protocol version the bytes stay chDB's own.
    q = "SELECT toStartOfMinute(now()) AS time, 'node-a/0' AS gpu, 0.5 AS value"
    gz, headers = _post(up, q, default_format="Native", client_protocol_version=GO_REVISION,
                        enable_http_compression=1)
    assert headers.get("Content-Encoding") == "gzip"
    assert [r[1:] for r in _decode(gz, GO_REVISION)[1]] == [("node-a/0", 0.5)]
    plain, _ = _post(up, q, default_format="Native")
    assert plain[:2] == b"\x03\x01" and _decode(plain, 0)[1][0][1:] == ("node-a/0", 0.5)


@pytest.mark.e2e
def test_unsupported_types_and_bad_versions_are_refused_clearly(up):
    with pytest.raises(urllib.error.HTTPError) as err:
        _post(up, "SELECT uniqState(number) AS st FROM numbers(3)", default_format="Native",
              client_protocol_version=GO_REVISION)
    text = err.value.read().decode()
    assert err.value.code == 400 and "'st'" in text and "AggregateFunction" in text and "FORMAT JSON" in text
    with pytest.raises(urllib.error.HTTPError) as err:
        _post(up, "SELECT 1", default_format="Native", client_protocol_version="new")
    assert err.value.code == 400 and "client_protocol_version" in err.value.read().decode()
    # Other formats ignore the version, as ClickHouse does.
    body, _ = _post(up, "SELECT 1 AS x", default_format="JSONEachRow", client_protocol_version=GO_REVISION)
    assert json.loads(body) == {"x": 1}


def test_clickhouse_connect_now_uses_the_protocol_version(up):
    import clickhouse_connect

    client = clickhouse_connect.get_client(host="127.0.0.1", port=up.sql.port, database="stethoscope")
    try:
        assert client.protocol_version == CONNECT_REVISION  # its probe saw block info in the reply
        rows = client.query("SELECT toLowCardinality(toString(number % 3)) AS lc, [number] AS a, "
                            "map('k', number) AS m FROM numbers(5)").result_rows
        assert rows[4] == ("1", [4], {"k": 4})
    finally:
        client.close()


# ---------------------------------------------------------------- the framer alone

def test_type_names():
    assert parse_type("Enum8('a, b' = 1, 'c\\'' = -2)") == ("Enum8", (), ("'a, b' = 1", "'c\\'' = -2"))
    assert parse_type("Nested(a UInt8, b Array(String))")[1][1] == ("Array", (("String", (), ()),), ())
    assert parse_type("SimpleAggregateFunction(sum, UInt64)") == ("SimpleAggregateFunction", (("sum", (), ()),
                                                                                             ("UInt64", (), ())), ())
    for bad in ("", "Array(", "Array(UInt8", "Tuple(UInt8,, x)"):
        with pytest.raises(NativeFrameError):
            parse_type(bad)


def test_truncated_or_unknown_data_raises_instead_of_sending_garbage():
    block = bytes([1, 2, 1]) + b"s" + bytes([6]) + b"String" + bytes([1]) + b"a" + bytes([5]) + b"bc"
    with pytest.raises(NativeFrameError, match="'s'"):
        reframe(block, GO_REVISION)
    assert reframe(block, 0) is block
    lc = bytes([1, 1, 1]) + b"l" + bytes([22]) + b"LowCardinality(String)" + (1).to_bytes(8, "little") + \
        (0x0607).to_bytes(8, "little")
    with pytest.raises(NativeFrameError, match="index type 7"):
        reframe(lc, GO_REVISION)


@pytest.mark.e2e
def test_every_dashboard_query_reads_back_in_native_as_grafana_asks(up):
    """Every panel, variable and annotation query, as the plugin sends it over HTTP, decodes to the JSON answer's rows."""
    from stethoscope.dashboards.build import build_all
    from stethoscope.dashboards.macros import render
    from stethoscope.dashboards.validate import queries
    from test_dashboards import _context, _fill, _values

    _fill(up)
    ctx, checked = _context(), 0
    for d in build_all():
        for concrete in (False, True):
            values = _values(d, concrete)
            for where, _, raw in queries(d):
                text = render(raw, ctx, values)
                body, _ = _post(up, text, default_format="Native", client_protocol_version=GO_REVISION,
                                database="stethoscope")
                columns, rows, _ = _decode(body, GO_REVISION) if body else ([], [], 0)
                meta, want = _json(up, text)
                assert len(rows) == len(want), f"{d['uid']} {where}"
                assert not rows or [c[0] for c in columns] == [m["name"] for m in meta], f"{d['uid']} {where}"
                checked += bool(rows)
    assert checked > 50
