"""Connect to an upstream over exactly the addresses the SSRF guard checked.

Theory of operation
-------------------

The proxy resolves the target once, filters the addresses through the SSRF guard, and then
calls :func:`connect_to_addresses` with the survivors. The connector never resolves a name:
it takes IP addresses, and trio turns them into socket addresses with ``AI_NUMERICHOST``,
so there is no second lookup whose answer could differ from the checked one. A DNS-rebinding
attacker who answers "203.0.113.7" to the check and "127.0.0.1" to the connect gets nowhere,
because there is no "connect" lookup (this is the time-of-check/time-of-use gap that
``trio.open_tcp_stream(host, port)`` after a separate check would leave open).

Within those addresses it runs RFC 8305 "happy eyeballs" the way trio's
``open_tcp_stream`` does: one task per attempt in a nursery, attempts started
``happy_eyeballs_delay`` apart or as soon as the previous one fails, the first to connect
wins and cancels the rest. One trio deadline of ``timeout`` seconds bounds the whole thing.
Every socket but the winner is closed before returning, also when the caller is cancelled.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Sequence

import attrs
import trio

from .errors import UpstreamError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def format_endpoint(address: IPAddress, port: int) -> str:
    """``1.2.3.4:443`` or ``[2001:db8::1]:443``, the form used in errors and logs."""
    return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"


@attrs.define(eq=False)
class _Attempt:
    """What happened to one address; ``error`` stays None while it is in progress."""

    address: IPAddress
    started: bool = False
    error: OSError | None = None


async def connect_to_addresses(
    addresses: Sequence[IPAddress],
    port: int,
    *,
    # A parameter, not the caller's cancel scope, so that the error can say how long was
    # waited and which attempts were still pending when the deadline came.
    timeout: float,  # noqa: ASYNC109
    happy_eyeballs_delay: float = 0.25,
) -> trio.SocketStream:
    """Open a TCP connection to one of ``addresses``, trying them in order (RFC 8305).

    No DNS happens here (see the module docstring): connecting to exactly the address that
    was checked is what makes the SSRF guard hold against DNS rebinding.

    Args:
        addresses: IP addresses in the order to try them (the resolver's family order).
        port: the TCP port on every address.
        timeout: seconds for the whole attempt, across all addresses.
        happy_eyeballs_delay: seconds to wait for one attempt before starting the next in
            parallel; 0.25 is the "Connection Attempt Delay" RFC 8305 section 5 recommends,
            and trio's default.

    Returns:
        The connected stream. TCP_NODELAY is on (trio's ``SocketStream`` sets it): the
        proxy forwards the client's segments as they come, and Nagle's algorithm would
        only add latency to TLS handshake flights.

    Raises:
        UpstreamError: no address could be connected to; the message names each address
            and its fate, joined with "; ", such as
            ``"connect to 127.0.0.1:9 failed: [Errno 111] Connection refused"`` or
            ``"connect to 198.51.100.1:443 timed out after 10.0 s"``, and for addresses
            the deadline came before, ``"connect to 192.0.2.3:443 not attempted (deadline)"``.
        ValueError: ``addresses`` is empty (the caller must not ask to connect nowhere).
    """
    if not addresses:
        raise ValueError("connect_to_addresses() needs at least one address")
    attempts = [_Attempt(address) for address in addresses]
    open_sockets: list[trio.socket.SocketType] = []
    winner: trio.socket.SocketType | None = None
    returned: trio.socket.SocketType | None = None

    async def attempt_connect(attempt: _Attempt, attempt_failed: trio.Event) -> None:
        nonlocal winner
        family = socket.AF_INET6 if attempt.address.version == 6 else socket.AF_INET
        try:
            sock = trio.socket.socket(family, socket.SOCK_STREAM)
            open_sockets.append(sock)
            await sock.connect((str(attempt.address), port))
        except OSError as exc:
            attempt.error = exc
            attempt_failed.set()
            return
        if winner is None:
            winner = sock
            # The first connection wins; the others (and the spacing sleep) are cancelled.
            nursery.cancel_scope.cancel()

    try:
        with trio.move_on_after(timeout):
            async with trio.open_nursery() as nursery:
                for attempt in attempts:
                    attempt_failed = trio.Event()
                    attempt.started = True
                    nursery.start_soon(attempt_connect, attempt, attempt_failed)
                    # Give this attempt a head start; move on early if it fails.
                    with trio.move_on_after(happy_eyeballs_delay):
                        await attempt_failed.wait()
        if winner is None:
            raise UpstreamError(_failure_message(attempts, port, timeout))
        stream = trio.SocketStream(winner)
        returned = winner
        return stream
    finally:
        # Close every socket but the one handed to the caller, also when cancelled.
        for sock in open_sockets:
            if sock is not returned:
                sock.close()


def _failure_message(attempts: list[_Attempt], port: int, timeout: float) -> str:
    clauses = []
    for attempt in attempts:
        endpoint = format_endpoint(attempt.address, port)
        if attempt.error is not None:
            clauses.append(f"connect to {endpoint} failed: {_describe(attempt.error)}")
        elif attempt.started:
            clauses.append(f"connect to {endpoint} timed out after {float(timeout)} s")
        else:
            clauses.append(f"connect to {endpoint} not attempted (deadline)")
    return "; ".join(clauses)


def _describe(error: OSError) -> str:
    """``[Errno 111] Connection refused``: trio's own text repeats the address we already give."""
    if error.errno is not None:
        return f"[Errno {error.errno}] {os.strerror(error.errno)}"
    return str(error)
