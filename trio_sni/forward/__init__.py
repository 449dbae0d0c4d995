"""Forwarders move bytes between the client and the target once a route is chosen.

One interface (:mod:`.interface`: :class:`Forwarder`, with the shared vocabulary
:class:`Mode`, :class:`Side` and :class:`ByteCounters`), one module per mode (:mod:`.copy`,
:mod:`.splice`, :mod:`.kernel`), and the one place that decides which forwarder a connection
gets and says why (:mod:`.choose`). How a connection ends is the same in every mode
(:mod:`._ends`, README "How a connection ends"). ``kernel`` is imported only where the BPF
loader can run, by :func:`choose_forwarder`.
"""

from .choose import ForwardingPlan, choose_forwarder
from .copy import CopyForwarder
from .interface import ByteCounters, Forwarder, ForwarderStatistics, HandedOff, Mode, Side
from .splice import SpliceForwarder

__all__ = [
    "ByteCounters",
    "CopyForwarder",
    "Forwarder",
    "ForwarderStatistics",
    "ForwardingPlan",
    "HandedOff",
    "Mode",
    "Side",
    "SpliceForwarder",
    "choose_forwarder",
]
