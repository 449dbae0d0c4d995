"""The shared DNS cache between real proxy processes (``python -m trio_sni``).

Every proxy here is a subprocess with its own config pointing at the same pin directory (a
unique one under /sys/fs/bpf, removed afterwards) and at the loopback DNS server of the test,
which counts the queries: a proxy that answers from the pinned map sends none. Traffic is real
TLS through the proxy to a loopback backend; the numbers are read from ``/metrics`` and
``/ebpf/status`` as an operator would.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio_sni_loader as loader
from dnsserver import DNSServer
from statusclient import http_request, metric_samples, sample

from .conftest import Backend  # type: ignore[import-not-found]

pytestmark = pytest.mark.bpf

NAME = "shared.example.test"  # covered by the test certificate (*.example.test)
STARTUP_TIMEOUT = 30.0
REQUEST = b"GET / HTTP/1.1\r\nHost: shared.example.test\r\n\r\n"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@attrs.define(eq=False)
class ProxyProcess:
    proc: trio.Process
    port: int
    status_port: int
    stderr_path: Path

    @property
    def log(self) -> str:
        return self.stderr_path.read_text("utf-8", errors="replace")

    async def get(self, path: str) -> str:
        response = await http_request(self.status_port, path)
        assert response.status == 200, response.text
        return response.text

    async def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return metric_samples(await self.get("/metrics"))

    async def ebpf_status(self) -> dict[str, Any]:
        document: dict[str, Any] = json.loads(await self.get("/ebpf/status"))
        return document

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            with trio.fail_after(STARTUP_TIMEOUT):
                await self.proc.wait()
        assert self.proc.returncode == 0, self.log


Spawn = Callable[..., Awaitable[ProxyProcess]]


@pytest.fixture
async def spawn(
    tmp_path: Path, dns_server: DNSServer, tls_backend: Backend, pin_dir: str
) -> AsyncIterator[Spawn]:
    """``await spawn(**resolver_settings)``: a proxy process serving NAME through the test's
    DNS server, sharing ``pin_dir`` (or ``pin_path=``); ready (``/readyz`` 200) when it
    returns. All are stopped at the end."""
    started: list[ProxyProcess] = []

    async def start(pin_path: str = pin_dir, **resolver: Any) -> ProxyProcess:
        index = len(started)
        port, status_port = free_port(), free_port()
        config = {
            "workers": 1,  # one process: its log is read line by line
            "listeners": [{"host": "127.0.0.1", "port": port, "target_port": tls_backend.port}],
            "rules": [{"suffix": "example.test", "allow_private": True}],
            "resolver": {"nameservers": [dns_server.nameserver], **resolver},
            "status": {"listen": f"127.0.0.1:{status_port}"},
            "ebpf": {
                "sockmap": {"enabled": False},
                "dns_cache": {"pin_path": pin_path, "max_entries": 1000},
            },
            "log": {"access_log": None},
        }
        config_path = tmp_path / f"proxy-{index}.json"
        config_path.write_text(json.dumps(config), "utf-8")
        stderr_path = tmp_path / f"proxy-{index}.stderr"
        with open(stderr_path, "wb") as stderr:  # noqa: ASYNC230 (a local file, at startup)
            proc = await trio.lowlevel.open_process(
                [sys.executable, "-m", "trio_sni", "--config", str(config_path)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        running = ProxyProcess(proc, port, status_port, stderr_path)
        started.append(running)
        with trio.fail_after(STARTUP_TIMEOUT):
            while True:
                assert proc.returncode is None, f"proxy exited:\n{running.log}"
                try:
                    if (await http_request(status_port, "/readyz")).status == 200:
                        return running
                except OSError:
                    pass
                await trio.sleep(0.05)

    try:
        yield start
    finally:
        with trio.CancelScope(shield=True):
            for running in started:
                if running.proc.returncode is None:
                    running.proc.kill()
                await running.proc.wait()


async def tls_get(port: int, ctx: ssl.SSLContext) -> None:
    """One HTTPS request for NAME through the proxy, read to the end."""
    with trio.fail_after(30):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        tls = trio.SSLStream(stream, ctx, server_hostname=NAME)
        try:
            await tls.send_all(REQUEST)
            response = b""
            while chunk := await tls.receive_some(65536):
                response += chunk
            assert response.endswith(b"hello from the backend\n"), response
        finally:
            await trio.aclose_forcefully(tls)


def dns_cache_numbers(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float],
) -> tuple[float | None, ...]:
    return tuple(
        sample(samples, f"trio_sni_ebpf_dns_cache_{name}_total")
        for name in ("hits", "misses", "evictions")
    )


async def test_two_processes_share_answers_and_a_restart_keeps_them(
    spawn: Spawn, dns_server: DNSServer, client_context: ssl.SSLContext, pin_dir: str
) -> None:
    dns_server.add(NAME, "A", "127.0.0.1", ttl=300)
    first = await spawn()
    second = await spawn()
    assert "DNS cache: in-process tier, then the BPF map pinned at " + pin_dir in first.log

    await tls_get(first.port, client_context)
    assert dns_server.query_count(NAME) == 2  # A and AAAA, once
    await tls_get(second.port, client_context)
    assert dns_server.query_count(NAME) == 2  # the second process asked the map, not DNS

    one, two = await first.metrics(), await second.metrics()
    assert dns_cache_numbers(one) == (0, 1, 0)
    assert dns_cache_numbers(two) == (1, 0, 0)
    assert sample(two, "trio_sni_resolver_lookups_total", result="cache_hit") == 1
    assert sample(two, "trio_sni_resolver_lookups_total", result="miss") == 0
    assert sample(two, "trio_sni_ebpf_feature_state", feature="dns_cache", state="active") == 1
    status = await second.ebpf_status()
    assert status["features"]["dns_cache"] == "active"
    assert "dns_cache" not in status["reasons"]
    assert status["notes"] == {}
    assert status["maps"]["dns_cache"] == {"entries": 1, "max_entries": 1000, "hit_rate": 1.0}
    assert (await first.ebpf_status())["maps"]["dns_cache"]["hit_rate"] == 0.0

    await first.stop()
    await second.stop()
    assert sorted(os.listdir(pin_dir)) == ["dns_cache", "dns_cache_stats"]  # still pinned
    third = await spawn()
    await tls_get(third.port, client_context)
    assert dns_server.query_count(NAME) == 2  # the answer outlived both processes
    assert dns_cache_numbers(await third.metrics()) == (1, 0, 0)
    await third.stop()


async def test_answers_expire_at_their_ttl_across_processes(
    spawn: Spawn, dns_server: DNSServer, client_context: ssl.SSLContext
) -> None:
    dns_server.add(NAME, "A", "127.0.0.1", ttl=1)
    first = await spawn(min_ttl=0)
    second = await spawn(min_ttl=0)
    await tls_get(first.port, client_context)
    assert dns_server.query_count(NAME) == 2
    await trio.sleep(1.2)  # a real second: the processes share no fake clock
    await tls_get(second.port, client_context)
    assert dns_server.query_count(NAME) == 4  # expired in the map: asked again
    assert dns_cache_numbers(await second.metrics()) == (0, 1, 0)
    status = await second.ebpf_status()
    assert status["maps"]["dns_cache"]["entries"] == 1  # rewritten in place, not added


async def test_an_incompatible_pinned_map_is_reported_and_replaced(
    spawn: Spawn, dns_server: DNSServer, client_context: ssl.SSLContext, pin_dir: str
) -> None:
    old = loader.MapSpec("dns_cache", loader.MapType.LRU_HASH, 256, 100, 1000)
    with loader.Map.create(old) as m:
        m.pin(os.path.join(pin_dir, "dns_cache"))
        m.update(b"shared.example.test".ljust(256, b"\0"), b"\x01" * 100)
    dns_server.add(NAME, "A", "127.0.0.1", ttl=300)
    proxy = await spawn()
    expected = "dns_cache: value_size: 176 changed to 100; dns_cache_stats: missing"
    assert f"DNS cache: replaced incompatible pinned state at {pin_dir} ({expected})" in proxy.log
    status = await proxy.ebpf_status()
    assert status["features"]["dns_cache"] == "active"
    assert status["notes"]["dns_cache"] == (
        f"replaced incompatible pinned state at {pin_dir}: {expected}"
    )
    await tls_get(proxy.port, client_context)
    assert dns_server.query_count(NAME) == 2  # the old entry was not trusted
    with loader.Map.open_pinned(os.path.join(pin_dir, "dns_cache")) as now:
        assert now.spec.value_size == 176
    assert (await proxy.ebpf_status())["maps"]["dns_cache"]["entries"] == 1
    await proxy.stop()


async def test_without_the_map_the_in_process_tier_works_and_it_says_why(
    spawn: Spawn, dns_server: DNSServer, client_context: ssl.SSLContext, pin_dir: str
) -> None:
    blocker = os.path.join(pin_dir, "blocker")  # a pinned map where a directory should be
    with loader.Map.create(loader.MapSpec("blocker", loader.MapType.ARRAY, 4, 4, 1)) as m:
        m.pin(blocker)
    dns_server.add(NAME, "A", "127.0.0.1", ttl=300)
    proxy = await spawn(pin_path=os.path.join(blocker, "dns_cache"))
    reason = f"cannot create {blocker}/dns_cache: [Errno 20] Not a directory: '{blocker}/dns_cache'"
    warning = f"DNS cache: in-process tier only; the shared BPF map is unavailable: {reason}"
    assert proxy.log.count(warning) == 1
    await tls_get(proxy.port, client_context)
    await tls_get(proxy.port, client_context)
    assert dns_server.query_count(NAME) == 2  # the in-process tier answered the second time
    status = await proxy.ebpf_status()
    assert status["features"]["dns_cache"] == "unavailable"
    assert status["reasons"]["dns_cache"] == reason
    assert "dns_cache" not in status["maps"]
    samples = await proxy.metrics()
    assert dns_cache_numbers(samples) == (None, None, None)
    assert sample(samples, "trio_sni_resolver_lookups_total", result="cache_hit") == 1
    await proxy.stop()
    assert proxy.log.count(warning) == 1  # said once
