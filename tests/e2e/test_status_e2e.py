"""The status endpoint over real loopback sockets, next to a real proxy forwarding real TLS.

Normal requests go through a real HTTP client (h11); malformed ones are raw bytes. Metric
values are checked against the access-log records of the same traffic.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
from collections.abc import Callable
from typing import Any

import pytest
import trio
from proxytest import wait_for
from statusclient import http_request, metric_samples, raw_exchange, sample, status_line

from trio_sni.accel import probe
from trio_sni.sansio.config_load import load_config
from trio_sni.server import Proxy
from trio_sni.status import serve_status

#: Whether the default config forwards in kernel mode here.
KERNEL = probe().sockmap
#: Whether the shared DNS cache (a pinned BPF map) can be opened here.
ROOT = os.geteuid() == 0


def COPY_MODE(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with kernel forwarding switched off and mode "copy" (byte counts per chunk)."""
    return {**config, "forwarding": {"mode": "copy"}, "ebpf": {"sockmap": {"enabled": False}}}


REQUEST = b"GET / HTTP/1.1\r\nHost: bench.test\r\n\r\n"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in leaves(sub)]
    return [exc]


@pytest.fixture
def start_with_status(
    start_proxy: Callable[[dict[str, Any]], Any],
) -> Callable[[dict[str, Any]], Any]:
    """``running, status_port = await start_with_status(config)``: the proxy with
    ``status.listen`` on a free loopback port, started through ``Proxy.serve``."""

    async def start(config: dict[str, Any]) -> tuple[Any, int]:
        for attempt in range(3):
            port = free_port()
            try:
                running = await start_proxy({**config, "status": {"listen": f"127.0.0.1:{port}"}})
            except BaseException as exc:  # someone took the port in between: try another
                if attempt < 2 and all(isinstance(e, OSError) for e in leaves(exc)):
                    continue
                raise
            assert [lst.socket.getsockname()[1] for lst in running.proxy.status_listeners] == [port]
            return running, port
        raise AssertionError("unreachable")

    return start


