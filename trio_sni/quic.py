"""QUIC passthrough: each UDP flow routed by the ClientHello in its Initial packets.

A ``"protocol": "quic"`` listener is one UDP socket. Its :class:`QuicListener` reads every
datagram and hands it to the flow of the client's address and port, making one for a new
client whose datagram starts a QUIC long-header packet. A flow is one task:

1. admit the client (lists and per-client limits, as for TCP: a flow is a connection);
2. feed datagrams to :class:`~trio_sni.sansio.quic_initial.QuicInitialReader`, keeping them,
   until the ClientHello is complete (bounded in datagrams and by ``timeouts.client_hello``);
3. route, resolve and let the SSRF guard check, as for TCP (no SOCKS5: it carries TCP here);
4. open a connected UDP socket to the target, send the kept datagrams unchanged, then relay
   both ways until neither side has sent anything for ``timeouts.quic_idle``.

Once a flow relays, the listener's task passes the client's datagrams to the flow's socket
itself, and the flow's task passes the target's back; both read and write without waiting
(a datagram a full socket buffer cannot take is dropped, as a router would drop it: QUIC
recovers), and the idle timeout is one timer per flow, not a deadline moved per datagram.

In kernel mode (the flow's mode is served by the kernel forwarder, whose QUIC data plane
loaded) the kernel relays instead: a second socket, bound to the listener's address and port
and connected to the client, takes the client's datagrams from the listener's socket, and it
and the flow's socket enter the QUIC sockhash, whose verdict program sends each datagram
either receives out of the other (docs/kernel-facts.md, facts 50 and 52). The flow's task then
only reads the kernel's counts, for the idle timeout and the live and logged counts.

The flow table holds at most ``max_connections`` flows (UDP sources can be spoofed): refused
flows make room first, then new clients are dropped.

A refused or unreadable flow is logged at once and then kept, dropping what the client
retransmits, until it has been quiet for ``timeouts.quic_idle`` (at least
``timeouts.client_hello``), so the retransmissions make no second line; the client falls
back to TCP. Every flow
ends with one access-log line (``"transport": "quic"``, datagrams and bytes each way).
QUIC's own packets (Version Negotiation, Retry, the server's Initials) are relayed like
any others: the proxy reads only the client's first flight.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import time
from typing import TYPE_CHECKING

import attrs
import trio

from ._fd import borrowed
from .connection import (
    ConnectionContext,
    ConnectionInfo,
    admit_client,
    allowed_addresses,
)
from .errors import (
    DestinationRefused,
    HelloTimeout,
    NameRefused,
    QuicViaSocks5,
    TrioSniError,
    UpstreamError,
)
from .forward import Mode
from .sansio.addresses import format_endpoint, ip_of
from .sansio.config import Listener
from .sansio.policy import Deny, Route
from .sansio.quic_initial import QuicInitialReader

if TYPE_CHECKING:
    from .accel.quic_plane import QuicPair, QuicPlane

log = logging.getLogger("trio_sni")

#: The largest UDP payload (IPv4); QUIC datagrams are far smaller.
MAX_DATAGRAM = 65535
#: Datagrams queued between the listener and one flow's task; more are dropped, as a router
#: would (QUIC recovers).
FLOW_QUEUE = 256
#: Datagrams read in a row, each way, before other tasks get a turn.
RELAY_BATCH = 64


@attrs.define(eq=False)
class Flow:
    """One client address and port on a QUIC listener."""

    address: tuple[str, int] | tuple[str, int, int, int]
    inbox: trio.MemorySendChannel[bytes]
    info: ConnectionInfo
    #: Pushed forward by every datagram either way; the flow ends when it passes.
    idle: trio.CancelScope
    datagrams_to_upstream: int = 0
    datagrams_to_client: int = 0
    #: Where the flow goes, once its ClientHello has been routed.
    route: Route | None = None
    #: Its access-log line is written (a refused flow's at once).
    logged: bool = False
    #: The flow's connected UDP socket, once the listener passes datagrams to it directly.
    upstream_fd: int = -1
    #: When a datagram last passed either way (the idle timeout counts from it).
    last_active: float = 0.0
    #: ``((datagrams, bytes) to upstream, (datagrams, bytes) to client)`` the kernel had
    #: redirected at the last look, in kernel mode (already in the flow's counts).
    kernel_counts: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0))


class QuicListener:
    """Reads a QUIC listener's datagrams and runs its flows (see the module docstring).

    Args:
        sock: the bound UDP socket; the listener closes it when :meth:`serve` returns.
        spec: the listener's config.
        ctx: the proxy's shared context (policy, limiter, resolver, access log, ...).
        idle_timeout: ``timeouts.quic_idle``.
    """

    def __init__(
        self,
        sock: trio.socket.SocketType,
        spec: Listener,
        ctx: ConnectionContext,
        idle_timeout: float,
    ) -> None:
        self.sock = sock
        self.spec = spec
        self.ctx = ctx
        self.idle_timeout = idle_timeout
        self.flows: dict[object, Flow] = {}
        #: Refused flows kept only to swallow their clients' retransmissions, oldest first:
        #: the first to go when the flow table is full.
        self.lingering: dict[object, Flow] = {}
        self._last_warning = -math.inf
        #: The flows the kernel relays, each with its sockets' registration: one task reads
        #: all their counts in a batch (:meth:`_sweep_kernel_counts`).
        self._in_kernel: dict[int, tuple[Flow, QuicPair]] = {}
        self._sweeping = False
        self._nursery: trio.Nursery | None = None

    async def serve(self, flows: trio.Nursery) -> None:
        """Read datagrams until cancelled; flows run in ``flows``. On the way out every flow
        ends (reason ``shutdown``), as without the listening socket none can reach its client,
        except the flows the kernel relays: they have sockets of their own and drain like TCP
        connections, until they are idle or the drain deadline passes."""
        self._nursery = flows
        try:
            with borrowed(self.sock) as raw:
                batch = 0
                while True:
                    if batch >= RELAY_BATCH:
                        batch = 0
                        await trio.lowlevel.checkpoint()
                    try:
                        data, address = raw.recvfrom(MAX_DATAGRAM)
                    except (BlockingIOError, InterruptedError):
                        batch = 0
                        await trio.lowlevel.wait_readable(self.sock)
                        continue
                    except (ConnectionRefusedError, ConnectionResetError):
                        continue  # an ICMP error for an earlier answer: nothing to read
                    batch += 1
                    flow = self.flows.get(address)
                    if flow is None:
                        if not data or not data[0] & 0x80:
                            continue  # not the start of a QUIC connection: not a new flow
                        if not self._room_for_a_flow():
                            continue
                        flow, inbox = self._new_flow(address)
                        flows.start_soon(self._run, flow, inbox)
                    if flow.upstream_fd != -1:
                        self._to_upstream(flow, data)
                        continue
                    with contextlib.suppress(trio.WouldBlock):  # a full queue drops, as routers do
                        flow.inbox.send_nowait(data)
        finally:
            draining = {id(flow) for flow, _pair in self._in_kernel.values()}
            for flow in list(self.flows.values()):
                if id(flow) not in draining:
                    flow.info.reason = flow.info.reason or "shutdown"
                    flow.idle.cancel()
            self.sock.close()

    def _room_for_a_flow(self) -> bool:
        """The flow table holds at most ``max_connections`` flows, refused ones included (a
        spoofed source can make any number of them). When it is full, the oldest refused flow
        makes room; with none, the new client's datagram is dropped (it falls back to TCP),
        said at most once a second."""
        if len(self.flows) < self.ctx.max_connections:
            return True
        if self.lingering:
            address = next(iter(self.lingering))
            flow = self.lingering.pop(address)
            del self.flows[address]
            flow.idle.cancel()  # its line is written: it ends quietly
            return True
        self.ctx.quic_flows_dropped += 1
        now = trio.current_time()
        if now - self._last_warning >= 1.0:
            self._last_warning = now
            log.warning(
                "%s: %d QUIC flows (max_connections): a new client's datagrams are dropped "
                "(it falls back to TCP)",
                self.spec.label,
                len(self.flows),
            )
        return False

    def _new_flow(
        self, address: tuple[str, int] | tuple[str, int, int, int]
    ) -> tuple[Flow, trio.MemoryReceiveChannel[bytes]]:
        send, receive = trio.open_memory_channel[bytes](FLOW_QUEUE)
        info = ConnectionInfo(
            client=(str(ip_of(address[0])), address[1]),
            listener=self.spec.label,
            started_wall=time.time(),
            started=trio.current_time(),
            id=next(self.ctx.ids),
            transport="quic",
        )
        flow = Flow(address, send, info, trio.CancelScope())
        self.flows[address] = flow
        self.ctx.live[id(info)] = info
        return flow, receive

    async def _run(self, flow: Flow, inbox: trio.MemoryReceiveChannel[bytes]) -> None:
        """One flow, from its first datagram to its access-log line."""
        ctx, info = self.ctx, flow.info
        client_ip = ip_of(flow.address[0])
        acquired = False
        upstream: trio.socket.SocketType | None = None
        flow.idle.deadline = trio.current_time() + self.idle_timeout
        try:
            with flow.idle:
                try:
                    admit_client(client_ip, ctx)
                    acquired = True
                    kept = await self._read_hello(flow, inbox)
                    upstream = await self._connect(flow)
                    flow.upstream_fd = upstream.fileno()
                    # What came meanwhile goes after the kept datagrams, before the listener
                    # passes any more on itself (no checkpoint in between: the order holds).
                    while True:
                        try:
                            kept.append(inbox.receive_nowait())
                        except trio.WouldBlock:
                            break
                    for datagram in kept:
                        self._to_upstream(flow, datagram)
                    flow.idle.deadline = math.inf
                    plane = self._kernel_plane(flow)
                    if plane is None or not await self._relay_in_kernel(flow, upstream, plane):
                        async with trio.open_nursery() as relay:
                            relay.start_soon(self._relay_down, flow, upstream)
                            await self._until_idle(flow)
                            relay.cancel_scope.cancel()
                    info.reason = info.reason or "idle_timeout"
                except TrioSniError as exc:
                    if info.decision == "pending" or isinstance(exc, DestinationRefused):
                        info.decision = "deny"  # as for TCP: a refused destination is a denial
                    info.reason, info.error = exc.reason, str(exc)
                    self._log(flow)
                    self.lingering[flow.address] = flow
                    if acquired:  # a refused flow counts against no limit while it lingers
                        ctx.limiter.release(client_ip)
                        acquired = False
                    # The client retransmits its Initials for a while: the flow stays, quietly
                    # dropping them, so that they make neither a new flow nor a second line.
                    memory = max(self.idle_timeout, ctx.hello_timeout)
                    flow.idle.deadline = trio.current_time() + memory
                    async for _ in inbox:
                        flow.idle.deadline = trio.current_time() + memory
            if flow.idle.cancelled_caught:
                info.reason = info.reason or "idle_timeout"
        except Exception as exc:  # a bug: log it, keep serving everyone else
            log.exception("internal error while serving QUIC flow %s", format_endpoint(info.client))
            info.decision, info.reason = "error", "internal_error"
            info.error = f"{type(exc).__name__}: {exc}"
        finally:
            if self.flows.get(flow.address) is flow:
                del self.flows[flow.address]
            if self.lingering.get(flow.address) is flow:
                del self.lingering[flow.address]
            flow.inbox.close()
            if upstream is not None:
                upstream.close()
            if acquired:
                ctx.limiter.release(client_ip)
            if not flow.logged:
                info.reason = info.reason or "shutdown"  # cancelled: the drain deadline passed
                self._log(flow)
            ctx.ended.unpark_all()

    def _log(self, flow: Flow) -> None:
        """The flow's access-log line (once): when it ends, or at once when it is refused."""
        info = flow.info
        flow.logged = True
        info.datagrams = (flow.datagrams_to_upstream, flow.datagrams_to_client)
        del self.ctx.live[id(info)]
        self.ctx.write_access_log(info.access_record(trio.current_time()))

    async def _read_hello(self, flow: Flow, inbox: trio.MemoryReceiveChannel[bytes]) -> list[bytes]:
        """The datagrams up to the one that completed the ClientHello; routes the flow."""
        info, ctx = flow.info, self.ctx
        reader = QuicInitialReader(ctx.max_hello_size)
        kept: list[bytes] = []
        hello = None
        with trio.move_on_after(ctx.hello_timeout):
            while hello is None:
                datagram = await inbox.receive()
                kept.append(datagram)
                hello = reader.feed(datagram)
        if hello is None:
            raise HelloTimeout(ctx.hello_timeout)
        info.hello_time = trio.current_time() - info.started
        info.sni, info.alpn, info.hello_size = hello.server_name, hello.alpn, hello.size
        route = ctx.policy.decide(hello.server_name, self.spec.target_port, hello.alpn)
        if isinstance(route, Deny):
            raise NameRefused(route)
        info.rule = route.rule.label
        info.via = route.rule.via or ("socks5" if ctx.socks5 is not None else "direct")
        if info.via == "socks5":
            raise QuicViaSocks5(
                f'rule "{route.rule.label}" sends its traffic through SOCKS5, which carries '
                "TCP here: QUIC flows cannot follow (the client falls back to TCP)"
            )
        info.decision = "allow"
        flow.route = route
        return kept

    async def _connect(self, flow: Flow) -> trio.socket.SocketType:
        """A UDP socket connected to the first address of the target the guard allows."""
        route, info, ctx = flow.route, flow.info, self.ctx
        assert route is not None  # _read_hello routed the flow
        addresses = await allowed_addresses(route, ctx, info)
        started = trio.current_time()
        address = addresses[0]
        family = socket.AF_INET if address.version == 4 else socket.AF_INET6
        upstream = trio.socket.socket(family, socket.SOCK_DGRAM)
        try:
            await upstream.connect((str(address), route.port))
        except OSError as exc:
            upstream.close()
            raise UpstreamError(f"UDP to {address} port {route.port}: {exc.strerror}") from exc
        info.connect_time = trio.current_time() - started
        info.target = (str(address), route.port)
        host, port = upstream.getsockname()[:2]
        info.upstream_local = (host, port)
        info.mode = "udp"
        return upstream

    def _kernel_plane(self, flow: Flow) -> QuicPlane | None:
        """The QUIC data plane, when the flow's mode is served by the kernel forwarder and the
        plane loaded (:class:`~trio_sni.features.SockhashFeature`); else ``None``."""
        assert flow.route is not None
        mode = flow.route.rule.mode or self.ctx.default_mode
        forwarder = self.ctx.forwarders.get(mode, self.ctx.forwarder)
        return getattr(forwarder, "quic", None) if forwarder.mode is Mode.KERNEL else None

    async def _relay_in_kernel(
        self, flow: Flow, upstream: trio.socket.SocketType, plane: QuicPlane
    ) -> bool:
        """Let the kernel redirect the flow's datagrams (docs/kernel-facts.md, facts 50 and
        52) until it is idle; ``False`` (the flow stays in userspace, logged at debug level)
        if the client-facing socket cannot be made or registered.

        A socket connected to the client, bound to the listener's address and port, takes the
        client's datagrams from the listener's socket from its ``connect()`` on; once both
        sockets are in the QUIC sockhash, the kernel redirects each datagram either receives
        to the other's egress. What either socket had queued before is read once here and
        passed on (the kernel would take only one queued datagram per later arrival); what
        the listener's socket still holds of the flow, its task passes on as before.
        """
        info = flow.info
        try:
            facing = self._client_facing_socket(flow)
        except OSError as exc:
            log.debug("QUIC flow %s stays in userspace: %s", format_endpoint(info.client), exc)
            return False
        try:
            with borrowed(upstream) as upstream_raw:
                pair = plane.register(facing, upstream_raw)
        except (OSError, ValueError) as exc:
            facing.close()
            log.debug("QUIC flow %s stays in userspace: %s", format_endpoint(info.client), exc)
            return False
        info.mode = "kernel"
        self._in_kernel[id(flow)] = (flow, pair)
        if not self._sweeping:
            assert self._nursery is not None  # serve() runs the flows
            self._sweeping = True
            self._nursery.start_soon(self._sweep_kernel_counts, plane)
        try:
            for datagram in _queued(facing.fileno()):
                self._to_upstream(flow, datagram)
            for datagram in _queued(upstream.fileno()):
                self._to_client(flow, facing, datagram)
            while True:
                await self._until_idle(flow)  # the sweep moves last_active
                counts = pair.counts()  # and a last look: the sweep may not have run since
                if not _take_kernel_counts(flow, counts["client"], counts["upstream"]):
                    break
                flow.last_active = trio.current_time()
        finally:
            del self._in_kernel[id(flow)]
            counts = pair.counts()
            _take_kernel_counts(flow, counts["client"], counts["upstream"])
            pair.release()  # before the close: a registered socket keeps the maps alive
            facing.close()
        return True

    async def _sweep_kernel_counts(self, plane: QuicPlane) -> None:
        """Every twentieth of ``timeouts.quic_idle`` (the idle timeout's precision), read
        every kernel-relayed flow's counts in one batch: a flow that moved is active, and its
        live counts (``/connections``) follow. Ends with the last such flow."""
        try:
            while self._in_kernel:
                await trio.sleep(self.idle_timeout / 20)
                counts = plane.all_counts()
                now = trio.current_time()
                for flow, pair in list(self._in_kernel.values()):
                    up = counts.get(pair.client_cookie)
                    down = counts.get(pair.upstream_cookie)
                    if up is not None and down is not None and _take_kernel_counts(flow, up, down):
                        flow.last_active = now
        finally:
            self._sweeping = False

    def _client_facing_socket(self, flow: Flow) -> socket.socket:
        """A UDP socket bound to the listener's address and port (``SO_REUSEPORT``, as the
        listener's own) and connected to the client: the kernel gives it the client's
        datagrams from now on, and it is a redirect target (a connected socket)."""
        family = self.sock.family
        facing = socket.socket(family, socket.SOCK_DGRAM)
        try:
            facing.setblocking(False)
            facing.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                facing.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            facing.bind(self.sock.getsockname())
            facing.connect(flow.address)
        except OSError:
            facing.close()
            raise
        return facing

    def _to_client(self, flow: Flow, facing: socket.socket, datagram: bytes) -> None:
        """Pass one target datagram to the client through its connected socket, or drop it."""
        try:
            facing.send(datagram)
        except OSError:
            return
        flow.info.counters.to_client += len(datagram)
        flow.datagrams_to_client += 1

    def _to_upstream(self, flow: Flow, datagram: bytes) -> None:
        """Pass one client datagram to the target now, or drop it (a full socket buffer, or
        an ICMP error for an earlier datagram: QUIC recovers)."""
        try:
            os.write(flow.upstream_fd, datagram)
        except OSError:
            return
        flow.info.counters.to_upstream += len(datagram)
        flow.datagrams_to_upstream += 1
        flow.last_active = trio.current_time()

    async def _until_idle(self, flow: Flow) -> None:
        """Return once nothing has passed either way for ``timeouts.quic_idle``."""
        flow.last_active = trio.current_time()
        while True:
            deadline = flow.last_active + self.idle_timeout  # moved by every datagram
            if trio.current_time() >= deadline:
                return
            await trio.sleep_until(deadline)

    async def _relay_down(self, flow: Flow, upstream: trio.socket.SocketType) -> None:
        """The target's datagrams to the client, as they come (dropped where the listening
        socket's buffer is full, as a router would)."""
        fd, batch = upstream.fileno(), 0
        with borrowed(self.sock) as listening:
            while True:
                if batch >= RELAY_BATCH:
                    batch = 0
                    await trio.lowlevel.checkpoint()
                try:
                    datagram = os.read(fd, MAX_DATAGRAM)
                except (BlockingIOError, InterruptedError):
                    batch = 0
                    await trio.lowlevel.wait_readable(upstream)
                    continue
                except OSError:
                    continue  # e.g. ECONNREFUSED for an earlier datagram: nothing listens yet
                batch += 1
                try:
                    listening.sendto(datagram, flow.address)
                except OSError:
                    continue
                flow.info.counters.to_client += len(datagram)
                flow.datagrams_to_client += 1
                flow.last_active = trio.current_time()


