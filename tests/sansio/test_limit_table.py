"""LimitTable: the workers' shared limits decide as ClientLimiter does, over every worker."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_sni.sansio.addresses import IPAddress
from trio_sni.sansio.config import Limits
from trio_sni.sansio.limit_table import WINDOW, LimitTable, table_size
from trio_sni.sansio.policy import ClientLimiter, Deny

A = ipaddress.ip_address("192.0.2.1")
B = ipaddress.ip_address("192.0.2.2")


def new_table(slots: int = 1024, workers: int = 2) -> memoryview:
    buffer = memoryview(bytearray(table_size(slots, workers)))
    LimitTable.create(buffer, slots, workers, bytes(range(16)))
    return buffer


def limits(connections: int = 0, rate: float = 0, burst: int = 0) -> Limits:
    return Limits(per_client_connections=connections, per_client_rate=rate, per_client_burst=burst)


def test_two_workers_share_one_clients_limits() -> None:
    buffer = new_table()
    one = LimitTable(buffer, 0, limits(connections=3), max_connections=100)
    two = LimitTable(buffer, 1, limits(connections=3), max_connections=100)
    assert one.acquire(A, 0) is None
    assert two.acquire(A, 0) is None
    assert one.acquire(A, 0) is None
    assert two.acquire(A, 0) == Deny(
        "too_many_connections",
        "client 192.0.2.1 has 3 live connections (per_client_connections = 3)",
    )
    assert two.acquire(B, 0) is None
    assert (one.active_for(A), two.active, one.active) == (3, 4, 4)
    two.release(A)
    assert one.acquire(A, 0) is None


def test_the_global_cap_counts_every_worker() -> None:
    buffer = new_table()
    one = LimitTable(buffer, 0, limits(), max_connections=2)
    two = LimitTable(buffer, 1, limits(), max_connections=2)
    assert one.acquire(A, 0) is None
    assert two.acquire(B, 0) is None
    assert one.acquire(B, 0) == Deny(
        "max_connections", "the proxy has 2 live connections (max_connections = 2)"
    )


def test_a_dead_workers_slots_are_given_back() -> None:
    buffer = new_table()
    one = LimitTable(buffer, 0, limits(connections=2), max_connections=100)
    two = LimitTable(buffer, 1, limits(connections=2), max_connections=100)
    supervisor = LimitTable(buffer, None, limits(connections=2), max_connections=100)
    assert one.acquire(A, 0) is None
    assert two.acquire(A, 0) is None
    assert two.acquire(B, 0) is None
    assert one.acquire(A, 0) is not None
    assert supervisor.forget_worker(1) == (2, 2)
    assert (one.active, one.active_for(A), one.active_for(B)) == (1, 1, 0)
    assert one.acquire(A, 0) is None
    assert supervisor.forget_worker(1) == (0, 0)


def test_ipv6_clients_count_per_64_and_loopback_is_a_client() -> None:
    table = LimitTable(new_table(), 0, limits(connections=1), max_connections=100)
    assert table.acquire(ipaddress.ip_address("::1"), 0) is None
    assert table.acquire(ipaddress.ip_address("::2"), 0) is not None  # same /64
    assert table.acquire(ipaddress.ip_address("2001:db8::1"), 0) is None


def test_a_full_window_forgets_the_oldest_idle_client_then_admits_untracked() -> None:
    # A table of WINDOW slots: every client lands in the same window.
    buffer = new_table(slots=1)
    table = LimitTable(buffer, 0, limits(connections=1, rate=1, burst=1), max_connections=1000)
    clients = [ipaddress.ip_address(f"198.51.100.{i}") for i in range(WINDOW + 1)]
    for i, ip in enumerate(clients[:WINDOW]):
        assert table.acquire(ip, float(i)) is None
    table.release(clients[0])  # idle: its slot may be taken
    assert table.acquire(clients[WINDOW], float(WINDOW)) is None
    assert table.untracked == 0
    assert table.acquire(clients[0], float(WINDOW)) is None  # forgotten: a fresh bucket
    assert table.untracked == 1  # ... and no slot was left for it
    table.release(clients[0])
    assert table.untracked == 0
    with pytest.raises(ValueError, match="without a matching acquire"):
        table.release(clients[0])


def test_not_a_table() -> None:
    with pytest.raises(ValueError, match="not a trio_sni limit table"):
        LimitTable(memoryview(bytearray(4096)), 0, limits(), max_connections=1)


CLIENTS = [ipaddress.ip_address(a) for a in ("192.0.2.1", "192.0.2.2", "2001:db8::1", "::1")]


@settings(max_examples=300)
@given(
    connections=st.integers(0, 3),
    rate=st.sampled_from([0.0, 0.5, 1.0, 4.0]),
    burst=st.integers(0, 3),
    steps=st.lists(
        st.tuples(st.booleans(), st.integers(0, 3), st.integers(0, 1), st.integers(0, 4)),
        max_size=60,
    ),
)
def test_decides_as_client_limiter_does(
    connections: int,
    rate: float,
    burst: int,
    steps: list[tuple[bool, int, int, int]],
) -> None:
    """Any sequence of acquires and releases (spread over two workers) at non-decreasing
    times gets the same answers from the shared table as from one ClientLimiter."""
    buffer = new_table()
    config = limits(connections, rate, burst)
    workers = [LimitTable(buffer, w, config, max_connections=5) for w in (0, 1)]
    reference = ClientLimiter(config, 5)
    held: list[tuple[IPAddress, int]] = []
    now = 0.0
    for acquire, client, worker, advance in steps:
        now += advance / 4
        ip = CLIENTS[client]
        if acquire:
            expected = reference.acquire(ip, now)
            assert workers[worker].acquire(ip, now) == expected
            if expected is None:
                held.append((ip, worker))
        elif held:
            ip, owner = held.pop(client % len(held))
            reference.release(ip)
            workers[owner].release(ip)
        assert workers[0].active == reference.active
