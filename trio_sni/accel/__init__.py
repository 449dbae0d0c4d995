"""Kernel acceleration: the only part of trio_sni that uses the BPF loader.

:func:`probe` says whether the kernel data plane (the BPF sockhash) can be used here, and
if not, why, in words an operator can act on. :class:`SockhashPlane` is the data plane itself;
:class:`XdpGuard` the XDP edge guard (client address lists and SYN buckets on an interface).

The sockmap gate is a version table, not a probe (STYLE rule 12's one exception): the defect it
guards against (``sk_psock_backlog`` resending from offset 0, fixed by commit 3b4f14b7 "bpf,
sockmap: fix duplicated data transmission") duplicates bytes silently and cannot be probed
safely.
"""

from __future__ import annotations

import os
import platform
import re
import sys

import attrs
import trio_sni_loader as loader
from trio_sni_loader import LoaderError as LoaderError

from .sockhash import SockhashPair as SockhashPair
from .sockhash import SockhashPlane as SockhashPlane
from .sockhash import socket_cookie as socket_cookie
from .tc import TcShaper as TcShaper
from .xdp import XdpGuard as XdpGuard

#: Stable series that got the duplicated-data fix, and the first fixed release in each.
SOCKMAP_FIXED_IN: dict[tuple[int, int], int] = {
    (5, 15): 186,
    (6, 1): 142,
    (6, 6): 94,
    (6, 12): 34,
    (6, 15): 3,
}
#: Every mainline release from here on has the fix.
SOCKMAP_FIXED_MAINLINE = (6, 16)
#: The hand-off "kick" (recv(MSG_DONTWAIT) forwards bytes queued before the insert) needs
#: 6.4+ (docs/kernel-facts.md, fact 6); without it early bytes can wait forever.
SOCKMAP_KICK_MIN = (6, 4)

CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21
CAP_PERFMON = 38
CAP_BPF = 39


def sockmap_kernel_gate(release: str) -> str | None:
    """``None`` if kernel ``release`` (``uname -r``) is safe for the sockhash, else why not."""
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", release)
    if match is None:
        return f"cannot read the kernel version from {release!r}"
    major, minor, patch = int(match[1]), int(match[2]), int(match[3] or 0)
    series = (major, minor)
    if series >= SOCKMAP_FIXED_MAINLINE:
        return None
    if series < SOCKMAP_KICK_MIN:
        return (
            f"Linux {release} is older than 6.4: recv() does not forward bytes queued before "
            "the sockhash insert (docs/kernel-facts.md, fact 6)"
        )
    fixed = SOCKMAP_FIXED_IN.get(series)
    if fixed is None:
        return (
            f"Linux {major}.{minor} never got the sockmap duplicated-data fix (commit 3b4f14b7); "
            "use 6.6.94+, 6.12.34+, 6.15.3+ or 6.16+"
        )
    if patch < fixed:
        return (
            f"Linux {release} has the sockmap duplicated-data bug; fixed in "
            f"{major}.{minor}.{fixed} (commit 3b4f14b7)"
        )
    return None


def _effective_caps() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def missing_capabilities() -> list[str]:
    """Capabilities the sockhash data plane needs and this process lacks."""
    caps = _effective_caps()
    missing = []
    if not caps & (1 << CAP_BPF | 1 << CAP_SYS_ADMIN):
        missing.append("CAP_BPF")
    if not caps & (1 << CAP_NET_ADMIN | 1 << CAP_SYS_ADMIN):
        missing.append("CAP_NET_ADMIN")
    if not caps & (1 << CAP_PERFMON | 1 << CAP_SYS_ADMIN):
        missing.append("CAP_PERFMON")  # the verdict program reads the peer's tcp_sock
    return missing


@attrs.frozen
class Acceleration:
    """What :func:`probe` found: which features can run, and why the others cannot."""

    kernel_release: str
    #: feature -> ``None`` (usable) or the reason it is not.
    reasons: dict[str, str | None]

    @property
    def sockmap(self) -> bool:
        return self.reasons.get("sockmap") is None

    def why_not(self, feature: str) -> str | None:
        return self.reasons.get(feature)


def probe() -> Acceleration:
    """Check whether the sockhash data plane can run here; never raises.

    The checks, first failure wins: Linux; the kernel version gate; CAP_BPF, CAP_NET_ADMIN
    and CAP_PERFMON; the loader's probes for SOCKHASH maps and SK_SKB programs.
    """
    release = platform.release()
    return Acceleration(kernel_release=release, reasons={"sockmap": _sockmap_reason(release)})


def _sockmap_reason(release: str) -> str | None:
    if sys.platform != "linux":
        return f"kernel forwarding needs Linux (this is {sys.platform})"
    why = sockmap_kernel_gate(release)
    if why is not None:
        return why
    missing = missing_capabilities()
    if missing:
        who = "root without them" if os.geteuid() == 0 else f"uid {os.geteuid()}"
        names = " and ".join([", ".join(missing[:-1]), missing[-1]] if missing[:-1] else missing)
        return f"missing {names} ({who})"
    try:
        loader.have_map_type(loader.MapType.SOCKHASH)
        loader.have_prog_type(loader.ProgType.SK_SKB)
    except (loader.LoaderError, OSError) as exc:
        return f"BPF probe failed: {exc}"
    return None
