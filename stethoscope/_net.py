"""A free loopback port for services started in-process (the demo, tests, benchmarks)."""

from __future__ import annotations

import socket
import threading

__all__ = ["free_port"]

_handed_out: set[int] = set()
_lock = threading.Lock()


def free_port() -> int:
    """A loopback port free now and never returned before in this process.

    The kernel may give the same ephemeral port to two quick ``bind(0)`` calls once the
    first socket is closed, so two ports asked for one service could otherwise collide.
    """
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        with _lock:
            if port not in _handed_out:
                _handed_out.add(port)
                return port
