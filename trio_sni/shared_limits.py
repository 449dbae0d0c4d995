"""The workers' shared per-client limits: a :class:`~trio_sni.sansio.limit_table.LimitTable`
in a memfd the supervisor creates and every worker maps.

Every call takes a POSIX record lock on the memfd (``lockf``: per process, so workers that
inherited the same open file still exclude each other, and a worker that dies holding it
loses it). The lock is held for a few microseconds, so it is taken blocking, in the event
loop's thread. Times come from ``time.monotonic()``, the one clock every process shares.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import secrets
import time
from types import TracebackType

from .sansio.addresses import IPAddress
from .sansio.config import Config, Limits
from .sansio.limit_table import LimitTable, slots_for, table_size
from .sansio.policy import DEFAULT_MAX_CLIENTS, Deny

#: The environment variable naming the fd of the table a worker inherits.
LIMITS_FD_ENV = "TRIO_SNI_LIMITS_FD"


class _Locked:
    __slots__ = ("_fd",)

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def __enter__(self) -> None:
        fcntl.lockf(self._fd, fcntl.LOCK_EX)

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        fcntl.lockf(self._fd, fcntl.LOCK_UN)


class SharedLimiter:
    """One process's view of the shared table (``worker``: its index; ``None`` for the
    supervisor). Owns ``fd`` and the mapping; :meth:`close` releases them."""

    def __init__(self, fd: int, worker: int | None, limits: Limits, max_connections: int) -> None:
        self.fd = fd
        self._map = mmap.mmap(fd, os.fstat(fd).st_size)
        self._view = memoryview(self._map)
        self._lock = _Locked(fd)
        self._table = LimitTable(self._view, worker, limits, max_connections)

    @classmethod
    def create(cls, config: Config, workers: int) -> SharedLimiter:
        """A new, empty table for ``workers`` workers of ``config`` (the supervisor's)."""
        slots = slots_for(config.max_connections, DEFAULT_MAX_CLIENTS)
        fd = os.memfd_create("trio-sni-limits", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, table_size(slots, workers))  # zeroed; pages taken as written
            with mmap.mmap(fd, 0) as view:
                LimitTable.create(memoryview(view), slots, workers, secrets.token_bytes(16))
            return cls(fd, None, config.limits, config.max_connections)
        except BaseException:
            os.close(fd)
            raise

    def acquire(self, ip: IPAddress, now: float) -> Deny | None:
        """``ClientLimiter.acquire`` over every worker's connections; ``now`` (the caller's
        clock) is not used: the table's clock is ``time.monotonic()``."""
        with self._lock:
            return self._table.acquire(ip, time.monotonic())

    def release(self, ip: IPAddress) -> None:
        with self._lock:
            self._table.release(ip)

    def reconfigure(self, limits: Limits, max_connections: int) -> None:
        self._table.reconfigure(limits, max_connections)

    @property
    def active(self) -> int:
        with self._lock:
            return self._table.active

    def active_for(self, ip: IPAddress) -> int:
        with self._lock:
            return self._table.active_for(ip)

    def forget_worker(self, worker: int) -> tuple[int, int]:
        """Give back a dead worker's connection slots; ``(connections, clients)``."""
        with self._lock:
            return self._table.forget_worker(worker)

    def close(self) -> None:
        self._view.release()
        self._map.close()
        os.close(self.fd)
