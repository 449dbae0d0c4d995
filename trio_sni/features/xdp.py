"""The XDP edge guard as a kernel feature: start it or say why not, reload it, report, stop.

The guard is an optimisation of policy the proxy enforces anyway (``clients.allow`` /
``clients.deny`` are checked again in userspace for every connection), so failing to start it
is a degradation, never a crash: the reason is logged once and shown in ``/ebpf/status``.

Listeners with ``accept_proxy_protocol`` are not guarded: their packets come from a load
balancer, and the client address the lists are about is inside the PROXY header.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .interface import BoundListeners
from .report import FeatureReport, MapStatus

if TYPE_CHECKING:
    from ..accel.xdp import XdpGuard
    from ..sansio.config import Config

log = logging.getLogger("trio_sni.xdp")


class XdpFeature:
    """One proxy's XDP guard: running (``guard``), refused (``reason``), or not tried."""

    name = "xdp"

    def __init__(self, config: Config) -> None:
        self._config = config
        self.guard: XdpGuard | None = None
        self.reason: str | None = None

    def start(self, listeners: BoundListeners) -> None:
        """Attach the guard for the bound ``listeners``' ports, or record why it could not."""
        config = self._config
        if not (config.ebpf.enabled and config.ebpf.xdp.enabled):
            return
        xdp = config.ebpf.xdp
        ports = sorted(
            {
                port
                for port, spec in listeners
                if spec.protocol != "quic" and not spec.accept_proxy_protocol
            }
        )
        quic_ports = sorted({port for port, spec in listeners if spec.protocol == "quic"})
        if not ports and not quic_ports:
            self._unavailable(
                "every listener expects the PROXY protocol (the "
                "packets' source is the load balancer, not the client)"
            )
            return
        try:
            from ..accel import LoaderError
            from ..accel.xdp import XdpGuard
        except (ImportError, OSError) as exc:
            self._unavailable(f"cannot import the BPF loader: {exc}")
            return
        try:
            self.guard = XdpGuard.start(xdp, config.clients, ports, quic_ports)
        except (LoaderError, OSError) as exc:
            self._unavailable(f"XDP on {xdp.interface}: {exc}")
            return
        log.info(
            "XDP guard attached to %s (%s mode) for port(s) %s",
            xdp.interface,
            self.guard.mode,
            ", ".join([*map(str, ports), *(f"{p}/udp" for p in quic_ports)]),
        )

    def _unavailable(self, reason: str) -> None:
        log.warning(
            "XDP guard not started: %s; clients.allow/deny still apply in userspace", reason
        )
        self.reason = reason

    def reload(self, config: Config) -> None:
        """New lists and settings in place (the program stays attached)."""
        old, new = self._config.ebpf.xdp, config.ebpf.xdp
        if self.guard is None and self.reason is None:  # never tried: switched off at start
            if new.enabled and not old.enabled:
                log.warning("reload: ebpf.xdp.enabled takes effect only after a restart")
            self._config = config
            return
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
        from ..accel import LoaderError

        try:
            self.guard.update(new, config.clients)
        except (LoaderError, OSError) as exc:
            log.error("reload: the XDP guard keeps part of its old lists: %s", exc)
            return
        log.info("reload: XDP guard lists and limits updated")

    def report(self) -> FeatureReport | None:
        """For ``/ebpf/status`` and ``/metrics`` (counters read now: one syscall each)."""
        if self.guard is None:
            return None if self.reason is None else FeatureReport("unavailable", self.reason)
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
                "quic_ports": list(status.quic_ports),
                "reject_quic": xdp.reject_quic,
            },
        )

    def close(self) -> None:
        """Detach; idempotent."""
        if self.guard is not None:
            self.guard.close()
            self.guard = None
