"""The TC shaper end to end: a real proxy, clients in a network namespace, downloads measured.

The proxy listens on the host end of a veth pair (``tests/netns.py``) with the shaper on that
interface's egress; the clients connect from the namespace; the backend is on loopback and
sends a fixed random payload after the ClientHello. Rates are checked with generous bounds
(the machine is shared); ``bench/bench_tc.py`` prints the measured numbers.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import time
from collections.abc import Callable
from typing import Any

import pytest
import trio
import trio_sni_loader as loader
from netns import VethNamespace, veth_namespace
from prometheus_client import generate_latest
from proxytest import client_hello, drain, receive_exactly, serve_tcp, wait_for

from trio_sni.accel import TcShaper
from trio_sni.features import TcFeature
from trio_sni.sansio.config_load import load_config
from trio_sni.server import Proxy

pytestmark = pytest.mark.bpf

MiB = 1024 * 1024
#: The per-client cap under test: small, so a few seconds are enough to measure it.
RATE = 20_000_000
#: 8 MiB at 20 Mbit/s: about 3.4 s.
CAPPED_SIZE = 8 * MiB
PAYLOAD = os.urandom(CAPPED_SIZE)
DIGEST = hashlib.sha256(PAYLOAD).hexdigest()
NAMES = {"capped.test": "normal", "fast.test": "high", "bulk.test": "bulk"}


@pytest.fixture
def ns() -> Any:
    with veth_namespace(0) as namespace:
        yield namespace


async def send_payload(stream: trio.SocketStream) -> None:
    """The backend: read the ClientHello record, send the payload, close."""
    try:
        header = await receive_exactly(stream, 5)
        await receive_exactly(stream, int.from_bytes(header[3:5], "big"))
        await stream.send_all(PAYLOAD)
    except trio.BrokenResourceError:
        pass
    finally:
        await trio.aclose_forcefully(stream)


@pytest.fixture
async def backend_port(nursery: trio.Nursery) -> int:
    return await serve_tcp(nursery, send_payload)


def tc_config(ns: VethNamespace, backend_port: int, **tc: Any) -> dict[str, Any]:
    return {
        "listeners": [
            {"host": ns.host_v4, "port": 0, "target_port": backend_port},
            {"host": ns.host_v6, "port": 0, "target_port": backend_port},
        ],
        "rules": [
            {"match": name, "allow_private": True, "qos": qos} for name, qos in NAMES.items()
        ],
        "resolver": {"hosts": {name: ["127.0.0.1"] for name in NAMES}},
        "ebpf": {
            "sockmap": {"enabled": False},
            "tc": {"enabled": True, "interface": ns.host_if, "per_client_bps": RATE, **tc},
        },
        "log": {"access_log": None},
    }


def forwarding(config: dict[str, Any], mode: str) -> dict[str, Any]:
    """``config`` forwarding in ``mode`` only (no fallback). Kernel mode without the in-flight
    bound: every byte toward the client is then sent by the sockhash redirect worker."""
    config["ebpf"]["sockmap"] = {"enabled": mode == "kernel", "max_in_flight": 1 << 40}
    config["forwarding"] = {"mode": mode}
    config["fallback_mode"] = "none"
    return config


def listen_port(proxy: Proxy, family: int) -> int:
    port: int = next(
        lst.socket.getsockname()[1] for lst in proxy.listeners if lst.socket.family == family
    )
    return port


async def download(ns: VethNamespace, proxy: Proxy, name: str, family: int) -> float:
    """Fetch the payload through the proxy from the namespace; returns the rate in bit/s."""
    sock = trio.socket.from_stdlib_socket(ns.socket(family))
    host = ns.host_v4 if family == socket.AF_INET else ns.host_v6
    await sock.connect((host, listen_port(proxy, family)))
    stream = trio.SocketStream(sock)
    async with stream:
        await stream.send_all(client_hello(name))
        started = time.monotonic()
        data = await drain(stream)
        elapsed = time.monotonic() - started
    assert len(data) == len(PAYLOAD)
    assert hashlib.sha256(data).hexdigest() == DIGEST
    return len(data) * 8 / elapsed


def tc_counters(proxy: Proxy) -> dict[str, int]:
    return {k: v for k, v in proxy.acceleration_status().counters.items() if k.startswith("tc_")}


def shaper_of(proxy: Proxy) -> TcShaper:
    """The proxy's running TC shaper."""
    [feature] = [f for f in proxy.features if isinstance(f, TcFeature)]
    assert feature.shaper is not None
    return feature.shaper


def attached_link(proxy: Proxy, ns: VethNamespace) -> int:
    """The id of the shaper's TCX link, checked to be on the egress of the host end."""
    link = shaper_of(proxy).link
    assert link is not None
    info = link.info()
    assert (info.target, info.attach_type) == (
        socket.if_nametoindex(ns.host_if),
        loader.AttachType.TCX_EGRESS,
    )
    assert info.id in link_ids()
    return info.id


def link_ids() -> set[int]:
    """Every BPF link on the machine, as bpftool (the independent witness) lists them."""
    out = subprocess.run(
        ["bpftool", "-j", "link", "show"], check=True, capture_output=True, text=True
    ).stdout
    return {link["id"] for link in json.loads(out or "[]")}


