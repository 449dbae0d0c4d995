"""Fuzz targets for the PROXY protocol reader (whatever a load balancer, or anyone, sends).

Invariants: the reader returns NEED_DATA, returns a ProxyHeader, or raises a
ProxyHeaderError, nothing else; the outcome (header and trailing bytes, or error type and
message) does not depend on the chunking; ``header.raw + trailing_data`` is exactly the input;
and every header the encoders write (``strategies.proxy_headers``, v2 ones with random TLVs)
reads back to the addresses it was built from. Mutations: truncation then garbage, one length
byte or one byte anywhere changed.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from hypothesis import example, given, note
from hypothesis import strategies as st
from strategies import GeneratedProxyHeader, chunkings, proxy_headers

from trio_sni.sansio.proxy_protocol import (
    MAX_V2_PAYLOAD,
    NEED_DATA,
    V2_SIGNATURE,
    ProxyHeaderError,
    ProxyHeaderReader,
)


def outcome(chunks: Iterable[bytes], *, eof: bool) -> tuple[Any, ...]:
    reader = ProxyHeaderReader()
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
    except ProxyHeaderError as exc:
        return ("error", type(exc), exc.reason, str(exc))
    if event is NEED_DATA:
        return ("need_data",)
    return ("header", event, reader.trailing_data)


def check(data: bytes, split: list[bytes], *, eof: bool) -> tuple[Any, ...]:
    note(f"pin with: @example({data!r}, {eof!r}).via('issue #N')")
    whole = outcome([data], eof=eof)
    assert outcome([data[i : i + 1] for i in range(len(data))], eof=eof) == whole
    assert outcome(split, eof=eof) == whole
    if whole[0] == "header":
        header, trailing = whole[1], whole[2]
        assert header.raw + trailing == data
        assert len(header.raw) <= 16 + MAX_V2_PAYLOAD
    return whole


@given(st.binary(max_size=300), st.booleans(), st.data())
@example(b"PROXY UNKNOWN\r\n", True, None).via("seed: v1 UNKNOWN")
@example(V2_SIGNATURE + b"\x21\x11\x00\x0c" + bytes(12), False, None).via("seed: v2 TCP4")
def test_arbitrary_bytes(data: bytes, eof: bool, draw: Any) -> None:
    check(data, draw.draw(chunkings(data)) if draw is not None else [data], eof=eof)


@given(
    st.sampled_from([b"PROXY ", V2_SIGNATURE]), st.binary(max_size=300), st.booleans(), st.data()
)
def test_bytes_behind_a_signature(
    prefix: bytes, rest: bytes, eof: bool, draw: st.DataObject
) -> None:
    data = prefix + rest
    check(data, draw.draw(chunkings(data)), eof=eof)


@given(st.data(), proxy_headers(), st.binary(max_size=32))
def test_generated_headers_read_back(
    data: st.DataObject, generated: GeneratedProxyHeader, after: bytes
) -> None:
    wire = generated.data + after
    kind, header, trailing = check(wire, data.draw(chunkings(wire)), eof=False)
    assert kind == "header"
    assert (header.version, header.source, header.destination) == (
        generated.version, generated.source, generated.destination
    )
    assert trailing == after


@given(st.data(), proxy_headers(), st.binary(max_size=32))
def test_truncation_then_garbage(
    data: st.DataObject, generated: GeneratedProxyHeader, garbage: bytes
) -> None:
    cut = data.draw(st.integers(0, len(generated.data)))
    mutated = generated.data[:cut] + garbage
    check(mutated, data.draw(chunkings(mutated)), eof=data.draw(st.booleans()))


@given(st.data(), proxy_headers())
def test_one_byte_changed(data: st.DataObject, generated: GeneratedProxyHeader) -> None:
    wire = bytearray(generated.data)
    # Half the time hit the v2 length field or family, where the bounds checks live.
    if generated.version == 2 and data.draw(st.booleans()):
        index = data.draw(st.integers(12, 15))
    else:
        index = data.draw(st.integers(0, len(wire) - 1))
    wire[index] = data.draw(st.integers(0, 255))
    mutated = bytes(wire)
    check(mutated, data.draw(chunkings(mutated)), eof=data.draw(st.booleans()))
