"""Lazy imports of optional dependencies, with an error that names the extra."""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import MissingExtraError

__all__ = ["require"]


def require(module: str, *, extra: str, feature: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingExtraError` naming ``extra``.

    >>> require("json", extra="server", feature="JSON").__name__
    'json'
    >>> require("no_such_module_here", extra="server", feature="The store")
    Traceback (most recent call last):
    ...
    stethoscope.errors.MissingExtraError: The store needs the Python package 'no_such_module_here', which is not installed; install the extra with: pip install 'stethoscope[server]'
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if exc.name is not None and module.split(".")[0] != exc.name.split(".")[0]:
            raise  # the module exists but one of *its* imports failed: show that
        raise MissingExtraError(module, extra, feature) from exc
