"""``python -m trio_sni status`` against a real proxy subprocess with ``status.listen`` set.

Traffic here is plain TCP (no TLS backend needed): a client that is not TLS (refused as
``not_tls``) and one that has sent half a ClientHello and waits (a live connection). Every
subprocess and socket is closed when its test ends, and the fd check below holds the suite to
that; waits are bounded.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

#: Bound on every wait in this suite; a healthy run needs a fraction of it.
TIMEOUT = 15.0
#: The start of a TLS ClientHello record: the proxy waits for the rest (a live connection).
HALF_HELLO = bytes.fromhex("160301")


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


@pytest.fixture(autouse=True)
def no_fd_leaks() -> Iterator[None]:
    before = open_fds()
    yield
    leaked = {fd for fd in open_fds() - before if os.path.exists(f"/proc/self/fd/{fd}")}
    assert not leaked, f"fds left open: {sorted(leaked)}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trio_sni", *args],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def wait_until(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {TIMEOUT:g} s waiting for {what}")
        time.sleep(0.02)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A proxy subprocess with a listener and the status endpoint on free loopback ports."""
    process: subprocess.Popen[bytes] | None = None
    log_path = tmp_path / "proxy.stderr"
    try:
        for _attempt in range(3):
            port, status_port = free_port(), free_port()
            config = {
                "listeners": [{"host": "127.0.0.1", "port": port, "name": "local"}],
                "rules": [{"suffix": "bench.test", "allow_private": True}],
                "resolver": {"hosts": {"bench.test": ["127.0.0.1"]}},
                "status": {"listen": f"127.0.0.1:{status_port}"},
                "log": {"level": "info", "access_log": "stderr"},
            }
            config_path = tmp_path / "trio-sni.json"
            config_path.write_text(json.dumps(config), "utf-8")
            with open(log_path, "wb") as log:
                process = subprocess.Popen(
                    [sys.executable, "-m", "trio_sni", "--config", str(config_path)],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=log,
                )

            def started(proc: subprocess.Popen[bytes] = process, port: int = port) -> bool:
                text = log_path.read_text("utf-8", errors="replace")
                return f"listening on 127.0.0.1:{port}" in text or proc.poll() is not None

            wait_until(started, "the proxy to start")
            if process.poll() is None:
                break
            if "Address already in use" not in log_path.read_text("utf-8"):
                raise AssertionError(log_path.read_text("utf-8"))
        else:
            raise AssertionError("no free ports after three attempts")
        yield {
            "port": port,
            "url": f"http://127.0.0.1:{status_port}",
            "log": log_path,
            "process": process,
        }
    finally:
        if process is not None:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(TIMEOUT)
            if process.poll() is None:
                process.kill()
                process.wait(TIMEOUT)


def access_records(log: Path) -> list[dict[str, Any]]:
    return [
        json.loads(line) for line in log.read_text("utf-8").splitlines() if line.startswith("{")
    ]


def test_status_help_documents_the_url_option() -> None:
    result = run_cli("status", "--help")
    assert result.returncode == 0, result.stderr
    assert "--url" in result.stdout
    assert "http://127.0.0.1:9090" in result.stdout
    assert '"status": {"listen": "127.0.0.1:9090"}' in result.stdout
    top = run_cli("--help")
    assert "status" in top.stdout
    assert "python -m trio_sni status --url http://127.0.0.1:9090" in top.stdout


def test_status_prints_tables_of_a_running_proxy(served: dict[str, Any]) -> None:
    # A client that does not speak TLS: refused and logged as not_tls.
    with socket.create_connection(("127.0.0.1", served["port"]), timeout=5) as plain:
        plain.sendall(b"GET / HTTP/1.1\r\n\r\n")
        assert plain.recv(100) == b""
    wait_until(lambda: len(access_records(served["log"])) == 1, "the not_tls record")

    # A client in the middle of its ClientHello: live, no SNI yet.
    with socket.create_connection(("127.0.0.1", served["port"]), timeout=5) as waiting:
        waiting.sendall(HALF_HELLO)
        result = run_cli("status", "--url", served["url"])
        assert result.returncode == 0, result.stderr
        assert result.stderr == ""
        out = result.stdout
        lines = out.splitlines()
        assert lines[0].startswith("trio-sni ")
        assert lines[0].endswith(f" at {served['url']}")
        assert "ready:          yes" in lines
        assert "connections:    1 active, 2 accepted" in lines
        assert "closed:         not_tls 1" in lines
        assert any(line.startswith("FEATURE") and "REASON" in line for line in lines)
        xdp = next(line for line in lines if line.startswith("xdp "))
        assert xdp.split() == ["xdp", "disabled", "ebpf.xdp.enabled", "is", "false"]
        dns_cache = "active" if os.geteuid() == 0 else "unavailable"  # the pinned map as root
        assert any(line.split()[:2] == ["dns_cache", dns_cache] for line in lines)
        assert "live connections: 1 (showing 1, oldest first)" in lines
        live = lines[lines.index("live connections: 1 (showing 1, oldest first)") + 2]
        client = f"127.0.0.1:{waiting.getsockname()[1]}"
        assert live.split()[:5] == [client, "local", "-", "-", "pending"]

        raw = run_cli("status", "--url", served["url"] + "/", "--json", "--limit", "0")
        assert raw.returncode == 0, raw.stderr
        documents = json.loads(raw.stdout)
        assert documents["ready"] is True
        assert documents["connections"] == {"total": 1, "limit": 0, "connections": []}
        assert documents["ebpf"]["features"]["xdp"] == "disabled"
        names = {sample["name"] for sample in documents["metrics"]}
        assert "trio_sni_connections_accepted_total" in names


