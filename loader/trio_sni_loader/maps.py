"""Maps: create from a :class:`~loader.spec.MapSpec`, read and write them, pin them.

Keys and values cross the syscall boundary as bytes. A :class:`Codec` turns Python values into
those bytes and back; the default (:data:`RAW`) takes ``bytes`` of the right size or an ``int``
(little-endian, the host order of every BPF target we support) and gives back ``bytes``.

Per-CPU maps hold one value per *possible* CPU; userspace sees ``round_up(value_size, 8)``
bytes per CPU (docs/kernel-facts.md, fact 22), so lookups return a list and updates take one.

Costs: every call is one ``bpf()`` syscall (about a microsecond from Python, see
``bench/bench_maps.py``); read many entries with :meth:`Map.lookup_batch`.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import mmap
import os
import socket
import struct
import threading
from collections.abc import Iterator
from typing import Any, Protocol

import attrs

from ._sys import bpf
from ._sys.bpf import MapInfo
from ._sys.bpffs import is_bpffs, mount_bpffs
from ._sys.buffer import Buffer
from ._sys.consts import (
    MAP_TYPE_MIN_KERNEL,
    PERCPU_MAP_TYPES,
    SOCKET_MAP_TYPES,
    MapFlag,
    UpdateFlag,
)
from ._sys.fd import FD, ClosesOnExit
from .errors import BPFSyscallError, LoaderError, MapIncompatibleError, NotSupportedError
from .spec import MapSpec

__all__ = ["RAW", "Codec", "Int", "Map", "MapInfo", "Struct", "possible_cpus"]

DEFAULT_PIN_ROOT = "/sys/fs/bpf"


class Codec(Protocol):
    """Turns a Python value into exactly ``size`` bytes and back."""

    def encode(self, value: Any, size: int) -> bytes: ...

    def decode(self, data: bytes) -> Any: ...


class _Raw:
    """bytes as they are; ints as little-endian unsigned numbers of the field's size."""

    def encode(self, value: Any, size: int) -> bytes:
        if isinstance(value, int):
            return value.to_bytes(size, "little", signed=value < 0)
        data = bytes(value)
        if len(data) != size:
            raise ValueError(f"expected {size} bytes, got {len(data)}")
        return data

    def decode(self, data: bytes) -> bytes:
        return data

    def __repr__(self) -> str:
        return "RAW"


RAW: Codec = _Raw()


@attrs.frozen
class Int:
    """An integer of the field's size (``Int()``: unsigned, ``Int(signed=True)``)."""

    signed: bool = False

    def encode(self, value: Any, size: int) -> bytes:
        return int(value).to_bytes(size, "little", signed=self.signed)

    def decode(self, data: bytes) -> int:
        return int.from_bytes(data, "little", signed=self.signed)


@attrs.frozen
class Struct:
    """A :mod:`struct` format; values are tuples (or a single value for one-field formats)."""

    format: str

    def encode(self, value: Any, size: int) -> bytes:
        fmt = struct.Struct(self.format)
        data = fmt.pack(*value) if isinstance(value, tuple) else fmt.pack(value)
        if len(data) != size:
            raise ValueError(f"format {self.format!r} packs {len(data)} bytes, field is {size}")
        return data

    def decode(self, data: bytes) -> Any:
        out = struct.unpack(self.format, data)
        return out[0] if len(out) == 1 else out


@functools.cache
def possible_cpus() -> int:
    """Number of possible CPUs (``/sys/devices/system/cpu/possible``, e.g. ``0-1`` -> 2)."""
    with open("/sys/devices/system/cpu/possible") as f:
        text = f.read().strip()
    highest = 0
    for part in text.split(","):
        highest = max(highest, int(part.split("-")[-1]))
    return highest + 1


