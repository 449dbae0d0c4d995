"""C memory for the kernel to read or write, without handing cffi objects to the loader.

A ``bpf()`` attr points at userspace memory with a 64-bit address (batch keys and values, the
verifier log). :class:`Buffer` owns such memory: the wrappers in :mod:`loader._sys.bpf` put its
:attr:`~Buffer.address` into the attr, and its owner reads and writes it as bytes. Keep the
:class:`Buffer` alive until the call that uses it returns.
"""

from __future__ import annotations

from ._ffi import ffi

__all__ = ["Buffer"]


class Buffer:
    """``size`` zeroed bytes of C memory at a fixed :attr:`address`."""

    __slots__ = ("_memory", "address", "size")

    def __init__(self, size: int) -> None:
        self._memory = ffi.new("char[]", size)
        self.size = size
        self.address = int(ffi.cast("uintptr_t", self._memory))

    def read(self, length: int | None = None) -> bytes:
        """A copy of the first ``length`` bytes (all of them by default)."""
        return bytes(ffi.buffer(self._memory, self.size if length is None else length))

    def write(self, data: bytes) -> None:
        """Copy ``data`` to the start of the buffer."""
        if len(data) > self.size:
            raise ValueError(f"{len(data)} bytes do not fit a {self.size}-byte buffer")
        ffi.memmove(self._memory, data, len(data))

    def text(self) -> str:
        """The NUL-terminated text the kernel wrote (a log), undecodable bytes replaced."""
        return bytes(ffi.string(self._memory)).decode(errors="replace")
