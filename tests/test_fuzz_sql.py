"""Hostile input on the SQL endpoint (property-based, hypothesis).

Random query text, SQL token soup, random URL parameters and settings, random
bodies and encodings, over GET and POST on a read-only endpoint. Whatever
arrives: the process keeps serving, the answer is 200 or a 4xx with a
ClickHouse-style reason (5xx only for the server's own faults, which these
inputs must not cause), every 4xx is counted in ``/metrics``, no response
header can be injected, and the tables are untouched.
"""

from __future__ import annotations

import gzip
import re
import socket
import urllib.error
import urllib.parse
import urllib.request

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import make_service, sql

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)

_TOKENS = [
    "SELECT", "INSERT", "INTO", "DROP", "TABLE", "FROM", "WHERE", "FORMAT", "SETTINGS", "WITH", "AS", "(", ")", ",",
    ";", "*", "'", '"', "`", "--", "/*", "*/", "#", "\\", "1", "-1", "1e308", "nan", "NULL", "otel_logs",
    "system.tables", "numbers(3)", "file('/etc/passwd')", "url('http://127.0.0.1:1/')", "sleep(0.01)", "JSON",
    "Native", "readonly=0", "max_threads=1", "arrayJoin([1,2])", "toString", "UNION ALL", "SYSTEM", "KILL",
    "SET", "ALTER", "\x00", "\u00e9", "\ud7ff", "{x:UInt8}",
]


@pytest.fixture(scope="module")
def svc(tmp_path_factory):
    service = make_service(tmp_path_factory.mktemp("sqlfuzz"), **{"sql.max_body_bytes": 256 * 1024})
    sql(service, "SELECT 1")  # warm
    yield service
    service.stop()


def request(svc, *, method="GET", params=None, body=None, headers=None):
    query = urllib.parse.urlencode(params or {})
    url = f"http://127.0.0.1:{svc.sql.port}/" + (f"?{query}" if query else "")
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.read(), resp.headers
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read(), exc.headers


def rejects(svc) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{svc.sql.port}/metrics", timeout=30) as resp:
        text = resp.read().decode()
    return sum(float(v) for v in re.findall(r'^stethoscope_rejects_total\{endpoint="sql",[^}]*\} (\S+)$', text, re.M))


class Tally:
    def __init__(self, svc):
        self.svc, self.refused, self.ok, self.before = svc, 0, 0, rejects(svc)
        self.tables = sql(svc, "SELECT name, total_rows FROM system.tables WHERE database = currentDatabase() ORDER BY name")

    def send(self, **kw) -> int:
        status, body, headers = request(self.svc, **kw)
        assert status == 200 or 400 <= status < 500, (status, body[:400])
        if status != 200:
            assert body.startswith(b"Code: ") and headers["X-ClickHouse-Exception-Code"].isdigit(), body[:200]
        self.refused += status != 200
        self.ok += status == 200
        return status

    def done(self) -> None:
        assert rejects(self.svc) - self.before == self.refused
        assert sql(self.svc, "SELECT 42").strip() == "42"
        after = sql(self.svc, "SELECT name, total_rows FROM system.tables WHERE database = currentDatabase() ORDER BY name")
        assert after == self.tables  # read-only held


def test_random_query_text(svc):
    tally = Tally(svc)

    @FUZZ
    @given(st.text(max_size=200), st.booleans())
    def run(text, as_body):
        if as_body:
            tally.send(method="POST", body=text.encode("utf-8", "surrogatepass"))
        else:
            tally.send(params={"query": text.encode("utf-8", "surrogatepass")})

    run()
    tally.done()
    assert tally.refused > 0


def test_sql_token_soup(svc):
    tally = Tally(svc)

    @FUZZ
    @given(st.lists(st.sampled_from(_TOKENS), min_size=1, max_size=12), st.sampled_from(["GET", "POST"]))
    def run(tokens, method):
        text = " ".join(tokens).encode("utf-8", "surrogatepass")
        if method == "GET":
            tally.send(params={"query": text})
        else:
            tally.send(method="POST", body=text)

    run()
    tally.done()


def test_random_parameters_and_settings(svc):
    tally = Tally(svc)
    keys = st.one_of(st.sampled_from(["query_id", "default_format", "database", "enable_http_compression",
                                      "readonly", "max_result_rows", "param_x", "session_id", "user"]), st.text(max_size=10))

    @FUZZ
    @given(st.dictionaries(keys, st.text(max_size=40), max_size=5))
    def run(params):
        tally.send(params={"query": "SELECT 1 AS one", **params},
                   headers={"Accept-Encoding": "gzip, deflate, zstd, lz4, br"})

    run()
    tally.done()
    assert tally.ok > 0


def test_random_bodies_and_encodings(svc):
    tally = Tally(svc)

    @FUZZ
    @given(st.binary(max_size=2000), st.sampled_from(["", "gzip", "deflate", "zstd", "lz4", "br", "x"]),
           st.sampled_from([None, "SELECT 1", "INSERT INTO otel_logs (Body) FORMAT TSV"]))
    def run(body, encoding, query):
        params = {"query": query} if query else {}
        headers = {"Content-Encoding": encoding} if encoding else {}
        tally.send(method="POST", params=params, body=body, headers=headers)

    run()
    tally.done()


def test_query_id_cannot_inject_a_header(svc):
    raw = (b"GET /?query=SELECT%201&query_id=a%0d%0aSet-Cookie:%20pwned=1 HTTP/1.1\r\n"
           b"Host: x\r\nConnection: close\r\n\r\n")
    with socket.create_connection(("127.0.0.1", svc.sql.port), timeout=30) as s:
        s.sendall(raw)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    head = reply.split(b"\r\n\r\n", 1)[0]
    assert head.startswith(b"HTTP/1.1 400") and b"Set-Cookie" not in head


def test_oversized_and_compressed_bombs(svc):
    tally = Tally(svc)
    assert tally.send(method="POST", body=b"SELECT 1 -- " + b"x" * (300 * 1024)) == 413
    bomb = gzip.compress(b"SELECT 1 -- " + b"x" * (1024 * 1024))
    assert tally.send(method="POST", body=bomb, headers={"Content-Encoding": "gzip"}) == 413
    tally.done()
