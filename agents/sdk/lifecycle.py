"""Closing monitors at interpreter exit without keeping them alive."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

__all__ = ["closer"]


def closer(monitor: Any) -> Callable[[], None]:
    """An exit hook that closes ``monitor`` if it still exists (holds no strong reference)."""
    ref = weakref.ref(monitor)

    def close() -> None:
        target = ref()
        if target is not None:
            target.close()

    return close
