"""Read the Host of the first plain-HTTP request, without terminating HTTP, sans I/O.

Theory of operation
===================

A listener with ``"protocol": "http"`` routes plain HTTP/1.x (port 80) the way a TLS listener
routes by SNI: it reads just enough of the client's first bytes to learn the destination name,
the ``Host`` header of the first request, then applies the same policy, resolver and SSRF
guard, connects to the target, and forwards *every byte it read, unchanged*, followed by the
rest of the stream. Nothing is re-written: the backend sees the client's request exactly as
sent (unlike a proxy that re-issues requests). Policy is per connection: later requests on a
kept-alive connection go to the same backend whatever their Host (as with HTTP/2 coalescing
on TLS listeners).

:class:`HttpRequestReader` does the reading in the style of h11 and of :mod:`.clienthello`:
:meth:`~HttpRequestReader.receive_data` buffers (``b""`` is EOF), and
:meth:`~HttpRequestReader.next_event` returns :data:`NEED_DATA`, returns the frozen
:class:`HttpRequest`, or raises an :class:`HttpRequestError`. Any other exception is a bug.
Bytes after the request head (a body, pipelined requests) are in
:attr:`~HttpRequestReader.trailing_data`; ``request.raw + trailing_data`` is everything read.

The states (this table is the whole machine):

==========  ======================================================================  ==========
state       when                                                                    next state
==========  ======================================================================  ==========
``SNIFF``   the first byte can start a method (an RFC 9110 token character)         ``HEAD``
``SNIFF``   otherwise, once 16 bytes, a newline or EOF are in: raise                ``ERROR``
            :class:`NotHttpError` quoting them (TLS on port 80, say)
``HEAD``    an empty line ends the head within ``max_size`` bytes: parse it         ``DONE``
``HEAD``    ``max_size`` bytes and no empty line: raise                             ``ERROR``
            :class:`HeadersTooLargeError` (status hint 431)
==========  ======================================================================  ==========

The end of the head is searched only within the first ``max_size`` bytes, and the parse looks
only at the head, so the outcome does not depend on how the bytes were chunked.

Bounds: the head may take at most ``max_size`` bytes (default 8 KiB, the limit of nginx's
``large_client_header_buffers`` line and of many servers' whole head; hard maximum 64 KiB),
because every pending connection may hold that much. The total deadline is the shell's (the
listener shares ``timeouts.client_hello`` with TLS listeners).

What is accepted, on purpose strictly (RFC 9112): a request line ``METHOD target HTTP/1.x``;
header lines ``name: value`` (no obs-fold continuation lines); lines ending in CRLF or a bare
LF. Exactly one ``Host`` header, which must be a host name (IP literals are refused, as in
SNI) with an optional port that is ignored: the listener's ``target_port`` decides the port,
as it does for TLS. An absolute-form target (``GET http://a.example/ HTTP/1.1``) must name the
same host as ``Host``, or a backend that trusts the URI could be steered past the policy.
``CONNECT`` is refused: this is not a forward proxy.

Every error carries ``status_hint`` (h11's ``error_status_hint``): the HTTP status the shell
answers with before closing (400, or 431 for an oversized head).
"""

from __future__ import annotations

import enum
import re
from typing import Final

import attrs

from ._reader import NEED_DATA, BufferedReader, NeedData
from .errors import InvalidSNIError, TrioSniError
from .hostname import normalize_sni

__all__ = [
    "DEFAULT_MAX_SIZE",
    "HARD_MAX_SIZE",
    "NEED_DATA",
    "HeadersTooLargeError",
    "HttpRequest",
    "HttpRequestError",
    "HttpRequestReader",
    "InvalidHostError",
    "MalformedRequestError",
    "MissingHostError",
    "NeedData",
    "NotHttpError",
]

