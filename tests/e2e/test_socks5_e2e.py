"""SOCKS5 upstream through a real SOCKS5 server: Debian's dante (``danted``) on loopback.

dante runs as root here (it drops to ``nobody`` for its workers), in its own mount namespace
(``unshare -m``) where three generated files are bind-mounted over the system's:

* ``/etc/hosts``, so that dante resolves the test names (``bench.test``...) to loopback: this is
  what makes ``remote_dns`` (ATYP domain, the SOCKS server resolves) testable without real DNS;
* ``/etc/passwd`` and ``/etc/shadow`` with one extra user, because dante's ``username`` method
  (RFC 1929) checks the system password database. Nothing outside dante's namespace changes.

Hence the ``root`` marker. Without root these tests skip; in CI a skip is a failure.
"""

from __future__ import annotations

import ssl
import subprocess
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing
from daemons import free_port, require, running_daemon
from dnsserver import DNSServer
from proxytest import client_hello, drain, serve_tcp, wait_for

REQUEST = b"GET / HTTP/1.1\r\nHost: bench.test\r\n\r\n"
BODY = b"hello from the backend\n"
USER, PASSWORD = "sniproxy", "correct horse"
#: dante refuses this address by ruleset (REP 2); the name below resolves to it in dante's hosts.
BLOCKED_IP = "127.0.0.2"

DANTE_CONFIG = """\
logoutput: {log}
internal: 127.0.0.1 port = {port}
external: 127.0.0.1
socksmethod: {method}
clientmethod: none
user.privileged: root
user.unprivileged: nobody
client pass {{ from: 127.0.0.0/8 to: 0.0.0.0/0 }}
socks block {{
    from: 0.0.0.0/0 to: {blocked}/32
    log: connect error
}}
socks pass {{
    from: 127.0.0.0/8 to: 0.0.0.0/0
    command: connect
    log: connect error
}}
"""


@pytest.fixture
def proxy_config(
    proxy_config_in_mode: Callable[..., dict[str, Any]],
) -> Callable[..., dict[str, Any]]:
    return proxy_config_in_mode  # every test here runs in each forwarding mode


@attrs.frozen
class Dante:
    port: int
    log: Path

    def log_text(self) -> str:
        return self.log.read_text("utf-8", "replace")


@pytest.fixture
def dante(tmp_path: Path) -> Iterator[Callable[..., Dante]]:
    """``dante(auth=False)`` starts a danted; all are stopped when the test ends."""
    danted = require("danted")
    require("unshare")
    with ExitStack() as stack:

        def start(*, auth: bool = False) -> Dante:
            port = free_port()
            work = tmp_path / f"dante-{port}"
            work.mkdir()
            log = work / "danted.log"
            conf = work / "danted.conf"
            conf.write_text(
                DANTE_CONFIG.format(
                    log=work / "requests.log",
                    port=port,
                    blocked=BLOCKED_IP,
                    method="username" if auth else "none",
                ),
                "utf-8",
            )
            hosts = work / "hosts"
            hosts.write_text(
                "127.0.0.1 localhost bench.test www.bench.test other.test\n"
                f"{BLOCKED_IP} blocked.bench.test\n",
                "utf-8",
            )
            digest = (
                subprocess.run(
                    ["openssl", "passwd", "-6", "-stdin"],
                    input=PASSWORD.encode(),
                    capture_output=True,
                    check=True,
                )
                .stdout.decode()
                .strip()
            )
            passwd, shadow = work / "passwd", work / "shadow"
            passwd.write_text(
                Path("/etc/passwd").read_text("utf-8")
                + f"{USER}:x:64999:64999::/nonexistent:/usr/sbin/nologin\n",
                "utf-8",
            )
            shadow.write_text(
                Path("/etc/shadow").read_text("utf-8") + f"{USER}:{digest}:19000:0:99999:7:::\n",
                "utf-8",
            )
            shadow.chmod(0o640)
            script = (
                f"mount --bind {hosts} /etc/hosts && mount --bind {passwd} /etc/passwd && "
                f"mount --bind {shadow} /etc/shadow && exec {danted} -f {conf} -N 1 "
                f"-p {work / 'danted.pid'}"
            )
            stack.enter_context(
                running_daemon(["unshare", "--mount", "sh", "-c", script], port=port, log=log)
            )
            return Dante(port=port, log=work / "requests.log")

        yield start


async def tls_get(port: int, name: str, ctx: ssl.SSLContext) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    tls = trio.SSLStream(stream, ctx, server_hostname=name)
    try:
        await tls.send_all(REQUEST)
        return await drain(tls)
    finally:
        await trio.aclose_forcefully(tls)


