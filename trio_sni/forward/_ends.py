"""How a TCP socket's end is read and passed on: the facts all three forwarders share.

The kernel reports a reset to one reader only and a reset discards the send queue
(docs/kernel-facts.md, facts 46-49); these helpers read a socket's end from its state instead
of from the one call that saw the error, and pass a reset on only once the peer has
acknowledged every byte before it.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import os
import socket
import struct
from typing import Protocol

import trio

from .interface import ByteCounters, Side

#: ``ioctl`` request for the bytes a TCP socket holds that its peer has not acknowledged.
SIOCOUTQ = 0x5411  # TIOCOUTQ
#: ``tcpi_state`` of a socket that is gone: reset, timed out, or closed both ways.
TCP_CLOSE = 7
#: How often a socket whose reset is about to be passed on is checked for unacknowledged bytes
#: (seconds): from the first value, doubling up to the second while nothing moves.
ACK_POLL = (0.001, 0.05)


class SocketLike(Protocol):
    """A stdlib or trio socket object (both have these)."""

    def getsockopt(self, level: int, option: int, buflen: int) -> bytes: ...

    def fileno(self) -> int: ...


def tcp_state(sock: SocketLike) -> int:
    """``tcpi_state`` (``TCP_CLOSE`` once reset); ``TCP_CLOSE`` if the socket is unusable."""
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
    except OSError:
        return TCP_CLOSE


def unacknowledged(sock: SocketLike) -> int:
    """Bytes handed to ``sock`` that its peer has not acknowledged yet (``SIOCOUTQ``)."""
    value: int = struct.unpack("i", fcntl.ioctl(sock.fileno(), SIOCOUTQ, b"\0\0\0\0"))[0]
    return value


def reset_on_close(stream: trio.SocketStream) -> None:
    """Make the next close send an RST (SO_LINGER 0), to pass a reset on to the peer."""
    with contextlib.suppress(OSError):  # already closed or reset: nothing left to signal
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def pending_error(sock: SocketLike) -> bool:
    """Whether an error (a reset) waits to be read; reading it here consumes it."""
    try:
        return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR, 4) != b"\0\0\0\0"
    except OSError:
        return False


def closed_by_reset(sock: SocketLike, *, fin_sent: bool) -> bool:
    """Whether a socket is gone because it was reset (also when its error was read elsewhere).

    The kernel reports a reset to one reader only (a failed ``send`` or ``recv`` consumes
    ``sk_err``; docs/kernel-facts.md, facts 46 and 48), after which ``recv`` returns a plain
    EOF. The state still tells: a FIN leaves the socket in CLOSE_WAIT (or later states), a
    reset in CLOSE. CLOSE is also where a clean close ends once the proxy has sent its own FIN
    and both are acknowledged; then only a pending error tells a reset.
    """
    if tcp_state(sock) != TCP_CLOSE:
        return False
    return not fin_sent or pending_error(sock)


class Ending(enum.Enum):
    """How a socket whose read returned EOF ended."""

    FIN = enum.auto()
    RESET = enum.auto()
    #: A FIN, then a reset: pass both on, in that order.
    FIN_THEN_RESET = enum.auto()


def how_it_ended(sock: SocketLike, *, fin_sent: bool) -> Ending:
    """How a socket whose ``recv`` returned EOF ended (see :func:`closed_by_reset`).

    A reset alone is read as an error, not as EOF, unless something else read the error first;
    so an error still pending at EOF means a FIN came first (after a FIN, ``recv`` reports EOF
    even when a reset followed: docs/kernel-facts.md, fact 47).
    """
    if tcp_state(sock) != TCP_CLOSE:
        return Ending.FIN
    if pending_error(sock):
        return Ending.FIN_THEN_RESET
    return Ending.FIN if fin_sent else Ending.RESET


async def send_counted(
    stream: trio.SocketStream, data: bytes, counters: ByteCounters, destination: Side
) -> bool:
    """Send all of ``data`` to ``destination`` (``client`` or ``upstream``), counting every byte
    the socket takes; False if it was reset first.

    ``send_all`` would not say how much of ``data`` went out before a reset, and an early answer
    (a backend that reads part of an upload, answers and resets) makes that count matter. What
    the socket takes at once is sent without Trio's checkpoints (the first bytes of a
    connection almost always fit); only the rest waits for the socket.
    """
    view = memoryview(data)
    fd = stream.socket.fileno()
    while view:
        try:
            n = os.write(fd, view)  # the socket is non-blocking: write(2) is send(2) here
        except (BlockingIOError, InterruptedError):
            break
        except OSError:
            return False
        view = view[n:]
        _count(counters, destination, n)
    while view:
        try:
            n = await stream.socket.send(view)
        except OSError:
            return False
        _count(counters, destination, n)
        view = view[n:]
    return True


def _count(counters: ByteCounters, destination: Side, n: int) -> None:
    if destination is Side.UPSTREAM:
        counters.to_upstream += n
    else:
        counters.to_client += n