#: Default cap on the request head: 8 KiB, nginx's default for one header buffer and the head
#: limit of several servers (Apache's LimitRequestFieldSize is 8190); browsers stay far below.
DEFAULT_MAX_SIZE: Final = 8 * 1024
#: The largest cap allowed, as for the ClientHello: more only makes pending connections costlier.
HARD_MAX_SIZE: Final = 64 * 1024
SNIFF_LEN: Final = 16

_TOKEN_CHARS: Final = frozenset(
    b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
)
_END_OF_HEAD: Final = re.compile(rb"\r?\n\r?\n")
_LINE_END: Final = re.compile(rb"\r?\n")
_REQUEST_LINE: Final = re.compile(
    rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+) ([^\x00-\x20\x7f]+) HTTP/([0-9])\.([0-9])"
)
_HEADER: Final = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*(.*?)[ \t]*")
_ABSOLUTE: Final = re.compile(rb"[A-Za-z][A-Za-z0-9+.\-]*://([^/?#]*)")
_PORT: Final = re.compile(rb"[0-9]{1,5}")


class HttpRequestError(TrioSniError):
    """The client's first bytes are not an HTTP/1.x request head we can route.

    ``status_hint`` is the HTTP status to answer with; ``reason`` the access-log token.
    """

    reason = "bad_http_request"
    status_hint = 400


class NotHttpError(HttpRequestError):
    """The client does not speak HTTP (TLS on the plain-HTTP port, SSH, random bytes)."""

    reason = "not_http"


class MalformedRequestError(HttpRequestError):
    """A request line or header line that does not parse, or a refused request form."""


class MissingHostError(HttpRequestError):
    """A request without a ``Host`` header (HTTP/1.0 clients may omit it): nothing to route."""

    reason = "no_host"


class InvalidHostError(HttpRequestError):
    """A ``Host`` that is not a routable host name (an IP literal, bad labels, two of them)."""

    reason = "bad_host"


class HeadersTooLargeError(HttpRequestError):
    """The request head exceeds the size cap."""

    reason = "too_large"
    status_hint = 431


@attrs.frozen
class HttpRequest:
    """The first request's head, as far as routing needs it.

    Attributes:
        method: e.g. ``"GET"``.
        target: the request target as sent (``"/path?q"``, or an absolute URI).
        http_version: ``"1.1"`` or ``"1.0"``.
        host: the ``Host`` name, normalised like an SNI (lower case, no trailing dot).
        port: the port in ``Host``, if any (informational: the listener picks the port).
        raw: the head's exact bytes, empty line included; forward these unchanged.
    """

    method: str
    target: str
    http_version: str
    host: str
    port: int | None
    raw: bytes = attrs.field(repr=False)


class _State(enum.Enum):
    SNIFF = "SNIFF"
    HEAD = "HEAD"
    DONE = "DONE"


class HttpRequestReader(BufferedReader[HttpRequest]):
    """Reads the head of the first HTTP/1.x request on a connection.

    Args:
        max_size: the most bytes the head (request line, headers, empty line) may take.

    Raises:
        ValueError: ``max_size`` is not between 1 and :data:`HARD_MAX_SIZE`.
    """

    _errors = HttpRequestError

    def __init__(self, max_size: int = DEFAULT_MAX_SIZE) -> None:
        if not 1 <= max_size <= HARD_MAX_SIZE:
            raise ValueError(
                f"max_size must be between 1 and {HARD_MAX_SIZE} bytes, not {max_size}"
            )
        super().__init__()
        self._max_size = max_size
        self._state = _State.SNIFF

    def _advance(self) -> None:
        if self._state is _State.SNIFF:
            self._sniff()
        if self._state is _State.HEAD:
            self._head()

    def _truncated(self) -> HttpRequestError:
        return MalformedRequestError(
            f"connection closed after {len(self._buf)} bytes, before the request head was complete"
        )

    def _sniff(self) -> None:
        if not self._buf:
            return
        if self._buf[0] in _TOKEN_CHARS:
            self._state = _State.HEAD
            return
        quoted = bytes(self._buf[:SNIFF_LEN])
        newline = quoted.find(b"\n")
        if newline >= 0:
            quoted = quoted[: newline + 1]
        elif len(quoted) < SNIFF_LEN and not self._eof:
            return
        hint = ""
        if quoted[0] == 0x16:
            hint = ' (looks like TLS: use a listener with protocol "tls")'
        raise NotHttpError(
            f"not HTTP: the connection starts with {quoted!r}{hint}; this listener expects a "
            "plain HTTP/1.x request"
        )

    def _head(self) -> None:
        end = _END_OF_HEAD.search(self._buf, 0, self._max_size)
        if end is None:
            if len(self._buf) >= self._max_size:
                raise HeadersTooLargeError(
                    f"request head larger than the {self._max_size}-byte limit (no empty line "
                    f"in the first {self._max_size} bytes)"
                )
            return
        self._event = _parse_head(bytes(self._buf[: end.end()]))
        self._state = _State.DONE