async def refused_hello(port: int, name: str, ctx: ssl.SSLContext) -> None:
    """A TLS handshake that the proxy ends (it closes after its refusal)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    tls = trio.SSLStream(stream, ctx, server_hostname=name)
    try:
        with pytest.raises((trio.BrokenResourceError, ssl.SSLError)):
            await tls.do_handshake()
    finally:
        await trio.aclose_forcefully(tls)


def socks_config(
    proxy_config: Callable[..., dict[str, Any]], backend_port: int, socks_port: int, **socks: Any
) -> dict[str, Any]:
    return proxy_config(backend_port, socks5={"address": f"127.0.0.1:{socks_port}", **socks})


@pytest.mark.root
@pytest.mark.parametrize("auth", [False, True], ids=["no-auth", "username-password"])
async def test_tls_through_dante_with_remote_dns(
    auth: bool,
    dante: Callable[..., Dante],
    tls_backend: Any,
    start_proxy: Callable[..., Any],
    proxy_config: Callable[..., Any],
    client_context: ssl.SSLContext,
    dns_server: DNSServer,
    forwarding_mode: str,
) -> None:
    server = dante(auth=auth)
    credentials = {"username": USER, "password": PASSWORD} if auth else {}
    config = socks_config(proxy_config, tls_backend.port, server.port, **credentials)
    # Only dante's /etc/hosts knows www.bench.test; the proxy's own resolver asks an empty
    # loopback DNS server, which must see no query: the proxy sends the name, not an address.
    del config["resolver"]["hosts"]["www.bench.test"]
    config["resolver"]["nameservers"] = [dns_server.nameserver]
    running = await start_proxy(config)
    for name in ("bench.test", "www.bench.test"):
        assert (await tls_get(running.port, name, client_context)).endswith(BODY)
    assert tls_backend.server_names == ["bench.test", "www.bench.test"]
    assert tls_backend.received == [REQUEST, REQUEST]
    await wait_for(lambda: len(running.access_log) == 2)
    for record, name in zip(running.access_log, ("bench.test", "www.bench.test"), strict=True):
        assert record["reason"] == "normal"
        assert record["via"] == "socks5"
        assert record["mode"] == forwarding_mode
        assert record["target"] == f"{name}:{tls_backend.port}"
    assert dns_server.query_count("www.bench.test") == 0
    # dante's own log shows that it resolved the names and connected, twice.
    await wait_for(lambda: server.log_text().count(f"127.0.0.1.{tls_backend.port}") == 2)


@pytest.mark.root
async def test_local_dns_sends_the_checked_address(
    dante: Callable[..., Dante],
    tls_backend: Any,
    start_proxy: Callable[..., Any],
    proxy_config: Callable[..., Any],
    client_context: ssl.SSLContext,
    forwarding_mode: str,
) -> None:
    server = dante()
    config = socks_config(proxy_config, tls_backend.port, server.port, remote_dns=False)
    config["rules"].append({"match": "private.test"})  # no allow_private: the guard refuses
    config["resolver"]["hosts"]["private.test"] = ["127.0.0.1"]
    running = await start_proxy(config)
    assert (await tls_get(running.port, "bench.test", client_context)).endswith(BODY)
    await refused_hello(running.port, "private.test", client_context)
    await wait_for(lambda: len(running.access_log) == 2)
    # Records are written at close, and the refused connection may close first.
    by_name = {record["sni"]: record for record in running.access_log}
    ok, blocked = by_name["bench.test"], by_name["private.test"]
    assert (ok["reason"], ok["via"], ok["target"], ok["mode"]) == (
        "normal",
        "socks5",
        f"127.0.0.1:{tls_backend.port}",
        forwarding_mode,
    )
    assert blocked["reason"] == "ssrf_blocked"
    assert tls_backend.connections == 1
    log = server.log_text()
    assert f"127.0.0.1.{tls_backend.port}" in log
    assert "bench.test" not in log


@pytest.mark.root
async def test_wrong_password_is_an_auth_failure(
    dante: Callable[..., Dante],
    tls_backend: Any,
    start_proxy: Callable[..., Any],
    proxy_config: Callable[..., Any],
    client_context: ssl.SSLContext,
) -> None:
    server = dante(auth=True)
    running = await start_proxy(
        socks_config(proxy_config, tls_backend.port, server.port, username=USER, password="no")
    )
    await refused_hello(running.port, "bench.test", client_context)
    await wait_for(lambda: len(running.access_log) == 1)
    [record] = running.access_log
    assert record["reason"] == "socks5_auth_failed"
    assert record["error"] == (
        "SOCKS5 server rejected the username/password (status 0x01); check socks5.username "
        "and socks5.password"
    )
    # And without credentials, dante accepts none of the offered methods.
    running.proxy.reload(
        running.proxy.config.__class__(
            **{
                **attrs.asdict(running.proxy.config, recurse=False),
                "socks5": attrs.evolve(running.proxy.config.socks5, username=None, password=None),
            }
        )
    )
    await refused_hello(running.port, "bench.test", client_context)
    await wait_for(lambda: len(running.access_log) == 2)
    assert running.access_log[1]["reason"] == "socks5_auth_failed"
    assert "accepts none of the offered methods (no authentication)" in str(
        running.access_log[1]["error"]
    )
    assert tls_backend.connections == 0


@pytest.mark.root
async def test_unreachable_target_and_ruleset_refusal(
    dante: Callable[..., Dante],
    tls_backend: Any,
    start_proxy: Callable[..., Any],
    proxy_config: Callable[..., Any],
    client_context: ssl.SSLContext,
) -> None:
    server = dante()
    dead = free_port()  # nothing listens here: dante gets ECONNREFUSED
    running = await start_proxy(socks_config(proxy_config, dead, server.port))
    await refused_hello(running.port, "bench.test", client_context)
    await refused_hello(running.port, "blocked.bench.test", client_context)
    await wait_for(lambda: len(running.access_log) == 2)
    by_name = {record["sni"]: record for record in running.access_log}
    refused, blocked = by_name["bench.test"], by_name["blocked.bench.test"]
    assert refused["reason"] == "connect_failed"
    assert refused["error"] == (
        f"SOCKS5 server could not connect to bench.test:{dead}: connection refused (REP 0x05)"
    )
    assert blocked["reason"] == "socks5_refused"
    assert blocked["error"] == (
        f"SOCKS5 server could not connect to blocked.bench.test:{dead}: connection not allowed "
        "by ruleset (REP 0x02)"
    )


async def test_socks_server_down_and_per_rule_direct(
    tls_backend: Any,
    start_proxy: Callable[..., Any],
    proxy_config: Callable[..., Any],
    client_context: ssl.SSLContext,
) -> None:
    """No dante needed: the SOCKS server's port is closed; a ``via: "direct"`` rule still works."""
    dead = free_port()
    config = socks_config(proxy_config, tls_backend.port, dead)
    config["rules"][1]["via"] = "direct"  # other.test
    running = await start_proxy(config)
    assert (await tls_get(running.port, "other.test", client_context)).endswith(BODY)
    await refused_hello(running.port, "bench.test", client_context)
    await wait_for(lambda: len(running.access_log) == 2)
    by_name = {record["sni"]: record for record in running.access_log}
    direct, down = by_name["other.test"], by_name["bench.test"]
    assert (direct["via"], direct["reason"]) == ("direct", "normal")
    assert (down["via"], down["reason"]) == ("socks5", "connect_failed")
    assert down["error"] == (
        f"SOCKS5 server unreachable: connect to 127.0.0.1:{dead} failed: "
        "[Errno 111] Connection refused"
    )


