"""QUIC end-to-end parts: an aioquic server in a thread of its own, and a proxy with one
``quic`` listener in either relay mode (the kernel's QUIC sockhash, or the proxy itself), with
its access log."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import serve
from aioquic.quic.configuration import QuicConfiguration

from trio_sni.sansio.config_load import load_config
from trio_sni.server import Proxy

#: A flow's access-log line.
Record = dict[str, Any]
#: Starts a proxy with a config: the proxy, its QUIC port, the access-log lines so far.
StartProxy = Callable[[dict[str, Any]], Awaitable[tuple[Proxy, int, list[Record]]]]

#: How a routed flow's datagrams pass: redirected by the kernel (the QUIC sockhash) or
#: relayed by the proxy (kernel forwarding switched off).
MODES = [
    pytest.param("kernel", marks=pytest.mark.bpf),
    pytest.param("userspace"),
]


def in_mode(config: dict[str, Any], mode: str) -> dict[str, Any]:
    """``config`` made to relay its flows in ``mode`` (one of :data:`MODES`)."""
    if mode == "userspace":
        config["ebpf"] = {"sockmap": {"enabled": False}}
    else:
        config["forwarding"] = {"mode": "kernel"}
        config["fallback_mode"] = "none"
    return config


def quic_config(name: str, backend_port: int, **overrides: Any) -> dict[str, Any]:
    """One ``quic`` listener on 127.0.0.1 routing ``name`` directly to the backend's port;
    flows end after 1 s without a datagram."""
    config: dict[str, Any] = {
        "listeners": [{"host": "127.0.0.1", "port": 0, "protocol": "quic"}],
        "workers": 1,
        "rules": [
            {
                "match": name,
                "target": f"127.0.0.1:{backend_port}",
                "allow_private": True,
                "via": "direct",
            },
        ],
        "timeouts": {"quic_idle": 1},
        "log": {"access_log": None},
    }
    config.update(overrides)
    return config


def quic_proxy_starter(nursery: trio.Nursery) -> StartProxy:
    """``await start(config)``: a proxy serving in ``nursery`` (the test's)."""

    async def start(config: dict[str, Any]) -> tuple[Proxy, int, list[Record]]:
        records: list[Record] = []
        proxy = Proxy(load_config(config), access_log=records.append)
        await nursery.start(proxy.serve)
        [listener] = proxy.quic_listeners
        port: int = listener.sock.getsockname()[1]
        return proxy, port, records

    return start


class AioquicServer:
    """An aioquic server on 127.0.0.1 (``port``, once entered) in its own thread and asyncio
    loop, with a certificate for ``name`` from ``ca``; ``create_protocol`` serves each
    connection. ``retry``: it answers each new connection's first Initial with a Retry (RFC 9000
    section 8.1.2); ``versions``: the QUIC versions it speaks."""

    def __init__(
        self,
        ca: trustme.CA,
        tmp: Path,
        name: str,
        alpn: list[str],
        create_protocol: Callable[..., QuicConnectionProtocol],
        *,
        retry: bool = False,
        versions: list[int] | None = None,
    ) -> None:
        cert = ca.issue_cert(name)
        cert.cert_chain_pems[0].write_to_path(str(tmp / "cert.pem"))
        cert.private_key_pem.write_to_path(str(tmp / "key.pem"))
        self.configuration = QuicConfiguration(is_client=False, alpn_protocols=alpn)
        if versions is not None:
            self.configuration.supported_versions = versions
        self.configuration.load_cert_chain(str(tmp / "cert.pem"), str(tmp / "key.pem"))
        self._create_protocol = create_protocol
        self.retry = retry
        self.loop = asyncio.new_event_loop()
        self.port = 0
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        server = self.loop.run_until_complete(
            serve(
                "127.0.0.1",
                self.port,
                configuration=self.configuration,
                create_protocol=self._create_protocol,
                retry=self.retry,
            )
        )
        self._ready.set()
        self.loop.run_forever()
        server.close()
        self.loop.run_until_complete(asyncio.sleep(0))
        self.loop.close()

    def __enter__(self) -> Any:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
