"""Forwarders move bytes between the client and the target once a route is chosen.

Every forwarder implements one small interface, :class:`Forwarder`: take two connected
sockets and the bytes already read from the client, move bytes both ways until both
directions are done, propagate half-closes and resets, count bytes, and return why the
connection ended. ``copy`` is here; ``kernel`` (BPF sockhash splice) is in
:mod:`trio_sni.kernel_forward`, ``splice`` (splice(2) through pipes) in
:mod:`trio_sni.splice_forward`.

:func:`trio_sni.forwarding_modes.choose_forwarder` is the single place that decides which
forwarder a connection gets, and says why.

Termination reasons (the ``reason`` in access logs and metrics) returned here:
``normal`` (both sides closed cleanly), ``idle_timeout``, ``client_reset``, ``upstream_reset``.

How a connection ends, in every mode (docs/kernel-facts.md, facts 46-49, has the kernel facts):
what one side sent before its FIN or RST reaches the other side first; a FIN is passed on as
a FIN (``shutdown(SHUT_WR)``), an RST as an RST (``SO_LINGER`` 0), and only once the other
side's peer has acknowledged every byte before it (a reset discards the send queue).
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import socket
import struct
from collections.abc import Awaitable, Callable, Collection
from typing import Protocol

import attrs
import trio


@attrs.define(eq=False)
class ByteCounters:
    """Bytes moved so far; read live by the status endpoint, written by the forwarder."""

    to_upstream: int = 0
    to_client: int = 0
    #: The mode that actually forwarded this connection (``kernel`` can fall back to
    #: ``copy`` per connection); ``None`` until a forwarder starts.
    mode: str | None = None


class Forwarder(Protocol):
    """What every forwarding mode implements."""

    mode: str

    async def forward(
        self,
        client: trio.SocketStream,
        upstream: trio.SocketStream,
        *,
        first_bytes: bytes,
        counters: ByteCounters,
    ) -> str:
        """Move bytes until both directions are finished; return the termination reason.

        Args:
            client: the accepted client connection.
            upstream: the connection to the target.
            first_bytes: what the proxy already read from the client (the ClientHello and
                anything after it); it is sent to the target before anything else.
            counters: updated as bytes move, so observers see live numbers.

        The caller closes both streams afterwards, whatever happens here.
        """
        ...


#: ``ioctl`` request for the bytes a TCP socket holds that its peer has not acknowledged.
SIOCOUTQ = 0x5411  # TIOCOUTQ
#: ``tcpi_state`` of a socket that is gone: reset, timed out, or closed both ways.
TCP_CLOSE = 7
#: How often a socket whose reset is about to be passed on is checked for unacknowledged bytes
#: (seconds): from the first value, doubling up to the second while nothing moves.
ACK_POLL = (0.001, 0.05)


class _Sock(Protocol):
    """A stdlib or trio socket object (both have these)."""

    def getsockopt(self, level: int, option: int, buflen: int) -> bytes: ...

    def fileno(self) -> int: ...


def tcp_state(sock: _Sock) -> int:
    """``tcpi_state`` (``TCP_CLOSE`` once reset); ``TCP_CLOSE`` if the socket is unusable."""
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
    except OSError:
        return TCP_CLOSE


def unacknowledged(sock: _Sock) -> int:
    """Bytes handed to ``sock`` that its peer has not acknowledged yet (``SIOCOUTQ``)."""
    value: int = struct.unpack("i", fcntl.ioctl(sock.fileno(), SIOCOUTQ, b"\0\0\0\0"))[0]
    return value


def reset_on_close(stream: trio.SocketStream) -> None:
    """Make the next close send an RST (SO_LINGER 0), to pass a reset on to the peer."""
    with contextlib.suppress(OSError):  # already closed or reset: nothing left to signal
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def pending_error(sock: _Sock) -> bool:
    """Whether an error (a reset) waits to be read; reading it here consumes it."""
    try:
        return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR, 4) != b"\0\0\0\0"
    except OSError:
        return False


def closed_by_reset(sock: _Sock, *, fin_sent: bool) -> bool:
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


def how_it_ended(sock: _Sock, *, fin_sent: bool) -> Ending:
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


async def reset_when_acknowledged(
    stream: trio.SocketStream, on_progress: Callable[[], None]
) -> None:
    """Pass a reset on to ``stream``'s peer once it has acknowledged everything sent to it.

    Closing with SO_LINGER 0 discards the send queue, so an answer the other side sent just
    before its reset would be lost. Waits while the queue drains (``on_progress`` is called
    whenever it shrinks, to push the idle deadline); returns at once if the socket is gone.
    """
    delay, most = ACK_POLL
    queued = -1
    while True:
        try:
            left = unacknowledged(stream.socket)
        except OSError:
            break
        if left == 0 or tcp_state(stream.socket) == TCP_CLOSE:
            break
        if queued != -1 and left < queued:
            on_progress()
            delay = ACK_POLL[0]
        queued = left
        await trio.sleep(delay)
        delay = min(most, delay * 2)
    reset_on_close(stream)


class CopyForwarder:
    """Userspace copy in two Trio tasks, one per direction.

    Ends as :func:`pump_both_ways` says. The idle timeout is one deadline on the whole pair,
    pushed forward by every chunk in either direction.
    """

    mode = "copy"

    def __init__(self, *, buffer_size: int, idle_timeout: float) -> None:
        self._buffer_size = buffer_size
        self._idle_timeout = idle_timeout

    async def forward(
        self,
        client: trio.SocketStream,
        upstream: trio.SocketStream,
        *,
        first_bytes: bytes,
        counters: ByteCounters,
        reset: Collection[str] = (),
    ) -> str:
        """As :meth:`Forwarder.forward`; ``reset`` names sides whose reset another forwarder
        has already read (the kernel forwarder hands a connection over after its hand-off
        found one)."""
        return await pump_both_ways(
            self.mode,
            client,
            upstream,
            first_bytes=first_bytes,
            counters=counters,
            idle_timeout=self._idle_timeout,
            pump=self._pump,
            reset=reset,
        )

    async def _pump(self, src: trio.SocketStream, dst: trio.SocketStream, side: Side) -> PumpEnd:
        while True:
            try:
                data = await src.receive_some(self._buffer_size)
            except trio.BrokenResourceError:
                return PumpEnd.SOURCE_RESET
            if not data:
                return PumpEnd.EOF
            if not await send_counted(dst, data, side.pair.counters, side.destination):
                return PumpEnd.DESTINATION_RESET
            side.pair.active()


async def send_counted(
    stream: trio.SocketStream, data: bytes, counters: ByteCounters, destination: str
) -> bool:
    """Send all of ``data`` to ``destination`` (``client`` or ``upstream``), counting every byte
    the socket takes; False if it was reset first.

    ``send_all`` would not say how much of ``data`` went out before a reset, and an early answer
    (a backend that reads part of an upload, answers and resets) makes that count matter.
    """
    view = memoryview(data)
    while view:
        try:
            n = await stream.socket.send(view)
        except OSError:
            return False
        if destination == "upstream":
            counters.to_upstream += n
        else:
            counters.to_client += n
        view = view[n:]
    return True


class PumpEnd(enum.Enum):
    """How one direction's pump stopped."""

    #: The source sent FIN (or was reset and its error was read elsewhere: the frame checks).
    EOF = enum.auto()
    #: Reading the source failed: it was reset. Everything read before was delivered.
    SOURCE_RESET = enum.auto()
    #: Writing to the destination failed: it was reset. What was read is dropped.
    DESTINATION_RESET = enum.auto()


