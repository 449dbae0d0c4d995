"""ClientLimiter: global and per-client caps, exact token-bucket arithmetic, bounded memory.

Times are passed explicitly and chosen as binary fractions (0.25, 0.5, ...) with rates that
are powers of two, so every token count below is exact in floating point.
"""

from __future__ import annotations

import ipaddress

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_sni.sansio.addresses import IPAddress
from trio_sni.sansio.config import Limits
from trio_sni.sansio.policy import ClientLimiter, Deny

A = ipaddress.ip_address("192.0.2.1")
B = ipaddress.ip_address("192.0.2.2")
C = ipaddress.ip_address("192.0.2.3")

NO_PER_CLIENT = Limits(per_client_connections=0, per_client_rate=0, per_client_burst=0)


def limiter(
    connections: int = 0, rate: float = 0, burst: int = 0, max_connections: int = 1000
) -> ClientLimiter:
    limits = Limits(
        per_client_connections=connections, per_client_rate=rate, per_client_burst=burst
    )
    return ClientLimiter(limits, max_connections)


def test_global_max_connections_is_checked_first() -> None:
    lim = limiter(connections=1, max_connections=2)
    assert lim.acquire(A, 0) is None
    assert lim.acquire(B, 0) is None
    # A is also over its own limit, but the global cap is reported: it is what is exhausted.
    expected = Deny("max_connections", "the proxy has 2 live connections (max_connections = 2)")
    assert lim.acquire(A, 0) == expected
    assert lim.acquire(C, 0) == expected
    assert lim.active == 2
    lim.release(B)
    assert lim.acquire(C, 0) is None
    assert lim.active == 2


def test_per_client_concurrent_limit() -> None:
    lim = limiter(connections=2)
    assert lim.acquire(A, 0) is None
    assert lim.acquire(A, 0) is None
    assert lim.acquire(A, 0) == Deny(
        "too_many_connections",
        "client 192.0.2.1 has 2 live connections (per_client_connections = 2)",
    )
    assert lim.acquire(B, 0) is None  # other clients are unaffected
    assert (lim.active_for(A), lim.active_for(B), lim.active) == (2, 1, 3)
    lim.release(A)
    assert lim.acquire(A, 0) is None


def test_zero_disables_per_client_limits() -> None:
    lim = ClientLimiter(NO_PER_CLIENT, max_connections=10_000)
    for _ in range(5000):
        assert lim.acquire(A, 0) is None
    assert lim.active_for(A) == 5000


def test_token_bucket_arithmetic_is_exact() -> None:
    lim = limiter(rate=2, burst=3)  # 3 at once, then one every 0.5 s

    def attempt(now: float) -> bool:
        result = lim.acquire(A, now)
        if result is None:
            lim.release(A)
            return True
        assert result == Deny(
            "rate_limited", "client 192.0.2.1 exceeded per_client_rate (2/s, burst 3)"
        )
        return False

    assert [attempt(0.0) for _ in range(4)] == [True, True, True, False]
    assert attempt(0.25) is False  # 0.5 tokens
    assert attempt(0.5) is True  # 1.0 token, now 0
    assert attempt(0.5) is False
    assert attempt(1.25) is True  # 1.5 tokens, now 0.5
    assert attempt(1.25) is False
    assert attempt(1.5) is True  # 0.5 + 0.5 = 1.0, now 0
    # A long pause refills to the burst, never beyond it.
    assert [attempt(100.0) for _ in range(4)] == [True, True, True, False]


def test_refill_stops_at_the_burst_for_a_client_that_stays_connected() -> None:
    lim = limiter(rate=4, burst=2)
    assert lim.acquire(A, 0) is None  # held open: the client's state is never forgotten
    assert lim.acquire(A, 0) is None
    assert lim.acquire(A, 0) is not None
    lim.release(A)
    assert [lim.acquire(A, 50) for _ in range(3)] == [
        None,
        None,
        Deny("rate_limited", "client 192.0.2.1 exceeded per_client_rate (4/s, burst 2)"),
    ]
    assert lim.acquire(A, 50.25) is None
    assert lim.active_for(A) == 4


