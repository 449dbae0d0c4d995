"""What every kernel feature the proxy runs implements.

A feature is built from the config when the proxy is, but acquires nothing until
:meth:`KernelFeature.start`, which the proxy calls once its listeners are bound (the XDP guard
and the TC shaper need their ports) and before it accepts: a proxy that is built but never
served holds no BPF object.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from ..sansio.config import Listener

if TYPE_CHECKING:
    from ..sansio.config import Config
    from .report import FeatureReport

#: The proxy's bound listening sockets' ports (TCP and ``quic`` listeners alike), each with
#: the listener it was opened for.
BoundListeners = Sequence[tuple[int, Listener]]


class KernelFeature(Protocol):
    """One kernel feature: started with the listeners, reloaded, reported, closed.

    A kernel that refuses the feature (no privilege, a kernel too old, no such interface) is
    a degradation, never an error: :meth:`start` logs why once and :meth:`report` says
    ``unavailable`` with that reason; the proxy serves without it.
    """

    #: The feature's key in ``/ebpf/status`` (``sockmap``, ``dns_cache``, ``xdp``, ``tc``).
    name: str

    def start(self, listeners: BoundListeners) -> None:
        """Load and attach what the config switches on, or record why it cannot run."""
        ...

    def report(self) -> FeatureReport | None:
        """The feature's state, maps and counters, read now (scrape time only); ``None``
        when it has nothing to say (not started, or closed after running): the config's
        switches decide then."""
        ...

    def reload(self, config: Config) -> None:
        """Apply what a running feature can change live; log what needs a restart."""
        ...

    def close(self) -> None:
        """Detach and release everything; idempotent, also for a feature never started."""
        ...
