"""A stdlib view of a socket someone else owns (a Trio socket, a raw fd): for the plain
non-blocking syscalls Trio has no call for, without taking the fd over."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator


@contextlib.contextmanager
def borrowed(fd: int) -> Iterator[socket.socket]:
    """A stdlib socket object for ``fd`` that does not close it (family and type come from
    the fd)."""
    sock = socket.socket(fileno=fd)
    try:
        yield sock
    finally:
        sock.detach()
