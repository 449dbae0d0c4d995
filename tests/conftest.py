"""Shared fixtures and the rules for privileged tests.

Tests that need root and a BPF-capable kernel carry ``@pytest.mark.bpf`` (or ``root`` for
network namespaces). They skip where the privilege is missing, but with
``TRIO_SNI_REQUIRE_BPF=1`` (set by ``.ci/run`` when it runs as root on Linux) a skip of such a
test is turned into a failure, so CI cannot go green by skipping the kernel tests.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator

import pytest
import trio
import trio_sni_loader as loader
from dnsserver import DNSServer

from trio_sni.accel import dns_cache

REQUIRE_BPF = os.environ.get("TRIO_SNI_REQUIRE_BPF") == "1"
PRIVILEGED_MARKERS = ("bpf", "root")


def have_root_on_linux() -> bool:
    return sys.platform == "linux" and os.geteuid() == 0


def pytest_runtest_setup(item: pytest.Item) -> None:
    for name in PRIVILEGED_MARKERS:
        if item.get_closest_marker(name) is not None and not have_root_on_linux():
            pytest.skip(f"needs root on Linux (marker {name!r})")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    report = yield
    privileged = any(item.get_closest_marker(n) is not None for n in PRIVILEGED_MARKERS)
    if REQUIRE_BPF and privileged and report.skipped:
        report.outcome = "failed"
        report.longrepr = (
            f"{item.nodeid}: a privileged test was skipped but TRIO_SNI_REQUIRE_BPF=1 "
            f"(skip reason: {report.longrepr})"
        )
    return report


@pytest.fixture
async def dns_server(nursery: trio.Nursery) -> DNSServer:
    """A real DNS server on 127.0.0.1 (UDP and TCP, one random port), empty zone.

    Add records with ``dns_server.add(name, type, value, ttl=...)``, point a resolver at it
    with ``dns_server.resolver_settings(**overrides)`` or ``dns_server.nameserver``, and count
    queries with ``dns_server.query_count(name, type)``. It stops with the test's nursery.
    """
    server: DNSServer = await nursery.start(DNSServer().serve)
    return server


@pytest.fixture
def pin_dir() -> Iterator[str]:
    """A unique directory on the bpffs (mounted if missing), removed with its pins afterwards."""
    loader.ensure_bpffs(loader.DEFAULT_PIN_ROOT)
    path = tempfile.mkdtemp(prefix="trio-sni-test-", dir=loader.DEFAULT_PIN_ROOT)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(autouse=True)
def private_dns_cache_pins(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A proxy in this process that would pin the shared DNS cache at the host's default path
    pins it in a directory of this test instead (removed afterwards), so tests neither share
    answers with each other nor leave maps on the host."""
    opened: list[str] = []
    real_open = dns_cache.SharedDnsCache.open

    def open_private(pin_path: str = dns_cache.DEFAULT_PIN_PATH, *args, **kwargs):  # type: ignore[no-untyped-def]
        if pin_path == dns_cache.DEFAULT_PIN_PATH and have_root_on_linux():
            loader.ensure_bpffs(loader.DEFAULT_PIN_ROOT)
            pin_path = tempfile.mkdtemp(prefix="trio-sni-test-", dir=loader.DEFAULT_PIN_ROOT)
            opened.append(pin_path)
        return real_open(pin_path, *args, **kwargs)

    monkeypatch.setattr(dns_cache.SharedDnsCache, "open", open_private)
    yield
    for path in opened:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(autouse=True, scope="session")
def no_dns_cache_left_at_the_default_path() -> Iterator[None]:
    """Proxy subprocesses (``python -m trio_sni``) pin the shared DNS cache at the default
    path; remove it at the end of the session unless it was there before."""
    existed = os.path.exists(dns_cache.DEFAULT_PIN_PATH)
    yield
    if not existed and have_root_on_linux():
        shutil.rmtree(dns_cache.DEFAULT_PIN_PATH, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.rmdir(os.path.dirname(dns_cache.DEFAULT_PIN_PATH))  # only if empty
