"""A bounded reader for TLS presentation-language structures (RFC 8446 section 3).

Every TLS structure the ClientHello parser walks is made of fixed-size big-endian integers and
length-prefixed vectors nested inside each other. :class:`Cursor` reads them from a
``memoryview`` without copying, and every read is checked against the end of the *innermost*
vector, not the end of the buffer: a length field that claims more bytes than its container
holds is caught where it lies, instead of silently reading into the next field.

A failed read raises :class:`DecodeError`, which names the field and carries the offset at
which it starts. The offset is counted from the start of the outermost buffer (the cursor a
caller created), so an operator can find it in a hex dump. ``DecodeError`` is deliberately *not*
a :class:`~trio_sni.sansio.errors.ClientHelloError`: it is an internal signal, and the reader
turns it into ``MalformedHelloError`` at the one place where client bytes enter (the way h11
turns ``LocalProtocolError`` into ``RemoteProtocolError``). If a ``DecodeError`` ever escapes to
a caller, that is a bug in the reader.
"""

from __future__ import annotations

from collections.abc import Callable, Container
from typing import Final

__all__ = ["Cursor", "DecodeError"]

# The largest length each width of length prefix TLS uses can hold (uint8, uint16, uint24).
_LENGTH_LIMITS: Final = {1: 0xFF, 2: 0xFFFF, 3: 0xFFFFFF}


class DecodeError(Exception):
    """A structure does not fit in the bytes it was given.

    Args:
        detail: what is wrong, naming the field (``"cipher_suites length 7 is odd"``).
        offset: where the offending field starts, from the start of the outermost buffer.
    """

    def __init__(self, detail: str, offset: int) -> None:
        self.detail = detail
        self.offset = offset
        super().__init__(f"{detail} (at offset {offset})")