class Map(ClosesOnExit):
    """A map the process holds an fd to. Create with :meth:`create` or :meth:`open_pinned`.

    ``with Map.create(spec) as m:`` closes it at the end; :meth:`close` is idempotent. Closing
    does not destroy a pinned map, or one a loaded program still uses.
    """

    def __init__(
        self,
        fd: FD,
        spec: MapSpec,
        *,
        key: Codec = RAW,
        value: Codec = RAW,
        pinned_path: str | None = None,
    ) -> None:
        self._fd = fd
        self.spec = spec
        self.key_codec = key
        self.value_codec = value
        self.pinned_path = pinned_path
        self._percpu = spec.type in PERCPU_MAP_TYPES
        self._slot = (spec.value_size + 7) & ~7 if self._percpu else spec.value_size
        self._value_len = self._slot * possible_cpus() if self._percpu else spec.value_size
        # One prebuilt attr per map for lookup/update/delete (see bpf.ElemCalls), serialised by
        # a lock so threads (trio.to_thread) can share a Map.
        self._elem = bpf.ElemCalls(fd.raw, spec.key_size, self._value_len)
        self._lock = threading.Lock()

    # -- lifecycle -------------------------------------------------------------------------

    @classmethod
    def create(
        cls, spec: MapSpec, *, key: Codec = RAW, value: Codec = RAW, btf_fd: FD | None = None
    ) -> Map:
        """Create a map from ``spec`` and write its initial contents (global data).

        ``btf_fd`` attaches key/value BTF (needed for spin locks, nice for bpftool); it is never
        passed for sockmap/sockhash, and map creation is retried without it if the kernel
        refuses the BTF.

        Raises:
            NotSupportedError: the kernel does not know the map type.
            MissingPrivilegeError: no CAP_BPF (or CAP_NET_ADMIN for socket maps).
            BPFSyscallError: any other refusal, with the errno.
        """
        fd = _create_fd(spec, btf_fd)
        m = cls(fd, spec, key=key, value=value)
        try:
            if spec.contents is not None:
                m._update_raw(b"\0\0\0\0", spec.contents, UpdateFlag.ANY)
            if spec.freeze:
                m.freeze()
        except BaseException:
            m.close()
            raise
        return m

    @classmethod
    def open_pinned(
        cls, path: str, spec: MapSpec | None = None, *, key: Codec = RAW, value: Codec = RAW
    ) -> Map:
        """Open the map pinned at ``path``.

        With a ``spec``, the pinned map must match it (type, key and value size, max_entries,
        flags), or :class:`MapIncompatibleError` lists every difference.
        """
        fd = bpf.obj_get(path, kind="map")
        try:
            info = bpf.map_info(fd.raw)
            if spec is not None:
                diffs = spec.differences(
                    type=info.type,
                    key_size=info.key_size,
                    value_size=info.value_size,
                    max_entries=info.max_entries,
                    flags=info.flags,
                )
                if diffs:
                    raise MapIncompatibleError(spec.name, path, diffs)
            else:
                spec = MapSpec(
                    name=info.name,
                    type=info.type,
                    key_size=info.key_size,
                    value_size=info.value_size,
                    max_entries=info.max_entries,
                    flags=info.flags,
                )
        except BaseException:
            fd.close()
            raise
        return cls(fd, spec, key=key, value=value, pinned_path=path)

    @property
    def fd(self) -> int:
        return self._fd.raw

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def closed(self) -> bool:
        return self._fd.closed

    def close(self) -> None:
        self._fd.close()

    def __repr__(self) -> str:
        return f"<Map {self.spec.name!r} {self.spec.type.name} fd={self._fd!r}>"

    def info(self) -> MapInfo:
        return bpf.map_info(self.fd)

    def freeze(self) -> None:
        """Make the map read-only for userspace (``BPF_MAP_FREEZE``)."""
        bpf.map_freeze(self.fd)

    def mmap(self) -> mmap.mmap:
        """The map's memory, shared with its programs: global data (``.data``, ``.bss``,
        ``.rodata``, created ``BPF_F_MMAPABLE`` as libbpf does) read and written in place, with
        no syscall per access. A frozen map (``.rodata``) is mapped read-only.

        Raises:
            LoaderError: the map was not created mmap-able.
        """
        if not self.spec.flags & MapFlag.MMAPABLE:
            raise LoaderError(f"map {self.name!r} was not created with BPF_F_MMAPABLE")
        page = mmap.PAGESIZE
        size = (self.spec.value_size + 7) // 8 * 8 * self.spec.max_entries
        prot = mmap.PROT_READ if self.spec.freeze else mmap.PROT_READ | mmap.PROT_WRITE
        return mmap.mmap(self.fd, (size + page - 1) // page * page, mmap.MAP_SHARED, prot)

    def pin(self, path: str) -> None:
        """Pin the map at ``path`` on a bpffs; the bpffs is mounted first if needed."""
        ensure_bpffs(os.path.dirname(path))
        bpf.obj_pin(self.fd, path)
        self.pinned_path = path

    def unpin(self) -> None:
        if self.pinned_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.pinned_path)
            self.pinned_path = None

    # -- elements --------------------------------------------------------------------------

    def _key(self, key: Any) -> bytes:
        return self.key_codec.encode(key, self.spec.key_size)

    def _encode_value(self, value: Any) -> bytes:
        if self.spec.type in SOCKET_MAP_TYPES:
            fd = value.fileno() if hasattr(value, "fileno") else int(value)
            return fd.to_bytes(self.spec.value_size, "little")
        if not self._percpu:
            return self.value_codec.encode(value, self.spec.value_size)
        values = list(value)
        if len(values) != possible_cpus():
            raise ValueError(
                f"per-CPU map {self.name}: need {possible_cpus()} values "
                f"(one per possible CPU), got {len(values)}"
            )
        pad = bytes(self._slot - self.spec.value_size)
        return b"".join(self.value_codec.encode(v, self.spec.value_size) + pad for v in values)

    def _decode_value(self, data: bytes) -> Any:
        if not self._percpu:
            return self.value_codec.decode(data)
        size = self.spec.value_size
        return [
            self.value_codec.decode(data[i : i + size]) for i in range(0, len(data), self._slot)
        ]

    def lookup(self, key: Any, default: Any = None) -> Any:
        """The value for ``key``, or ``default`` if absent. Per-CPU maps give a list."""
        k = self._key(key)
        with self._lock:
            self._check_open()
            data = self._elem.lookup(k)
        if data is None:
            return default
        return self._decode_value(data)

    def _check_open(self) -> None:
        if self._fd.closed:
            raise ValueError(f"map {self.name!r} is closed")

    def _update_raw(self, key: bytes, value: bytes, flags: int) -> None:
        if len(value) != self._value_len:
            raise ValueError(
                f"map {self.name}: value is {len(value)} bytes, need {self._value_len}"
            )
        with self._lock:
            self._check_open()
            self._elem.update(key, value, flags)

    def update(self, key: Any, value: Any, flags: int = UpdateFlag.ANY) -> None:
        """Set ``key`` to ``value``. For sockmap/sockhash, ``value`` is a socket or an fd.

        Args:
            flags: ``UpdateFlag.ANY`` (default), ``NOEXIST`` (create only), ``EXIST``
                (replace only).
        """
        self._update_raw(self._key(key), self._encode_value(value), flags)

    def insert_socket(self, key: Any, sock: socket.socket | int) -> None:
        """Add a socket to a sockmap/sockhash (TCP must be ESTABLISHED or LISTEN)."""
        if self.spec.type not in SOCKET_MAP_TYPES:
            raise LoaderError(f"map {self.name} is {self.spec.type.name}, not a socket map")
        self.update(key, sock)

    def delete(self, key: Any) -> bool:
        """Delete ``key``; ``False`` if it was not there."""
        k = self._key(key)
        with self._lock:
            self._check_open()
            return self._elem.delete(k)

    def __getitem__(self, key: Any) -> Any:
        value = self.lookup(key, _MISSING)
        if value is _MISSING:
            raise KeyError(key)
        return value

    def __setitem__(self, key: Any, value: Any) -> None:
        self.update(key, value)

    def __delitem__(self, key: Any) -> None:
        if not self.delete(key):
            raise KeyError(key)

    def __contains__(self, key: Any) -> bool:
        return self.lookup(key, _MISSING) is not _MISSING

    def keys(self) -> Iterator[Any]:
        """Iterate keys with ``BPF_MAP_GET_NEXT_KEY`` (a concurrent delete can restart it)."""
        key = None
        while (key := bpf.map_get_next_key(self.fd, key, self.spec.key_size)) is not None:
            yield self.key_codec.decode(key)

    __iter__ = keys

    def items(self) -> Iterator[tuple[Any, Any]]:
        for key in self.keys():
            value = self.lookup(key, _MISSING)
            if value is not _MISSING:
                yield key, value

    def __len__(self) -> int:
        return sum(1 for _ in self.keys())

    def lookup_batch(self, batch_size: int = 256) -> list[tuple[Any, Any]]:
        """Read every entry with ``BPF_MAP_LOOKUP_BATCH`` (far cheaper per entry).

        Not atomic: entries added or removed during the walk may or may not be seen.
        """
        ksize, vsize = self.spec.key_size, self._value_len
        result = []
        for count, keys, values in self._batches(batch_size):
            kbuf = keys.read(ksize * count)
            vbuf = values.read(vsize * count)
            for i in range(count):
                result.append(
                    (
                        self.key_codec.decode(kbuf[i * ksize : (i + 1) * ksize]),
                        self._decode_value(vbuf[i * vsize : (i + 1) * vsize]),
                    )
                )
        return result

    def count_batch(self, batch_size: int = 256) -> int:
        """How many entries the map holds, by the walk :meth:`lookup_batch` makes but
        without decoding them (the kernel has no entry count for hash maps)."""
        return sum(count for count, _keys, _values in self._batches(batch_size))

    def _batches(self, batch_size: int) -> Iterator[tuple[int, Buffer, Buffer]]:
        """``(count, keys buffer, values buffer)`` per ``BPF_MAP_LOOKUP_BATCH`` call; the
        buffers are reused, so read them before the next item."""
        ksize, vsize = self.spec.key_size, self._value_len
        # Hash maps use a 4-byte bucket token; arrays use a key-sized one
        # (docs/kernel-facts.md, fact 23).
        token = max(ksize, 4)
        keys = Buffer(ksize * batch_size)
        values = Buffer(vsize * batch_size)
        out_batch = Buffer(token)
        in_batch = Buffer(token)
        first = True
        while True:
            count, done = bpf.map_lookup_batch(
                self.fd, None if first else in_batch, out_batch, keys, values, batch_size
            )
            yield count, keys, values
            if done:
                return
            in_batch.write(out_batch.read())
            first = False


