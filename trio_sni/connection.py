"""One client connection, from accept to close, in one cancel scope.

Theory of operation: :func:`handle_connection` runs as one task per accepted connection.
Everything it does (client checks, reading the first bytes under one total deadline, policy,
resolution, the SSRF guard, connecting, forwarding) happens inside that task, so cancelling
the task (shutdown, drain deadline) cancels all of it. One pump, :func:`read_first_bytes`,
feeds every sans-I/O reader of the first bytes (PROXY header, ClientHello, request head).
Cleanup (releasing the client's limiter slot, closing both sockets, writing the access-log
line) is in ``finally`` and runs on every path, including cancellation and bugs. Each stage
that refuses the connection raises a :class:`~trio_sni.errors.TrioSniError` subclass whose
``reason`` becomes the termination reason; anything else is a bug, logged with its
traceback, and never disturbs other connections.
"""

from __future__ import annotations

import contextlib
import http
import itertools
import logging
import os
import socket
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import Final, Protocol

import attrs
import trio

from .errors import (
    ClientReset,
    DestinationRefused,
    FirstBytesTimeout,
    HelloTimeout,
    NameRefused,
    ProxyHeaderTimeout,
    Refused,
    RequestTimeout,
    TrioSniError,
    UpstreamError,
)
from .forward import ByteCounters, Forwarder, HandedOff
from .resolver import Resolver
from .sansio import NEED_DATA, BufferedReader, EventT, http_request, proxy_protocol
from .sansio.addresses import IPAddress, format_endpoint, ip_literal, ip_of, refusal_reason
from .sansio.alerts import Alert, alert_record
from .sansio.clienthello import ClientHelloReader
from .sansio.config import QOS_PRIORITY, Limits, Listener, Socks5
from .sansio.errors import MalformedHelloError
from .sansio.http_request import DEFAULT_MAX_SIZE as MAX_REQUEST_HEAD
from .sansio.http_request import HttpRequestError, HttpRequestReader
from .sansio.policy import Deny, Policy, Route, check_proxy_sender
from .sansio.proxy_protocol import MAX_V1_LENGTH, ProxyHeaderError, ProxyHeaderReader
from .upstream import connect_to_addresses, connect_via_socks5

log = logging.getLogger("trio_sni")


