"""The ``splice`` forwarder: splice(2) through one pipe per direction, driven from Trio.

The bytes go socket → pipe → socket inside the kernel and never enter Python's memory; Python
only decides when to call splice(2), waiting for readiness with
:func:`trio.lowlevel.wait_readable` / :func:`trio.lowlevel.wait_writable` on the sockets.

Behaviour is the same as :class:`~trio_sni.forward.copy.CopyForwarder`'s (both run in
:func:`~trio_sni.forward._userspace.pump_both_ways`, which says how a connection ends): at a FIN or
a reset of the source, what is still in the pipe goes to the other side first; byte counts are bytes
handed to the destination socket, and the idle timeout is one deadline on the pair pushed forward by
every chunk.

Memory and fds per connection: its two sockets. A direction borrows a pipe from the
forwarder's :class:`PipePool` only while bytes are in flight and gives it back, empty, as soon
as it has drained, so an idle connection holds no pipe (each pipe is two fds; a process
allowed 20,000 fds would otherwise hold only 3,333 idle connections). The pool keeps a few
idle pipes (:data:`PIPES_KEPT`) for the next burst. ``F_SETPIPE_SZ`` above
``/proc/sys/fs/pipe-max-size`` or beyond the user's pipe page allowance
(``pipe-user-pages-soft``) is refused (EPERM) or the pipe is smaller: the pipe then keeps the
size the kernel gives it (docs/kernel-facts.md, fact 36). A pipe that cannot be created (out of
fds) is not waited for: that chunk is copied with recv/send instead, and the access log says
``copy`` for the connection.

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
from collections.abc import Callable

import trio

from ._userspace import Direction, PumpEnd, pump_both_ways
from .copy import copy_chunk
from .interface import ByteCounters, ForwarderStatistics, Mode

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


#: Idle pipes the pool keeps for the next burst (two fds each); more are closed when given back.
PIPES_KEPT = 16


class PipePool:
    """Pipes lent to directions while their bytes are in flight, and given back empty."""

    def __init__(self, pipe_size: int) -> None:
        self._pipe_size = pipe_size
        self._idle: list[tuple[int, int, int]] = []
        #: Pipes that got less than ``pipe_size`` (EPERM/EBUSY): the kernel's size was kept.
        self.small_pipes = 0

    def take(self) -> tuple[int, int, int]:
        """An empty pipe ``(read_fd, write_fd, capacity)``; OSError if none can be made."""
        if self._idle:
            return self._idle.pop()
        pipe = open_pipe(self._pipe_size)
        if pipe[2] < self._pipe_size:
            self.small_pipes += 1
        return pipe

    def give_back(self, pipe: tuple[int, int, int]) -> None:
        """Return an *empty* pipe (one still holding bytes must be closed: :func:`close_pipe`)."""
        if len(self._idle) < PIPES_KEPT:
            self._idle.append(pipe)
        else:
            close_pipe(pipe)

    @property
    def idle(self) -> int:
        return len(self._idle)

    def close(self) -> None:
        while self._idle:
            close_pipe(self._idle.pop())


def close_pipe(pipe: tuple[int, int, int]) -> None:
    os.close(pipe[0])
    os.close(pipe[1])


class SpliceForwarder:
    """splice(2) through a pipe per direction while bytes move, one Trio task per direction.

    Args:
        pipe_size: the size asked for each pipe (``forwarding.pipe_size``).
        idle_timeout: seconds without a byte either way.
        buffer_size: recv() size for a chunk copied because no pipe could be made.
    """

    mode = Mode.SPLICE

    def __init__(self, *, pipe_size: int, idle_timeout: float, buffer_size: int) -> None:
        self._idle_timeout = idle_timeout
        self._buffer_size = buffer_size
        self._pipes = PipePool(pipe_size)
        #: Connections that copied a chunk because no pipe could be made (EMFILE...); the
        #: first is logged.
        self.fallbacks = 0

    def close(self) -> None:
        """Close the idle pipes."""
        self._pipes.close()

    def statistics(self) -> ForwarderStatistics:
        return ForwarderStatistics(
            self.mode,
            fallbacks=self.fallbacks,
            small_pipes=self._pipes.small_pipes,
            idle_pipes=self._pipes.idle,
        )

    async def forward(
        self,
        client: trio.SocketStream,
        upstream: trio.SocketStream,
        *,
        first_bytes: bytes,
        counters: ByteCounters,
        on_end: Callable[[str], None] | None = None,
    ) -> str:
        """As :meth:`Forwarder.forward` (a pump per direction: never handed off)."""

        async def pump(
            src: trio.SocketStream, dst: trio.SocketStream, direction: Direction
        ) -> PumpEnd:
            return await self._splice_through(src, dst, direction)

        return await pump_both_ways(
            self.mode,
            client,
            upstream,
            first_bytes=first_bytes,
            counters=counters,
            idle_timeout=self._idle_timeout,
            pump=pump,
        )

    async def _splice_through(
        self, src: trio.SocketStream, dst: trio.SocketStream, direction: Direction
    ) -> PumpEnd:
        """One direction: socket -> pipe -> socket until the source ends (EOF or reset: what
        is in the pipe is delivered first) or the destination fails. The pipe is borrowed
        when the source has bytes and given back once it has drained."""
        sfd, dfd = src.socket.fileno(), dst.socket.fileno()
        pipe: tuple[int, int, int] | None = None
        in_pipe = 0
        ended: PumpEnd | None = None
        try:
            while True:
                if pipe is None:
                    if ended is not None:
                        return ended
                    await trio.lowlevel.wait_readable(sfd)
                    try:
                        pipe = self._pipes.take()
                    except OSError as exc:
                        ended = await self._copy_chunk(src, dst, direction, exc)
                        continue
                rfd, wfd, capacity = pipe
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
                if not in_pipe:
                    self._pipes.give_back(pipe)  # drained: an idle direction holds no pipe
                    pipe = None
                    if progressed:
                        await trio.lowlevel.checkpoint()
                elif progressed:
                    await trio.lowlevel.checkpoint()
                else:
                    # The destination is full (or the pipe is, and only draining helps).
                    await trio.lowlevel.wait_writable(dfd)
        finally:
            if pipe is not None:
                close_pipe(pipe)  # it may still hold bytes: never lend it again

    async def _copy_chunk(
        self, src: trio.SocketStream, dst: trio.SocketStream, direction: Direction, why: OSError
    ) -> PumpEnd | None:
        """Move one chunk with recv/send because no pipe could be made; how the direction
        ended, or None if it goes on."""
        counters = direction.pair.counters
        if counters.mode is not Mode.COPY:
            counters.mode = Mode.COPY  # the access log says the connection was (partly) copied
            self.fallbacks += 1
            if self.fallbacks == 1:
                log.warning("cannot create pipes for splice (%s): copying such chunks", why)
        return await copy_chunk(src, dst, direction, self._buffer_size)
