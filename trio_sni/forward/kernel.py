"""The ``kernel`` forwarder: the BPF sockhash moves the bytes, Python watches for the end.

Theory of operation. After the proxy has sent what it read from the client (the ClientHello and
anything after it) to the target, :meth:`KernelForwarder.forward` registers both sockets with
the data plane (:class:`trio_sni.accel.SockhashPlane`). From then on every byte either socket
receives is redirected by the kernel to the other one's egress; Python never sees it, and while
bytes flow Python does nothing per connection. The connection's task returns (when the caller
passed ``on_end``): what is left of it is one :class:`~._kernel_watch.Watcher` record, which
one shared task (:class:`trio_sni.forward._hangup_watch.HangupWatch`: one epoll instance for
every socket in the sockhash, plus one periodic job for the whole forwarder) calls when
something happened to its sockets or a timed check is due. That per-connection part, a state
machine per direction, is :mod:`._kernel_watch`; this module holds the hand-off, the stop ring,
the timed checks and the sweep.

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

Every map entry is removed when the connection ends: by the watcher once both directions are
done (or at the idle timeout), by :meth:`KernelForwarder.close` for those still registered
(reason ``shutdown``), or when :meth:`forward` raises or is cancelled before it returned.
"""

from __future__ import annotations

import contextlib
import logging
import math
import select
from collections.abc import Callable

import trio

from .._fd import borrowed
from ..accel import SockhashPlane
from ..accel.quic_plane import QuicPlane
from ._ends import send_counted
from ._handoff import Ended, consumed, drain_queued, written
from ._hangup_watch import HangupWatch
from ._kernel_watch import Direction, Watcher
from .copy import CopyForwarder
from .interface import ByteCounters, ForwarderStatistics, HandedOff, Mode, Side

log = logging.getLogger("trio_sni")

