"""The proxy's side of the XDP edge guard: start it or say why not, reload it, report, stop.

The guard is an optimisation of policy the proxy enforces anyway (``clients.allow`` /
``clients.deny`` are checked again in userspace for every connection), so failing to start it
is a degradation, never a crash: the reason is logged once and shown in ``/ebpf/status``.

Listeners with ``accept_proxy_protocol`` are not guarded: their packets come from a load
balancer, and the client address the lists are about is inside the PROXY header.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .status import FeatureReport, MapStatus

if TYPE_CHECKING:
    import trio

    from .accel.xdp import XdpGuard
    from .sansio.config import Config, Listener

log = logging.getLogger("trio_sni.xdp")


class EdgeGuard:
    """One proxy's XDP guard, running (``guard``) or not (``reason``)."""

    def __init__(self, guard: XdpGuard | None, reason: str | None, config: Config) -> None:
        self.guard = guard
        self.reason = reason
        self._config = config

    @classmethod
    def start(
        cls, config: Config, listeners: list[tuple[trio.SocketListener, Listener]]
    ) -> EdgeGuard:
        """Attach the guard for the bound ``listeners``' ports, or record why it could not."""
        xdp = config.ebpf.xdp
        ports = sorted(
            {
                listener.socket.getsockname()[1]
                for listener, spec in listeners
                if not spec.accept_proxy_protocol
            }
        )
        if not ports:
            return cls._unavailable(
                config,
                "every listener expects the PROXY protocol (the "
                "packets' source is the load balancer, not the client)",
            )
        try:
            from .accel import LoaderError
            from .accel.xdp import XdpGuard
        except (ImportError, OSError) as exc:
            return cls._unavailable(config, f"cannot import the BPF loader: {exc}")
        try:
            guard = XdpGuard.start(xdp, config.clients, ports)
        except (LoaderError, OSError) as exc:
            return cls._unavailable(config, f"XDP on {xdp.interface}: {exc}")
        log.info(
            "XDP guard attached to %s (%s mode) for port(s) %s",
            xdp.interface,
            guard.mode,
            ", ".join(map(str, ports)),
        )
        return cls(guard, None, config)

    @classmethod
    def _unavailable(cls, config: Config, reason: str) -> EdgeGuard:
        log.warning(
            "XDP guard not started: %s; clients.allow/deny still apply in userspace", reason
        )
        return cls(None, reason, config)

    def reload(self, config: Config) -> None:
        """New lists and settings in place (the program stays attached)."""
        old, new = self._config.ebpf.xdp, config.ebpf.xdp
        if (old.enabled, old.interface, old.mode, old.flood_guard.tracked_sources) != (
            new.enabled,
            new.interface,
            new.mode,
            new.flood_guard.tracked_sources,
        ) or config.ebpf.enabled != self._config.ebpf.enabled:
            log.warning(
                "reload: ebpf.xdp enabled/interface/mode/tracked_sources changes take "
                "effect only after a restart"
            )
        self._config = config
        if self.guard is None:
            return
        from .accel import LoaderError

        try:
            self.guard.update(new, config.clients)
        except (LoaderError, OSError) as exc:
            log.error("reload: the XDP guard keeps part of its old lists: %s", exc)
            return
        log.info("reload: XDP guard lists and limits updated")

    def report(self) -> FeatureReport:
        """For ``/ebpf/status`` and ``/metrics`` (counters read now: one syscall each)."""
        if self.guard is None:
            return FeatureReport("unavailable", reason=self.reason)
        status = self.guard.status()
        xdp = self._config.ebpf.xdp
        return FeatureReport(
            "active",
            maps={
                "xdp_allow": MapStatus(status.allow_entries, status.list_capacity),
                "xdp_deny": MapStatus(status.deny_entries, status.list_capacity),
                "xdp_syn_sources": MapStatus(None, xdp.flood_guard.tracked_sources),
            },
            counters=status.counters,
            details={
                "interface": status.interface,
                "mode": status.mode,
                "ports": list(status.ports),
                "reject_quic": xdp.reject_quic,
            },
        )

    def close(self) -> None:
        """Detach; idempotent."""
        if self.guard is not None:
            self.guard.close()
