"""What the readers of a connection's first bytes share: buffering, EOF, sticky results.

The ClientHello, PROXY-header and HTTP-request readers all follow h11's shape: the caller
feeds bytes with ``receive_data`` (``b""`` is EOF) and polls ``next_event``, which returns
``NEED_DATA`` or the finished event, or raises a typed error. Once an event is returned it
is returned again on every call, and once an error is raised it is raised again, so a caller
cannot go on past either by mistake. Bytes after the event's own (``raw``) bytes are kept as
``trailing_data`` for the caller to forward.
"""

from __future__ import annotations

import enum
from typing import ClassVar, Final, Generic, Literal, Protocol, TypeVar

from .errors import TrioSniError


class NeedData(enum.Enum):
    """The type of :data:`NEED_DATA` (an enum member, so ``is`` narrows the type)."""

    NEED_DATA = "NEED_DATA"


NEED_DATA: Final = NeedData.NEED_DATA
"""Returned by ``next_event`` until the event is complete."""


class _HasRaw(Protocol):
    @property
    def raw(self) -> bytes: ...


EventT = TypeVar("EventT", bound=_HasRaw)


class BufferedReader(Generic[EventT]):
    """Base of the first-bytes readers; subclasses implement :meth:`_advance`.

    ``_advance`` parses as far as the buffer allows and sets ``self._event`` when done;
    ``_truncated`` says what EOF before that means. Errors of the ``_errors`` family are
    remembered; anything else is a bug and propagates as is.
    """

    _errors: ClassVar[type[TrioSniError]]

    def __init__(self) -> None:
        self._buf = bytearray()
        self._eof = False
        self._event: EventT | None = None
        self._error: TrioSniError | None = None

    @property
    def bytes_received(self) -> int:
        """Everything fed so far, event and trailing bytes together (for logs)."""
        return len(self._buf)

    @property
    def trailing_data(self) -> bytes:
        """Bytes received after the event's own; empty until the event is returned."""
        if self._event is None:
            return b""
        return bytes(self._buf[len(self._event.raw) :])

    def receive_data(self, data: bytes) -> None:
        """Buffer bytes from the peer; ``b""`` means it closed its side (EOF).

        Nothing is parsed here, so this never raises for bad input: call :meth:`next_event`.

        Raises:
            RuntimeError: data after EOF (a bug in the caller).
        """
        if not data:
            self._eof = True
            return
        if self._eof:
            raise RuntimeError("received data after EOF")
        self._buf += data

    def next_event(self) -> EventT | Literal[NeedData.NEED_DATA]:
        """Parse what has arrived; return the event, or :data:`NEED_DATA` if incomplete.

        Raises:
            TrioSniError: the subclass's error family (see the class docstring).
        """
        if self._event is not None:
            return self._event
        if self._error is not None:
            raise self._error
        try:
            self._advance()
            if self._event is None and self._eof:
                raise self._truncated()
        except self._errors as exc:
            self._error = exc
            raise
        return NEED_DATA if self._event is None else self._event

    def _advance(self) -> None:
        raise NotImplementedError

    def _truncated(self) -> TrioSniError:
        raise NotImplementedError
