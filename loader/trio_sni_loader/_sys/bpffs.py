"""The BPF filesystem (bpffs), where maps and programs are pinned: is one mounted, mount one.

Not a ``bpf()`` command, so errors are what ``mount(2)`` gives: an :class:`OSError` with its
errno and a hint.
"""

from __future__ import annotations

import errno
import os

from ._ffi import ffi, lib

__all__ = ["is_bpffs", "mount_bpffs"]

BPF_FS_TYPE = "bpf"


def is_bpffs(path: str) -> bool:
    """Whether ``path`` is the mount point of a bpffs (read from ``/proc/self/mounts``)."""
    real = os.path.realpath(path)
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[2] == BPF_FS_TYPE:
                    mnt = parts[1].replace("\\040", " ")
                    if os.path.realpath(mnt) == real:
                        return True
    except OSError:
        return False
    return False


def mount_bpffs(path: str = "/sys/fs/bpf") -> None:
    """Mount a bpffs at ``path`` (``mount -t bpf bpf path``); needs CAP_SYS_ADMIN."""
    os.makedirs(path, exist_ok=True)
    ret = lib.mount(b"bpf", os.fsencode(path), b"bpf", 0, ffi.NULL)
    if ret != 0:
        err = ffi.errno
        hint = "mounting bpffs needs CAP_SYS_ADMIN" if err == errno.EPERM else ""
        raise OSError(err, f"mount -t bpf bpf {path}: {os.strerror(err)}. {hint}".strip())
