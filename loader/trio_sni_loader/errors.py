"""The loader's error family.

Every failure the loader can report is a :class:`LoaderError`. Parsing problems blame the object
file (:class:`ELFFormatError`, :class:`BTFError`); kernel problems carry the errno and say what
to do about it (:class:`PermissionError_`, :class:`NotSupportedError`); verifier rejections
carry the verifier's log (:class:`VerifierError`); pinned objects that do not match what the
caller expects list every difference (:class:`MapIncompatibleError`).
"""

from __future__ import annotations

import errno as _errno
from collections.abc import Sequence

__all__ = [
    "BPFSyscallError",
    "BTFError",
    "ELFFormatError",
    "LicenseError",
    "LoaderError",
    "MapIncompatibleError",
    "MissingPrivilegeError",
    "NotSupportedError",
    "VerifierError",
]


class LoaderError(Exception):
    """Base class of every error raised by :mod:`loader`."""


class ELFFormatError(LoaderError):
    """The object file is not an ELF file this loader understands (bad bytes, wrong machine)."""


class BTFError(ELFFormatError):
    """The ``.BTF`` or ``.BTF.ext`` section is malformed or uses something unsupported."""


class BPFSyscallError(LoaderError, OSError):
    """A ``bpf()`` command failed.

    It is also an :class:`OSError` with the kernel's ``errno``, so ``except OSError`` and
    ``exc.errno == errno.ENOENT`` keep working. ``command`` names the ``bpf()`` command.
    """

    errno: int  # always the kernel's errno, never None as OSError allows

    def __init__(self, err: int, command: str, hint: str = "") -> None:
        self.command = command
        self.hint = hint
        text = f"{command}: {_errno.errorcode.get(err, str(err))} ({_os_strerror(err)})"
        if hint:
            text += f": {hint}"
        OSError.__init__(self, err, text)

    def __str__(self) -> str:
        return str(self.strerror)


class MissingPrivilegeError(BPFSyscallError, PermissionError):
    """``EPERM``: the process lacks a capability (the message names which one)."""


class NotSupportedError(LoaderError):
    """The running kernel lacks a feature.

    Attributes:
        feature: what is missing, e.g. ``"BPF_MAP_TYPE_SOCKHASH"``.
        min_kernel: the first mainline kernel that has it, e.g. ``"4.18"``.
    """

    def __init__(self, feature: str, min_kernel: str, detail: str = "") -> None:
        self.feature = feature
        self.min_kernel = min_kernel
        self.detail = detail
        text = f"{feature} is not supported by this kernel (needs Linux {min_kernel} or newer)"
        if detail:
            text += f": {detail}"
        super().__init__(text)


class VerifierError(LoaderError):
    """The kernel's verifier rejected a program.

    Attributes:
        program: the program's name.
        errno: the errno of ``BPF_PROG_LOAD``.
        log: the verifier log, one string per line. With BTF line info the log interleaves
            ``; source line`` comments, so the failing C line is visible.
        truncated: the kernel had more log than the buffer (only the tail is kept since 6.4).
    """

    def __init__(
        self, program: str, err: int, log: Sequence[str], *, truncated: bool = False
    ) -> None:
        self.program = program
        self.errno = err
        self.log = list(log)
        self.truncated = truncated
        #: The object file the program came from, when known (set by ``Collection.load``).
        self.object = ""
        super().__init__(program, err)

    def __str__(self) -> str:
        name = _errno.errorcode.get(self.errno, str(self.errno))
        tail = [line for line in self.log if line.strip()][-20:]
        source = f" of {self.object}" if self.object else ""
        head = f"verifier rejected program {self.program!r}{source} ({name})"
        if self.truncated:
            head += " [log truncated]"
        if not tail:
            return head
        return head + ":\n" + "\n".join("  " + line for line in tail)


class LicenseError(VerifierError):
    """The verifier refused a program that calls a GPL-only helper because its object's
    licence is not GPL-compatible (the loader passes the object's licence as it is, never
    another one).

    Attributes:
        helper: the helper's name and number as the verifier wrote them (``bpf_trace_printk#6``),
            or ``""`` if the log did not say.
        license: the object's licence (``""``: the object has none).
    """

    def __init__(
        self, program: str, err: int, log: Sequence[str], *, helper: str, license: str
    ) -> None:
        super().__init__(program, err, log)
        self.helper = helper
        self.license = license

    def __str__(self) -> str:
        source = f" of {self.object}" if self.object else ""
        licence = f"its licence is {self.license!r}" if self.license else "it has no licence"
        what = f"the GPL-only helper {self.helper}" if self.helper else "a GPL-only helper"
        return (
            f"program {self.program!r}{source} calls {what}, but {licence}: the kernel "
            "allows GPL-only helpers to GPL-compatible programs only (give the object a "
            'SEC("license") of "GPL", or call other helpers)'
        )


class MapIncompatibleError(LoaderError):
    """A pinned map does not match the spec; ``differences`` lists every mismatch."""

    def __init__(self, name: str, path: str, differences: Sequence[str]) -> None:
        self.name = name
        self.path = path
        self.differences = list(differences)
        super().__init__(
            f"pinned map {path} is incompatible with map {name!r}: " + ", ".join(differences)
        )


def _os_strerror(err: int) -> str:
    import os

    try:
        return os.strerror(err)
    except ValueError:  # pragma: no cover - unknown errno
        return "unknown error"
