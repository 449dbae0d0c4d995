"""The fuzz harness for the sans-I/O readers built on ``BufferedReader`` (PROXY header, HTTP
request head): what a reader makes of some bytes must not depend on how they were split."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from hypothesis import note

from trio_sni.sansio._reader import NEED_DATA, BufferedReader
from trio_sni.sansio.errors import TrioSniError


def outcome(
    reader: BufferedReader[Any], error: type[TrioSniError], chunks: Iterable[bytes], *, eof: bool
) -> tuple[Any, ...]:
    """``("event", event, trailing)``, ``("need_data",)`` or ``("error", type, reason,
    status_hint, message)``: what ``reader`` makes of ``chunks`` (then EOF if ``eof``).
    NEED_DATA after EOF, or any exception but ``error``, is a bug."""
    event: Any = NEED_DATA
    try:
        for chunk in chunks:
            if not chunk:
                continue
            reader.receive_data(chunk)
            if event is NEED_DATA:
                event = reader.next_event()
        if eof and event is NEED_DATA:
            reader.receive_data(b"")
            reader.next_event()
            raise AssertionError("NEED_DATA after EOF")
    except error as exc:
        hint = getattr(exc, "status_hint", None)
        return ("error", type(exc), getattr(exc, "reason", None), hint, str(exc))
    if event is NEED_DATA:
        return ("need_data",)
    return ("event", event, reader.trailing_data)


def check_any_split(
    new_reader: Callable[[], BufferedReader[Any]],
    error: type[TrioSniError],
    data: bytes,
    split: list[bytes],
    *,
    eof: bool,
) -> tuple[Any, ...]:
    """The outcome of ``data`` whole, byte by byte and as ``split`` must be the same, and an
    event's raw bytes plus the trailing bytes must be ``data``; returns that outcome."""
    note(f"pin with: @example({data!r}, {eof!r}).via('issue #N')")
    whole = outcome(new_reader(), error, [data], eof=eof)
    one_by_one = [data[i : i + 1] for i in range(len(data))]
    assert outcome(new_reader(), error, one_by_one, eof=eof) == whole
    assert outcome(new_reader(), error, split, eof=eof) == whole
    if whole[0] == "event":
        assert whole[1].raw + whole[2] == data
    return whole
