"""Listening sockets that outlive one proxy process, and telling a service manager how it goes.

Three pieces, all of them plain syscalls on sockets and environment variables (the protocols
are systemd's, documented in ``sd_listen_fds(3)`` and ``sd_notify(3)``; docs/operations.md,
"Restarts that refuse no one"):

* :func:`take_inherited_sockets`: the listening sockets a process was started with
  (``LISTEN_FDS``: fds 3, 4, ...; systemd socket activation, or a predecessor's handover).
  The proxy serves on them instead of binding, so a client that connects meanwhile waits in
  the listen backlog instead of being refused.
* :class:`Notifier`: ``READY=1`` once the listeners serve, ``RELOADING=1`` around a SIGHUP,
  ``STOPPING=1`` at shutdown, to ``NOTIFY_SOCKET`` when it is set (``Type=notify`` units).
* :func:`hand_over`: on SIGUSR2 the proxy starts its successor (the same command line) with
  its listening sockets and waits until the successor says ``READY=1`` on a private notify
  socket; only then does it stop accepting and drain. The backlog is shared, so no client is
  refused at any moment; a successor that fails (a bad config, a crash) is reported and the
  old process keeps serving.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Mapping, MutableMapping, Sequence

import trio

log = logging.getLogger("trio_sni")

#: The first inherited fd (``SD_LISTEN_FDS_START``).
LISTEN_FDS_START = 3
#: How long a successor may take to say it is ready before the handover is given up.
SUCCESSOR_READY_TIMEOUT = 60.0


class InheritedSocketError(Exception):
    """``LISTEN_FDS`` names fds that are not listening TCP sockets."""


def take_inherited_sockets(
    environ: MutableMapping[str, str] = os.environ,
) -> list[socket.socket]:
    """The listening sockets passed with ``LISTEN_FDS`` (none if unset), and unset the
    variables so that no child of this process takes them for its own.

    ``LISTEN_PID``, when set, must be this process (systemd sets it); a predecessor's
    handover cannot know its successor's pid in advance and leaves it unset.

    Raises:
        InheritedSocketError: an fd is not open, not a TCP socket or not listening.
    """
    count = environ.pop("LISTEN_FDS", None)
    pid = environ.pop("LISTEN_PID", None)
    environ.pop("LISTEN_FDNAMES", None)
    if count is None or (pid is not None and pid != str(os.getpid())):
        return []
    try:
        fds = range(LISTEN_FDS_START, LISTEN_FDS_START + int(count))
    except ValueError:
        raise InheritedSocketError(f"LISTEN_FDS={count!r} is not a number") from None
    sockets: list[socket.socket] = []
    try:
        for fd in fds:
            try:
                sock = socket.socket(fileno=fd)
            except OSError as exc:
                raise InheritedSocketError(
                    f"LISTEN_FDS: fd {fd} is not a socket ({exc.strerror})"
                ) from None
            sockets.append(sock)
            sock.set_inheritable(False)
            listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
            if sock.type != socket.SOCK_STREAM or not listening:
                raise InheritedSocketError(
                    f"LISTEN_FDS: fd {fd} is not a listening TCP socket "
                    "(the proxy needs ListenStream= sockets)"
                )
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


#: The signals a proxy process (single, supervisor or worker) handles (see ``--help``).
HANDLED_SIGNALS = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGUSR1,
    signal.SIGUSR2,
)


def spawn_with_sockets(
    argv: Sequence[str],
    fds: Sequence[int],
    env: Mapping[str, str],
    more: Sequence[int] = (),
    blocked: Sequence[signal.Signals] = (),
) -> int:
    """Start ``argv`` with the sockets ``fds`` as its fds 3, 4, ... and ``LISTEN_FDS`` set;
    its pid. ``more``: fds to pass after the sockets (at ``3 + len(fds)``, ...), not counted
    in ``LISTEN_FDS``. ``blocked``: signals the child starts with blocked (it unblocks them
    once its handlers are in place, so a signal sent while it starts waits for them instead
    of killing it).

    posix_spawn's dup2 actions put each socket where the protocol wants it, in the child only,
    and without running Python code between fork and exec.
    """
    passed = [*fds, *more]
    # Copies above every fd the actions write to, so that no action clobbers a later source.
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, LISTEN_FDS_START + len(passed)) for fd in passed]
    try:
        actions = [(os.POSIX_SPAWN_DUP2, fd, LISTEN_FDS_START + i) for i, fd in enumerate(high)]
        child_env = {**env, "LISTEN_FDS": str(len(fds))}
        return os.posix_spawn(
            argv[0], list(argv), child_env, file_actions=actions, setsigmask=blocked
        )
    finally:
        for fd in high:
            os.close(fd)


def own_command_line() -> list[str]:
    """This process's command line, to start another like it (a successor, a worker): the
    same interpreter, its options and arguments."""
    return [sys.executable, *sys.orig_argv[1:]]


class Notifier:
    """``sd_notify``: state changes sent to the service manager's ``NOTIFY_SOCKET``, if any.

    Best effort: a manager that is gone must not stop the proxy.
    """

    def __init__(self, environ: MutableMapping[str, str] = os.environ) -> None:
        # Unset: a child must not speak for this process (a successor gets its own).
        self.address = environ.pop("NOTIFY_SOCKET", None)

    def send(self, *fields: str) -> None:
        if not self.address:
            return
        address = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        with (
            contextlib.suppress(OSError),
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock,
        ):
            sock.sendto("\n".join(fields).encode("utf-8"), address)

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def reloading(self) -> None:
        now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={now_usec}")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=draining")

    def new_main_process(self, pid: int) -> None:
        """The successor of a handover serves now (needs ``NotifyAccess=all`` to be taken)."""
        self.send(f"MAINPID={pid}", "READY=1", f"STATUS=handed over to pid {pid}")


class HandoverFailed(Exception):
    """The successor did not become ready; the old process keeps serving."""


async def hand_over(listeners: Sequence[trio.SocketListener], argv: Sequence[str]) -> int:
    """Start a successor with ``argv`` and ``listeners``; return its pid once it is ready.

    Raises:
        HandoverFailed: it exited, or did not say ``READY=1`` within
            :data:`SUCCESSOR_READY_TIMEOUT` seconds (it is then stopped with SIGTERM).
    """
    name = f"@trio-sni-handover-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as raw:
        raw.bind("\0" + name[1:])
        ready = trio.socket.from_stdlib_socket(raw)
        env = {**os.environ, "NOTIFY_SOCKET": name}
        pid = spawn_with_sockets(argv, [lst.socket.fileno() for lst in listeners], env)
        pidfd = os.pidfd_open(pid)
        try:
            outcome = await _ready_or_exited(ready, pidfd)
        finally:
            os.close(pidfd)
    if outcome == "ready":
        return pid
    if outcome == "exited":
        raise HandoverFailed(
            f"the successor (pid {pid}) exited with status {_reap(pid)} before it was "
            "ready; see its log"
        )
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    raise HandoverFailed(
        f"the successor (pid {pid}) was not ready within {SUCCESSOR_READY_TIMEOUT:g} s; stopped it"
    )


def _reap(pid: int) -> int:
    """The exit code of a child that has exited (its pidfd said so: no wait)."""
    _, status = os.waitpid(pid, os.WNOHANG)
    return os.waitstatus_to_exitcode(status)


async def _ready_or_exited(ready: trio.socket.SocketType, pidfd: int) -> str:
    """``"ready"`` (a ``READY=1`` datagram), ``"exited"`` (the pidfd), or ``"timeout"``."""
    outcome = "timeout"
    with trio.move_on_after(SUCCESSOR_READY_TIMEOUT):
        async with trio.open_nursery() as nursery:

            async def wait_ready() -> None:
                nonlocal outcome
                while "READY=1" not in (await ready.recv(4096)).decode("utf-8", "replace").split():
                    pass
                outcome = "ready"
                nursery.cancel_scope.cancel()

            async def wait_exit() -> None:
                nonlocal outcome
                await trio.lowlevel.wait_readable(pidfd)
                outcome = "exited"
                nursery.cancel_scope.cancel()

            nursery.start_soon(wait_ready)
            nursery.start_soon(wait_exit)
    return outcome