def test_refused_attempts_take_no_token() -> None:
    lim = limiter(connections=1, rate=1, burst=2)
    assert lim.acquire(A, 0) is None  # 1 token left
    assert lim.acquire(A, 0) == Deny(
        "too_many_connections",
        "client 192.0.2.1 has 1 live connection (per_client_connections = 1)",
    )
    lim.release(A)
    assert lim.acquire(A, 0) is None  # the refusal above did not spend the last token
    lim.release(A)
    assert lim.acquire(A, 0) is not None
    # Rate-limited attempts spend nothing either: at 0.5 s there is half a token, and two
    # refusals later there is still exactly one token at 1 s.
    assert lim.acquire(A, 0.5) is not None
    assert lim.acquire(A, 0.5) is not None
    assert lim.acquire(A, 1.0) is None


def test_burst_zero_means_one_at_a_time() -> None:
    lim = limiter(rate=4, burst=0)
    assert lim.acquire(A, 0) is None
    assert lim.acquire(A, 0) == Deny(
        "rate_limited", "client 192.0.2.1 exceeded per_client_rate (4/s, burst 0)"
    )
    assert lim.acquire(A, 0.25) is None
    assert lim.acquire(A, 10) is None
    assert lim.acquire(A, 10) is not None


def test_a_clock_step_backwards_earns_nothing() -> None:
    lim = limiter(rate=1, burst=1)
    assert lim.acquire(A, 10) is None
    assert lim.acquire(A, 5) is not None
    assert lim.acquire(A, 10.5) is not None  # half a token since 10, not 5.5 since 5
    assert lim.acquire(A, 11) is None


def test_ipv6_clients_are_limited_per_slash_64() -> None:
    lim = limiter(connections=2)
    assert lim.acquire(ipaddress.ip_address("2001:db8:1:2::1"), 0) is None
    assert lim.acquire(ipaddress.ip_address("2001:db8:1:2:ffff::9"), 0) is None
    assert lim.acquire(ipaddress.ip_address("2001:db8:1:2::3"), 0) == Deny(
        "too_many_connections",
        "client network 2001:db8:1:2::/64 has 2 live connections (per_client_connections = 2)",
    )
    assert lim.acquire(ipaddress.ip_address("2001:db8:1:3::1"), 0) is None  # the next /64
    assert lim.active_for(ipaddress.ip_address("2001:db8:1:2::42")) == 2
    lim.release(ipaddress.ip_address("2001:db8:1:2::77"))  # any address of the /64 releases
    assert lim.active_for(ipaddress.ip_address("2001:db8:1:2::1")) == 1


def test_ipv4_mapped_clients_count_as_ipv4() -> None:
    lim = limiter(connections=1)
    assert lim.acquire(ipaddress.ip_address("::ffff:192.0.2.1"), 0) is None
    assert lim.acquire(A, 0) == Deny(
        "too_many_connections",
        "client 192.0.2.1 has 1 live connection (per_client_connections = 1)",
    )
    lim.release(A)
    assert lim.active == 0


def test_release_without_acquire_is_an_error() -> None:
    lim = limiter()
    with pytest.raises(ValueError, match=r"release\(\) for client 192\.0\.2\.1 without"):
        lim.release(A)
    assert lim.acquire(A, 0) is None
    lim.release(A)
    with pytest.raises(ValueError, match="without a matching acquire"):
        lim.release(A)
    assert lim.active == 0


# --------------------------------------------------------------------------------------------
# Memory


def many(count: int, start: int = 0) -> list[IPAddress]:
    base = int(ipaddress.ip_address("10.0.0.0"))
    return [ipaddress.IPv4Address(base + start + i) for i in range(count)]


def test_without_a_rate_idle_clients_are_forgotten_at_once() -> None:
    lim = limiter(connections=5)
    for ip in many(100):
        assert lim.acquire(ip, 0) is None
    assert lim.tracked_clients == 100
    for ip in many(100):
        lim.release(ip)
    assert lim.tracked_clients == 0


