"""Programs: load a :class:`~loader.spec.ProgramSpec` into the kernel, test-run it.

Loading resolves the spec's map references to fds, passes BTF func/line info when the
collection's BTF is loaded, and first tries without a verifier log (fast). If the kernel
refuses, it loads again with a log, growing the buffer until the whole log fits (from
``log_true_size`` on 6.4+, by doubling before), and raises :class:`VerifierError` with it.
"""

from __future__ import annotations

import errno
import re
import struct
from collections.abc import Mapping
from typing import Any

import attrs

from . import asm
from ._sys import bpf
from ._sys.bpf import ProgramInfo
from ._sys.consts import ProgType
from ._sys.fd import FD, ClosesOnExit
from .errors import BPFSyscallError, LicenseError, LoaderError, NotSupportedError, VerifierError
from .maps import Map
from .spec import ProgramSpec

__all__ = ["Program", "ProgramInfo", "TestRunResult"]

#: First verifier-log buffer (cilium starts at 64 KiB too).
LOG_SIZE_START = 64 * 1024
#: The kernel refuses log buffers above UINT_MAX >> 2 (1 GiB - 1).
LOG_SIZE_MAX = (1 << 30) - 1


@attrs.frozen
class TestRunResult:
    """What ``BPF_PROG_TEST_RUN`` returned: the verdict, the packet after the run, the time."""

    __test__ = False  # not a pytest test class

    retval: int
    data: bytes
    duration_ns: int


