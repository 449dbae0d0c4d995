"""The per-client limits of several worker processes, in one table in shared memory.

:class:`~trio_sni.sansio.policy.ClientLimiter` keeps its clients in a dict, which one process
owns. With ``workers: N`` the kernel gives a client's connections to whichever worker accepts
first, so each worker's own limiter would see a part of them and the limits would count N
times over. :class:`LimitTable` makes the same decisions (same checks, same order, same
``Deny`` reasons and messages) over a buffer every worker maps: a memfd the supervisor creates
(:mod:`trio_sni.shared_limits` holds the lock and does the mapping; this module only reads and
writes bytes, so it is tested with a ``bytearray``).

Layout (native byte order: every user is on this host):

* a header: magic, number of slots, live connections over all workers, a random hash key;
* per slot a client key (16 bytes: an IPv4 address, or an IPv6 /64, with a non-zero tag, so
  all zeros means a slot never used), and its state (live connections, tokens, stamp);
* per worker and slot, the live connections that worker holds, so that the connections of a
  worker that died can be given back (:meth:`LimitTable.forget_worker`).

A client's slot is one of the :data:`WINDOW` slots after its hash (open addressing, linear
probing). Slots are never emptied, only taken over: a slot is free for a new client when its
client has no live connection and a full bucket again (forgetting it changes no decision, as
in ``ClientLimiter``). When a window has no such slot, the idle client with the oldest stamp
is forgotten early; with every slot of the window holding live connections (more than
:data:`WINDOW` busy clients on one hash: the table is sized for far more slots than
``max_connections``, so only a flood crafted against a hash key it cannot see gets there), the
connection is admitted under the global cap only and counted as ``untracked``.
"""

from __future__ import annotations

import hashlib
import ipaddress
import struct
from typing import Final

from .addresses import IPAddress
from .config import Limits
from .policy import Deny, client_key, describe_client_key, live_connections

__all__ = ["WINDOW", "LimitTable", "slots_for", "table_size"]

MAGIC: Final = b"trsnilim"
#: The slots a client's key may occupy after its hash.
WINDOW: Final = 64

_HEADER = struct.Struct("=8sIIq16s")  # magic, slots, workers, live connections, hash key
_KEY_SIZE: Final = 16
_STATE = struct.Struct("=I4xdd")  # live connections, (padding), tokens, stamp
_HELD = struct.Struct("=I")


def slots_for(max_connections: int, max_clients: int) -> int:
    """A power of two with room for every remembered client four times over."""
    wanted = 4 * max(max_clients, max_connections + 1)
    return 1 << (wanted - 1).bit_length()


def table_size(slots: int, workers: int) -> int:
    """Bytes the table takes for ``slots`` slots and ``workers`` workers."""
    rows = slots + WINDOW
    return _HEADER.size + rows * (_KEY_SIZE + _STATE.size + workers * _HELD.size)


def _encode(ip: IPAddress) -> bytes:
    key = client_key(ip)
    if isinstance(key, ipaddress.IPv4Address):
        return b"\x04" + key.packed + bytes(11)
    return b"\x06" + key.network_address.packed[:8] + bytes(7)


