"""The exception tree shared by every part of Stethoscope.

::

    StethoscopeError
    ├── ConfigError            configuration invalid; lists every problem at once
    ├── MissingExtraError      an optional dependency group is not installed
    ├── PluginError            an entry point failed to load or is not what it claims
    ├── SchemaError            DDL or a migration failed
    ├── StoreError             the store could not run a query or insert
    │   └── StoreUnavailable   the store cannot be reached right now (retryable)
    ├── DecodeError            an incoming payload is malformed (4xx for receivers)
    └── SpoolError             the agent's on-disk spool failed (agents/spool.py)
        └── SpoolFullError     the disk under the spool is full; the record was not stored

Third-party errors are translated at the boundary with ``raise ... from exc`` so
callers only ever need to catch these.
"""

from __future__ import annotations

__all__ = [
    "StethoscopeError",
    "ConfigError",
    "MissingExtraError",
    "PluginError",
    "SchemaError",
    "StoreError",
    "StoreUnavailable",
    "DecodeError",
]


class StethoscopeError(Exception):
    """Root of every error Stethoscope raises on purpose."""


class ConfigError(StethoscopeError):
    """One or more configuration problems, all reported together.

    >>> err = ConfigError(["port: must be 1..65535, got 0", "data_dir: empty"])
    >>> print(err)
    2 configuration problems:
      - port: must be 1..65535, got 0
      - data_dir: empty
    """

    def __init__(self, problems: list[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        n = len(self.problems)
        head = "1 configuration problem:" if n == 1 else f"{n} configuration problems:"
        super().__init__("\n".join([head, *("  - " + p for p in self.problems)]))


class MissingExtraError(StethoscopeError, ImportError):
    """A feature needs an optional dependency group that is not installed."""

    def __init__(self, module: str, extra: str, feature: str) -> None:
        self.module, self.extra, self.feature = module, extra, feature
        super().__init__(
            f"{feature} needs the Python package {module!r}, which is not installed; "
            f"install the extra with: pip install 'stethoscope[{extra}]'"
        )


class PluginError(StethoscopeError):
    """An entry-point plugin could not be loaded or has the wrong shape."""


class SchemaError(StethoscopeError):
    """Creating or migrating the schema failed."""


class StoreError(StethoscopeError):
    """The store rejected a query or an insert."""

    def __init__(self, message: str, *, code: int | None = None) -> None:
        self.code = code
        super().__init__(message)


class StoreUnavailable(StoreError):
    """The store cannot be reached at the moment; the operation may be retried."""


class DecodeError(StethoscopeError):
    """A payload could not be decoded; the message says what was wrong."""
