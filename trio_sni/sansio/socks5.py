"""The client side of a SOCKS5 CONNECT (RFC 1928, with RFC 1929 username/password), sans I/O.

Theory of operation
===================

When a rule says ``"via": "socks5"`` (or the top-level ``socks5`` section makes that the
default), the proxy does not connect to the target itself: it connects to a SOCKS5 server and
asks it to. :class:`Socks5Client` is that conversation and nothing else, in the style of h11
and of :mod:`.clienthello`: the caller owns the socket and the clock. It sends whatever
:meth:`Socks5Client.data_to_send` returns, feeds what the server sends with
:meth:`Socks5Client.receive_data` (``b""`` means the server closed), and polls
:meth:`Socks5Client.next_event`, which returns :data:`NEED_DATA`, returns the frozen
:class:`Socks5Connected` once the server has connected to the target, or raises a
:class:`Socks5Error`. Any other exception is a bug. After :class:`Socks5Connected` the socket is
an ordinary TCP connection to the target (so the kernel forwarder applies to it exactly as in
direct mode); bytes the server sent after its reply are in :attr:`Socks5Client.trailing_data`.

The conversation has three exchanges, each "client sends, server answers with a fixed-size or
length-announced message"::

    client                                        server
    05 n methods...                 greeting  ->
                                              <-  05 method         (method selection)
    01 ulen user plen pass          RFC 1929  ->                    (only if method is 02)
                                              <-  01 status
    05 01 00 atyp addr port         CONNECT   ->
                                              <-  05 rep 00 atyp bnd.addr bnd.port

This table is the whole machine. Each row fires when the *fixed* number of bytes it needs is in
(never "whatever happens to be buffered"), so the outcome, including the error message, does not
depend on how the server's bytes were chunked; the tests feed every transcript whole and byte by
byte and compare.

==========  ======================================================================  ==========
state       when                                                                    next state
==========  ======================================================================  ==========
``METHOD``  2 bytes in; version 5 and method 00 (no auth): queue CONNECT            ``REPLY``
``METHOD``  2 bytes in; version 5 and method 02 (offered): queue username/password  ``AUTH``
``METHOD``  2 bytes in; otherwise raise (not SOCKS5 / no acceptable method /        ``ERROR``
            a method we never offered)
``AUTH``    2 bytes in; sub-version 1, status 0: queue CONNECT                      ``REPLY``
``AUTH``    2 bytes in; otherwise raise :class:`Socks5AuthError`                    ``ERROR``
``REPLY``   2 bytes in; version 5 and REP != 0: raise the error for that REP code   ``ERROR``
            (decided here, so a server that closes right after REP is still
            understood)
``REPLY``   4 bytes in; RSV 0 and a known ATYP, which fixes the reply length        ``BOUND``
``BOUND``   the whole reply in: return :class:`Socks5Connected`                     ``DONE``
==========  ======================================================================  ==========

EOF in any state before ``DONE`` raises :class:`Socks5ProtocolError` naming the state. The
greeting is queued by the constructor: a SOCKS5 client always speaks first.

Errors carry ``reason``, the termination token of access logs and metrics:

* ``connect_failed``: the SOCKS server could not reach the target (REP 3, 4, 5, 6), the same
  token as a failed direct connect, because it means the same thing to the operator;
* ``socks5_refused``: the SOCKS server's ruleset refused the target (REP 2);
* ``socks5_auth_failed``: no acceptable authentication method, or wrong username/password;
* ``socks5_error``: anything else the server said (REP 1, 7, 8, unknown codes) or garbage.

Blame, in h11's sense: every error here is the *SOCKS server's* answer or misbehaviour; errors
in our own request (a name too long to encode, credentials too long) are ``ValueError`` from
the constructor, because configuration validation should have caught them.
"""

from __future__ import annotations

import enum
import ipaddress
from typing import Final, Literal

import attrs

from ._reader import NEED_DATA, NeedData
from .errors import TrioSniError

__all__ = [
    "NEED_DATA",
    "REPLY_MESSAGES",
    "NeedData",
    "Socks5AuthError",
    "Socks5Client",
    "Socks5ConnectError",
    "Socks5Connected",
    "Socks5Error",
    "Socks5ProtocolError",
    "Socks5RefusedError",
]

