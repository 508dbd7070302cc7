"""Native-format results framed for the protocol revision an HTTP client asks for.

ClickHouse's HTTP interface takes ``client_protocol_version=N`` and then writes
``FORMAT Native`` blocks as its TCP protocol would at revision ``N``: a *block info*
header before each block when ``N > 0`` (``is_overflows`` and ``bucket_num``), and one
*has custom serialization* byte after each column's name and type when
``N >= 54454``. Clients rely on it: clickhouse-go, which the Grafana ClickHouse plugin
uses in HTTP mode, sends ``client_protocol_version=54460`` (since v2.38) and decodes
every block that way without checking; clickhouse-connect sends 54405 and checks
the reply (``Protocol.h`` in ClickHouse has the revision numbers).

chDB writes Native blocks at revision 0 and has no way to ask for another, so
:func:`reframe` adds that framing to its output. It walks each block's columns to
find where one column's data ends, which needs the byte layout of every type in the
result: fixed-width types, ``String``, ``FixedString``, ``Nullable``, ``Array``,
``Map``, ``Tuple``, ``LowCardinality`` and the types built from them (``Nested``,
geo types, ``SimpleAggregateFunction``). The data bytes are copied unchanged, and the
*has custom serialization* byte is always 0: chDB's revision-0 output never uses
sparse or other custom serializations. A result with a type it cannot walk
(``Variant``, ``Dynamic``, ``JSON``, ``AggregateFunction`` states) raises
:class:`NativeFrameError` naming the column and type, rather than sending bytes the
client would misread.

Examples:
    >>> block = bytes([1, 1, 1]) + b"x" + bytes([5]) + b"UInt8" + bytes([7])  # SELECT toUInt8(7) AS x
    >>> reframe(block, 0) == block
    True
    >>> reframe(block, 54460).hex(" ")
    '01 00 02 ff ff ff ff 00 01 01 01 78 05 55 49 6e 74 38 00 07'
    >>> reframe(block, 54405).hex(" ")  # block info, no custom-serialization byte before 54454
    '01 00 02 ff ff ff ff 00 01 01 01 78 05 55 49 6e 74 38 07'
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from functools import lru_cache

__all__ = ["CUSTOM_SERIALIZATION_REVISION", "NativeFrameError", "parse_type", "reframe"]

#: ``DBMS_MIN_REVISION_WITH_CUSTOM_SERIALIZATION``: from this revision on, each column carries the byte.
CUSTOM_SERIALIZATION_REVISION = 54454
# Field 1 (is_overflows = false), field 2 (bucket_num = -1), end of fields.
_BLOCK_INFO = b"\x01\x00\x02\xff\xff\xff\xff\x00"

_FIXED = {
    **dict.fromkeys(("UInt8", "Int8", "Bool", "Enum8", "Nothing"), 1),
    **dict.fromkeys(("UInt16", "Int16", "Enum16", "Date", "BFloat16"), 2),
    **dict.fromkeys(("UInt32", "Int32", "Float32", "DateTime", "Date32", "IPv4", "Decimal32", "Time"), 4),
    **dict.fromkeys(("UInt64", "Int64", "Float64", "DateTime64", "Decimal64", "Time64"), 8),
    **dict.fromkeys(("UInt128", "Int128", "UUID", "IPv6", "Decimal128"), 16),
    **dict.fromkeys(("UInt256", "Int256", "Decimal256"), 32),
}
_ALIASES = {"Point": "Tuple(Float64, Float64)", "Ring": "Array(Point)", "LineString": "Array(Point)",
            "MultiLineString": "Array(LineString)", "Polygon": "Array(Ring)", "MultiPolygon": "Array(Polygon)"}
_U64 = struct.Struct("<Q")
# LowCardinality index flags (SerializationLowCardinality.cpp): key width in the low byte.
_LC_GLOBAL_DICTIONARY, _LC_ADDITIONAL_KEYS = 1 << 8, 1 << 9
_LC_KEY_BYTES = (1, 2, 4, 8)

Type = tuple[str, tuple["Type", ...], tuple[str, ...]]  # name, type arguments, literal arguments


class NativeFrameError(ValueError):
    """The Native result cannot be framed: a type this module cannot walk, or bytes that end too soon."""


def reframe(data: bytes, revision: int) -> bytes:
    """chDB's revision-0 Native ``data`` as ClickHouse writes it for a client at ``revision``."""
    if revision <= 0 or not data:
        return data
    custom = revision >= CUSTOM_SERIALIZATION_REVISION
    out = bytearray()
    pos, end = 0, len(data)
    while pos < end:
        start = pos
        columns, pos = _varint(data, pos)
        rows, pos = _varint(data, pos)
        out += _BLOCK_INFO
        out += data[start:pos]
        for _ in range(columns):
            start = pos
            name, pos = _string(data, pos)
            type_name, pos = _string(data, pos)
            out += data[start:pos]
            if custom:
                out.append(0)
            if rows:
                start = pos
                try:
                    pos = _walker(type_name.decode("utf-8", "replace"))(data, pos, rows)
                    problem = "the data ends inside it" if pos > end else ""
                except NativeFrameError as exc:
                    problem = str(exc)
                except (IndexError, struct.error):
                    problem = "the data ends inside it"
                if problem:
                    raise NativeFrameError(f"column {name.decode('utf-8', 'replace')!r}: {problem}")
                out += data[start:pos]
    return bytes(out)


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data):
            raise NativeFrameError("the data ends inside a number")
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def _string(data: bytes, pos: int) -> tuple[bytes, int]:
    n, pos = _varint(data, pos)
    if pos + n > len(data):
        raise NativeFrameError("the data ends inside a name")
    return data[pos:pos + n], pos + n


