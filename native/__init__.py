"""C kernels and their pure-Python twins.

Each kernel in ``native/*.c`` is compiled into the extension module
``stethoscope._native`` and has a twin of the same signature in a Python module
beside it. :func:`implementation` picks one at call time: the C kernel when it
was built, the twin when it was not or when ``STETHOSCOPE_PURE_PYTHON=1`` is set
(the test suite runs once each way).

>>> from stethoscope import native
>>> native.implementation("python").__name__
'stethoscope.native.otlp_rowbinary'
"""

from __future__ import annotations

import importlib
import logging
import os
from types import ModuleType

__all__ = ["implementation", "native_available", "PURE_ENV"]

#: Set to ``1`` to force the pure-Python twins everywhere.
PURE_ENV = "STETHOSCOPE_PURE_PYTHON"

_log = logging.getLogger(__name__)
_warned = False


def native_available() -> bool:
    """Whether the compiled ``stethoscope._native`` module can be imported."""
    try:
        importlib.import_module("stethoscope._native")
    except ImportError:
        return False
    return True


def implementation(choice: str = "auto") -> ModuleType:
    """The module providing the kernels: ``"native"``, ``"python"`` or ``"auto"``.

    ``auto`` means native when available, unless ``STETHOSCOPE_PURE_PYTHON=1``.
    Asking for ``native`` when it was not built raises :class:`ImportError`.
    """
    if choice not in ("auto", "native", "python"):
        raise ValueError(f"implementation must be auto, native or python, not {choice!r}")
    if choice == "auto":
        choice = "python" if os.environ.get(PURE_ENV, "") not in ("", "0") else "native"
        if choice == "native" and not native_available():
            global _warned
            if not _warned:
                _warned = True
                _log.warning(
                    "the C kernels (stethoscope._native) were not built, probably for want of a C "
                    "compiler at install time; using the slower pure-Python twins"
                )
            choice = "python"
    if choice == "native":
        return importlib.import_module("stethoscope._native")
    return importlib.import_module("stethoscope.native.otlp_rowbinary")