class LimitTable:
    """The shared table, seen by one worker (``worker`` is its index; the supervisor, which
    only creates and cleans up, uses ``None``). Call every method under the caller's lock.

    :meth:`create` writes a new table into a zeroed buffer; the constructor reads one. Times
    (``now``) must come from one clock for every process: ``time.monotonic()``.
    """

    def __init__(
        self, buffer: memoryview, worker: int | None, limits: Limits, max_connections: int
    ) -> None:
        magic, slots, workers, _live, secret = _HEADER.unpack_from(buffer, 0)
        if magic != MAGIC:
            raise ValueError("not a trio_sni limit table")
        self._buffer = buffer
        self._slots = slots
        self._workers = workers
        self._secret = secret
        rows = slots + WINDOW
        self._keys_at = _HEADER.size
        self._states_at = self._keys_at + rows * _KEY_SIZE
        self._held_at = self._states_at + rows * _STATE.size
        self._rows = rows
        self._worker = worker
        #: Connections admitted without a slot (see the module docstring); a gauge.
        self.untracked = 0
        self.reconfigure(limits, max_connections)

    @classmethod
    def create(cls, buffer: memoryview, slots: int, workers: int, secret: bytes) -> None:
        """Write an empty table for ``workers`` workers into ``buffer`` (zeroed, at least
        :func:`table_size` bytes)."""
        if slots & (slots - 1) or len(secret) != 16:
            raise ValueError("slots must be a power of two and the secret 16 bytes")
        _HEADER.pack_into(buffer, 0, MAGIC, slots, workers, 0, secret)

    def reconfigure(self, limits: Limits, max_connections: int) -> None:
        """Apply new limits (a reload): as ``ClientLimiter.reconfigure``, tokens are clamped
        to the new burst when next used."""
        self._limits = limits
        self._max_connections = max_connections
        self._rate = limits.per_client_rate
        self._capacity = float(max(limits.per_client_burst, 1))

    @property
    def active(self) -> int:
        """Live connections over all workers."""
        return int(_HEADER.unpack_from(self._buffer, 0)[3])

    def _add_live(self, delta: int) -> None:
        magic, slots, workers, live, secret = _HEADER.unpack_from(self._buffer, 0)
        _HEADER.pack_into(self._buffer, 0, magic, slots, workers, live + delta, secret)

    def active_for(self, ip: IPAddress) -> int:
        """Live connections of ``ip``'s client over all workers."""
        row = self._find(_encode(ip))[0]
        return 0 if row is None else self._state(row)[0]

    def acquire(self, ip: IPAddress, now: float) -> Deny | None:
        """Admit a new connection from ``ip``, or refuse it: ``ClientLimiter.acquire``'s
        checks, over every worker's connections."""
        live = self.active
        if live >= self._max_connections:
            return Deny(
                "max_connections",
                f"the proxy has {live_connections(live)} "
                f"(max_connections = {self._max_connections})",
            )
        key = _encode(ip)
        row, free = self._find(key, now)
        limit = self._limits.per_client_connections
        if row is None:
            if free is None:
                self.untracked += 1
                self._add_live(1)
                return None
            row = free
            self._buffer[self._key_at(row) : self._key_at(row) + _KEY_SIZE] = key
            active, tokens, stamp = 0, self._capacity, now
        else:
            active, tokens, stamp = self._state(row)
            if limit and active >= limit:
                return Deny(
                    "too_many_connections",
                    f"{describe_client_key(client_key(ip))} has {live_connections(active)} "
                    f"(per_client_connections = {limit})",
                )
            if self._rate:
                tokens = min(self._capacity, tokens + max(0.0, now - stamp) * self._rate)
                stamp = max(stamp, now)
        if self._rate:
            if tokens < 1:
                self._set_state(row, active, tokens, stamp)
                return Deny(
                    "rate_limited",
                    f"{describe_client_key(client_key(ip))} exceeded per_client_rate "
                    f"({self._rate:g}/s, burst {self._limits.per_client_burst})",
                )
            tokens -= 1
        self._set_state(row, active + 1, tokens, stamp)
        self._add_held(row, 1)
        self._add_live(1)
        return None

    def release(self, ip: IPAddress) -> None:
        """End a connection :meth:`acquire` admitted."""
        row = self._find(_encode(ip))[0]
        if row is None or self._state(row)[0] == 0:
            if self.untracked > 0:  # admitted without a slot
                self.untracked -= 1
                self._add_live(-1)
                return
            raise ValueError(
                f"release() for {describe_client_key(client_key(ip))} without a matching acquire()"
            )
        active, tokens, stamp = self._state(row)
        self._set_state(row, active - 1, tokens, stamp)
        self._add_held(row, -1)
        self._add_live(-1)

    def forget_worker(self, worker: int) -> tuple[int, int]:
        """Give back every connection slot a dead ``worker`` held; ``(connections,
        clients)`` given back. Its untracked connections are not known here: ``untracked``
        is per process."""
        connections = clients = 0
        at = self._held_at + worker * self._rows * _HELD.size
        with self._buffer[at : at + self._rows * _HELD.size].cast("I") as held:
            for row, count in enumerate(held):
                if count:
                    active, tokens, stamp = self._state(row)
                    self._set_state(row, max(0, active - count), tokens, stamp)
                    held[row] = 0
                    connections += count
                    clients += 1
        self._add_live(-connections)
        return connections, clients

    # -- slots -------------------------------------------------------------------------

    def _key_at(self, row: int) -> int:
        return self._keys_at + row * _KEY_SIZE

    def _state(self, row: int) -> tuple[int, float, float]:
        active, tokens, stamp = _STATE.unpack_from(
            self._buffer, self._states_at + row * _STATE.size
        )
        return active, tokens, stamp

    def _set_state(self, row: int, active: int, tokens: float, stamp: float) -> None:
        _STATE.pack_into(self._buffer, self._states_at + row * _STATE.size, active, tokens, stamp)

    def _add_held(self, row: int, delta: int) -> None:
        if self._worker is None:
            return
        at = self._held_at + (self._worker * self._rows + row) * _HELD.size
        _HELD.pack_into(self._buffer, at, _HELD.unpack_from(self._buffer, at)[0] + delta)

    def _find(self, key: bytes, now: float | None = None) -> tuple[int | None, int | None]:
        """``(the row holding key, or None; a row a new client may take at ``now``, or
        None)``; without ``now``, only the first."""
        digest = hashlib.blake2b(key, digest_size=8, key=self._secret).digest()
        start = int.from_bytes(digest, "little") & (self._slots - 1)
        begin = self._key_at(start)
        window = bytes(self._buffer[begin : begin + WINDOW * _KEY_SIZE])
        at = window.find(key)
        while at != -1 and at % _KEY_SIZE:
            at = window.find(key, at + 1)
        if at != -1:
            return start + at // _KEY_SIZE, None
        if now is None:
            return None, None
        empty = window.find(bytes(_KEY_SIZE))
        while empty != -1 and empty % _KEY_SIZE:
            empty = window.find(bytes(_KEY_SIZE), empty + 1)
        if empty != -1:
            return None, start + empty // _KEY_SIZE
        # Every slot is taken: the first whose client is forgotten without changing a
        # decision, else the idle one with the oldest stamp.
        oldest: tuple[float, int] | None = None
        for offset in range(WINDOW):
            row = start + offset
            active, tokens, stamp = self._state(row)
            if active:
                continue
            if not self._rate or tokens + (now - stamp) * self._rate >= self._capacity:
                return None, row
            if oldest is None or stamp < oldest[0]:
                oldest = (stamp, row)
        return None, None if oldest is None else oldest[1]
