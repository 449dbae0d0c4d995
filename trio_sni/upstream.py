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

:func:`connect_via_socks5` is the second mode: it connects to the configured SOCKS5 server
(an IP literal, so again no DNS) and drives the sans-I/O :class:`~trio_sni.sansio.socks5.
Socks5Client` over that stream. Whether the destination sent to the SOCKS server is a name or
an address the SSRF guard checked is the caller's choice (``socks5.remote_dns``). After the
handshake the stream is an ordinary TCP socket, so every forwarder treats it as in direct mode.
"""

from __future__ import annotations

import errno
import os
import select
import socket
from collections.abc import Sequence

import attrs
import trio

from ._fd import borrowed
from .errors import UpstreamError
from .sansio.addresses import IPAddress, format_endpoint
from .sansio.config import Socks5
from .sansio.socks5 import (
    NEED_DATA,
    Socks5Client,
    Socks5ConnectError,
    Socks5Error,
    Socks5ProtocolError,
)


@attrs.define(eq=False)
class _Attempt:
    """What happened to one address; ``error`` stays None while it is in progress."""

    address: IPAddress
    started: bool = False
    error: OSError | None = None


#: connect() errors that mean the connection was made and then reset before connect() returned
#: (the reset is read as connect()'s result: docs/kernel-facts.md, fact 46).
_ACCEPTED_THEN_RESET = frozenset({errno.ECONNRESET, errno.EPIPE})


async def connect_to_addresses(
    addresses: Sequence[IPAddress],
    port: int,
    *,
    # A parameter, not the caller's cancel scope, so that the error can say how long was
    # waited and which attempts were still pending when the deadline came.
    timeout: float,  # noqa: ASYNC109
    happy_eyeballs_delay: float = 0.25,
) -> tuple[trio.SocketStream, IPAddress]:
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
        The connected stream, and the address it connected to (the target may have reset the
        connection already, after which the socket can no longer tell). TCP_NODELAY is on (trio's
        ``SocketStream`` sets it): the proxy forwards the client's segments as they come, and
        Nagle's algorithm would only add latency to TLS handshake flights.

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
    if len(addresses) == 1:
        return await _connect_to_one(addresses[0], port, timeout)
    attempts = [_Attempt(address) for address in addresses]
    open_sockets: list[trio.socket.SocketType] = []
    winner: trio.socket.SocketType | None = None
    winning_address: IPAddress | None = None
    returned: trio.socket.SocketType | None = None

    async def attempt_connect(attempt: _Attempt, attempt_failed: trio.Event) -> None:
        nonlocal winner, winning_address
        family = socket.AF_INET6 if attempt.address.version == 6 else socket.AF_INET
        try:
            sock = trio.socket.socket(family, socket.SOCK_STREAM)
            open_sockets.append(sock)
            await sock.connect((str(attempt.address), port))
        except OSError as exc:
            if exc.errno not in _ACCEPTED_THEN_RESET:
                attempt.error = exc
                attempt_failed.set()
                return
            # The target accepted and reset at once: it answered (its bytes and the reset
            # wait in the socket, and the forwarder passes both on to the client).
        if winner is None:
            winner, winning_address = sock, attempt.address
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
        if winner is None or winning_address is None:
            raise UpstreamError(_failure_message(attempts, port, timeout))
        stream = trio.SocketStream(winner)
        returned = winner
        return stream, winning_address
    finally:
        # Close every socket but the one handed to the caller, also when cancelled.
        for sock in open_sockets:
            if sock is not returned:
                sock.close()


async def _connect_to_one(
    address: IPAddress,
    port: int,
    timeout: float,  # noqa: ASYNC109  (as connect_to_addresses: the message names the wait)
) -> tuple[trio.SocketStream, IPAddress]:
    """What the race in :func:`connect_to_addresses` does for one address, without its nursery,
    tasks and events (most targets resolve to one address; bench/bench_setup_cost.py).

    connect() is called directly: where the kernel completes the handshake within the call (a
    target on this host), the socket is used at once, with no wait, deadline scope or
    checkpoint; otherwise it waits for the connect to finish, up to ``timeout``.
    """
    attempt = _Attempt(address, started=True)
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    try:
        sock = trio.socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:  # out of fds, say
        attempt.error = exc
        raise UpstreamError(_failure_message([attempt], port, timeout)) from None
    handed = False
    try:
        try:
            if not _connect_now(sock, (str(address), port)):
                with trio.move_on_after(timeout) as waiting:
                    await trio.lowlevel.wait_writable(sock)
                if waiting.cancelled_caught:
                    raise UpstreamError(_failure_message([attempt], port, timeout))
                _raise_connect_error(sock)
        except OSError as exc:
            if exc.errno not in _ACCEPTED_THEN_RESET:
                attempt.error = exc
                raise UpstreamError(_failure_message([attempt], port, timeout)) from None
        stream = trio.SocketStream(sock)
        handed = True
        return stream, address
    finally:
        if not handed:
            sock.close()


def _connect_now(sock: trio.socket.SocketType, address: tuple[str, int]) -> bool:
    """Start connecting; True if connected already (the handshake completed within the
    call, as on loopback). Raises OSError for a connect that failed at once."""
    with borrowed(sock) as raw:
        try:
            raw.connect(address)
        except BlockingIOError:
            return _connected(sock)
        return True


def _connected(sock: trio.socket.SocketType) -> bool:
    """Whether a connect in progress has finished; raises its error if it failed."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLOUT)
    if not poller.poll(0):
        return False
    _raise_connect_error(sock)
    return True


