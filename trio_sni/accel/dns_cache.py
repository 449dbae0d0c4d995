"""The DNS cache shared by every proxy process on a host: a pinned BPF LRU hash map.

Theory of operation
-------------------

``bpf/dns_cache.bpf.c`` declares two maps, pinned by name in one directory
(``ebpf.dns_cache.pin_path``, default :data:`DEFAULT_PIN_PATH`):

- ``dns_cache``, an LRU hash from a name to its addresses and an absolute expiry (the byte
  layout is :mod:`trio_sni.sansio.dns_record`). The kernel evicts the least recently
  *written* entries when it is full (userspace lookups do not mark entries as used).
- ``dns_cache_stats``, an array: the layout version that created the maps, and host-wide
  counts of names inserted and deleted.

Expiry is on CLOCK_BOOTTIME: one clock for every process on the host, unchanged by a process
restart, never stepped by NTP or an operator (wall-clock time is: an entry could live hours
too long or die at once), and it keeps running during suspend, as a TTL should. It restarts
at boot, but so does bpffs: pinned maps do not survive a reboot.

**Opening** (:meth:`SharedDnsCache.open`) happens under ``flock`` on the pin directory, so
processes starting together never race: the first one creates and pins the maps and writes
the layout word, the others wait and then reuse them. Pinned state is reused only if both maps
match the expected spec (type, key and value size, max_entries, flags; the loader's
``MapIncompatibleError`` lists every difference) *and* the layout word equals
:data:`~trio_sni.sansio.dns_record.LAYOUT_VERSION`. Anything else (an older layout, another
size, half of the pair missing, something that is not a map) is reported and replaced: both
pins are removed and fresh maps are pinned. Entries that do not decode at lookup time are
deleted and counted as corrupt; they are never used.

**Counting.** Hits and misses are this process's lookups in the map (a Python int each, read
at scrape time). Evictions are host-wide: the kernel does not count them, but every entry
that ever entered the map was either deleted by a proxy, evicted, or is still there, so
``evictions = inserts - deletes - entries``. Inserts and deletes are added by every process
on the host through a 10-instruction program (``dns_stat_add``) run with
``BPF_PROG_TEST_RUN``: userspace cannot add to a map value atomically, a BPF program can.
This costs one syscall (~20 µs) per *new* name, never per lookup. ``entries`` is counted at
scrape time with ``BPF_MAP_LOOKUP_BATCH`` (bounded by ``max_entries``; about 1 ms for 10,000
entries). The result can lag by the writes in flight during a scrape, so it is reported as
the largest value seen so far (a counter never goes backwards).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import sys
import time
from collections.abc import Callable

import attrs
import trio_sni_loader as loader

from ..errors import SharedCacheUnavailable
from ..sansio import dns_record
from ..sansio.dns_record import DnsRecord, Families, RecordError, Stat
from .objects import prebuilt_spec

DEFAULT_PIN_PATH = "/sys/fs/bpf/trio_sni/dns_cache"
CACHE_MAP = "dns_cache"
STATS_MAP = "dns_cache_stats"
STAT_PROGRAM = "dns_stat_add"
#: How long to wait for another process that is opening (or replacing) the pinned maps; it
#: holds the lock for milliseconds, so this only fires if one hangs.
LOCK_TIMEOUT = 2.0
_LOCK_POLL = 0.01
#: BPF_PROG_TEST_RUN strips an Ethernet header from a socket filter's input.
_ETH_HLEN = 14
#: Entries read per BPF_MAP_LOOKUP_BATCH call when counting (~220 KiB of buffers).
_COUNT_BATCH = 512


def boottime_ns() -> int:
    """CLOCK_BOOTTIME in nanoseconds: the clock entry expiries are written on."""
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME)


@attrs.frozen
class SharedCacheStatistics:
    """What the shared tier reports at scrape time.

    Attributes:
        entries: names in the map now (live or expired: expired ones are overwritten or
            evicted, never swept).
        max_entries: the map's capacity.
        hits / misses: this process's lookups that found a live entry / did not.
        evictions: host-wide entries the kernel evicted (see the module docstring).
        corrupt: entries this process found undecodable and deleted.
        errors: map operations that failed (logged once).
    """

    entries: int
    max_entries: int
    hits: int
    misses: int
    evictions: int
    corrupt: int
    errors: int

    @property
    def hit_rate(self) -> float | None:
        looked_up = self.hits + self.misses
        return round(self.hits / looked_up, 4) if looked_up else None


def _why_not_permitted(pin_path: str) -> str:
    """What to do about an EPERM/EACCES at ``pin_path``: without CAP_BPF, that is the cause;
    with it, the pin directory (or the nearest existing parent) belongs to someone else."""
    from . import missing_capabilities  # the package imports this module

    uid = os.geteuid()
    if "CAP_BPF" in missing_capabilities():
        return f"needs root or CAP_BPF, and CAP_SYS_ADMIN to mount bpffs; uid {uid}"
    path = pin_path
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    st = os.stat(path)
    return (
        f"CAP_BPF is held, but {path} belongs to uid {st.st_uid} with mode "
        f"{stat.filemode(st.st_mode)}, and this process is uid {uid}: give the directory to "
        f"this user (chown) or set ebpf.dns_cache.pin_path to one it owns"
    )


class SharedDnsCache:
    """The pinned map pair, opened by :meth:`open`; ``get``/``put`` never raise for kernel
    errors (the in-process tier goes on alone and :attr:`errors` counts them)."""

    def __init__(
        self,
        collection: loader.Collection,
        *,
        pin_path: str,
        replaced: str | None,
        clock: Callable[[], int],
    ) -> None:
        self._collection = collection
        self._cache = collection.maps[CACHE_MAP]
        self._stats = collection.maps[STATS_MAP]
        self._counter = collection.programs[STAT_PROGRAM]
        self.pin_path = pin_path
        #: What was wrong with the pinned state that :meth:`open` replaced (None: nothing).
        self.replaced = replaced
        self._clock = clock
        self.max_entries = self._cache.spec.max_entries
        self.hits = 0
        self.misses = 0
        self.corrupt = 0
        self.errors = 0
        self.last_error: str | None = None
        self._evictions = 0

    @classmethod
    def open(
        cls,
        pin_path: str = DEFAULT_PIN_PATH,
        max_entries: int = 10000,
        *,
        clock: Callable[[], int] = boottime_ns,
    ) -> SharedDnsCache:
        """Open the pinned maps at ``pin_path`` (a directory), creating or replacing them.

        Args:
            pin_path: directory on bpffs holding ``dns_cache`` and ``dns_cache_stats``.
            max_entries: capacity; a pinned map of another size is replaced.
            clock: nanoseconds on the clock expiries are written on (tests pass a fake one).

        Raises:
            SharedCacheUnavailable: not Linux, no permission (root or CAP_BPF needed), no
                bpffs, the pin directory locked for :data:`LOCK_TIMEOUT`, or map creation
                or program load failed; the message says which.
        """
        if sys.platform != "linux":
            raise SharedCacheUnavailable(f"needs Linux (this is {sys.platform})")
        try:
            spec = prebuilt_spec("dns_cache.bpf.o", (CACHE_MAP, STATS_MAP), [STAT_PROGRAM])
        except (OSError, loader.LoaderError) as exc:
            raise SharedCacheUnavailable(f"cannot read dns_cache.bpf.o: {exc}") from None
        spec = spec.copy(
            maps={**spec.maps, CACHE_MAP: spec.maps[CACHE_MAP].copy(max_entries=max_entries)}
        )
        try:
            loader.ensure_bpffs(pin_path)
        except PermissionError as exc:
            raise SharedCacheUnavailable(
                f"cannot create {pin_path}: {exc.strerror} ({_why_not_permitted(pin_path)})"
            ) from None
        except OSError as exc:
            raise SharedCacheUnavailable(f"cannot create {pin_path}: {exc}") from None
        filesystem = _filesystem_of(pin_path)
        if filesystem != "bpf":
            raise SharedCacheUnavailable(
                f"{pin_path} is on {filesystem}, not on a bpffs (mount -t bpf bpf /sys/fs/bpf, "
                "or point ebpf.dns_cache.pin_path into one)"
            )
        try:
            with _locked(pin_path):
                replaced = _discard_unusable(spec, pin_path)
                collection = loader.Collection.load(spec, pin_path=pin_path)
                try:
                    stats = collection.maps[STATS_MAP]
                    if _read_u64(stats, Stat.LAYOUT) == 0:  # created just now, by us
                        stats.update(int(Stat.LAYOUT), dns_record.LAYOUT_VERSION)
                except BaseException:
                    collection.close()
                    raise
        except (OSError, loader.LoaderError) as exc:
            if isinstance(exc, PermissionError) or getattr(exc, "errno", None) == errno.EACCES:
                raise SharedCacheUnavailable(
                    f"not permitted: {exc} ({_why_not_permitted(pin_path)})"
                ) from None
            raise SharedCacheUnavailable(f"map creation failed: {exc}") from None
        return cls(collection, pin_path=pin_path, replaced=replaced, clock=clock)

    def close(self) -> None:
        """Close this process's fds (idempotent); the pinned maps stay for the others."""
        self._collection.close()

    def __enter__(self) -> SharedDnsCache:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- the cache ----------------------------------------------------------------------

    def get(self, name: str, needed: Families) -> tuple[DnsRecord, float] | None:
        """The live record for ``name`` and its seconds left, or None (absent, expired,
        written by a process that did not ask for every family in ``needed``, or corrupt).

        ``name`` is normalised (lower-case, no trailing dot). A name that cannot be a key
        (not ASCII, too long) is never shared and not counted.
        """
        try:
            key = dns_record.pack_key(name)
        except ValueError:
            return None
        try:
            raw = self._cache.lookup(key)
        except OSError as exc:
            self._failed("lookup", exc)
            return None
        if raw is None:
            self.misses += 1
            return None
        try:
            record = dns_record.unpack_value(raw)
        except RecordError:
            self.corrupt += 1
            self.misses += 1
            self._delete(key)
            return None
        left_ns = record.expires_ns - self._clock()
        if left_ns <= 0 or not record.covers(needed):
            self.misses += 1
            return None
        self.hits += 1
        return record, left_ns / 1e9

    def put(
        self,
        name: str,
        addresses: tuple[dns_record.IPAddress, ...],
        ttl: float,
        families: Families,
    ) -> None:
        """Share an answer for ``ttl`` seconds (nothing happens for ttl <= 0, no addresses,
        or a name that cannot be a key)."""
        if ttl <= 0 or not addresses:
            return
        try:
            key = dns_record.pack_key(name)
        except ValueError:
            return
        record = DnsRecord.from_addresses(addresses, families, self._clock() + int(ttl * 1e9))
        value = dns_record.pack_value(record)
        try:
            self._write(key, value)
        except OSError as exc:
            self._failed("update", exc)

    def _write(self, key: bytes, value: bytes) -> None:
        # A new name is counted as an insert; a refresh is not (the conservation of entries
        # needs exactly the keys that entered the map). A refresh whose key is evicted just
        # before it is written becomes an insert, hence the loop; three rounds are plenty.
        for _ in range(3):
            try:
                self._cache.update(key, value, loader.UpdateFlag.NOEXIST)
            except OSError as exc:
                if exc.errno != errno.EEXIST:
                    raise
            else:
                self._add(Stat.INSERTS, 1)
                return
            try:
                self._cache.update(key, value, loader.UpdateFlag.EXIST)
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    raise
            else:
                return

    def _delete(self, key: bytes) -> None:
        # Counted first: a scrape in between then sees one eviction too few, which the
        # never-backwards rule hides, rather than one too many, which it would keep.
        try:
            self._add(Stat.DELETES, 1)
            if not self._cache.delete(key):
                self._add(Stat.DELETES, -1)  # gone already (evicted, or deleted elsewhere)
        except OSError as exc:
            self._failed("delete", exc)

    def _add(self, stat: Stat, delta: int) -> None:
        result = self._counter.test_run(bytes(_ETH_HLEN) + dns_record.STAT_ADD.pack(stat, 0, delta))
        if result.retval != 1:
            raise OSError(errno.EIO, f"{STAT_PROGRAM} did not count {stat.name}")

    def _failed(self, what: str, exc: OSError) -> None:
        self.errors += 1
        self.last_error = f"{what}: {exc}"

    # -- reporting ----------------------------------------------------------------------

    def count_entries(self) -> int:
        """Names in the map now (one BPF_MAP_LOOKUP_BATCH per 512 entries)."""
        return self._cache.count_batch(_COUNT_BATCH)

    def statistics(self) -> SharedCacheStatistics:
        """The numbers for ``/metrics`` and ``/ebpf/status``; reads the map, so call it at
        scrape time only."""
        try:
            entries = self.count_entries()
            inserts = _read_u64(self._stats, Stat.INSERTS)
            deletes = _read_u64(self._stats, Stat.DELETES)
        except OSError as exc:
            self._failed("statistics", exc)
            entries = 0
        else:
            self._evictions = max(self._evictions, inserts - deletes - entries)
        return SharedCacheStatistics(
            entries=entries,
            max_entries=self.max_entries,
            hits=self.hits,
            misses=self.misses,
            evictions=self._evictions,
            corrupt=self.corrupt,
            errors=self.errors,
        )


