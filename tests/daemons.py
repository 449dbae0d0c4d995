"""Real third-party servers (dante, haproxy, nginx) for end-to-end tests, started and reaped.

Each daemon runs in the foreground in its own session (process group), bound to 127.0.0.1 on a
port picked by the test, with a config generated into the test's tmp dir. ``running_daemon``
waits until the port accepts connections and, whatever happens, sends SIGTERM to the daemon
and then SIGKILL to whatever is left of its process group (the group id is the pid of the
process started here) after a few seconds, so no daemon or worker outlives its test.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

#: How long a daemon may take to start listening; dante and haproxy take ~0.1 s here.
STARTUP_TIMEOUT = 10.0
#: How long a daemon gets to exit after SIGTERM before it is killed.
STOP_TIMEOUT = 5.0


def free_port() -> int:
    """A loopback TCP port that was free a moment ago (the daemon binds it right after)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


#: Set by .ci/run, which installs every daemon: there a missing one fails instead of skipping.
IN_CI = os.environ.get("TRIO_SNI_REQUIRE_BPF") == "1"


def require(program: str) -> str:
    """The program's path; skip if it is missing (fail in CI, which installs it)."""
    path = shutil.which(program) or next(
        (p for p in (f"/usr/sbin/{program}", f"/sbin/{program}") if os.path.exists(p)), None
    )
    if path is None:
        message = f"{program} is not installed (see .ci/run's apt line)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


def _wait_listening(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while True:
        if proc.poll() is not None:
            raise RuntimeError(
                f"{proc.args!r} exited with {proc.returncode} before listening on {port}:\n"
                + log.read_text("utf-8", "replace")
            )
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{proc.args!r} did not listen on {port} within {STARTUP_TIMEOUT} s:\n"
                    + log.read_text("utf-8", "replace")
                ) from None
            time.sleep(0.02)


@contextmanager
def running_daemon(argv: list[str], *, port: int, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Start ``argv`` (stdout and stderr to ``log``), wait for ``port``, stop it at the end."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait_listening(port, proc, log)
        yield proc
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the leader, which stops and reaps its own workers; then kill any stragglers.

    Only the leader gets SIGTERM: killing the workers first would leave them as zombies for
    an init that may never reap them. Whatever is left of the group afterwards gets SIGKILL.
    """
    try:
        proc.terminate()
        proc.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + STOP_TIMEOUT
    while True:
        try:
            os.killpg(proc.pid, 0)  # anyone left in the group this test started?
        except ProcessLookupError:
            return
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            return
        time.sleep(0.02)
