"""Plain HTTP routed by Host: curl through an ``http`` listener to real HTTP servers on loopback.

The backends are Python's ``http.server`` (in a thread, echoing what it parsed) and a raw
recorder that proves the request bytes arrive unchanged. Refusals (denied Host, missing Host,
malformed request, oversized head, TLS on the HTTP port, a trickled head) are answered with an
HTTP status before the proxy closes; the trickle is timed exactly on the autojump clock.
"""

from __future__ import annotations

import http.server
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import trio
import trio.testing
from proxytest import drain, serve_tcp, wait_for

BODY = b"hello over plain http\n"


@pytest.fixture
def proxy_config(
    proxy_config_in_mode: Callable[..., dict[str, Any]],
) -> Callable[..., dict[str, Any]]:
    return proxy_config_in_mode  # every test here runs in each forwarding mode


class EchoHandler(http.server.BaseHTTPRequestHandler):
    """Answers every GET/POST with what it received: request line, Host, body length.

    HTTP/1.1 with keep-alive: the client, not the server, closes first. A server that closes
    right after answering can do so before the kernel forwarder registers the pair, which then
    (correctly) copies that connection in userspace, and the mode under test would not show.
    """

    protocol_version = "HTTP/1.1"

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        text = (
            f"{self.requestline}\nhost={self.headers['Host']}\nbody={len(body)}\n"
        ).encode() + BODY
        self.send_response(200)
        self.send_header("Content-Length", str(len(text)))
        self.end_headers()
        self.wfile.write(text)

    do_GET = do_POST = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep pytest's output clean


@pytest.fixture
def http_backend() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), EchoHandler)
    # server_close() joins the handler threads, so every connection is closed by teardown.
    server.daemon_threads = False
    server.block_on_close = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        thread.join()
        server.server_close()


