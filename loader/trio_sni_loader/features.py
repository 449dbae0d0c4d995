"""Cached feature probes: ask the kernel instead of parsing ``uname``.

Each ``have_*`` function returns ``None`` when the feature works and raises
:class:`~loader.errors.NotSupportedError` (naming the feature and the first kernel that has
it) when it does not. Only those two outcomes are conclusive and cached; anything else (no
privilege, for example) is raised as is and not cached, so a later call can succeed.
:func:`probe_all` collects the answers the proxy uses to explain why acceleration is off.
"""

from __future__ import annotations

import errno
import socket
import threading
from collections.abc import Callable

from . import asm
from ._sys import bpf
from ._sys.consts import (
    MAP_TYPE_MIN_KERNEL,
    PROG_TYPE_MIN_KERNEL,
    AttachType,
    MapFlag,
    MapType,
    ProgType,
    XDPFlag,
)
from .errors import BPFSyscallError, NotSupportedError

__all__ = ["have_link", "have_map_type", "have_prog_type", "probe_all", "reset_cache"]

_lock = threading.Lock()
_cache: dict[tuple[str, int | str], NotSupportedError | None] = {}

#: Minimum kernel for BPF links per attach point (docs/kernel-facts.md, fact 15).
LINK_MIN_KERNEL = {"xdp": "5.9", "tcx": "6.6", "sockmap": "6.10"}


def reset_cache() -> None:
    with _lock:
        _cache.clear()


def _cached(key: tuple[str, int | str], probe: Callable[[], NotSupportedError | None]) -> None:
    with _lock:
        if key in _cache:
            result = _cache[key]
            if result is not None:
                raise result
            return
    result = probe()
    with _lock:
        _cache[key] = result
    if result is not None:
        raise result


def have_map_type(map_type: MapType) -> None:
    """``None`` if the kernel can create maps of ``map_type``, else NotSupportedError."""
    map_type = MapType(map_type)

    def probe() -> NotSupportedError | None:
        key_size, value_size, max_entries, flags = 4, 4, 1, 0
        if map_type == MapType.LPM_TRIE:
            key_size, flags = 8, MapFlag.NO_PREALLOC
        elif map_type in (MapType.SOCKHASH, MapType.SOCKMAP):
            value_size = 8
        elif map_type in (MapType.RINGBUF, MapType.USER_RINGBUF):
            key_size, value_size, max_entries = 0, 0, 4096
        elif map_type in (MapType.QUEUE, MapType.STACK, MapType.BLOOM_FILTER):
            key_size = 0
        try:
            fd = bpf.map_create(
                map_type, key_size, value_size, max_entries, flags=int(flags), name="probe"
            )
        except BPFSyscallError as exc:
            if exc.errno in (errno.EINVAL, 524):
                return NotSupportedError(
                    f"BPF_MAP_TYPE_{map_type.name}", MAP_TYPE_MIN_KERNEL.get(map_type, "?")
                )
            raise
        fd.close()
        return None

    _cached(("map", int(map_type)), probe)


def have_prog_type(prog_type: ProgType) -> None:
    """``None`` if the kernel can load programs of ``prog_type``, else NotSupportedError."""
    prog_type = ProgType(prog_type)

    def probe() -> NotSupportedError | None:
        try:
            fd = bpf.prog_load(prog_type, asm.exit_with(0), "GPL", name="probe")
        except BPFSyscallError as exc:
            if exc.errno in (errno.EINVAL, 524):
                return NotSupportedError(
                    f"BPF_PROG_TYPE_{prog_type.name}", PROG_TYPE_MIN_KERNEL.get(prog_type, "?")
                )
            raise
        fd.close()
        return None

    _cached(("prog", int(prog_type)), probe)


def have_link(kind: str) -> None:
    """``None`` if ``BPF_LINK_CREATE`` supports ``kind`` ("xdp", "tcx" or "sockmap").

    Probes with a real program and an invalid target: a kernel that knows the link type
    complains about the target (ENODEV, EBADF), one that does not rejects the attach type.
    XDP answers EINVAL for a missing device too, so its probe attaches an ``XDP_PASS``
    program to ``lo`` in generic mode for an instant (EBUSY: something else holds ``lo``'s
    hook, which also proves the kernel knows XDP links).
    """
    if kind not in LINK_MIN_KERNEL:
        raise ValueError(f"unknown link kind {kind!r}")

    def probe() -> NotSupportedError | None:
        prog_type, attach = {
            "xdp": (ProgType.XDP, AttachType.XDP),
            "tcx": (ProgType.SCHED_CLS, AttachType.TCX_INGRESS),
            "sockmap": (ProgType.SK_SKB, AttachType.SK_SKB_STREAM_VERDICT),
        }[kind]
        expected = attach if kind != "tcx" else 0
        verdict = 2 if kind == "xdp" else 0  # XDP_PASS: lo keeps working during the probe
        fd = bpf.prog_load(
            prog_type, asm.exit_with(verdict), "GPL", name="probe", expected_attach_type=expected
        )
        try:
            # An ifindex that cannot exist, or an fd that is not open.
            target, flags = 0x7FFFFFFF, 0
            if kind == "xdp":
                target, flags = socket.if_nametoindex("lo"), int(XDPFlag.SKB_MODE)
            try:
                link = bpf.link_create(fd.raw, target, attach, flags)
            except BPFSyscallError as exc:
                if exc.errno in (errno.ENODEV, errno.EBADF, errno.ENXIO, errno.EBUSY):
                    return None
                if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP, 524):
                    return NotSupportedError(f"BPF link for {kind}", LINK_MIN_KERNEL[kind])
                raise
            link.close()
            return None
        finally:
            fd.close()

    _cached(("link", kind), probe)


def probe_all() -> dict[str, str | None]:
    """``{feature: None | reason}`` for what the project uses; reasons are readable text."""
    checks: dict[str, Callable[[], None]] = {
        "sockhash": lambda: have_map_type(MapType.SOCKHASH),
        "sk_skb": lambda: have_prog_type(ProgType.SK_SKB),
        "lpm_trie": lambda: have_map_type(MapType.LPM_TRIE),
        "lru_hash": lambda: have_map_type(MapType.LRU_HASH),
        "percpu_array": lambda: have_map_type(MapType.PERCPU_ARRAY),
        "xdp": lambda: have_prog_type(ProgType.XDP),
        "xdp_link": lambda: have_link("xdp"),
        "sched_cls": lambda: have_prog_type(ProgType.SCHED_CLS),
        "tcx_link": lambda: have_link("tcx"),
        "sockmap_link": lambda: have_link("sockmap"),
    }
    out: dict[str, str | None] = {}
    for name, check in checks.items():
        try:
            check()
            out[name] = None
        except (NotSupportedError, OSError) as exc:
            out[name] = str(exc)
    return out
