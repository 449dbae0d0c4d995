"""The error family of the sans-I/O core.

Every error the core raises on bad input derives from :class:`TrioSniError`, so the shell can
tell "the peer or the operator gave us something wrong" (these) from "we have a bug" (anything
else). Errors live here, not in the shell, so that the core never imports upward.
"""

from __future__ import annotations


class TrioSniError(Exception):
    """Base class of every error trio-sni raises on purpose.

    ``reason`` is a short, stable token naming what went wrong, used in access logs and
    metrics (``not_tls``, ``no_sni``, ``too_large``, ...); each family narrows it. The message
    is for humans.
    """

    reason: str = "error"


class ClientHelloError(TrioSniError):
    """The client's first bytes are not a ClientHello we can route."""

    reason = "bad_client_hello"


class NotTLSError(ClientHelloError):
    """The client speaks something other than TLS (HTTP, SSH, random bytes)."""

    reason = "not_tls"


class SSLv2HelloError(ClientHelloError):
    """An SSLv2-style (2-byte record header) ClientHello: obsolete, never routed."""

    reason = "not_tls"


class MalformedHelloError(ClientHelloError):
    """A TLS record or handshake whose lengths or fields do not add up."""

    reason = "malformed_hello"


class NoSNIError(ClientHelloError):
    """A well-formed ClientHello without a server_name host_name: nothing to route on."""

    reason = "no_sni"


class InvalidSNIError(ClientHelloError):
    """The server name is present but is not a valid DNS host name (or is an IP literal)."""

    reason = "bad_sni"


class HelloTooLargeError(ClientHelloError):
    """The ClientHello exceeds the configured size cap."""

    reason = "too_large"


class NotQuicInitialError(ClientHelloError):
    """A UDP flow that does not start with a QUIC client Initial packet."""

    reason = "not_quic_initial"


class QuicVersionError(ClientHelloError):
    """A QUIC version whose Initial packets this proxy cannot read (RFC 9001 and RFC 9369 name
    the ones it can); the client falls back to TCP."""

    reason = "quic_version"


class ConfigError(TrioSniError):
    """A configuration that cannot be used; ``problems`` lists every problem with its path.

    Args:
        problems: lines such as ``"listeners[0].port: expected int"``.
    """

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("invalid configuration:\n" + "\n".join(f"  {p}" for p in self.problems))
