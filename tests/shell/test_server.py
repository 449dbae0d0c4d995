"""The accept loop: overload errors back off and retry, errors about a connection already gone
skip it; anything else is a crash, not a spin."""

from __future__ import annotations

import errno
import socket
from typing import Any

import attrs
import pytest
import trio
import trio.testing
from proxytest import wait_for

from trio_sni import server
from trio_sni.sansio.config import Listener
from trio_sni.sansio.config_load import load_config
from trio_sni.server import ACCEPT_BACKOFF, ACCEPT_SKIP_ERRNOS, Proxy, ReserveFd

CONFIG = {"listeners": [{"host": "127.0.0.1", "port": 0}], "log": {"access_log": None}}


ACCEPT_NOW = server.accept_now  # the real one, before a test replaces it


@attrs.define
class FlakyAccept:
    """accept() on the real listening socket, except that the first calls fail with the
    given errors (errno injection)."""

    errors: list[OSError]
    failures_at: list[float] = attrs.Factory(list)

    def __call__(self, listening: socket.socket) -> tuple[socket.socket, Any]:
        if self.errors:
            self.failures_at.append(trio.current_time())
            raise self.errors.pop(0)
        return ACCEPT_NOW(listening)


async def test_overload_errors_back_off_and_retry(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy = Proxy(load_config(CONFIG), access_log=lambda record: None)
    [real] = await trio.open_tcp_listeners(0, host="127.0.0.1")
    overloads = [
        OSError(e, "overloaded") for e in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
    ]
    flaky = FlakyAccept(overloads)
    monkeypatch.setattr(server, "accept_now", flaky)
    spec = Listener(host="127.0.0.1", port=0)
    # No reserve fd could be taken (tests/e2e/test_fd_limit.py has the real EMFILE with one):
    # every error backs off.
    monkeypatch.setattr(ReserveFd, "_open", staticmethod(lambda: -1))
    reserve = ReserveFd()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(proxy._accept_loop, real.socket, spec, nursery, reserve)
            client = await trio.open_tcp_stream("127.0.0.1", real.socket.getsockname()[1])
            await wait_for(lambda: not proxy.context.live and len(flaky.failures_at) == 4)
            await client.aclose()
            nursery.cancel_scope.cancel()
    finally:
        reserve.close()
        await real.aclose()
    assert flaky.failures_at == [0, ACCEPT_BACKOFF, 2 * ACCEPT_BACKOFF, 3 * ACCEPT_BACKOFF]


async def test_other_accept_errors_crash_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    proxy = Proxy(load_config(CONFIG), access_log=lambda record: None)
    [real] = await trio.open_tcp_listeners(0, host="127.0.0.1")
    monkeypatch.setattr(server, "accept_now", FlakyAccept([OSError(errno.EBADF, "bad fd")]))
    reserve = ReserveFd()
    try:
        with pytest.RaisesGroup(pytest.RaisesExc(OSError, match="bad fd")):
            async with trio.open_nursery() as nursery:
                await proxy._accept_loop(
                    real.socket, Listener(host="127.0.0.1", port=0), nursery, reserve
                )
    finally:
        reserve.close()
        await real.aclose()


async def test_a_connection_gone_in_accept_is_skipped_at_once(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    records: list[dict[str, object]] = []
    proxy = Proxy(load_config(CONFIG), access_log=records.append)
    [real] = await trio.open_tcp_listeners(0, host="127.0.0.1")
    gone = [OSError(e, "gone") for e in sorted(ACCEPT_SKIP_ERRNOS)]
    flaky = FlakyAccept(gone)
    monkeypatch.setattr(server, "accept_now", flaky)
    try:
        async with trio.open_nursery() as nursery:
            reserve = ReserveFd()
            nursery.start_soon(
                proxy._accept_loop,
                real.socket,
                Listener(host="127.0.0.1", port=0),
                nursery,
                reserve,
            )
            client = await trio.open_tcp_stream("127.0.0.1", real.socket.getsockname()[1])
            client_port = client.socket.getsockname()[1]
            await wait_for(lambda: len(proxy.context.live) == 1)
            await client.aclose()
            await wait_for(lambda: len(records) == 1)
            nursery.cancel_scope.cancel()
        reserve.close()
    finally:
        await real.aclose()
    # At once (no backoff), and without a log line: those accepts accepted nothing.
    assert flaky.failures_at == [0] * len(ACCEPT_SKIP_ERRNOS)
    [record] = records
    assert record["client"] == f"127.0.0.1:{client_port}"
