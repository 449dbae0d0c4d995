"""The status server's pieces without a network: deadlines on the autojump clock (exact),
the connection bound with a fake listener, and the metrics arithmetic (finished plus live,
never going backwards).

Real HTTP over real sockets is in tests/e2e/test_status_e2e.py; the acceleration states the
kernel features report are in tests/shell/test_features.py.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st
from statusclient import metric_samples, sample

from trio_sni.connection import ConnectionInfo
from trio_sni.features import FEATURES, AccelerationStatus
from trio_sni.sansio.config_load import load_config
from trio_sni.server import Proxy
from trio_sni.status import (
    ERROR_SEND_TIMEOUT,
    REQUEST_TIMEOUT,
    _accept_loop,
    handle_status_connection,
)

CONFIG: dict[str, Any] = {
    "listeners": [{"host": "127.0.0.1", "port": 0}],
    "rules": [{"suffix": "a.test", "name": "a"}],
    "log": {"access_log": None},
}


def make_proxy(**overrides: Any) -> Proxy:
    """A proxy that is never served: copy mode, so it holds no kernel objects."""
    config = {**CONFIG, "ebpf": {"sockmap": {"enabled": False}}, **overrides}
    return Proxy(load_config(config), access_log=lambda record: None)


async def read_all(stream: trio.abc.ReceiveStream) -> bytes:
    data = b""
    while chunk := await stream.receive_some(65536):
        data += chunk
    return data


# ------------------------------------------------------------------------------------------
# Deadlines (autojump clock, exact times)


async def test_a_trickling_request_gets_408_at_exactly_the_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client, server = trio.testing.memory_stream_pair()
    proxy = make_proxy()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(handle_status_connection, server, proxy)
        await client.send_all(b"GET /healthz HT")
        await trio.sleep(REQUEST_TIMEOUT - 1)
        await client.send_all(b"TP/1.1\r\nHost: x\r\n")  # still no blank line: incomplete
        response = await read_all(client)
        assert trio.current_time() == REQUEST_TIMEOUT
    assert response.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert response.endswith(b"\r\n\r\nrequest not complete within 5 s\n")
    assert b"Connection: close\r\n" in response


async def test_a_silent_client_is_closed_at_the_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(handle_status_connection, server, make_proxy())
        response = await read_all(client)
    assert trio.current_time() == REQUEST_TIMEOUT
    assert response.startswith(b"HTTP/1.1 408 ")


async def test_a_client_that_never_reads_cannot_hold_the_server(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # lockstep: send_all blocks until the other side reads, like a full socket buffer.
    client, server = trio.testing.lockstep_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(handle_status_connection, server, make_proxy())
        await client.send_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        # ...and never reads the answer: the handler gives up at the deadline, no 408 added.
    assert trio.current_time() == REQUEST_TIMEOUT
    with pytest.raises(trio.ClosedResourceError):
        await server.send_all(b"x")  # the handler closed its side


async def test_a_408_to_a_client_that_does_not_read_is_bounded_too(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client, server = trio.testing.lockstep_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(handle_status_connection, server, make_proxy())
        await client.send_all(b"GET /")
    assert trio.current_time() == REQUEST_TIMEOUT + ERROR_SEND_TIMEOUT


async def test_a_client_that_closes_without_a_request_gets_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(handle_status_connection, server, make_proxy())
        await client.send_eof()
        assert await read_all(client) == b""
    assert trio.current_time() == 0


# ------------------------------------------------------------------------------------------
# Chunking never changes the answer; garbage never crashes the handler


REQUESTS = [
    b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
    b"HEAD /readyz HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /ebpf/status HTTP/1.0\r\n\r\n",
    b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: application/openmetrics-text\r\n\r\n",
    b"DELETE /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /connections?limit=x HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\n\r\n",  # no Host: 400
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 20000 + b"\r\n\r\n",  # 431
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS client on the wrong port
]


async def exchange(proxy: Proxy, chunks: list[bytes]) -> bytes:
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(handle_status_connection, server, proxy)
        try:
            for chunk in chunks:
                await client.send_all(chunk)
            await client.send_eof()
        except trio.BrokenResourceError:
            pass  # the server answered early (400, 431) and closed, as a socket would
        return await read_all(client)


@pytest.mark.parametrize("request_bytes", REQUESTS, ids=lambda r: repr(r[:24]))
async def test_one_chunk_and_byte_by_byte_give_the_same_answer(
    request_bytes: bytes, autojump_clock: trio.testing.MockClock
) -> None:
    proxy = make_proxy()
    whole = await exchange(proxy, [request_bytes])
    trickled = await exchange(proxy, [bytes([b]) for b in request_bytes])
    assert _steady(whole) == _steady(trickled)
    assert whole.startswith(b"HTTP/1.1 ")


def _steady(response: bytes) -> tuple[bytes, list[bytes]]:
    """The status line and the body without the ``process_*`` series, which change from one
    request to the next (CPU time, memory): what two equal requests must agree on."""
    head, _, body = response.partition(b"\r\n\r\n")
    lines = [line for line in body.split(b"\n") if b"process_" not in line]
    return head.split(b"\r\n", 1)[0], lines


@given(
    prefix=st.sampled_from([b"", *REQUESTS[:3], b"GET / HTTP/1.1\r\n"]),
    cut=st.integers(min_value=0, max_value=60),
    garbage=st.binary(max_size=200),
)
def test_any_bytes_get_an_http_answer_or_nothing(prefix: bytes, cut: int, garbage: bytes) -> None:
    """The h11 invariant: whatever arrives, the handler answers with a status line (or
    nothing, if nothing came), closes, and raises nothing."""
    data = prefix[: len(prefix) - cut] + garbage if cut < len(prefix) else garbage
    proxy = make_proxy()

    async def scenario() -> bytes:
        return await exchange(proxy, [data])

    response = trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))
    if not data:
        assert response == b""
    else:
        status = int(response.split(b" ", 2)[1])
        assert status in (200, 400, 404, 405, 413, 431, 503), response[:200]


# ------------------------------------------------------------------------------------------
# The connection bound


class FakeListener(trio.abc.Listener[trio.abc.Stream]):
    """Hands out the server ends of memory stream pairs the test queued."""

    def __init__(self) -> None:
        self.send, self.receive = trio.open_memory_channel[trio.abc.Stream](10)
        self.accepted = 0

    async def accept(self) -> trio.abc.Stream:
        stream = await self.receive.receive()
        self.accepted += 1
        return stream

    async def aclose(self) -> None:
        pass


async def test_at_most_max_connections_are_served_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    listener = FakeListener()
    pairs = [trio.testing.memory_stream_pair() for _ in range(3)]
    proxy = make_proxy()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            _accept_loop, listener, proxy, trio.Semaphore(2), REQUEST_TIMEOUT, nursery
        )
        for _client, server in pairs:
            listener.send.send_nowait(server)
        await trio.testing.wait_all_tasks_blocked()
        assert listener.accepted == 2  # the third waits (in a real listener: the backlog)

        first_client = pairs[0][0]
        await first_client.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await read_all(first_client)).endswith(b"\r\n\r\nok\n")
        await trio.testing.wait_all_tasks_blocked()
        assert listener.accepted == 3  # a slot came free
        assert trio.current_time() == 0
        nursery.cancel_scope.cancel()


# ------------------------------------------------------------------------------------------
# Metrics arithmetic


def record(**fields: object) -> dict[str, object]:
    base: dict[str, object] = {
        "mode": "copy",
        "rule": "a",
        "reason": "normal",
        "bytes_to_upstream": 0,
        "bytes_to_client": 0,
        "duration": 0.0,
        "hello_size": None,
    }
    return {**base, **fields}


def scrape(proxy: Proxy) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client import generate_latest

    return metric_samples(generate_latest(proxy.metrics.registry).decode())


def test_finished_records_are_counted_by_reason_mode_and_rule() -> None:
    proxy = make_proxy()
    m = proxy.metrics
    m.observe(record(bytes_to_upstream=100, bytes_to_client=1000, duration=0.2, hello_size=517))
    m.observe(record(mode=None, rule=None, reason="no_sni", duration=0.001, hello_size=300))
    m.observe(record(mode=None, rule=None, reason="not_tls", duration=0.001))
    s = scrape(proxy)
    assert sample(s, "trio_sni_connections_accepted_total") == 3
    assert sample(s, "trio_sni_connections_active") == 0
    assert sample(s, "trio_sni_connections_closed_total", reason="normal", mode="copy") == 1
    assert sample(s, "trio_sni_connections_closed_total", reason="no_sni", mode="none") == 1
    assert sample(s, "trio_sni_connections_closed_total", reason="not_tls", mode="none") == 1
    assert sample(s, "trio_sni_bytes_total", direction="to_upstream", mode="copy") == 100
    assert sample(s, "trio_sni_bytes_total", direction="to_client", mode="copy") == 1000
    assert sample(s, "trio_sni_rule_connections_total", rule="a") == 1
    assert sample(s, "trio_sni_rule_connections_total", rule="none") == 2
    assert sample(s, "trio_sni_rule_bytes_total", rule="a", direction="to_client") == 1000
    assert sample(s, "trio_sni_connection_duration_seconds_count") == 3
    assert sample(s, "trio_sni_connection_duration_seconds_bucket", le="0.005") == 2
    assert sample(s, "trio_sni_connection_duration_seconds_bucket", le="0.25") == 3
    assert sample(s, "trio_sni_client_hello_bytes_count") == 2
    assert sample(s, "trio_sni_client_hello_bytes_sum") == 817
    assert sample(s, "trio_sni_client_hello_bytes_bucket", le="256.0") == 0
    assert sample(s, "trio_sni_client_hello_bytes_bucket", le="512.0") == 1
    assert sample(s, "trio_sni_client_hello_bytes_bucket", le="1024.0") == 2
    assert sample(s, "trio_sni_client_hello_bytes_bucket", le="+Inf") == 2
    # Feature states from the default provider, one series per feature.
    assert sample(s, "trio_sni_ebpf_feature_state", feature="xdp", state="disabled") == 1
    assert sample(s, "trio_sni_ebpf_feature_state", feature="sockmap", state="disabled") == 1
    assert sample(s, "trio_sni_ebpf_feature_state", feature="stats", state="unavailable") == 1


def test_live_bytes_are_included_and_totals_never_go_backwards() -> None:
    proxy = make_proxy()
    ctx = proxy.context
    info = ConnectionInfo(client=("192.0.2.1", 5000), listener="l", started_wall=0.0, started=0.0)
    ctx.live[id(info)] = info
    s = scrape(proxy)
    assert sample(s, "trio_sni_connections_accepted_total") == 1
    assert sample(s, "trio_sni_connections_active") == 1
    # Still routing: not counted under a rule (it may still get one).
    assert sample(s, "trio_sni_rule_connections_total", rule="none") is None

    info.rule, info.mode = "a", "copy"
    info.counters.to_upstream, info.counters.to_client = 10, 20
    s = scrape(proxy)
    assert sample(s, "trio_sni_bytes_total", direction="to_client", mode="copy") == 20
    assert sample(s, "trio_sni_rule_bytes_total", rule="a", direction="to_upstream") == 10
    assert sample(s, "trio_sni_rule_connections_total", rule="a") == 1

    # The connection ends the way handle_connection ends it: off the table, then its record.
    del ctx.live[id(info)]
    ctx.write_access_log(info.access_record(1.5) | {"reason": "normal"})
    s = scrape(proxy)
    assert sample(s, "trio_sni_connections_accepted_total") == 1
    assert sample(s, "trio_sni_connections_active") == 0
    assert sample(s, "trio_sni_bytes_total", direction="to_client", mode="copy") == 20
    assert sample(s, "trio_sni_rule_bytes_total", rule="a", direction="to_upstream") == 10
    assert sample(s, "trio_sni_rule_connections_total", rule="a") == 1
    assert sample(s, "trio_sni_connection_duration_seconds_sum") == 1.5


def test_each_proxy_has_its_own_registry() -> None:
    a, b = make_proxy(), make_proxy()
    a.metrics.observe(record())
    assert sample(scrape(a), "trio_sni_connections_accepted_total") == 1
    assert sample(scrape(b), "trio_sni_connections_accepted_total") == 0


def test_kernel_counters_from_the_provider_are_exported_summed() -> None:
    proxy = make_proxy()
    proxy.acceleration_status = lambda: AccelerationStatus(  # type: ignore[method-assign]
        features=dict.fromkeys(FEATURES, "active"),
        reasons={},
        counters={
            "sockmap_bytes_to_upstream": 100,
            "sockmap_bytes_to_client": 2000,
            "sockmap_redirect_failures": 1,
            "dns_cache_evictions": 2,
            "tc_bytes_dropped_normal": 3000,
            "tc_bytes_passed_high": 5000,
            "tc_packets_passed_other": 4,
        },
    )
    proxy.metrics._acceleration = proxy.acceleration_status
    s = scrape(proxy)
    # The TC shaper's counters carry the verdict and the QoS class as labels.
    tc_bytes, tc_packets = "trio_sni_ebpf_tc_bytes_total", "trio_sni_ebpf_tc_packets_total"
    assert sample(s, tc_bytes, verdict="dropped", **{"class": "normal"}) == 3000
    assert sample(s, tc_bytes, verdict="passed", **{"class": "high"}) == 5000
    assert sample(s, tc_packets, verdict="passed", **{"class": "other"}) == 4
    # A direction pair is one metric with a direction label; the rest keep their names.
    assert sample(s, "trio_sni_ebpf_sockmap_bytes_total", direction="to_upstream") == 100
    assert sample(s, "trio_sni_ebpf_sockmap_bytes_total", direction="to_client") == 2000
    assert sample(s, "trio_sni_ebpf_sockmap_redirect_failures_total") == 1
    assert sample(s, "trio_sni_ebpf_dns_cache_evictions_total") == 2


def test_a_reload_that_moves_the_status_endpoint_says_it_needs_a_restart(
    caplog: pytest.LogCaptureFixture,
) -> None:
    proxy = make_proxy(status={"listen": "127.0.0.1:9090"})
    config = {**CONFIG, "ebpf": {"sockmap": {"enabled": False}}}
    with caplog.at_level("WARNING", logger="trio_sni"):
        proxy.reload(load_config({**config, "status": {"listen": "127.0.0.1:9091"}}))
    assert "reload: status.listen changes take effect only after a restart" in caplog.messages
    caplog.clear()
    with caplog.at_level("WARNING", logger="trio_sni"):
        proxy.reload(load_config({**config, "status": {"listen": "127.0.0.1:9091"}}))
    assert caplog.messages == []
