"""One spliced connection's end, as the kernel forwarder's shared watch reports it.

A :class:`Watcher` per connection is a record, not a task: the shared epoll instance, the stop
ring and the sweep call it when something happened to one of its sockets, and it moves each
direction through :class:`State` (see :mod:`trio_sni.forward.kernel` for the whole story, and
README "How a connection ends"). Its timed checks (draining, waiting for acknowledgements) run
in the owner's periodic job; only a direction moved to userspace gets a task, its pump. When
both directions are done it cleans up (watches, map entries) and calls its ``on_end`` with the
reason. What every watcher of one forwarder shares is behind the small :class:`Owner`
protocol, so a watcher does not reach into the forwarder.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import math
import select
import socket
from collections.abc import Callable
from typing import Protocol

import attrs
import trio

from .._fd import borrowed
from ..accel import SockhashPair
from ._ends import (
    ACK_POLL,
    TCP_CLOSE,
    Ending,
    closed_by_reset,
    how_it_ended,
    pending_error,
    reset_on_close,
    tcp_state,
    unacknowledged,
)
from ._handoff import received, written
from ._hangup_watch import HangupWatch
from .interface import ByteCounters, Side

log = logging.getLogger("trio_sni")

#: How often a draining direction checks whether the peer has sent everything (seconds):
#: at least this often, at most MAX_DRAIN_POLL, adapted to the rate the queue drains at.
DRAIN_POLL = 0.002
MAX_DRAIN_POLL = 0.05
#: How long a userspace direction that read its source's end waits for bytes the psock may
#: still hold back (its retry runs after one jiffy, docs/kernel-facts.md, fact 43), in DRAIN_POLLs:
#: first when the count may be off by the FIN only, then at most.
_HELD_BACK_POLLS = (10, 250)


_NO_SIDES: frozenset[Side] = frozenset()


class Owner(Protocol):
    """What a :class:`Watcher` needs from the forwarder whose connection it watches."""

    watch: HangupWatch
    #: The kernel-forwarded directions by their source socket's cookie (for the stop ring and
    #: the sweep).
    live: dict[int, Direction]
    buffer_size: int
    userspace_directions: int

    def join(self, watcher: Watcher) -> None: ...

    def leave(self, watcher: Watcher) -> None: ...

    def schedule(self, watcher: Watcher, delay: float) -> None:
        """Call ``watcher.step()`` from the periodic job in ``delay`` seconds (or sooner)."""
        ...


class State(enum.Enum):
    """Where one direction is (``KERNEL`` → ``DRAINING`` → ``DONE``, or through ``USER``)."""

    #: The verdict program redirects its bytes.
    KERNEL = enum.auto()
    #: A userspace pump copies them (the in-flight bound stopped it, or it was never inserted).
    USER = enum.auto()
    #: Its source ended (FIN or reset): waiting until the destination has been handed
    #: everything the kernel redirected.
    DRAINING = enum.auto()
    #: Its source was reset and everything before the reset is in the destination's send
    #: queue: waiting until the destination's peer has acknowledged it all, to reset it too.
    ACKING = enum.auto()
    DONE = enum.auto()


@attrs.define(eq=False)
class Direction:
    """Bytes received on ``src`` going out of ``dst``."""

    src_side: Side  # whose bytes these are
    src: trio.SocketStream
    dst: trio.SocketStream
    src_fd: int
    dst_fd: int
    consumed0: int  # src bytes read by the proxy before registration (+ SYN)
    written0: int  # dst's written() at registration
    #: dst's written() minus the bytes counted for this direction before forwarding began.
    base: int
    #: The bytes counted for this direction before registration (the live counts' start).
    counted0: int
    state: State = State.KERNEL
    fin_received: bool = False
    drain_seen: int = 0  # sent_since() at the last drain check
    redirected: int = 0  # by the kernel, as of the last look
    copied: int = 0  # by the userspace pump
    pump: trio.CancelScope | None = None  # the userspace pump, in state USER
    #: The connection's watcher (set by it).
    watcher: Watcher = attrs.field(init=False)
    unacked: int = -1  # dst's unacknowledged bytes at the last look, in state ACKING
    ack_poll: float = ACK_POLL[0]

    @property
    def dst_side(self) -> Side:
        return self.src_side.other

    def __call__(self, events: int) -> None:
        """What the shared epoll instance reported for the source socket (the direction is
        its own callback: no bound method or partial per socket)."""
        self.watcher.on_event(self, events)

    def sent_since(self) -> int:
        return written(self.dst.socket) - self.written0

    def received_since(self) -> int:
        """Bytes (and the FIN, if one came) received on ``src`` since registration."""
        return received(self.src.socket) - self.consumed0


class Watcher:
    """One connection of a kernel forwarder (see :mod:`trio_sni.forward.kernel`): called by the
    shared watch when something happens, it does the end-of-connection work.

    Args:
        pair: the connection's map entries, released when it ends.
        on_end: called once, with the reason, when the connection has ended and everything
            the watcher holds is released (the caller's cleanup: closing the sockets, ...).
    """

    # One per handed-off connection: no instance dict.
    __slots__ = (
        "_on_end",
        "counters",
        "counts_final",
        "dirs",
        "fin_sent",
        "finished",
        "last_activity",
        "owner",
        "pair",
        "reason",
        "resets",
    )

    def __init__(
        self,
        owner: Owner,
        pair: SockhashPair,
        dirs: tuple[Direction, Direction],
        counters: ByteCounters,
        on_end: Callable[[str], None],
    ) -> None:
        self.owner = owner
        self.pair = pair
        self.dirs = dirs
        for d in dirs:
            d.watcher = self
        self.counters = counters
        #: Sides the proxy has sent a FIN to (immutable: the empty one is shared, so a quiet
        #: connection carries no set of its own).
        self.fin_sent = _NO_SIDES
        #: Sides whose socket was reset, in the order the resets were seen.
        self.resets: tuple[Side, ...] = ()
        self.reason: str | None = None
        #: Set once the connection has ended: late ring records, events and steps are ignored.
        self.finished = False
        #: The counts are exact already (a destination died): the sweep leaves them alone.
        self.counts_final = False
        self.last_activity = trio.current_time()
        self._on_end = on_end
        for side in pair.stopped_at_insert:
            self._from(Side(side)).state = State.USER

    def _from(self, side: Side) -> Direction:
        """The direction carrying ``side``'s bytes."""
        return self.dirs[0] if side is Side.CLIENT else self.dirs[1]

    def update_counters(self) -> None:
        """The exact byte counts: what each destination was given to send."""
        for d in self.dirs:
            try:
                sent = written(d.dst.socket) - d.base
            except OSError:
                continue
            sent -= 1 if d.dst_side in self.fin_sent else 0
            self._set_count(d, sent)

    def live_counters(self) -> None:
        """Cheap counts for the status page (no syscall): redirected as of the last sweep."""
        if self.counts_final:
            return
        for d in self.dirs:
            self._set_count(d, d.counted0 + d.redirected + d.copied)

    def _set_count(self, d: Direction, value: int) -> None:
        if d.src_side is Side.CLIENT:
            self.counters.to_upstream = value
        else:
            self.counters.to_client = value

    def start(self) -> None:
        """Start watching (no await: the caller's task may end right after). If this raises,
        everything is released and ``on_end`` is not called."""
        try:
            self._start()
        except BaseException:
            self._release()
            raise

    def _start(self) -> None:
        owner = self.owner
        owner.join(self)
        for d in self.dirs:
            owner.watch.add(d.src_fd, d)
            if d.state is State.KERNEL:
                owner.live[self.pair.cookie(d.src_side)] = d
        for d in self.dirs:
            if d.state is State.USER:
                self._start_pump(d)
        for side in self.pair.reset_at_kick:
            self._mark_reset(Side(side))

    def _wake(self) -> None:
        """Look again now (a direction changed state)."""
        self.owner.schedule(self, 0.0)

    def end(self, reason: str) -> None:
        """End the connection now (idle timeout, shutdown) or with the reason already found."""
        if self.finished:
            return
        if self.reason is None:
            self.reason = reason
        try:
            self.update_counters()
        finally:
            self._release()
            self._on_end(self.reason)

    def _release(self) -> None:
        """Stop the pumps, the watches, the owner's bookkeeping, then remove the map entries
        (the sockets are the caller's to close, at once: that takes them out of the
        sockhashes)."""
        self.finished = True
        owner = self.owner
        for d in self.dirs:
            if d.pump is not None:
                d.pump.cancel()
            owner.watch.forget(d.src_fd)
            owner.live.pop(self.pair.cookie(d.src_side), None)
        owner.leave(self)
        self.pair.release(closing=True)

    def step(self) -> None:
        """The timed checks of draining and acknowledging directions; ends the connection when
        both directions are done, else asks the owner to call again when one is due."""
        if self.finished:
            return
        delay = math.inf
        for d in self.dirs:
            if d.state is State.DRAINING:
                delay = min(delay, self._check_drained(d))
            if d.state is State.ACKING:
                delay = min(delay, self._check_acknowledged(d))
        if all(d.state is State.DONE for d in self.dirs):
            self.end(f"{self.resets[0]}_reset" if self.resets else "normal")
        elif delay < math.inf:
            self.owner.schedule(self, delay)

    def on_event(self, d: Direction, events: int) -> None:
        """What the shared epoll instance reported for ``d``'s source socket."""
        side = d.src_side
        if self.finished or side in self.resets:
            return
        if events & select.EPOLLERR and pending_error(d.src.socket):
            self._mark_reset(side)
            return
        if not events & (select.EPOLLRDHUP | select.EPOLLHUP):
            return
        if closed_by_reset(d.src.socket, fin_sent=side in self.fin_sent):
            self._mark_reset(side)
            return
        if tcp_state(d.src.socket) == TCP_CLOSE:
            self.owner.watch.forget(d.src_fd)  # closed both ways, cleanly: nothing more to see
        else:
            self.owner.watch.errors_only(d.src_fd)  # a reset may still follow the FIN
        if d.fin_received:
            return
        d.fin_received = True
        self.last_activity = trio.current_time()
        if d.state is State.KERNEL:
            with borrowed(d.src.socket) as sock:
                try:
                    sock.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK)  # process the queue
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError:
                    self._mark_reset(side)  # read (and consumed) here: pass it on
                    return
            d.state = State.DRAINING
            self._wake()
        # USER: its pump reads the EOF itself.

    def _mark_reset(self, side: Side) -> None:
        """``side``'s socket was reset: nothing more can be written to it, so the direction
        into it ends now; the direction out of it delivers what came first, then resets the
        other side."""
        if side in self.resets or self.finished:
            return
        self.resets = (*self.resets, side)
        self.owner.watch.forget(self._from(side).src_fd)  # nothing more to learn from it
        into = self._from(side.other)
        self._set_done(into)
        out = self._from(side)
        if out.state is State.KERNEL:
            out.state = State.DRAINING
        elif out.state is State.DONE and out.dst_side not in self.resets:
            out.state = State.ACKING  # its FIN went on already; the reset follows it
        # DRAINING goes on to ACKING; USER: the pump reads the end itself.
        self.update_counters()
        self.counts_final = True
        self.last_activity = trio.current_time()
        self._wake()

    def _set_done(self, d: Direction) -> None:
        if d.pump is not None:
            d.pump.cancel()
        d.state = State.DONE
        self.owner.live.pop(self.pair.cookie(d.src_side), None)

    def on_stop(self, d: Direction) -> None:
        """The program stopped ``d``'s source socket: copy that direction from now on."""
        if self.finished or self.reason is not None:
            return
        if d.state not in (State.KERNEL, State.DRAINING):
            return
        d.state = State.USER
        self.owner.userspace_directions += 1
        self.owner.live.pop(self.pair.cookie(d.src_side), None)
        self._start_pump(d)

    def _start_pump(self, d: Direction) -> None:
        """A task for ``d`` (a system task: the connection's own task may be gone)."""
        d.pump = trio.CancelScope()
        trio.lowlevel.spawn_system_task(
            self._userspace, d, name=f"trio_sni kernel-mode {d.src_side} pump"
        )

    def _source_done(self, d: Direction) -> None:
        """Everything ``d``'s source sent is in the destination's send queue: pass its end on
        (a FIN now; a reset once the destination's peer has acknowledged it all)."""
        d.pump = None
        reset = d.src_side in self.resets
        if not reset or self._fin_came_first(d):
            with contextlib.suppress(OSError):
                d.dst.socket.shutdown(socket.SHUT_WR)
                self.fin_sent |= {d.dst_side}
        if reset and d.dst_side not in self.resets:
            d.state = State.ACKING
        else:
            d.state = State.DONE
        self._wake()

    def _fin_came_first(self, d: Direction) -> bool:
        """Whether the reset ``d``'s source ended with came after a FIN.

        The FIN may have been seen already; if the reset came close behind it, only the count
        tells: ``tcpi_bytes_received`` counts a FIN (docs/kernel-facts.md, fact 42), so it is
        one more than the bytes redirected and copied."""
        if d.fin_received:
            return True
        try:
            return d.received_since() - d.redirected - d.copied >= 1
        except OSError:
            return False

    def _dst_gone(self, d: Direction) -> bool:
        """Whether ``d``'s destination was reset (also if its reset was read elsewhere)."""
        if d.dst_side in self.resets:
            return True
        if closed_by_reset(d.dst.socket, fin_sent=d.dst_side in self.fin_sent):
            self._mark_reset(d.dst_side)
            return True
        return False

    def _check_drained(self, d: Direction) -> float:
        """Pass ``d``'s end on once its destination has sent everything; else when to look
        again.

        The kernel's queue can take seconds to drain (docs/kernel-facts.md, "FIN not passed
        on": 0.1-1.3 s at EOF in bulk tests): look again in about half the time the rest should take
        at the rate seen since the last look, from DRAIN_POLL up to MAX_DRAIN_POLL.
        """
        if self._dst_gone(d):
            return math.inf
        redirected, stopped = self.pair.progress(d.src_side)
        if stopped:
            self.on_stop(d)  # its bytes since the stop wait in its own queue: userspace
            return math.inf
        d.redirected = redirected
        try:
            sent = d.sent_since()
        except OSError:
            sent = redirected
        if sent >= redirected:
            self._source_done(d)
            return 0.0
        progress = sent - d.drain_seen
        d.drain_seen = sent
        if progress <= 0:
            return DRAIN_POLL
        return max(DRAIN_POLL, min(MAX_DRAIN_POLL, DRAIN_POLL * (redirected - sent) / progress / 2))

    def _check_acknowledged(self, d: Direction) -> float:
        """Reset ``d``'s destination once its peer has acknowledged everything (closing with
        SO_LINGER 0 discards the send queue); else when to look again."""
        if d.dst_side in self.resets:
            d.state = State.DONE
            return math.inf
        try:
            left = unacknowledged(d.dst.socket)
        except OSError:
            left = 0
        if left == 0 or tcp_state(d.dst.socket) == TCP_CLOSE:
            reset_on_close(d.dst)
            d.state = State.DONE
            return math.inf
        if 0 <= left < d.unacked:
            self.last_activity = trio.current_time()
            d.ack_poll = ACK_POLL[0]
        d.unacked = left
        delay = d.ack_poll
        d.ack_poll = min(ACK_POLL[1], delay * 2)
        return delay

    async def _userspace(self, d: Direction) -> None:
        """Copy ``d`` in userspace from now on (in-flight bound reached, or not in the sockhash).

        A system task must not raise: a bug ends this connection only.
        """
        assert d.pump is not None
        try:
            with d.pump:
                if await self._copy_rest(d):
                    self._source_done(d)
        except Exception:
            if self.finished:
                return  # e.g. ClosedResourceError: the connection ended while it waited
            log.exception("kernel forwarder: userspace direction failed")
            self.end("internal_error")

    async def _copy_rest(self, d: Direction) -> bool:
        """Copy until the source ends (True: pass its end on) or the destination is reset."""
        redirected, _ = self.pair.progress(d.src_side)
        d.redirected = redirected
        if d.src_side not in self.pair.stopped_at_insert:
            # Every byte redirected before the stop must be in dst's send queue before the
            # first byte copied here, or the order breaks.
            while d.sent_since() < redirected:
                if self._dst_gone(d):
                    return False
                await trio.sleep(DRAIN_POLL)
        polls = 0
        while True:
            try:
                data = await d.src.receive_some(self.owner.buffer_size)
            except trio.BrokenResourceError:
                self._mark_reset(d.src_side)
                data = b""
            if not data:
                if self._read_everything(d, polls):
                    if d.src_side not in self.resets:
                        ending = how_it_ended(d.src.socket, fin_sent=d.src_side in self.fin_sent)
                        d.fin_received = ending is not Ending.RESET
                        if ending is not Ending.FIN:
                            self._mark_reset(d.src_side)
                    return True
                polls += 1
                await trio.sleep(DRAIN_POLL)
                continue
            d.copied += len(data)
            self.last_activity = trio.current_time()
            try:
                await d.dst.send_all(data)
            except trio.BrokenResourceError:
                self._mark_reset(d.dst_side)
                return False

    def _read_everything(self, d: Direction, polls: int) -> bool:
        """Whether every byte ``d``'s source received has been redirected or copied, once a
        read reported its end.

        On a socket in the sockhash, recv() reports the end once the FIN (or RST) has arrived
        even if SK_PASSed skbs still wait in the psock's retry queue (docs/kernel-facts.md,
        fact 42).
        The received count includes the FIN if one came, which a reset socket cannot tell:
        a difference of one is the FIN when the socket is not closed, and is taken as it after
        a short wait otherwise; after the longest wait the rest is given up.
        """
        try:
            pending = d.received_since() - d.redirected - d.copied
        except OSError:
            return True
        if pending <= 0 or polls >= _HELD_BACK_POLLS[1]:
            return True
        if pending == 1:
            return tcp_state(d.src.socket) != TCP_CLOSE or polls >= _HELD_BACK_POLLS[0]
        return False