VERSION: Final = 5
AUTH_VERSION: Final = 1  # RFC 1929 section 2: the sub-negotiation's own version byte
METHOD_NO_AUTH: Final = 0x00
METHOD_USERNAME_PASSWORD: Final = 0x02
METHOD_NO_ACCEPTABLE: Final = 0xFF
CMD_CONNECT: Final = 0x01
ATYP_IPV4: Final = 0x01
ATYP_DOMAIN: Final = 0x03
ATYP_IPV6: Final = 0x04
# RFC 1929: ULEN and PLEN are one byte each, and zero-length fields are not allowed.
MAX_CREDENTIAL_LEN: Final = 255
# RFC 1928 section 5: the domain form carries its length in one byte.
MAX_DOMAIN_LEN: Final = 255

#: RFC 1928 section 6, REP field: what each failure code means, in the words of the RFC.
REPLY_MESSAGES: Final = {
    0x01: "general SOCKS server failure",
    0x02: "connection not allowed by ruleset",
    0x03: "network unreachable",
    0x04: "host unreachable",
    0x05: "connection refused",
    0x06: "TTL expired",
    0x07: "command not supported",
    0x08: "address type not supported",
}

_METHOD_NAMES: Final = {
    METHOD_NO_AUTH: "no authentication",
    0x01: "GSSAPI",
    METHOD_USERNAME_PASSWORD: "username/password",
}

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class Socks5Error(TrioSniError):
    """The SOCKS5 server did not connect us to the target; ``reason`` says how it failed."""

    reason = "socks5_error"


class Socks5ProtocolError(Socks5Error):
    """The server broke the protocol (wrong version, bad field, closed too early)."""


class Socks5AuthError(Socks5Error):
    """No authentication method both sides support, or the server rejected the credentials."""

    reason = "socks5_auth_failed"


class Socks5RefusedError(Socks5Error):
    """The server's ruleset does not allow this destination (REP 2)."""

    reason = "socks5_refused"


class Socks5ConnectError(Socks5Error):
    """The server could not reach the target (REP 3, 4, 5 or 6): the target's fault, not its."""

    reason = "connect_failed"


class Socks5ReplyError(Socks5Error):
    """A failure reply with any other code (REP 1, 7, 8 or one RFC 1928 does not define)."""


def _reply_error(code: int, target: str) -> Socks5Error:
    meaning = REPLY_MESSAGES.get(code, "unassigned reply code")
    message = f"SOCKS5 server could not connect to {target}: {meaning} (REP 0x{code:02x})"
    if code == 0x02:
        return Socks5RefusedError(message)
    if code in (0x03, 0x04, 0x05, 0x06):
        return Socks5ConnectError(message)
    return Socks5ReplyError(message)


@attrs.frozen
class Socks5Connected:
    """The server connected to the target; the stream now carries the target's bytes.

    Attributes:
        bound_host: BND.ADDR from the reply: the address the SOCKS server uses towards the
            target (an IP address as text, or a name for ATYP 3; some servers send 0.0.0.0).
        bound_port: BND.PORT from the reply.
    """

    bound_host: str
    bound_port: int


class _State(enum.Enum):
    METHOD = "METHOD"
    AUTH = "AUTH"
    REPLY = "REPLY"
    BOUND = "BOUND"
    DONE = "DONE"
    ERROR = "ERROR"


_WAITING_FOR: Final = {
    _State.METHOD: "the method selection",
    _State.AUTH: "the username/password status",
    _State.REPLY: "the CONNECT reply",
    _State.BOUND: "the rest of the CONNECT reply",
}


def _encode_destination(host: str | IPAddress) -> bytes:
    """ATYP and DST.ADDR for an IP address or a host name (RFC 1928 section 5)."""
    if isinstance(host, str):
        try:
            host = ipaddress.ip_address(host)
        except ValueError:
            name = str(host).encode("ascii")
            if not 0 < len(name) <= MAX_DOMAIN_LEN:
                raise ValueError(
                    f"SOCKS5 cannot carry a {len(name)}-byte host name (1 to 255)"
                ) from None
            return bytes([ATYP_DOMAIN, len(name)]) + name
    if host.version == 4:
        return bytes([ATYP_IPV4]) + host.packed
    return bytes([ATYP_IPV6]) + host.packed


