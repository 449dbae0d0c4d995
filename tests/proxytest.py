"""Small helpers shared by the end-to-end tests (importable: tests/ is on pytest's path)."""

from __future__ import annotations

import hashlib
import os
import shutil
import ssl
from collections.abc import Awaitable, Callable, Iterator, Mapping

import attrs
import pytest
import trio
import trio_sni_loader as loader


# Two flake8-async findings that do not apply to this helper:
# ASYNC109 (a `timeout` parameter instead of the caller's cancel scope): here `timeout` is not a
#   way to cancel work but the bound of what the test asserts ("true within N seconds"); it only
#   opens an inner fail_after, so an enclosing cancel scope still applies as usual.
# ASYNC110 (sleep-polling instead of a trio.Event): the predicates watch state that has no event
#   to wait on (a listener's fileno, a kernel plane's closed flag, the proxy's access log), so
#   polling is the only way to observe it from a test.
async def wait_for(predicate: Callable[[], bool], *, timeout: float = 5.0) -> None:  # noqa: ASYNC109
    with trio.fail_after(timeout):
        while not predicate():  # noqa: ASYNC110
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


@attrs.define(eq=False)
class StalledTransfer:
    """A client pushing ``total`` bytes (numbered 1 MiB chunks after ``hello``) to a backend
    that reads ``hello`` and then stops reading until :attr:`resume` is set; the backend
    hashes everything it got, so :meth:`delivered_exactly` can check every byte arrived."""

    hello: bytes
    total: int
    seed: bytes = attrs.Factory(lambda: os.urandom(1024 * 1024))
    resume: trio.Event = attrs.Factory(trio.Event)
    digests: list[str] = attrs.Factory(list)
    #: Bytes the client has handed to its socket so far (the ``hello`` not counted).
    sent: int = 0

    def chunks(self) -> Iterator[bytes]:
        for i in range(self.total // len(self.seed)):
            yield i.to_bytes(8, "little") + self.seed[8:]

    async def backend(self, stream: trio.SocketStream) -> None:
        """The backend handler."""
        first = await stream.receive_some(len(self.hello))  # a little, then stall
        await self.resume.wait()
        digest = hashlib.sha256(first)
        while chunk := await stream.receive_some(4 * 1024 * 1024):
            digest.update(chunk)
        self.digests.append(digest.hexdigest())
        await stream.aclose()

    async def push(self, client: trio.SocketStream) -> None:
        """The client: the hello, everything, then EOF."""
        await client.send_all(self.hello)
        for chunk in self.chunks():
            await client.send_all(chunk)
            self.sent += len(chunk)
        await client.send_eof()

    async def until_stalled(self, on_tick: Callable[[], object] = lambda: None) -> None:
        """Return once :attr:`sent` has not moved for a second (``on_tick`` every 0.1 s)."""
        last, still = -1, 0
        with trio.fail_after(60):
            while still < 10:
                await trio.sleep(0.1)
                on_tick()
                still = still + 1 if self.sent == last else 0
                last = self.sent

    async def delivered_exactly(self) -> bool:
        """Wait for the backend's digest; True if it is that of everything pushed, in order."""
        expected = hashlib.sha256(self.hello)
        for chunk in self.chunks():
            expected.update(chunk)
        await wait_for(lambda: len(self.digests) == 1, timeout=60)
        return self.digests == [expected.hexdigest()]


def need(tool: str) -> str:
    """The path of ``tool`` (from .ci/apt-packages). Missing: a skip on a developer's machine,
    a failure in CI (``TRIO_SNI_REQUIRE_BPF=1``), where the check must run."""
    path = shutil.which(tool)
    if path is None:
        if os.environ.get("TRIO_SNI_REQUIRE_BPF") == "1":
            pytest.fail(f"{tool} is not installed (.ci/apt-packages installs it)")
        pytest.skip(f"no {tool} here")
    return path