def other_side(side: str) -> str:
    return "upstream" if side == "client" else "client"


@attrs.define(eq=False)
class Side:
    """One direction of a connection, as its pump sees it (``name``: where bytes come from,
    ``client`` or ``upstream``): it reports bytes moved to the shared frame."""

    name: str
    pair: _Pair

    @property
    def destination(self) -> str:
        return other_side(self.name)

    def moved(self, n: int) -> None:
        """``n`` bytes were handed to the destination: count them, push the idle deadline."""
        if self.name == "client":
            self.pair.counters.to_upstream += n
        else:
            self.pair.counters.to_client += n
        self.pair.active()


@attrs.define(eq=False)
class _Pair:
    """The state the two directions of one connection share."""

    streams: dict[str, trio.SocketStream]
    counters: ByteCounters
    idle: trio.CancelScope
    idle_timeout: float
    #: Sides whose socket was reset, in the order the resets were seen.
    resets: list[str] = attrs.Factory(list)
    #: Sides the proxy has sent a FIN to.
    fin_sent: set[str] = attrs.Factory(set)
    #: Each running direction's cancel scope, by the side it reads from.
    directions: dict[str, trio.CancelScope] = attrs.Factory(dict)

    def active(self) -> None:
        self.idle.deadline = trio.current_time() + self.idle_timeout

    def mark_reset(self, side: str) -> None:
        """``side``'s socket was reset: nothing more can be written to it, so the direction
        into it stops; the direction out of it goes on until it has read what came first."""
        if side in self.resets:
            return
        self.resets.append(side)
        into = self.directions.get(other_side(side))
        if into is not None:
            into.cancel()

    @property
    def reason(self) -> str:
        return f"{self.resets[0]}_reset" if self.resets else "normal"


