"""The ``kernel`` forwarder: the BPF sockhash moves the bytes, Python watches for the end.

Theory of operation. After the proxy has sent what it read from the client (the ClientHello and
anything after it) to the target, :meth:`KernelForwarder.forward` registers both sockets with
the data plane (:class:`trio_sni.accel.SockhashPlane`). From then on every byte either socket
receives is redirected by the kernel to the other one's egress; Python never sees it, and while
bytes flow Python does nothing per connection: each connection's task sleeps until one shared
task (:class:`trio_sni.forward._hangup_watch.HangupWatch`: one epoll instance for every socket
in the sockhash, plus one periodic job for the whole forwarder) tells it that something happened.

* **End of a direction.** The shared epoll instance watches every socket in the sockhash for
  ``EPOLLRDHUP`` only (plus ``EPOLLERR``/``EPOLLHUP``, always reported), edge-triggered: waiting
  for ``POLLIN`` on a socket in the sockhash spins (docs/kernel-facts.md, "poll(POLLIN) on
  spliced sockets"). On a FIN from one side the peer's write side is shut only once the peer has
  taken everything the kernel redirected to it (``tcpi_bytes_acked + SIOCOUTQ`` of the peer has
  grown by the bytes the verdict program redirected from the source, read from its ``progress``
  entry), polled from 2 ms; shutting it at once cuts the tail.
* **Resets.** A reset of one side (``EPOLLERR``, or a socket found in CLOSE that the proxy
  never sent a FIN to: the kernel reports a reset to one reader only, see
  :func:`trio_sni.forward._ends.closed_by_reset`) ends the direction into it at once. The direction
  out of it drains as for a FIN (an answer sent just before the reset still reaches the other
  side), then waits until the other side's peer has acknowledged everything and closes it
  with ``SO_LINGER 0``, so it gets an RST too; the reason is ``client_reset`` or
  ``upstream_reset``. A reset socket is no longer watched (it would report EPOLLHUP on every
  wake-up). A reset read during the hand-off (before or by the registration's kick) is passed
  to the userspace path or the watcher, never dropped.
* **Backpressure.** The kernel has none: a stalled reader lets the redirect queue grow without
  limit. The verdict program bounds it itself, per skb: a socket may have at most ``bound``
  bytes redirected that its peer has not taken into its send queue (it reads the peer's
  ``write_seq``). A socket over the bound is *stopped* by the program: from that skb on, its
  bytes are SK_PASSed into its own receive queue (charged to its receive buffer, so TCP's
  window closes on the sender) and its cookie is written to the program's ``stops`` ring
  buffer, whose fd is in the shared epoll instance: Python learns of a stop at once, without
  polling. That direction waits until the peer has sent every byte redirected before the
  stop, and is copied by Python (``recv``/``send``) for the rest of the connection. Nothing is
  lost or reordered: the bytes before the stop are all in the peer's send queue before Python
  sends the first byte after it. The cost: a direction that ever has more than ``bound`` bytes
  in flight (a bulk transfer faster than the redirect worker, or a stalled reader) is copied
  by Python from then on.
* **Idle timeout and byte counts.** Every :data:`MAX_SWEEP` (at least every twentieth of the
  idle timeout) the periodic job reads every socket's redirected-byte count in one batch: a
  connection whose counts moved (or whose userspace direction copied something) was active.
  The same read keeps the live byte counts of the status page roughly current; the access
  log's counts are exact: what each socket was given to send (``bytes_acked + SIOCOUTQ``)
  since forwarding began.

Every map entry is removed when :meth:`forward` returns, raises or is cancelled (the
registration is a ``with`` block of plain syscalls).
"""

from __future__ import annotations

import contextlib
import enum
import errno
import fcntl
import functools
import logging
import math
import select
import socket
import struct
from collections.abc import Iterator

import attrs
import trio

from ..accel import SockhashPair, SockhashPlane
from ._ends import (
    ACK_POLL,
    SIOCOUTQ,
    TCP_CLOSE,
    Ending,
    SocketLike,
    closed_by_reset,
    how_it_ended,
    reset_on_close,
    send_counted,
    tcp_state,
    unacknowledged,
)
from ._hangup_watch import HangupWatch
from .copy import CopyForwarder
from .interface import ByteCounters, ForwarderStatistics, Mode, Side