@pytest.mark.parametrize("mode", ["copy", "splice", "kernel"])
async def test_the_cap_holds_for_a_normal_client_while_high_runs_free(
    ns: VethNamespace, backend_port: int, start_proxy: Callable[..., Any], mode: str
) -> None:
    running = await start_proxy(forwarding(tc_config(ns, backend_port), mode))
    proxy: Proxy = running.proxy
    rates: dict[str, float] = {}

    async def fetch(name: str) -> None:
        rates[name] = await download(ns, proxy, name, socket.AF_INET)

    with trio.fail_after(15):
        # The proxy's first connection pays one-time costs (lazy imports, first connect) that
        # would weigh on the short uncapped download: warm it up first.
        await download(ns, proxy, "fast.test", socket.AF_INET)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fetch, "capped.test")
            nursery.start_soon(fetch, "fast.test")  # the same client address, class high
    assert 0.5 * RATE <= rates["capped.test"] <= 1.5 * RATE, rates
    assert rates["fast.test"] > 3 * RATE, rates
    counters = tc_counters(proxy)
    # TCP made up for the drops (the payload arrived intact above).
    assert counters["tc_packets_dropped_normal"] > 0, counters
    assert counters["tc_bytes_passed_normal"] >= CAPPED_SIZE
    assert counters["tc_bytes_passed_high"] >= 2 * CAPPED_SIZE
    assert counters["tc_packets_dropped_high"] == 0
    status = proxy.acceleration_status()
    assert status.features["tc"] == "active"
    assert status.maps["tc_buckets"].entries == 1  # one client, one capped class
    metrics = generate_latest(proxy.metrics.registry).decode()
    assert 'trio_sni_ebpf_tc_packets_total{class="normal",verdict="dropped"}' in metrics


async def test_the_cap_holds_over_ipv6_and_a_reload_exempts_the_client_live(
    ns: VethNamespace, backend_port: int, start_proxy: Callable[..., Any]
) -> None:
    running = await start_proxy(tc_config(ns, backend_port))
    proxy: Proxy = running.proxy
    link = attached_link(proxy, ns)
    with trio.fail_after(15):
        capped = await download(ns, proxy, "capped.test", socket.AF_INET6)
        assert 0.5 * RATE <= capped <= 1.5 * RATE
        proxy.reload(load_config(tc_config(ns, backend_port, exempt=[f"{ns.peer_v6}/128"])))
        exempt = await download(ns, proxy, "capped.test", socket.AF_INET6)
    assert exempt > 3 * RATE, (capped, exempt)
    assert attached_link(proxy, ns) == link  # the same link: updated, not re-attached
    assert tc_counters(proxy)["tc_bytes_passed_exempt"] >= CAPPED_SIZE


@pytest.mark.parametrize("mode", ["copy", "splice", "kernel"])
async def test_the_class_is_on_the_packets_in_every_forwarding_mode(
    ns: VethNamespace, backend_port: int, start_proxy: Callable[..., Any], mode: str
) -> None:
    config = tc_config(ns, backend_port, bulk_bps=0)  # uncapped bulk: only the class counts
    running = await start_proxy(forwarding(config, mode))
    with trio.fail_after(15):
        await download(ns, running.proxy, "bulk.test", socket.AF_INET)
    counters = tc_counters(running.proxy)
    assert counters["tc_bytes_passed_bulk"] >= CAPPED_SIZE, counters
    if mode == "kernel":
        kernel = running.proxy.acceleration_status().counters
        assert kernel["sockmap_bytes_to_client"] == CAPPED_SIZE, kernel
    # Only what went out before routing (SYN-ACK, ACKs of the hello) is in the normal class.
    assert counters["tc_packets_passed_normal"] <= 4, counters
    await wait_for(lambda: bool(running.access_log))  # written once the proxy closed both
    assert running.access_log[0]["mode"] == mode


async def test_the_shaper_is_detached_when_the_proxy_stops(
    ns: VethNamespace, backend_port: int
) -> None:
    proxy = Proxy(load_config(tc_config(ns, backend_port)), access_log=lambda record: None)
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.serve)
        link = attached_link(proxy, ns)
        shaper = shaper_of(proxy)
        proxy.shutdown()
    assert shaper.closed
    assert link not in link_ids()


async def test_a_kernel_without_tcx_is_named_in_the_reason(
    ns: VethNamespace,
    backend_port: int,
    start_proxy: Callable[..., Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_tcx(*args: object) -> None:
        raise loader.NotSupportedError("BPF_LINK_CREATE tcx", "6.6")

    monkeypatch.setattr(TcShaper, "start", no_tcx)
    running = await start_proxy(tc_config(ns, backend_port))
    status = running.proxy.acceleration_status()
    assert status.features["tc"] == "unavailable"
    assert status.reasons["tc"] == (
        f"attaching tc_shaper.bpf.o to {ns.host_if} failed: BPF_LINK_CREATE tcx is not "
        "supported by this kernel (needs Linux 6.6 or newer)"
    )


async def test_a_shaper_that_cannot_attach_is_reported_and_the_proxy_serves(
    ns: VethNamespace,
    backend_port: int,
    start_proxy: Callable[..., Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = tc_config(ns, backend_port)
    config["ebpf"]["tc"]["interface"] = "tsni-missing0"
    running = await start_proxy(config)
    status = running.proxy.acceleration_status()
    assert status.features["tc"] == "unavailable"
    assert "no network interface named 'tsni-missing0'" in status.reasons["tc"]
    assert [r.message for r in caplog.records if "TC shaping" in r.message] == [
        f"TC shaping unavailable: {status.reasons['tc']}"
    ]
    with trio.fail_after(15):
        await download(ns, running.proxy, "fast.test", socket.AF_INET)