#: Slowest sweep of the redirected-byte counts (idle timeout, live byte counts), seconds; never
#: slower than a twentieth of the idle timeout (its precision).
MAX_SWEEP = 5.0


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
        self.buffer_size = buffer_size
        #: Connections that fell back to copy because registration failed.
        self.fallbacks = 0
        #: Directions moved to userspace by the in-flight bound.
        self.userspace_directions = 0
        self.watch = HangupWatch(self._periodic)
        self.watchers: set[Watcher] = set()
        self.live: dict[int, Direction] = {}  # src cookie -> kernel direction
        self._due: dict[Watcher, float] = {}  # when each watcher's next check is due
        self._next_sweep = 0.0
        self.watching_stops = contextlib.ExitStack()
        #: The QUIC flows' data plane, when the proxy has ``quic`` listeners and it loaded
        #: (:meth:`trio_sni.features.SockhashFeature.start`); closed with this forwarder.
        self.quic: QuicPlane | None = None

    def close(self) -> None:
        """End every connection still registered (reason ``shutdown``), then detach the
        verdict programs and close the maps (idempotent)."""
        for watcher in list(self.watchers):
            watcher.end("shutdown")
        self.plane.close()
        if self.quic is not None:
            self.quic.close()

    def statistics(self) -> ForwarderStatistics:
        """Cheap (no map walk: the per-CPU counters are one array), for status pages."""
        return ForwarderStatistics(
            self.mode,
            fallbacks=self.fallbacks,
            sockhash_sockets=2 * self.registered,
            userspace_directions=self.userspace_directions,
            quic_flows=None if self.quic is None else self.quic.registered,
            data_plane={
                **self.plane.counters(),
                **({} if self.quic is None else self._quic_counters(self.quic)),
            },
        )

    @staticmethod
    def _quic_counters(quic: QuicPlane) -> dict[str, int]:
        return {f"quic_{name}": value for name, value in quic.counters().items()}

    async def forward(
        self,
        client: trio.SocketStream,
        upstream: trio.SocketStream,
        *,
        first_bytes: bytes,
        counters: ByteCounters,
        on_end: Callable[[str], None] | None = None,
    ) -> str | HandedOff:
        """As :meth:`Forwarder.forward`. With ``on_end``, returns the connection's
        :class:`~._kernel_watch.Watcher` as soon as both sockets are in the sockhash: from then
        on the connection costs no task (a direction the in-flight bound moves to userspace
        gets one, its pump). A connection that falls back to copy is handed to the copy
        forwarder's relay the same way."""
        counters.mode = Mode.KERNEL  # (TCP_NODELAY: trio.SocketStream sets it on both)
        cfd, ufd = client.socket.fileno(), upstream.socket.fileno()
        # Counts so far (e.g. bytes a SOCKS server passed on) plus what is sent from here on.
        base_to_upstream = written(upstream.socket) - counters.to_upstream
        base_to_client = written(client.socket) - counters.to_client
        # Read whatever is queued on both sockets and send it on ourselves, before the insert
        # (docs/kernel-facts.md, facts 7 and 41): the kernel takes over whole skbs from the
        # receive queue and ignores how much of the first one userspace had read already, so a
        # partly read skb would be sent twice (measured: the 16 KiB the ClientHello reader had
        # taken from a 64 KiB skb arrived again).
        to_upstream, client_end = drain_queued(cfd)
        to_client, upstream_end = drain_queued(ufd)
        resets = [
            side
            for side, end in ((Side.CLIENT, client_end), (Side.UPSTREAM, upstream_end))
            if end is Ended.RESET
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
            return await self._fall_back(client, upstream, counters, resets, on_end)
        dirs = (
            Direction(
                Side.CLIENT,
                client,
                upstream,
                cfd,
                ufd,
                consumed(client.socket),
                base_to_upstream + counters.to_upstream,  # written() now: all sends counted
                base_to_upstream,
                counters.to_upstream,
            ),
            Direction(
                Side.UPSTREAM,
                upstream,
                client,
                ufd,
                cfd,
                consumed(upstream.socket),
                base_to_client + counters.to_client,
                base_to_client,
                counters.to_client,
            ),
        )
        with borrowed(client.socket) as cs, borrowed(upstream.socket) as us:
            try:
                pair = self.plane.register(cs, us, bound=self._bound)
            except OSError as exc:
                log.debug("sockhash registration failed (%s): copying this connection", exc)
                pair = None
        if pair is None:
            return await self._fall_back(client, upstream, counters, [], on_end)
        if on_end is not None:
            watcher = Watcher(self, pair, dirs, counters, on_end)
            watcher.start()
            return watcher
        ended = trio.Event()  # the caller waits for the end in its own task
        watcher = Watcher(self, pair, dirs, counters, lambda _reason: ended.set())
        watcher.start()
        try:
            await ended.wait()
        finally:
            watcher.end("shutdown")  # cancelled: release what it holds (the caller's reason)
        assert watcher.reason is not None
        return watcher.reason

    async def _fall_back(
        self,
        client: trio.SocketStream,
        upstream: trio.SocketStream,
        counters: ByteCounters,
        resets: list[Side],
        on_end: Callable[[str], None] | None,
    ) -> str | HandedOff:
        """Copy the connection instead (relayed without a task when given ``on_end``)."""
        self.fallbacks += 1
        counters.mode = Mode.COPY
        return await self._copy.forward(
            client, upstream, first_bytes=b"", counters=counters, on_end=on_end, reset=resets
        )

    @property
    def registered(self) -> int:
        """Connections registered in the sockhash right now."""
        return len(self.watchers)

    def join(self, watcher: Watcher) -> None:
        if not self.watchers:
            self.watching_stops.enter_context(
                self.watch.watch(self.plane.stops.fd, self._on_stops, select.EPOLLIN)
            )
            self._next_sweep = trio.current_time() + self._sweep_interval()
        self.watchers.add(watcher)

    def leave(self, watcher: Watcher) -> None:
        self.watchers.discard(watcher)
        self._due.pop(watcher, None)
        if not self.watchers:
            self.watching_stops.close()

    def schedule(self, watcher: Watcher, delay: float) -> None:
        when = trio.current_time() + delay
        if when < self._due.get(watcher, math.inf):
            self._due[watcher] = when
            self.watch.poke()

    def _on_stops(self, _events: int) -> None:
        """The program stopped some sockets: copy their directions from now on."""
        for cookie in self.plane.stopped_cookies():
            d = self.live.get(cookie)
            if d is not None:
                d.watcher.on_stop(d)

    def _sweep_interval(self) -> float:
        return min(MAX_SWEEP, self._idle_timeout / 20)

    def _periodic(self) -> float:
        """The watchers' checks that are due, then the sweep when it is due.

        Returns when to run again: at the earliest check a watcher asked for, or the next
        sweep, whichever comes first.
        """
        now = trio.current_time()
        while due := [w for w, when in self._due.items() if when <= now]:
            for watcher in due:
                del self._due[watcher]
                watcher.step()  # may schedule itself again, even for now
        after_sweep = self._sweep(now)
        return min(after_sweep, min(self._due.values(), default=math.inf) - now)

    def _sweep(self, now: float) -> float:
        """Who was active (idle timeout), live byte counts, stops the ring missed.

        Returns when to sweep again: every :meth:`_sweep_interval`, or at the earliest idle
        deadline if that comes first.
        """
        if self.plane.closed or not self.watchers or now < self._next_sweep:
            return max(0.0, self._next_sweep - now) or self._sweep_interval()
        progress = self.plane.all_progress()
        for cookie, d in list(self.live.items()):
            redirected, stopped = progress.get(cookie, (d.redirected, False))
            if redirected != d.redirected:
                d.redirected = redirected
                d.watcher.last_activity = now
            if stopped:
                d.watcher.on_stop(d)  # its ring record was lost (ring full)
        self._next_sweep = now + self._sweep_interval()
        for watcher in list(self.watchers):
            deadline = watcher.last_activity + self._idle_timeout
            if now >= deadline:
                watcher.end("idle_timeout")
            else:
                watcher.live_counters()
                self._next_sweep = min(self._next_sweep, deadline)
        return self._next_sweep - now