# --- misbehaving SOCKS servers, in process (no dante needed) --------------------------------


async def fake_socks_server(nursery: trio.Nursery, answer: bytes | None) -> int:
    """Accepts, reads the greeting, then sends ``answer`` (or nothing, ever) and waits."""

    async def handler(stream: trio.SocketStream) -> None:
        try:
            await stream.receive_some(512)
            if answer is not None:
                await stream.send_all(answer)
            await stream.receive_some(512)  # until the proxy gives up and closes
        except trio.BrokenResourceError:
            pass
        finally:
            await trio.aclose_forcefully(stream)

    return await serve_tcp(nursery, handler)


async def test_silent_socks_server_fails_exactly_at_the_connect_timeout(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    start_proxy: Callable[..., Any],
    proxy_config: Callable[..., Any],
) -> None:
    socks = await fake_socks_server(nursery, None)
    running = await start_proxy(
        proxy_config(443, timeouts={"connect": 7}, socks5={"address": f"127.0.0.1:{socks}"})
    )
    stream = await trio.open_tcp_stream("127.0.0.1", running.port)
    try:
        await stream.send_all(client_hello("bench.test"))
        started = trio.current_time()
        with trio.fail_after(60):
            assert await drain(stream) == b""
        assert trio.current_time() == started + 7
    finally:
        await trio.aclose_forcefully(stream)
    await wait_for(lambda: len(running.access_log) == 1)
    [record] = running.access_log
    assert record["reason"] == "connect_failed"
    assert record["error"] == (
        f"SOCKS5 CONNECT through 127.0.0.1:{socks} did not complete within 7.0 s"
    )
    assert record["duration"] == 7.0


async def test_a_server_that_is_not_socks5(
    nursery: trio.Nursery,
    start_proxy: Callable[..., Any],
    proxy_config: Callable[..., Any],
) -> None:
    socks = await fake_socks_server(nursery, b"HTTP/1.1 400 Bad Request\r\n\r\n")
    running = await start_proxy(proxy_config(443, socks5={"address": f"127.0.0.1:{socks}"}))
    stream = await trio.open_tcp_stream("127.0.0.1", running.port)
    try:
        await stream.send_all(client_hello("bench.test"))
        assert await drain(stream) == b""
    finally:
        await trio.aclose_forcefully(stream)
    await wait_for(lambda: len(running.access_log) == 1)
    [record] = running.access_log
    assert (record["reason"], record["via"]) == ("socks5_error", "socks5")
    assert record["error"] == (
        "not a SOCKS5 server: its first reply starts with b'HT' (version 72, expected 5)"
    )
