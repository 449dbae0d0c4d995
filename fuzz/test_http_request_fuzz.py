"""Fuzz targets for the Host reader of ``http`` listeners.

Invariants: NEED_DATA, an HttpRequest or an HttpRequestError, nothing else; the outcome does
not depend on the chunking; ``request.raw + trailing_data`` is exactly the input; the head
never exceeds the cap; and a generated request (any header order, CRLF or bare LF, random
extra headers, a body) yields its Host.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from readers import check_any_split
from strategies import chunkings, sni_names

from trio_sni.sansio.http_request import HttpRequestError, HttpRequestReader

MAX = 512  # small, so that the fuzzer reaches the cap often


def check(data: bytes, split: list[bytes], *, eof: bool) -> tuple[Any, ...]:
    def new_reader() -> HttpRequestReader:
        return HttpRequestReader(max_size=MAX)

    whole = check_any_split(new_reader, HttpRequestError, data, split, eof=eof)
    if whole[0] == "event":
        assert len(whole[1].raw) <= MAX
    return whole


@given(st.binary(max_size=700), st.booleans(), st.data())
def test_arbitrary_bytes(data: bytes, eof: bool, draw: st.DataObject) -> None:
    check(data, draw.draw(chunkings(data)), eof=eof)


_TOKEN = st.text(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-", min_size=1, max_size=12
)
_VALUE = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=30)


@given(st.data(), sni_names(), st.sampled_from([b"\r\n", b"\n"]), st.binary(max_size=40))
def test_generated_requests_yield_their_host(
    data: st.DataObject, names: tuple[bytes, str], newline: bytes, body: bytes
) -> None:
    sent, host = names[0].decode("ascii"), names[1]
    headers = [
        (name, value)
        for name, value in data.draw(st.lists(st.tuples(_TOKEN, _VALUE), max_size=5))
        if name.lower() != "host"
    ]
    position = data.draw(st.integers(0, len(headers)))
    headers.insert(position, ("Host", sent + data.draw(st.sampled_from(["", ":80", ":8080"]))))
    method = data.draw(st.sampled_from(["GET", "POST", "HEAD", "OPTIONS", "PURGE"]))
    head = (
        newline.join(
            [f"{method} /{data.draw(_TOKEN)} HTTP/1.1".encode()]
            + [f"{n}: {v}".encode() for n, v in headers]
        )
        + newline
        + newline
    )
    wire = head + body
    result = check(wire, data.draw(chunkings(wire)), eof=data.draw(st.booleans()))
    if len(head) <= MAX:
        assert result[0] == "event", result
        assert result[1].host == host
        assert result[2] == body
    else:
        assert result[1].__name__ == "HeadersTooLargeError"
