"""Small helpers for the SQL that analytics sends to the store (chDB or a ClickHouse server).

Values that come from telemetry (model names, streams, job names) go into queries as
ClickHouse string literals, never by plain formatting; times as integer milliseconds.

Examples:
    >>> literal("it's a \\\\ test")
    "'it\\\\'s a \\\\\\\\ test'"
    >>> ts_ms(1.5)
    'fromUnixTimestamp64Milli(toInt64(1500))'
"""

from __future__ import annotations

__all__ = ["literal", "ts_ms"]


def literal(s: str) -> str:
    """``s`` as a ClickHouse string literal: backslashes and single quotes escaped."""
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"


def ts_ms(t: float) -> str:
    """A ``DateTime64(3)`` expression for ``t`` seconds since the epoch (rounded to the millisecond)."""
    return f"fromUnixTimestamp64Milli(toInt64({int(round(t * 1000))}))"