log = logging.getLogger("trio_sni")

SIOCINQ = 0x541B  # FIONREAD
_TCP_INFO_LEN = 136

#: How often a draining direction checks whether the peer has sent everything (seconds):
#: at least this often, at most MAX_DRAIN_POLL, adapted to the rate the queue drains at.
DRAIN_POLL = 0.002
MAX_DRAIN_POLL = 0.05
#: Slowest sweep of the redirected-byte counts (idle timeout, live byte counts), seconds; never
#: slower than a twentieth of the idle timeout (its precision).
MAX_SWEEP = 5.0
#: How long a userspace direction that read its source's end waits for bytes the psock may
#: still hold back (its retry runs after one jiffy, docs/kernel-facts.md, fact 43), in DRAIN_POLLs:
#: first when the count may be off by the FIN only, then at most.
_HELD_BACK_POLLS = (10, 250)


def _tcp_counts(sock: SocketLike) -> tuple[int, int]:
    """``(tcpi_bytes_acked, tcpi_bytes_received)``; each includes SYN/FIN sequence numbers."""
    data = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
    if len(data) < _TCP_INFO_LEN:
        raise OSError(errno.ENOTSUP, "TCP_INFO without bytes_acked/bytes_received")
    acked, received = struct.unpack_from("<QQ", data, 120)
    return acked, received


def _ioctl_int(fd: int, request: int) -> int:
    value: int = struct.unpack("i", fcntl.ioctl(fd, request, b"\0\0\0\0"))[0]
    return value


def written(sock: SocketLike) -> int:
    """Every sequence number handed to the socket to send: ``bytes_acked + SIOCOUTQ``."""
    return _tcp_counts(sock)[0] + _ioctl_int(sock.fileno(), SIOCOUTQ)


def received(sock: SocketLike) -> int:
    return _tcp_counts(sock)[1]


def consumed(sock: SocketLike) -> int:
    """Bytes userspace has read from the socket: received minus still queued (stable read)."""
    while True:
        before = received(sock)
        queued = _ioctl_int(sock.fileno(), SIOCINQ)
        if received(sock) == before:
            return before - queued


#: recv() size when emptying a receive queue before the insert.
_DRAIN_CHUNK = 1 << 20


class _Ended(enum.Enum):
    """How a socket read during the hand-off ended."""

    EOF = enum.auto()
    RESET = enum.auto()


def _drain_queued(fd: int) -> tuple[bytes, _Ended | None]:
    """Read everything queued on ``fd`` now; ``(data, how it ended or None)``.

    A read shorter than asked for has emptied the queue, so no partly read skb is left. A
    reset read here is consumed (the kernel reports it once): the caller must pass it on.
    """
    chunks: list[bytes] = []
    with _borrowed(fd) as sock:
        while True:
            try:
                data = sock.recv(_DRAIN_CHUNK, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return b"".join(chunks), None
            except OSError:
                return b"".join(chunks), _Ended.RESET
            if not data:
                return b"".join(chunks), _Ended.EOF
            chunks.append(data)
            if len(data) < _DRAIN_CHUNK:
                return b"".join(chunks), None


@contextlib.contextmanager
def _borrowed(fd: int) -> Iterator[socket.socket]:
    """A stdlib socket object for ``fd`` that does not close it."""
    sock = socket.socket(fileno=fd)
    try:
        yield sock
    finally:
        sock.detach()


def _socket_error(sock: SocketLike) -> int:
    """The pending error (``SO_ERROR``), consumed by this read."""
    try:
        return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR, 4), "little")
    except OSError as exc:
        return exc.errno or errno.EBADF


