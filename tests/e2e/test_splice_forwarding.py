"""The ``splice`` forwarder beyond the shared suite in test_forwarding.py, and mode selection.

Churn and cancellation leave no fd open (the autouse ``no_fd_leaks`` fixture checks every
test; the tests here also look while the proxy still runs, for the pipes), a stalled reader
holds at most the pipe and the socket buffers, the idle timeout, the per-rule ``mode``, and
:func:`trio_sni.forward.choose_forwarder`'s fallback chain.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from proxytest import StalledTransfer, drain, echo, receive_exactly, serve_tcp, wait_for

from trio_sni.errors import AccelerationUnavailable
from trio_sni.forward import CopyForwarder, choose_forwarder
from trio_sni.forward.splice import PIPES_KEPT, SpliceForwarder, open_pipe, splice_unavailable
from trio_sni.sansio.config_load import load_config

HELLO = (Path(__file__).parent.parent / "data" / "hellos" / "curl.bin").read_bytes()
HELLO_NAME = "x.test"
MiB = 1024 * 1024

Handler = Callable[[trio.SocketStream], Awaitable[None]]


@pytest.fixture
def backend(nursery: trio.Nursery) -> Callable[..., Awaitable[int]]:
    async def start(handler: Handler, host: str = "127.0.0.1") -> int:
        return await serve_tcp(nursery, handler, host)

    return start


def config(port: int, mode: str = "splice", **overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "listeners": [{"host": "127.0.0.1", "port": 0, "target_port": port}],
        "rules": [{"match": HELLO_NAME, "allow_private": True}],
        "resolver": {"hosts": {HELLO_NAME: ["127.0.0.1"]}},
        "log": {"access_log": None},
        "ebpf": {"sockmap": {"enabled": False}},
        "forwarding": {"mode": mode},
        "fallback_mode": "none",
        "limits": {"per_client_rate": 0, "per_client_connections": 0},  # churn from one IP
    }
    data.update(overrides)
    return data


def pipe_fds() -> int:
    n = 0
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own fd is gone
            n += os.readlink(f"/proc/self/fd/{name}").startswith("pipe:")
    return n


def test_splice_is_available_here() -> None:
    assert splice_unavailable() is None  # Linux CI: the splice suite must not be skipped


def test_pipe_size_falls_back_to_the_default_when_refused() -> None:
    r, w, capacity = open_pipe(MiB)
    os.close(r)
    os.close(w)
    assert capacity == MiB  # root, at pipe-max-size (docs/kernel-facts.md, fact 36)
    with open("/proc/sys/fs/pipe-max-size") as f:
        limit = int(f.read())
    r, w, capacity = open_pipe(limit * 4)  # beyond it: EPERM without CAP_SYS_RESOURCE
    os.close(r)
    os.close(w)
    assert capacity in (limit * 4, 65536)  # granted (CAP_SYS_RESOURCE) or the default kept


# ------------------------------------------------------------------------------------------
# Churn, cancellation, idle timeout


async def test_churn_leaves_no_pipe_open(backend: Any, start_proxy: Any) -> None:
    port = await backend(echo)
    running = await start_proxy(config(port))
    pipes_before = pipe_fds()
    limiter = trio.CapacityLimiter(50)
    bad: list[int] = []

    async def one(i: int) -> None:
        async with limiter:
            client = await trio.open_tcp_stream("127.0.0.1", running.port)
            async with client:
                await client.send_all(HELLO)
                echoed = await receive_exactly(client, len(HELLO))
                msg = b"ping %d" % i
                await client.send_all(msg)
                back = await receive_exactly(client, len(msg))
                if echoed != HELLO or back != msg:
                    bad.append(i)
                if i % 3 == 0:
                    await client.send_eof()  # some half-close first, the others just close

    async with trio.open_nursery() as nursery:
        for i in range(500):
            nursery.start_soon(one, i)
    assert bad == []
    await wait_for(lambda: len(running.access_log) == 500, timeout=60)
    assert {r["mode"] for r in running.access_log} == {"splice"}
    # Every pipe is back in the pool, which keeps a few for the next burst.
    assert pipe_fds() == pipes_before + 2 * idle_pipes(running)


def idle_pipes(running: Any) -> int:
    forwarder = running.proxy.context.forwarder
    assert isinstance(forwarder, SpliceForwarder)
    return forwarder.statistics().idle_pipes


async def test_idle_connections_hold_no_pipe(backend: Any, start_proxy: Any) -> None:
    """Issue 14: 200 connections that have exchanged their first bytes and wait hold their two
    sockets each and no pipe (pipes are borrowed while bytes move), so a process at its fd limit
    carries three times as many idle splice connections; the pool keeps at most PIPES_KEPT."""
    port = await backend(echo)
    running = await start_proxy(config(port))
    pipes_before = pipe_fds()
    clients = []
    try:
        for _ in range(200):
            client = await trio.open_tcp_stream("127.0.0.1", running.port)
            clients.append(client)
            await client.send_all(HELLO)
            assert await receive_exactly(client, len(HELLO)) == HELLO
        assert len(running.proxy.context.live) == 200
        idle = idle_pipes(running)
        assert 1 <= idle <= PIPES_KEPT
        assert pipe_fds() == pipes_before + 2 * idle
        # And they still forward: a burst on every connection at once, then idle again.
        for i, client in enumerate(clients):
            await client.send_all(b"again %d" % i)
        for i, client in enumerate(clients):
            assert await receive_exactly(client, len(b"again %d" % i)) == b"again %d" % i
        await wait_for(lambda: pipe_fds() == pipes_before + 2 * idle_pipes(running))
    finally:
        for client in clients:
            await client.aclose()


async def test_cancellation_closes_every_pipe(backend: Any, start_proxy: Any) -> None:
    """20 connections in the middle of splicing when the drain deadline passes."""

    async def hold(stream: trio.SocketStream) -> None:
        await drain(stream)
        await stream.aclose()

    port = await backend(hold)
    running = await start_proxy(config(port, timeouts={"drain": 0.5}))
    pipes_before = pipe_fds()
    clients = []
    for _ in range(20):
        client = await trio.open_tcp_stream("127.0.0.1", running.port)
        await client.send_all(HELLO + b"partial request")
        clients.append(client)
    await wait_for(
        lambda: (
            len(running.proxy.context.live) == 20
            and all(i.mode for i in running.proxy.context.live.values())
        )
    )
    # Their first bytes have gone through: an idle connection holds no pipe.
    await wait_for(lambda: pipe_fds() == pipes_before + 2 * idle_pipes(running))
    running.proxy.shutdown()
    for client in clients:
        with trio.fail_after(10):
            assert await drain(client) == b""
        await client.aclose()
    await wait_for(lambda: len(running.access_log) == 20, timeout=10)
    assert {(r["reason"], r["mode"]) for r in running.access_log} == {("shutdown", "splice")}
    await wait_for(lambda: pipe_fds() == pipes_before)  # the pool closes with the proxy


async def test_idle_timeout_in_splice_mode(
    autojump_clock: trio.testing.MockClock, backend: Any, start_proxy: Any
) -> None:
    port = await backend(echo)
    running = await start_proxy(config(port, timeouts={"idle": 30}))
    client = await trio.open_tcp_stream("127.0.0.1", running.port)
    await client.send_all(HELLO)
    got = b""
    while len(got) < len(HELLO):
        got += await client.receive_some(65536)
    await trio.sleep(20)
    await client.send_all(b"keepalive")  # pushes the deadline
    assert await client.receive_some(9) == b"keepalive"
    active = trio.current_time()
    assert await drain(client) == b""
    assert 30 <= trio.current_time() - active < 31
    await client.aclose()
    await wait_for(lambda: len(running.access_log) == 1)
    assert (running.access_log[0]["reason"], running.access_log[0]["mode"]) == (
        "idle_timeout",
        "splice",
    )


# ------------------------------------------------------------------------------------------
# Backpressure: a stalled reader


def _max(path: str) -> int:
    with open(path) as f:
        return int(f.read().split()[-1])


async def test_stalled_reader_is_bounded_by_pipes_and_socket_buffers(
    backend: Any, start_proxy: Any
) -> None:
    """The backend stops reading while the client pushes 256 MiB: what leaves the client is
    at most the pipe plus the four socket buffers on the way. Then everything arrives."""
    pipe = 256 * 1024
    bound = pipe + 2 * _max("/proc/sys/net/ipv4/tcp_rmem") + 2 * _max("/proc/sys/net/ipv4/tcp_wmem")
    transfer = StalledTransfer(HELLO, total=256 * MiB)
    port = await backend(transfer.backend)
    running = await start_proxy(config(port, forwarding={"mode": "splice", "pipe_size": pipe}))
    client = await trio.open_tcp_stream("127.0.0.1", running.port)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(transfer.push, client)
        await transfer.until_stalled()
        sent = transfer.sent
        assert sent <= bound, f"{sent / MiB:.1f} MiB left the client, bound {bound / MiB:.1f}"
        [info] = running.proxy.context.live.values()
        assert info.counters.to_upstream <= bound
        transfer.resume.set()
    await client.aclose()
    assert await transfer.delivered_exactly()
    await wait_for(lambda: len(running.access_log) == 1, timeout=30)
    [record] = running.access_log
    assert (record["reason"], record["mode"]) == ("normal", "splice")
    assert record["bytes_to_upstream"] == len(HELLO) + transfer.total


# ------------------------------------------------------------------------------------------
# Per-rule mode


@pytest.mark.parametrize(("default", "rule"), [("copy", "splice"), ("splice", "copy")])
async def test_a_rule_chooses_its_mode(
    default: str, rule: str, backend: Any, start_proxy: Any
) -> None:
    port = await backend(echo)
    data = config(port, default)
    data["rules"] = [
        {"match": HELLO_NAME, "allow_private": True, "mode": rule},
        {"match": "other.test", "allow_private": True},
    ]
    running = await start_proxy(data)
    assert running.proxy.context.forwarder.mode == default
    client = await trio.open_tcp_stream("127.0.0.1", running.port)
    await client.send_all(HELLO)
    got = b""
    while len(got) < len(HELLO):
        got += await client.receive_some(65536)
    await client.aclose()
    await wait_for(lambda: len(running.access_log) == 1)
    assert running.access_log[0]["mode"] == rule


# ------------------------------------------------------------------------------------------
# Mode selection (choose_forwarder)


def plan_for(**overrides: Any) -> Any:
    data: dict[str, Any] = {
        "listen_addr": "127.0.0.1:8443",
        "ebpf": {"sockmap": {"enabled": False}},
    }
    data.update(overrides)
    plan = choose_forwarder(load_config(data))
    plan.close()  # the tests read what was chosen and why; the forwarders' fds are not needed
    return plan


def test_auto_without_the_sockmap_switch_uses_splice(monkeypatch: pytest.MonkeyPatch) -> None:
    plan = plan_for()
    assert isinstance(plan.forwarder, SpliceForwarder)
    assert plan.why == "ebpf.sockmap is disabled in the config; using splice"
    assert plan.fallbacks == ()
    monkeypatch.setattr("trio_sni.forward.choose.splice_unavailable", lambda: "no splice here")
    plan = plan_for(fallback_mode="none")  # not a fallback: auto takes the best it has
    assert isinstance(plan.forwarder, CopyForwarder)
    assert plan.why == (
        "ebpf.sockmap is disabled in the config; "
        "splice forwarding unavailable: no splice here; using copy"
    )
    assert load_config({"listen_addr": "127.0.0.1:1"}).forwarding.mode == "auto"
    assert load_config({"listen_addr": "127.0.0.1:1"}).forwarding.pipe_size == MiB


@pytest.mark.parametrize("mode", ["splice", "copy"])
def test_an_available_mode_is_used_as_asked(mode: str) -> None:
    plan = plan_for(forwarding={"mode": mode})
    assert plan.forwarder.mode == mode
    assert plan.why == f"forwarding.mode {mode}"
    assert {m: f.mode for m, f in plan.by_mode.items()}["splice"] == "splice"


def test_kernel_falls_back_to_splice_then_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    plan = plan_for(forwarding={"mode": "kernel"})
    assert isinstance(plan.forwarder, SpliceForwarder)
    assert plan.why == (
        "kernel forwarding unavailable: ebpf.sockmap is disabled in the config; using splice"
    )
    assert plan.fallbacks == (("kernel", "splice", plan.why),)
    monkeypatch.setattr("trio_sni.forward.choose.splice_unavailable", lambda: "no splice here")
    plan = plan_for(forwarding={"mode": "kernel"})
    assert isinstance(plan.forwarder, CopyForwarder)
    assert plan.why == (
        "kernel forwarding unavailable: ebpf.sockmap is disabled in the config; "
        "splice forwarding unavailable: no splice here; using copy"
    )
    plan = plan_for(forwarding={"mode": "splice"})
    assert (plan.forwarder.mode, plan.why) == (
        "copy",
        "splice forwarding unavailable: no splice here; using copy",
    )
    assert plan.by_mode["splice"] is plan.by_mode["copy"]  # never an unavailable mode


def test_fallback_mode_copy_skips_splice() -> None:
    plan = plan_for(forwarding={"mode": "kernel"}, fallback_mode="copy")
    assert plan.forwarder.mode == "copy"


def test_fallback_mode_none_refuses_an_unavailable_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(AccelerationUnavailable, match="kernel forwarding unavailable"):
        plan_for(forwarding={"mode": "kernel"}, fallback_mode="none")
    monkeypatch.setattr("trio_sni.forward.choose.splice_unavailable", lambda: "no splice here")
    with pytest.raises(AccelerationUnavailable, match="splice forwarding unavailable"):
        plan_for(rules=[{"match": "a.test", "mode": "splice"}], fallback_mode="none")
    # a mode nobody asks for may be unavailable
    assert plan_for(fallback_mode="none", forwarding={"mode": "copy"}).forwarder.mode == "copy"


def test_rule_fallbacks_are_listed_for_the_log(caplog: pytest.LogCaptureFixture) -> None:
    plan = plan_for(rules=[{"match": "a.test", "mode": "kernel"}], forwarding={"mode": "copy"})
    assert plan.forwarder.mode == "copy"
    assert plan.for_mode("kernel").mode == "splice"
    assert plan.for_mode(None) is plan.forwarder
    assert [(a, u) for a, u, _ in plan.fallbacks] == [("kernel", "splice")]
    from trio_sni.features import SockhashFeature

    forwarding = SockhashFeature(
        load_config(
            {
                "listen_addr": "127.0.0.1:8443",
                "ebpf": {"sockmap": {"enabled": False}},
                "forwarding": {"mode": "copy"},
                "rules": [{"match": "a.test", "mode": "kernel"}],
            }
        )
    )
    with caplog.at_level(logging.INFO, logger="trio_sni"):
        forwarding.start([])  # what Proxy.serve() does once the listeners are bound
    forwarding.close()
    lines = [r.getMessage() for r in caplog.records if "forwarding mode" in r.getMessage()]
    assert lines == [
        "forwarding mode: copy (forwarding.mode copy)",
        "forwarding mode kernel (asked by rules): splice (kernel forwarding unavailable: "
        "ebpf.sockmap is disabled in the config; using splice)",
    ]


def test_rule_mode_is_validated() -> None:
    from trio_sni.sansio.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        load_config(
            {
                "listen_addr": "127.0.0.1:1",
                "rules": [{"match": "a.test", "mode": "fast"}],
                "forwarding": {"pipe_size": 1},
            }
        )
    text = str(info.value)
    assert 'rules[0].mode: expected one of "auto", "kernel", "splice", "copy", got "fast"' in text
    assert "forwarding.pipe_size: must be from 4096" in text


async def test_out_of_fds_for_pipes_copies_the_connection(
    backend: Any, start_proxy: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    def no_pipe(size: int) -> tuple[int, int, int]:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr("trio_sni.forward.splice.open_pipe", no_pipe)
    port = await backend(echo)
    running = await start_proxy(config(port))
    for _ in range(2):
        client = await trio.open_tcp_stream("127.0.0.1", running.port)
        await client.send_all(HELLO)
        got = b""
        while len(got) < len(HELLO):
            got += await client.receive_some(65536)
        assert got == HELLO
        await client.aclose()
    await wait_for(lambda: len(running.access_log) == 2)
    assert [r["mode"] for r in running.access_log] == ["copy", "copy"]
    assert [r["fallback_from"] for r in running.access_log] == ["splice", "splice"]
    assert running.proxy.context.forwarder.fallbacks == 2
    assert running.proxy.metrics.fallbacks == {("splice", "copy"): 2}


async def test_a_rule_whose_mode_is_unavailable_is_logged_and_counted_per_connection(
    backend: Any, start_proxy: Any
) -> None:
    from prometheus_client import generate_latest

    port = await backend(echo)
    data = config(port, mode="auto", fallback_mode="auto")
    data["rules"] = [{"match": HELLO_NAME, "allow_private": True, "mode": "kernel"}]
    running = await start_proxy(data)  # sockmap switched off: kernel falls back to splice
    client = await trio.open_tcp_stream("127.0.0.1", running.port)
    await client.send_all(HELLO)
    assert await receive_exactly(client, len(HELLO)) == HELLO
    await client.aclose()
    await wait_for(lambda: len(running.access_log) == 1)
    [record] = running.access_log
    assert (record["mode"], record["fallback_from"]) == ("splice", "kernel")
    text = generate_latest(running.proxy.metrics.registry).decode()
    assert 'trio_sni_forwarding_fallbacks_total{mode="splice",requested="kernel"} 1.0' in text
    assert "trio_sni_splice_small_pipes_total 0.0" in text


def test_fallback_from_names_the_mode_asked_for_only_when_another_ran() -> None:
    from trio_sni.connection import ConnectionInfo

    def info(requested: str | None, planned: str | None, used: str | None) -> Any:
        i = ConnectionInfo(client=("192.0.2.1", 1), listener="l", started=0.0, started_wall=0.0)
        i.requested_mode, i.mode, i.counters.mode = requested, planned, used
        return i.fallback_from

    assert info("auto", "kernel", "kernel") is None
    assert info("auto", "kernel", "copy") == "kernel"  # the sockhash refused a socket
    assert info("kernel", "splice", "splice") == "kernel"  # unavailable at startup
    assert info("splice", "splice", "copy") == "splice"  # no pipes for this one
    assert info(None, None, None) is None  # refused before forwarding


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"], ids=["ipv4", "ipv6"])
async def test_bulk_256_mib_each_way_at_once(host: str, backend: Any, start_proxy: Any) -> None:
    total = 256 * MiB
    seed = os.urandom(MiB)

    def chunks(tag: bytes) -> Iterator[bytes]:
        for i in range(total // MiB):
            yield tag + i.to_bytes(8, "little") + seed[9:]

    def digest(first: bytes, tag: bytes) -> str:
        h = hashlib.sha256(first)
        for chunk in chunks(tag):
            h.update(chunk)
        return h.hexdigest()

    async def pump_and_hash(stream: trio.SocketStream, tag: bytes, out: list[str]) -> None:
        async def send() -> None:
            for chunk in chunks(tag):
                await stream.send_all(chunk)
            await stream.send_eof()

        h = hashlib.sha256()
        async with trio.open_nursery() as inner:
            inner.start_soon(send)
            while data := await stream.receive_some(4 * MiB):
                h.update(data)
        out.append(h.hexdigest())

    at_backend: list[str] = []

    async def handler(stream: trio.SocketStream) -> None:
        await pump_and_hash(stream, b"d", at_backend)
        await stream.aclose()

    port = await backend(handler, host)
    data = config(port)
    data["listeners"][0]["host"] = host
    data["resolver"] = {"hosts": {HELLO_NAME: [host]}}
    running = await start_proxy(data)
    client = await trio.open_tcp_stream(host, running.port)
    await client.send_all(HELLO)
    at_client: list[str] = []
    with trio.fail_after(120):
        await pump_and_hash(client, b"u", at_client)
    await client.aclose()
    await wait_for(lambda: len(running.access_log) == 1 and at_backend, timeout=30)
    assert at_client == [digest(b"", b"d")]
    assert at_backend == [digest(HELLO, b"u")]
    [record] = running.access_log
    assert (record["reason"], record["mode"]) == ("normal", "splice")
    assert record["bytes_to_upstream"] == len(HELLO) + total
    assert record["bytes_to_client"] == total