def _raise_connect_error(sock: trio.socket.SocketType) -> None:
    error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if error:
        raise OSError(error, os.strerror(error))


def _failure_message(attempts: list[_Attempt], port: int, timeout: float) -> str:
    clauses = []
    for attempt in attempts:
        endpoint = format_endpoint((str(attempt.address), port))
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


# --- SOCKS5 ------------------------------------------------------------------------------------

#: Bytes asked of one recv() during the SOCKS5 handshake: the longest reply is 4 + 1 + 255 + 2
#: bytes (a domain-form BND.ADDR), so one read almost always holds a whole message.
_SOCKS5_RECV_SIZE = 512


async def connect_via_socks5(
    socks: Socks5,
    destinations: Sequence[str | IPAddress],
    port: int,
    *,
    timeout: float,  # noqa: ASYNC109  (see connect_to_addresses: the message names the wait)
) -> tuple[trio.SocketStream, bytes, str | IPAddress]:
    """Ask the SOCKS5 server ``socks`` to connect to one of ``destinations``.

    The destinations are tried one after the other (a SOCKS5 CONNECT names one address), each
    over its own connection to the SOCKS server, moving on only when the server says the
    destination is unreachable (``connect_failed``); an authentication failure or a ruleset
    refusal would repeat for every address, so it ends the attempt. One deadline of
    ``timeout`` seconds bounds everything: reaching the SOCKS server and every handshake.

    Args:
        socks: the configured server, credentials and DNS mode.
        destinations: host names (sent as ATYP domain, resolved by the SOCKS server) or IP
            addresses the SSRF guard has already checked.
        port: the destination port.
        timeout: seconds for the whole attempt.

    Returns:
        The stream, now an ordinary TCP connection to the destination through the SOCKS
        server; any bytes the server sent after its reply (the target's first bytes, to be
        passed to the client); and the destination that worked.

    Raises:
        UpstreamError: the SOCKS server cannot be reached, or the deadline passed.
        Socks5Error: the SOCKS server refused or failed (see :mod:`trio_sni.sansio.socks5`).
        ValueError: ``destinations`` is empty.
    """
    if not destinations:
        raise ValueError("connect_via_socks5() needs at least one destination")
    server, server_port = socks.endpoint
    server_text = format_endpoint((str(server), server_port))
    last_error: Socks5Error | None = None
    with trio.move_on_after(timeout):
        for destination in destinations:
            try:
                stream, _ = await connect_to_addresses([server], server_port, timeout=timeout)
            except UpstreamError as exc:
                raise UpstreamError(f"SOCKS5 server unreachable: {exc}") from None
            try:
                trailing = await _socks5_handshake(stream, socks, destination, port)
            except Socks5ConnectError as exc:
                await trio.aclose_forcefully(stream)
                last_error = exc
                continue
            except BaseException:
                await trio.aclose_forcefully(stream)
                raise
            return stream, trailing, destination
        assert last_error is not None
        raise last_error
    raise UpstreamError(
        f"SOCKS5 CONNECT through {server_text} did not complete within {float(timeout)} s"
        + (f" (before that: {last_error})" if last_error is not None else "")
    )


async def _socks5_handshake(
    stream: trio.SocketStream, socks: Socks5, destination: str | IPAddress, port: int
) -> bytes:
    """Pump one :class:`Socks5Client` over ``stream``; return the bytes after the reply."""
    client = Socks5Client(destination, port, username=socks.username, password=socks.password)
    try:
        while True:
            event = client.next_event()
            outgoing = client.data_to_send()
            if outgoing:
                await stream.send_all(outgoing)
            if event is not NEED_DATA:
                return client.trailing_data
            client.receive_data(await stream.receive_some(_SOCKS5_RECV_SIZE))
    except trio.BrokenResourceError as exc:
        raise Socks5ProtocolError(
            f"SOCKS5 server reset the connection during the handshake for {client.target}: "
            f"{exc.__cause__ or exc}"
        ) from None
