"""Attaching programs to hooks. A :class:`Link` owns the attachment: closing it detaches.

* sk_skb verdict -> sockmap/sockhash: ``BPF_PROG_ATTACH`` (works on every kernel with
  sockmap); with ``use_link=True`` a sockmap link (6.10+).
* XDP -> interface: a BPF link (5.9+), generic, native or kernel's choice. Links are detached
  when the last fd closes (also when the process exits), unlike netlink attachments.
* TC -> interface: a TCX link (6.6+), ingress or egress.

``PROG_ATTACH`` attachments have no fd of their own, so the :class:`Link` keeps duplicates of
the map and program fds and detaches with them; it does not matter whether the caller closed
the :class:`~loader.maps.Map` or :class:`~loader.programs.Program` first.
"""

from __future__ import annotations

import errno
import socket

from ._sys import bpf
from ._sys.bpf import LinkInfo
from ._sys.consts import AttachType, XDPFlag
from ._sys.fd import FD, ClosesOnExit
from .errors import BPFSyscallError, LoaderError
from .maps import Map
from .programs import Program

__all__ = ["Link", "LinkInfo", "attach_sk_skb", "attach_tcx", "attach_xdp"]


class Link(ClosesOnExit):
    """An attachment. ``close()`` (idempotent) detaches; so does leaving a ``with`` block."""

    def __init__(
        self,
        description: str,
        *,
        link_fd: FD | None = None,
        prog_fd: FD | None = None,
        target_fd: FD | None = None,
        attach_type: AttachType | None = None,
    ) -> None:
        self.description = description
        self._link_fd = link_fd
        self._prog_fd = prog_fd
        self._target_fd = target_fd
        self._attach_type = attach_type
        self._closed = False

    @property
    def fd(self) -> int | None:
        """The link fd, or ``None`` for a ``PROG_ATTACH`` attachment."""
        return self._link_fd.raw if self._link_fd is not None else None

    @property
    def closed(self) -> bool:
        return self._closed

    def info(self) -> LinkInfo:
        if self._link_fd is None:
            raise LoaderError(f"{self.description}: PROG_ATTACH attachments have no link info")
        return bpf.link_info(self._link_fd.raw)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._link_fd is not None:
                self._link_fd.close()
            elif self._target_fd is not None and self._prog_fd is not None:
                assert self._attach_type is not None
                bpf.prog_detach(self._target_fd.raw, self._prog_fd.raw, self._attach_type)
        finally:
            for fd in (self._prog_fd, self._target_fd):
                if fd is not None:
                    fd.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "attached"
        return f"<Link {self.description} {state}>"


def attach_sk_skb(
    program: Program,
    sock_map: Map,
    attach_type: AttachType | None = None,
    *,
    use_link: bool = False,
) -> Link:
    """Attach an sk_skb program to a sockmap/sockhash.

    Args:
        attach_type: ``SK_SKB_STREAM_VERDICT`` or ``SK_SKB_VERDICT`` (they exclude each
            other); defaults to the one the section name implies, else ``SK_SKB_VERDICT``.
        use_link: use a sockmap link (Linux 6.10+) instead of ``BPF_PROG_ATTACH``.
    """
    kind = attach_type or program.spec.attach_type or AttachType.SK_SKB_VERDICT
    desc = f"{program.name} -> {sock_map.name} ({AttachType(kind).name})"
    if use_link:
        return Link(desc, link_fd=_link_create("sockmap", program.fd, sock_map.fd, kind))
    prog_fd = FD(_dup(program.fd), "prog")
    try:
        map_fd = FD(_dup(sock_map.fd), "map")
    except BaseException:
        prog_fd.close()
        raise
    try:
        bpf.prog_attach(map_fd.raw, prog_fd.raw, kind)
    except BaseException:
        prog_fd.close()
        map_fd.close()
        raise
    return Link(desc, prog_fd=prog_fd, target_fd=map_fd, attach_type=AttachType(kind))


def attach_xdp(program: Program, interface: str | int, *, mode: str | None = "generic") -> Link:
    """Attach an XDP program to ``interface`` (name or ifindex) with a BPF link.

    Args:
        mode: ``"generic"`` (skb mode, works on every device including ``lo``), ``"native"``
            (driver mode: veth, most NICs) or ``None`` (native if the driver can, else generic).
    """
    flags = {None: 0, "generic": XDPFlag.SKB_MODE, "native": XDPFlag.DRV_MODE}
    if mode not in flags:
        raise ValueError(f"mode must be 'generic', 'native' or None, not {mode!r}")
    ifindex = _ifindex(interface)
    fd = _link_create("xdp", program.fd, ifindex, AttachType.XDP, int(flags[mode]))
    return Link(f"xdp {program.name} on {interface} ({mode or 'auto'})", link_fd=fd)


def attach_tcx(program: Program, interface: str | int, direction: str | None = None) -> Link:
    """Attach a SCHED_CLS program to ``interface`` with a TCX link (Linux 6.6+).

    Args:
        direction: ``"ingress"`` or ``"egress"``; defaults to the section's
            (``SEC("tcx/ingress")``).
    """
    if direction is None:
        kind = program.spec.attach_type
        if kind not in (AttachType.TCX_INGRESS, AttachType.TCX_EGRESS):
            raise ValueError(f"program {program.name}: say direction='ingress' or 'egress'")
    elif direction in ("ingress", "egress"):
        kind = AttachType.TCX_INGRESS if direction == "ingress" else AttachType.TCX_EGRESS
    else:
        raise ValueError(f"direction must be 'ingress' or 'egress', not {direction!r}")
    fd = _link_create("tcx", program.fd, _ifindex(interface), kind)
    return Link(f"tcx {program.name} on {interface} ({AttachType(kind).name})", link_fd=fd)


def _link_create(kind: str, prog_fd: int, target: int, attach: int, flags: int = 0) -> FD:
    """``BPF_LINK_CREATE``; an EINVAL from a kernel without this link type becomes
    :class:`~loader.errors.NotSupportedError` naming the kernel version that has it."""
    try:
        return bpf.link_create(prog_fd, target, AttachType(attach), flags)
    except BPFSyscallError as exc:
        if exc.errno == errno.EINVAL:
            from .features import have_link

            have_link(kind)  # raises NotSupportedError if that is the reason
        raise


def _ifindex(interface: str | int) -> int:
    if isinstance(interface, int):
        return interface
    try:
        return socket.if_nametoindex(interface)
    except OSError as exc:
        raise LoaderError(f"no network interface named {interface!r}") from exc


def _dup(fd: int) -> int:
    import fcntl

    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
