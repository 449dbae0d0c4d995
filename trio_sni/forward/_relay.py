"""The userspace forwarders' relay (``copy``, ``splice``): every connection a record driven by
one shared epoll instance, with no Trio task per connection.

A Trio task per direction costs a spawn, a nursery, cancel scopes and two epoll updates per
wait on every connection, and about 16 KiB of memory while the connection is idle (issue 14's
profile). Here a connection handed to a userspace forwarder is a :class:`Relayed` record: its
two sockets are in the forwarder's :class:`~._hangup_watch.HangupWatch` (one epoll instance,
edge-triggered readiness, one Trio system task for every connection), whose callbacks move
bytes with non-blocking syscalls until the kernel says to wait. What moves the bytes is the
forwarder's :class:`Mover` (recv/send through one buffer, or splice(2) through a pipe); how a
connection ends is the same for both, and the same as in kernel mode (README "How a connection
ends"):

- FIN: once the source is empty, ``shutdown(SHUT_WR)`` on the destination.
- Reset of the source: what it sent before the reset is delivered; then the direction into the
  reset socket stops and, once the other peer has acknowledged everything, the other socket is
  reset too (SO_LINGER 0 on close).
- Reset of the destination (a failed write): that direction stops; the opposite one goes on
  reading what the reset socket received before its reset (an early answer), as above.
- Idle: no byte either way (and no acknowledgement while a reset waits) for the idle timeout.
  A sweep looks at every connection every twentieth of it (at most every :data:`MAX_SWEEP`),
  and again at the earliest deadline it saw, so a connection ends when its deadline passes.

A direction moves at most :data:`TURNS` chunks per wake-up, then waits for the next pass of
the watch task, so a bulk transfer cannot starve the other connections or tasks.
"""

from __future__ import annotations

import enum
import logging
import math
import select
import socket
from collections.abc import Callable, Collection
from typing import Protocol

import attrs
import trio

from ._ends import (
    ACK_POLL,
    TCP_CLOSE,
    Ending,
    closed_by_reset,
    how_it_ended,
    reset_on_close,
    send_counted,
    tcp_state,
    unacknowledged,
)
from ._hangup_watch import HangupWatch
from .interface import ByteCounters, Mode, Side

log = logging.getLogger("trio_sni")

#: Chunks one direction moves per wake-up before the others get their turn.
TURNS = 16
#: Slowest idle sweep, seconds (never slower than a twentieth of the idle timeout).
MAX_SWEEP = 5.0

_NO_SIDES: frozenset[Side] = frozenset()
_READ = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET
_READ_WRITE = _READ | select.EPOLLOUT
_SOURCE_EVENTS = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLERR | select.EPOLLHUP
_ENDED_EVENTS = select.EPOLLRDHUP | select.EPOLLERR | select.EPOLLHUP
_DESTINATION_EVENTS = select.EPOLLOUT | select.EPOLLERR | select.EPOLLHUP


class FlowEnd(enum.Enum):
    """How one direction stopped."""

    #: The source sent FIN (or was reset and its error was read elsewhere: the end checks).
    EOF = enum.auto()
    #: Reading the source failed: it was reset. Everything read before was delivered.
    SOURCE_RESET = enum.auto()
    #: Writing to the destination failed: it was reset. What was read is dropped.
    DESTINATION_RESET = enum.auto()


@attrs.define(eq=False)
class Flow:
    """One direction of a relayed connection: bytes from ``source``'s socket to the other's.

    It is also the watch's callback for its source socket (no closure per socket: an idle
    connection is these two records and its :class:`Relayed`)."""

    conn: Relayed
    source: Side
    #: The source's stream (its socket is read).
    stream: trio.SocketStream
    src: int
    dst: int
    #: The flow into the source socket (the other direction), once both exist.
    into: Flow | None = None
    #: Bytes read from the source and not yet handed to the destination.
    held: int = 0
    #: ``copy``: the bytes held. ``splice``: None, or a chunk copied because no pipe was made.
    data: bytes | memoryview | None = None
    #: ``splice``: the pipe ``(read_fd, write_fd, capacity)`` lent while bytes are in it.
    pipe: tuple[int, int, int] | None = None
    #: How the source ended, once read; the direction ends when nothing is held any more.
    end: FlowEnd | None = None
    done: bool = False
    #: The destination is watched for EPOLLOUT too (a write had to wait once).
    waits_for_write: bool = False

    def __call__(self, events: int) -> None:
        """What the watch reported for the source socket: readable (or ended) moves this
        flow, writable moves the one into it."""
        if events & _SOURCE_EVENTS:
            self.conn.step(self, fresh=not events & _ENDED_EVENTS)
        if events & _DESTINATION_EVENTS and self.into is not None:
            self.conn.step(self.into)


