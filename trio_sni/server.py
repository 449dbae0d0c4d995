"""The proxy: listeners, accept loops, one handler task per connection, reload and drain.

Theory of operation: :meth:`Proxy.serve` owns two nurseries. The outer one holds the
connection tasks, the inner one the accept loops. :meth:`Proxy.shutdown` cancels only the
inner one, so the proxy stops accepting while live connections go on; they then get
``timeouts.drain`` seconds to finish before the outer nursery is cancelled. Connections handed
off to the kernel forwarder have no task (``ConnectionContext.handed_off``): they get the same
deadline, then are ended with reason ``shutdown`` on every path out of the proxy.
:meth:`Proxy.reload` swaps policy, limits, resolver settings and timeouts for new connections;
live connections keep what they started with.

Kernel features (:mod:`trio_sni.features`: kernel forwarding, the DNS cache, the XDP guard,
the TC shaper) are built with the proxy but load nothing until ``serve()`` starts them, once
the listeners are bound and before the first accept; ``serve()`` closes them on every path.

Start it as ``listeners = await nursery.start(proxy.serve)`` (tests and ``main`` share this
entry point).
"""

from __future__ import annotations

import errno
import ipaddress
import json
import logging
import math
import os
import resource
import socket
import struct
import sys
from collections.abc import Callable, Sequence
from typing import Any, TextIO

import trio

from ._fd import borrowed
from .connection import (
    ConnectionContext,
    Limiter,
    handle_connection,
    log_refused_at_accept,
)
from .features import (
    AccelerationStatus,
    BoundListeners,
    DnsCacheFeature,
    KernelFeature,
    SockhashFeature,
    TcFeature,
    XdpFeature,
    acceleration_of,
)
from .forward import CopyForwarder
from .metrics import ProxyMetrics
from .quic import QuicListener, open_quic_listener
from .resolver import Resolver
from .sansio.addresses import format_endpoint
from .sansio.config import Config, Listener, parse_host_port
from .sansio.policy import ClientLimiter, Policy
from .status import Answerer, StatusSource, serve_status, serve_status_on, unix_listener

log = logging.getLogger("trio_sni")

#: accept() errors that mean "out of resources for now": log, wait, retry (as trio's
#: serve_listeners does) instead of crashing or spinning at 100 % CPU (sniproxy #89).
ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
#: Connections accepted in a row before the accept loop lets other tasks run.
ACCEPT_BATCH = 16
#: How long to back off after such an error; long enough for a close elsewhere to free a slot.
ACCEPT_BACKOFF = 0.1
#: accept() errors about the one connection being accepted, which is gone (Linux passes its
#: pending network errors on as accept()'s errno; a firewall can refuse it with EPERM): accept
#: the next one, as trio's SocketListener.accept does.
ACCEPT_SKIP_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "ECONNABORTED",
        "EPERM",
        "EPROTO",
        "ENETDOWN",
        "ENOPROTOOPT",
        "EHOSTDOWN",
        "ENONET",
        "EHOSTUNREACH",
        "EOPNOTSUPP",
        "ENETUNREACH",
    )
    if hasattr(errno, name)  # ENONET is Linux's
)


class AccessLog:
    """Writes one JSON line per connection to stderr, stdout or a file (or nowhere)."""

    def __init__(self, destination: str | None) -> None:
        self.destination = destination
        self._stream, self._owned = self._open(destination)

    @staticmethod
    def _open(destination: str | None) -> tuple[TextIO | None, bool]:
        """The stream for ``destination`` and whether it is ours to close."""
        if destination is None:
            return None, False
        if destination == "stderr":
            return sys.stderr, False
        if destination == "stdout":
            return sys.stdout, False
        # Line-buffered: each record is one small write; no thread needed.
        return open(destination, "a", buffering=1, encoding="utf-8"), True

    def reopen(self, destination: str | None) -> None:
        """Write to ``destination`` from now on: the same file opened again after logrotate
        renamed it (SIGUSR1), or another one (a reload). If it cannot be opened, this raises
        ``OSError`` and the log keeps its current file."""
        stream, owned = self._open(destination)
        self.close()
        self.destination, self._stream, self._owned = destination, stream, owned

    def write(self, record: dict[str, object]) -> None:
        if self._stream is not None:
            self._stream.write(json.dumps(record, separators=(",", ":")) + "\n")
            self._stream.flush()

    def close(self) -> None:
        if self._owned and self._stream is not None:
            self._stream.close()
        self._stream = None


