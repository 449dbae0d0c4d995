"""Choosing the forwarding mode: the one place that decides (``kernel``, ``splice``, ``copy``).

:func:`choose_forwarder` turns the config into a :class:`ForwardingPlan`: the forwarder each
mode a rule can ask for gets here, after probing what this machine can do and walking the
fallback chain, with the reasons to log.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import attrs

from ..errors import AccelerationUnavailable
from ..sansio.config import Config
from .copy import CopyForwarder
from .interface import Forwarder, ForwarderStatistics, Mode
from .splice import SpliceForwarder, splice_unavailable

if TYPE_CHECKING:
    from ..accel import SockhashPlane


@attrs.frozen
class ForwardingPlan:
    """The outcome of :func:`choose_forwarder`: the forwarders and why they were chosen.

    ``forwarder`` is the default (``forwarding.mode`` resolved); ``by_mode`` maps every mode a
    rule can ask for (``auto``, ``kernel``, ``splice``, ``copy``) to the forwarder that serves
    it here, after the fallback chain. ``fallbacks`` lists ``(asked, used, why)`` for every
    mode that had to fall back (the caller logs each once).

    Call :meth:`close` when the proxy stops: a kernel forwarder holds the BPF maps and the
    attached verdict program.
    """

    forwarder: Forwarder
    why: str
    by_mode: Mapping[str, Forwarder] = attrs.field(factory=dict)
    fallbacks: tuple[tuple[str, str, str], ...] = ()
    #: The default mode is not what the config asked for (``auto``: not the kernel, although
    #: the config leaves it on): an operator should hear of it (a warning, not info).
    degraded: bool = False

    def for_mode(self, mode: str | None) -> Forwarder:
        """The forwarder for a rule's ``mode`` (``None``: the default)."""
        if mode is None:
            return self.forwarder
        return self.by_mode.get(mode, self.forwarder)

    def _distinct(self) -> list[Forwarder]:
        seen: list[Forwarder] = [self.forwarder]
        for f in self.by_mode.values():
            if all(f is not g for g in seen):
                seen.append(f)
        return seen

    def close(self) -> None:
        """Release every forwarder's resources (the kernel forwarder's BPF objects)."""
        for forwarder in self._distinct():
            forwarder.close()

    def statistics(self, mode: Mode) -> ForwarderStatistics | None:
        """The statistics of the forwarder of ``mode`` if one runs here, else ``None``."""
        for forwarder in self._distinct():
            if forwarder.mode is mode:
                return forwarder.statistics()
        return None


#: The order modes fall back in when one is unavailable (``fallback_mode: "auto"``); also
#: the order ``auto`` prefers them in.
FALLBACK_CHAIN = ("kernel", "splice", "copy")
SOCKMAP_SWITCHED_OFF = "ebpf.sockmap is disabled in the config"