# ---------------------------------------------------------------- type names

def parse_type(text: str) -> Type:
    """A ClickHouse type name as (name, type arguments, literal arguments).

    >>> parse_type("Map(LowCardinality(String), Array(Nullable(Int64)))")[1][1]
    ('Array', (('Nullable', (('Int64', (), ()),), ()),), ())
    >>> parse_type("Tuple(a UInt8, `b c` String)")
    ('Tuple', (('UInt8', (), ()), ('String', (), ())), ())
    >>> parse_type("DateTime64(3, 'Europe/Paris')")
    ('DateTime64', (), ('3', "'Europe/Paris'"))
    """
    node, rest = _parse(text.strip())
    if rest.strip():
        raise NativeFrameError(f"cannot read type {text!r}")
    return node


def _parse(text: str) -> tuple[Type, str]:
    i = 0
    while i < len(text) and (text[i].isalnum() or text[i] == "_"):
        i += 1
    name, rest = text[:i], text[i:].lstrip()
    if not name:
        raise NativeFrameError(f"cannot read type {text!r}")
    if not rest.startswith("("):
        return (name, (), ()), rest
    rest = rest[1:]
    types: list[Type] = []
    literals: list[str] = []
    while True:
        rest = rest.lstrip()
        if not rest:
            raise NativeFrameError(f"type {name} has no closing parenthesis")
        if rest.startswith(")"):
            return (name, tuple(types), tuple(literals)), rest[1:]
        arg, rest = _argument(rest)
        if arg[0]:
            literals.append(arg[0])
        else:
            types.append(arg[1])
        rest = rest.lstrip()
        if rest.startswith(","):
            rest = rest[1:]
        elif not rest.startswith(")"):
            raise NativeFrameError(f"cannot read type arguments {rest!r}")


def _argument(text: str) -> tuple[tuple[str, Type | None], str]:
    """One argument: a literal (number, quoted string, ``'a' = 1``) or a type, possibly named."""
    if not text:
        raise NativeFrameError("a type name ends inside its arguments")
    if text[0] in "'-0123456789":
        depth, i, quoted = 0, 0, False
        while i < len(text):
            c = text[i]
            if quoted:
                if c == "\\":
                    i += 1
                elif c == "'":
                    quoted = False
            elif c == "'":
                quoted = True
            elif c == "(":
                depth += 1
            elif c in ",)":
                if depth == 0:
                    break
                if c == ")":
                    depth -= 1
            i += 1
        return (text[:i].strip(), None), text[i:]
    if text[0] == "`":  # a quoted element name, then its type
        close = text.index("`", 1)
        node, rest = _parse(text[close + 1:].lstrip())
        return ("", node), rest
    node, rest = _parse(text)
    if rest and rest[0] not in ",)":  # "name Type" in a named Tuple or Nested
        node, rest = _parse(rest)
    return ("", node), rest


# ---------------------------------------------------------------- walking column data

