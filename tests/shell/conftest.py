"""Fixtures for the Trio shell's tests."""

from __future__ import annotations

import pytest
import trio

from tests.dnsserver import DNSServer


@pytest.fixture
async def dns_server(nursery: trio.Nursery) -> DNSServer:
    """A real DNS server on 127.0.0.1 (UDP and TCP, one random port), empty zone.

    Add records with ``dns_server.add(name, type, value, ttl=...)``, point a resolver at it
    with ``dns_server.resolver_settings(**overrides)`` or ``dns_server.nameserver``, and count
    queries with ``dns_server.query_count(name, type)``. It stops with the test's nursery.
    """
    server: DNSServer = await nursery.start(DNSServer().serve)
    return server
