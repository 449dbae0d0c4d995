"""Real parts for end-to-end tests: a trustme CA, TLS and plain TCP backends on loopback, and
a proxy started in the test's own nursery with its access log captured.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import attrs
import pytest
import trio
import trustme
from proxytest import serve_tcp

from trio_sni.demo import serve_https_answer
from trio_sni.sansio.config_load import load_config
from trio_sni.server import Proxy

#: Names the test certificate covers; the proxy routes them to the backends.
TEST_NAMES = ["bench.test", "www.bench.test", "other.test", "*.example.test"]


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def server_context(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*TEST_NAMES).configure_cert(ctx)
    return ctx


@pytest.fixture(scope="session")
def client_context(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


@pytest.fixture(scope="session")
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


@attrs.define
class Backend:
    """A loopback server; ``received`` holds what each connection sent, in order."""

    port: int
    received: list[bytes] = attrs.Factory(list)
    server_names: list[str | None] = attrs.Factory(list)
    connections: int = 0


#: What every test backend answers.
BACKEND_ANSWER = b"hello from the backend\n"


@pytest.fixture
def start_tls_backend(
    nursery: trio.Nursery, server_context: ssl.SSLContext
) -> Callable[[], Awaitable[Backend]]:
    """``backend = await start_tls_backend()``: one more TLS backend on loopback."""
    names: list[str | None] = []

    def remember_name(obj: Any, name: str | None, _ctx: ssl.SSLContext) -> None:
        names.append(name)

    ctx = server_context
    ctx.sni_callback = remember_name

    async def start() -> Backend:
        async def handler(stream: trio.SocketStream) -> None:
            backend.connections += 1
            await serve_https_answer(stream, ctx, BACKEND_ANSWER, backend.received)

        backend = Backend(port=await serve_tcp(nursery, handler), server_names=names)
        return backend

    return start


@pytest.fixture
async def tls_backend(start_tls_backend: Callable[[], Awaitable[Backend]]) -> Backend:
    return await start_tls_backend()


@pytest.fixture
def proxy_config() -> Callable[..., dict[str, Any]]:
    """Build a config dict routing the test names to a backend port on 127.0.0.1."""

    def build(backend_port: int, **overrides: Any) -> dict[str, Any]:
        config: dict[str, Any] = {
            "listeners": [{"host": "127.0.0.1", "port": 0, "target_port": backend_port}],
            "rules": [
                {"suffix": "bench.test", "allow_private": True},
                {"match": "other.test", "allow_private": True},
                {"match": "*.example.test", "allow_private": True},
                {"match": "denied.bench.test", "action": "deny"},
            ],
            "resolver": {
                "hosts": {
                    "bench.test": ["127.0.0.1"],
                    "www.bench.test": ["127.0.0.1"],
                    "denied.bench.test": ["127.0.0.1"],
                    "other.test": ["127.0.0.1"],
                    "a.example.test": ["127.0.0.1"],
                }
            },
            "log": {"access_log": None},
        }
        config.update(overrides)
        return config

    return build


@pytest.fixture(params=[pytest.param("kernel", marks=pytest.mark.bpf), "splice", "copy"])
def forwarding_mode(request: pytest.FixtureRequest) -> str:
    """Every forwarding mode, for suites whose upstream is set up in a special way (SOCKS5,
    PROXY protocol, plain HTTP): after the set-up it is an ordinary TCP socket, so each mode
    must take it exactly as in direct mode. ``kernel`` needs root (a failure, not a skip, in
    CI)."""
    mode: str = request.param
    return mode


@pytest.fixture
def proxy_config_in_mode(
    proxy_config: Callable[..., dict[str, Any]], forwarding_mode: str
) -> Callable[..., dict[str, Any]]:
    """:func:`proxy_config` forwarding in ``forwarding_mode`` and nothing else (no fallback)."""

    def build(backend_port: int, **overrides: Any) -> dict[str, Any]:
        overrides.setdefault("ebpf", {"sockmap": {"enabled": forwarding_mode == "kernel"}})
        overrides.setdefault("forwarding", {"mode": forwarding_mode})
        overrides.setdefault("fallback_mode", "none")
        return proxy_config(backend_port, **overrides)

    return build


@attrs.define
class RunningProxy:
    proxy: Proxy
    port: int
    access_log: list[dict[str, object]]

    def records_for(self, reason: str) -> list[dict[str, object]]:
        return [r for r in self.access_log if r["reason"] == reason]


@pytest.fixture
def start_proxy(nursery: trio.Nursery) -> Callable[[dict[str, Any]], Any]:
    """``running = await start_proxy(config_dict)``: the proxy serves until the test ends."""

    async def start(config_data: dict[str, Any]) -> RunningProxy:
        records: list[dict[str, object]] = []
        proxy = Proxy(load_config(config_data), access_log=records.append)
        listeners = await nursery.start(proxy.serve)
        return RunningProxy(proxy, listeners[0].socket.getsockname()[1], records)

    return start


def open_fds() -> set[int]:
    return set(int(n) for n in os.listdir("/proc/self/fd"))


@pytest.fixture(autouse=True)
def no_fd_leaks() -> Iterator[None]:
    """Every socket, pipe and file a test opens is closed by its end."""
    before = open_fds()
    yield
    leaked = open_fds() - before
    # /proc listing itself opens an fd while it runs; ignore fds that are gone now.
    leaked = {fd for fd in leaked if os.path.exists(f"/proc/self/fd/{fd}")}
    assert not leaked, f"fds left open: {sorted(leaked)} -> " + ", ".join(
        _describe_fd(fd) for fd in sorted(leaked)
    )


def _describe_fd(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "?"