@pytest.fixture
def http_config(proxy_config: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
    def build(backend_port: int, **overrides: Any) -> dict[str, Any]:
        config = proxy_config(backend_port, **overrides)
        config["listeners"][0]["protocol"] = "http"
        return config

    return build


async def curl(port: int, url: str, *args: str) -> trio.CompletedProcess[bytes]:
    host = url.split("/")[2]
    return await trio.run_process(
        [
            "curl",
            "--silent",
            "--show-error",
            "--max-time",
            "10",
            "--include",
            "--connect-to",
            f"{host}:80:127.0.0.1:{port}",
            *args,
            url,
        ],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )


async def test_curl_through_the_http_listener(
    http_backend: int,
    start_proxy: Callable[..., Any],
    http_config: Callable[..., Any],
    forwarding_mode: str,
) -> None:
    running = await start_proxy(http_config(http_backend))
    result = await curl(running.port, "http://www.bench.test/some/path?q=1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(b"HTTP/1.1 200 OK\r\n")
    assert result.stdout.endswith(
        b"GET /some/path?q=1 HTTP/1.1\nhost=www.bench.test\nbody=0\n" + BODY
    )
    posted = await curl(running.port, "http://bench.test/form", "--data-binary", "x" * 5000)
    assert posted.stdout.endswith(b"POST /form HTTP/1.1\nhost=bench.test\nbody=5000\n" + BODY)
    await wait_for(lambda: len(running.access_log) == 2)
    first, second = running.access_log
    assert (first["sni"], first["decision"], first["reason"]) == (
        "www.bench.test",
        "allow",
        "normal",
    )
    assert first["target"] == f"127.0.0.1:{http_backend}"
    assert [first["mode"], second["mode"]] == [forwarding_mode] * 2
    assert second["bytes_to_upstream"] > 5000


async def test_request_bytes_arrive_unchanged(
    nursery: trio.Nursery,
    start_proxy: Callable[..., Any],
    http_config: Callable[..., Any],
) -> None:
    received: list[bytes] = []
    request = (
        b"POST /upload HTTP/1.1\r\nHost: BENCH.test.\r\nX-Odd:   spaced  \r\n"
        b"Content-Length: 4\r\n\r\nbodyGET /pipelined HTTP/1.1\r\nHost: other.test\r\n\r\n"
    )

    async def record(stream: trio.SocketStream) -> None:
        received.append(await drain(stream))
        await trio.aclose_forcefully(stream)

    running = await start_proxy(http_config(await serve_tcp(nursery, record)))
    stream = await trio.open_tcp_stream("127.0.0.1", running.port)
    try:
        for i in range(0, len(request), 7):  # in small pieces: the reader must not care
            await stream.send_all(request[i : i + 7])
        await stream.send_eof()
        assert await drain(stream) == b""
    finally:
        await trio.aclose_forcefully(stream)
    await wait_for(lambda: len(received) == 1)
    assert received == [request]  # the second request's Host is not looked at (per connection)
    await wait_for(lambda: len(running.access_log) == 1)
    assert running.access_log[0]["sni"] == "bench.test"


@pytest.mark.parametrize(
    ("args", "url", "status", "reason"),
    [
        ((), "http://denied.bench.test/", b"403 Forbidden", "denied_domain"),
        ((), "http://nowhere.test/", b"403 Forbidden", "denied_domain"),
        (
            ("-H", "X-Big: " + "b" * 9000),
            "http://bench.test/",
            b"431 Request Header Fields Too Large",
            "too_large",
        ),
        (("-0", "-H", "Host:"), "http://bench.test/", b"400 Bad Request", "no_host"),
    ],
    ids=["denied", "no-rule", "oversized", "missing-host"],
)
async def test_curl_refusals_get_a_status(
    args: tuple[str, ...],
    url: str,
    status: bytes,
    reason: str,
    http_backend: int,
    start_proxy: Callable[..., Any],
    http_config: Callable[..., Any],
) -> None:
    running = await start_proxy(http_config(http_backend))
    result = await curl(running.port, url, *args)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(b"HTTP/1.1 " + status + b"\r\n")
    await wait_for(lambda: len(running.access_log) == 1)
    assert running.access_log[0]["reason"] == reason


@pytest.mark.parametrize(
    ("data", "status", "reason"),
    [
        (b"GET / HTTP/1.0\r\n\r\n", b"400 Bad Request", "no_host"),
        (b"GET /\r\n\r\n", b"400 Bad Request", "bad_http_request"),
        (
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(20),
            b"400 Bad Request",
            "not_http",
        ),
        (b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", b"400 Bad Request", "bad_host"),
    ],
    ids=["http10-no-host", "malformed", "tls-on-http", "ip-literal-host"],
)
async def test_raw_refusals(
    data: bytes,
    status: bytes,
    reason: str,
    http_backend: int,
    start_proxy: Callable[..., Any],
    http_config: Callable[..., Any],
) -> None:
    running = await start_proxy(http_config(http_backend))
    stream = await trio.open_tcp_stream("127.0.0.1", running.port)
    try:
        await stream.send_all(data)
        response = await drain(stream)
    finally:
        await trio.aclose_forcefully(stream)
    assert response.startswith(b"HTTP/1.1 " + status + b"\r\n")
    assert b"Connection: close\r\n" in response
    await wait_for(lambda: len(running.access_log) == 1)
    assert running.access_log[0]["reason"] == reason


async def test_unreachable_target_is_502(
    start_proxy: Callable[..., Any],
    http_config: Callable[..., Any],
) -> None:
    with trio.socket.socket() as sock:  # a port nothing listens on
        await sock.bind(("127.0.0.1", 0))
        dead = sock.getsockname()[1]
    running = await start_proxy(http_config(dead))
    result = await curl(running.port, "http://bench.test/")
    assert result.stdout.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
    await wait_for(lambda: len(running.access_log) == 1)
    assert running.access_log[0]["reason"] == "connect_failed"


async def test_trickled_head_is_cut_at_the_total_deadline(
    autojump_clock: trio.testing.MockClock,
    http_backend: int,
    start_proxy: Callable[..., Any],
    http_config: Callable[..., Any],
) -> None:
    running = await start_proxy(http_config(http_backend, timeouts={"client_hello": 10}))
    stream = await trio.open_tcp_stream("127.0.0.1", running.port)
    opened = trio.current_time()
    try:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:

                async def trickle() -> None:
                    for byte in b"GET / HTTP/1.1\r\nHost: bench.test\r\n\r\n":
                        await stream.send_all(bytes([byte]))
                        await trio.sleep(3)

                nursery.start_soon(trickle)
                response = await drain(stream)
                closed_at = trio.current_time()
                nursery.cancel_scope.cancel()
    finally:
        await trio.aclose_forcefully(stream)
    assert closed_at == opened + 10  # the 408 and our FIN come right at the deadline
    assert response.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    await wait_for(lambda: len(running.access_log) == 1)
    [record] = running.access_log
    assert record["reason"] == "request_timeout"
    assert record["error"] == "no complete HTTP request head within 10 s"
