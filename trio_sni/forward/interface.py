"""What every forwarder implements, and the vocabulary they share.

A forwarder takes two connected sockets and the bytes already read from the client, moves
bytes both ways until both directions are done, passes half-closes and resets on (README, "How
a connection ends"), counts bytes, and returns why the connection ended: ``normal``,
``idle_timeout``, ``client_reset`` or ``upstream_reset`` (the access log's ``reason``).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from typing import Protocol

import attrs
import trio


class Mode(enum.StrEnum):
    """How a connection's bytes are moved (``forwarding.mode``, the access log's ``mode``)."""

    #: The BPF sockhash redirects them inside the kernel.
    KERNEL = "kernel"
    #: splice(2) through a pipe per direction.
    SPLICE = "splice"
    #: recv/send in userspace.
    COPY = "copy"


class Side(enum.StrEnum):
    """One end of a proxied connection."""

    CLIENT = "client"
    UPSTREAM = "upstream"

    @property
    def other(self) -> Side:
        return Side.UPSTREAM if self is Side.CLIENT else Side.CLIENT


@attrs.define(eq=False)
class ByteCounters:
    """Bytes moved so far; read live by the status endpoint, written by the forwarder."""

    to_upstream: int = 0
    to_client: int = 0
    #: The mode that actually forwarded this connection (``kernel`` can fall back to
    #: ``copy`` per connection); ``None`` until a forwarder starts.
    mode: Mode | None = None


@attrs.frozen
class ForwarderStatistics:
    """A snapshot of what one forwarder has done (as trio's ``statistics()`` records)."""

    mode: Mode
    #: Connections this forwarder handed to ``copy`` instead (pipes or the sockhash refused).
    fallbacks: int = 0
    #: ``splice``: pipes that got less than ``forwarding.pipe_size`` (the kernel's size kept).
    small_pipes: int = 0
    #: ``splice``: pipes kept for the next burst (no connection holds a pipe while idle).
    idle_pipes: int = 0
    #: ``kernel``: sockets in the sockhash now (two per registered connection).
    sockhash_sockets: int = 0
    #: ``kernel``: directions the in-flight bound moved to userspace.
    userspace_directions: int = 0
    #: ``kernel``: QUIC flows the kernel relays now (``None``: no QUIC data plane loaded).
    quic_flows: int | None = None
    #: ``kernel``: the data plane's counters (bytes and skbs redirected, stops, ...).
    data_plane: Mapping[str, int] = attrs.field(factory=dict)


class HandedOff(Protocol):
    """A connection whose end a forwarder watches without the caller's task (see
    :meth:`Forwarder.forward`'s ``on_end``)."""

    def end(self, reason: str) -> None:
        """End it now (shutdown): the forwarder's cleanup, then ``on_end(reason)``."""
        ...


class Forwarder(Protocol):
    """What every forwarding mode implements."""

    mode: Mode

    async def forward(
        self,
        client: trio.SocketStream,
        upstream: trio.SocketStream,
        *,
        first_bytes: bytes,
        counters: ByteCounters,
        on_end: Callable[[str], None] | None = None,
    ) -> str | HandedOff:
        """Move bytes until both directions are finished; return the termination reason.

        Args:
            client: the accepted client connection.
            upstream: the connection to the target.
            first_bytes: what the proxy already read from the client (the ClientHello and
                anything after it); it is sent to the target before anything else.
            counters: updated as bytes move, so observers see live numbers.
            on_end: given, a forwarder that can watch the connection's end without a task
                (``kernel``, once the sockets are in the sockhash) returns a
                :class:`HandedOff` at once instead of the reason, and calls ``on_end(reason)``
                exactly once when the connection has ended, outside the caller's task. The
                others ignore it.

        The caller closes both streams once it has the reason (from the return value or from
        ``on_end``), whatever happens here.
        """
        ...

    def close(self) -> None:
        """Release what the forwarder holds (the kernel forwarder: its BPF objects)."""
        ...

    def statistics(self) -> ForwarderStatistics:
        """What the forwarder has done so far, for the status page and metrics."""
        ...
