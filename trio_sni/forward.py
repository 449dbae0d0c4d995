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

import logging
import socket
import struct
from typing import TYPE_CHECKING, Protocol

import attrs
import trio

if TYPE_CHECKING:
    pass

log = logging.getLogger("trio_sni")

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
        if counters.mode is None:
            counters.mode = self.mode
        for stream in (client, upstream):
            stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        reason = "normal"
        with trio.CancelScope(deadline=trio.current_time() + self._idle_timeout) as idle:

            async def pump(src: trio.SocketStream, dst: trio.SocketStream, side: str) -> None:
                nonlocal reason
                other = "upstream" if side == "client" else "client"
                while True:
                    try:
                        data = await src.receive_some(self._buffer_size)
                    except trio.BrokenResourceError:
                        reason = end_with_reset(side, client, upstream, nursery)
                        return
                    if not data:
                        break
                    try:
                        await dst.send_all(data)
                    except trio.BrokenResourceError:
                        reason = end_with_reset(other, client, upstream, nursery)
                        return
                    if side == "client":
                        counters.to_upstream += len(data)
                    else:
                        counters.to_client += len(data)
                    idle.deadline = trio.current_time() + self._idle_timeout
                try:
                    await dst.send_eof()
                except (trio.BrokenResourceError, OSError):
                    # The other side is gone already; its own direction reports how.
                    pass

            async with trio.open_nursery() as nursery:
                if first_bytes:
                    try:
                        await upstream.send_all(first_bytes)
                    except trio.BrokenResourceError:
                        reset_on_close(client)
                        return "upstream_reset"
                    counters.to_upstream += len(first_bytes)
                nursery.start_soon(pump, client, upstream, "client")
                nursery.start_soon(pump, upstream, client, "upstream")
        if idle.cancelled_caught:
            return "idle_timeout"
        return reason


def end_with_reset(
    reset_side: str,
    client: trio.SocketStream,
    upstream: trio.SocketStream,
    nursery: trio.Nursery,
) -> str:
    """One side reset: reset the other one too and stop both directions."""
    reset_on_close(client if reset_side == "upstream" else upstream)
    nursery.cancel_scope.cancel()
    return f"{reset_side}_reset"