#: A userspace forwarder's loop for one direction: move bytes from ``src`` to ``dst`` until
#: the source ends or either socket fails (see :class:`PumpEnd`).
Pump = Callable[[trio.SocketStream, trio.SocketStream, Side], Awaitable[PumpEnd]]


async def pump_both_ways(
    mode: str,
    client: trio.SocketStream,
    upstream: trio.SocketStream,
    *,
    first_bytes: bytes,
    counters: ByteCounters,
    idle_timeout: float,
    pump: Pump,
    reset: Collection[str] = (),
) -> str:
    """The frame the userspace forwarders (copy, splice) share; returns the termination reason.

    Sends ``first_bytes``, runs ``pump`` in each direction in one nursery under one idle
    deadline (pushed by every chunk either way), and ends each direction as its source did:

    - FIN: once the pump has emptied the source, ``shutdown(SHUT_WR)`` on the destination.
    - Reset of the source: the pump reads and delivers what came before it; then the direction
      into the reset socket stops and, once the other peer has acknowledged everything, the
      other socket is reset too (SO_LINGER 0 on close).
    - Reset of the destination (a failed send): that direction stops; the opposite one goes
      on reading what the reset socket received before its reset (an early answer), as above.

    ``reset`` names sides already known to be reset (their error was read elsewhere).
    """
    if counters.mode is None:
        counters.mode = mode
    for stream in (client, upstream):
        stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
    streams = {"client": client, "upstream": upstream}
    with trio.CancelScope(deadline=trio.current_time() + idle_timeout) as idle:
        pair = _Pair(streams, counters, idle, idle_timeout)
        for side in reset:
            pair.mark_reset(side)
        sending = first_bytes and "upstream" not in pair.resets
        if sending and not await send_counted(upstream, first_bytes, counters, "upstream"):
            pair.mark_reset("upstream")

        async def direction(name: str) -> None:
            src, dst = streams[name], streams[other_side(name)]
            with pair.directions[name]:
                end = await pump(src, dst, Side(name, pair))
                if end is PumpEnd.DESTINATION_RESET:
                    pair.mark_reset(other_side(name))
                elif end is PumpEnd.SOURCE_RESET or name in pair.resets:
                    pair.mark_reset(name)
                else:
                    ending = how_it_ended(src.socket, fin_sent=name in pair.fin_sent)
                    if ending is not Ending.RESET:
                        # If the other side is gone already, its own direction reports how.
                        with contextlib.suppress(trio.BrokenResourceError, OSError):
                            await dst.send_eof()
                            pair.fin_sent.add(other_side(name))
                    if ending is not Ending.FIN:
                        pair.mark_reset(name)
            del pair.directions[name]

        async with trio.open_nursery() as nursery:
            for name in streams:
                if other_side(name) not in pair.resets:  # nothing can be written to it
                    pair.directions[name] = trio.CancelScope()
                    nursery.start_soon(direction, name)
        # Both directions are done: everything read from a reset side has been handed to the
        # other one. A side reset after its FIN was passed on is seen only now (nothing read
        # from it or wrote to it since): the kernel forwarder sees it as it comes, so look,
        # that the same traffic ends the same way in every mode. Then pass each reset on once
        # what came before it has been acknowledged.
        for side in streams:
            if side not in pair.resets and closed_by_reset(streams[side].socket, fin_sent=True):
                pair.mark_reset(side)
        for side in pair.resets:
            other = other_side(side)
            if other not in pair.resets:
                await reset_when_acknowledged(streams[other], pair.active)
    if idle.cancelled_caught:
        return "idle_timeout"
    return pair.reason
