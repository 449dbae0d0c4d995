"""Every error trio-sni raises on purpose, importable from one place.

The sans-I/O errors are defined in :mod:`trio_sni.sansio.errors` (so the core never imports
upward) and re-exported here next to the shell's own errors. Each carries a ``reason``: the
short termination token used in access logs and metrics.
"""

from __future__ import annotations

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


class ResolveError(TrioSniError):
    """The target name could not be resolved (NXDOMAIN, no address, timeout, server failure)."""

    reason = "resolve_failed"


class UpstreamError(TrioSniError):
    """No connection to the target could be made (refused, unreachable, timed out)."""

    reason = "connect_failed"


class DestinationRefused(TrioSniError):
    """The SSRF guard refused every resolved address of the target."""

    reason = "ssrf_blocked"


class AccelerationUnavailable(TrioSniError):
    """Kernel acceleration was required (``fallback_mode: "none"``) but cannot be used."""

    reason = "acceleration_unavailable"