def test_idle_clients_are_forgotten_once_their_bucket_is_full() -> None:
    lim = limiter(rate=1, burst=2)  # an empty bucket is full again after 2 s
    for ip in many(1000):
        assert lim.acquire(ip, 0) is None
        lim.release(ip)
    assert lim.tracked_clients == 1000
    assert lim.acquire(B, 1.75) is None
    assert lim.tracked_clients == 1001  # too early: buckets might not be full yet
    lim.release(B)
    assert lim.acquire(C, 2.0) is None
    assert lim.tracked_clients == 2  # the 1000 are gone; B (released at 1.75) and C remain
    assert lim.acquire(A, 3.75) is None
    assert lim.tracked_clients == 2  # B is gone too; C is live, A is live
    assert lim.active_for(C) == 1


def test_live_clients_are_never_forgotten() -> None:
    lim = limiter(connections=3, rate=1, burst=1)
    assert lim.acquire(A, 0) is None
    assert lim.acquire(B, 1000) is None
    assert lim.active_for(A) == 1
    assert lim.acquire(A, 1000) is None
    assert lim.acquire(A, 2000) is None
    assert lim.active_for(A) == 3


def test_the_table_is_capped_and_evicts_the_longest_idle_client() -> None:
    limits = Limits(per_client_connections=0, per_client_rate=1, per_client_burst=60)
    lim = ClientLimiter(limits, max_connections=5, max_clients=10)
    clients = many(25)
    for ip in clients:
        assert lim.acquire(ip, 0) is None
        lim.release(ip)
        assert lim.tracked_clients <= 10
    # The 10 remembered are the 10 released last; the earliest ones were forgotten early.
    assert lim.tracked_clients == 10
    # A forgotten client starts with a full bucket again (the documented cost of the cap):
    for _ in range(60):
        assert lim.acquire(clients[0], 0) is None
        lim.release(clients[0])
    assert lim.acquire(clients[0], 0) is not None
    # ... while a remembered one still owes its token.
    for _ in range(59):
        assert lim.acquire(clients[-1], 0) is None
        lim.release(clients[-1])
    assert lim.acquire(clients[-1], 0) is not None


def test_the_cap_never_drops_live_clients() -> None:
    # The cap is raised to max_connections + 1, so every live client keeps its entry.
    limits = Limits(per_client_connections=1, per_client_rate=1, per_client_burst=1)
    lim = ClientLimiter(limits, max_connections=20, max_clients=10)
    clients = many(20)
    for ip in clients:
        assert lim.acquire(ip, 0) is None
    assert lim.tracked_clients == 20
    for ip in clients:
        assert lim.acquire(ip, 0) is not None  # still counted: per-client limit holds
    for ip in clients:
        lim.release(ip)
    assert lim.active == 0


# --------------------------------------------------------------------------------------------
# Reload


def test_reconfigure_keeps_live_counts() -> None:
    lim = limiter(connections=5, max_connections=10)
    for _ in range(3):
        assert lim.acquire(A, 0) is None
    assert lim.acquire(B, 0) is None
    lim.reconfigure(
        Limits(per_client_connections=2, per_client_rate=0, per_client_burst=0), max_connections=10
    )
    assert (lim.active, lim.active_for(A)) == (4, 3)
    assert lim.acquire(A, 1) == Deny(
        "too_many_connections",
        "client 192.0.2.1 has 3 live connections (per_client_connections = 2)",
    )
    lim.release(A)
    lim.release(A)
    assert lim.acquire(A, 1) is None
    lim.reconfigure(NO_PER_CLIENT, max_connections=3)
    assert lim.acquire(C, 1) == Deny(
        "max_connections", "the proxy has 3 live connections (max_connections = 3)"
    )
    for ip in (A, A, B):
        lim.release(ip)
    assert lim.active == 0
    assert lim.tracked_clients == 0


