"""A stdlib view of a socket someone else owns (a Trio socket, a raw fd): for the plain
non-blocking syscalls Trio has no call for, without taking the fd over."""

from __future__ import annotations

import socket
from types import TracebackType
from typing import Protocol


class SocketLike(Protocol):
    """What :func:`borrowed` needs of a socket object (Trio's and the stdlib's have it)."""

    @property
    def family(self) -> int: ...
    @property
    def type(self) -> int: ...
    @property
    def proto(self) -> int: ...
    def fileno(self) -> int: ...


class borrowed:  # used as a function: ``with borrowed(sock) as raw``
    """A stdlib socket object for ``source`` (a socket object, or a bare fd) that does not
    close it. Family and type come from ``source`` when it is a socket object, so no
    ``getsockopt`` calls are made (this is on every connection's path); from the fd otherwise.
    """

    __slots__ = ("_sock",)

    def __init__(self, source: SocketLike | int) -> None:
        if isinstance(source, int):
            self._sock = socket.socket(fileno=source)
        else:
            self._sock = socket.socket(
                source.family, source.type, source.proto, fileno=source.fileno()
            )

    def __enter__(self) -> socket.socket:
        return self._sock

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._sock.detach()
