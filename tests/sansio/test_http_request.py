"""The Host reader for plain-HTTP listeners, on exact request heads, whole and byte by byte."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pytest

from trio_sni.sansio.http_request import (
    NEED_DATA,
    HeadersTooLargeError,
    HttpRequest,
    HttpRequestError,
    HttpRequestReader,
    InvalidHostError,
    MalformedRequestError,
    MissingHostError,
    NotHttpError,
)

CURL = (
    b"GET /index.html HTTP/1.1\r\nHost: www.Example.test\r\nUser-Agent: curl/7.88.1\r\n"
    b"Accept: */*\r\n\r\n"
)


def read(chunks: Iterable[bytes], *, eof: bool = False, max_size: int = 8192) -> tuple[Any, ...]:
    reader = HttpRequestReader(max_size=max_size)
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
            event = reader.next_event()
    except HttpRequestError as exc:
        return ("error", type(exc), exc.reason, exc.status_hint, str(exc))
    if event is NEED_DATA:
        return ("need_data",)
    return ("request", event, reader.trailing_data)


def both_ways(data: bytes, **kwargs: Any) -> tuple[Any, ...]:
    whole = read([data], **kwargs)
    assert read([data[i : i + 1] for i in range(len(data))], **kwargs) == whole
    return whole


def test_curl_request() -> None:
    assert both_ways(CURL) == (
        "request",
        HttpRequest("GET", "/index.html", "1.1", "www.example.test", None, CURL),
        b"",
    )


def test_body_and_pipelined_bytes_are_trailing() -> None:
    data = b"POST /f HTTP/1.1\nHost: a.test:8080\nContent-Length: 3\n\nabcGET / HTTP/1.1\r\n"
    _kind, request, trailing = both_ways(data)
    assert (request.method, request.host, request.port) == ("POST", "a.test", 8080)
    assert request.raw + trailing == data
    assert trailing == b"abcGET / HTTP/1.1\r\n"


def test_absolute_form_with_matching_host_and_http10() -> None:
    data = b"GET http://A.test:80/x HTTP/1.0\r\nhost:a.test.\r\n\r\n"
    _kind, request, _ = both_ways(data)
    assert (request.target, request.http_version, request.host) == (
        "http://A.test:80/x",
        "1.0",
        "a.test",
    )


def test_need_data_until_the_empty_line() -> None:
    assert both_ways(CURL[:-2]) == ("need_data",)


@pytest.mark.parametrize(
    ("data", "cls", "status", "message"),
    [
        (
            b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(5),
            NotHttpError,
            400,
            "not HTTP: the connection starts with b'\\x16\\x03\\x01\\x00\\xa5\\x01\\x00\\x00\\xa1"
            "\\x03\\x03\\x00\\x00\\x00\\x00\\x00' (looks like TLS: use a listener with protocol "
            '"tls"); this listener expects a plain HTTP/1.x request',
        ),
        (
            b"GET / HTTP/1.1\r\nUser-Agent: x\r\n\r\n",
            MissingHostError,
            400,
            "HTTP/1.1 request without a Host header; this listener routes by Host",
        ),
        (b"GET /\r\n\r\n", MalformedRequestError, 400, "malformed request line b'GET /'"),
        (
            b"GET / HTTP/2.0\r\nHost: a.test\r\n\r\n",
            MalformedRequestError,
            400,
            "HTTP/2.0 request; this listener routes HTTP/1.0 and HTTP/1.1 only",
        ),
        (
            b"CONNECT a.test:443 HTTP/1.1\r\nHost: a.test:443\r\n\r\n",
            MalformedRequestError,
            400,
            "CONNECT request: this listener routes plain HTTP by Host; it is not a forward proxy",
        ),
        (
            b"GET / HTTP/1.1\r\nHost: a.test\r\n folded\r\n\r\n",
            MalformedRequestError,
            400,
            "line 3 of the request head is an obs-fold continuation line, which RFC 9112 lets a "
            "server refuse",
        ),
        (
            b"GET / HTTP/1.1\r\nHost a.test\r\n\r\n",
            MalformedRequestError,
            400,
            "line 2 of the request head is not a header field: b'Host a.test'",
        ),
        (
            b"GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n",
            InvalidHostError,
            400,
            "2 Host headers; RFC 9112 allows exactly one",
        ),
        (
            b"GET / HTTP/1.1\r\nHost: [::1]:80\r\n\r\n",
            InvalidHostError,
            400,
            "Host '[::1]:80' is an IP literal; this listener routes by name",
        ),
        (
            b"GET / HTTP/1.1\r\nHost: a.test:0\r\n\r\n",
            InvalidHostError,
            400,
            "Host 'a.test:0' has an invalid port",
        ),
        (
            b"GET http://b.test/ HTTP/1.1\r\nHost: a.test\r\n\r\n",
            InvalidHostError,
            400,
            "the request target names 'b.test' but Host says 'a.test'",
        ),
        (b"GET / HTTP/1.1\r\nHost: \r\n\r\n", InvalidHostError, 400, None),
        (b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", InvalidHostError, 400, None),
        (
            b"GET / HTTP/1.1\r\nHost: a.te",
            MalformedRequestError,
            400,
            "connection closed after 26 bytes, before the request head was complete",
        ),
    ],
)
def test_refusals(data: bytes, cls: type[Exception], status: int, message: str | None) -> None:
    _kind, got_cls, _reason, got_status, got = both_ways(data, eof=True)
    assert (got_cls, got_status) == (cls, status)
    if message is not None:
        assert got == message
    else:
        assert got.startswith("Host: ")


def test_oversized_head_is_431_as_soon_as_the_cap_is_reached() -> None:
    head = b"GET / HTTP/1.1\r\nHost: a.test\r\nCookie: " + b"x" * 200
    # No EOF: the cap alone decides, without waiting for the rest.
    assert both_ways(head, max_size=128) == (
        "error",
        HeadersTooLargeError,
        "too_large",
        431,
        "request head larger than the 128-byte limit (no empty line in the first 128 bytes)",
    )
    # A head ending exactly at the cap is fine.
    exact = b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n"
    assert both_ways(exact, max_size=len(exact))[0] == "request"
    assert both_ways(exact, max_size=len(exact) - 1)[1] is HeadersTooLargeError


def test_bounds_and_caller_bugs() -> None:
    with pytest.raises(ValueError, match="max_size must be between 1 and 65536"):
        HttpRequestReader(max_size=0)
    reader = HttpRequestReader()
    reader.receive_data(b"")
    with pytest.raises(RuntimeError):
        reader.receive_data(b"GET")
