"""The happy-eyeballs connector against real loopback sockets, on the autojump clock.

Three kinds of address, all real:

- *listening*: a socket that listens and is never accepted from, so the handshake completes
  in the kernel's backlog and the test process gains no accepted fd;
- *refused*: a port that is bound but not listening, so the kernel answers SYN with RST
  (binding it keeps the port ours for the whole test);
- *black hole*: a listener with ``listen(0)`` whose one-slot accept queue is already full,
  so Linux drops further SYNs and the connect hangs until a deadline, like an unroutable
  address.

Loopback handshakes and resets happen inside the connect() syscall, so they take zero
virtual time, and a hanging connect lets the autojump clock run straight to the next
deadline: the times asserted below are exact.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import socket
import sys
from collections.abc import Callable, Iterator
from functools import partial

import pytest
import trio
import trio.testing

from trio_sni.errors import UpstreamError
from trio_sni.upstream import IPAddress, connect_to_addresses

LOOP4 = ipaddress.ip_address("127.0.0.1")
LOOP6 = ipaddress.ip_address("::1")
REFUSED = f"[Errno {errno.ECONNREFUSED}] {os.strerror(errno.ECONNREFUSED)}"

pytestmark = pytest.mark.skipif(
    sys.platform != "linux", reason="black holes rely on Linux dropping SYNs to a full backlog"
)


def family_of(address: IPAddress) -> socket.AddressFamily:
    return socket.AF_INET6 if address.version == 6 else socket.AF_INET


@contextlib.contextmanager
def listening(address: IPAddress = LOOP4, port: int = 0) -> Iterator[int]:
    """A port on ``address`` that completes handshakes (and is never accepted from)."""
    with socket.socket(family_of(address), socket.SOCK_STREAM) as sock:
        sock.bind((str(address), port))
        sock.listen(16)
        yield sock.getsockname()[1]


@contextlib.contextmanager
def refused(address: IPAddress = LOOP4, port: int = 0) -> Iterator[int]:
    """A port on ``address`` that answers SYN with RST (bound, not listening)."""
    with socket.socket(family_of(address), socket.SOCK_STREAM) as sock:
        sock.bind((str(address), port))
        yield sock.getsockname()[1]


@contextlib.contextmanager
def black_hole(address: IPAddress = LOOP4, port: int = 0) -> Iterator[int]:
    """A port on ``address`` that silently drops SYNs (its accept queue is full)."""
    with contextlib.ExitStack() as stack:
        sock = stack.enter_context(socket.socket(family_of(address), socket.SOCK_STREAM))
        sock.bind((str(address), port))
        sock.listen(0)  # Linux queues one connection with a backlog of 0, then drops SYNs
        bound: int = sock.getsockname()[1]
        filler = stack.enter_context(socket.socket(family_of(address), socket.SOCK_STREAM))
        filler.connect((str(address), bound))
        yield bound


Kind = Callable[[IPAddress, int], contextlib.AbstractContextManager[int]]


@contextlib.contextmanager
def one_port(*endpoints: tuple[Kind, IPAddress]) -> Iterator[int]:
    """Set up each ``(kind, address)`` on one shared port, as the connector needs.

    The first endpoint gets a port from the kernel; another process may hold that number on
    one of the other addresses, so start over a few times.
    """
    for _attempt in range(20):
        with contextlib.ExitStack() as stack:
            port = 0
            try:
                for kind, address in endpoints:
                    port = stack.enter_context(kind(address, port))
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
                continue
            yield port
            return
    raise RuntimeError("no port free on every address after 20 tries")


def open_fds() -> set[int]:
    """This process's open fds (minus the one listdir() used to list them)."""
    fds = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            os.fstat(int(name))
        except OSError:
            continue
        fds.add(int(name))
    return fds


async def test_connects_to_a_single_address(autojump_clock: trio.testing.MockClock) -> None:
    with listening() as port:
        before = open_fds()
        stream, _ = await connect_to_addresses([LOOP4], port, timeout=10.0)
        async with stream:
            assert stream.socket.getpeername() == ("127.0.0.1", port)
            assert stream.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            assert open_fds() - before == {stream.socket.fileno()}
    assert trio.current_time() == 0


async def test_connects_over_ipv6() -> None:
    with listening(LOOP6) as port:
        stream, _ = await connect_to_addresses([LOOP6], port, timeout=10.0)
        async with stream:
            assert stream.socket.getpeername()[:2] == ("::1", port)


