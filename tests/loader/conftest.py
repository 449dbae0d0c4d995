"""Fixtures for the loader's tests: the fd-leak check, test objects, bpftool, bpffs, veth."""

from __future__ import annotations

import contextlib
import json
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio_sni_loader as loader
from proxytest import loader_fds_opened_since

DATA = Path(__file__).resolve().parent.parent / "data" / "bpf"
PREBUILT = Path(__file__).resolve().parents[2] / "prebuilt"


@pytest.fixture(autouse=True)
def no_fd_leaks() -> Iterator[None]:
    """Fail the test if it leaves a loader-owned fd open (cilium's testmain)."""
    before = loader.live_fds()
    yield
    leaked = loader_fds_opened_since(before)
    assert not leaked, f"leaked fds: {leaked}"


@pytest.fixture
def data() -> Path:
    return DATA


def bpftool(*args: str) -> object:
    """Run ``bpftool -j ARGS`` (the independent witness) and parse its JSON."""
    out = subprocess.run(["bpftool", "-j", *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout or "null")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def veth() -> Iterator[str]:
    """A veth whose peer lives in a namespace the test creates; both deleted afterwards.

    Yields the name of the end in our namespace (native XDP and TCX work on it).
    """
    tag = uuid.uuid4().hex[:6]
    ns, here, there = f"ldt-{tag}", f"ldt{tag}a", f"ldt{tag}b"
    _ip("netns", "add", ns)
    try:
        _ip("link", "add", here, "type", "veth", "peer", "name", there, "netns", ns)
        _ip("link", "set", here, "up")
        _ip("-n", ns, "link", "set", there, "up")
        yield here
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            _ip("link", "del", here)
        _ip("netns", "del", ns)