class Cursor:
    """Reads integers and vectors from ``data``, never past ``data``'s end.

    A cursor is cheap (it wraps a ``memoryview``), so nested vectors get their own cursor from
    :meth:`vector`; the parent has already skipped past the whole vector, which keeps the
    parent's position correct even if the child is only partly read.

    Args:
        data: the bytes to read; not copied.
        base: the offset of ``data[0]`` in the outermost buffer, used only in error messages.
    """

    __slots__ = ("_base", "_data", "_end", "_pos")

    def __init__(self, data: bytes | bytearray | memoryview, *, base: int = 0) -> None:
        view = memoryview(data)
        self._data = view if view.format == "B" else view.cast("B")
        self._pos = 0
        self._end = len(self._data)
        self._base = base

    @property
    def offset(self) -> int:
        """Absolute offset of the next byte to be read (for error messages)."""
        return self._base + self._pos

    @property
    def remaining(self) -> int:
        """Bytes left in this cursor's span."""
        return self._end - self._pos

    def at_end(self) -> bool:
        """True when every byte of this span has been read."""
        return self._pos == self._end

    # The readers below are the parser's inner loop (a ClientHello is ~100 reads): they index
    # the view directly instead of slicing it and converting the slice.

    def _truncated(self, n: int, what: str) -> DecodeError:
        return DecodeError(
            f"{what} is truncated: needs {n} bytes, {self.remaining} left", self.offset
        )

    def _take(self, n: int, what: str) -> memoryview:
        pos = self._pos
        end = pos + n
        if end > self._end:
            raise self._truncated(n, what)
        self._pos = end
        return self._data[pos:end]

    def _uint(self, width: int, what: str) -> int:
        pos = self._pos
        if pos + width > self._end:
            raise self._truncated(width, what)
        data = self._data
        value = data[pos]
        for i in range(pos + 1, pos + width):
            value = (value << 8) | data[i]
        self._pos = pos + width
        return value

    def u8(self, what: str) -> int:
        """Read a uint8 named ``what``."""
        pos = self._pos
        if pos >= self._end:
            raise self._truncated(1, what)
        self._pos = pos + 1
        return self._data[pos]

    def u16(self, what: str) -> int:
        """Read a big-endian uint16 named ``what``."""
        pos = self._pos
        if pos + 2 > self._end:
            raise self._truncated(2, what)
        self._pos = pos + 2
        data = self._data
        return (data[pos] << 8) | data[pos + 1]

    def u24(self, what: str) -> int:
        """Read a big-endian uint24 named ``what`` (handshake message lengths)."""
        return self._uint(3, what)

    def raw(self, n: int, what: str) -> memoryview:
        """Read ``n`` bytes as a view (no copy)."""
        return self._take(n, what)

    def vector(
        self, width: int, what: str, *, min_len: int = 0, max_len: int | None = None
    ) -> Cursor:
        """Read a vector with a ``width``-byte length prefix and return a cursor over its body.

        ``min_len``/``max_len`` are the bounds RFC 8446 writes as ``<min..max>``; checking them
        here means a caller never has to remember to.

        Args:
            width: 1, 2 or 3: the size of the length prefix.
            what: the field's name, for error messages.
            min_len: smallest legal body length in bytes.
            max_len: largest legal body length; defaults to the prefix's maximum.

        Raises:
            DecodeError: the prefix or body does not fit, or the length is out of bounds.
        """
        try:
            limit = _LENGTH_LIMITS[width]
        except KeyError:
            raise ValueError(f"vector length prefix must be 1, 2 or 3 bytes, not {width}") from None
        pos = self._pos
        if pos + width > self._end:
            raise self._truncated(width, f"{what} length")
        data = self._data
        if width == 2:
            length = (data[pos] << 8) | data[pos + 1]
        elif width == 1:
            length = data[pos]
        else:
            length = (data[pos] << 16) | (data[pos + 1] << 8) | data[pos + 2]
        upper = limit if max_len is None else max_len
        if not min_len <= length <= upper:
            raise DecodeError(f"{what} length {length} is outside {min_len}..{upper}", self.offset)
        return self._child(pos + width, length, what)

    def extension(
        self, name_of: Callable[[int], str], wanted: Container[int]
    ) -> tuple[int, Cursor | None]:
        """Read a TLS extension (RFC 8446 section 4.2): a uint16 type, then a vector with a
        2-byte length prefix. Returns the type and a cursor over the body, or ``None`` for a
        type not in ``wanted``: its framing is checked and it is skipped without a cursor (a
        ClientHello has a dozen extensions, and this is the parser's inner loop).

        ``name_of(type)`` names the extension in an error message; it is called only then.
        """
        pos = self._pos
        if pos + 4 > self._end:
            if pos + 2 > self._end:
                raise self._truncated(2, "extension type")
            what = f"extension {name_of((self._data[pos] << 8) | self._data[pos + 1])} length"
            self._pos = pos + 2
            raise self._truncated(2, what)
        data = self._data
        ext_type = (data[pos] << 8) | data[pos + 1]
        length = (data[pos + 2] << 8) | data[pos + 3]
        self._pos = pos + 2
        if pos + 4 + length > self._end:
            return ext_type, self._child(pos + 4, length, f"extension {name_of(ext_type)}")
        if ext_type not in wanted:
            self._pos = pos + 4 + length
            return ext_type, None
        return ext_type, self._child(pos + 4, length, "")

    def _child(self, pos: int, length: int, what: str) -> Cursor:
        """The cursor over the ``length`` bytes at ``pos`` (just past a length prefix, which
        starts at the current position); this cursor moves past them."""
        if pos + length > self._end:
            raise DecodeError(
                f"{what} length {length} overruns its container ({self._end - pos} bytes left)",
                self.offset,
            )
        self._pos = pos + length
        child = Cursor.__new__(Cursor)  # the slice of a "B" view is one already: no checks
        child._data = self._data[pos : pos + length]
        child._pos = 0
        child._end = length
        child._base = self._base + pos
        return child

    def expect_end(self, what: str) -> None:
        """Raise unless every byte of ``what`` was consumed (no trailing junk is allowed)."""
        if not self.at_end():
            raise DecodeError(
                f"{self.remaining} unexpected bytes at the end of {what}", self.offset
            )
