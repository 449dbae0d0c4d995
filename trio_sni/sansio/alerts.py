"""TLS alert records the proxy sends before closing a connection it refuses.

A bare close leaves the user with "connection reset"; a fatal ``unrecognized_name`` alert makes
curl and browsers say that this server does not serve that name, which is the truth. The proxy
never terminates TLS, so the alert is sent as a plaintext TLS record, which is what a server
sends before any key exchange (RFC 8446, section 6).
"""

from __future__ import annotations

import enum


class Alert(enum.IntEnum):
    """The alert descriptions the proxy uses (RFC 8446, section 6)."""

    HANDSHAKE_FAILURE = 40
    INTERNAL_ERROR = 80
    UNRECOGNIZED_NAME = 112


#: Record content type for alerts, and "fatal" level.
_ALERT_CONTENT_TYPE = 21
_FATAL = 2


def alert_record(alert: Alert) -> bytes:
    """A complete TLS 1.2-framed fatal alert record (the framing TLS 1.3 also uses)."""
    return bytes([_ALERT_CONTENT_TYPE, 3, 3, 0, 2, _FATAL, int(alert)])