@attrs.define(eq=False)
class ConnectionInfo:
    """What is known about one live connection; it becomes the access-log line at the end."""

    client: tuple[str, int]
    listener: str
    started_wall: float
    started: float
    sni: str | None = None
    alpn: tuple[str, ...] = ()
    hello_size: int | None = None
    rule: str | None = None
    decision: str = "pending"
    target: tuple[str, int] | None = None
    via: str | None = None
    #: The socket's peer (the load balancer) when a PROXY header supplied ``client``.
    peer: tuple[str, int] | None = None
    mode: str | None = None
    #: The mode this connection's rule (or ``forwarding.mode``) asked for; ``auto`` asks for
    #: whatever the plan picked (``mode``).
    requested_mode: str | None = None
    reason: str | None = None
    error: str | None = None
    counters: ByteCounters = attrs.Factory(ByteCounters)
    #: This process's number for the connection (with workers, ``worker`` tells whose).
    id: int = 0
    #: Seconds spent on each stage: from accept to a whole ClientHello (or request head),
    #: resolving the target's name, connecting to it (SOCKS5 handshake included).
    hello_time: float | None = None
    resolve_time: float | None = None
    connect_time: float | None = None
    #: The proxy's own address and port on the upstream connection (to find it in the
    #: target's logs or a capture).
    upstream_local: tuple[str, int] | None = None
    #: ``tcp``, or ``quic`` for a flow of a QUIC listener (:mod:`trio_sni.quic`).
    transport: str = "tcp"
    #: A QUIC flow's datagrams ``(to upstream, to client)``.
    datagrams: tuple[int, int] | None = None

    @property
    def forwarded_mode(self) -> str | None:
        """The mode that moved the bytes: the forwarder's, or the one that took over for this
        connection (``kernel`` can fall back to ``copy`` per connection)."""
        return self.counters.mode or self.mode

    @property
    def fallback_from(self) -> str | None:
        """The mode asked for when another one forwarded this connection, else ``None``:
        unavailable at startup (kernel → splice → copy) or given up per connection (a socket
        the sockhash refused, pipes that could not be created)."""
        wanted = self.mode if self.requested_mode in (None, "auto") else self.requested_mode
        used = self.forwarded_mode
        return wanted if used is not None and wanted is not None and used != wanted else None

    def access_record(self, now: float) -> dict[str, object]:
        """The JSON access-log record (one line per connection)."""
        record: dict[str, object] = {
            "time": rfc3339_ms(self.started_wall),
            "id": self.id,
            "client": format_endpoint(self.client),
            "listener": self.listener,
            "sni": self.sni,
            "alpn": list(self.alpn),
            "hello_size": self.hello_size,
            "decision": self.decision,
            "rule": self.rule,
            "target": format_endpoint(self.target) if self.target else None,
            "upstream_local": format_endpoint(self.upstream_local) if self.upstream_local else None,
            "via": self.via,
            "peer": format_endpoint(self.peer) if self.peer else None,
            "bytes_to_upstream": self.counters.to_upstream,
            "bytes_to_client": self.counters.to_client,
            "hello_time": _seconds(self.hello_time),
            "resolve_time": _seconds(self.resolve_time),
            "connect_time": _seconds(self.connect_time),
            "duration": round(now - self.started, 6),
            "mode": self.forwarded_mode,
            "fallback_from": self.fallback_from,
            "reason": self.reason,
            "error": self.error,
            "transport": self.transport,
        }
        if self.datagrams is not None:
            record["datagrams_to_upstream"], record["datagrams_to_client"] = self.datagrams
        return record


def rfc3339_ms(wall: float) -> str:
    """``2026-12-07T21:04:05.123Z``: RFC 3339, UTC, to the millisecond."""
    seconds = int(wall)
    millis = int((wall - seconds) * 1000)
    return f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(seconds))}.{millis:03d}Z"


