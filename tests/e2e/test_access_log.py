"""The access log's line per connection: a time to the millisecond, an id, the time each
stage took, and the proxy's own end of the upstream connection (to find it at the target)."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

import trio
from proxytest import client_hello, serve_tcp, wait_for

RFC3339_MS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


async def test_lines_carry_time_id_stage_timings_and_the_upstream_end(
    nursery: trio.Nursery,
    start_proxy: Callable[..., Any],
    proxy_config: Callable[..., Any],
) -> None:
    seen_by_backend: list[str] = []

    async def backend(stream: trio.SocketStream) -> None:
        host, port = stream.socket.getpeername()[:2]
        seen_by_backend.append(f"{host}:{port}")
        await stream.receive_some(65536)
        await stream.send_all(b"ok")
        await stream.aclose()

    running = await start_proxy(proxy_config(await serve_tcp(nursery, backend)))
    before = time.time()
    for count in range(1, 4):
        client = await trio.open_tcp_stream("127.0.0.1", running.port)
        await client.send_all(client_hello("bench.test"))
        assert await client.receive_some(2) == b"ok"
        await client.aclose()
        await wait_for(lambda: len(running.access_log) == count)  # noqa: B023 - awaited here
    records = running.access_log
    ids = [r["id"] for r in records]
    assert ids == sorted(ids)
    assert len(set(ids)) == 3
    for record, upstream_end in zip(records, seen_by_backend, strict=True):
        assert record["upstream_local"] == upstream_end
        stamp = str(record["time"])
        assert RFC3339_MS.fullmatch(stamp), stamp
        parsed = time.mktime(time.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone
        assert before - 1 <= parsed + int(stamp[20:23]) / 1000 <= time.time()
        stages = [record["hello_time"], record["resolve_time"], record["connect_time"]]
        assert all(isinstance(t, float) and t >= 0 for t in stages), stages
        assert sum(stages) <= record["duration"]


async def test_a_refused_line_has_no_stage_it_did_not_reach(
    start_proxy: Callable[..., Any], proxy_config: Callable[..., Any]
) -> None:
    running = await start_proxy(proxy_config(9))
    client = await trio.open_tcp_stream("127.0.0.1", running.port)
    await client.send_all(client_hello("denied.bench.test"))
    await wait_for(lambda: len(running.access_log) == 1)
    await client.aclose()
    [record] = running.access_log
    assert record["reason"] == "denied_domain"
    assert isinstance(record["hello_time"], float)
    assert (record["resolve_time"], record["connect_time"], record["upstream_local"]) == (
        None,
        None,
        None,
    )
