"""The frame the userspace forwarders (``copy``, ``splice``) share: two pumps, one per
direction, under one idle deadline, ending each direction as its source ended."""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Awaitable, Callable, Collection

import attrs
import trio

from ._ends import Ending, closed_by_reset, how_it_ended, reset_when_acknowledged, send_counted
from .interface import ByteCounters, Mode, Side


class PumpEnd(enum.Enum):
    """How one direction's pump stopped."""

    #: The source sent FIN (or was reset and its error was read elsewhere: the frame checks).
    EOF = enum.auto()
    #: Reading the source failed: it was reset. Everything read before was delivered.
    SOURCE_RESET = enum.auto()
    #: Writing to the destination failed: it was reset. What was read is dropped.
    DESTINATION_RESET = enum.auto()


@attrs.define(eq=False)
class Direction:
    """One direction of a connection as its pump sees it (``source``: whose bytes these are);
    it reports bytes moved to the shared frame."""

    source: Side
    pair: _Pair

    @property
    def destination(self) -> Side:
        return self.source.other

    def moved(self, n: int) -> None:
        """``n`` bytes were handed to the destination: count them, push the idle deadline."""
        if self.source is Side.CLIENT:
            self.pair.counters.to_upstream += n
        else:
            self.pair.counters.to_client += n
        self.pair.active()


@attrs.define(eq=False)
class _Pair:
    """The state the two directions of one connection share."""

    streams: dict[Side, trio.SocketStream]
    counters: ByteCounters
    idle: trio.CancelScope
    idle_timeout: float
    #: Sides whose socket was reset, in the order the resets were seen.
    resets: list[Side] = attrs.Factory(list)
    #: Sides the proxy has sent a FIN to.
    fin_sent: set[Side] = attrs.Factory(set)
    #: Each running direction's cancel scope, by the side it reads from.
    directions: dict[Side, trio.CancelScope] = attrs.Factory(dict)

    def active(self) -> None:
        self.idle.deadline = trio.current_time() + self.idle_timeout

    def mark_reset(self, side: Side) -> None:
        """``side``'s socket was reset: nothing more can be written to it, so the direction
        into it stops; the direction out of it goes on until it has read what came first."""
        if side in self.resets:
            return
        self.resets.append(side)
        into = self.directions.get(side.other)
        if into is not None:
            into.cancel()

    @property
    def reason(self) -> str:
        return f"{self.resets[0]}_reset" if self.resets else "normal"


#: A userspace forwarder's loop for one direction: move bytes from ``src`` to ``dst`` until
#: the source ends or either socket fails (see :class:`PumpEnd`).
Pump = Callable[[trio.SocketStream, trio.SocketStream, Direction], Awaitable[PumpEnd]]


async def pump_both_ways(
    mode: Mode,
    client: trio.SocketStream,
    upstream: trio.SocketStream,
    *,
    first_bytes: bytes,
    counters: ByteCounters,
    idle_timeout: float,
    pump: Pump,
    reset: Collection[Side] = (),
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
    streams = {Side.CLIENT: client, Side.UPSTREAM: upstream}
    with trio.CancelScope(deadline=trio.current_time() + idle_timeout) as idle:
        pair = _Pair(streams, counters, idle, idle_timeout)
        for side in reset:
            pair.mark_reset(side)
        sending = first_bytes and Side.UPSTREAM not in pair.resets
        if sending and not await send_counted(upstream, first_bytes, counters, Side.UPSTREAM):
            pair.mark_reset(Side.UPSTREAM)

        async def direction(name: Side) -> None:
            src, dst = streams[name], streams[name.other]
            with pair.directions[name]:
                end = await pump(src, dst, Direction(name, pair))
                if end is PumpEnd.DESTINATION_RESET:
                    pair.mark_reset(name.other)
                elif end is PumpEnd.SOURCE_RESET or name in pair.resets:
                    pair.mark_reset(name)
                else:
                    ending = how_it_ended(src.socket, fin_sent=name in pair.fin_sent)
                    if ending is not Ending.RESET:
                        # If the other side is gone already, its own direction reports how.
                        with contextlib.suppress(trio.BrokenResourceError, OSError):
                            await dst.send_eof()
                            pair.fin_sent.add(name.other)
                    if ending is not Ending.FIN:
                        pair.mark_reset(name)
            del pair.directions[name]

        async with trio.open_nursery() as nursery:
            for name in streams:
                if name.other not in pair.resets:  # nothing can be written to it
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
            if side.other not in pair.resets:
                await reset_when_acknowledged(streams[side.other], pair.active)
    if idle.cancelled_caught:
        return "idle_timeout"
    return pair.reason
