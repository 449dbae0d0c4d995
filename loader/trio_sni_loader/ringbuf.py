"""Reading a BPF ring buffer (``BPF_MAP_TYPE_RINGBUF``) from Python, through mmap.

The kernel's layout (``kernel/bpf/ringbuf.c``): page 0 holds the consumer position (the only
page userspace may write), page 1 the producer position, then the data pages, mapped twice in
a row so that a record that wraps around is contiguous. Each record starts with an 8-byte
header ``{u32 len (bit 31 busy, bit 30 discarded), u32 page offset}`` and is padded to 8 bytes.
The map's fd is readable (epoll ``EPOLLIN``, level-triggered) while unread records exist.
"""

from __future__ import annotations

import mmap
import struct

from .maps import Map

_HEADER = 8
_BUSY = 1 << 31
_DISCARD = 1 << 30
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")


class RingReader:
    """The consumer side of one ring buffer map; :meth:`close` it before the map."""

    def __init__(self, ring: Map) -> None:
        size = ring.spec.max_entries
        page = mmap.PAGESIZE
        self.fd = ring.fd
        self._mask = size - 1
        self._page = page
        self._consumer = mmap.mmap(
            ring.fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0
        )
        try:
            self._producer = mmap.mmap(
                ring.fd, page + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page
            )
        except BaseException:
            self._consumer.close()
            raise

    def read(self) -> list[bytes]:
        """Every complete record not read yet (discarded ones skipped), oldest first."""
        out: list[bytes] = []
        consumed = _U64.unpack_from(self._consumer, 0)[0]
        produced = _U64.unpack_from(self._producer, 0)[0]
        while consumed < produced:
            at = self._page + (consumed & self._mask)
            header = _U32.unpack_from(self._producer, at)[0]
            if header & _BUSY:
                break  # still being written; the next read gets it
            length = header & ~(_BUSY | _DISCARD)
            if not header & _DISCARD:
                out.append(self._producer[at + _HEADER : at + _HEADER + length])
            consumed += (_HEADER + length + 7) & ~7
            _U64.pack_into(self._consumer, 0, consumed)
        return out

    def close(self) -> None:
        self._consumer.close()
        self._producer.close()
