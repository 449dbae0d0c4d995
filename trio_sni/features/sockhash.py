"""Kernel forwarding (``sockmap``) as a kernel feature: the forwarding plan and its sockhash.

Starting it chooses the forwarding plan (:func:`~trio_sni.forward.choose_forwarder`), which
loads and attaches the sockhash plane when a mode the config asks for can use it; closing it
releases the plane. Choosing at start, not when the proxy is built, keeps every BPF object
inside :meth:`~trio_sni.server.Proxy.serve`, which always closes what it started.
"""

from __future__ import annotations

import logging

from ..forward import ForwarderStatistics, ForwardingPlan, Mode, choose_forwarder
from ..sansio.config import Config
from .interface import BoundListeners
from .report import FeatureReport, FeatureState, MapStatus

log = logging.getLogger("trio_sni")


class SockhashFeature:
    """The forwarding plan, chosen and logged once by :meth:`start`, closed by :meth:`close`."""

    name = "sockmap"

    def __init__(self, config: Config) -> None:
        self._config = config
        self._plan: ForwardingPlan | None = None

    @property
    def plan(self) -> ForwardingPlan:
        """The forwarders the proxy hands its connections to, once :meth:`start` chose them."""
        if self._plan is None:
            raise RuntimeError("the forwarding plan is chosen when the feature starts")
        return self._plan

    def start(self, listeners: BoundListeners) -> None:
        """Choose the forwarding plan; log the default mode and every rule's fallback once.

        Raises:
            AccelerationUnavailable: ``fallback_mode`` is ``"none"`` and a mode the config asks
                for cannot be provided (the config's demand, not a kernel refusal).
        """
        plan = choose_forwarder(self._config)
        level = logging.WARNING if plan.degraded else logging.INFO
        log.log(level, "forwarding mode: %s (%s)", plan.forwarder.mode, plan.why)
        for asked, used, why in plan.fallbacks:
            if asked != self._config.forwarding.mode:  # the default's reason is logged above
                log.warning("forwarding mode %s (asked by rules): %s (%s)", asked, used, why)
        self._plan = plan
        if any(spec.protocol == "quic" for _, spec in listeners):
            self._load_quic_plane(plan)

    def _load_quic_plane(self, plan: ForwardingPlan) -> None:
        """QUIC flows of the modes the kernel forwarder serves are redirected in the kernel
        too, when the QUIC data plane loads; else they are relayed in userspace (logged)."""
        kernel = plan.for_mode("kernel")
        if kernel.mode is not Mode.KERNEL:
            return
        try:
            from ..accel import LoaderError
            from ..accel.quic_plane import QuicPlane
            from ..forward.kernel import KernelForwarder

            assert isinstance(kernel, KernelForwarder)
            kernel.quic = QuicPlane.load(max_flows=self._config.ebpf.sockmap.max_entries)
        except (ImportError, LoaderError, OSError) as exc:
            log.warning("QUIC flows are relayed in userspace: the QUIC data plane: %s", exc)
            return
        log.info("QUIC flows in kernel mode are redirected by the kernel (quic_redirect.bpf.o)")

    def report(self) -> FeatureReport | None:
        if self._plan is None:
            return None
        plan = self._plan
        return sockmap_report(
            self._config, plan.forwarder.mode, plan.why, plan.statistics(Mode.KERNEL)
        )

    def reload(self, config: Config) -> None:
        """Keep the config the report reads; the plan itself stays until a restart."""
        self._config = config

    def close(self) -> None:
        """Release the kernel forwarder's sockhash plane; idempotent."""
        if self._plan is not None:
            self._plan.close()
            self._plan = None


def sockmap_report(
    config: Config, mode: Mode, why: str, kernel: ForwarderStatistics | None
) -> FeatureReport:
    """``sockmap`` for a plan whose default forwarder has ``mode``, chosen for ``why``.

    Active when the default forwards in the kernel; otherwise ``disabled`` if switched off,
    else ``unavailable`` with ``why``. The kernel forwarder, whenever one runs (rules alone may
    use it), adds the sockhash fill in connections (two sockets each; the unit of
    ``ebpf.sockmap.max_entries``) and its counters as ``sockmap_*``; with a QUIC data plane,
    the QUIC flows it relays (``quic_sockmap``) and its counters as ``sockmap_quic_*``.
    """
    state: FeatureState = "active"
    reason = None
    if mode is not Mode.KERNEL:
        switched_off = not config.ebpf.sockmap.enabled
        state = "disabled" if switched_off else "unavailable"
        reason = "ebpf.sockmap.enabled is false" if switched_off else why
    if kernel is None:
        return FeatureReport(state, reason)
    counters = {
        **kernel.data_plane,
        "fallbacks": kernel.fallbacks,
        "userspace_directions": kernel.userspace_directions,
    }
    maps = {"sockmap": MapStatus(kernel.sockhash_sockets // 2, config.ebpf.sockmap.max_entries)}
    if kernel.quic_flows is not None:
        maps["quic_sockmap"] = MapStatus(kernel.quic_flows, config.ebpf.sockmap.max_entries)
    return FeatureReport(
        state,
        reason,
        maps=maps,
        counters={f"sockmap_{name}": value for name, value in counters.items()},
    )
