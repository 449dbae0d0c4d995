"""Fuzz targets for the SOCKS5 client machine (whatever a SOCKS server sends back).

Invariants, as for the ClientHello reader: the machine returns NEED_DATA, returns
Socks5Connected, or raises a Socks5Error, nothing else; the bytes it sends and its outcome
(event and trailing bytes, or error type, reason and message) are the same whether the server's
bytes arrive whole, byte by byte or in random chunks; and a well-formed server transcript,
generated with structure (``strategies.socks5_server_replies``), always connects with the bound
address it carried. Mutations: truncation followed by garbage, one byte changed.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from hypothesis import example, given, note
from hypothesis import strategies as st
from strategies import Socks5Transcript, chunkings, socks5_server_replies

from trio_sni.sansio.socks5 import NEED_DATA, Socks5Client, Socks5Error


def make_client(auth: bool) -> Socks5Client:
    if auth:
        return Socks5Client("bench.test", 443, username="user", password="secret")
    return Socks5Client("bench.test", 443)


def outcome(auth: bool, chunks: Iterable[bytes], *, eof: bool) -> tuple[Any, ...]:
    client = make_client(auth)
    sent = client.data_to_send()
    event: Any = NEED_DATA
    try:
        event = client.next_event()
        for chunk in chunks:
            if not chunk:
                continue
            client.receive_data(chunk)
            if event is NEED_DATA:
                event = client.next_event()
                sent += client.data_to_send()
        if eof and event is NEED_DATA:
            client.receive_data(b"")
            event = client.next_event()
            raise AssertionError("NEED_DATA after EOF")  # next_event must raise or return
    except Socks5Error as exc:
        sent += client.data_to_send()
        return sent, ("error", type(exc), exc.reason, str(exc))
    if event is NEED_DATA:
        return sent, ("need_data",)
    return sent, ("connected", event, client.trailing_data)


def check(auth: bool, data: bytes, split: list[bytes], *, eof: bool) -> tuple[Any, ...]:
    note(f"pin with: @example({auth!r}, {data!r}, {eof!r}).via('issue #N')")
    whole = outcome(auth, [data], eof=eof)
    assert outcome(auth, [data[i : i + 1] for i in range(len(data))], eof=eof) == whole
    assert outcome(auth, split, eof=eof) == whole
    return whole


@given(st.booleans(), st.binary(max_size=300), st.booleans(), st.data())
@example(False, b"\x05\x00\x05\x00\x00\x03\x00\x00\x00", True, None).via(
    "seed: an empty domain-form BND.ADDR"
)
def test_arbitrary_replies(auth: bool, data: bytes, eof: bool, draw: Any) -> None:
    split = draw.draw(chunkings(data)) if draw is not None else [data]
    check(auth, data, split, eof=eof)


@given(st.data(), socks5_server_replies())
def test_well_formed_transcripts_connect(data: st.DataObject, transcript: Socks5Transcript) -> None:
    wire = transcript.wire + transcript.after
    sent, result = check(transcript.auth, wire, data.draw(chunkings(wire)), eof=False)
    assert result == ("connected", transcript.expected, transcript.after)
    # Greeting, optional credentials, then exactly one CONNECT for bench.test:443.
    assert sent.endswith(b"\x05\x01\x00\x03\x0abench.test\x01\xbb")


@given(st.data(), socks5_server_replies(), st.binary(max_size=32))
def test_truncation_then_garbage(
    data: st.DataObject, transcript: Socks5Transcript, garbage: bytes
) -> None:
    cut = data.draw(st.integers(0, len(transcript.wire)))
    mutated = transcript.wire[:cut] + garbage
    check(transcript.auth, mutated, data.draw(chunkings(mutated)), eof=data.draw(st.booleans()))


@given(st.data(), socks5_server_replies())
def test_one_byte_changed(data: st.DataObject, transcript: Socks5Transcript) -> None:
    wire = bytearray(transcript.wire)
    index = data.draw(st.integers(0, len(wire) - 1))
    wire[index] = data.draw(st.integers(0, 255))
    mutated = bytes(wire)
    check(transcript.auth, mutated, data.draw(chunkings(mutated)), eof=data.draw(st.booleans()))