async def test_bytes_flow(nursery: trio.Nursery) -> None:
    listeners = await nursery.start(partial(trio.serve_tcp, echo, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    stream, _ = await connect_to_addresses([LOOP4], port, timeout=10.0)
    async with stream:
        await stream.send_all(b"ping")
        assert await stream.receive_some() == b"ping"


async def echo(stream: trio.SocketStream) -> None:
    async with stream:
        async for data in stream:
            await stream.send_all(data)


async def test_refused(autojump_clock: trio.testing.MockClock) -> None:
    with refused() as port:
        before = open_fds()
        with pytest.raises(UpstreamError) as exc_info:
            await connect_to_addresses([LOOP4], port, timeout=10.0)
    assert str(exc_info.value) == f"connect to 127.0.0.1:{port} failed: {REFUSED}"
    assert exc_info.value.reason == "connect_failed"
    assert trio.current_time() == 0
    assert open_fds() <= before


async def test_refused_ipv6_address_is_bracketed() -> None:
    with refused(LOOP6) as port, pytest.raises(UpstreamError) as exc_info:
        await connect_to_addresses([LOOP6], port, timeout=10.0)
    assert str(exc_info.value) == f"connect to [::1]:{port} failed: {REFUSED}"


async def test_black_hole_first_next_after_the_delay(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with one_port((black_hole, LOOP4), (listening, LOOP6)) as port:
        before = open_fds()
        stream, _ = await connect_to_addresses([LOOP4, LOOP6], port, timeout=10.0)
        async with stream:
            assert stream.socket.getpeername()[:2] == ("::1", port)
            # The losing attempt's socket is closed by the time the winner is returned.
            assert open_fds() - before == {stream.socket.fileno()}
    assert trio.current_time() == 0.25


async def test_custom_happy_eyeballs_delay(autojump_clock: trio.testing.MockClock) -> None:
    with one_port((black_hole, LOOP4), (listening, LOOP6)) as port:
        stream, _ = await connect_to_addresses(
            [LOOP4, LOOP6], port, timeout=10.0, happy_eyeballs_delay=0.1
        )
        await stream.aclose()
    assert trio.current_time() == 0.1


async def test_refused_first_starts_the_next_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with one_port((refused, LOOP4), (listening, LOOP6)) as port:
        stream, address = await connect_to_addresses([LOOP4, LOOP6], port, timeout=10.0)
        async with stream:
            assert stream.socket.getpeername()[:2] == ("::1", port)
        assert address == LOOP6  # the address that answered, named without asking the socket
    # A failed attempt does not wait out the happy-eyeballs delay.
    assert trio.current_time() == 0


async def test_nothing_on_another_loopback_address(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # All of 127.0.0.0/8 is loopback; with nothing bound on 127.0.0.2 the kernel sends RST.
    dead = ipaddress.ip_address("127.0.0.2")
    with one_port((refused, dead), (listening, LOOP4)) as port:
        stream, _ = await connect_to_addresses([dead, LOOP4], port, timeout=10.0)
        async with stream:
            assert stream.socket.getpeername() == ("127.0.0.1", port)
    assert trio.current_time() == 0


async def test_all_black_holes_time_out_exactly(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with one_port((black_hole, LOOP4), (black_hole, LOOP6)) as port:
        before = open_fds()
        with pytest.raises(UpstreamError) as exc_info:
            await connect_to_addresses([LOOP4, LOOP6], port, timeout=10.0)
        assert open_fds() <= before
    assert str(exc_info.value) == (
        f"connect to 127.0.0.1:{port} timed out after 10.0 s; "
        f"connect to [::1]:{port} timed out after 10.0 s"
    )
    assert trio.current_time() == 10.0


async def test_single_black_hole_message(autojump_clock: trio.testing.MockClock) -> None:
    with black_hole(LOOP4) as port, pytest.raises(UpstreamError) as exc_info:
        await connect_to_addresses([LOOP4], port, timeout=10.0)
    assert str(exc_info.value) == f"connect to 127.0.0.1:{port} timed out after 10.0 s"
    assert trio.current_time() == 10.0


async def test_mixed_failures_are_all_reported(autojump_clock: trio.testing.MockClock) -> None:
    endpoints = one_port((refused, LOOP6), (black_hole, LOOP4))
    with endpoints as port, pytest.raises(UpstreamError) as exc_info:
        await connect_to_addresses([LOOP6, LOOP4], port, timeout=1.0)
    assert str(exc_info.value) == (
        f"connect to [::1]:{port} failed: {REFUSED}; "
        f"connect to 127.0.0.1:{port} timed out after 1.0 s"
    )
    assert trio.current_time() == 1.0


async def test_deadline_before_every_address_was_tried(
    autojump_clock: trio.testing.MockClock,
) -> None:
    two, three = ipaddress.ip_address("127.0.0.2"), ipaddress.ip_address("127.0.0.3")
    endpoints = one_port((black_hole, LOOP4), (black_hole, two), (black_hole, three))
    with endpoints as port, pytest.raises(UpstreamError) as exc_info:
        # Attempts start at 0 and 0.25; the third would start at 0.5, after the deadline.
        await connect_to_addresses([LOOP4, two, three], port, timeout=0.4)
    assert str(exc_info.value) == (
        f"connect to 127.0.0.1:{port} timed out after 0.4 s; "
        f"connect to 127.0.0.2:{port} timed out after 0.4 s; "
        f"connect to 127.0.0.3:{port} not attempted (deadline)"
    )
    assert trio.current_time() == 0.4


async def test_caller_cancellation_closes_every_socket(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with one_port((black_hole, LOOP4), (black_hole, LOOP6)) as port:
        before = open_fds()
        with trio.move_on_after(0.3) as scope:
            await connect_to_addresses([LOOP4, LOOP6], port, timeout=10.0)
        assert scope.cancelled_caught
        assert open_fds() <= before
    assert trio.current_time() == 0.3


async def test_no_addresses_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="at least one address"):
        await connect_to_addresses([], 443, timeout=10.0)
