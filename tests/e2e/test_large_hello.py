"""A real browser's post-quantum ClientHello (~1.9 KB), arriving in two TCP segments."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio
from proxytest import drain, wait_for

HELLOS = Path(__file__).parent.parent / "data" / "hellos"
HELLO = (HELLOS / "chromium-pq.bin").read_bytes()
NAME = "chromium.example.test"
MSS = 1448  # what a 1500-byte MTU leaves for TCP payload with timestamps


async def test_browser_pq_hello_split_over_two_segments_is_routed(
    nursery: trio.Nursery, start_proxy: Any
) -> None:
    assert len(HELLO) > MSS
    received: list[bytes] = []
    [backend] = await trio.open_tcp_listeners(0, host="127.0.0.1")

    async def serve_one() -> None:
        try:
            stream = await backend.accept()
            received.append(await drain(stream))
            await stream.aclose()
        finally:
            with trio.CancelScope(shield=True):
                await backend.aclose()

    nursery.start_soon(serve_one)
    running = await start_proxy(
        {
            "listeners": [
                {"host": "127.0.0.1", "port": 0, "target_port": backend.socket.getsockname()[1]}
            ],
            "rules": [{"match": NAME, "allow_private": True}],
            "resolver": {"hosts": {NAME: ["127.0.0.1"]}},
            "log": {"access_log": None},
        }
    )
    client = await trio.open_tcp_stream("127.0.0.1", running.port)
    await client.send_all(HELLO[:MSS])
    await trio.sleep(0.05)  # the second segment comes later, as on a real network
    await client.send_all(HELLO[MSS:] + b"after the hello")
    await client.send_eof()
    await wait_for(lambda: len(received) == 1)
    assert received == [HELLO + b"after the hello"]
    await client.aclose()
    await wait_for(lambda: len(running.access_log) == 1)
    [record] = running.access_log
    assert record["sni"] == NAME
    assert record["alpn"] == ["h2", "http/1.1"]
    assert record["reason"] == "normal"
