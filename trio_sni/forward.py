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
"""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Awaitable, Callable
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


def reset_on_close(stream: trio.SocketStream) -> None:
    """Make the next close send an RST (SO_LINGER 0), to pass a reset on to the peer."""
    try:
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass  # already closed or reset: nothing left to signal


class CopyForwarder:
    """Userspace copy in two Trio tasks, one per direction.

    Half-close: when one side sends FIN, ``shutdown(SHUT_WR)`` goes to the other and the
    opposite direction keeps flowing until it ends too. A reset on either side resets the
    other and ends both directions. The idle timeout is one deadline on the whole pair,
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
    ) -> str:
        return await pump_both_ways(
            self.mode,
            client,
            upstream,
            first_bytes=first_bytes,
            counters=counters,
            idle_timeout=self._idle_timeout,
            pump=self._pump,
        )

    async def _pump(self, src: trio.SocketStream, dst: trio.SocketStream, side: Side) -> bool:
        while True:
            try:
                data = await src.receive_some(self._buffer_size)
            except trio.BrokenResourceError:
                side.reset(side.name)
                return False
            if not data:
                return True
            try:
                await dst.send_all(data)
            except trio.BrokenResourceError:
                side.reset(side.other)
                return False
            side.moved(len(data))


@attrs.define(eq=False)
class Side:
    """One direction of a connection, as its pump sees it (``name``: where bytes come from,
    ``client`` or ``upstream``): it reports bytes moved and resets to the shared frame."""

    name: str
    _pair: _Pair

    @property
    def other(self) -> str:
        return "upstream" if self.name == "client" else "client"

    def moved(self, n: int) -> None:
        """``n`` bytes were handed to the destination: count them, push the idle deadline."""
        if self.name == "client":
            self._pair.counters.to_upstream += n
        else:
            self._pair.counters.to_client += n
        self._pair.idle.deadline = trio.current_time() + self._pair.idle_timeout

    def reset(self, reset_side: str) -> None:
        """``reset_side`` reset the connection: reset the other side too, stop both ways."""
        pair = self._pair
        reset_on_close(pair.client if reset_side == "upstream" else pair.upstream)
        pair.reason = f"{reset_side}_reset"
        pair.stop.cancel()


@attrs.define(eq=False)
class _Pair:
    client: trio.SocketStream
    upstream: trio.SocketStream
    counters: ByteCounters
    idle: trio.CancelScope
    idle_timeout: float
    stop: trio.CancelScope
    reason: str = "normal"


#: A userspace forwarder's loop for one direction: move bytes from ``src`` to ``dst`` until
#: EOF (return True: the frame passes the FIN on) or a reset (report it, return False).
Pump = Callable[[trio.SocketStream, trio.SocketStream, Side], Awaitable[bool]]


async def pump_both_ways(
    mode: str,
    client: trio.SocketStream,
    upstream: trio.SocketStream,
    *,
    first_bytes: bytes,
    counters: ByteCounters,
    idle_timeout: float,
    pump: Pump,
) -> str:
    """The frame the userspace forwarders (copy, splice) share; returns the termination reason.

    Sends ``first_bytes``, runs ``pump`` in each direction in one nursery under one idle
    deadline (pushed by every chunk either way), passes a FIN on once a direction's pump has
    emptied it, and turns a reset on either side into a reset of the other.
    """
    if counters.mode is None:
        counters.mode = mode
    for stream in (client, upstream):
        stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
    with trio.CancelScope(deadline=trio.current_time() + idle_timeout) as idle:
        async with trio.open_nursery() as nursery:
            pair = _Pair(client, upstream, counters, idle, idle_timeout, nursery.cancel_scope)

            async def direction(src: trio.SocketStream, dst: trio.SocketStream, name: str) -> None:
                if await pump(src, dst, Side(name, pair)):
                    # If the other side is gone already, its own direction reports how.
                    with contextlib.suppress(trio.BrokenResourceError, OSError):
                        await dst.send_eof()

            if first_bytes:
                try:
                    await upstream.send_all(first_bytes)
                except trio.BrokenResourceError:
                    reset_on_close(client)
                    return "upstream_reset"
                counters.to_upstream += len(first_bytes)
            nursery.start_soon(direction, client, upstream, "client")
            nursery.start_soon(direction, upstream, client, "upstream")
    if idle.cancelled_caught:
        return "idle_timeout"
    return pair.reason