def _seconds(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


class Limiter(Protocol):
    """The per-client limits: a :class:`~trio_sni.sansio.policy.ClientLimiter` in one process, a
    :class:`~trio_sni.shared_limits.SharedLimiter` across workers."""

    def acquire(self, ip: IPAddress, now: float) -> Deny | None: ...
    def release(self, ip: IPAddress) -> None: ...
    def reconfigure(self, limits: Limits, max_connections: int) -> None: ...


@attrs.define(eq=False)
class ConnectionContext:
    """Everything a connection handler needs, shared by all connections of a proxy.

    ``policy``, ``resolver`` and timeouts can be swapped on reload; a connection reads them
    once, when it needs them, so a live connection is never disturbed by a reload.
    """

    policy: Policy
    limiter: Limiter
    resolver: Resolver
    forwarder: Forwarder
    max_hello_size: int
    hello_timeout: float
    connect_timeout: float
    own_addresses: Collection[tuple[IPAddress, int]]
    write_access_log: Callable[[dict[str, object]], None]
    #: The ``socks5`` section: the server ``via: "socks5"`` rules use, and the default route
    #: for rules without ``via`` when set.
    socks5: Socks5 | None = None
    #: ``max_connections``, checked before a PROXY header is read: the limiter can only admit
    #: a connection once the header has named its client, and until then these connections
    #: must still count against the global cap (or a flood of silent ones would escape it).
    max_connections: int = 50000
    #: The forwarder for each mode a rule can ask for (``rules[].mode``), after fallbacks;
    #: rules without ``mode`` use ``forwarder``.
    forwarders: Mapping[str, Forwarder] = attrs.Factory(dict)
    #: ``forwarding.mode``: what a rule without ``mode`` asks for (``forwarder`` serves it).
    default_mode: str = "auto"
    live: dict[int, ConnectionInfo] = attrs.Factory(dict)
    #: Numbers the connections (the access log's ``id``).
    ids: Iterator[int] = attrs.Factory(lambda: itertools.count(1))
    #: New QUIC flows dropped because the flow table was full (every ``quic`` listener).
    quic_flows_dropped: int = 0
    #: The live connections whose task has returned: a forwarder watches their end.
    handed_off: dict[int, HandedOff] = attrs.Factory(dict)
    #: Unparked whenever a connection ends (the drain waits on it).
    ended: trio.lowlevel.ParkingLot = attrs.Factory(trio.lowlevel.ParkingLot)


def log_refused_at_accept(
    peer: tuple[str, int] | tuple[str, int, int, int],
    listener: Listener,
    ctx: ConnectionContext,
    reason: str,
    error: str,
) -> None:
    """The access-log line of a connection the accept loop refused before any handler ran
    (every accepted connection gets one)."""
    info = ConnectionInfo(
        client=(str(ip_of(peer[0])), peer[1]),
        listener=listener.label,
        started_wall=time.time(),
        started=trio.current_time(),
        decision="deny",
        reason=reason,
        error=error,
        id=next(ctx.ids),
    )
    ctx.write_access_log(info.access_record(info.started))


async def handle_connection(
    stream: trio.SocketStream,
    peer: tuple[str, int] | tuple[str, int, int, int],
    listener: Listener,
    ctx: ConnectionContext,
) -> None:
    """Serve one client connection and close it; never raises for a bad client.

    The stages follow the README's tour: admit the client, read the name it asks for, route
    it, connect to the target, forward. Each refusal is a :class:`TrioSniError`, handled here
    once; cleanup is in ``finally``.

    ``peer`` is the address accept() returned. It stays known after the client has reset the
    connection (getpeername() then fails), so that connection too gets its log line.

    Resource handling: ``stream`` is always closed on return, and so is the upstream
    connection if one was opened. The limiter slot is always released.
    """
    client_ip = ip_of(peer[0])
    info = ConnectionInfo(
        client=(str(client_ip), peer[1]),
        listener=listener.label,
        started_wall=time.time(),
        started=trio.current_time(),
        id=next(ctx.ids),
    )

    def end(reason: str) -> None:
        """The connection's cleanup, once: in ``finally`` below, or called by the forwarder
        that the connection was handed off to. Plain syscalls only (a socket's close needs no
        checkpoint), so it runs the same in a cancelled scope or outside this task."""
        info.reason = info.reason or reason
        ctx.handed_off.pop(id(info), None)
        if acquired:
            ctx.limiter.release(client_ip)
        try:
            if upstream is not None:
                upstream.socket.close()
            stream.socket.close()
        finally:
            del ctx.live[id(info)]
            ctx.ended.unpark_all()
            ctx.write_access_log(info.access_record(trio.current_time()))

    ctx.live[id(info)] = info
    upstream: trio.SocketStream | None = None
    acquired = False
    handed_off = False  # the forwarder ends the connection (calls ``end``) after we return
    answer_http = False  # an http listener answers refusals once it has read the request
    # One total deadline for everything a client sends before it can be routed (the PROXY
    # header, then the ClientHello or request head): trickling bytes cannot hold a slot.
    total = ctx.hello_timeout
    deadline = trio.current_time() + total
    try:
        # Admit. A PROXY header comes before the client checks: its address is the client's.
        local: tuple[IPAddress, int] | None = None  # asked of the socket only if needed
        early = b""
        if listener.accept_proxy_protocol:
            _admit_proxy_sender(listener, client_ip, ctx)
            header, early = await read_first_bytes(
                stream, ProxyHeaderReader(), b"", PROXY_HEADER, MAX_V1_LENGTH, deadline, total
            )
            if header.source is not None and header.destination is not None:
                info.peer = info.client
                client_ip, local = header.source[0], header.destination
                info.client = (str(client_ip), header.source[1])
        admit_client(client_ip, ctx)
        acquired = True

        # Read the name. Every byte read is forwarded as it came, after the event's own.
        if listener.protocol == "http":
            answer_http = True
            request, after = await read_first_bytes(
                stream, HttpRequestReader(), early, REQUEST_HEAD, MAX_REQUEST_HEAD, deadline, total
            )
            name = info.sni = request.host
            first_bytes = request.raw + after
        else:
            max_size = ctx.max_hello_size
            hello, after = await read_first_bytes(
                stream, ClientHelloReader(max_size), early, CLIENT_HELLO, max_size, deadline, total
            )
            name = info.sni = hello.server_name
            info.alpn, info.hello_size = hello.alpn, hello.size
            first_bytes = hello.raw + after
        info.hello_time = trio.current_time() - info.started

        # Route.
        route = ctx.policy.decide(name, listener.target_port, info.alpn)
        if isinstance(route, Deny):
            raise NameRefused(route)
        info.rule, info.decision = route.rule.label, "allow"
        _set_qos_class(stream, route.rule.qos)

        # Connect.
        info.via = route.rule.via or ("socks5" if ctx.socks5 is not None else "direct")
        if info.via == "socks5":
            upstream, from_target = await _connect_via_socks5(route, ctx, info)
        else:
            upstream, from_target = await _connect_direct(route, ctx, info), b""
        if route.rule.proxy_protocol is not None:
            await _send_proxy_header(
                upstream,
                route.rule.proxy_protocol,
                (client_ip, info.client[1]),
                local or _endpoint(stream.socket.getsockname()),
            )
        answer_http = False  # from here on the target answers the client
        if from_target:
            # The SOCKS server passed on bytes the target sent before the client's first
            # bytes reached it; they belong to the client, before anything else.
            await stream.send_all(from_target)
            info.counters.to_client += len(from_target)

        # Forward.
        info.requested_mode = route.rule.mode or ctx.default_mode
        forwarder = ctx.forwarders.get(info.requested_mode, ctx.forwarder)
        info.mode = forwarder.mode
        outcome = await forwarder.forward(
            stream, upstream, first_bytes=first_bytes, counters=info.counters, on_end=end
        )
        if isinstance(outcome, str):
            info.reason = outcome
        else:
            handed_off = True
            ctx.handed_off[id(info)] = outcome
    except TrioSniError as exc:
        if info.decision == "pending" or isinstance(exc, DestinationRefused):
            info.decision = "deny"
        info.reason = exc.reason
        info.error = str(exc)
        if isinstance(exc, ProxyHeaderError):
            log.warning("%s: refused %s: %s", listener.label, format_endpoint(info.client), exc)
        if answer_http:
            await _send_http_error(stream, _http_status(exc))
        elif isinstance(exc, NameRefused) and listener.protocol == "tls":
            await _send_alert(stream, Alert.UNRECOGNIZED_NAME)
    except Exception as exc:  # a bug: log it, keep serving everyone else
        log.exception("internal error while serving %s", format_endpoint(info.client))
        info.decision = "error"
        info.reason = "internal_error"
        info.error = f"{type(exc).__name__}: {exc}"
    finally:
        if not handed_off:
            # Cancelled without a reason: the drain deadline passed, or a second stop signal.
            end(info.reason or "shutdown")


def _admit_proxy_sender(listener: Listener, sender: IPAddress, ctx: ConnectionContext) -> None:
    """Refuse, before its PROXY header is read, a sender the listener does not trust, or one
    connection too many (the limiter cannot count it until the header names its client)."""
    # ctx.live includes this connection and every one still waiting for its header.
    if len(ctx.live) > ctx.max_connections:
        raise Refused(
            Deny(
                "max_connections",
                f"the proxy has {len(ctx.live) - 1} connections, some still waiting "
                f"for their PROXY header (max_connections = {ctx.max_connections})",
            )
        )
    deny = check_proxy_sender(listener, sender)
    if deny is not None:
        raise Refused(deny)


def admit_client(client_ip: IPAddress, ctx: ConnectionContext) -> None:
    """Apply the client allow/deny lists, then take a slot from the client's limiter.

    On return the slot is the caller's to release.
    """
    deny = ctx.policy.check_client(client_ip) or ctx.limiter.acquire(client_ip, trio.current_time())
    if deny is not None:
        raise Refused(deny)


@attrs.frozen
class FirstBytes:
    """One thing a connection must send before it can be routed, as the errors name it."""

    #: Who sends it: ``"client"``, or ``"peer"`` for the load balancer's PROXY header.
    sender: str
    #: What it is called in messages.
    what: str
    #: The reader's error for one that a reset cut short.
    cut_short: type[TrioSniError]
    timeout: type[FirstBytesTimeout]


PROXY_HEADER: Final = FirstBytes(
    "peer", "PROXY protocol header", proxy_protocol.BadProxyHeaderError, ProxyHeaderTimeout
)
REQUEST_HEAD: Final = FirstBytes(
    "client", "request head", http_request.MalformedRequestError, RequestTimeout
)
CLIENT_HELLO: Final = FirstBytes("client", "ClientHello", MalformedHelloError, HelloTimeout)


async def read_first_bytes(
    stream: trio.SocketStream,
    reader: BufferedReader[EventT],
    early: bytes,
    first: FirstBytes,
    receive_size: int,
    deadline: float,
    total: float,
) -> tuple[EventT, bytes]:
    """Feed ``reader`` from the client until its event is complete, by ``deadline``.

    The one pump for the PROXY header, the request head and the ClientHello. ``early`` is
    what the previous reader read past its own event; one read takes at most ``receive_size``
    bytes (the PROXY header reads few: the client's bytes behind it are the next reader's);
    ``total`` is the deadline's length, for the timeout's message. Returns the event and the
    bytes read after it.
    """
    if early:
        reader.receive_data(early)
    try:
        # Fast path: the bytes are usually queued by the time the handler runs; read them
        # without a deadline scope or Trio's checkpoints (tests/shell/test_first_bytes.py runs
        # each case both ways).
        while (event := reader.next_event()) is NEED_DATA:
            data = _receive_queued(stream, receive_size)
            if data is None:
                break
            reader.receive_data(data)
        else:
            return event, reader.trailing_data
        with trio.move_on_at(deadline):
            while (event := reader.next_event()) is NEED_DATA:
                reader.receive_data(await stream.receive_some(receive_size))
            return event, reader.trailing_data
    except trio.BrokenResourceError as exc:
        if not reader.bytes_received:
            raise ClientReset(
                f"{first.sender} reset the connection before its {first.what}: {exc}"
            ) from None
        raise first.cut_short(
            f"{first.sender} reset the connection during the {first.what}: {exc}"
        ) from None
    raise first.timeout(total)


def _receive_queued(stream: trio.SocketStream, size: int) -> bytes | None:
    """What is queued on the socket now (``b""`` at its end), or None if nothing is; errors
    as :meth:`trio.SocketStream.receive_some` raises them. (read(2) on the non-blocking socket:
    no socket object to make on every connection's path.)"""
    try:
        return os.read(stream.socket.fileno(), size)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError as exc:
        raise trio.BrokenResourceError(f"socket connection broken: {exc}") from exc


def _set_qos_class(stream: trio.SocketStream, qos: str) -> None:
    """Give the client socket its rule's QoS class as its priority (``SO_PRIORITY``).

    The kernel copies a socket's priority into every packet it sends, whichever forwarder
    produced the bytes (copy, splice, or the sockhash redirect worker, which sends through
    this socket too), so the TC shaper can classify the traffic toward the client by it.
    Normal is the kernel's default, 0: nothing to set. Best effort: where the option does not
    exist, the class has no effect.
    """
    priority = QOS_PRIORITY[qos]
    option = getattr(socket, "SO_PRIORITY", None)
    if priority and option is not None:
        with contextlib.suppress(OSError):
            stream.socket.setsockopt(socket.SOL_SOCKET, option, priority)


def _endpoint(
    sockaddr: tuple[str, int] | tuple[str, int, int, int],
) -> tuple[IPAddress, int]:
    return ip_of(sockaddr[0]), sockaddr[1]


async def _send_proxy_header(
    upstream: trio.SocketStream,
    version: str,
    source: tuple[IPAddress, int],
    destination: tuple[IPAddress, int],
) -> None:
    """Tell the target who the client is, before any of the client's bytes."""
    assert version in ("v1", "v2")
    header = proxy_protocol.encode_header("v1" if version == "v1" else "v2", source, destination)
    try:
        await upstream.send_all(header)
    except trio.BrokenResourceError as exc:
        raise UpstreamError(
            f"the target reset the connection before the PROXY {version} header was sent: "
            f"{exc.__cause__ or exc}"
        ) from None


def _http_status(exc: TrioSniError) -> int:
    """The status an ``http`` listener answers a refusal with (before forwarding began)."""
    if isinstance(exc, HttpRequestError):
        return exc.status_hint
    if isinstance(exc, RequestTimeout):
        return 408
    if isinstance(exc, Refused | DestinationRefused):
        return 403
    return 502  # resolve, connect, SOCKS5 failures: the gateway could not reach the target


#: How long an ``http`` listener spends answering a refusal and draining the client's
#: remaining bytes before closing; closing with unread bytes would send an RST, which can
#: destroy the response before the client reads it.
HTTP_ERROR_LINGER = 1.0
#: The most bytes drained in that time (a client uploading a body is not waited for).
HTTP_ERROR_DRAIN = 64 * 1024


async def _send_http_error(stream: trio.SocketStream, status: int) -> None:
    """Answer with a minimal ``Connection: close`` response; best effort."""
    phrase = http.HTTPStatus(status).phrase
    body = f"{status} {phrase}\n".encode("ascii")
    response = (
        f"HTTP/1.1 {status} {phrase}\r\nContent-Type: text/plain\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode("ascii") + body
    with (
        trio.move_on_after(HTTP_ERROR_LINGER),
        contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
    ):
        await stream.send_all(response)
        await stream.send_eof()
        drained = 0
        while drained < HTTP_ERROR_DRAIN:
            data = await stream.receive_some(16384)
            if not data:
                break
            drained += len(data)


async def _connect_via_socks5(
    route: Route, ctx: ConnectionContext, info: ConnectionInfo
) -> tuple[trio.SocketStream, bytes]:
    """Reach the route's target through the SOCKS5 server.

    What the SOCKS server is asked for decides who guards against SSRF:

    - an IP literal (a rule's fixed ``target``): the SSRF guard checks it, as in direct mode;
    - a name, with ``remote_dns`` (the default): the name itself (ATYP domain). The SOCKS
      server resolves it, so the proxy never sees the address and cannot check it; keeping
      the SOCKS server away from private networks is its own ruleset's job (documented);
    - a name, without ``remote_dns``: resolved here, checked by the SSRF guard, and the
      checked addresses are sent (ATYP IPv4/IPv6), one CONNECT per address until one works.
    """
    socks5 = ctx.socks5
    assert socks5 is not None  # the config refuses via "socks5" without the section
    destinations: tuple[str | IPAddress, ...] = (ip_literal(route.host) or route.host,)
    if isinstance(destinations[0], str) and not socks5.remote_dns:
        destinations = await _resolve(route.host, ctx, info)
    if not isinstance(destinations[0], str):
        destinations = _guard_destinations(
            route, tuple(d for d in destinations if not isinstance(d, str)), ctx.own_addresses
        )
    started = trio.current_time()
    upstream, from_target, destination = await connect_via_socks5(
        socks5, destinations, route.port, timeout=ctx.connect_timeout
    )
    _connected(info, upstream, (str(destination), route.port), started)
    return upstream, from_target


async def _connect_direct(
    route: Route, ctx: ConnectionContext, info: ConnectionInfo
) -> trio.SocketStream:
    """Resolve the route's target here, let the SSRF guard check the addresses, connect."""
    addresses = await allowed_addresses(route, ctx, info)
    started = trio.current_time()
    upstream, address = await connect_to_addresses(
        addresses, route.port, timeout=ctx.connect_timeout
    )
    _connected(info, upstream, (str(address), route.port), started)
    return upstream


async def allowed_addresses(
    route: Route, ctx: ConnectionContext, info: ConnectionInfo
) -> tuple[IPAddress, ...]:
    """The route's target addresses (resolved here if it is a name) that the SSRF guard lets
    through; connect to exactly these."""
    literal = ip_literal(route.host)
    addresses = (literal,) if literal is not None else await _resolve(route.host, ctx, info)
    return _guard_destinations(route, addresses, ctx.own_addresses)


async def _resolve(
    name: str, ctx: ConnectionContext, info: ConnectionInfo
) -> tuple[IPAddress, ...]:
    """The target's addresses, the time it took in the access log's ``resolve_time``."""
    started = trio.current_time()
    addresses = await ctx.resolver.resolve(name)
    info.resolve_time = trio.current_time() - started
    return addresses


def _connected(
    info: ConnectionInfo, upstream: trio.SocketStream, target: tuple[str, int], started: float
) -> None:
    """Record the target reached, the time it took and the proxy's end of the connection."""
    info.connect_time = trio.current_time() - started
    info.target = target
    with contextlib.suppress(OSError):  # reset already: the forwarder will say so
        host, port = upstream.socket.getsockname()[:2]
        info.upstream_local = (host, port)


def _guard_destinations(
    route: Route,
    addresses: tuple[IPAddress, ...],
    own_addresses: Collection[tuple[IPAddress, int]],
) -> tuple[IPAddress, ...]:
    """The SSRF guard: keep only addresses the route may reach.

    The connector then connects to exactly these addresses, with no second lookup, so a DNS
    answer that changes between check and connect (rebinding) cannot slip through.

    Raises:
        DestinationRefused: when no address is left.
    """
    allowed: list[IPAddress] = []
    refused: list[str] = []
    liftable = False  # would allow_private on the rule let one of the refused addresses pass?
    for address in addresses:
        why = refusal_reason(
            address, own_addresses=own_addresses, port=route.port, allow_private=route.allow_private
        )
        if why is None:
            allowed.append(address)
        else:
            refused.append(f"{address} ({why})")
            liftable = liftable or (
                not route.allow_private
                and refusal_reason(
                    address, own_addresses=own_addresses, port=route.port, allow_private=True
                )
                is None
            )
    if not allowed:
        # Suggest allow_private only where it would help: not when the rule has it already,
        # nor for refusals it never lifts (the proxy's own address, multicast, reserved, ...).
        hint = '; add "allow_private": true to the rule if this is intended' if liftable else ""
        raise DestinationRefused(
            f"{route.host} resolves only to refused addresses: {', '.join(refused)}{hint}"
        )
    return tuple(allowed)


async def _send_alert(stream: trio.SocketStream, alert: Alert) -> None:
    """Tell the client why, in TLS terms, before closing; best effort."""
    with trio.move_on_after(1.0):
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.send_all(alert_record(alert))