def choose_forwarder(config: Config) -> ForwardingPlan:
    """Decide how connections forward bytes. The only place that does.

    Modes (``forwarding.mode``, overridden per rule by ``rules[].mode``):

    - ``kernel``: the BPF sockhash redirects (:mod:`trio_sni.forward.kernel`); needs
      ``ebpf.enabled`` and ``ebpf.sockmap.enabled``, and :func:`trio_sni.accel.probe` must
      find the kernel, capabilities and BPF features, and the prebuilt object must load.
      Per connection it can still fall back to ``copy`` (a socket that cannot be inserted:
      never to ``splice``, docs/kernel-facts.md, fact 13); the access log's ``mode`` says which ran.
    - ``splice``: splice(2) through pipes (:mod:`trio_sni.forward.splice`), Linux only.
    - ``copy``: recv/send, always available.
    - ``auto`` (the default): the first available of ``kernel → splice → copy``. ``kernel``
      takes the bytes out of Python entirely (one process carries many connections, with the
      best request latency); where it is switched off or unavailable, ``splice`` beat
      ``copy`` on every measure of the forwarder benchmark (bulk throughput, proxy CPU per
      GiB, latency, CPU for many paced connections; README), and its pipe memory is only
      allocated as bytes pass; ``copy`` is left for platforms without splice(2).

    An unavailable mode falls back along ``kernel → splice → copy`` (``fallback_mode:
    "auto"``), straight to ``copy`` (``"copy"``), or is an error (``"none"``; for ``auto``
    only when the kernel is switched on but unavailable). The reasons are in ``fallbacks``
    (and ``why`` for the default).

    Raises:
        AccelerationUnavailable: when ``fallback_mode`` is ``"none"`` and a mode the config
            asks for cannot be provided.
    """
    copy = CopyForwarder(
        buffer_size=config.forwarding.buffer_size, idle_timeout=config.timeouts.idle
    )
    copy.open()  # these serve: their epoll instances are made now, not at a first connection
    sockmap_on = config.ebpf.enabled and config.ebpf.sockmap.enabled
    wanted = {config.forwarding.mode} | {r.mode for r in config.rules if r.mode is not None}
    available: dict[str, Forwarder | None] = {"copy": copy}
    unavailable: dict[str, str] = {}

    splice_why = splice_unavailable()  # cheap; a reload may bring rules that ask for splice
    if splice_why is None:
        splice = SpliceForwarder(
            pipe_size=config.forwarding.pipe_size,
            idle_timeout=config.timeouts.idle,
            buffer_size=config.forwarding.buffer_size,
        )
        splice.open()
        available["splice"] = splice
    else:
        unavailable["splice"] = splice_why

    if not sockmap_on:
        unavailable["kernel"] = SOCKMAP_SWITCHED_OFF
    elif wanted & {"kernel", "auto"}:
        plane = _kernel_unavailable(config)
        if isinstance(plane, str):
            unavailable["kernel"] = plane
        else:
            from .kernel import KernelForwarder  # needs the loader: imported when usable

            kernel = KernelForwarder(
                plane,
                copy=copy,
                idle_timeout=config.timeouts.idle,
                bound=config.ebpf.sockmap.max_in_flight,
                buffer_size=config.forwarding.buffer_size,
            )
            available["kernel"] = kernel
    else:
        unavailable["kernel"] = "no rule and not forwarding.mode asks for it"

    by_mode: dict[str, Forwarder] = {}
    whys: dict[str, str] = {}
    fallbacks: list[tuple[str, str, str]] = []
    try:
        for mode in ("auto", "kernel", "splice", "copy"):
            forwarder, why = _resolve(mode, config, available, unavailable, mode in wanted)
            by_mode[mode] = forwarder
            whys[mode] = why
            if mode in wanted and mode != "auto" and forwarder.mode != mode:
                fallbacks.append((mode, forwarder.mode, why))
    except AccelerationUnavailable:
        for made in available.values():
            if made is not None:
                made.close()  # the kernel's BPF objects, the relays' epoll instances
        raise
    default = config.forwarding.mode
    best = "kernel" if default == "auto" else default
    switched_off = default == "auto" and unavailable.get("kernel") == SOCKMAP_SWITCHED_OFF
    degraded = by_mode[default].mode != best and not switched_off
    return ForwardingPlan(by_mode[default], whys[default], by_mode, tuple(fallbacks), degraded)


def _resolve(
    mode: str,
    config: Config,
    available: Mapping[str, Forwarder | None],
    unavailable: Mapping[str, str],
    wanted: bool,
) -> tuple[Forwarder, str]:
    """The forwarder that serves ``mode``, and why."""
    kernel = available.get("kernel")
    if mode == "auto" and kernel is not None:
        return kernel, "BPF sockhash redirect, userspace copy per connection if needed"
    start = "kernel" if mode == "auto" else mode
    chain = FALLBACK_CHAIN[FALLBACK_CHAIN.index(start) :]
    if config.fallback_mode == "copy":
        chain = (start, "copy") if start != "copy" else ("copy",)
    reasons: list[str] = []
    for candidate in chain:
        forwarder = available.get(candidate)
        if forwarder is not None:
            if not reasons:
                return forwarder, f"forwarding.mode {mode}"
            return forwarder, "; ".join(reasons) + f"; using {candidate}"
        why = unavailable[candidate]
        # ``auto`` with the kernel switched off means "the best userspace mode", not a fallback.
        switched_off = mode == "auto" and why == SOCKMAP_SWITCHED_OFF
        reasons.append(why if switched_off else f"{candidate} forwarding unavailable: {why}")
        if wanted and config.fallback_mode == "none" and candidate == start and not switched_off:
            raise AccelerationUnavailable(
                f"{reasons[-1]}; and fallback_mode is 'none': set fallback_mode to 'auto' "
                f"to fall back along kernel → splice → copy, or choose another mode"
            )
    raise AssertionError("copy is always available")


def _kernel_unavailable(config: Config) -> str | SockhashPlane:
    """The loaded data plane, or why there is none."""
    try:
        from .. import accel
    except ImportError as exc:  # e.g. cffi missing on this platform
        return f"cannot import the BPF loader: {exc}"
    found = accel.probe()
    if not found.sockmap:
        return found.why_not("sockmap") or "unknown"
    try:
        return accel.SockhashPlane.load(max_entries=config.ebpf.sockmap.max_entries)
    except (OSError, accel.LoaderError) as exc:
        return f"loading sockhash.bpf.o failed: {exc}"
