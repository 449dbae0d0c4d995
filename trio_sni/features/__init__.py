"""Kernel features the proxy runs, as one family: kernel forwarding, DNS cache, XDP, TC.

One protocol (:mod:`.interface`: :class:`KernelFeature`, started once the listeners are
bound, reported, reloaded, closed), one module per feature (:mod:`.sockhash`,
:mod:`.dns_cache`, :mod:`.xdp`, :mod:`.tc`), and the status model they report in
(:mod:`.report`), which ``/ebpf/status`` and ``/metrics`` both read. Nothing here imports the
proxy, its status server or its metrics (``tests/test_layering.py``).
"""

from .dns_cache import DnsCacheFeature
from .interface import BoundListeners, KernelFeature
from .report import (
    FEATURES,
    NOT_CHOSEN,
    NOT_STARTED,
    PER_CPU_FEATURES,
    AccelerationStatus,
    FeatureReport,
    FeatureState,
    MapStatus,
    acceleration_from_config,
    acceleration_of,
)
from .sockhash import SockhashFeature, sockmap_report
from .tc import TcFeature
from .xdp import XdpFeature

__all__ = [
    "FEATURES",
    "NOT_CHOSEN",
    "NOT_STARTED",
    "PER_CPU_FEATURES",
    "AccelerationStatus",
    "BoundListeners",
    "DnsCacheFeature",
    "FeatureReport",
    "FeatureState",
    "KernelFeature",
    "MapStatus",
    "SockhashFeature",
    "TcFeature",
    "XdpFeature",
    "acceleration_from_config",
    "acceleration_of",
    "sockmap_report",
]