def _counter_rows(frame: str) -> list[list[str]]:
    lines = frame.splitlines()
    if not any(line.startswith("KERNEL COUNTER") for line in lines):
        return []
    start = next(i for i, line in enumerate(lines) if line.startswith("KERNEL COUNTER")) + 2
    rows = []
    for line in lines[start:]:
        if not line.strip():
            break
        rows.append(line.split())
    return rows


def test_status_watch_refreshes_until_ctrl_c(served: dict[str, Any]) -> None:
    """``--watch 0.2``: a new frame on a cleared screen every 0.2 s, zero kernel counters left
    out (``--all`` keeps them), and Ctrl-C (SIGINT) ends it with exit status 0."""
    frames: dict[bool, list[str]] = {}
    for every in (False, True):
        watcher = subprocess.Popen(
            [sys.executable, "-m", "trio_sni", "status", "--url", served["url"], "--watch", "0.2"]
            + (["--all"] if every else []),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(1.5)
        watcher.send_signal(signal.SIGINT)
        out, err = watcher.communicate(timeout=TIMEOUT)
        assert watcher.returncode == 0, err
        assert "Traceback" not in err
        frames[every] = [f for f in out.split("\x1b[H\x1b[2J") if f]
        assert len(frames[every]) >= 3, out
        assert all("every 0.2 s (Ctrl-C stops)" in f for f in frames[every])
        assert all("ready:          yes" in f for f in frames[every])
    assert all(row[-1] != "0" for row in _counter_rows(frames[False][-1]))
    if os.geteuid() == 0:  # kernel counters exist: some are still zero on an idle proxy
        assert any(row[-1] == "0" for row in _counter_rows(frames[True][-1]))


def test_status_without_a_proxy_says_what_to_do() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = run_cli("status", "--url", url)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith(f"cannot reach the status endpoint at {url}: ")
    assert "Connection refused" in result.stderr
    assert '"status": {"listen": ...}' in result.stderr
    assert "Traceback" not in result.stderr


def test_status_rejects_a_non_http_url_and_serving_options() -> None:
    bad = run_cli("status", "--url", "127.0.0.1:9090")
    assert bad.returncode == 1
    assert bad.stderr == "--url: expected http://host:port, got '127.0.0.1:9090'\n"
    mixed = run_cli("--config", "x.json", "status")
    assert mixed.returncode == 2
    assert "status reads a running proxy" in mixed.stderr


def test_status_shows_notes_and_details_of_active_features() -> None:
    from trio_sni._cli import render_status

    ebpf = {
        "ebpf_enabled": True,
        "kernel_version": "6.18",
        "features": {"dns_cache": "active", "xdp": "active", "tc": "unavailable"},
        "reasons": {"tc": "no such interface eth9"},
        "notes": {"dns_cache": "replaced an incompatible pinned map"},
        "details": {"xdp": {"interface": "eth0", "mode": "generic", "ports": [443, 8443]}},
        "maps": {"xdp_syn_sources": {"entries": None, "max_entries": 65536}},
    }
    documents = {
        "ready": True,
        "readiness": "ready",
        "ebpf": ebpf,
        "metrics": [],
        "connections": {"connections": []},
    }
    lines = render_status("http://x", documents).splitlines()
    rows = {line.split()[0]: line for line in lines if line.split()}
    assert rows["dns_cache"].split()[1:] == [
        "active",
        "replaced",
        "an",
        "incompatible",
        "pinned",
        "map",
    ]
    assert rows["xdp"].split()[1:] == ["active", "interface=eth0", "mode=generic", "ports=443,8443"]
    assert rows["tc"].split()[1:] == ["unavailable", "no", "such", "interface", "eth9"]
    assert rows["xdp_syn_sources"].split()[1:] == ["-", "65536", "-"]