class Mover(Protocol):
    """How a userspace forwarder moves a direction's bytes (see :mod:`.copy`, :mod:`.splice`).

    ``fill`` and ``drain`` raise :class:`BlockingIOError` when the socket has to be waited for
    and another :class:`OSError` when it failed (reset).
    """

    def fill(self, flow: Flow, counters: ByteCounters) -> int:
        """Read from ``flow.src`` into what the flow holds (it holds nothing); 0 at EOF."""
        ...

    def drain(self, flow: Flow) -> int:
        """Hand some of what the flow holds to ``flow.dst``; the bytes taken."""
        ...

    def park(self, flow: Flow) -> None:
        """The flow waits with bytes held: keep them past this call (a shared buffer is copied)."""
        ...

    def drop(self, flow: Flow) -> None:
        """The flow is over: release what it holds (a pipe with bytes in it is closed)."""
        ...

    def emptied(self, n: int) -> bool:
        """Whether a ``fill`` that read ``n`` bytes left the source's receive queue empty
        (``False`` when it cannot tell)."""
        ...


class Relay:
    """A userspace forwarder's connections, their shared watch, timers and idle sweep."""

    def __init__(self, mode: Mode, mover: Mover, idle_timeout: float) -> None:
        self.mode = mode
        self.mover = mover
        self.idle_timeout = idle_timeout
        self.watch = HangupWatch(self._periodic, spurious_backoff=0, keep_epoll=True)
        self.connections: set[Relayed] = set()
        self._due: dict[Relayed, float] = {}
        self._ready: list[tuple[Relayed, Flow]] = []
        self._next_sweep = 0.0

    async def forward(
        self,
        client: trio.SocketStream,
        upstream: trio.SocketStream,
        *,
        first_bytes: bytes,
        counters: ByteCounters,
        on_end: Callable[[str], None] | None,
        reset: Collection[Side],
    ) -> str | Relayed:
        """As :meth:`Forwarder.forward`: sends ``first_bytes``, then relays the connection
        without a task (returning its record) when given ``on_end``; else waits for its end.
        ``reset`` names sides already known to be reset (their error was read elsewhere)."""
        if counters.mode is None:
            counters.mode = self.mode
        conn = Relayed(self, client, upstream, counters)
        for side in reset:
            conn.mark_reset(side)
        sending = first_bytes and Side.UPSTREAM not in conn.resets
        if sending and not await send_counted(upstream, first_bytes, counters, Side.UPSTREAM):
            conn.mark_reset(Side.UPSTREAM)
        if on_end is not None:
            conn.start(on_end)
            return conn
        ended = trio.Event()
        conn.start(lambda _reason: ended.set())
        try:
            await ended.wait()
        finally:
            conn.end("shutdown")  # cancelled: release what it holds (the caller's reason)
        assert conn.reason is not None
        return conn.reason

    def open(self) -> None:
        """Make the epoll instance now: a proxy at its fd limit by its first connection could
        not make it then (``tests/e2e/test_fd_limit.py``)."""
        self.watch.open()

    def close(self) -> None:
        """End every connection still relayed (reason ``shutdown``); close the epoll instance."""
        for conn in list(self.connections):
            conn.end("shutdown")
        self.watch.close()

    def join(self, conn: Relayed) -> None:
        if not self.connections:
            self._next_sweep = trio.current_time() + self._sweep_interval()
        self.connections.add(conn)

    def leave(self, conn: Relayed) -> None:
        self.connections.discard(conn)
        self._due.pop(conn, None)

    def schedule(self, conn: Relayed, delay: float) -> None:
        """Call ``conn.due()`` in ``delay`` seconds (or sooner if already asked)."""
        when = trio.current_time() + delay
        if when < self._due.get(conn, math.inf):
            self._due[conn] = when
            self.watch.poke()

    def later(self, conn: Relayed, flow: Flow) -> None:
        """``flow`` used its turns: go on after everyone else had theirs."""
        self._ready.append((conn, flow))
        self.watch.poke()

    def _sweep_interval(self) -> float:
        return min(MAX_SWEEP, self.idle_timeout / 20)

    def _periodic(self) -> float:
        """Directions that used their turns, due timers, then the idle sweep when it is due;
        returns when to run again."""
        now = trio.current_time()
        ready, self._ready = self._ready, []
        for conn, flow in ready:
            conn.step(flow)
        while due := [c for c, when in self._due.items() if when <= now]:
            for conn in due:
                del self._due[conn]
                conn.due()  # may schedule itself again
        if self.connections and now >= self._next_sweep:
            self._next_sweep = now + self._sweep_interval()
            for conn in list(self.connections):
                deadline = conn.last_active + self.idle_timeout
                if now >= deadline:
                    conn.end("idle_timeout")
                else:
                    self._next_sweep = min(self._next_sweep, deadline)
        if self._ready:
            return 0.0
        return min(self._next_sweep, min(self._due.values(), default=math.inf)) - now