Walker = Callable[[bytes, int, int], int]


@lru_cache(maxsize=512)
def _walker(type_name: str) -> Walker:
    """``walk(data, pos, rows) -> end``: the state prefix and the data of ``rows`` values."""
    node = parse_type(type_name)
    prefix, body = _prefix(node), _body(node)

    def walk(data: bytes, pos: int, rows: int) -> int:
        return body(data, pos + prefix, rows)

    return walk


def _alias(node: Type) -> Type:
    name, args, _ = node
    if name in _ALIASES:
        return parse_type(_ALIASES[name])
    if name == "SimpleAggregateFunction":
        return args[-1]
    if name == "Nested":  # stored as Array(Tuple(...)) when not flattened
        return ("Array", (("Tuple", args, ()),), ())
    return node


def _prefix(node: Type) -> int:
    """Bytes of state prefix before the data: 8 (the key version) for each LowCardinality inside."""
    name, args, _ = node = _alias(node)
    if name == "LowCardinality":
        return 8
    return sum(_prefix(a) for a in args)


def _body(node: Type) -> Walker:
    name, args, literals = node = _alias(node)
    if name in _FIXED or name.startswith("Interval") or name == "Decimal":
        width = _decimal_width(literals) if name == "Decimal" else _FIXED.get(name, 8)
        return lambda data, pos, rows: _check(data, pos + width * rows)
    if name == "FixedString":
        width = int(literals[0])
        return lambda data, pos, rows: _check(data, pos + width * rows)
    if name == "String":
        return _strings
    if name == "Nullable":
        inner = _body(args[0])
        return lambda data, pos, rows: inner(data, pos + rows, rows)
    if name in ("Array", "Map"):
        items = [_body(a) for a in args]

        def array(data: bytes, pos: int, rows: int) -> int:
            total = _U64.unpack_from(data, pos + 8 * (rows - 1))[0] if rows else 0
            pos += 8 * rows
            for walk in items:  # Map: the keys, then the values
                pos = walk(data, pos, total)
            return pos

        return array
    if name == "Tuple":
        elements = [_body(a) for a in args]

        def tuple_(data: bytes, pos: int, rows: int) -> int:
            for walk in elements:
                pos = walk(data, pos, rows)
            return pos

        return tuple_
    if name == "LowCardinality":
        inner = args[0]
        keys = _body(inner[1][0] if inner[0] == "Nullable" else inner)  # the dictionary drops Nullable
        return lambda data, pos, rows: _low_cardinality(keys, data, pos, rows)
    raise NativeFrameError(f"type {name} is not supported in Native format for this client; "
                           "ask for another format (FORMAT JSON, TabSeparated, ...) or protocol version 0")


def _decimal_width(literals: tuple[str, ...]) -> int:
    precision = int(literals[0])
    return 4 if precision <= 9 else 8 if precision <= 18 else 16 if precision <= 38 else 32


def _check(data: bytes, pos: int) -> int:
    if pos > len(data):
        raise NativeFrameError("the data ends inside it")
    return pos


def _strings(data: bytes, pos: int, rows: int) -> int:
    for _ in range(rows):
        n = data[pos]
        if n < 0x80:
            pos += 1 + n
        else:
            n, pos = _varint(data, pos)
            pos += n
    return _check(data, pos)


def _low_cardinality(keys: Walker, data: bytes, pos: int, rows: int) -> int:
    """Dictionary chunks until ``rows`` indexes are read: flags, [keys], index count, indexes."""
    while rows > 0:
        flags = _U64.unpack_from(data, pos)[0]
        pos += 8
        if flags & 0xFF >= len(_LC_KEY_BYTES):
            raise NativeFrameError(f"LowCardinality index type {flags & 0xFF} is unknown")
        if flags & _LC_GLOBAL_DICTIONARY:
            raise NativeFrameError("LowCardinality with a global dictionary is not supported")
        if flags & _LC_ADDITIONAL_KEYS:
            count = _U64.unpack_from(data, pos)[0]
            pos = keys(data, pos + 8, count)
        count = _U64.unpack_from(data, pos)[0]
        if count == 0 or count > rows:
            raise NativeFrameError(f"LowCardinality chunk of {count} rows where {rows} remain")
        pos += 8 + _LC_KEY_BYTES[flags & 0xFF] * count
        rows -= count
    return _check(data, pos)
