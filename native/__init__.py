"""C kernels and their pure-Python twins.

Kernels come in families. Each family has a C extension module and a twin
module beside this file with the same names and identical results:

==================  =======================  ====================================
family              C module                 twin
==================  =======================  ====================================
``otlp_rowbinary``  ``stethoscope._native``  ``stethoscope.native.otlp_rowbinary``
``sketch``          ``stethoscope._sketch``  ``stethoscope.native.sketch``
``sampling``        ``stethoscope._sketch``  ``stethoscope.native.sampling``
==================  =======================  ====================================

:func:`implementation` picks one at call time: the C kernel when it was built,
the twin when it was not or when ``STETHOSCOPE_PURE_PYTHON=1`` is set (the test
suite runs once each way). The C modules are optional in the build: a missing
one is reported by one warning per family, then the twin takes over.

>>> from stethoscope import native
>>> native.implementation("python").__name__
'stethoscope.native.otlp_rowbinary'
>>> native.implementation("python", kernel="sketch").__name__
'stethoscope.native.sketch'
>>> sorted(native.KERNELS)
['otlp_rowbinary', 'sampling', 'sketch']
"""

from __future__ import annotations

import importlib
import logging
import os
from types import MappingProxyType, ModuleType

__all__ = ["implementation", "native_available", "PURE_ENV", "KERNELS", "DEFAULT_KERNEL"]

#: Set to ``1`` to force the pure-Python twins everywhere.
PURE_ENV = "STETHOSCOPE_PURE_PYTHON"

#: Kernel family -> (C module, twin module).
KERNELS = MappingProxyType(
    {
        "otlp_rowbinary": ("stethoscope._native", "stethoscope.native.otlp_rowbinary"),
        "sketch": ("stethoscope._sketch", "stethoscope.native.sketch"),
        "sampling": ("stethoscope._sketch", "stethoscope.native.sampling"),
    }
)

#: The family :func:`implementation` and :func:`native_available` use when none is named.
DEFAULT_KERNEL = "otlp_rowbinary"

_log = logging.getLogger(__name__)
#: Whether the default family has warned about its missing C module.
_warned = False
#: The other families that have warned.
_warned_kernels: set[str] = set()


def _family(kernel: str) -> tuple[str, str]:
    try:
        return KERNELS[kernel]
    except KeyError:
        raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, not {kernel!r}") from None


def native_available(kernel: str = DEFAULT_KERNEL) -> bool:
    """Whether the compiled module of a kernel family (default ``otlp_rowbinary``) can be imported."""
    try:
        importlib.import_module(_family(kernel)[0])
    except ImportError:
        return False
    return True


def _warn_missing(kernel: str, module: str) -> None:
    global _warned
    if kernel == DEFAULT_KERNEL:
        if _warned:
            return
        _warned = True
    else:
        if kernel in _warned_kernels:
            return
        _warned_kernels.add(kernel)
    _log.warning(
        "the C kernels (%s) were not built, probably for want of a C compiler at install time; "
        "using the slower pure-Python twins for %s",
        module,
        kernel,
    )


def implementation(choice: str = "auto", kernel: str = DEFAULT_KERNEL) -> ModuleType:
    """The module providing a family's kernels: ``"native"``, ``"python"`` or ``"auto"``.

    ``auto`` means native when available, unless ``STETHOSCOPE_PURE_PYTHON=1``.
    Asking for ``native`` when it was not built raises :class:`ImportError`.
    ``kernel`` names the family (see :data:`KERNELS`).
    """
    if choice not in ("auto", "native", "python"):
        raise ValueError(f"implementation must be auto, native or python, not {choice!r}")
    c_module, twin = _family(kernel)
    if choice == "auto":
        choice = "python" if os.environ.get(PURE_ENV, "") not in ("", "0") else "native"
        if choice == "native":
            # the default family is asked with no argument: the one-argument-free
            # form is the long-standing signature that callers may substitute
            ok = native_available() if kernel == DEFAULT_KERNEL else native_available(kernel)
            if not ok:
                _warn_missing(kernel, c_module)
                choice = "python"
    return importlib.import_module(c_module if choice == "native" else twin)