class Relayed:
    """One connection relayed without a task (the :class:`~.interface.HandedOff` of ``copy``
    and ``splice``): two :class:`Flow` records and how the connection's end is going."""

    __slots__ = (
        "_ack_delay",
        "_on_end",
        "_queued",
        "counters",
        "fin_sent",
        "flows",
        "last_active",
        "reason",
        "relay",
        "resets",
        "resetting",
    )

    def __init__(
        self,
        relay: Relay,
        client: trio.SocketStream,
        upstream: trio.SocketStream,
        counters: ByteCounters,
    ) -> None:
        self.relay = relay
        self.counters = counters
        cfd, ufd = client.socket.fileno(), upstream.socket.fileno()
        #: The client's direction, then the upstream's (:meth:`flow` by side).
        self.flows = (
            Flow(self, Side.CLIENT, client, cfd, ufd),
            Flow(self, Side.UPSTREAM, upstream, ufd, cfd),
        )
        self.flows[0].into, self.flows[1].into = self.flows[1], self.flows[0]
        #: Sides whose socket was reset, in the order the resets were seen (tuples and the
        #: shared empty set: a quiet connection carries no collection of its own).
        self.resets: tuple[Side, ...] = ()
        #: Sides the proxy has sent a FIN to.
        self.fin_sent: frozenset[Side] = _NO_SIDES
        #: Once both directions are done: the side whose reset waits for acknowledgements.
        self.resetting: Side | None = None
        self._ack_delay = ACK_POLL[0]
        self._queued = -1
        #: When a byte last moved (or a reset's acknowledgements last progressed).
        self.last_active = 0.0
        self.reason: str | None = None
        self._on_end: Callable[[str], None] | None = None

    def start(self, on_end: Callable[[str], None]) -> None:
        """Watch both sockets; bytes move from the first wake-up on (never in this call, so
        ``on_end`` is called after the caller has the record)."""
        self._on_end = on_end
        self.last_active = trio.current_time()
        self.relay.join(self)
        watch = self.relay.watch
        for flow in self.flows:
            watch.add(flow.src, flow, _READ)
        if all(flow.done for flow in self.flows):
            self.relay.schedule(self, 0)

    def flow(self, side: Side) -> Flow:
        """The direction reading from ``side``."""
        return self.flows[0] if side is Side.CLIENT else self.flows[1]

    def end(self, reason: str) -> None:
        """End it now (shutdown, idle timeout): release everything, then ``on_end(reason)``."""
        if self.reason is not None:
            return
        self.reason = reason
        watch = self.relay.watch
        for flow in self.flows:
            watch.forget(flow.src)
        for flow in self.flows:
            self.relay.mover.drop(flow)
        self.relay.leave(self)
        assert self._on_end is not None
        self._on_end(reason)

    def step(self, flow: Flow, *, fresh: bool = False) -> None:
        """Move ``flow``'s bytes until a socket says to wait, the source has ended, or its
        turns are used up.

        ``fresh``: called for an edge that reported the source readable and not ended. Then a
        read that emptied the receive queue ends the turn once its bytes are written: anything
        that arrives later makes a new edge (docs/kernel-facts.md, fact 51), so the read that
        would only say ``EAGAIN`` is saved. Any other call reads until the kernel says to wait.
        """
        if flow.done or self.reason is not None:
            return
        mover = self.relay.mover
        turns = TURNS
        moved = False
        emptied = False
        try:
            while True:
                if flow.held:
                    try:
                        n = mover.drain(flow)
                    except BlockingIOError:
                        self._wait_for_write(flow)
                        return
                    except OSError:
                        self._finish(flow, FlowEnd.DESTINATION_RESET)
                        return
                    if flow.source is Side.CLIENT:
                        self.counters.to_upstream += n
                    else:
                        self.counters.to_client += n
                    moved = True
                    continue
                if flow.end is not None:
                    self._finish(flow, flow.end)
                    return
                if emptied:
                    return
                if not turns:
                    self.relay.later(self, flow)
                    return
                turns -= 1
                try:
                    n = mover.fill(flow, self.counters)
                    if not n:
                        flow.end = FlowEnd.EOF
                    emptied = fresh and mover.emptied(n)
                except BlockingIOError:
                    return
                except OSError:
                    flow.end = FlowEnd.SOURCE_RESET
        except Exception:  # a bug: log it, end this connection, keep serving the others
            log.exception("userspace relay: moving bytes failed")
            self.end("internal_error")
        finally:
            if flow.held and not flow.done:
                mover.park(flow)
            if moved:
                self.last_active = trio.current_time()

    def _wait_for_write(self, flow: Flow) -> None:
        if not flow.waits_for_write:
            flow.waits_for_write = True
            self.relay.watch.modify(flow.dst, _READ_WRITE)

    def _finish(self, flow: Flow, end: FlowEnd) -> None:
        """``flow`` is over: pass its source's end on (FIN, or reset), as its end says."""
        flow.done = True
        self.relay.mover.drop(flow)
        name = flow.source
        if end is FlowEnd.DESTINATION_RESET:
            self.mark_reset(name.other)
        elif end is FlowEnd.SOURCE_RESET or name in self.resets:
            self.mark_reset(name)
        else:
            ending = how_it_ended(flow.stream.socket, fin_sent=name in self.fin_sent)
            if ending is not Ending.RESET:
                try:  # if the other side is gone already, its own direction reports how
                    self.flow(name.other).stream.socket.shutdown(socket.SHUT_WR)
                    self.fin_sent = self.fin_sent | {name.other}
                except OSError:
                    pass
            if ending is not Ending.FIN:
                self.mark_reset(name)
        if all(f.done for f in self.flows):
            self._both_done()

    def mark_reset(self, side: Side) -> None:
        """``side``'s socket was reset: nothing more can be written to it, so the direction
        into it stops; the direction out of it goes on until it has read what came first."""
        if side in self.resets:
            return
        self.resets = (*self.resets, side)
        into = self.flow(side.other)
        if not into.done:
            into.done = True
            self.relay.mover.drop(into)

    def _both_done(self) -> None:
        """Everything read from a reset side has been handed to the other one. A side reset
        after its FIN was passed on is seen only now (nothing read from it or wrote to it
        since): the kernel forwarder sees it as it comes, so look, that the same traffic ends
        the same way in every mode. Then pass each reset on once what came before it has been
        acknowledged."""
        for flow in self.flows:
            if flow.source not in self.resets and closed_by_reset(
                flow.stream.socket, fin_sent=True
            ):
                self.mark_reset(flow.source)
        for side in self.resets:
            if side.other not in self.resets:
                self.resetting = side.other
                self._check_acknowledged()
                return
        self.end(self.resets_reason)

    @property
    def resets_reason(self) -> str:
        return f"{self.resets[0]}_reset" if self.resets else "normal"

    def due(self) -> None:
        """A timer this connection asked for: all directions done (from the start), or a
        look at the acknowledgements its reset waits for."""
        if self.reason is not None:
            return
        if self.resetting is not None:
            self._check_acknowledged()
        elif all(f.done for f in self.flows):
            self._both_done()

    def _check_acknowledged(self) -> None:
        """Reset ``resetting``'s socket once its peer has acknowledged everything (closing
        with SO_LINGER 0 discards the send queue: an answer sent just before the other side's
        reset would be lost); else look again, from 1 ms doubling to 50 ms while nothing
        moves. A shrinking queue counts as activity for the idle timeout."""
        assert self.resetting is not None
        stream = self.flow(self.resetting).stream
        try:
            left = unacknowledged(stream.socket)
        except OSError:
            left = 0
        if left == 0 or tcp_state(stream.socket) == TCP_CLOSE:
            reset_on_close(stream)
            self.end(self.resets_reason)
            return
        if self._queued != -1 and left < self._queued:
            self.last_active = trio.current_time()
            self._ack_delay = ACK_POLL[0]
        self._queued = left
        self.relay.schedule(self, self._ack_delay)
        self._ack_delay = min(ACK_POLL[1], self._ack_delay * 2)
