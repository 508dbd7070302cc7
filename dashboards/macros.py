"""Expand panel SQL the way Grafana and the ClickHouse plugin do, so tests can run it.

Three passes, in the order a real query goes through them:

1. ``$__conditionalAll(cond, $var)`` (the plugin's frontend): ``cond``, or ``1=1``
   when ``$var`` is All (or empty);
2. template variables (Grafana, with the plugin's ``interpolateVariable``): a
   single-value variable is inserted as is; a multi-value or include-All variable
   is quoted (``'a'``) and several values are joined (``'a','b'``);
3. the backend macros of ``pkg/macros`` (times in Unix seconds unless ``_ms``; the
   interval is at least 1 s, or 1 ms for the ``_ms`` forms).

Examples:
    >>> ctx = QueryContext(start=1_700_000_000, end=1_700_003_600, interval_s=60)
    >>> expand_macros("SELECT 1 WHERE $__timeFilter(TimeUnix)", ctx)
    'SELECT 1 WHERE TimeUnix >= toDateTime(1700000000) AND TimeUnix <= toDateTime(1700003600)'
    >>> node = Variable("node", multi=True, include_all=True)
    >>> render("x IN ($node)", ctx, {node: ["a", "b"]})
    "x IN ('a','b')"
    >>> render("$__conditionalAll(x IN ($node), $node)", ctx, {node: ALL})
    '1=1'
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from ..errors import StethoscopeError

__all__ = [
    "ALL",
    "MacroError",
    "QueryContext",
    "Variable",
    "apply_conditional_all",
    "expand_macros",
    "interpolate",
    "render",
]

#: The value Grafana gives a variable whose "All" option is selected.
ALL = "$__all"


class MacroError(StethoscopeError):
    """A macro is unknown or has the wrong number of arguments."""


@dataclass(frozen=True)
class QueryContext:
    """The dashboard time range (Unix seconds, fractional allowed) and the panel interval."""

    start: float
    end: float
    interval_s: float = 60.0

    @property
    def start_ms(self) -> int:
        return int(self.start * 1000)

    @property
    def end_ms(self) -> int:
        return int(self.end * 1000)


@dataclass(frozen=True)
class Variable:
    """How a template variable interpolates: plain, or quoted when multi-value or with All."""

    name: str
    multi: bool = False
    include_all: bool = False

    @property
    def quoted(self) -> bool:
        return self.multi or self.include_all


Value = str | Sequence[str]


def _args(text: str, open_at: int) -> tuple[list[str], int]:
    """Split the parenthesised arguments starting at ``text[open_at] == '('``.

    Returns the arguments (untrimmed) and the index just past the closing parenthesis.
    Commas inside nested parentheses or quotes do not split.
    """
    depth, quote, start, out = 0, "", open_at + 1, []
    i = open_at
    while i < len(text):
        ch = text[i]
        if quote:
            if ch == "\\":
                i += 1
            elif ch == quote:
                quote = ""
        elif ch in "'\"`":
            quote = ch
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth == 0:
                out.append(text[start:i])
                return out, i + 1
        elif ch == "," and depth == 1:
            out.append(text[start:i])
            start = i + 1
        i += 1
    raise MacroError(f"unbalanced parentheses after position {open_at}: {text[open_at:open_at + 60]!r}")


_CONDITIONAL = "$__conditionalAll("


def apply_conditional_all(sql: str, values: Mapping[str, Value]) -> str:
    """Replace every ``$__conditionalAll(cond, $var)``, innermost-last as the plugin does.

    >>> apply_conditional_all("a AND $__conditionalAll(g IN ($gpu), $gpu)", {"gpu": ["0"]})
    'a AND g IN ($gpu)'
    >>> apply_conditional_all("$__conditionalAll(g IN ($gpu), $gpu)", {"gpu": ALL})
    '1=1'
    """
    at = sql.rfind(_CONDITIONAL)
    while at != -1:
        args, end = _args(sql, at + len(_CONDITIONAL) - 1)
        if len(args) != 2:
            raise MacroError(f"$__conditionalAll takes 2 arguments, got {len(args)}: {sql[at:end]!r}")
        name = args[1].strip()[1:]
        value = values.get(name)
        is_all = value == ALL or value == "" or (not isinstance(value, str) and value is not None
                                                  and (list(value) == [ALL] or not list(value)))
        phrase = "1=1" if is_all else args[0]
        sql = sql[:at] + phrase + sql[end:]
        at = sql.rfind(_CONDITIONAL)
    return sql


_VAR = re.compile(r"\$(\w+)|\$\{(\w+)\}")


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def interpolate(sql: str, values: Mapping[Variable, Value], all_values: Mapping[str, Sequence[str]] | None = None) -> str:
    """Replace ``$name`` and ``${name}`` for the given variables; leave anything else (``$__`` macros).

    A variable set to :data:`ALL` stands for every value in ``all_values[name]``.

    >>> interpolate("price * $p", {Variable("p"): "2.5"})
    'price * 2.5'
    >>> interpolate("m IN (${m})", {Variable("m", multi=True): "x"})
    "m IN ('x')"
    """
    by_name = {v.name: (v, value) for v, value in values.items()}

    def sub(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in by_name:
            return match.group(0)
        var, value = by_name[name]
        if value == ALL:
            value = list((all_values or {}).get(name, ()))
            if not value:
                raise MacroError(f"${name} is All but no values were given for it")
        if isinstance(value, str):
            return _quote(value) if var.quoted else value
        return ",".join(_quote(v) for v in value)

    return _VAR.sub(sub, sql)


def _one(name: str, args: list[str]) -> str:
    if len(args) != 1 or not args[0].strip():
        raise MacroError(f"$__{name} takes one column argument, got {args!r}")
    return args[0].strip()


def _date(t: float) -> str:
    return datetime.fromtimestamp(t, tz=UTC).strftime("%Y-%m-%d")


def _expand_one(name: str, args: list[str] | None, ctx: QueryContext) -> str:
    start, end = int(ctx.start), int(ctx.end)
    secs = max(int(ctx.interval_s), 1)
    millis = max(int(ctx.interval_s * 1000), 1)
    if args is None:
        plain = {
            "fromTime": f"toDateTime({start})",
            "toTime": f"toDateTime({end})",
            "fromTime_ms": f"fromUnixTimestamp64Milli({ctx.start_ms})",
            "toTime_ms": f"fromUnixTimestamp64Milli({ctx.end_ms})",
            "interval_s": str(secs),
        }
        if name in plain:
            return plain[name]
        raise MacroError(f"unknown macro $__{name}")
    if name in ("fromTime", "toTime", "fromTime_ms", "toTime_ms", "interval_s") and args == [""]:
        return _expand_one(name, None, ctx)
    col = _one(name, args)
    columned = {
        "timeFilter": f"{col} >= toDateTime({start}) AND {col} <= toDateTime({end})",
        "timeFilter_ms": f"{col} >= fromUnixTimestamp64Milli({ctx.start_ms}) AND "
                         f"{col} <= fromUnixTimestamp64Milli({ctx.end_ms})",
        "dateFilter": f"{col} >= toDate('{_date(ctx.start)}') AND {col} <= toDate('{_date(ctx.end)}')",
        "timeFrom": f"{col} >= toDateTime({start})",
        "timeTo": f"{col} <= toDateTime({end})",
        "timeInterval": f"toStartOfInterval(toDateTime({col}), INTERVAL {secs} second)",
        "timeInterval_ms": f"toStartOfInterval(toDateTime64({col}, 3), INTERVAL {millis} millisecond)",
    }
    if name in columned:
        return columned[name]
    raise MacroError(f"unknown macro $__{name}")


_MACRO = re.compile(r"\$__(\w+)")


def expand_macros(sql: str, ctx: QueryContext) -> str:
    """Expand the backend macros (``$__timeFilter(c)``, ``$__interval_s``, ...) in ``sql``.

    >>> ctx = QueryContext(start=0, end=86400, interval_s=0.25)
    >>> expand_macros("$__dateFilter(d) -- $__interval_s $__timeInterval_ms(t)", ctx)
    "d >= toDate('1970-01-01') AND d <= toDate('1970-01-02') -- 1 toStartOfInterval(toDateTime64(t, 3), INTERVAL 250 millisecond)"
    """
    out, pos = [], 0
    while True:
        match = _MACRO.search(sql, pos)
        if match is None:
            out.append(sql[pos:])
            return "".join(out)
        out.append(sql[pos:match.start()])
        name, end = match.group(1), match.end()
        args = None
        if end < len(sql) and sql[end] == "(":
            args, end = _args(sql, end)
        out.append(_expand_one(name, args, ctx))
        pos = end


def render(sql: str, ctx: QueryContext, values: Mapping[Variable, Value] | None = None,
           all_values: Mapping[str, Sequence[str]] | None = None) -> str:
    """All three passes: conditional All, template variables, backend macros."""
    values = dict(values or {})
    sql = apply_conditional_all(sql, {v.name: value for v, value in values.items()})
    return expand_macros(interpolate(sql, values, all_values), ctx)
