"""Network namespaces that tests create for themselves, joined to this one by a veth pair.

The test's own namespace keeps the host end (``host_if``, ``host_v4``/``host_v6``); the far end
(``peer_if``, ``peer_v4``/``peer_v6``) lives in a fresh namespace with no route out, so traffic
from there can reach only the host end. Addresses come from documentation ranges
(198.51.100.0/24, 203.0.113.0/24, 2001:db8::/32). Everything is removed on exit, also when the
test fails.

:meth:`VethNamespace.socket` makes a socket *inside* the namespace (``setns`` in a short-lived
thread changes only that thread's namespace; the socket stays there), so a test can drive a
client in the namespace from Trio in this process; :meth:`VethNamespace.call` runs any function
there (e.g. attaching a BPF program to the far end).
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import json
import os
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import attrs

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
_serial = itertools.count()
T = TypeVar("T")


def ip(
    *args: str, netns: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run ``ip ARGS`` (in ``netns`` if given)."""
    argv = ["ip", *(["-n", netns] if netns else []), *args]
    return subprocess.run(argv, check=check, capture_output=True, text=True, timeout=10)


@attrs.frozen
class VethNamespace:
    name: str
    host_if: str
    peer_if: str
    host_v4: str
    peer_v4: str
    host_v6: str
    peer_v6: str

    def run(
        self, *argv: str, timeout: float = 30, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside the namespace."""
        return subprocess.run(
            ["ip", "netns", "exec", self.name, *argv],
            check=check,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def socket(self, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM) -> socket.socket:
        """A new socket that belongs to the namespace."""
        return self.call(socket.socket, family, type)

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in a short-lived thread inside the namespace (interface names and
        indexes are the namespace's there; sockets made there stay in it)."""
        result: list[T | BaseException] = []

        def run() -> None:
            try:
                with open(f"/var/run/netns/{self.name}") as f:
                    if _libc.setns(f.fileno(), CLONE_NEWNET) != 0:
                        err = ctypes.get_errno()
                        raise OSError(err, f"setns({self.name}): {os.strerror(err)}")
                result.append(fn(*args))
            except BaseException as exc:  # handed to the caller's thread
                result.append(exc)

        thread = threading.Thread(target=run)
        thread.start()
        thread.join()
        if isinstance(result[0], BaseException):
            raise result[0]
        return result[0]


@contextlib.contextmanager
def veth_namespace(subnet: int = 0) -> Iterator[VethNamespace]:
    """A namespace joined by a veth pair; ``subnet`` 0 uses 198.51.100.0/24 and 2001:db8:0::/64,
    1 uses 203.0.113.0/24 and 2001:db8:1::/64 (two at once need different subnets)."""
    prefix4 = ("198.51.100", "203.0.113")[subnet]
    n = f"{os.getpid() % 100000}{next(_serial)}"
    ns = VethNamespace(
        name=f"tsni{n}",
        host_if=f"tsh{n}",
        peer_if=f"tsp{n}",
        host_v4=f"{prefix4}.1",
        peer_v4=f"{prefix4}.2",
        host_v6=f"2001:db8:{subnet}::1",
        peer_v6=f"2001:db8:{subnet}::2",
    )
    ip("netns", "add", ns.name)
    try:
        ip("link", "add", ns.host_if, "type", "veth", "peer", "name", ns.peer_if, "netns", ns.name)
        ip("addr", "add", f"{ns.host_v4}/24", "dev", ns.host_if)
        ip("addr", "add", f"{ns.host_v6}/64", "dev", ns.host_if, "nodad")
        ip("link", "set", ns.host_if, "up")
        ip("addr", "add", f"{ns.peer_v4}/24", "dev", ns.peer_if, netns=ns.name)
        ip("addr", "add", f"{ns.peer_v6}/64", "dev", ns.peer_if, "nodad", netns=ns.name)
        ip("link", "set", ns.peer_if, "up", netns=ns.name)
        ip("link", "set", "lo", "up", netns=ns.name)
        yield ns
    finally:
        ip("link", "del", ns.host_if, check=False)  # removes both ends
        ip("netns", "del", ns.name, check=False)


def xdp_prog_on(interface: str) -> int | None:
    """The id of the XDP program attached to ``interface`` (``ip -j link``), or None."""
    out = subprocess.run(
        ["ip", "-j", "-d", "link", "show", "dev", interface],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    xdp = json.loads(out)[0].get("xdp")
    return None if xdp is None else xdp.get("prog", {}).get("id")
