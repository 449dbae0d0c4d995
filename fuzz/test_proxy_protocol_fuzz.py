"""Fuzz targets for the PROXY protocol reader (whatever a load balancer, or anyone, sends).

Invariants: the reader returns NEED_DATA, returns a ProxyHeader, or raises a
ProxyHeaderError, nothing else; the outcome (header and trailing bytes, or error type and
message) does not depend on the chunking; ``header.raw + trailing_data`` is exactly the input;
and every header the encoders write (``strategies.proxy_headers``, v2 ones with random TLVs)
reads back to the addresses it was built from. Mutations: truncation then garbage, one length
byte or one byte anywhere changed.
"""

from __future__ import annotations

from typing import Any

from hypothesis import example, given
from hypothesis import strategies as st
from readers import check_any_split
from strategies import GeneratedProxyHeader, chunkings, proxy_headers

from trio_sni.sansio.proxy_protocol import (
    MAX_V2_PAYLOAD,
    V2_SIGNATURE,
    ProxyHeaderError,
    ProxyHeaderReader,
)


def check(data: bytes, split: list[bytes], *, eof: bool) -> tuple[Any, ...]:
    whole = check_any_split(ProxyHeaderReader, ProxyHeaderError, data, split, eof=eof)
    if whole[0] == "event":
        assert len(whole[1].raw) <= 16 + MAX_V2_PAYLOAD
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
    assert kind == "event"
    assert (header.version, header.source, header.destination) == (
        generated.version,
        generated.source,
        generated.destination,
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
