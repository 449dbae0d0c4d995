"""The ``copy`` forwarder: recv/send in two Trio tasks; available everywhere."""

from __future__ import annotations

from collections.abc import Callable, Collection

import trio

from ._ends import send_counted
from ._userspace import Direction, PumpEnd, pump_both_ways
from .interface import ByteCounters, ForwarderStatistics, Mode, Side


class CopyForwarder:
    """Userspace copy in two Trio tasks, one per direction.

    Ends as :func:`pump_both_ways` says. The idle timeout is one deadline on the whole pair,
    pushed forward by every chunk in either direction.
    """

    mode = Mode.COPY

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
        on_end: Callable[[str], None] | None = None,
        reset: Collection[Side] = (),
    ) -> str:
        """As :meth:`Forwarder.forward` (never handed off); ``reset`` names sides whose reset
        another forwarder has already read (the kernel forwarder hands a connection over after
        its hand-off found one)."""
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

    def close(self) -> None:
        """Nothing to release."""

    def statistics(self) -> ForwarderStatistics:
        return ForwarderStatistics(self.mode)

    async def _pump(
        self, src: trio.SocketStream, dst: trio.SocketStream, direction: Direction
    ) -> PumpEnd:
        while True:
            end = await copy_chunk(src, dst, direction, self._buffer_size)
            if end is not None:
                return end


async def copy_chunk(
    src: trio.SocketStream, dst: trio.SocketStream, direction: Direction, size: int
) -> PumpEnd | None:
    """Move one chunk of at most ``size`` bytes with recv/send; how the direction ended, or
    None if it goes on. The copy pump's step, and splice's when no pipe can be made."""
    try:
        data = await src.receive_some(size)
    except trio.BrokenResourceError:
        return PumpEnd.SOURCE_RESET
    if not data:
        return PumpEnd.EOF
    if not await send_counted(dst, data, direction.pair.counters, direction.destination):
        return PumpEnd.DESTINATION_RESET
    direction.pair.active()
    return None
