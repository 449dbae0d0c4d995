"""Python mirror of ``bpf/shared.h``: struct layouts and counter indices.

``tests/accel/test_layout.py`` checks these against the BTF in the prebuilt object, so a change
to the C side that is not made here fails the suite instead of corrupting map values.
"""

from __future__ import annotations

import enum
import struct

#: ``struct peer_info {u64 peer; u64 bound; u32 direction; u32 _pad;}``
PEER_INFO = struct.Struct("<QQII")
#: ``struct progress {u64 redirected; u32 stopped; u32 started; u32 peer_seq0; u32 _pad;}``
PROGRESS = struct.Struct("<QIIII")


class Direction(enum.IntEnum):
    """``enum direction``: which way a socket's received bytes go."""

    TO_UPSTREAM = 0
    TO_CLIENT = 1


class Counter(enum.IntEnum):
    """``enum counter``: indices into the per-CPU ``counters`` array."""

    BYTES_TO_UPSTREAM = 0
    SKBS_TO_UPSTREAM = 1
    BYTES_TO_CLIENT = 2
    SKBS_TO_CLIENT = 3
    REDIRECT_FAILURES = 4
    PEER_MISSES = 5
    ZERO_LENGTH = 6
    BUDGET_STOPS = 7
    PASSED_BYTES = 8


#: ``CNT_MAX``: the size of the ``counters`` array.
COUNTER_MAX = len(Counter)

#: Map and program names the forwarder needs from ``sockhash.bpf.o``.
SOCKHASH_MAPS = ("sock_hash", "targets", "peer", "progress", "counters", "stops")
SOCKHASH_PROGRAM = "stream_verdict"

# ``bpf/quic_redirect.bpf.c`` (its structs and counters are its own, not in ``shared.h``).

#: ``struct quic_count {u64 datagrams; u64 bytes;}``: what one socket received and redirected.
QUIC_COUNT = struct.Struct("<QQ")


class QuicCounter(enum.IntEnum):
    """``enum quic_counter``: indices into ``quic_redirect.bpf.o``'s per-CPU ``counters``."""

    REDIRECTED = 0
    REDIRECTED_BYTES = 1
    REDIRECT_FAILURES = 2
    NO_PEER = 3
    EMPTY = 4
    PULL_FAILURES = 5


#: ``QCNT_MAX``: the size of ``quic_redirect.bpf.o``'s ``counters`` array.
QUIC_COUNTER_MAX = len(QuicCounter)

#: Map and program names the QUIC plane needs from ``quic_redirect.bpf.o``.
QUIC_OBJECT = "quic_redirect.bpf.o"
QUIC_MAPS = ("quic_socks", "quic_targets", "quic_peer", "quic_counts", "counters")
QUIC_PROGRAM = "quic_verdict"