class Socks5Client:
    """One SOCKS5 CONNECT handshake, from greeting to the server's reply.

    Args:
        host: the destination: a host name (sent as ATYP 3, the SOCKS server resolves it) or an
            IP address (ATYP 1 or 4; the server connects to exactly that address).
        port: the destination port.
        username: RFC 1929 username; with ``password``, offers method 02 as well as 00.
        password: RFC 1929 password.

    Raises:
        ValueError: a name, username or password that SOCKS5 cannot carry, a port out of
            range, or only one of username and password.
    """

    def __init__(
        self,
        host: str | IPAddress,
        port: int,
        *,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        if not 0 < port < 65536:
            raise ValueError(f"port must be from 1 to 65535, not {port}")
        if (username is None) != (password is None):
            raise ValueError("give both username and password, or neither")
        self._credentials: tuple[bytes, bytes] | None = None
        if username is not None and password is not None:
            user, secret = username.encode("utf-8"), password.encode("utf-8")
            for what, value in (("username", user), ("password", secret)):
                if not 0 < len(value) <= MAX_CREDENTIAL_LEN:
                    raise ValueError(f"the SOCKS5 {what} must be 1 to 255 bytes of UTF-8")
            self._credentials = (user, secret)
        self._target = f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
        self._request = (
            bytes([VERSION, CMD_CONNECT, 0]) + _encode_destination(host) + port.to_bytes(2, "big")
        )
        self._methods = (
            bytes([METHOD_NO_AUTH, METHOD_USERNAME_PASSWORD])
            if self._credentials
            else bytes([METHOD_NO_AUTH])
        )
        self._outgoing = bytearray([VERSION, len(self._methods)]) + self._methods
        self._buf = bytearray()
        self._pos = 0  # bytes of _buf consumed by completed messages
        self._eof = False
        self._state = _State.METHOD
        self._reply_length = 0  # total CONNECT reply length, once ATYP is known
        self._event: Socks5Connected | None = None
        self._error: Socks5Error | None = None

    @property
    def target(self) -> str:
        """The destination as ``host:port`` (for errors and logs)."""
        return self._target

    @property
    def trailing_data(self) -> bytes:
        """Bytes the server sent after its reply: the target's first bytes, for the client."""
        if self._state is not _State.DONE:
            return b""
        return bytes(self._buf[self._pos :])

    def data_to_send(self) -> bytes:
        """Return (and forget) the bytes to send to the server now; ``b""`` when none."""
        out = bytes(self._outgoing)
        self._outgoing.clear()
        return out

    def receive_data(self, data: bytes) -> None:
        """Buffer bytes from the server; ``b""`` means the server closed its side.

        Raises:
            RuntimeError: data after EOF (a bug in the caller).
        """
        if not data:
            self._eof = True
            return
        if self._eof:
            raise RuntimeError("received data after EOF")
        self._buf += data

    def next_event(self) -> Socks5Connected | Literal[NeedData.NEED_DATA]:
        """Advance on what has arrived; return :class:`Socks5Connected` or :data:`NEED_DATA`.

        After :data:`NEED_DATA`, send :meth:`data_to_send` (it may have grown) before waiting
        for more bytes. The event, or the error, repeats on every later call.

        Raises:
            Socks5Error: one of its subclasses, as listed in the module docstring.
        """
        if self._event is not None:
            return self._event
        if self._error is not None:
            raise self._error
        try:
            while self._step():
                if self._event is not None:
                    return self._event
            if self._eof:
                raise Socks5ProtocolError(
                    f"SOCKS5 server closed the connection while we waited for "
                    f"{_WAITING_FOR[self._state]} ({len(self._buf) - self._pos} bytes of it "
                    "received)"
                )
        except Socks5Error as exc:
            self._state = _State.ERROR
            self._error = exc
            raise
        return NEED_DATA

    # --- the steps of the table; each returns True if it made progress --------------------

    def _take(self, n: int) -> bytes | None:
        """The next ``n`` unconsumed bytes, consumed, or None if they have not all arrived."""
        if len(self._buf) - self._pos < n:
            return None
        chunk = bytes(self._buf[self._pos : self._pos + n])
        self._pos += n
        return chunk

    def _peek(self, n: int) -> bytes | None:
        if len(self._buf) - self._pos < n:
            return None
        return bytes(self._buf[self._pos : self._pos + n])

    def _step(self) -> bool:
        if self._state is _State.METHOD:
            return self._step_method()
        if self._state is _State.AUTH:
            return self._step_auth()
        if self._state is _State.REPLY:
            return self._step_reply()
        if self._state is _State.BOUND:
            return self._step_bound()
        raise AssertionError(f"no step for state {self._state}")  # DONE/ERROR return earlier

    def _step_method(self) -> bool:
        message = self._take(2)
        if message is None:
            return False
        version, method = message
        if version != VERSION:
            raise Socks5ProtocolError(
                f"not a SOCKS5 server: its first reply starts with {message!r} "
                f"(version {version}, expected 5)"
            )
        if method == METHOD_NO_ACCEPTABLE:
            offered = " and ".join(_METHOD_NAMES[m] for m in self._methods)
            hint = (
                "; set socks5.username and socks5.password if it requires a login"
                if self._credentials is None
                else ""
            )
            raise Socks5AuthError(
                f"SOCKS5 server accepts none of the offered methods ({offered}){hint}"
            )
        if method not in self._methods:
            name = _METHOD_NAMES.get(method, f"0x{method:02x}")
            raise Socks5ProtocolError(
                f"SOCKS5 server chose method {name} (0x{method:02x}), which we did not offer"
            )
        if method == METHOD_USERNAME_PASSWORD:
            assert self._credentials is not None  # only offered with credentials
            user, secret = self._credentials
            self._outgoing += (
                bytes([AUTH_VERSION, len(user)]) + user + bytes([len(secret)]) + secret
            )
            self._state = _State.AUTH
        else:
            self._outgoing += self._request
            self._state = _State.REPLY
        return True

    def _step_auth(self) -> bool:
        message = self._take(2)
        if message is None:
            return False
        version, status = message
        if version != AUTH_VERSION:
            raise Socks5ProtocolError(
                f"SOCKS5 server answered the username/password request with version {version}, "
                "expected 1 (RFC 1929)"
            )
        if status != 0:
            raise Socks5AuthError(
                f"SOCKS5 server rejected the username/password (status 0x{status:02x}); "
                "check socks5.username and socks5.password"
            )
        self._outgoing += self._request
        self._state = _State.REPLY
        return True

    def _step_reply(self) -> bool:
        head = self._peek(2)
        if head is None:
            return False
        version, rep = head
        if version != VERSION:
            raise Socks5ProtocolError(
                f"SOCKS5 server's CONNECT reply has version {version}, expected 5"
            )
        if rep != 0:
            raise _reply_error(rep, self._target)
        header = self._peek(4)
        if header is None:
            return False
        rsv, atyp = header[2], header[3]
        if rsv != 0:
            raise Socks5ProtocolError(
                f"SOCKS5 server's CONNECT reply has reserved byte 0x{rsv:02x}, expected 0"
            )
        if atyp == ATYP_IPV4:
            self._reply_length = 4 + 4 + 2
        elif atyp == ATYP_IPV6:
            self._reply_length = 4 + 16 + 2
        elif atyp == ATYP_DOMAIN:
            length = self._peek(5)
            if length is None:
                return False
            self._reply_length = 4 + 1 + length[4] + 2
        else:
            raise Socks5ProtocolError(
                f"SOCKS5 server's CONNECT reply has unknown address type 0x{atyp:02x}"
            )
        self._state = _State.BOUND
        return True

    def _step_bound(self) -> bool:
        reply = self._take(self._reply_length)
        if reply is None:
            return False
        atyp, address, port = reply[3], reply[4:-2], int.from_bytes(reply[-2:], "big")
        if atyp == ATYP_DOMAIN:
            host = address[1:].decode("ascii", "backslashreplace")
        else:
            host = str(ipaddress.ip_address(address))
        self._event = Socks5Connected(bound_host=host, bound_port=port)
        self._state = _State.DONE
        return True
