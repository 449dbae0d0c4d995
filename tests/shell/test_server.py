"""The accept loop: overload errors back off and retry; anything else is a crash, not a spin."""

from __future__ import annotations

import errno

import pytest
import trio
import trio.testing
from proxytest import wait_for

from trio_sni.sansio.config import Listener
from trio_sni.sansio.config_load import load_config
from trio_sni.server import ACCEPT_BACKOFF, Proxy

CONFIG = {"listeners": [{"host": "127.0.0.1", "port": 0}], "log": {"access_log": None}}


class FlakyListener(trio.abc.Listener[trio.SocketStream]):
    """A real listener whose first accepts fail with the given errors (errno injection)."""

    def __init__(self, real: trio.SocketListener, errors: list[OSError]) -> None:
        self.real = real
        self.errors = errors
        self.failures_at: list[float] = []

    async def accept(self) -> trio.SocketStream:
        await trio.lowlevel.checkpoint()
        if self.errors:
            self.failures_at.append(trio.current_time())
            raise self.errors.pop(0)
        return await self.real.accept()

    async def aclose(self) -> None:
        await self.real.aclose()


async def test_overload_errors_back_off_and_retry(autojump_clock: trio.testing.MockClock) -> None:
    proxy = Proxy(load_config(CONFIG), access_log=lambda record: None)
    [real] = await trio.open_tcp_listeners(0, host="127.0.0.1")
    overloads = [
        OSError(e, "overloaded") for e in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
    ]
    flaky = FlakyListener(real, overloads)
    spec = Listener(host="127.0.0.1", port=0)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(proxy._accept_loop, flaky, spec, nursery)
            client = await trio.open_tcp_stream("127.0.0.1", real.socket.getsockname()[1])
            await wait_for(lambda: not proxy.context.live and len(flaky.failures_at) == 4)
            await client.aclose()
            nursery.cancel_scope.cancel()
    finally:
        await real.aclose()
    assert flaky.failures_at == [0, ACCEPT_BACKOFF, 2 * ACCEPT_BACKOFF, 3 * ACCEPT_BACKOFF]


async def test_other_accept_errors_crash_loudly() -> None:
    proxy = Proxy(load_config(CONFIG), access_log=lambda record: None)
    [real] = await trio.open_tcp_listeners(0, host="127.0.0.1")
    flaky = FlakyListener(real, [OSError(errno.EBADF, "bad fd")])
    try:
        with pytest.RaisesGroup(pytest.RaisesExc(OSError, match="bad fd")):
            async with trio.open_nursery() as nursery:
                await proxy._accept_loop(flaky, Listener(host="127.0.0.1", port=0), nursery)
    finally:
        await real.aclose()
