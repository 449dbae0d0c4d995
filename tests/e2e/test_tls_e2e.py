"""Real TLS clients through the proxy to a real TLS server on loopback."""

from __future__ import annotations

import ssl
from collections.abc import Callable
from typing import Any

import trio
from proxytest import drain, wait_for

from trio_sni.accel import probe

REQUEST = b"GET / HTTP/1.1\r\nHost: bench.test\r\n\r\n"


async def tls_get(port: int, name: str, ctx: ssl.SSLContext) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    tls = trio.SSLStream(stream, ctx, server_hostname=name)
    try:
        await tls.send_all(REQUEST)
        return await drain(tls)
    finally:
        await trio.aclose_forcefully(tls)


async def test_python_ssl_client_reaches_backend_by_sni(
    tls_backend: Any,
    start_proxy: Callable[..., Any],
    proxy_config: Callable[..., Any],
    client_context: ssl.SSLContext,
) -> None:
    running = await start_proxy(proxy_config(tls_backend.port))
    for name in ("bench.test", "www.bench.test", "other.test", "a.example.test"):
        response = await tls_get(running.port, name, client_context)
        assert response.endswith(b"hello from the backend\n")
    assert tls_backend.server_names == [
        "bench.test",
        "www.bench.test",
        "other.test",
        "a.example.test",
    ]
    await wait_for(lambda: len(running.access_log) == 4)
    assert tls_backend.received == [REQUEST] * 4
    [first, *_] = running.access_log
    assert first["sni"] == "bench.test"
    assert first["decision"] == "allow"
    assert first["reason"] == "normal"
    assert first["mode"] == ("kernel" if probe().sockmap else "copy")
    assert first["target"] == f"127.0.0.1:{tls_backend.port}"
    assert first["bytes_to_client"] > 0
    assert first["bytes_to_upstream"] > len(REQUEST)


async def test_curl_connect_to_reaches_backend(
    tls_backend: Any,
    start_proxy: Callable[..., Any],
    proxy_config: Callable[..., Any],
    ca_file: str,
) -> None:
    running = await start_proxy(proxy_config(tls_backend.port))
    result = await trio.run_process(
        [
            "curl",
            "--silent",
            "--show-error",
            "--max-time",
            "10",
            "--cacert",
            ca_file,
            "--connect-to",
            f"bench.test:443:127.0.0.1:{running.port}",
            "https://bench.test/",
        ],
        capture_stdout=True,
        capture_stderr=True,
    )
    assert result.stdout == b"hello from the backend\n"
    await wait_for(lambda: len(running.access_log) == 1)
    assert running.access_log[0]["alpn"] == ["h2", "http/1.1"]


async def test_openssl_s_client_verifies_backend_certificate(
    tls_backend: Any,
    start_proxy: Callable[..., Any],
    proxy_config: Callable[..., Any],
    ca_file: str,
) -> None:
    running = await start_proxy(proxy_config(tls_backend.port))
    result = await trio.run_process(
        [
            "openssl",
            "s_client",
            "-connect",
            f"127.0.0.1:{running.port}",
            "-servername",
            "other.test",
            "-CAfile",
            ca_file,
            "-verify_return_error",
            "-verify_hostname",
            "other.test",
            "-quiet",
        ],
        stdin=REQUEST,
        capture_stdout=True,
        capture_stderr=True,
    )
    assert b"hello from the backend" in result.stdout
    assert tls_backend.server_names == ["other.test"]


async def test_denied_name_gets_unrecognized_name_alert(
    tls_backend: Any,
    start_proxy: Callable[..., Any],
    proxy_config: Callable[..., Any],
    ca_file: str,
) -> None:
    running = await start_proxy(proxy_config(tls_backend.port))
    result = await trio.run_process(
        [
            "curl",
            "--silent",
            "--show-error",
            "--max-time",
            "10",
            "--cacert",
            ca_file,
            "--connect-to",
            f"denied.bench.test:443:127.0.0.1:{running.port}",
            "https://denied.bench.test/",
        ],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert result.returncode != 0
    assert b"unrecognized name" in result.stderr.lower()
    await wait_for(lambda: len(running.access_log) == 1)
    [record] = running.access_log
    assert record["decision"] == "deny"
    assert record["reason"] == "denied_domain"
    assert record["sni"] == "denied.bench.test"
    assert tls_backend.connections == 0


async def test_a_rule_with_alpn_sends_acme_challenges_to_their_own_backend(
    start_tls_backend: Callable[..., Any],
    start_proxy: Callable[..., Any],
    proxy_config: Callable[..., Any],
    client_context: ssl.SSLContext,
    ca: Any,
) -> None:
    """TLS-ALPN-01: a client offering ``acme-tls/1`` reaches the certificate manager's
    backend; the same name's other connections (ALPN ``h2``, or none) reach the site."""
    site, acme = await start_tls_backend(), await start_tls_backend()
    config = proxy_config(site.port)
    config["rules"].insert(
        0,
        {
            "suffix": "bench.test",
            "alpn": ["acme-tls/1"],
            "target": f"127.0.0.1:{acme.port}",
            "allow_private": True,
            "name": "acme",
        },
    )
    running = await start_proxy(config)
    for offered, backend in ((["acme-tls/1"], acme), (["h2", "http/1.1"], site), ([], site)):
        ctx = ssl.create_default_context()
        ca.configure_trust(ctx)
        if offered:
            ctx.set_alpn_protocols(offered)
        before = backend.connections
        response = await tls_get(running.port, "www.bench.test", ctx)
        assert response.endswith(b"hello from the backend\n")
        assert backend.connections == before + 1
    await wait_for(lambda: len(running.access_log) == 3)
    assert [r["rule"] for r in running.access_log] == ["acme", "bench.test", "bench.test"]
    assert running.access_log[0]["alpn"] == ["acme-tls/1"]