class _State(enum.Enum):
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
class _Direction:
    """Bytes received on ``src`` going out of ``dst``."""

    src_side: Side  # whose bytes these are
    src: trio.SocketStream
    dst: trio.SocketStream
    src_fd: int
    dst_fd: int
    consumed0: int  # src bytes read by the proxy before registration (+ SYN)
    written0: int  # dst's written() at registration
    state: _State = _State.KERNEL
    fin_received: bool = False
    drain_seen: int = 0  # sent_since() at the last drain check
    redirected: int = 0  # by the kernel, as of the last look
    copied: int = 0  # by the userspace pump
    pump: trio.CancelScope | None = None  # the userspace pump, in state USER
    unacked: int = -1  # dst's unacknowledged bytes at the last look, in state ACKING
    ack_poll: float = ACK_POLL[0]

    @property
    def dst_side(self) -> Side:
        return self.src_side.other

    def sent_since(self) -> int:
        return written(self.dst.socket) - self.written0

    def received_since(self) -> int:
        """Bytes (and the FIN, if one came) received on ``src`` since registration."""
        return received(self.src.socket) - self.consumed0


class KernelForwarder:
    """Forwarding through the BPF sockhash, with userspace copy where the kernel cannot.

    Args:
        plane: the loaded data plane; owned by this forwarder from now on (see :meth:`close`).
        copy: the forwarder for connections whose sockets cannot be registered.
        idle_timeout: seconds without a byte either way.
        bound: the per-direction in-flight bound in bytes (``ebpf.sockmap.max_in_flight``).
        buffer_size: recv() size for a direction moved to userspace.
    """

    mode = Mode.KERNEL

    def __init__(
        self,
        plane: SockhashPlane,
        *,
        copy: CopyForwarder,
        idle_timeout: float,
        bound: int,
        buffer_size: int,
    ) -> None:
        self.plane = plane
        self._copy = copy
        self._idle_timeout = idle_timeout
        self._bound = bound
        self._buffer_size = buffer_size
        #: Connections that fell back to copy because registration failed.
        self.fallbacks = 0
        #: Directions moved to userspace by the in-flight bound.
        self.budget_stops = 0
        #: Connections registered in the sockhash right now.
        self.registered = 0
        self._watch = HangupWatch(self._periodic)
        self._watchers: set[_Watcher] = set()
        self._live: dict[int, tuple[_Watcher, _Direction]] = {}  # src cookie -> kernel direction
        self._next_sweep = 0.0
        self._watching_stops = contextlib.ExitStack()

    def close(self) -> None:
        """Detach the verdict program and close the maps (idempotent)."""
        self.plane.close()

    def statistics(self) -> ForwarderStatistics:
        """Cheap (no map walk: the per-CPU counters are one array), for status pages."""
        return ForwarderStatistics(
            self.mode,
            fallbacks=self.fallbacks,
            sockhash_sockets=2 * self.registered,
            userspace_directions=self.budget_stops,
            data_plane=self.plane.counters(),
        )

    async def forward(
        self,
        client: trio.SocketStream,
        upstream: trio.SocketStream,
        *,
        first_bytes: bytes,
        counters: ByteCounters,
    ) -> str:
        counters.mode = Mode.KERNEL
        for stream in (client, upstream):
            stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        cfd, ufd = client.socket.fileno(), upstream.socket.fileno()
        # Counts so far (e.g. bytes a SOCKS server passed on) plus what is sent from here on.
        base_to_upstream = written(upstream.socket) - counters.to_upstream
        base_to_client = written(client.socket) - counters.to_client
        # Read whatever is queued on both sockets and send it on ourselves, before the insert
        # (docs/kernel-facts.md, facts 7 and 41): the kernel takes over whole skbs from the
        # receive queue and ignores how much of the first one userspace had read already, so a
        # partly read skb would be sent twice (measured: the 16 KiB the ClientHello reader had taken
        # from a 64 KiB skb arrived again).
        to_upstream, client_end = _drain_queued(cfd)
        to_client, upstream_end = _drain_queued(ufd)
        resets = [
            side
            for side, end in ((Side.CLIENT, client_end), (Side.UPSTREAM, upstream_end))
            if end is _Ended.RESET
        ]
        for data, dst, side in (
            (first_bytes + to_upstream, upstream, Side.UPSTREAM),
            (to_client, client, Side.CLIENT),
        ):
            if data and side not in resets and not await send_counted(dst, data, counters, side):
                resets.append(side)
        if client_end or upstream_end or resets:
            # Half-closed or reset already: the insert would fail. Userspace finishes the
            # connection, told of the resets read here (the kernel reports each only once).
            return await self._fall_back(client, upstream, counters, resets)
        dirs = (
            _Direction(
                Side.CLIENT,
                client,
                upstream,
                cfd,
                ufd,
                consumed(client.socket),
                written(upstream.socket),
            ),
            _Direction(
                Side.UPSTREAM,
                upstream,
                client,
                ufd,
                cfd,
                consumed(upstream.socket),
                written(client.socket),
            ),
        )
        with contextlib.ExitStack() as registration, _borrowed(cfd) as cs, _borrowed(ufd) as us:
            try:
                pair = registration.enter_context(self.plane.register(cs, us, bound=self._bound))
            except OSError as exc:
                log.debug("sockhash registration failed (%s): copying this connection", exc)
                return await self._fall_back(client, upstream, counters, [])
            watcher = _Watcher(self, pair, dirs, counters, base_to_upstream, base_to_client)
            self.registered += 1
            try:
                return await watcher.run()
            finally:
                self.registered -= 1
                watcher.update_counters()

    async def _fall_back(
        self,
        client: trio.SocketStream,
        upstream: trio.SocketStream,
        counters: ByteCounters,
        resets: list[Side],
    ) -> str:
        self.fallbacks += 1
        counters.mode = Mode.COPY
        return await self._copy.forward(
            client, upstream, first_bytes=b"", counters=counters, reset=resets
        )

    def _join(self, watcher: _Watcher) -> None:
        if not self._watchers:
            self._watching_stops.enter_context(
                self._watch.watch(self.plane.stops.fd, self._on_stops, select.EPOLLIN)
            )
            self._next_sweep = trio.current_time() + self._sweep_interval()
        self._watchers.add(watcher)

    def _leave(self, watcher: _Watcher) -> None:
        self._watchers.discard(watcher)
        if not self._watchers:
            self._watching_stops.close()

    def _on_stops(self, _events: int) -> None:
        """The program stopped some sockets: copy their directions from now on."""
        for cookie in self.plane.stopped_cookies():
            watcher, d = self._live.get(cookie, (None, None))
            if watcher is not None and d is not None:
                watcher.on_stop(d)

    def _sweep_interval(self) -> float:
        return min(MAX_SWEEP, self._idle_timeout / 20)

    def _periodic(self) -> float:
        """The sweep: who was active (idle timeout), live byte counts, stops the ring missed.

        Returns when to sweep again: every :meth:`_sweep_interval`, or at the earliest idle
        deadline if that comes first.
        """
        now = trio.current_time()
        if self.plane.closed or not self._watchers or now < self._next_sweep:
            return max(0.0, self._next_sweep - now) or self._sweep_interval()
        progress = self.plane.all_progress()
        for cookie, (watcher, d) in list(self._live.items()):
            redirected, stopped = progress.get(cookie, (d.redirected, False))
            if redirected != d.redirected:
                d.redirected = redirected
                watcher.last_activity = now
            if stopped:
                watcher.on_stop(d)  # its ring record was lost (ring full)
        self._next_sweep = now + self._sweep_interval()
        for watcher in list(self._watchers):
            deadline = watcher.last_activity + self._idle_timeout
            if now >= deadline:
                watcher.end("idle_timeout")
            else:
                watcher.live_counters()
                self._next_sweep = min(self._next_sweep, deadline)
        return self._next_sweep - now


