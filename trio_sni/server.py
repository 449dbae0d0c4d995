"""The proxy: listeners, accept loops, one handler task per connection, reload and drain.

Theory of operation: :meth:`Proxy.serve` owns two nurseries. The outer one holds the
connection tasks, the inner one the accept loops. :meth:`Proxy.shutdown` cancels only the
inner one, so the proxy stops accepting while live connections go on; they then get
``timeouts.drain`` seconds to finish before the outer nursery is cancelled. :meth:`Proxy.reload`
swaps policy, limits, resolver settings and timeouts for new connections; live connections
keep what they started with.

Start it as ``listeners = await nursery.start(proxy.serve)`` (tests and ``main`` share this
entry point).
"""

from __future__ import annotations

import errno
import ipaddress
import json
import logging
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, TextIO

import trio

from .accel.dns_cache import SharedCacheUnavailable, SharedDnsCache
from .connection import ConnectionContext, handle_connection
from .edge_guard import EdgeGuard
from .forward import Mode, choose_forwarder
from .metrics import ProxyMetrics
from .resolver import Resolver
from .sansio.config import Config, Listener, parse_host_port
from .sansio.policy import ClientLimiter, Policy
from .status import (
    AccelerationStatus,
    FeatureReport,
    MapStatus,
    acceleration_from_config,
    serve_status,
)

if TYPE_CHECKING:
    from .accel import TcShaper

log = logging.getLogger("trio_sni")