def _filesystem_of(path: str) -> str:
    """The type of the filesystem ``path`` is on (its longest mount point prefix)."""
    real = os.path.realpath(path)
    best, kind = "", "an unknown filesystem"
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            parts = line.split()
            if len(parts) < 3:
                continue
            point = parts[1].replace("\\040", " ")
            inside = real == point or real.startswith(point.rstrip("/") + "/")
            if inside and len(point) >= len(best):
                best, kind = point, parts[2]
    return kind


def _read_u64(stats: loader.Map, stat: Stat) -> int:
    raw = stats.lookup(int(stat))
    return 0 if raw is None else int.from_bytes(raw, "little", signed=True)


@contextlib.contextmanager
def _locked(directory: str):  # type: ignore[no-untyped-def]
    """Hold ``flock(LOCK_EX)`` on ``directory`` (bpffs supports it) for the block."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        deadline = time.monotonic() + LOCK_TIMEOUT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise SharedCacheUnavailable(
                        f"{directory} stayed locked by another process for {LOCK_TIMEOUT:g} s"
                    ) from None
                time.sleep(_LOCK_POLL)
        yield
    finally:
        os.close(fd)  # releases the lock


def _discard_unusable(spec: loader.CollectionSpec, pin_path: str) -> str | None:
    """Unpin the map pair at ``pin_path`` unless both maps fit ``spec`` and carry our layout
    version; returns what was wrong (None: reusable, or nothing pinned)."""
    problems: list[str] = []
    found = 0
    for name in (CACHE_MAP, STATS_MAP):
        path = os.path.join(pin_path, name)
        try:
            pinned = loader.Map.open_pinned(path, spec.maps[name])
        except loader.MapIncompatibleError as exc:
            problems.append(f"{name}: {', '.join(exc.differences)}")
            found += 1
            continue
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                problems.append(f"{name}: missing")
                continue
            if isinstance(exc, PermissionError):
                raise
            problems.append(f"{name}: not a usable map ({exc})")
            found += 1
            continue
        found += 1
        with pinned:
            if name == STATS_MAP:
                layout = _read_u64(pinned, Stat.LAYOUT)
                if layout != dns_record.LAYOUT_VERSION:
                    problems.append(
                        f"{name}: layout version {layout}, expected {dns_record.LAYOUT_VERSION}"
                    )
    if found == 0 or not problems:
        return None  # nothing pinned yet, or all good
    for name in (CACHE_MAP, STATS_MAP):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(pin_path, name))
    return "; ".join(problems)
