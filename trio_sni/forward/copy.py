"""The ``copy`` forwarder: recv/send from Python, relayed without a task per connection;
available everywhere."""

from __future__ import annotations

import os
from collections.abc import Callable, Collection

import trio

from ._relay import Flow, Relay, Relayed
from .interface import ByteCounters, ForwarderStatistics, Mode, Side


class CopyMover:
    """Reads a chunk into one buffer shared by every connection and writes it on at once;
    only a chunk the destination cannot take yet is copied out of the buffer (``park``), so
    a busy relay allocates nothing per chunk."""

    def __init__(self, buffer_size: int) -> None:
        self._buffer = bytearray(buffer_size)
        self._view = memoryview(self._buffer)

    def fill(self, flow: Flow, counters: ByteCounters) -> int:
        n = os.readv(flow.src, (self._buffer,))
        flow.data = self._view[:n]
        flow.held = n
        return n

    def drain(self, flow: Flow) -> int:
        assert flow.data is not None
        n = os.write(flow.dst, flow.data)
        flow.held -= n
        flow.data = flow.data[n:] if flow.held else None
        return n

    def park(self, flow: Flow) -> None:
        if isinstance(flow.data, memoryview) and flow.data.obj is self._buffer:
            flow.data = bytes(flow.data)

    def drop(self, flow: Flow) -> None:
        flow.data = None
        flow.held = 0

    def emptied(self, n: int) -> bool:
        """A TCP read shorter than the buffer took everything queued (docs/kernel-facts.md,
        fact 51)."""
        return 0 < n < len(self._buffer)


class CopyForwarder:
    """Userspace copy: recv/send on readiness, one shared relay for every connection.

    Ends as :mod:`._relay` says. The idle timeout is one deadline on the whole pair, pushed
    forward by every chunk in either direction.
    """

    mode = Mode.COPY

    def __init__(self, *, buffer_size: int, idle_timeout: float) -> None:
        self.mover = CopyMover(buffer_size)
        self._relay = Relay(self.mode, self.mover, idle_timeout)

    async def forward(
        self,
        client: trio.SocketStream,
        upstream: trio.SocketStream,
        *,
        first_bytes: bytes,
        counters: ByteCounters,
        on_end: Callable[[str], None] | None = None,
        reset: Collection[Side] = (),
    ) -> str | Relayed:
        """As :meth:`Forwarder.forward` (handed off to the relay when given ``on_end``);
        ``reset`` names sides whose reset another forwarder has already read (the kernel
        forwarder hands a connection over after its hand-off found one)."""
        return await self._relay.forward(
            client,
            upstream,
            first_bytes=first_bytes,
            counters=counters,
            on_end=on_end,
            reset=reset,
        )

    def open(self) -> None:
        """Make the relay's epoll instance now (a forwarder that will serve: see
        :meth:`Relay.open`)."""
        self._relay.open()

    def close(self) -> None:
        """End every connection still relayed (reason ``shutdown``)."""
        self._relay.close()

    def statistics(self) -> ForwarderStatistics:
        return ForwarderStatistics(self.mode)
