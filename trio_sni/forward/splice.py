"""The ``splice`` forwarder: splice(2) through a pipe per direction, relayed without a task.

The bytes go socket → pipe → socket inside the kernel and never enter Python's memory; Python
only decides when to call splice(2), on the readiness the shared relay reports.

Behaviour is the same as :class:`~trio_sni.forward.copy.CopyForwarder`'s (both run in
:mod:`~trio_sni.forward._relay`, which says how a connection ends): at a FIN or a reset of the
source, what is still in the pipe goes to the other side first; byte counts are bytes handed to
the destination socket, and the idle timeout is one deadline on the pair pushed forward by
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

from ._relay import Flow, Relay, Relayed
from .copy import CopyMover
from .interface import ByteCounters, ForwarderStatistics, Mode

log = logging.getLogger("trio_sni")

#: ``os.splice`` flags: move pages rather than copy where the kernel can, never block.
_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)


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


class SpliceMover:
    """Moves a direction's bytes socket → pipe → socket; the pipe is borrowed from the pool
    when the source has bytes and given back once it has drained. A chunk for which no pipe
    can be made is copied instead (and the connection's access-log mode says ``copy``)."""

    def __init__(self, pipes: PipePool, copy: CopyMover) -> None:
        self._pipes = pipes
        self._copy = copy
        #: Connections that copied a chunk because no pipe could be made (EMFILE...); the
        #: first is logged.
        self.fallbacks = 0

    def fill(self, flow: Flow, counters: ByteCounters) -> int:
        if flow.pipe is None:
            try:
                flow.pipe = self._pipes.take()
            except OSError as exc:
                self._fell_back(counters, exc)
                return self._copy.fill(flow, counters)
        try:
            n = os.splice(flow.src, flow.pipe[1], flow.pipe[2], flags=_FLAGS)
        except OSError:
            self._give_back(flow)
            raise
        if not n:
            self._give_back(flow)
        flow.held = n
        return n

    def drain(self, flow: Flow) -> int:
        if flow.pipe is None:
            return self._copy.drain(flow)
        n = os.splice(flow.pipe[0], flow.dst, flow.held, flags=_FLAGS)
        flow.held -= n
        if not flow.held:
            self._give_back(flow)  # drained: an idle direction holds no pipe
        return n

    def park(self, flow: Flow) -> None:
        if flow.pipe is None:
            self._copy.park(flow)

    def drop(self, flow: Flow) -> None:
        if flow.pipe is not None:
            if flow.held:
                close_pipe(flow.pipe)  # it still holds bytes: never lend it again
            else:
                self._pipes.give_back(flow.pipe)
            flow.pipe = None
        self._copy.drop(flow)

    def emptied(self, n: int) -> bool:
        """Never known: a splice into a pipe also stops when the pipe's slots are used up
        (one per skb fragment), with bytes still queued."""
        return False

    def _give_back(self, flow: Flow) -> None:
        assert flow.pipe is not None
        self._pipes.give_back(flow.pipe)
        flow.pipe = None

    def _fell_back(self, counters: ByteCounters, why: OSError) -> None:
        if counters.mode is not Mode.COPY:
            counters.mode = Mode.COPY  # the access log says the connection was (partly) copied
            self.fallbacks += 1
            if self.fallbacks == 1:
                log.warning("cannot create pipes for splice (%s): copying such chunks", why)


class SpliceForwarder:
    """splice(2) through a pipe per direction while bytes move, relayed without a task.

    Args:
        pipe_size: the size asked for each pipe (``forwarding.pipe_size``).
        idle_timeout: seconds without a byte either way.
        buffer_size: recv() size for a chunk copied because no pipe could be made.
    """

    mode = Mode.SPLICE

    def __init__(self, *, pipe_size: int, idle_timeout: float, buffer_size: int) -> None:
        self._pipes = PipePool(pipe_size)
        self.mover = SpliceMover(self._pipes, CopyMover(buffer_size))
        self._relay = Relay(self.mode, self.mover, idle_timeout)

    @property
    def fallbacks(self) -> int:
        """Connections that copied a chunk because no pipe could be made."""
        return self.mover.fallbacks

    def open(self) -> None:
        """Make the relay's epoll instance now (see :meth:`CopyForwarder.open`)."""
        self._relay.open()

    def close(self) -> None:
        """End every connection still relayed (reason ``shutdown``), close the idle pipes."""
        self._relay.close()
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
    ) -> str | Relayed:
        """As :meth:`Forwarder.forward` (handed off to the relay when given ``on_end``)."""
        return await self._relay.forward(
            client,
            upstream,
            first_bytes=first_bytes,
            counters=counters,
            on_end=on_end,
            reset=(),
        )
