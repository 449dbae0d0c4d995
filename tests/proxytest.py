"""Small helpers shared by the end-to-end tests (importable: tests/ is on pytest's path)."""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable, Mapping

import trio

import loader


async def wait_for(predicate: Callable[[], bool], *, timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


async def drain(stream: trio.abc.ReceiveStream) -> bytes:
    data = b""
    while chunk := await stream.receive_some(65536):
        data += chunk
    return data


async def receive_exactly(stream: trio.abc.ReceiveStream, n: int) -> bytes:
    """Read exactly ``n`` bytes; EOF before that is a test failure."""
    data = bytearray()
    while len(data) < n:
        chunk = await stream.receive_some(n - len(data))
        if not chunk:
            raise AssertionError(f"EOF after {len(data)} of {n} bytes")
        data += chunk
    return bytes(data)


async def echo(stream: trio.SocketStream) -> None:
    """A backend handler that sends back whatever it receives, until EOF or reset."""
    try:
        while data := await stream.receive_some(65536):
            await stream.send_all(data)
    except trio.BrokenResourceError:
        pass
    await stream.aclose()


async def serve_tcp(
    nursery: trio.Nursery,
    handler: Callable[[trio.SocketStream], Awaitable[object]],
    host: str = "127.0.0.1",
) -> int:
    """Serve ``handler`` on a fresh port of ``host`` until ``nursery`` is cancelled (the
    listeners are closed then, also when cancelled); returns the port."""
    listeners = await trio.open_tcp_listeners(0, host=host)

    async def serve() -> None:
        try:
            await trio.serve_listeners(handler, listeners)
        finally:
            with trio.CancelScope(shield=True):
                for listener in listeners:
                    await trio.aclose_forcefully(listener)

    nursery.start_soon(serve)
    port: int = listeners[0].socket.getsockname()[1]
    return port
def client_hello(name: str) -> bytes:
    """A real ClientHello (Python's ssl) asking for ``name``: the first flight, nothing more."""
    out = ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(ssl.MemoryBIO(), out, server_hostname=name)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        return out.read()
    raise AssertionError("a TLS client finished its handshake without a server")


def loader_fds_opened_since(before: Mapping[int, str]) -> dict[int, str]:
    """Loader-owned fds open now that were not open (from the same place) in ``before``, a
    ``loader.live_fds()`` snapshot. Fds closed meanwhile, e.g. by the garbage collector
    finishing an earlier test's objects, are not a leak."""
    return {fd: where for fd, where in loader.live_fds().items() if before.get(fd) != where}
