"""Fuzz targets for ClientHelloReader.

The invariants, in the spirit of h11's ``fuzz/afl-server.py``: whatever a client sends, the
reader returns NEED_DATA, returns a ClientHello, or raises a ClientHelloError; nothing else.
And the outcome (event, trailing bytes, or error type *and message*) does not depend on how the
bytes were chunked: whole, byte by byte and in random chunks must agree.

Inputs are seeded from the real captures in ``tests/data/hellos/`` and from structured hellos
(``strategies.client_hellos``), then mutated on purpose: truncated and followed by garbage,
one length field corrupted, re-framed into records. A finding is pinned with
``@example(...).via("issue #N")`` on the target that found it (see fuzz/README.md).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from hypothesis import example, given, note
from hypothesis import strategies as st
from strategies import GeneratedHello, chunkings, client_hellos, records

from trio_sni.sansio.clienthello import NEED_DATA, ClientHello, ClientHelloReader
from trio_sni.sansio.errors import ClientHelloError

CAPTURES = [
    p.read_bytes()
    for p in sorted((Path(__file__).resolve().parent.parent / "tests/data/hellos").glob("*.bin"))
]
captures = st.sampled_from(CAPTURES)


def outcome(chunks: Iterable[bytes], *, eof: bool) -> tuple[Any, ...]:
    """Feed chunks as the proxy does and return a comparable outcome.

    Only ClientHelloError is caught: any other exception propagates and fails the target.
    """
    reader = ClientHelloReader()
    event: ClientHello | None = None
    try:
        for chunk in chunks:
            if not chunk:
                continue  # b"" means EOF to the reader; a socket never returns it otherwise
            reader.receive_data(chunk)
            if event is None:
                result = reader.next_event()
                if result is not NEED_DATA:
                    event = result
        if eof:
            reader.receive_data(b"")
        if event is None:
            result = reader.next_event()
            if result is NEED_DATA:
                assert not eof, "NEED_DATA after EOF"
                return ("need_data",)
            event = result
    except ClientHelloError as exc:
        return ("error", type(exc), str(exc))
    return ("hello", event, reader.trailing_data)


def check_invariants(data: bytes, split: list[bytes], *, eof: bool) -> tuple[Any, ...]:
    """Whole, byte by byte and ``split`` give one outcome; return it.

    On failure hypothesis prints the note: exactly the arguments that pin the finding as an
    ``@example`` of :func:`test_arbitrary_bytes`.
    """
    cuts = [sum(len(c) for c in split[: i + 1]) for i in range(len(split) - 1)]
    note(f"pin with: @example({data!r}, {cuts!r}, {eof!r}).via('issue #N')")
    expected = outcome([data], eof=eof)
    assert outcome([data[i : i + 1] for i in range(len(data))], eof=eof) == expected
    assert outcome(split, eof=eof) == expected
    if expected[0] == "hello":
        event, trailing = expected[1], expected[2]
        assert event.raw + trailing == data  # nothing lost, nothing invented
        assert event.size <= ClientHelloReader().max_size
    return expected


def assert_matches(event: ClientHello, hello: GeneratedHello) -> None:
    assert event.server_name == hello.server_name
    assert event.alpn == hello.alpn
    assert event.supported_versions == hello.supported_versions
    assert event.legacy_version == hello.legacy_version
    assert event.has_ech == hello.has_ech


def split_at(raw: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c for c in cuts if 0 < c < len(raw)})
    return [raw[a:b] for a, b in zip([0, *points], [*points, len(raw)], strict=True)]


@given(st.binary(max_size=600), st.lists(st.integers(1, 600), max_size=20), st.booleans())
@example(b"\x16\x03\x01\x00\x05\x01\x00\x00\x00", [], True).via("seed: empty ClientHello body")
@example(
    b"\x16\x03\x01\x00\x42\x01\x00\x00\x3a\x03\x03"
    + bytes(32)
    + b"\x00\x00\x02\x13\x01\x01\x00"
    + b"\x00\x0f\x00\x00\x00\x0b\x00\x09\x00\x00\x06a.test"
    + b"\x14\x00\x00\x00",
    [9],
    False,
).via("bytes after the hello in its record were parsed as part of it (found by a unit test)")
def test_arbitrary_bytes(raw: bytes, cuts: list[int], eof: bool) -> None:
    check_invariants(raw, split_at(raw, cuts), eof=eof)


@given(st.data(), st.binary(min_size=5, max_size=600), st.booleans())
def test_bytes_behind_a_plausible_record_header(data: st.DataObject, raw: bytes, eof: bool) -> None:
    # Random bytes rarely start with 0x16 0x03; give them a handshake header so the fuzzer
    # spends its time in the record and handshake layers.
    framed = b"\x16\x03\x01" + len(raw).to_bytes(2, "big") + b"\x01" + raw
    check_invariants(framed, data.draw(chunkings(framed)), eof=eof)


@given(st.data(), client_hellos())
def test_structured_hello_round_trips(data: st.DataObject, hello: GeneratedHello) -> None:
    framed = data.draw(records(hello.message))
    result = check_invariants(framed, data.draw(chunkings(framed)), eof=data.draw(st.booleans()))
    kind, event, trailing = result
    assert kind == "hello"
    assert_matches(event, hello)
    assert event.raw == framed
    assert trailing == b""


@given(
    st.data(), st.one_of(captures, client_hellos().map(lambda h: h.message)), st.binary(max_size=64)
)
def test_truncation_then_garbage(data: st.DataObject, base: bytes, garbage: bytes) -> None:
    # mitmproxy's test_tls_fuzz: a prefix of a valid hello, then anything.
    framed = base if base[:1] == b"\x16" else data.draw(records(base))
    cut = data.draw(st.integers(0, len(framed)))
    mutated = framed[:cut] + garbage
    eof = data.draw(st.booleans())
    result = check_invariants(mutated, data.draw(chunkings(mutated)), eof=eof)
    if cut == len(framed) and result[0] != "error":
        # The whole hello arrived: garbage after it is trailing data, never part of the hello.
        _, event, trailing = result
        assert event.raw == framed
        assert trailing == garbage


@given(st.data(), client_hellos())
def test_one_corrupted_length(data: st.DataObject, hello: GeneratedHello) -> None:
    offset, width = data.draw(st.sampled_from(hello.length_fields))
    value = data.draw(st.integers(0, (1 << (8 * width)) - 1))
    message = bytearray(hello.message)
    message[offset : offset + width] = value.to_bytes(width, "big")
    framed = data.draw(records(bytes(message)))
    check_invariants(framed, data.draw(chunkings(framed)), eof=data.draw(st.booleans()))


@given(st.data(), st.one_of(captures, client_hellos().map(lambda h: h.message)))
def test_one_corrupted_byte(data: st.DataObject, base: bytes) -> None:
    framed = bytearray(base if base[:1] == b"\x16" else data.draw(records(base)))
    index = data.draw(st.integers(0, len(framed) - 1))
    framed[index] = data.draw(st.integers(0, 255))
    check_invariants(bytes(framed), data.draw(chunkings(bytes(framed))), eof=True)


@given(st.data(), captures)
def test_captures_reframed(data: st.DataObject, raw: bytes) -> None:
    message = bytearray()
    pos = 0
    while pos < len(raw):
        length = int.from_bytes(raw[pos + 3 : pos + 5], "big")
        message += raw[pos + 5 : pos + 5 + length]
        pos += 5 + length
    original = outcome([raw], eof=True)
    framed = data.draw(records(bytes(message)))
    result = check_invariants(framed, data.draw(chunkings(framed)), eof=True)
    if original[0] == "hello":
        assert result[0] == "hello"
        for field in ("server_name", "alpn", "supported_versions", "legacy_version", "has_ech"):
            assert getattr(result[1], field) == getattr(original[1], field)
    else:
        assert result == original