def test_reconfigure_clamps_buckets_and_drops_idle_state_without_a_rate() -> None:
    lim = limiter(rate=1, burst=10)
    assert lim.acquire(A, 0) is None  # 9 tokens left
    lim.release(A)
    lim.reconfigure(Limits(per_client_connections=0, per_client_rate=1, per_client_burst=2), 1000)
    assert lim.acquire(A, 0) is None  # clamped to 2
    lim.release(A)
    assert lim.acquire(A, 0) is None
    lim.release(A)
    assert lim.acquire(A, 0) is not None
    assert lim.tracked_clients == 1
    lim.reconfigure(NO_PER_CLIENT, 1000)
    assert lim.tracked_clients == 0


# --------------------------------------------------------------------------------------------
# Model check: forgetting idle clients never changes a decision.


@attrs.define
class ReferenceLimiter:
    """The same limits with a table that never forgets anything."""

    connections: int
    rate: float
    burst: int
    max_connections: int
    active: dict[object, int] = attrs.field(factory=dict)
    buckets: dict[object, tuple[float, float]] = attrs.field(factory=dict)

    def acquire(self, key: object, now: float) -> str | None:
        if sum(self.active.values()) >= self.max_connections:
            return "max_connections"
        if self.connections and self.active.get(key, 0) >= self.connections:
            return "too_many_connections"
        if self.rate:
            capacity = float(max(self.burst, 1))
            tokens, stamp = self.buckets.get(key, (capacity, now))
            if now > stamp:
                tokens, stamp = min(capacity, tokens + (now - stamp) * self.rate), now
            if tokens < 1:
                self.buckets[key] = (tokens, stamp)
                return "rate_limited"
            self.buckets[key] = (tokens - 1, stamp)
        self.active[key] = self.active.get(key, 0) + 1
        return None


CLIENT_ADDRESSES = [
    "192.0.2.1",
    "::ffff:192.0.2.1",
    "192.0.2.2",
    "2001:db8::1",
    "2001:db8::2",
    "2001:db8:0:1::1",
]
KEYS = {  # what the limiter counts each address as
    "192.0.2.1": "A",
    "::ffff:192.0.2.1": "A",
    "192.0.2.2": "B",
    "2001:db8::1": "N",
    "2001:db8::2": "N",
    "2001:db8:0:1::1": "M",
}

# Each step: wait, then either open a connection from an address (closing it at once unless it
# is held) or close the oldest held connection of that address's client.
operations = st.lists(
    st.tuples(
        st.sampled_from(["open", "open", "hold", "close"]),
        st.sampled_from(CLIENT_ADDRESSES),
        # Mostly no time at all, so that buckets run dry; sometimes long enough to refill.
        st.sampled_from([0, 0, 0, 0.25, 0.5, 1, 3]),
    ),
    max_size=60,
)


@given(
    st.integers(min_value=0, max_value=3),
    st.sampled_from([0, 0.5, 1, 2, 4]),
    st.integers(min_value=0, max_value=3),
    st.integers(min_value=1, max_value=6),
    operations,
)
def test_limiter_agrees_with_a_reference_that_never_forgets(
    connections: int,
    rate: float,
    burst: int,
    max_connections: int,
    ops: list[tuple[str, str, float]],
) -> None:
    limits = Limits(
        per_client_connections=connections, per_client_rate=rate, per_client_burst=burst
    )
    lim = ClientLimiter(limits, max_connections)
    ref = ReferenceLimiter(connections, rate, burst, max_connections)
    now = 0.0
    for op, address, step in ops:
        now += step
        ip = ipaddress.ip_address(address)
        key = KEYS[address]
        if op == "close":
            if ref.active.get(key, 0):
                lim.release(ip)
                ref.active[key] -= 1
        else:
            result = lim.acquire(ip, now)
            assert (None if result is None else result.reason) == ref.acquire(key, now)
            if result is None and op == "open":
                lim.release(ip)
                ref.active[key] -= 1
        assert lim.active == sum(ref.active.values())
        assert lim.active_for(ip) == ref.active.get(key, 0)