def _parse_head(raw: bytes) -> HttpRequest:
    lines = _LINE_END.split(raw)[:-2]  # the head ends with two line ends: drop the empties
    request_line, headers = lines[0], lines[1:]
    match = _REQUEST_LINE.fullmatch(request_line)
    if match is None:
        raise MalformedRequestError(f"malformed request line {request_line[:80]!r}")
    method, target, major, minor = (g.decode("latin-1") for g in match.groups())
    if (major, minor) not in (("1", "1"), ("1", "0")):
        raise MalformedRequestError(
            f"HTTP/{major}.{minor} request; this listener routes HTTP/1.0 and HTTP/1.1 only"
        )
    if method == "CONNECT":
        raise MalformedRequestError(
            "CONNECT request: this listener routes plain HTTP by Host; it is not a forward proxy"
        )
    hosts: list[bytes] = []
    for number, line in enumerate(headers, start=2):
        if line[:1] in (b" ", b"\t"):
            raise MalformedRequestError(
                f"line {number} of the request head is an obs-fold continuation line, which "
                "RFC 9112 lets a server refuse"
            )
        header = _HEADER.fullmatch(line)
        if header is None:
            raise MalformedRequestError(
                f"line {number} of the request head is not a header field: {line[:80]!r}"
            )
        if header[1].lower() == b"host":
            hosts.append(header[2])
    if not hosts:
        raise MissingHostError(
            f"HTTP/{major}.{minor} request without a Host header; this listener routes by Host"
        )
    if len(hosts) > 1:
        raise InvalidHostError(f"{len(hosts)} Host headers; RFC 9112 allows exactly one")
    host, port = _parse_host(hosts[0])
    absolute = _ABSOLUTE.match(match[2])
    if absolute is not None:
        uri_host, _ = _parse_host(absolute[1])
        if uri_host != host:
            raise InvalidHostError(f"the request target names {uri_host!r} but Host says {host!r}")
    return HttpRequest(
        method=method,
        target=target,
        http_version=f"{major}.{minor}",
        host=host,
        port=port,
        raw=raw,
    )


def _parse_host(value: bytes) -> tuple[str, int | None]:
    """Split ``name[:port]`` and normalise the name; IP literals are refused."""
    if value.startswith(b"["):
        raise InvalidHostError(
            f"Host {value.decode('latin-1')!r} is an IP literal; this listener routes by name"
        )
    name, colon, port_text = value.rpartition(b":")
    if not colon:
        name, port_text = value, b""
    port: int | None = None
    if colon:
        if not _PORT.fullmatch(port_text) or not 0 < int(port_text) < 65536:
            raise InvalidHostError(f"Host {value.decode('latin-1')!r} has an invalid port")
        port = int(port_text)
    try:
        return normalize_sni(name), port
    except InvalidSNIError as exc:
        raise InvalidHostError(f"Host: {exc}") from None