class Proxy:
    """An SNI proxy serving one configuration (reloadable) until shut down."""

    def __init__(
        self,
        config: Config,
        *,
        access_log: Callable[[dict[str, object]], None] | None = None,
        inherited: Sequence[socket.socket] = (),
        worker: int | None = None,
        status_socket: str | None = None,
        limiter: Limiter | None = None,
    ) -> None:
        """``inherited``: listening sockets this process was started with
        (:func:`trio_sni.handover.take_inherited_sockets`); a listener whose address one of
        them has serves on it instead of binding, the others are closed at start. ``worker``:
        this proxy is that worker of a supervisor (its access-log lines say which).
        ``status_socket``: serve the status endpoint on this abstract unix socket (a worker's,
        for its supervisor) instead of ``status.listen``. ``limiter``: the per-client limits
        (a worker's are shared with the others), else this process's own."""
        self.config = config
        self._worker = worker
        self._status_socket = status_socket
        self._inherited = list(inherited)
        _warn_about_open_proxy_protocol(config)
        self._access_log = AccessLog(config.log.access_log) if access_log is None else None
        self.context = ConnectionContext(
            policy=Policy.from_config(config),
            limiter=ClientLimiter(config.limits, config.max_connections)
            if limiter is None
            else limiter,
            resolver=Resolver(config.resolver, timeout=config.timeouts.resolve),
            # Until serve() has chosen the forwarding plan (the sockhash feature's start).
            forwarder=CopyForwarder(
                buffer_size=config.forwarding.buffer_size, idle_timeout=config.timeouts.idle
            ),
            max_hello_size=config.limits.max_client_hello_size,
            hello_timeout=config.timeouts.client_hello,
            connect_timeout=config.timeouts.connect,
            own_addresses=(),
            write_access_log=access_log or self._access_log.write,  # type: ignore[union-attr]
            socks5=config.socks5,
            max_connections=config.max_connections,
            default_mode=config.forwarding.mode,
        )
        self._accepting: trio.CancelScope | None = None
        self._shutdown_requested = trio.Event()
        self.listeners: list[trio.SocketListener] = []
        #: The ``quic`` listeners (UDP), once bound.
        self.quic_listeners: list[QuicListener] = []
        # Metrics count each finished connection from its access-log record.
        self.metrics = ProxyMetrics(self.context, acceleration=self.acceleration_status)
        self.context.write_access_log = self.metrics.wrap(self.context.write_access_log)
        if worker is not None:
            write = self.context.write_access_log

            def write_with_worker(record: dict[str, object]) -> None:
                record["worker"] = worker
                write(record)

            self.context.write_access_log = write_with_worker
        write_record = self.context.write_access_log

        def write_and_debug(record: dict[str, object]) -> None:
            write_record(record)
            if log.isEnabledFor(logging.DEBUG):  # log.level "debug": each connection's end
                log.debug("connection ended: %s", json.dumps(record, separators=(",", ":")))

        self.context.write_access_log = write_and_debug
        self.status_listeners: list[trio.SocketListener] = []
        #: Kernel forwarding: starting it chooses the forwarding plan.
        self.forwarding = SockhashFeature(config)
        #: The kernel features, in ``/ebpf/status`` order; nothing is loaded before serve()
        #: starts them, once the listeners are bound.
        self.features: tuple[KernelFeature, ...] = (
            self.forwarding,
            DnsCacheFeature(config, self.context.resolver),
            XdpFeature(config),
            TcFeature(config),
        )

    async def serve(
        self, *, task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Open the listeners, report them through ``task_status``, serve until shutdown.

        With ``status.listen`` set (or, for a supervised worker, its private status socket),
        the status endpoint is bound first (so ``/readyz`` can say "not ready" until the
        listeners are bound) and runs until the proxy has drained.
        """
        try:
            if self.config.status.listen is None and self._status_socket is None:
                await self._serve_proxy(task_status=task_status)
                return
            async with trio.open_nursery() as status:
                if self._status_socket is not None:
                    listeners = [await unix_listener(self._status_socket)]
                    self.status_listeners = await status.start(serve_status_on, self, listeners)
                else:
                    assert self.config.status.listen is not None
                    host, port = parse_host_port(self.config.status.listen)
                    self.status_listeners = await start_status(
                        status, self, host, port, self._inherited
                    )
                await self._serve_proxy(task_status=task_status)
                status.cancel_scope.cancel()  # the proxy has drained: nothing left to report
        finally:
            for feature in reversed(self.features):
                feature.close()  # what each one loaded and attached, on every path
            if self._access_log is not None:
                self._access_log.close()  # also when the status port was busy (idempotent)

    async def _serve_proxy(
        self, *, task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        reserve: ReserveFd | None = None
        drain_deadline = math.inf
        try:
            async with trio.open_nursery() as connections:
                try:
                    async with trio.open_nursery() as accepting:
                        self._accepting = accepting.cancel_scope
                        if self._shutdown_requested.is_set():
                            accepting.cancel_scope.cancel()
                        specs = self.config.effective_listeners
                        pairs = await open_listeners(
                            tuple(s for s in specs if s.protocol != "quic"), self._inherited
                        )
                        self.listeners = [listener for listener, _ in pairs]
                        quic = await self._open_quic_listeners(specs)
                        self.context.own_addresses = _own_addresses(
                            [listener.socket for listener in self.listeners]
                            + [q.sock for q in quic]
                        )
                        self._start_features(
                            [(lst.socket.getsockname()[1], spec) for lst, spec in pairs]
                            + [(q.sock.getsockname()[1], q.spec) for q in quic]
                        )
                        reserve = ReserveFd()
                        for listener, spec in pairs:
                            accepting.start_soon(
                                self._accept_loop, listener.socket, spec, connections, reserve
                            )
                        for quic_listener in quic:
                            accepting.start_soon(quic_listener.serve, connections)
                        task_status.started(self.listeners)
                finally:
                    with trio.CancelScope(shield=True):  # close all, even when cancelled
                        for listener in self.listeners:
                            await trio.aclose_forcefully(listener)
                    if reserve is not None:
                        reserve.close()
                live = len(self.context.live)
                if live:
                    log.info(
                        "stopped accepting; draining %d connection(s) for up to %g s",
                        live,
                        self.config.timeouts.drain,
                    )
                    drain_deadline = trio.current_time() + self.config.timeouts.drain
                    connections.cancel_scope.deadline = drain_deadline
            # The connection tasks are done; the connections handed off to the kernel
            # forwarder get the same deadline.
            with trio.move_on_at(drain_deadline):
                while self.context.handed_off:
                    await self.context.ended.park()
        finally:
            for handed_off in list(self.context.handed_off.values()):
                handed_off.end("shutdown")  # past the deadline, or cancelled
            if self._access_log is not None:
                self._access_log.close()
        log.info("proxy stopped")

    async def _open_quic_listeners(self, specs: tuple[Listener, ...]) -> list[QuicListener]:
        """A :class:`QuicListener` per ``quic`` listener, its UDP socket bound (all or none)."""
        opened: list[QuicListener] = []
        try:
            for spec in specs:
                if spec.protocol == "quic":
                    sock = await open_quic_listener(spec)
                    idle = self.config.timeouts.quic_idle
                    opened.append(QuicListener(sock, spec, self.context, idle))
        except BaseException:
            for listener in opened:
                listener.sock.close()
            raise
        self.quic_listeners = opened
        return opened

    def shutdown(self) -> None:
        """Stop accepting; live connections get the drain deadline to finish."""
        self._shutdown_requested.set()
        if self._accepting is not None:
            self._accepting.cancel()

    def not_ready_reason(self) -> str | None:
        """Why ``/readyz`` answers 503, or None when the listeners are bound and serving."""
        if self._shutdown_requested.is_set():
            return "shutting down: not accepting new connections"
        if not self.listeners or any(lst.socket.fileno() == -1 for lst in self.listeners):
            return "listeners not bound yet"
        return None

    def _start_features(self, listeners: BoundListeners) -> None:
        """Start every kernel feature, then hand connections to the chosen forwarders.

        Raises:
            AccelerationUnavailable: ``fallback_mode`` is ``"none"`` and a forwarding mode the
                config asks for is unavailable.
        """
        for feature in self.features:
            feature.start(listeners)
        plan = self.forwarding.plan
        self.context.forwarder = plan.forwarder
        self.context.forwarders = plan.by_mode

    def acceleration_status(self) -> AccelerationStatus:
        """Kernel feature states, reasons, maps and counters for ``/ebpf/status`` and metrics:
        what each started feature reports (counters read now: one syscall each, at scrape
        time only), the config's switches for the others."""
        return acceleration_of(self.config, self.features)

    def reopen_access_log(self, destination: str | None = None) -> None:
        """Open the access log's file again (SIGUSR1, after logrotate renamed it), or
        ``destination`` (a reload that changed ``log.access_log``). Logged either way; a file
        that cannot be opened is reported and the current one kept."""
        if self._access_log is None:
            return
        old = self._access_log.destination
        new = old if destination is None else destination
        try:
            self._access_log.reopen(new)
        except OSError as exc:
            log.error("access log: cannot open %s (%s); still writing to %s", new, exc, old)
            return
        if new == old:
            log.info("access log: reopened %s", new)
        else:
            log.info("access log: now %s (was %s)", new, old)

    def reload(self, config: Config) -> None:
        """Apply a new, already validated config to new connections.

        Listeners and the forwarding mode need a restart; a change to them is logged and
        ignored rather than half-applied.
        """
        if config.effective_listeners != self.config.effective_listeners:
            log.warning("reload: listener changes take effect only after a restart")
        if config.status != self.config.status:
            log.warning("reload: status.listen changes take effect only after a restart")
        if (config.log.format, config.log.file) != (self.config.log.format, self.config.log.file):
            log.warning("reload: log.format and log.file changes take effect only after a restart")
        ctx = self.context
        ctx.policy = Policy.from_config(config)
        ctx.limiter.reconfigure(config.limits, config.max_connections)
        ctx.resolver.reconfigure(config.resolver, timeout=config.timeouts.resolve)
        ctx.max_hello_size = config.limits.max_client_hello_size
        ctx.hello_timeout = config.timeouts.client_hello
        ctx.connect_timeout = config.timeouts.connect
        ctx.socks5 = config.socks5
        ctx.max_connections = config.max_connections
        for feature in self.features:
            feature.reload(config)  # XDP lists and TC rates live; the rest after a restart
        if config.log.access_log != self.config.log.access_log:
            self.reopen_access_log(config.log.access_log)
        self.config = config
        log.info("reload: new policy, limits, resolver settings and timeouts in effect")

    async def _accept_loop(
        self,
        listening: trio.socket.SocketType,
        spec: Listener,
        connections: trio.Nursery,
        reserve: ReserveFd,
    ) -> None:
        """Accept on the listening socket itself, not through trio's SocketListener, which
        drops the address accept() returns: a client that resets before its handler runs
        can no longer be asked for it (getpeername fails), and its access-log line needs it.

        accept() is called directly while clients wait, up to :data:`ACCEPT_BATCH` in a row
        before other tasks get a turn, and the loop waits for the socket only when none
        does: no checkpoint and scheduler pass per connection (bench/bench_setup_cost.py)."""
        with borrowed(listening) as raw:
            await self._accept_from(raw, listening, spec, connections, reserve)

    async def _accept_from(
        self,
        raw: socket.socket,
        listening: trio.socket.SocketType,
        spec: Listener,
        connections: trio.Nursery,
        reserve: ReserveFd,
    ) -> None:
        last_fd = -1
        batch = 0
        fd_limit = _fd_limit()  # not per connection: again whenever the loop has waited
        while True:
            if batch >= ACCEPT_BATCH:
                batch = 0
                await trio.lowlevel.checkpoint()
            batch += 1
            if self._worker is not None and _near_fd_limit(last_fd, fd_limit):
                # Workers share the listening socket: a full one leaves new clients to the
                # others (the kernel does not spread accepts evenly) until one of its own
                # connections ends, rather than refusing them (fd_limit).
                await self.context.ended.park()
                last_fd = -1
            try:
                conn, peer = accept_now(raw)
            except (BlockingIOError, InterruptedError):
                batch = 0
                await trio.lowlevel.wait_readable(listening)
                fd_limit = _fd_limit()  # a limit raised meanwhile (prlimit) counts
                continue
            except OSError as exc:
                if exc.errno in ACCEPT_SKIP_ERRNOS:
                    continue
                if exc.errno == errno.EMFILE and reserve.ready():
                    if not reserve.refuse_one(listening, spec, self.context):
                        # Linux takes the fd before it looks for a client: nobody waits. Try
                        # again when someone does, rather than every ACCEPT_BACKOFF.
                        await trio.lowlevel.wait_readable(listening)
                    continue
                if exc.errno in ACCEPT_CAPACITY_ERRNOS:
                    log.error(
                        "accept on %s: %s; retrying in %g s",
                        spec.label,
                        errno.errorcode.get(exc.errno or 0, exc.errno),
                        ACCEPT_BACKOFF,
                    )
                    await trio.sleep(ACCEPT_BACKOFF)
                    continue
                raise
            last_fd = conn.fileno()
            stream = trio.SocketStream(trio.socket.from_stdlib_socket(conn))
            connections.start_soon(handle_connection, stream, peer, spec, self.context)


def accept_now(listening: socket.socket) -> tuple[socket.socket, Any]:
    """One accept() on the non-blocking listening socket (BlockingIOError: nobody waits)."""
    return listening.accept()


#: The fds a worker keeps free for everything else (the upstream socket of the connection it
#: accepts, the splice pipe pool, status and log files, ...) before it leaves new connections
#: to the other workers.
FD_HEADROOM = 256


def _fd_limit() -> int:
    """The process's soft fd limit now (an operator may raise it with prlimit)."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _near_fd_limit(last_fd: int, fd_limit: int) -> bool:
    """Whether the fd accept() returned last is within :data:`FD_HEADROOM` of the process's
    limit. The kernel hands out the lowest free fd, so the newest one's number tells how many
    are open, without counting them."""
    return last_fd + FD_HEADROOM >= fd_limit


#: The access log's reason for a client refused because the proxy is out of file descriptors.
FD_LIMIT_REASON = "fd_limit"


class ReserveFd:
    """One file descriptor held in reserve for the moment the process reaches its fd limit.

    accept() then fails with EMFILE and the client waits in the listen backlog until it gives
    up. Giving the reserve up for a moment lets the proxy accept that client and refuse it at
    once (an RST), with an access-log line and a logged reason, then take the reserve back.
    """

    def __init__(self) -> None:
        self._fd = self._open()
        self._last_warning = -math.inf

    @staticmethod
    def _open() -> int:
        try:
            return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return -1

    def ready(self) -> bool:
        """Whether the reserve is held (taken again if an earlier attempt lost it)."""
        if self._fd == -1:
            self._fd = self._open()
        return self._fd != -1

    def refuse_one(
        self, listening: trio.socket.SocketType, spec: Listener, ctx: ConnectionContext
    ) -> bool:
        """Accept one waiting client and reset it; False if no client was waiting. Call only
        when :meth:`ready`."""
        os.close(self._fd)
        self._fd = -1
        try:
            with borrowed(listening) as raw:
                try:
                    conn, peer = raw.accept()
                except OSError:
                    return False
            with conn:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        finally:
            self._fd = self._open()
        error = (
            "the proxy is out of file descriptors (EMFILE): refused at once; raise its fd "
            "limit (LimitNOFILE, ulimit -n) or lower max_connections"
        )
        now = trio.current_time()
        if now - self._last_warning >= 1.0:  # at most one line a second while it lasts
            self._last_warning = now
            log.warning("%s: %s", spec.label, error)
        log_refused_at_accept(peer, spec, ctx, FD_LIMIT_REASON, error)
        return True

    def close(self) -> None:
        if self._fd != -1:
            os.close(self._fd)
            self._fd = -1


def _warn_about_open_proxy_protocol(config: Config) -> None:
    for spec in config.effective_listeners:
        if spec.accept_proxy_protocol and not spec.proxy_protocol_from:
            log.warning(
                "listener %s accepts PROXY headers from anyone who reaches it, who can "
                "then claim any client address: set its proxy_protocol_from to your load "
                "balancers' networks",
                spec.label,
            )


#: bind() errors that mean the host does not have the address (an ``optional`` listener's
#: is then skipped): not assigned here, or its family (IPv6) turned off.
ADDRESS_NOT_HERE = frozenset({errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT})


async def open_listeners(
    specs: tuple[Listener, ...], inherited: list[socket.socket]
) -> list[tuple[trio.SocketListener, Listener]]:
    """Bind every listener or none (a partial bind would serve a config nobody wrote).

    A listener whose addresses are among the ``inherited`` sockets' serves on those instead
    (taken from the list); whatever is left in the list is closed.
    """
    opened: list[tuple[trio.SocketListener, Listener]] = []
    try:
        for spec in specs:
            adopted = await _adopt_inherited(spec, inherited)
            if adopted:
                opened.extend((listener, spec) for listener in adopted)
                continue
            try:
                listeners = await trio.open_tcp_listeners(spec.port, host=spec.host)
            except OSError as exc:
                host = f"[{spec.host}]" if ":" in spec.host else spec.host
                if spec.optional and exc.errno in ADDRESS_NOT_HERE:
                    log.warning(
                        "listener %s: %s:%d: %s; it is optional: serving without it",
                        spec.label,
                        host,
                        spec.port,
                        exc.strerror,
                    )
                    continue
                raise OSError(exc.errno, f"{host}:{spec.port}: {exc.strerror}") from exc
            opened.extend((listener, spec) for listener in listeners)
        if specs and not opened:
            raise OSError(errno.EADDRNOTAVAIL, "no listener could be bound on this host")
    except BaseException:
        with trio.CancelScope(shield=True):
            for listener, _ in opened:
                await trio.aclose_forcefully(listener)
        raise
    finally:
        for sock in inherited:
            log.warning(
                "inherited listening socket %s matches no listener of the config: closed",
                format_endpoint(sock.getsockname()),
            )
            sock.close()
        inherited.clear()
    return opened


async def start_status(
    nursery: trio.Nursery,
    answers: StatusSource | Answerer,
    host: str,
    port: int,
    inherited: list[socket.socket],
) -> list[trio.SocketListener]:
    """Serve the status endpoint in ``nursery`` on the inherited socket bound to
    ``host:port`` (taken from the list), or on a newly bound one: a new process started by a
    handover gets the status socket too, so it can serve it while the old one still runs."""
    adopted = await _adopt_inherited(Listener(host=host, port=port), inherited)
    if adopted:
        started: list[trio.SocketListener] = await nursery.start(serve_status_on, answers, adopted)
    else:
        started = await nursery.start(serve_status, answers, host, port)
    return started


async def _adopt_inherited(
    spec: Listener, inherited: list[socket.socket]
) -> list[trio.SocketListener]:
    """The inherited sockets bound where ``spec`` would bind (every address its host resolves
    to, as trio.open_tcp_listeners binds them; any port for ``port: 0``), taken from the list."""
    if not inherited:
        return []
    infos = await trio.socket.getaddrinfo(
        spec.host, spec.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    wanted = {(ipaddress.ip_address(info[4][0]), spec.port) for info in infos}
    adopted = []
    for sock in list(inherited):
        address, port = sock.getsockname()[:2]
        # port 0 in the config: whatever port the inherited socket has
        if (ipaddress.ip_address(address), port if spec.port else 0) in wanted:
            inherited.remove(sock)
            log.info(
                "%s: serving on the inherited socket %s",
                spec.label,
                format_endpoint((address, port)),
            )
            adopted.append(trio.SocketListener(trio.socket.from_stdlib_socket(sock)))
    return adopted


def _own_addresses(
    sockets: list[trio.socket.SocketType],
) -> tuple[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int], ...]:
    """The (address, port) pairs the proxy listens on, for the SSRF guard's loop check."""
    own = []
    for sock in sockets:
        host, port = sock.getsockname()[:2]
        own.append((ipaddress.ip_address(host), port))
    return tuple(own)