_MISSING = object()


def _kernel_name(name: str) -> str:
    # The kernel accepts [A-Za-z0-9_.] and 15 bytes.
    return "".join(c if c.isalnum() or c in "_." else "_" for c in name)[:15]


def _create_fd(spec: MapSpec, btf_fd: FD | None) -> FD:
    use_btf = (
        btf_fd is not None
        and spec.type not in SOCKET_MAP_TYPES
        and spec.key_type_id
        and spec.value_type_id
    )
    kwargs: dict[str, Any] = {
        "flags": spec.flags,
        "name": _kernel_name(spec.kernel_name or spec.name),
        "numa_node": spec.numa_node,
        "map_extra": spec.map_extra,
    }
    try:
        if use_btf:
            assert btf_fd is not None
            try:
                return bpf.map_create(
                    spec.type,
                    spec.key_size,
                    spec.value_size,
                    spec.max_entries,
                    btf_fd=btf_fd.raw,
                    btf_key_type_id=spec.key_type_id,
                    btf_value_type_id=spec.value_type_id,
                    **kwargs,
                )
            except BPFSyscallError as exc:
                if exc.errno not in (errno.EINVAL, errno.ENOTSUP, 524):
                    raise
                # The kernel refused the BTF: retry without it, as libbpf does.
        return bpf.map_create(spec.type, spec.key_size, spec.value_size, spec.max_entries, **kwargs)
    except BPFSyscallError as exc:
        if exc.errno == errno.EINVAL:
            from .features import have_map_type

            try:
                have_map_type(spec.type)
            except NotSupportedError as unsupported:
                raise unsupported from exc
            raise BPFSyscallError(
                exc.errno,
                exc.command,
                f"map {spec.name!r} ({spec.type.name}, key {spec.key_size}, value "
                f"{spec.value_size}, max_entries {spec.max_entries}, flags {spec.flags:#x}) "
                f"was refused: check sizes and flags (LPM_TRIE needs BPF_F_NO_PREALLOC, "
                f"LRU maps must be preallocated, sockmap/sockhash values are 4 or 8 bytes)",
            ) from exc
        if exc.errno == 524 and spec.type in MAP_TYPE_MIN_KERNEL:
            raise BPFSyscallError(
                exc.errno,
                exc.command,
                f"map {spec.name!r}: the kernel does not support these flags for {spec.type.name}",
            ) from exc
        raise


def ensure_bpffs(directory: str) -> None:
    """Make sure ``directory`` is on a bpffs: mount one at the root if none is mounted.

    Subdirectories of a mounted bpffs are created as needed.
    """
    root = DEFAULT_PIN_ROOT
    if not directory.startswith(root + "/") and directory != root:
        os.makedirs(directory, exist_ok=True)
        return
    if not is_bpffs(root):
        mount_bpffs(root)
    os.makedirs(directory, exist_ok=True)