async def tls_open(port: int, name: str, ctx: ssl.SSLContext) -> trio.SSLStream[trio.SocketStream]:
    """A TLS connection through the proxy that has sent one request and read the answer;
    left open (the caller closes it)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    tls = trio.SSLStream(stream, ctx, server_hostname=name)
    try:
        await tls.send_all(REQUEST)
        response = b""
        while not response.endswith(b"hello from the backend\n"):
            chunk = await tls.receive_some(65536)
            assert chunk, response
            response += chunk
    except BaseException:
        await trio.aclose_forcefully(tls)
        raise
    return tls


async def tls_get(port: int, name: str, ctx: ssl.SSLContext) -> None:
    """One request, read to the end (the backend closes), then closed: reason "normal"."""
    tls = await tls_open(port, name, ctx)
    try:
        while await tls.receive_some(65536):
            pass
    finally:
        await trio.aclose_forcefully(tls)


# ------------------------------------------------------------------------------------------


async def test_endpoints_and_their_errors(
    start_with_status: Callable[..., Any], proxy_config: Callable[..., Any]
) -> None:
    _running, port = await start_with_status(proxy_config(9))

    health = await http_request(port, "/healthz")
    assert (health.status, health.body) == (200, b"ok\n")
    assert health.headers["content-type"] == "text/plain; charset=utf-8"
    assert health.headers["connection"] == "close"
    assert health.headers["cache-control"] == "no-store"

    ready = await http_request(port, "/readyz")
    assert (ready.status, ready.body) == (200, b"ready\n")

    index = await http_request(port, "/")
    assert index.status == 200
    for path in ("/healthz", "/readyz", "/connections", "/metrics", "/ebpf/status"):
        assert path in index.text

    missing = await http_request(port, "/nope?x=1")
    assert missing.status == 404
    assert missing.text == (
        "no such endpoint: /nope; try /healthz, /readyz, /connections, /metrics, /ebpf/status\n"
    )

    post = await http_request(port, "/metrics", method="POST")
    assert post.status == 405
    assert post.headers["allow"] == "GET, HEAD"
    assert post.text == "method POST not allowed; use GET\n"

    head = await http_request(port, "/healthz", method="HEAD")
    assert (head.status, head.body, head.headers["content-length"]) == (200, b"", "3")

    bad_limit = await http_request(port, "/connections?limit=lots")
    assert bad_limit.status == 400
    assert bad_limit.text == "limit: expected a whole number from 0 to 1000, got 'lots'\n"

    # Absolute-form targets and a trailing slash name the same endpoint.
    assert (await http_request(port, f"http://127.0.0.1:{port}/healthz/")).status == 200


async def test_malformed_and_oversized_requests_get_4xx(
    start_with_status: Callable[..., Any], proxy_config: Callable[..., Any]
) -> None:
    _running, port = await start_with_status(proxy_config(9))

    garbage = await raw_exchange(port, b"\x16\x03\x01\x00\x05hello\r\n\r\n")
    assert status_line(garbage) == b"HTTP/1.1 400 Bad Request"
    assert b"\r\n\r\nbad request: " in garbage

    no_host = await raw_exchange(port, b"GET /healthz HTTP/1.1\r\n\r\n")
    assert status_line(no_host) == b"HTTP/1.1 400 Bad Request"
    assert garbage.count(b"HTTP/1.1") == 1  # one answer, then closed

    huge_head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Filler: " + b"a" * 20000 + b"\r\n\r\n"
    too_long = await raw_exchange(port, huge_head)
    assert status_line(too_long) == b"HTTP/1.1 431 Request Header Fields Too Large"

    body = await raw_exchange(
        port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n"
    )
    assert status_line(body) == b"HTTP/1.1 413 Content Too Large"

    # HTTP/1.0 works too (curl -0, old health checkers).
    old = await raw_exchange(port, b"GET /healthz HTTP/1.0\r\n\r\n")
    assert status_line(old) == b"HTTP/1.1 200 OK"
    assert old.endswith(b"\r\n\r\nok\n")

    # After all that the server still answers.
    assert (await http_request(port, "/healthz")).status == 200


async def test_readyz_follows_the_listeners(
    nursery: trio.Nursery, proxy_config: Callable[..., Any]
) -> None:
    proxy = Proxy(load_config(proxy_config(9)), access_log=lambda record: None)
    # The status server alone, before the proxy serves: alive but not ready.
    [status_listener] = await nursery.start(serve_status, proxy, "127.0.0.1", 0)
    port = status_listener.socket.getsockname()[1]
    assert (await http_request(port, "/healthz")).status == 200
    before = await http_request(port, "/readyz")
    assert (before.status, before.text) == (503, "not ready: listeners not bound yet\n")

    serving = trio.Event()

    async def serve_then_signal() -> None:
        await proxy.serve()
        serving.set()

    async with trio.open_nursery() as proxy_nursery:
        await proxy_nursery.start(proxy.serve)
        during = await http_request(port, "/readyz")
        assert (during.status, during.text) == (200, "ready\n")
        proxy.shutdown()
    after = await http_request(port, "/readyz")
    assert after.status == 503
    assert after.text == "not ready: shutting down: not accepting new connections\n"


async def test_metrics_after_real_traffic_in_copy_mode(
    tls_backend: Any,
    start_with_status: Callable[..., Any],
    proxy_config: Callable[..., Any],
    client_context: ssl.SSLContext,
) -> None:
    running, port = await start_with_status(COPY_MODE(proxy_config(tls_backend.port)))
    await tls_get(running.port, "bench.test", client_context)
    await tls_get(running.port, "www.bench.test", client_context)
    await tls_get(running.port, "other.test", client_context)
    with pytest.raises(trio.BrokenResourceError):  # refused with unrecognized_name
        await tls_get(running.port, "denied.bench.test", client_context)
    async with await trio.open_tcp_stream("127.0.0.1", running.port) as plain:
        await plain.send_all(b"GET / HTTP/1.1\r\n\r\n")  # not TLS
        assert await plain.receive_some(100) == b""
    await wait_for(lambda: len(running.access_log) == 5)
    records = running.access_log

    response = await http_request(port, "/metrics")
    assert response.status == 200
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    s = metric_samples(response.text)

    assert sample(s, "trio_sni_connections_accepted_total") == 5
    assert sample(s, "trio_sni_connections_active") == 0
    assert sample(s, "trio_sni_connections_closed_total", reason="normal", mode="copy") == 3
    assert sample(s, "trio_sni_connections_closed_total", reason="denied_domain", mode="none") == 1
    assert sample(s, "trio_sni_connections_closed_total", reason="not_tls", mode="none") == 1
    for direction in ("to_upstream", "to_client"):
        total = sum(int(r[f"bytes_{direction}"]) for r in records)
        assert total > 0
        assert sample(s, "trio_sni_bytes_total", direction=direction, mode="copy") == total
    bench = [r for r in records if r["rule"] == "bench.test"]
    assert len(bench) == 2
    assert sample(s, "trio_sni_rule_connections_total", rule="bench.test") == 2
    assert sample(s, "trio_sni_rule_connections_total", rule="other.test") == 1
    assert sample(s, "trio_sni_rule_connections_total", rule="none") == 2
    assert sample(s, "trio_sni_rule_bytes_total", rule="bench.test", direction="to_client") == sum(
        int(r["bytes_to_client"]) for r in bench
    )
    assert sample(s, "trio_sni_connection_duration_seconds_count") == 5
    assert sample(s, "trio_sni_connection_duration_seconds_sum") == pytest.approx(
        sum(float(r["duration"]) for r in records)
    )
    hello_sizes = [r["hello_size"] for r in records if r["hello_size"] is not None]
    assert len(hello_sizes) == 4  # every TLS client sent a whole hello; the plain one did not
    assert all(200 < size < 2048 for size in hello_sizes)
    assert sample(s, "trio_sni_client_hello_bytes_count") == 4
    assert sample(s, "trio_sni_client_hello_bytes_sum") == sum(hello_sizes)
    # Three routed names answered from resolver.hosts; the denied one never resolved.
    assert sample(s, "trio_sni_resolver_lookups_total", result="static") == 3
    assert sample(s, "trio_sni_resolver_lookups_total", result="miss") == 0
    assert sample(s, "trio_sni_ebpf_feature_state", feature="sockmap", state="disabled") == 1

    openmetrics = await http_request(
        port, "/metrics", headers=(("Accept", "application/openmetrics-text; version=1.0.0"),)
    )
    assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
    assert openmetrics.text.endswith("# EOF\n")


async def test_connections_shows_a_live_connection(
    tls_backend: Any,
    start_with_status: Callable[..., Any],
    proxy_config: Callable[..., Any],
    client_context: ssl.SSLContext,
) -> None:
    running, port = await start_with_status(COPY_MODE(proxy_config(tls_backend.port)))
    assert json.loads((await http_request(port, "/connections")).body) == {
        "total": 0,
        "limit": 100,
        "connections": [],
    }
    tls = await tls_open(running.port, "bench.test", client_context)
    try:
        listing = json.loads((await http_request(port, "/connections")).body)
        assert listing["total"] == 1
        [conn] = listing["connections"]
        assert conn["sni"] == "bench.test"
        assert conn["rule"] == "bench.test"
        assert conn["decision"] == "allow"
        assert conn["target"] == f"127.0.0.1:{tls_backend.port}"
        assert conn["mode"] == "copy"
        assert conn["listener"] == "127.0.0.1:0"
        assert conn["client"].startswith("127.0.0.1:")
        assert conn["bytes_to_upstream"] > len(REQUEST)
        assert conn["bytes_to_client"] > 0
        assert conn["age"] >= 0

        assert json.loads((await http_request(port, "/connections?limit=0")).body) == {
            "total": 1,
            "limit": 0,
            "connections": [],
        }
        clamped = json.loads((await http_request(port, "/connections?limit=5000")).body)
        assert clamped["limit"] == 1000

        live = metric_samples((await http_request(port, "/metrics")).text)
        assert sample(live, "trio_sni_connections_active") == 1
        assert sample(live, "trio_sni_connections_accepted_total") == 1
        live_bytes = sample(live, "trio_sni_bytes_total", direction="to_client", mode="copy")
        assert live_bytes == conn["bytes_to_client"]
    finally:
        await trio.aclose_forcefully(tls)
    await wait_for(lambda: len(running.access_log) == 1)
    done = metric_samples((await http_request(port, "/metrics")).text)
    assert sample(done, "trio_sni_connections_active") == 0
    assert sample(done, "trio_sni_connections_accepted_total") == 1
    [record] = running.access_log
    final = sample(done, "trio_sni_bytes_total", direction="to_client", mode="copy")
    assert final == record["bytes_to_client"]
    assert final is not None
    assert live_bytes is not None
    assert final >= live_bytes  # never backwards


async def test_ebpf_status_has_the_designs_shape(
    start_with_status: Callable[..., Any], proxy_config: Callable[..., Any]
) -> None:
    _running, port = await start_with_status(proxy_config(9))
    response = await http_request(port, "/ebpf/status")
    assert response.status == 200
    assert response.headers["content-type"] == "application/json"
    doc = json.loads(response.body)
    assert doc["ebpf_enabled"] is KERNEL
    assert doc["features"] == {
        "sockmap": "active" if KERNEL else "unavailable",
        "dns_cache": "active" if ROOT else "unavailable",  # pinned in this test's directory
        "xdp": "disabled",
        "tc": "disabled",
        "stats": "active" if KERNEL else "unavailable",  # the data plane's per-CPU counters
    }
    # Every feature that is not active says why.
    active = ({"sockmap", "stats"} if KERNEL else set()) | ({"dns_cache"} if ROOT else set())
    assert set(doc["reasons"]) == set(doc["features"]) - active
    if not KERNEL:
        assert doc["reasons"]["sockmap"].startswith("kernel forwarding unavailable: ")
    assert doc["reasons"]["xdp"] == "ebpf.xdp.enabled is false"
    assert doc["kernel_version"] == os.uname().release
    # No lookup yet: no hit rate.
    dns_cache = {"dns_cache": {"entries": 0, "max_entries": 10000}} if ROOT else {}
    if KERNEL:  # entries: connections in the sockhash now
        assert doc["maps"] == {"sockmap": {"entries": 0, "max_entries": 65536}, **dns_cache}
    else:
        assert doc["maps"] == dns_cache
    assert doc["forwarding_mode"] == ("kernel" if KERNEL else "copy")
    assert doc["resolver_cache"] == {"entries": 0, "max_entries": 10000, "hit_rate": None}


@pytest.mark.skipif(not KERNEL, reason=f"no kernel forwarding here: {probe().reasons}")
async def test_metrics_after_real_traffic_in_kernel_mode(
    tls_backend: Any,
    start_with_status: Callable[..., Any],
    proxy_config: Callable[..., Any],
    client_context: ssl.SSLContext,
) -> None:
    running, port = await start_with_status(proxy_config(tls_backend.port))
    for name in ("bench.test", "www.bench.test"):
        await tls_get(running.port, name, client_context)
    await wait_for(lambda: len(running.access_log) == 2)
    records = running.access_log
    assert {r["mode"] for r in records} == {"kernel"}
    s = metric_samples((await http_request(port, "/metrics")).text)
    closed = {
        labels: value
        for (name, labels), value in s.items()
        if name == "trio_sni_connections_closed_total"
    }
    assert sum(closed.values()) == 2
    assert all(dict(labels)["mode"] == "kernel" for labels in closed)
    for direction in ("to_upstream", "to_client"):
        total = sum(int(r[f"bytes_{direction}"]) for r in records)
        assert total > 0
        assert sample(s, "trio_sni_bytes_total", direction=direction, mode="kernel") == total
        assert sample(s, "trio_sni_bytes_total", direction=direction, mode="copy") is None
    assert sample(s, "trio_sni_rule_connections_total", rule="bench.test") == 2
    assert sample(s, "trio_sni_ebpf_feature_state", feature="sockmap", state="active") == 1
    assert sample(s, "trio_sni_ebpf_feature_state", feature="stats", state="active") == 1
    # The data plane's own counters, summed across CPUs, read at scrape time.
    redirected = sample(s, "trio_sni_ebpf_sockmap_bytes_total", direction="to_client")
    assert redirected is not None
    assert redirected > 0
    assert sample(s, "trio_sni_ebpf_sockmap_redirect_failures_total") == 0

    doc = json.loads((await http_request(port, "/ebpf/status")).body)
    assert doc["maps"]["sockmap"] == {"entries": 0, "max_entries": 65536}  # all closed


async def test_a_busy_status_port_is_a_clear_startup_error(
    nursery: trio.Nursery, proxy_config: Callable[..., Any], tmp_path: Any
) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        config = proxy_config(
            9,
            status={"listen": f"127.0.0.1:{port}"},
            log={"access_log": str(tmp_path / "access.log")},  # a file: the fd check sees it
        )
        proxy = Proxy(load_config(config))  # default ebpf: kernel objects where possible
        with pytest.raises(BaseException) as caught:  # noqa: PT011 - checked below
            await nursery.start(proxy.serve)
    [error] = leaves(caught.value)
    assert isinstance(error, OSError)
    assert str(error) == f"[Errno 98] status.listen 127.0.0.1:{port}: Address already in use"
    assert proxy.listeners == []  # the proxy's own listeners were never opened


async def test_the_status_endpoint_reports_the_drain_then_stops_with_the_proxy(
    proxy_config: Callable[..., Any],
) -> None:
    status_port = free_port()
    config = COPY_MODE(proxy_config(9, status={"listen": f"127.0.0.1:{status_port}"}))
    proxy = Proxy(load_config(config), access_log=lambda record: None)
    async with trio.open_nursery() as nursery:
        [listener] = await nursery.start(proxy.serve)
        port = listener.socket.getsockname()[1]
        async with await trio.open_tcp_stream("127.0.0.1", port) as waiting:
            await waiting.send_all(bytes.fromhex("160301"))  # half a ClientHello: stays live
            await wait_for(lambda: len(proxy.context.live) == 1)
            proxy.shutdown()
            draining = await http_request(status_port, "/readyz")
            assert (draining.status, draining.text) == (
                503,
                "not ready: shutting down: not accepting new connections\n",
            )
            assert (await http_request(status_port, "/healthz")).status == 200
            listing = json.loads((await http_request(status_port, "/connections")).body)
            assert listing["total"] == 1
            assert listing["connections"][0]["decision"] == "pending"
        # The client left: the drain is over, serve() returns and takes the endpoint along.
    with pytest.raises(OSError, match="all attempts to connect"):
        await trio.open_tcp_stream("127.0.0.1", status_port)
