"""The kernel forwarder's socket arithmetic: TCP counters, and emptying a receive queue
before the sockets enter the sockhash."""

from __future__ import annotations

import enum
import errno
import fcntl
import os
import socket
import struct

from ._ends import SIOCOUTQ, SocketLike

SIOCINQ = 0x541B  # FIONREAD
_TCP_INFO_LEN = 136


def _tcp_counts(sock: SocketLike) -> tuple[int, int]:
    """``(tcpi_bytes_acked, tcpi_bytes_received)``; each includes SYN/FIN sequence numbers."""
    data = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
    if len(data) < _TCP_INFO_LEN:
        raise OSError(errno.ENOTSUP, "TCP_INFO without bytes_acked/bytes_received")
    acked, received = struct.unpack_from("<QQ", data, 120)
    return acked, received


def _ioctl_int(fd: int, request: int) -> int:
    value: int = struct.unpack("i", fcntl.ioctl(fd, request, b"\0\0\0\0"))[0]
    return value


def written(sock: SocketLike) -> int:
    """Every sequence number handed to the socket to send: ``bytes_acked + SIOCOUTQ``."""
    return _tcp_counts(sock)[0] + _ioctl_int(sock.fileno(), SIOCOUTQ)


def received(sock: SocketLike) -> int:
    return _tcp_counts(sock)[1]


def consumed(sock: SocketLike) -> int:
    """Bytes userspace has read from the socket: received minus still queued (stable read)."""
    while True:
        before = received(sock)
        queued = _ioctl_int(sock.fileno(), SIOCINQ)
        if received(sock) == before:
            return before - queued


#: recv() size when emptying a receive queue before the insert: one buffer for every
#: connection (a fresh 1 MiB bytes object per read would be an mmap and munmap each time).
_DRAIN_CHUNK = 1 << 20
_drain_buffer = bytearray(_DRAIN_CHUNK)


class Ended(enum.Enum):
    """How a socket read during the hand-off ended."""

    EOF = enum.auto()
    RESET = enum.auto()


def drain_queued(fd: int) -> tuple[bytes, Ended | None]:
    """Read everything queued on ``fd`` now; ``(data, how it ended or None)``.

    A read shorter than asked for has emptied the queue, so no partly read skb is left. A
    reset read here is consumed (the kernel reports it once): the caller must pass it on.
    """
    chunks: list[bytes] = []
    while True:
        try:
            n = os.readv(fd, (_drain_buffer,))  # non-blocking socket: readv(2) is recv(2)
        except (BlockingIOError, InterruptedError):
            return b"".join(chunks), None
        except OSError:
            return b"".join(chunks), Ended.RESET
        if not n:
            return b"".join(chunks), Ended.EOF
        chunks.append(bytes(_drain_buffer[:n]))
        if n < _DRAIN_CHUNK:
            return b"".join(chunks), None