class Program(ClosesOnExit):
    """A loaded program. ``with Program.load(spec, maps=...) as prog:``; close is idempotent."""

    def __init__(self, fd: FD, spec: ProgramSpec) -> None:
        self._fd = fd
        self.spec = spec

    @classmethod
    def load(
        cls,
        spec: ProgramSpec,
        *,
        maps: Mapping[str, Map] | None = None,
        btf_fd: FD | None = None,
        func_info_rec_size: int = 8,
        line_info_rec_size: int = 16,
        core_relo_rec_size: int = 16,
        log_level: int = 0,
        log_size: int = LOG_SIZE_START,
    ) -> Program:
        """Load ``spec``.

        Args:
            maps: the loaded maps, by name, that the program refers to.
            btf_fd: the object's BTF; enables func/line info (source lines in verifier logs)
                and is required for CO-RE relocations (the kernel applies them).
            log_level: 0 logs only on failure; 1 or 2 always log (``program.log``).

        Raises:
            VerifierError: the verifier rejected the program (with its log).
            NotSupportedError: the kernel does not know the program type.
            MissingPrivilegeError: CAP_BPF (and CAP_NET_ADMIN for networking types) missing.
        """
        if spec.type == ProgType.UNSPEC:
            raise LoaderError(
                f"program {spec.name!r}: cannot tell its type from section {spec.section!r} "
                "(use a libbpf section name such as xdp, tc, tcx/ingress, sk_skb/stream_verdict)"
            )
        if spec.core_relos and btf_fd is None:
            raise LoaderError(
                f"program {spec.name!r} has CO-RE relocations: load it with its object's BTF"
            )
        insns = _resolve(spec, maps or {})
        kwargs: dict[str, Any] = {
            "name": spec.name,
            "expected_attach_type": spec.expected_attach_type,
            "prog_flags": spec.flags,
        }
        if btf_fd is not None and spec.func_info:
            kwargs.update(
                btf_fd=btf_fd.raw,
                func_info=_pack(spec.func_info, "<II", func_info_rec_size),
                func_info_rec_size=func_info_rec_size,
                line_info=_pack(spec.line_info, "<IIII", line_info_rec_size),
                line_info_rec_size=line_info_rec_size,
            )
        if spec.core_relos and btf_fd is not None:  # (checked above)
            kwargs.update(
                btf_fd=btf_fd.raw,
                core_relos=_pack(spec.core_relos, "<IIII", core_relo_rec_size),
                core_relo_rec_size=core_relo_rec_size,
            )
        license = spec.license  # as the object says; "" (none) is not GPL-compatible
        if log_level == 0:
            try:
                fd = bpf.prog_load(spec.type, insns, license, **kwargs)
            except BPFSyscallError as exc:
                if exc.errno in (errno.EPERM, errno.EAGAIN):
                    raise
            else:
                prog = cls(fd, spec)
                prog.log = ""
                return prog
        size = max(log_size, 256)
        while True:
            log = bpf.VerifierLog(size, level=max(log_level, 1))
            try:
                fd = bpf.prog_load(spec.type, insns, license, log=log, **kwargs)
            except BPFSyscallError as exc:
                refusal = exc
            else:
                prog = cls(fd, spec)
                prog.log = log.text()
                return prog
            truncated = refusal.errno == errno.ENOSPC or log.true_size > size
            if truncated and size < LOG_SIZE_MAX:
                size = min(max(log.true_size + 1, size * 2), LOG_SIZE_MAX)
                continue
            break
        if refusal.errno == errno.EPERM:
            raise refusal
        text = log.text()
        if refusal.errno == errno.EINVAL and not text.strip():
            from .features import have_prog_type

            try:
                have_prog_type(spec.type)
            except NotSupportedError:
                raise
        lines = text.splitlines()
        if any(GPL_REFUSAL in line for line in lines):
            raise LicenseError(
                spec.name, refusal.errno, lines, helper=_refused_helper(lines), license=license
            )
        raise VerifierError(spec.name, refusal.errno, lines, truncated=truncated)

    log: str = ""

    @property
    def fd(self) -> int:
        return self._fd.raw

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def closed(self) -> bool:
        return self._fd.closed

    def close(self) -> None:
        self._fd.close()

    def __repr__(self) -> str:
        return f"<Program {self.spec.name!r} {self.spec.type.name} fd={self._fd!r}>"

    def info(self) -> ProgramInfo:
        return bpf.prog_info(self.fd)

    def pin(self, path: str) -> None:
        import os

        from .maps import ensure_bpffs

        ensure_bpffs(os.path.dirname(path))
        bpf.obj_pin(self.fd, path)

    def test_run(self, data: bytes, *, repeat: int = 1, ctx: bytes = b"") -> TestRunResult:
        """Run the program once (or ``repeat`` times) on ``data`` (``BPF_PROG_TEST_RUN``).

        XDP and TC programs need at least an Ethernet header (14 bytes). sk_skb programs
        cannot be test-run; exercise them with real sockets.
        """
        if self.spec.type in (ProgType.SK_SKB, ProgType.SK_MSG):
            raise NotSupportedError(
                f"BPF_PROG_TEST_RUN for {self.spec.type.name}",
                "never",
                "test it with real sockets instead",
            )
        retval, out, duration = bpf.prog_test_run(self.fd, data, repeat=repeat, ctx=ctx)
        return TestRunResult(retval=retval, data=out, duration_ns=duration)


def _resolve(spec: ProgramSpec, maps: Mapping[str, Map]) -> bytes:
    insns = bytearray(spec.instructions)
    for ref in spec.references:
        m = maps.get(ref.map)
        if m is None:
            raise LoaderError(f"program {spec.name!r} uses map {ref.map!r}, which is not loaded")
        if ref.kind == "map":
            asm.patch_map_fd(insns, ref.insn, m.fd)
        else:
            asm.patch_map_value(insns, ref.insn, m.fd, ref.offset)
    return bytes(insns)


def _pack(records: tuple[tuple[int, ...], ...], fmt: str, rec_size: int) -> bytes:
    base = struct.calcsize(fmt)
    pad = bytes(rec_size - base)
    return b"".join(struct.pack(fmt, *rec) + pad for rec in records)


#: What the verifier says when a non-GPL program calls a GPL-only helper.
GPL_REFUSAL = "cannot call GPL-restricted function from non-GPL compatible program"


def _refused_helper(lines: list[str]) -> str:
    """The helper of the last ``call NAME#N`` instruction before the GPL refusal."""
    helper = ""
    for line in lines:
        if GPL_REFUSAL in line:
            break
        match = re.search(r"\bcall (\w+#\d+)", line)
        if match:
            helper = match[1]
    return helper
