"""The ``splice`` forwarder: splice(2) through one pipe per direction, driven from Trio.

The bytes go socket → pipe → socket inside the kernel and never enter Python's memory; Python
only decides when to call splice(2), waiting for readiness with
:func:`trio.lowlevel.wait_readable` / :func:`trio.lowlevel.wait_writable` on the sockets.

Behaviour is the same as :class:`~trio_sni.forward.copy.CopyForwarder`'s (both run in
:func:`~trio_sni.forward._userspace.pump_both_ways`, which says how a connection ends): at a FIN or
a reset of the source, what is still in the pipe goes to the other side first; byte counts are bytes
handed to the destination socket, and the idle timeout is one deadline on the pair pushed forward by
every chunk.

Memory per connection: at most two pipes of ``forwarding.pipe_size`` bytes (plus the
sockets' own buffers). ``F_SETPIPE_SZ`` above ``/proc/sys/fs/pipe-max-size`` or beyond the
user's pipe page allowance (``pipe-user-pages-soft``) is refused (EPERM) or the pipe is
smaller: the pipe then keeps the size the kernel gives it (docs/kernel-facts.md, fact 36).

Never use this on a socket that is in the BPF sockhash (docs/kernel-facts.md, fact 13): bytes the
verdict program passes are invisible to splice(2). The kernel forwarder falls back to copy,
not to this forwarder, for that reason.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket

import trio

from ._userspace import Direction, PumpEnd, pump_both_ways
from .copy import CopyForwarder
from .interface import ByteCounters, ForwarderStatistics, Mode, Side

log = logging.getLogger("trio_sni")

#: ``os.splice`` flags: move pages rather than copy where the kernel can, never block.
_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)
#: errnos from the source socket that mean the peer reset the connection (or it died).
_RESETS = (errno.ECONNRESET, errno.EPIPE, errno.ETIMEDOUT, errno.ECONNABORTED, errno.EHOSTUNREACH)


def splice_unavailable() -> str | None:
    """Why this platform cannot splice sockets, or ``None`` when it can."""
    if not hasattr(os, "splice"):
        return "os.splice is not available (needs Linux and Python 3.10+)"
    try:
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        return f"cannot create a pipe: {exc}"
    try:
        a, b = socket.socketpair()
        with a, b:
            b.send(b"x")
            if os.splice(a.fileno(), w, 1, flags=_FLAGS) != 1:
                return "splice(2) from a socket moved nothing"
    except OSError as exc:
        return f"splice(2) from a socket failed: {exc}"
    finally:
        os.close(r)
        os.close(w)
    return None


def open_pipe(size: int) -> tuple[int, int, int]:
    """A non-blocking pipe ``(read_fd, write_fd, capacity)`` of ``size`` bytes if allowed.

    EPERM (over ``pipe-max-size`` without CAP_SYS_RESOURCE, or over the user's allowance)
    and EBUSY (shrinking below what is in it) keep the default size.
    """
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        try:
            fcntl.fcntl(w, _F_SETPIPE_SZ, size)
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EBUSY):
                raise
        capacity = fcntl.fcntl(w, _F_GETPIPE_SZ)
    except BaseException:
        os.close(r)
        os.close(w)
        raise
    return r, w, capacity


class SpliceForwarder:
    """splice(2) through a pipe per direction, one Trio task per direction.

    Args:
        pipe_size: the size asked for each pipe (``forwarding.pipe_size``).
        idle_timeout: seconds without a byte either way.
        copy: copies a connection whose pipes cannot be created (out of fds); the first
            such fallback is logged, all are counted in ``fallbacks``.
    """

    mode = Mode.SPLICE

    def __init__(
        self, *, pipe_size: int, idle_timeout: float, copy: CopyForwarder | None = None
    ) -> None:
        self._pipe_size = pipe_size
        self._idle_timeout = idle_timeout
        self._copy = copy
        #: Pipes that got less than ``pipe_size`` (EPERM/EBUSY): the kernel's size was kept.
        self.small_pipes = 0
        #: Connections copied instead because their pipes could not be created (EMFILE...).
        self.fallbacks = 0

    def close(self) -> None:
        """Nothing to release (pipes live as long as their connection)."""

    def statistics(self) -> ForwarderStatistics:
        return ForwarderStatistics(
            self.mode, fallbacks=self.fallbacks, small_pipes=self.small_pipes
        )

    async def forward(
        self,
        client: trio.SocketStream,
        upstream: trio.SocketStream,
        *,
        first_bytes: bytes,
        counters: ByteCounters,
    ) -> str:
        fds: list[int] = []
        try:
            pipes = []
            try:
                for _ in range(2):
                    r, w, capacity = open_pipe(self._pipe_size)
                    fds += (r, w)
                    if capacity < self._pipe_size:
                        self.small_pipes += 1
                    pipes.append((r, w, capacity))
            except OSError as exc:
                if self._copy is None:
                    raise
                self.fallbacks += 1
                if self.fallbacks == 1:
                    log.warning(
                        "cannot create pipes for splice (%s): copying such connections", exc
                    )
                counters.mode = Mode.COPY
                return await self._copy.forward(
                    client, upstream, first_bytes=first_bytes, counters=counters
                )
            pipe_of = {Side.CLIENT: pipes[0], Side.UPSTREAM: pipes[1]}

            async def pump(
                src: trio.SocketStream, dst: trio.SocketStream, direction: Direction
            ) -> PumpEnd:
                return await _splice_through(pipe_of[direction.source], src, dst, direction)

            return await pump_both_ways(
                self.mode,
                client,
                upstream,
                first_bytes=first_bytes,
                counters=counters,
                idle_timeout=self._idle_timeout,
                pump=pump,
            )
        finally:
            for fd in fds:
                os.close(fd)


async def _splice_through(
    pipe: tuple[int, int, int],
    src: trio.SocketStream,
    dst: trio.SocketStream,
    direction: Direction,
) -> PumpEnd:
    """One direction: socket -> pipe -> socket until the source ends (EOF or reset: what is
    in the pipe is delivered first) or the destination fails."""
    rfd, wfd, capacity = pipe
    sfd, dfd = src.socket.fileno(), dst.socket.fileno()
    in_pipe = 0
    ended: PumpEnd | None = None
    while True:
        progressed = False
        if ended is None and in_pipe < capacity:
            try:
                n = os.splice(sfd, wfd, capacity - in_pipe, flags=_FLAGS)
            except BlockingIOError:
                pass
            except OSError as exc:
                if exc.errno not in _RESETS:
                    raise
                ended = PumpEnd.SOURCE_RESET
            else:
                if n == 0:
                    ended = PumpEnd.EOF
                in_pipe += n
                progressed = True
        if in_pipe:
            try:
                m = os.splice(rfd, dfd, in_pipe, flags=_FLAGS)
            except BlockingIOError:
                pass
            except OSError as exc:
                if exc.errno in _RESETS:
                    return PumpEnd.DESTINATION_RESET
                raise
            else:
                in_pipe -= m
                direction.moved(m)
                progressed = progressed or m > 0
        if ended is not None and not in_pipe:
            return ended
        if progressed:
            await trio.lowlevel.checkpoint()
        elif in_pipe:
            # The destination is full (or the pipe is, and only draining helps).
            await trio.lowlevel.wait_writable(dfd)
        else:
            await trio.lowlevel.wait_readable(sfd)