class _Watcher:
    """One connection of :class:`KernelForwarder` (see the module docstring): sleeps until the
    shared watch reports something, and does the end-of-connection work."""

    def __init__(
        self,
        fwd: KernelForwarder,
        pair: SockhashPair,
        dirs: tuple[_Direction, _Direction],
        counters: ByteCounters,
        base_to_upstream: int,
        base_to_client: int,
    ) -> None:
        self.fwd = fwd
        self.pair = pair
        self.dirs = dirs
        self.counters = counters
        self.base = {Side.CLIENT: base_to_upstream, Side.UPSTREAM: base_to_client}
        self.counted0 = {Side.CLIENT: counters.to_upstream, Side.UPSTREAM: counters.to_client}
        #: Sides the proxy has sent a FIN to.
        self.fin_sent: set[Side] = set()
        #: Sides whose socket was reset, in the order the resets were seen.
        self.resets: list[Side] = []
        self.reason: str | None = None
        #: Set once the connection is ending: late ring records and events are ignored.
        self.finished = False
        #: The counts are exact already (a destination died): the sweep leaves them alone.
        self.counts_final = False
        self._waiting: trio.CancelScope | None = None
        self.last_activity = trio.current_time()
        for side in pair.stopped_at_insert:
            self._from(Side(side)).state = _State.USER

    def _from(self, side: Side) -> _Direction:
        """The direction carrying ``side``'s bytes."""
        return self.dirs[0] if side is Side.CLIENT else self.dirs[1]

    def update_counters(self) -> None:
        """The exact byte counts: what each destination was given to send."""
        for d in self.dirs:
            try:
                sent = written(d.dst.socket) - self.base[d.src_side]
            except OSError:
                continue
            sent -= 1 if d.dst_side in self.fin_sent else 0
            self._set_count(d, sent)

    def live_counters(self) -> None:
        """Cheap counts for the status page (no syscall): redirected as of the last sweep."""
        if self.counts_final:
            return
        for d in self.dirs:
            self._set_count(d, self.counted0[d.src_side] + d.redirected + d.copied)

    def _set_count(self, d: _Direction, value: int) -> None:
        if d.src_side is Side.CLIENT:
            self.counters.to_upstream = value
        else:
            self.counters.to_client = value

    async def run(self) -> str:
        live = self.fwd._live
        with contextlib.ExitStack() as watching:
            self.fwd._join(self)
            watching.callback(self.fwd._leave, self)
            for d in self.dirs:
                watching.enter_context(
                    self.fwd._watch.watch(d.src_fd, functools.partial(self._on_event, d))
                )
                if d.state is _State.KERNEL:
                    cookie = self.pair.cookie(d.src_side)
                    live[cookie] = (self, d)
                    watching.callback(live.pop, cookie, None)
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                for d in self.dirs:
                    if d.state is _State.USER:
                        self._start_pump(d)
                for side in self.pair.reset_at_kick:
                    self._mark_reset(Side(side))
                try:
                    await self._loop()
                finally:
                    self.finished = True
                nursery.cancel_scope.cancel()
        assert self.reason is not None
        return self.reason

    def _wake(self) -> None:
        """Make the loop look again now (a direction changed state)."""
        if self._waiting is not None:
            self._waiting.cancel()

    def end(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
        self.nursery.cancel_scope.cancel()

    async def _loop(self) -> None:
        while self.reason is None:
            delay = math.inf
            for d in self.dirs:
                if d.state is _State.DRAINING:
                    delay = min(delay, self._check_drained(d))
                if d.state is _State.ACKING:
                    delay = min(delay, self._check_acknowledged(d))
            if all(d.state is _State.DONE for d in self.dirs):
                self.reason = f"{self.resets[0]}_reset" if self.resets else "normal"
                return
            with trio.move_on_after(delay) as self._waiting:
                await trio.sleep_forever()
            self._waiting = None

    def _on_event(self, d: _Direction, events: int) -> None:
        """What the shared epoll instance reported for ``d``'s source socket."""
        side = d.src_side
        if self.finished or side in self.resets:
            return
        if events & select.EPOLLERR and _socket_error(d.src.socket):
            self._mark_reset(side)
            return
        if not events & (select.EPOLLRDHUP | select.EPOLLHUP):
            return
        if closed_by_reset(d.src.socket, fin_sent=side in self.fin_sent):
            self._mark_reset(side)
            return
        if tcp_state(d.src.socket) == TCP_CLOSE:
            self.fwd._watch.forget(d.src_fd)  # closed both ways, cleanly: nothing more to see
        else:
            self.fwd._watch.errors_only(d.src_fd)  # a reset may still follow the FIN
        if d.fin_received:
            return
        d.fin_received = True
        self.last_activity = trio.current_time()
        if d.state is _State.KERNEL:
            with _borrowed(d.src_fd) as sock:
                try:
                    sock.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK)  # process the queue
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError:
                    self._mark_reset(side)  # read (and consumed) here: pass it on
                    return
            d.state = _State.DRAINING
            self._wake()
        # USER: its pump reads the EOF itself.

    def _mark_reset(self, side: Side) -> None:
        """``side``'s socket was reset: nothing more can be written to it, so the direction
        into it ends now; the direction out of it delivers what came first, then resets the
        other side."""
        if side in self.resets or self.finished:
            return
        self.resets.append(side)
        self.fwd._watch.forget(self._from(side).src_fd)  # nothing more to learn from it
        into = self._from(side.other)
        self._set_done(into)
        out = self._from(side)
        if out.state is _State.KERNEL:
            out.state = _State.DRAINING
        elif out.state is _State.DONE and out.dst_side not in self.resets:
            out.state = _State.ACKING  # its FIN went on already; the reset follows it
        # DRAINING goes on to ACKING; USER: the pump reads the end itself.
        self.update_counters()
        self.counts_final = True
        self.last_activity = trio.current_time()
        self._wake()

    def _set_done(self, d: _Direction) -> None:
        if d.pump is not None:
            d.pump.cancel()
        d.state = _State.DONE
        self.fwd._live.pop(self.pair.cookie(d.src_side), None)

    def on_stop(self, d: _Direction) -> None:
        """The program stopped ``d``'s source socket: copy that direction from now on."""
        if self.finished or self.reason is not None:
            return
        if d.state not in (_State.KERNEL, _State.DRAINING):
            return
        d.state = _State.USER
        self.fwd.budget_stops += 1
        self.fwd._live.pop(self.pair.cookie(d.src_side), None)
        self._start_pump(d)

    def _start_pump(self, d: _Direction) -> None:
        d.pump = trio.CancelScope()
        self.nursery.start_soon(self._userspace, d)

    def _source_done(self, d: _Direction) -> None:
        """Everything ``d``'s source sent is in the destination's send queue: pass its end on
        (a FIN now; a reset once the destination's peer has acknowledged it all)."""
        d.pump = None
        reset = d.src_side in self.resets
        if not reset or self._fin_came_first(d):
            with contextlib.suppress(OSError):
                d.dst.socket.shutdown(socket.SHUT_WR)
                self.fin_sent.add(d.dst_side)
        if reset and d.dst_side not in self.resets:
            d.state = _State.ACKING
        else:
            d.state = _State.DONE
        self._wake()

    def _fin_came_first(self, d: _Direction) -> bool:
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

    def _dst_gone(self, d: _Direction) -> bool:
        """Whether ``d``'s destination was reset (also if its reset was read elsewhere)."""
        if d.dst_side in self.resets:
            return True
        if closed_by_reset(d.dst.socket, fin_sent=d.dst_side in self.fin_sent):
            self._mark_reset(d.dst_side)
            return True
        return False

    def _check_drained(self, d: _Direction) -> float:
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

    def _check_acknowledged(self, d: _Direction) -> float:
        """Reset ``d``'s destination once its peer has acknowledged everything (closing with
        SO_LINGER 0 discards the send queue); else when to look again."""
        if d.dst_side in self.resets:
            d.state = _State.DONE
            return math.inf
        try:
            left = unacknowledged(d.dst.socket)
        except OSError:
            left = 0
        if left == 0 or tcp_state(d.dst.socket) == TCP_CLOSE:
            reset_on_close(d.dst)
            d.state = _State.DONE
            return math.inf
        if 0 <= left < d.unacked:
            self.last_activity = trio.current_time()
            d.ack_poll = ACK_POLL[0]
        d.unacked = left
        delay = d.ack_poll
        d.ack_poll = min(ACK_POLL[1], delay * 2)
        return delay

    async def _userspace(self, d: _Direction) -> None:
        """Copy ``d`` in userspace from now on (in-flight bound reached, or not in the sockhash)."""
        assert d.pump is not None
        with d.pump:
            if await self._copy_rest(d):
                self._source_done(d)

    async def _copy_rest(self, d: _Direction) -> bool:
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
                data = await d.src.receive_some(self.fwd._buffer_size)
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

    def _read_everything(self, d: _Direction, polls: int) -> bool:
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