#: accept() errors that mean "out of resources for now": log, wait, retry (as trio's
#: serve_listeners does) instead of crashing or spinning at 100 % CPU (sniproxy #89).
ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
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
        self._stream: TextIO | None
        self._owned = False
        if destination is None:
            self._stream = None
        elif destination == "stderr":
            self._stream = sys.stderr
        elif destination == "stdout":
            self._stream = sys.stdout
        else:
            # Line-buffered: each record is one small write; no thread needed.
            self._stream = open(destination, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
            self._owned = True

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
    ) -> None:
        self.config = config
        plan = choose_forwarder(config)
        log.info("forwarding mode: %s (%s)", plan.forwarder.mode, plan.why)
        for asked, used, why in plan.fallbacks:
            if asked != config.forwarding.mode:  # the default's reason is in the line above
                log.warning("forwarding mode %s (asked by rules): %s (%s)", asked, used, why)
        for spec in config.effective_listeners:
            if spec.accept_proxy_protocol and not spec.proxy_protocol_from:
                log.warning(
                    "listener %s accepts PROXY headers from anyone who reaches it, who can "
                    "then claim any client address: set its proxy_protocol_from to your load "
                    "balancers' networks",
                    spec.label,
                )
        self._forwarding_why = plan.why  # for /ebpf/status: why sockmap is not active
        self._plan = plan  # closed when serve() ends: the kernel forwarder holds BPF objects
        self._access_log = AccessLog(config.log.access_log) if access_log is None else None
        self.context = ConnectionContext(
            policy=Policy.from_config(config),
            limiter=ClientLimiter(config.limits, config.max_connections),
            resolver=Resolver(config.resolver, timeout=config.timeouts.resolve),
            forwarder=plan.forwarder,
            max_hello_size=config.limits.max_client_hello_size,
            hello_timeout=config.timeouts.client_hello,
            connect_timeout=config.timeouts.connect,
            own_addresses=(),
            write_access_log=access_log or self._access_log.write,  # type: ignore[union-attr]
            socks5=config.socks5,
            max_connections=config.max_connections,
            forwarders=plan.by_mode,
            default_mode=config.forwarding.mode,
        )
        self._accepting: trio.CancelScope | None = None
        self._shutdown_requested = trio.Event()
        self.listeners: list[trio.SocketListener] = []
        # Metrics count each finished connection from its access-log record.
        self.metrics = ProxyMetrics(self.context, acceleration=self.acceleration_status)
        self.context.write_access_log = self.metrics.wrap(self.context.write_access_log)
        self.status_listeners: list[trio.SocketListener] = []
        #: feature name (``dns_cache``, ``xdp``, ``tc``) -> how that running feature reports
        #: itself to ``/ebpf/status`` and the metrics; filled by whatever starts the feature.
        self.feature_reporters: dict[str, Callable[[], FeatureReport]] = {}
        #: The XDP guard, started once the listeners are bound (their ports are guarded).
        self.edge_guard: EdgeGuard | None = None
        #: The running TC shaper (``ebpf.tc``), started once the listening ports are known.
        self.tc_shaper: TcShaper | None = None
        self._dns_cache: SharedDnsCache | None = None

    async def serve(
        self, *, task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Open the listeners, report them through ``task_status``, serve until shutdown.

        With ``status.listen`` set, the status endpoint is bound first (so ``/readyz`` can
        say "not ready" until the listeners are bound) and runs until the proxy has drained.
        """
        try:
            self._open_dns_cache()
            if self.config.status.listen is None:
                await self._serve_proxy(task_status=task_status)
                return
            host, port = parse_host_port(self.config.status.listen)
            async with trio.open_nursery() as status:
                self.status_listeners = await status.start(serve_status, self, host, port)
                await self._serve_proxy(task_status=task_status)
                status.cancel_scope.cancel()  # the proxy has drained: nothing left to report
        finally:
            self._close_dns_cache()
            self._plan.close()  # the kernel forwarder's BPF objects, on every path
            if self.edge_guard is not None:
                self.edge_guard.close()  # detaches the XDP program
            if self.tc_shaper is not None:
                self.tc_shaper.close()  # detaches the TC shaper
            if self._access_log is not None:
                self._access_log.close()  # also when the status port was busy (idempotent)

    def _open_dns_cache(self) -> None:
        """Put the pinned BPF map behind the resolver's cache, or say once why not.

        Whatever happens is what ``/ebpf/status`` reports for ``dns_cache``.
        """
        ebpf = self.config.ebpf
        settings = ebpf.dns_cache
        if not ebpf.enabled or not settings.enabled:
            why = "ebpf.enabled is false" if not ebpf.enabled else "ebpf.dns_cache.enabled is false"
            log.info("DNS cache: in-process tier only (%s)", why)
            self.feature_reporters["dns_cache"] = lambda: FeatureReport("disabled", why)
            return
        try:
            cache = SharedDnsCache.open(settings.pin_path, settings.max_entries)
        except SharedCacheUnavailable as exc:
            reason = str(exc)
            log.warning(
                "DNS cache: in-process tier only; the shared BPF map is unavailable: %s", reason
            )
            self.feature_reporters["dns_cache"] = lambda: FeatureReport("unavailable", reason)
            return
        if cache.replaced is not None:
            log.warning(
                "DNS cache: replaced incompatible pinned state at %s (%s)",
                cache.pin_path,
                cache.replaced,
            )
        log.info(
            "DNS cache: in-process tier, then the BPF map pinned at %s (max %d names)",
            cache.pin_path,
            cache.max_entries,
        )
        self._dns_cache = cache
        self.context.resolver.use_shared_cache(cache)
        self.feature_reporters["dns_cache"] = lambda: _dns_cache_report(cache)

    def _close_dns_cache(self) -> None:
        if self._dns_cache is not None:
            self.feature_reporters.pop("dns_cache", None)  # its maps are closed: not serving
            self.context.resolver.use_shared_cache(None)
            self._dns_cache.close()
            self._dns_cache = None

    async def _serve_proxy(
        self, *, task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        try:
            async with trio.open_nursery() as connections:
                try:
                    async with trio.open_nursery() as accepting:
                        self._accepting = accepting.cancel_scope
                        if self._shutdown_requested.is_set():
                            accepting.cancel_scope.cancel()
                        pairs = await _open_listeners(self.config.effective_listeners)
                        self.listeners = [listener for listener, _ in pairs]
                        self.context.own_addresses = _own_addresses(self.listeners)
                        if self.config.ebpf.enabled and self.config.ebpf.xdp.enabled:
                            self.edge_guard = EdgeGuard.start(self.config, pairs)
                            self.feature_reporters["xdp"] = self.edge_guard.report
                        self._start_tc()
                        for listener, spec in pairs:
                            accepting.start_soon(
                                self._accept_loop, listener.socket, spec, connections
                            )
                        task_status.started(self.listeners)
                finally:
                    with trio.CancelScope(shield=True):  # close all, even when cancelled
                        for listener in self.listeners:
                            await trio.aclose_forcefully(listener)
                live = len(self.context.live)
                if live:
                    log.info(
                        "stopped accepting; draining %d connection(s) for up to %g s",
                        live,
                        self.config.timeouts.drain,
                    )
                    connections.cancel_scope.deadline = (
                        trio.current_time() + self.config.timeouts.drain
                    )
        finally:
            if self._access_log is not None:
                self._access_log.close()
        log.info("proxy stopped")

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

    def acceleration_status(self) -> AccelerationStatus:
        """Kernel feature states, reasons, maps and counters for ``/ebpf/status`` and metrics.

        The config and the chosen forwarder decide the states; the kernel forwarder, when
        it runs, adds its sockhash fill and its counters (read now: one syscall per
        counter, at scrape time only).
        """
        return acceleration_from_config(
            self.config,
            forwarding_mode=self.context.forwarder.mode,
            forwarding_why=self._forwarding_why,
            sockmap_report=self._sockmap_report(),
            reports={name: report() for name, report in self.feature_reporters.items()},
        )

    def _sockmap_report(self) -> tuple[int, dict[str, int]] | None:
        """``(sockets in the sockhash, counters)`` when the kernel forwarder runs."""
        kernel = self._plan.statistics(Mode.KERNEL)
        if kernel is None:
            return None
        counters = dict(kernel.data_plane)
        counters["fallbacks"] = kernel.fallbacks
        counters["userspace_directions"] = kernel.userspace_directions
        return kernel.sockhash_sockets, counters

    def _start_tc(self) -> None:
        """Attach the TC shaper (``ebpf.tc``) for the bound listening ports, or say once why
        not; a shaper that cannot start never stops the proxy."""
        tc = self.config.ebpf.tc
        if not (self.config.ebpf.enabled and tc.enabled) or self.tc_shaper is not None:
            return
        ports = {listener.socket.getsockname()[1] for listener in self.listeners}
        try:
            from .accel import LoaderError, TcShaper
        except ImportError as exc:  # e.g. cffi missing on this platform
            self._tc_unavailable(f"cannot import the BPF loader: {exc}")
            return
        try:
            self.tc_shaper = TcShaper.start(tc, ports)
        except (OSError, LoaderError) as exc:
            self._tc_unavailable(f"attaching tc_shaper.bpf.o to {tc.interface} failed: {exc}")
            return
        log.info(
            "TC shaper on %s egress: %s bit/s per client (high %s, bulk %s), buckets of %d "
            "bytes or 250 ms of their rate",
            tc.interface,
            tc.per_client_bps or "no cap",
            tc.high_bps or "no cap",
            tc.bulk_bps or "no cap",
            tc.burst_bytes,
        )
        self.feature_reporters["tc"] = self._tc_report

    def _tc_unavailable(self, reason: str) -> None:
        log.warning("TC shaping unavailable: %s", reason)
        self.feature_reporters["tc"] = lambda: FeatureReport("unavailable", reason)

    def _tc_report(self) -> FeatureReport:
        assert self.tc_shaper is not None
        shaper = self.tc_shaper
        buckets = MapStatus(shaper.bucket_count(), shaper.buckets.spec.max_entries)
        return FeatureReport("active", maps={"tc_buckets": buckets}, counters=shaper.counters())

    def reload(self, config: Config) -> None:
        """Apply a new, already validated config to new connections.

        Listeners and the forwarding mode need a restart; a change to them is logged and
        ignored rather than half-applied.
        """
        if config.effective_listeners != self.config.effective_listeners:
            log.warning("reload: listener changes take effect only after a restart")
        if config.status != self.config.status:
            log.warning("reload: status.listen changes take effect only after a restart")
        ctx = self.context
        ctx.policy = Policy.from_config(config)
        ctx.limiter.reconfigure(config.limits, config.max_connections)
        ctx.resolver.reconfigure(config.resolver, timeout=config.timeouts.resolve)
        ctx.max_hello_size = config.limits.max_client_hello_size
        ctx.hello_timeout = config.timeouts.client_hello
        ctx.connect_timeout = config.timeouts.connect
        ctx.socks5 = config.socks5
        ctx.max_connections = config.max_connections
        if self.edge_guard is not None:
            self.edge_guard.reload(config)
        elif config.ebpf.xdp.enabled and not self.config.ebpf.xdp.enabled:
            log.warning("reload: ebpf.xdp.enabled takes effect only after a restart")
        new_tc, old_tc = config.ebpf.tc, self.config.ebpf.tc
        if (new_tc.enabled, new_tc.interface) != (old_tc.enabled, old_tc.interface):
            log.warning("reload: ebpf.tc.enabled and .interface take effect after a restart")
        if self.tc_shaper is not None:
            try:
                self.tc_shaper.configure(new_tc)  # rates, burst and exempt list, live
            except OSError as exc:  # a BPF map update refused: the old caps may stay in part
                log.error("reload: updating the TC shaper's maps failed: %s", exc)
        self.config = config
        log.info("reload: new policy, limits, resolver settings and timeouts in effect")

    async def _accept_loop(
        self, listening: trio.socket.SocketType, spec: Listener, connections: trio.Nursery
    ) -> None:
        """Accept on the listening socket itself, not through trio's SocketListener, which
        drops the address accept() returns: a client that resets before its handler runs
        can no longer be asked for it (getpeername fails), and its access-log line needs it."""
        while True:
            try:
                sock, peer = await listening.accept()
            except OSError as exc:
                if exc.errno in ACCEPT_SKIP_ERRNOS:
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
            connections.start_soon(
                handle_connection, trio.SocketStream(sock), peer, spec, self.context
            )


def _dns_cache_report(cache: SharedDnsCache) -> FeatureReport:
    """The shared DNS cache's state, map fill and counters (reads the map: scrape time only)."""
    stats = cache.statistics()
    notes = []
    if cache.replaced is not None:
        notes.append(f"replaced incompatible pinned state at {cache.pin_path}: {cache.replaced}")
    if cache.last_error is not None:
        notes.append(f"{stats.errors} map operation(s) failed, last: {cache.last_error}")
    return FeatureReport(
        "active",
        "; ".join(notes) or None,
        maps={"dns_cache": MapStatus(stats.entries, stats.max_entries, stats.hit_rate)},
        counters={
            "dns_cache_hits": stats.hits,
            "dns_cache_misses": stats.misses,
            "dns_cache_evictions": stats.evictions,
            "dns_cache_corrupt": stats.corrupt,
            "dns_cache_errors": stats.errors,
        },
    )


async def _open_listeners(
    specs: tuple[Listener, ...],
) -> list[tuple[trio.SocketListener, Listener]]:
    """Bind every listener or none (a partial bind would serve a config nobody wrote)."""
    opened: list[tuple[trio.SocketListener, Listener]] = []
    try:
        for spec in specs:
            try:
                listeners = await trio.open_tcp_listeners(spec.port, host=spec.host)
            except OSError as exc:
                host = f"[{spec.host}]" if ":" in spec.host else spec.host
                raise OSError(exc.errno, f"{host}:{spec.port}: {exc.strerror}") from exc
            opened.extend((listener, spec) for listener in listeners)
    except BaseException:
        with trio.CancelScope(shield=True):
            for listener, _ in opened:
                await trio.aclose_forcefully(listener)
        raise
    return opened


def _own_addresses(
    listeners: list[trio.SocketListener],
) -> tuple[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int], ...]:
    """The (address, port) pairs the proxy listens on, for the SSRF guard's loop check."""
    own = []
    for listener in listeners:
        host, port = listener.socket.getsockname()[:2]
        own.append((ipaddress.ip_address(host), port))
    return tuple(own)
