"""Owned file descriptors for kernel objects (maps, programs, links, BTF).

Every fd the loader gets from the kernel is wrapped in an :class:`FD` at once. ``close()`` is
idempotent; an fd below 3 is moved above 2 first (libbpf's ``ensure_good_fd``), so a BPF object
never takes the place of stdin, stdout or stderr in a process that closed them.

Live fds are recorded in a registry with the place that created them, so tests can fail when a
test leaves one open (cilium's ``testmain``). An :class:`FD` that is garbage-collected without
``close()`` still closes its fd, but warns with :class:`ResourceWarning` like an unclosed file.
"""

from __future__ import annotations

import fcntl
import os
import threading
import traceback
import warnings
from types import TracebackType
from typing import Self

__all__ = ["FD", "live_fds"]

_lock = threading.Lock()
_registry: dict[int, str] = {}


def live_fds() -> dict[int, str]:
    """Return ``{fd: "kind created at file:line"}`` for every fd the loader still owns."""
    with _lock:
        return dict(_registry)


def _creation_site() -> str:
    # The innermost frame outside this package is the caller that asked for the object.
    for frame in reversed(traceback.extract_stack(limit=12)[:-2]):
        if "/trio_sni_loader/" not in frame.filename:
            return f"{frame.filename}:{frame.lineno}"
    return "trio_sni_loader"


class FD:
    """An owned file descriptor.

    Args:
        raw: the fd returned by the kernel; ownership passes to this object.
        kind: what it refers to ("map", "prog", "link", "btf"), for leak reports.
    """

    __slots__ = ("_fd", "kind")

    def __init__(self, raw: int, kind: str = "bpf") -> None:
        if raw < 0:
            raise ValueError(f"invalid fd {raw}")
        if raw < 3:
            # A closed stdin/stdout/stderr slot: move the object out of it.
            new = fcntl.fcntl(raw, fcntl.F_DUPFD_CLOEXEC, 3)
            os.close(raw)
            raw = new
        self._fd = raw
        self.kind = kind
        with _lock:
            _registry[raw] = f"{kind} created at {_creation_site()}"

    @property
    def closed(self) -> bool:
        return self._fd < 0

    @property
    def raw(self) -> int:
        """The fd number; raises ``ValueError`` once closed."""
        if self._fd < 0:
            raise ValueError(f"{self.kind} fd is closed")
        return self._fd

    def fileno(self) -> int:
        return self.raw

    def close(self) -> None:
        """Close the fd. Calling it again does nothing."""
        fd, self._fd = self._fd, -1
        if fd < 0:
            return
        with _lock:
            _registry.pop(fd, None)
        os.close(fd)

    def disown(self) -> int:
        """Give up ownership and return the raw fd (the caller must close it)."""
        fd = self.raw
        self._fd = -1
        with _lock:
            _registry.pop(fd, None)
        return fd

    def dup(self) -> FD:
        return FD(fcntl.fcntl(self.raw, fcntl.F_DUPFD_CLOEXEC, 3), self.kind)

    def __enter__(self) -> FD:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            fd = self._fd
            self.close()
            warnings.warn(f"unclosed {self.kind} fd {fd}", ResourceWarning, stacklevel=1)

    def __repr__(self) -> str:
        state = "closed" if self._fd < 0 else str(self._fd)
        return f"<FD {self.kind} {state}>"


class ClosesOnExit:
    """``with obj:`` closes ``obj`` on exit; for every owner of a kernel object."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