async def open_quic_listener(spec: Listener) -> trio.socket.SocketType:
    """The bound UDP socket of a ``quic`` listener, with ``SO_REUSEPORT``: every worker binds
    its own on the port (the kernel keeps each flow on one of them, by its addresses), and a
    successor started by SIGUSR2 binds beside its predecessor, which closes its own when it
    stops accepting."""
    family = socket.AF_INET6 if ":" in spec.host else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        await sock.bind((spec.host, spec.port))
    except OSError as exc:
        sock.close()
        host = f"[{spec.host}]" if ":" in spec.host else spec.host
        raise OSError(exc.errno, f"{host}:{spec.port}/udp: {exc.strerror}") from exc
    return sock


def _take_kernel_counts(
    flow: Flow, to_upstream: tuple[int, int], to_client: tuple[int, int]
) -> bool:
    """Add what the kernel redirected since the last look (``(datagrams, bytes)`` each way,
    as counted so far) to the flow's counts; whether anything was."""
    (up, up_bytes), (down, down_bytes) = to_upstream, to_client
    (seen_up, seen_up_bytes), (seen_down, seen_down_bytes) = flow.kernel_counts
    if (up, down) == (seen_up, seen_down):
        return False
    flow.kernel_counts = ((up, up_bytes), (down, down_bytes))
    flow.datagrams_to_upstream += up - seen_up
    flow.datagrams_to_client += down - seen_down
    flow.info.counters.to_upstream += up_bytes - seen_up_bytes
    flow.info.counters.to_client += down_bytes - seen_down_bytes
    return True


def _queued(fd: int) -> list[bytes]:
    """Every datagram queued on the non-blocking socket ``fd`` now."""
    datagrams = []
    while True:
        try:
            datagrams.append(os.read(fd, MAX_DATAGRAM))
        except (BlockingIOError, InterruptedError):
            return datagrams
        except OSError:
            continue  # an ICMP error for an earlier datagram
