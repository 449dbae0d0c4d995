"""The ``kernel`` forwarder: the BPF sockhash moves the bytes, Python watches for the end.

Theory of operation. After the proxy has sent what it read from the client (the ClientHello and
anything after it) to the target, :meth:`KernelForwarder.forward` registers both sockets with
the data plane (:class:`trio_sni.accel.SockhashSplice`). From then on every byte either socket
receives is redirected by the kernel to the other one's egress; Python never sees it, and while
bytes flow Python does nothing per connection: each connection's task sleeps until one shared
task (:class:`trio_sni.hangup_watch.HangupWatch`: one epoll instance for every spliced socket,
plus one periodic job for the whole forwarder) tells it that something happened.

* **End of a direction.** The shared epoll instance watches every spliced socket for
  ``EPOLLRDHUP`` only (plus ``EPOLLERR``/``EPOLLHUP``, always reported), edge-triggered: waiting
  for ``POLLIN`` on a spliced socket spins (KERNEL-FACTS). On a FIN from one side the peer's
  write side is shut only once the peer has taken everything the kernel redirected to it
  (``tcpi_bytes_acked + SIOCOUTQ`` of the peer has grown by ``tcpi_bytes_received`` of the
  source since registration), polled from 2 ms; shutting it at once cuts the tail.
* **Resets.** ``EPOLLERR`` (``ECONNRESET``) on one side closes the other with ``SO_LINGER 0``,
  so it gets an RST too; the reason is ``client_reset`` or ``upstream_reset``.
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
import errno
import fcntl
import functools
import logging
import math
import select
import socket
import struct
from collections.abc import Iterator
from typing import Protocol

import attrs
import trio

from .accel import SockhashSplice, Splice
from .forward import ByteCounters, CopyForwarder, reset_on_close
from .hangup_watch import HangupWatch

log = logging.getLogger("trio_sni")

SIOCINQ = 0x541B  # FIONREAD
SIOCOUTQ = 0x5411  # TIOCOUTQ
_TCP_INFO_LEN = 136
_TCP_CLOSE = 7

#: How often a draining direction checks whether the peer has sent everything (seconds):
#: at least this often, at most MAX_DRAIN_POLL, adapted to the rate the queue drains at.
DRAIN_POLL = 0.002
MAX_DRAIN_POLL = 0.05
#: Slowest sweep of the redirected-byte counts (idle timeout, live byte counts), seconds; never
#: slower than a twentieth of the idle timeout (its precision).
MAX_SWEEP = 5.0


class _Sock(Protocol):
    """A socket object with a direct ``getsockopt`` (stdlib or trio; no new object per call)."""

    def getsockopt(self, level: int, option: int, buflen: int) -> bytes: ...

    def fileno(self) -> int: ...


def _tcp_counts(sock: _Sock) -> tuple[int, int]:
    """``(tcpi_bytes_acked, tcpi_bytes_received)``; each includes SYN/FIN sequence numbers."""
    data = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
    if len(data) < _TCP_INFO_LEN:
        raise OSError(errno.ENOTSUP, "TCP_INFO without bytes_acked/bytes_received")
    acked, received = struct.unpack_from("<QQ", data, 120)
    return acked, received


def _ioctl_int(fd: int, request: int) -> int:
    value: int = struct.unpack("i", fcntl.ioctl(fd, request, b"\0\0\0\0"))[0]
    return value


def written(sock: _Sock) -> int:
    """Every sequence number handed to the socket to send: ``bytes_acked + SIOCOUTQ``."""
    return _tcp_counts(sock)[0] + _ioctl_int(sock.fileno(), SIOCOUTQ)


def received(sock: _Sock) -> int:
    return _tcp_counts(sock)[1]


def consumed(sock: _Sock) -> int:
    """Bytes userspace has read from the socket: received minus still queued (stable read)."""
    while True:
        before = received(sock)
        queued = _ioctl_int(sock.fileno(), SIOCINQ)
        if received(sock) == before:
            return before - queued


#: recv() size when emptying a receive queue before the insert.
_DRAIN_CHUNK = 1 << 20


def _drain_queued(fd: int) -> tuple[bytes, bool]:
    """Read everything queued on ``fd`` now; ``(data, ended)``, ended on EOF or an error.

    A read shorter than asked for has emptied the queue, so no partly read skb is left.
    """
    chunks: list[bytes] = []
    with _borrowed(fd) as sock:
        while True:
            try:
                data = sock.recv(_DRAIN_CHUNK, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return b"".join(chunks), False
            except OSError:
                return b"".join(chunks), True
            if not data:
                return b"".join(chunks), True
            chunks.append(data)
            if len(data) < _DRAIN_CHUNK:
                return b"".join(chunks), False


@contextlib.contextmanager
def _borrowed(fd: int) -> Iterator[socket.socket]:
    """A stdlib socket object for ``fd`` that does not close it."""
    sock = socket.socket(fileno=fd)
    try:
        yield sock
    finally:
        sock.detach()


def _socket_error(sock: _Sock) -> int:
    return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR, 4), "little")


def _tcp_state(sock: _Sock) -> int:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]


@attrs.define(eq=False)
class _Direction:
    """Bytes received on ``src`` going out of ``dst``."""

    src_side: str  # "client" or "upstream": whose bytes these are
    src: trio.SocketStream
    dst: trio.SocketStream
    src_fd: int
    dst_fd: int
    consumed0: int  # src bytes read by the proxy before registration (+ SYN)
    written0: int  # dst's written() at registration
    state: str = "kernel"  # kernel -> draining -> done, or kernel -> user -> done
    fin_received: bool = False
    drain_seen: int = 0  # sent_since() at the last drain check
    redirected: int = 0  # by the kernel, as of the last sweep
    copied: int = 0  # by the userspace pump

    def sent_since(self) -> int:
        return written(self.dst.socket) - self.written0

    def received_since(self) -> int:
        return received(self.src.socket) - self.consumed0 - (1 if self.fin_received else 0)


class KernelForwarder:
    """Forwarding through the BPF sockhash, with userspace copy where the kernel cannot.

    Args:
        plane: the loaded data plane; owned by this forwarder from now on (see :meth:`close`).
        copy: the forwarder for connections whose sockets cannot be registered.
        idle_timeout: seconds without a byte either way.
        bound: the per-direction in-flight bound in bytes (``ebpf.sockmap.max_in_flight``).
        buffer_size: recv() size for a direction moved to userspace.
    """

    mode = "kernel"

    def __init__(
        self,
        plane: SockhashSplice,
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

    def status(self) -> tuple[int, dict[str, int]]:
        """``(sockets in the sockhash, counters)``: cheap (no map walk), for status pages."""
        counters = self.plane.counters()
        counters["fallbacks"] = self.fallbacks
        counters["userspace_directions"] = self.budget_stops
        return 2 * self.registered, counters

    async def forward(
        self,
        client: trio.SocketStream,
        upstream: trio.SocketStream,
        *,
        first_bytes: bytes,
        counters: ByteCounters,
    ) -> str:
        counters.mode = "kernel"
        for stream in (client, upstream):
            stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        cfd, ufd = client.socket.fileno(), upstream.socket.fileno()
        # Counts so far (e.g. bytes a SOCKS server passed on) plus what is sent from here on.
        base_to_upstream = written(upstream.socket) - counters.to_upstream
        base_to_client = written(client.socket) - counters.to_client
        # Read whatever is queued on both sockets and send it on ourselves, before the insert
        # (KERNEL-FACTS fact 7): the kernel takes over whole skbs from the receive queue and
        # ignores how much of the first one userspace had read already, so a partly read skb
        # would be sent twice (measured: the 16 KiB the ClientHello reader had taken from a
        # 64 KiB skb arrived again).
        to_upstream, client_ended = _drain_queued(cfd)
        to_client, upstream_ended = _drain_queued(ufd)
        for data, dst, other, side in (
            (first_bytes + to_upstream, upstream, client, "upstream"),
            (to_client, client, upstream, "client"),
        ):
            if not data:
                continue
            try:
                await dst.send_all(data)
            except trio.BrokenResourceError:
                reset_on_close(other)
                return f"{side}_reset"
            if side == "upstream":
                counters.to_upstream += len(data)
            else:
                counters.to_client += len(data)
        if client_ended or upstream_ended:
            # Half-closed or reset already: the insert would fail; copy sees the end again.
            self.fallbacks += 1
            counters.mode = "copy"
            return await self._copy.forward(client, upstream, first_bytes=b"", counters=counters)
        dirs = (
            _Direction(
                "client",
                client,
                upstream,
                cfd,
                ufd,
                consumed(client.socket),
                written(upstream.socket),
            ),
            _Direction(
                "upstream",
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
                splice = registration.enter_context(self.plane.register(cs, us, bound=self._bound))
            except OSError as exc:
                self.fallbacks += 1
                log.debug("sockhash registration failed (%s): copying this connection", exc)
                counters.mode = "copy"
                return await self._copy.forward(
                    client, upstream, first_bytes=b"", counters=counters
                )
            watcher = _Watcher(self, splice, dirs, counters, base_to_upstream, base_to_client)
            self.registered += 1
            try:
                return await watcher.run()
            finally:
                self.registered -= 1
                watcher.update_counters()

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
            if watcher is not None and d is not None and d.state in ("kernel", "draining"):
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
            if stopped and d.state in ("kernel", "draining"):
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
        splice: Splice,
        dirs: tuple[_Direction, _Direction],
        counters: ByteCounters,
        base_to_upstream: int,
        base_to_client: int,
    ) -> None:
        self.fwd = fwd
        self.splice = splice
        self.dirs = dirs
        self.counters = counters
        self.base = {"client": base_to_upstream, "upstream": base_to_client}
        self.counted0 = {"client": counters.to_upstream, "upstream": counters.to_client}
        self.fin_sent = {"client": False, "upstream": False}  # FIN sent on d.dst
        self.reason: str | None = None
        self._waiting: trio.CancelScope | None = None
        self.last_activity = trio.current_time()
        for side in splice.stopped_at_insert:
            self._dir(side).state = "user"

    def _dir(self, side: str) -> _Direction:
        return self.dirs[0] if side == "client" else self.dirs[1]

    def update_counters(self) -> None:
        """The exact byte counts: what each destination was given to send."""
        for d in self.dirs:
            try:
                sent = written(d.dst.socket) - self.base[d.src_side]
            except OSError:
                continue
            sent -= 1 if self.fin_sent[d.src_side] else 0
            self._set_count(d, sent)

    def live_counters(self) -> None:
        """Cheap counts for the status page (no syscall): redirected as of the last sweep."""
        for d in self.dirs:
            self._set_count(d, self.counted0[d.src_side] + d.redirected + d.copied)

    def _set_count(self, d: _Direction, value: int) -> None:
        if d.src_side == "client":
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
                if d.state == "kernel":
                    cookie = self.splice.cookie(d.src_side)
                    live[cookie] = (self, d)
                    watching.callback(live.pop, cookie, None)
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                for d in self.dirs:
                    if d.state == "user":
                        nursery.start_soon(self._userspace, d)
                await self._loop()
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

    def _reset(self, side: str) -> None:
        """``side`` was reset: reset the other side too and stop."""
        other = self.dirs[0].dst if side == "client" else self.dirs[1].dst
        reset_on_close(other)
        self.end(f"{side}_reset")

    async def _loop(self) -> None:
        while self.reason is None:
            if all(d.state == "done" for d in self.dirs):
                self.reason = "normal"
                return
            delay = math.inf
            for d in self.dirs:
                if d.state == "draining":
                    delay = min(delay, self._check_drained(d))
            if all(d.state == "done" for d in self.dirs):
                continue
            with trio.move_on_after(delay) as self._waiting:
                await trio.sleep_forever()
            self._waiting = None

    def _on_event(self, d: _Direction, events: int) -> None:
        """What the shared epoll instance reported for ``d``'s source socket."""
        side = d.src_side
        if events & select.EPOLLERR or (
            events & select.EPOLLHUP
            and _tcp_state(d.src.socket) == _TCP_CLOSE
            and _socket_error(d.src.socket)
        ):
            self._reset(side)
            return
        if not events & (select.EPOLLRDHUP | select.EPOLLHUP):
            return
        self.fwd._watch.errors_only(d.src_fd)
        if d.fin_received:
            return
        d.fin_received = True
        self.last_activity = trio.current_time()
        if d.state == "kernel":
            with _borrowed(d.src_fd) as sock, contextlib.suppress(OSError):
                sock.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK)  # process the queue
            d.state = "draining"
            self._wake()
        # "user": its pump reads the EOF itself.

    def on_stop(self, d: _Direction) -> None:
        """The program stopped ``d``'s source socket: copy that direction from now on."""
        d.state = "user"
        self.fwd.budget_stops += 1
        self.fwd._live.pop(self.splice.cookie(d.src_side), None)
        self.nursery.start_soon(self._userspace, d)

    def _shutdown_dst(self, d: _Direction) -> None:
        with contextlib.suppress(OSError):
            d.dst.socket.shutdown(socket.SHUT_WR)
            self.fin_sent[d.src_side] = True
        d.state = "done"
        self._wake()

    def _check_drained(self, d: _Direction) -> float:
        """Shut ``d``'s destination once it has sent everything; else when to look again.

        The kernel's queue can take seconds to drain (KERNEL-FACTS: 0.1-1.3 s at EOF in bulk
        tests): look again in about half the time the rest should take at the rate seen
        since the last look, from DRAIN_POLL up to MAX_DRAIN_POLL.
        """
        sent, target = d.sent_since(), d.received_since()
        if sent >= target:
            self._shutdown_dst(d)
            return math.inf
        progress = sent - d.drain_seen
        d.drain_seen = sent
        if progress <= 0:
            return DRAIN_POLL
        return max(DRAIN_POLL, min(MAX_DRAIN_POLL, DRAIN_POLL * (target - sent) / progress / 2))

    async def _userspace(self, d: _Direction) -> None:
        """Copy ``d`` in userspace from now on (in-flight bound reached, or no splice)."""
        redirected, _ = self.splice.progress(d.src_side)
        d.redirected = redirected
        if d.src_side not in self.splice.stopped_at_insert:
            # Every byte redirected before the stop must be in dst's send queue before the
            # first byte copied here, or the order breaks.
            while d.sent_since() < redirected:
                if _tcp_state(d.dst.socket) == _TCP_CLOSE:
                    self._reset("upstream" if d.src_side == "client" else "client")
                    return
                await trio.sleep(DRAIN_POLL)
        other = "upstream" if d.src_side == "client" else "client"
        while True:
            try:
                data = await d.src.receive_some(self.fwd._buffer_size)
            except trio.BrokenResourceError:
                self._reset(d.src_side)
                return
            if not data:
                # On a socket in the sockhash, recv() reports EOF once the FIN has arrived
                # even if SK_PASSed skbs still wait in the psock's retry queue: believe it only
                # when every byte received has been redirected or copied.
                d.fin_received = True
                if d.received_since() <= redirected + d.copied:
                    break
                await trio.sleep(DRAIN_POLL)
                continue
            d.copied += len(data)
            self.last_activity = trio.current_time()
            try:
                await d.dst.send_all(data)
            except trio.BrokenResourceError:
                self._reset(other)
                return
        self._shutdown_dst(d)
