"""A proxy at its file-descriptor limit refuses new clients at once, with a reason (issue 14).

Without that, accept() fails with EMFILE and a client waits in the listen backlog until it
gives up. The proxy runs as ``python -m trio_sni`` in a process of its own with a low
``RLIMIT_NOFILE``; the backend holds every connection open, so each proxied connection keeps
its two fds until the test ends.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import trio
from proxytest import client_hello, serve_tcp, wait_for

#: The proxy process's fd limit: Python, Trio and the listener take about 20 of them.
FD_LIMIT = 64
#: More clients than that limit can hold, so that several must be refused.
CLIENTS = 60


async def test_clients_beyond_the_fd_limit_are_refused_at_once(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    held: list[trio.SocketStream] = []

    async def hold(stream: trio.SocketStream) -> None:
        held.append(stream)
        await trio.sleep_forever()

    backend_port = await serve_tcp(nursery, hold)
    access_log = tmp_path / "access.log"
    config = {
        "workers": 1,  # one process: its log is read line by line
        "listeners": [{"host": "127.0.0.1", "port": 0, "target_port": backend_port}],
        "rules": [{"match": "bench.test", "allow_private": True}],
        "resolver": {"hosts": {"bench.test": ["127.0.0.1"]}},
        "log": {"access_log": str(access_log)},
        "ebpf": {"enabled": False},
        "forwarding": {"mode": "copy"},
        "timeouts": {"drain": 0.5},
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))

    def low_fd_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))

    proc = subprocess.Popen(  # noqa: ASYNC220 - started once; its output is read in a thread
        [sys.executable, "-m", "trio_sni", "--config", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        preexec_fn=low_fd_limit,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    clients: list[trio.SocketStream] = []
    try:
        assert proc.stdout is not None
        port = await trio.to_thread.run_sync(_listening_port, proc.stdout)
        outcomes: dict[str, int] = {"forwarded": 0, "refused": 0}
        hello = client_hello("bench.test")

        async def one(client: trio.SocketStream) -> None:
            # Forwarded (the backend holds it: nothing comes back), or refused at once: an RST
            # at accept, or a close if the proxy had an fd for it but none for its target.
            # None waits in the listen backlog.
            with trio.move_on_after(1.0):
                try:
                    await client.send_all(hello)
                    data = await client.receive_some(1)
                except trio.BrokenResourceError:
                    data = b""
                assert data == b"", "a refused client gets no bytes"
                outcomes["refused"] += 1
                return
            outcomes["forwarded"] += 1

        with trio.fail_after(20):
            for _ in range(CLIENTS):
                try:
                    clients.append(await trio.open_tcp_stream("127.0.0.1", port))
                except OSError:
                    # Refused (reset) before our connect() had seen the handshake complete.
                    outcomes["refused"] += 1
            async with trio.open_nursery() as clients_nursery:
                for client in clients:
                    clients_nursery.start_soon(one, client)
        assert outcomes["refused"] > 0
        assert outcomes["forwarded"] > 0
        assert outcomes["refused"] + outcomes["forwarded"] == CLIENTS
        await wait_for(lambda: len(held) == outcomes["forwarded"])
        await wait_for(lambda: len(_refusals(access_log)) == outcomes["refused"], timeout=10)
        refusals = _refusals(access_log)
        at_accept = [r for r in refusals if r["reason"] == "fd_limit"]
        assert at_accept, "no client was refused at accept"
        assert all(r["decision"] == "deny" and r["client"] for r in at_accept)
        for record in refusals:
            if record["reason"] == "connect_failed":
                assert "Too many open files" in str(record["error"])
    finally:
        for client in clients:
            await client.aclose()
        proc.terminate()
        output = await trio.to_thread.run_sync(lambda: proc.communicate(timeout=20)[0])
    text = output.decode()
    assert "out of file descriptors (EMFILE): refused at once" in text
    assert "Traceback" not in text
    assert "retrying in" not in text  # nobody waiting: no backoff loop, no log line every 0.1 s


def _listening_port(stdout: Any) -> int:
    for line in stdout:
        text = line.decode()
        if "listening on" in text:
            return int(text.rsplit(":", 1)[1].split()[0])
    raise AssertionError("the proxy did not start")


def _refusals(access_log: Path) -> list[dict[str, Any]]:
    """Access-log lines of clients refused for want of fds: at accept, or at connect."""
    if not access_log.exists():
        return []
    records = [json.loads(line) for line in access_log.read_text().splitlines() if line]
    return [r for r in records if r["reason"] in ("fd_limit", "connect_failed")]
