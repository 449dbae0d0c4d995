"""Every error trio-sni raises on purpose, importable from one place.

The sans-I/O errors are defined in :mod:`trio_sni.sansio.errors` (so the core never imports
upward) and re-exported here next to the shell's own errors, which are all defined here. Each
carries a ``reason`` (on the :class:`TrioSniError` base): the short termination token used in
access logs and metrics.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from .sansio.errors import ClientHelloError as ClientHelloError
from .sansio.errors import ConfigError as ConfigError
from .sansio.errors import HelloTooLargeError as HelloTooLargeError
from .sansio.errors import InvalidSNIError as InvalidSNIError
from .sansio.errors import MalformedHelloError as MalformedHelloError
from .sansio.errors import NoSNIError as NoSNIError
from .sansio.errors import NotTLSError as NotTLSError
from .sansio.errors import SSLv2HelloError as SSLv2HelloError
from .sansio.errors import TrioSniError as TrioSniError
from .sansio.http_request import HttpRequestError as HttpRequestError
from .sansio.proxy_protocol import ProxyHeaderError as ProxyHeaderError
from .sansio.socks5 import Socks5Error as Socks5Error

if TYPE_CHECKING:
    from .sansio.policy import Deny


class ResolveError(TrioSniError):
    """The target name could not be resolved (NXDOMAIN, no address, timeout, server failure)."""

    reason = "resolve_failed"


class UpstreamError(TrioSniError):
    """No connection to the target could be made (refused, unreachable, timed out)."""

    reason = "connect_failed"


class QuicViaSocks5(TrioSniError):
    """A QUIC flow's rule sends its traffic through the SOCKS5 upstream, which carries TCP."""

    reason = "quic_via_socks5"


class DestinationRefused(TrioSniError):
    """The SSRF guard refused every resolved address of the target."""

    reason = "ssrf_blocked"


class AccelerationUnavailable(TrioSniError):
    """Kernel acceleration was required (``fallback_mode: "none"``) but cannot be used."""

    reason = "acceleration_unavailable"


class Refused(TrioSniError):
    """Policy or limits refused the connection; ``reason`` comes from the :class:`Deny`."""

    def __init__(self, deny: Deny) -> None:
        super().__init__(deny.detail)
        self.reason = deny.reason


class NameRefused(Refused):
    """No rule lets the client reach the name it asked for (a TLS client is told so with an
    ``unrecognized_name`` alert)."""


class ClientReset(TrioSniError):
    """The client reset the connection before the first byte of what it must send first (a
    scanner, a client that gave up): it sent nothing wrong, so no reader's error fits."""

    reason = "client_reset"


class FirstBytesTimeout(TrioSniError):
    """What a client must send before it can be routed did not arrive within the one total
    deadline (``hello_timeout``); ``awaited`` names what was still incomplete."""

    awaited: ClassVar[str]

    def __init__(self, seconds: float) -> None:
        super().__init__(f"no complete {self.awaited} within {seconds:g} s")


class ProxyHeaderTimeout(FirstBytesTimeout):
    """A listener with ``accept_proxy_protocol`` got no complete PROXY header in time."""

    reason = "proxy_header_timeout"
    awaited = "PROXY protocol header"


class HelloTimeout(FirstBytesTimeout):
    """The client did not finish its ClientHello within the total deadline."""

    reason = "hello_timeout"
    awaited = "ClientHello"


class RequestTimeout(FirstBytesTimeout):
    """An ``http`` listener's client did not finish its request head within the deadline."""

    reason = "request_timeout"
    awaited = "HTTP request head"


class SharedCacheUnavailable(Exception):
    """The shared (pinned BPF map) DNS cache tier cannot be used here; the message says why,
    for an operator. Not a connection's error: the proxy runs on with its in-process cache."""


class StatusUnavailable(Exception):
    """``python -m trio_sni status``: the status endpoint could not be reached or did not
    answer as expected."""
