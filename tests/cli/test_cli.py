"""``python -m trio_sni`` as a real subprocess: --help, --version, the config commands, and
the proxy itself serving real TLS through loopback, reloading on SIGHUP and draining on
SIGTERM/SIGINT.

The fixtures of tests/e2e/conftest.py are not visible here (sibling directory), so the few
this suite needs are defined below, sync and thread-based: these tests drive a subprocess
with plain sockets and ssl, no Trio needed. Every subprocess is bounded by a timeout and
killed and reaped when its test ends; the autouse fd check covers the test process.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import errno
import json
import os
import platform
import re
import signal
import socket
import socketserver
import ssl
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio_sni_loader as loader
import trustme
from netns import veth_namespace, xdp_prog_on
from proxytest import client_hello, need

import trio_sni
from trio_sni.accel import probe
from trio_sni.defaults import default_config_text
from trio_sni.sansio import Config, dump_config, load_config

#: What the default config forwards with here: ``kernel`` where the BPF data plane can run.
EXPECTED_MODE = "kernel" if probe().sockmap else "copy"
#: https_get_once closes with the backend's close_notify possibly unread, which makes the
#: client's kernel send an RST; with the kernel forwarding the reply is fast enough that it
#: often has arrived, so ``client_reset`` is a correct reading of what the client did.
CLEAN_END = {"normal", "client_reset"}

#: Names the backend certificate covers.
TEST_NAMES = ["bench.test", "www.bench.test"]
#: Bound on every wait in this suite; generous, a healthy run needs a fraction of it.
STARTUP_TIMEOUT = 15.0
EXIT_TIMEOUT = 10.0


# ------------------------------------------------------------------------------------------
# fd-leak check (same rule as tests/e2e: everything a test opens is closed by its end)


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


@pytest.fixture(autouse=True)
def no_fd_leaks() -> Iterator[None]:
    before = open_fds()
    yield
    leaked = {fd for fd in open_fds() - before if os.path.exists(f"/proc/self/fd/{fd}")}
    assert not leaked, f"fds left open: {sorted(leaked)} -> " + ", ".join(
        _describe_fd(fd) for fd in sorted(leaked)
    )


def _describe_fd(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "?"


# ------------------------------------------------------------------------------------------
# TLS: a CA, a client context, and a keep-alive HTTP/1.1-over-TLS backend in threads


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def client_context(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


class _BackendHandler(socketserver.BaseRequestHandler):
    """Answers every request on a connection (keep-alive) until the client closes."""

    server: _BackendServer

    def handle(self) -> None:
        self.request.settimeout(EXIT_TIMEOUT)  # never hang a thread if a peer goes silent
        try:
            with self.server.context.wrap_socket(self.request, server_side=True) as tls:
                self.server.connections += 1
                pending = b""
                while True:
                    while b"\r\n\r\n" not in pending:
                        chunk = tls.recv(65536)
                        if not chunk:
                            return
                        pending += chunk
                    _request, _, pending = pending.partition(b"\r\n\r\n")
                    body = b"hello from the backend\n"
                    tls.sendall(
                        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
                    )
        except (OSError, ssl.SSLError):
            pass


class _BackendServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    block_on_close = True
    allow_reuse_address = True

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context
        self.connections = 0
        super().__init__(("127.0.0.1", 0), _BackendHandler)


@attrs.define
class Backend:
    port: int
    server: _BackendServer

    @property
    def connections(self) -> int:
        return self.server.connections


@pytest.fixture
def tls_backend(ca: trustme.CA) -> Iterator[Backend]:
    """A TLS backend on 127.0.0.1 (certificate for TEST_NAMES), serving in threads."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*TEST_NAMES).configure_cert(ctx)
    server = _BackendServer(ctx)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield Backend(server.server_address[1], server)
    finally:
        server.shutdown()
        thread.join(EXIT_TIMEOUT)
        server.server_close()  # joins handler threads (block_on_close); they are bounded


def https_get(
    port: int, context: ssl.SSLContext, *, name: str = "bench.test"
) -> tuple[ssl.SSLSocket, bytes]:
    """One request through the proxy on 127.0.0.1:``port``; returns the open connection
    (the caller closes it) and the whole response."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        tls = context.wrap_socket(raw, server_hostname=name)
    except BaseException:
        raw.close()
        raise
    try:
        tls.sendall(b"GET / HTTP/1.1\r\nHost: %s\r\n\r\n" % name.encode())
        response = b""
        while b"\r\n\r\n" not in response:
            chunk = tls.recv(65536)
            assert chunk, f"connection closed mid-response: {response!r}"
            response += chunk
        head, _, body = response.partition(b"\r\n\r\n")
        length = int(
            next(
                line.split(b":", 1)[1]
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
        )
        while len(body) < length:
            chunk = tls.recv(65536)
            assert chunk, f"connection closed mid-body: {response!r}"
            body += chunk
        return tls, head + b"\r\n\r\n" + body
    except BaseException:
        tls.close()
        raise


def https_get_once(port: int, context: ssl.SSLContext, *, name: str = "bench.test") -> bytes:
    """Like :func:`https_get`, closing the connection; returns the response."""
    conn, response = https_get(port, context, name=name)
    conn.close()
    return response


# ------------------------------------------------------------------------------------------
# The proxy as a subprocess


def free_port() -> int:
    """A port that was free on 127.0.0.1 a moment ago (the caller retries on EADDRINUSE)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(predicate: Callable[[], bool], *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.02)


@attrs.define(eq=False)
class ProxyProcess:
    """``python -m trio_sni ARGS`` with stderr (logs and the access log) in a file."""

    proc: subprocess.Popen[bytes]
    stderr_path: Path

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text("utf-8", errors="replace")

    def log_lines(self) -> list[str]:
        """Log lines that are not access-log records."""
        return [line for line in self.stderr.splitlines() if not line.startswith("{")]

    def access_log(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stderr.splitlines() if line.startswith("{")]

    def wait_for_log(self, text: str, *, timeout: float = STARTUP_TIMEOUT) -> None:
        def seen() -> bool:
            if text in self.stderr:
                return True
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"proxy exited ({self.proc.returncode}) before logging {text!r}:\n"
                    + self.stderr
                )
            return False

        wait_until(seen, timeout=timeout, what=f"{text!r} in the proxy's log:\n{self.stderr}")

    def wait_for_records(self, count: int, *, timeout: float = STARTUP_TIMEOUT) -> None:
        wait_until(
            lambda: len(self.access_log()) >= count,
            timeout=timeout,
            what=f"{count} access-log record(s); log so far:\n{self.stderr}",
        )

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout: float = EXIT_TIMEOUT) -> int:
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(EXIT_TIMEOUT)


def run_cli(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run a one-shot ``python -m trio_sni ARGS`` and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "trio_sni", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )


@pytest.fixture
def spawn_proxy(tmp_path: Path) -> Iterator[Callable[..., ProxyProcess]]:
    """``spawn_proxy(*args)`` starts ``python -m trio_sni ARGS``; every process started is
    killed (if still running) and reaped when the test ends."""
    started: list[ProxyProcess] = []

    def spawn(*args: str) -> ProxyProcess:
        path = tmp_path / f"proxy-{len(started)}.stderr"
        with open(path, "wb") as stderr:
            proc = subprocess.Popen(
                [sys.executable, "-m", "trio_sni", *args],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        running = ProxyProcess(proc, path)
        started.append(running)
        return running

    try:
        yield spawn
    finally:
        for running in started:
            running.kill()


@attrs.define(eq=False)
class ServedProxy:
    """A proxy subprocess serving a config file on 127.0.0.1:``port``."""

    process: ProxyProcess
    port: int
    config_path: Path

    def write_config(self, data: dict[str, Any] | str) -> None:
        text = data if isinstance(data, str) else json.dumps(data, indent=2)
        self.config_path.write_text(text, "utf-8")


@pytest.fixture
def serve_config(
    tmp_path: Path, spawn_proxy: Callable[..., ProxyProcess]
) -> Callable[[Callable[[int], dict[str, Any]]], ServedProxy]:
    """``serve_config(build)``: pick a free port, write ``build(port)`` to a file, start the
    proxy on it and wait until it listens there. Retries once with a new port if another
    process took the port in between (EADDRINUSE)."""

    def serve(build: Callable[[int], dict[str, Any]]) -> ServedProxy:
        config_path = tmp_path / "trio-sni.json"
        for attempt in range(2):
            port = free_port()
            config_path.write_text(json.dumps(build(port), indent=2), "utf-8")
            process = spawn_proxy("--config", str(config_path))
            try:
                process.wait_for_log(f"listening on 127.0.0.1:{port}")
            except AssertionError:
                busy = os.strerror(errno.EADDRINUSE)
                if attempt == 0 and process.proc.poll() is not None and busy in process.stderr:
                    continue
                raise
            return ServedProxy(process, port, config_path)
        raise AssertionError("unreachable")

    return serve


def routing_config(port: int, backend_port: int, **overrides: Any) -> dict[str, Any]:
    """A listener on 127.0.0.1:``port`` forwarding bench.test to 127.0.0.1:``backend_port``,
    served by one process (``workers: 1``: these tests read its log line by line) unless
    ``workers`` is overridden."""
    config: dict[str, Any] = {
        "workers": 1,
        "listeners": [{"host": "127.0.0.1", "port": port, "target_port": backend_port}],
        "rules": [{"match": "bench.test", "allow_private": True}],
        "resolver": {"hosts": {"bench.test": ["127.0.0.1"]}},
        "log": {"level": "info", "access_log": "stderr"},
    }
    config.update(overrides)
    return config


def stop(process: ProxyProcess, signum: int = signal.SIGTERM) -> tuple[int, float]:
    """Send ``signum``; return the exit status and how long the exit took."""
    started = time.monotonic()
    process.signal(signum)
    status = process.wait()
    return status, time.monotonic() - started


# ==========================================================================================
# One-shot commands


def test_help_lists_every_option_and_the_signals() -> None:
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    for option in ("--config", "--check-config", "--print-default-config", "--version"):
        assert option in result.stdout
    for signame in ("SIGTERM", "SIGINT", "SIGHUP", "SIGUSR1", "SIGUSR2"):
        assert signame in result.stdout
    assert "timeouts.drain" in result.stdout


def test_demo_routes_real_tls_offline() -> None:
    """``python -m trio_sni demo``: the newcomer's first run, with no network."""
    result = run_cli("demo")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "hello from the demo backend, through trio-sni" in result.stdout
    assert "refused with the TLS alert TLSV1_UNRECOGNIZED_NAME" in result.stdout
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("  {")]
    assert [(r["sni"], r["reason"]) for r in records] == [
        ("demo.trio-sni.test", "normal"),
        ("refused.trio-sni.test", "denied_domain"),
    ]
    # forwarding.mode auto: the kernel where it can be used, else splice (Linux) or copy
    assert records[0]["mode"] in (("kernel",) if probe().sockmap else ("splice", "copy"))
    assert "all worked, offline" in result.stdout
    assert "Traceback" not in result.stderr


def test_version_prints_the_package_version() -> None:
    result = run_cli("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"trio-sni {trio_sni.__version__}\n"


def test_modes_are_mutually_exclusive() -> None:
    result = run_cli("--config", "a.json", "--check-config", "b.json")
    assert result.returncode == 2
    assert "not allowed with argument" in result.stderr
    assert result.stdout == ""


def test_print_default_config_is_the_embedded_default() -> None:
    result = run_cli("--print-default-config")
    assert result.returncode == 0, result.stderr
    assert result.stdout == default_config_text()
    printed = json.loads(result.stdout)
    assert load_config(printed) == load_config(json.loads(default_config_text()))


def test_check_config_prints_the_effective_config(tmp_path: Path) -> None:
    path = tmp_path / "default.json"
    path.write_text(run_cli("--print-default-config").stdout, "utf-8")
    result = run_cli("--check-config", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stderr == f"{path}: ok (2 listener(s), 1 rule(s))\n"
    effective = json.loads(result.stdout)
    assert effective == dump_config(load_config(json.loads(default_config_text())))
    # Defaults the file does not spell out are filled in.
    assert "forwarding" not in json.loads(default_config_text())
    assert effective["forwarding"] == {"buffer_size": 262144, "mode": "auto", "pipe_size": 1048576}
    assert effective["resolver"]["cache_size"] == 10000
    assert effective["resolver"]["hosts"] == {}
    assert effective["listen_addr"] is None
    # The effective config is itself a valid config that means the same.
    assert load_config(effective) == load_config(json.loads(default_config_text()))


BAD_CONFIG = """\
{
  "listeners": [{"host": "127.0.0.1", "port": "8443"}],
  "rules": [{"match": "a.test"}, {"regex": "("}],
  "timeouts": {"idle": true},
  "lsten_addr": "0.0.0.0:8443"
}
"""


@pytest.mark.parametrize("option", ["--check-config", "--config"])
def test_bad_config_lists_every_problem_with_its_path(tmp_path: Path, option: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(BAD_CONFIG, "utf-8")
    result = run_cli(option, str(path))
    assert result.returncode == 1
    assert result.stdout == ""
    allowed = ", ".join(field.name for field in attrs.fields(Config))
    assert result.stderr.splitlines() == [
        f"{path}: invalid configuration:",
        "  listeners[0].port: expected int, got string",
        "  rules[1].regex: '(' does not compile: missing ), unterminated subpattern at position 0",
        "  timeouts.idle: expected number, got bool",
        f"  lsten_addr: unknown key (allowed: {allowed})",
    ]


def test_check_config_finds_what_would_fail_at_start(tmp_path: Path) -> None:
    """Every bad item of a list, networks with host bits set, listeners that could not both be
    bound, and an access log in a directory that does not exist."""
    path = tmp_path / "start.json"
    config = {
        "listeners": [
            {"host": "0.0.0.0", "port": 8443},
            {"host": "127.0.0.1", "port": 8443},
        ],
        "clients": {"allow": ["10.0.0.1/8", "10.0.0.0/8", "x", "2001:db8::1/32"]},
        "rules": [{"match": "a.test"}],
    }
    path.write_text(json.dumps(config), "utf-8")
    result = run_cli("--check-config", str(path))
    assert result.returncode == 1
    host_bits = "has host bits set: write {!r} for the network, or the address alone for one host"
    assert result.stderr.splitlines() == [
        f"{path}: invalid configuration:",
        "  clients.allow[0]: '10.0.0.1/8' " + host_bits.format("10.0.0.0/8"),
        "  clients.allow[2]: 'x' is not an IP network (CIDR)",
        "  clients.allow[3]: '2001:db8::1/32' " + host_bits.format("2001:db8::/32"),
    ]
    config["clients"] = {}
    path.write_text(json.dumps(config), "utf-8")
    result = run_cli("--check-config", str(path))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"{path}: invalid configuration:",
        "  listeners[1]: 127.0.0.1 port 8443 clashes with listeners[0] (0.0.0.0 port 8443); "
        "the second could not be bound",
    ]
    config["listeners"] = [{"host": "127.0.0.1", "port": 8443}, {"host": "::1", "port": 8443}]
    config["log"] = {"access_log": str(tmp_path / "missing" / "access.log")}
    path.write_text(json.dumps(config), "utf-8")
    result = run_cli("--check-config", str(path))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"{path}: invalid configuration:",
        f"  log.access_log: directory {tmp_path / 'missing'} does not exist",
    ]


@pytest.mark.parametrize("option", ["--check-config", "--config"])
def test_missing_config_file(tmp_path: Path, option: str) -> None:
    path = tmp_path / "nope.json"
    result = run_cli(option, str(path))
    assert result.returncode == 1
    assert result.stdout == ""
    assert f"{path}: cannot read: No such file or directory" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("option", ["--check-config", "--config"])
def test_invalid_json_says_where(tmp_path: Path, option: str) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{\n  "listeners": [,\n}\n', "utf-8")
    result = run_cli(option, str(path))
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"{path}: invalid configuration:",
        f"  {path}: not valid JSON: Expecting value at line 2 column 17",
    ]


# ==========================================================================================
# Serving


def _assert_closed(conn: ssl.SSLSocket) -> None:
    """The proxy closed ``conn``: EOF (or a reset) well before the socket's own timeout."""
    try:
        data = conn.recv(65536)
    except (ConnectionError, ssl.SSLError):
        return
    except TimeoutError:
        pytest.fail("the proxy left the connection open")
    assert data == b""


def _assert_refused(port: int, context: ssl.SSLContext) -> None:
    with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
        https_get_once(port, context)


def test_serve_reload_deny_and_stop(
    tls_backend: Backend,
    client_context: ssl.SSLContext,
    serve_config: Callable[..., ServedProxy],
) -> None:
    served = serve_config(lambda port: routing_config(port, tls_backend.port))
    proxy = served.process
    assert f"forwarding mode: {EXPECTED_MODE}" in proxy.stderr

    response = https_get_once(served.port, client_context)
    assert response.startswith(b"HTTP/1.1 200 OK\r\n")
    assert response.endswith(b"\r\n\r\nhello from the backend\n")
    proxy.wait_for_records(1)
    [record] = proxy.access_log()
    assert record["sni"] == "bench.test"
    assert record["reason"] in CLEAN_END
    assert record["mode"] == EXPECTED_MODE
    assert record["decision"] == "allow"
    assert record["target"] == f"127.0.0.1:{tls_backend.port}"
    assert record["bytes_to_upstream"] > 0
    assert record["bytes_to_client"] > 0

    # Reload with bench.test denied: new connections get the unrecognized_name alert.
    served.write_config(
        routing_config(
            served.port, tls_backend.port, rules=[{"match": "bench.test", "action": "deny"}]
        )
    )
    proxy.signal(signal.SIGHUP)
    proxy.wait_for_log("reload: new policy")
    connections_before = tls_backend.connections
    _assert_refused(served.port, client_context)
    proxy.wait_for_records(2)
    denied = proxy.access_log()[1]
    assert denied["sni"] == "bench.test"
    assert denied["reason"] == "denied_domain"
    assert denied["decision"] == "deny"
    assert denied["target"] is None
    assert tls_backend.connections == connections_before

    status, elapsed = stop(proxy, signal.SIGTERM)
    assert status == 0, proxy.stderr
    assert elapsed < 5
    assert "SIGTERM: stopping" in proxy.stderr
    assert proxy.log_lines()[-1].endswith("proxy stopped")
    assert len(proxy.access_log()) == 2
    assert "Traceback" not in proxy.stderr


def test_reload_with_a_broken_file_keeps_the_running_config(
    tls_backend: Backend,
    client_context: ssl.SSLContext,
    serve_config: Callable[..., ServedProxy],
) -> None:
    served = serve_config(lambda port: routing_config(port, tls_backend.port))
    proxy = served.process
    https_get_once(served.port, client_context)
    proxy.wait_for_records(1)

    broken = routing_config(served.port, tls_backend.port, rules=[{"match": "bench.test"}])
    broken["listeners"][0]["port"] = str(served.port)
    broken["timeouts"] = {"drian": 1}
    served.write_config(broken)
    proxy.signal(signal.SIGHUP)
    proxy.wait_for_log("keeping the current config")
    log = proxy.stderr
    assert f"SIGHUP: {served.config_path}: invalid configuration:\n" in log
    assert "\n  listeners[0].port: expected int, got string\n" in log
    assert "\n  timeouts.drian: unknown key (allowed: " in log
    assert "reload: new policy" not in log

    # Still the old config: bench.test is routed as before (the broken file has no
    # allow_private, so a half-applied reload would show as ssrf_blocked).
    response = https_get_once(served.port, client_context)
    assert response.endswith(b"\r\n\r\nhello from the backend\n")
    proxy.wait_for_records(2)
    assert len(proxy.access_log()) == 2
    assert all(r["reason"] in CLEAN_END for r in proxy.access_log())

    status, _ = stop(proxy, signal.SIGTERM)
    assert status == 0, proxy.stderr
    assert proxy.log_lines()[-1].endswith("proxy stopped")


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.parametrize("workers", [1, 2])
def test_sigusr1_reopens_the_access_log_after_logrotate_renamed_it(
    workers: int,
    tls_backend: Backend,
    client_context: ssl.SSLContext,
    serve_config: Callable[..., ServedProxy],
    tmp_path: Path,
) -> None:
    access_log = tmp_path / "access.log"
    served = serve_config(
        lambda port: routing_config(
            port,
            tls_backend.port,
            workers=workers,
            log={"level": "info", "access_log": str(access_log)},
            limits={"per_client_rate": 0},
        )
    )
    proxy = served.process
    if workers > 1:
        proxy.wait_for_log(f"{workers} workers serving")
    https_get_once(served.port, client_context)
    wait_until(lambda: len(_records(access_log)) == 1, timeout=5, what="the first record")
    rotated = tmp_path / "access.log.1"
    access_log.rename(rotated)
    proxy.signal(signal.SIGUSR1)
    wait_until(
        lambda: proxy.stderr.count("access log: reopened") == workers,
        timeout=STARTUP_TIMEOUT,
        what="every process to reopen",
    )
    for _ in range(10):
        https_get_once(served.port, client_context)
    wait_until(lambda: len(_records(access_log)) == 10, timeout=5, what="10 records, new file")
    assert len(_records(rotated)) == 1
    status, _ = stop(proxy, signal.SIGTERM)
    assert status == 0, proxy.stderr
    assert "ERROR" not in proxy.stderr


@pytest.mark.parametrize("workers", [1, 2])
def test_the_operational_log_as_json_in_a_file_that_logrotate_may_move(
    workers: int,
    tls_backend: Backend,
    spawn_proxy: Callable[..., ProxyProcess],
    tmp_path: Path,
) -> None:
    """log.format json and log.file: one JSON object per line in the file (nothing on
    stderr); after the file is moved away the next line goes to a new file."""
    ops = tmp_path / "trio-sni.log"

    def config(port: int) -> dict[str, Any]:
        settings = {"level": "info", "access_log": None, "format": "json", "file": str(ops)}
        return routing_config(port, tls_backend.port, workers=workers, log=settings)

    def entries(path: Path) -> list[dict[str, Any]]:
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    port = free_port()
    path = tmp_path / "trio-sni.json"
    path.write_text(json.dumps(config(port)))
    proxy = spawn_proxy("--config", str(path))
    try:
        ready = f"{workers} workers serving" if workers > 1 else "listening on 127.0.0.1:"
        wait_until(
            lambda: any(e["message"].startswith(ready) for e in entries(ops)),
            timeout=STARTUP_TIMEOUT,
            what="the first lines in the file",
        )
        first = entries(ops)
        assert {"time", "level", "logger", "message"} <= set(first[0])
        if workers > 1:  # every worker has logged (the supervisor waits for them all)
            assert {e.get("worker") for e in first} >= {0, 1}
        ops.rename(tmp_path / "trio-sni.log.1")
        proxy.signal(signal.SIGHUP)
        wait_until(
            lambda: any(e["message"].startswith("reload: new policy") for e in entries(ops)),
            timeout=STARTUP_TIMEOUT,
            what="the reload's line in a new file",
        )
    finally:
        status, _ = stop(proxy, signal.SIGTERM)
    assert status == 0
    assert proxy.stderr == ""


def test_sighup_applies_log_level_and_access_log(
    tls_backend: Backend,
    client_context: ssl.SSLContext,
    serve_config: Callable[..., ServedProxy],
    tmp_path: Path,
) -> None:
    first, second = tmp_path / "first.log", tmp_path / "second.log"
    settings = {"per_client_rate": 0}

    def config(port: int, level: str, path: Path) -> dict[str, Any]:
        log_settings = {"level": level, "access_log": str(path)}
        return routing_config(port, tls_backend.port, log=log_settings, limits=settings)

    served = serve_config(lambda port: config(port, "info", first))
    proxy = served.process
    https_get_once(served.port, client_context)
    wait_until(lambda: len(_records(first)) == 1, timeout=5, what="the first record")
    served.write_config(config(served.port, "debug", second))
    proxy.signal(signal.SIGHUP)
    proxy.wait_for_log("reload: new policy")
    assert "log level: now debug" in proxy.stderr
    assert f"access log: now {second} (was {first})" in proxy.stderr
    https_get_once(served.port, client_context)
    wait_until(lambda: len(_records(second)) == 1, timeout=5, what="a record in the new file")
    assert len(_records(first)) == 1
    assert " DEBUG trio_sni" in proxy.stderr  # debug lines now appear
    served.write_config(config(served.port, "warning", tmp_path / "missing" / "x.log"))
    proxy.signal(signal.SIGHUP)
    proxy.wait_for_log("still writing to")  # cannot open: reported, the old file kept
    https_get_once(served.port, client_context)
    wait_until(lambda: len(_records(second)) == 2, timeout=5, what="the old file kept")
    status, _ = stop(proxy, signal.SIGTERM)
    assert status == 0, proxy.stderr


def test_sigterm_drains_an_idle_connection_for_timeouts_drain(
    tls_backend: Backend,
    client_context: ssl.SSLContext,
    serve_config: Callable[..., ServedProxy],
) -> None:
    served = serve_config(
        lambda port: routing_config(port, tls_backend.port, timeouts={"drain": 1})
    )
    proxy = served.process
    conn, response = https_get(served.port, client_context)
    try:
        assert response.startswith(b"HTTP/1.1 200 OK\r\n")
        # The client keeps its connection open and idle.
        status, elapsed = stop(proxy, signal.SIGTERM)
        assert status == 0, proxy.stderr
        assert 0.9 <= elapsed < 3.5, f"exit took {elapsed:.2f} s with timeouts.drain = 1"
        _assert_closed(conn)
    finally:
        conn.close()
    assert "draining 1 connection(s) for up to 1 s" in proxy.stderr
    [record] = proxy.access_log()
    assert record["sni"] == "bench.test"
    assert record["reason"] == "shutdown"
    assert proxy.log_lines()[-1].endswith("proxy stopped")


@pytest.mark.bpf
def test_sigterm_ends_1000_kernel_forwarded_connections_with_exact_counts(
    serve_config: Callable[..., ServedProxy],
) -> None:
    """Connections handed to the kernel have no task (issue 14); SIGTERM still waits
    ``timeouts.drain`` for them, then closes every one (a FIN to each side), with its exact
    byte counts in the access log and nothing left in the proxy."""
    count = 1000
    hello = client_hello("bench.test")
    pairs: list[tuple[socket.socket, socket.socket]] = []
    with contextlib.ExitStack() as closing, socket.socket() as backend:
        backend.bind(("127.0.0.1", 0))
        backend.listen(count)
        backend.settimeout(STARTUP_TIMEOUT)
        served = serve_config(
            lambda port: routing_config(
                port,
                backend.getsockname()[1],
                timeouts={"drain": 1},
                forwarding={"mode": "kernel"},
                fallback_mode="none",
                limits={"per_client_rate": 0, "per_client_connections": 0},
            )
        )
        sent: dict[str, tuple[int, int]] = {}
        for number in range(count):
            client = closing.enter_context(socket.create_connection(("127.0.0.1", served.port)))
            client.settimeout(STARTUP_TIMEOUT)
            up, down = bytes([number % 251]) * (number % 97), bytes([number % 241]) * number
            client.sendall(hello + up)
            server = closing.enter_context(backend.accept()[0])
            server.settimeout(STARTUP_TIMEOUT)
            assert _receive_exactly(server, len(hello + up)) == hello + up
            server.sendall(down)
            assert _receive_exactly(client, len(down)) == down
            pairs.append((client, server))
            host, port = client.getsockname()
            sent[f"{host}:{port}"] = (len(hello + up), len(down))
        proxy = served.process
        status, elapsed = stop(proxy, signal.SIGTERM)
        assert status == 0, proxy.stderr
        assert 0.9 <= elapsed < 6, f"exit took {elapsed:.2f} s with timeouts.drain = 1"
        for client, server in pairs:
            assert client.recv(1) == b""  # a FIN: everything before it was read above
            assert server.recv(1) == b""
    assert f"draining {count} connection(s) for up to 1 s" in proxy.stderr
    records = proxy.access_log()
    assert len(records) == count
    got = {
        r["client"]: (r["bytes_to_upstream"], r["bytes_to_client"])
        for r in records
        if (r["reason"], r["mode"]) == ("shutdown", "kernel")
    }
    assert got == sent
    assert proxy.log_lines()[-1].endswith("proxy stopped")
    assert "ERROR" not in proxy.stderr


def _receive_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, f"EOF after {len(data)} of {size} bytes"
        data += chunk
    return data


def test_second_sigint_stops_at_once(
    tls_backend: Backend,
    client_context: ssl.SSLContext,
    serve_config: Callable[..., ServedProxy],
) -> None:
    served = serve_config(
        lambda port: routing_config(port, tls_backend.port, timeouts={"drain": 30})
    )
    proxy = served.process
    conn, _ = https_get(served.port, client_context)
    try:
        proxy.signal(signal.SIGINT)
        proxy.wait_for_log("draining 1 connection(s) for up to 30 s")
        assert proxy.proc.poll() is None  # still draining
        status, elapsed = stop(proxy, signal.SIGINT)
        assert status == 0, proxy.stderr
        assert elapsed < 3
        _assert_closed(conn)
    finally:
        conn.close()
    assert "second stop signal: closing all connections now" in proxy.stderr
    assert [r["reason"] for r in proxy.access_log()] == ["shutdown"]


def test_busy_port_is_a_clear_startup_error(
    tmp_path: Path, spawn_proxy: Callable[..., ProxyProcess]
) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        path = tmp_path / "busy.json"
        path.write_text(json.dumps(routing_config(port, 443)), "utf-8")
        proxy = spawn_proxy("--config", str(path))
        assert proxy.wait() == 1
    assert f"cannot start: [Errno 98] 127.0.0.1:{port}: Address already in use" in proxy.stderr
    assert "Traceback" not in proxy.stderr


def _debian_python() -> str | None:
    """Debian 12's own Python (3.11.2) if it is here: except* had a bug until 3.11.4."""
    path = Path("/usr/bin/python3")
    if not path.exists() or sys.version_info[:2] != (3, 11):
        return None
    version = subprocess.run(
        [path, "-c", "import sys; print(sys.version_info[:3] < (3, 11, 4))"],
        capture_output=True,
        text=True,
        check=False,
    )
    return str(path) if version.stdout.strip() == "True" else None


@pytest.mark.skipif(_debian_python() is None, reason="no Python 3.11 older than 3.11.4 here")
def test_a_startup_error_is_one_line_on_python_before_3_11_4(tmp_path: Path) -> None:
    """On 3.11.0-3.11.3, sys.exit() inside an except* block printed a traceback after the
    error. The project's dependencies (this test's own, same Python minor version) are put
    on that Python's path."""
    python = _debian_python()
    assert python is not None
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        path = tmp_path / "busy.json"
        path.write_text(json.dumps(routing_config(port, 443)), "utf-8")
        paths = [
            str(Path(module.__file__ or "").parent.parent) for module in (trio_sni, loader)
        ] + [sysconfig.get_paths()["purelib"]]
        result = subprocess.run(
            [python, "-m", "trio_sni", "--config", str(path)],
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(paths)},
            check=False,
        )
    assert result.returncode == 1, result.stderr
    assert f"cannot start: [Errno 98] 127.0.0.1:{port}: Address already in use" in result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr


@pytest.mark.skipif(
    EXPECTED_MODE == "kernel",
    reason="kernel forwarding works here (test_kernel_forwarding.py drops the capabilities)",
)
def test_fallback_mode_none_refuses_to_start(
    tmp_path: Path, spawn_proxy: Callable[..., ProxyProcess]
) -> None:
    path = tmp_path / "none.json"
    path.write_text(json.dumps(routing_config(0, 443, fallback_mode="none")), "utf-8")
    proxy = spawn_proxy("--config", str(path))
    assert proxy.wait() == 1
    assert "fallback_mode is 'none'" in proxy.stderr
    assert "listening on" not in proxy.stderr
    assert "Traceback" not in proxy.stderr


def _port_8443_free() -> str | None:
    """None if the default config's ports (127.0.0.1:8443 and [::1]:8443, the status
    endpoint's 127.0.0.1:9090) can be bound, else why not."""
    for family, host, port in (
        (socket.AF_INET, "127.0.0.1", 8443),
        (socket.AF_INET6, "::1", 8443),
        (socket.AF_INET, "127.0.0.1", 9090),
    ):
        with socket.socket(family) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError as exc:
                return f"cannot bind [{host}]:{port}: {exc.strerror}"
    return None


def test_embedded_default_config_serves_on_8443(
    spawn_proxy: Callable[..., ProxyProcess],
) -> None:
    busy = _port_8443_free()
    if busy is not None:
        pytest.skip(busy)
    proxy = spawn_proxy()
    try:
        proxy.wait_for_log("listening on [::1]:8443")
    except AssertionError:
        if "Address already in use" in proxy.stderr:
            pytest.skip("port 8443 was taken while the proxy started")
        raise
    assert "listening on 127.0.0.1:8443" in proxy.stderr
    # The embedded config leaves ``workers`` at its default: one worker per CPU.
    workers = len(os.sched_getaffinity(0))
    proxy.wait_for_log(f"{workers} workers serving")
    with socket.create_connection(("127.0.0.1", 8443), timeout=5):
        pass  # the port accepts
    proxy.wait_for_records(1)  # that probe (no ClientHello) is logged and closed
    # The status endpoint is on, where `python -m trio_sni status` looks by default.
    assert _get("http://127.0.0.1:9090/readyz") == (200, "ready\n")
    shown = run_cli("status")
    assert shown.returncode == 0, shown.stderr
    status, elapsed = stop(proxy, signal.SIGINT)
    assert status == 0, proxy.stderr
    assert elapsed < 5
    assert "SIGINT: stopping" in proxy.stderr
    assert proxy.stderr.count("proxy stopped") == workers
    assert proxy.log_lines()[-1].endswith("supervisor stopped")
    assert "Traceback" not in proxy.stderr


@pytest.mark.root
def test_embedded_default_config_starts_where_ipv6_is_off(tmp_path: Path) -> None:
    """In a network namespace of the test's own with IPv6 turned off (as in many containers),
    the default config serves on 127.0.0.1:8443 and says it does without [::1]:8443."""
    name = f"trio-sni-noipv6-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
    try:

        def inside(*argv: str) -> list[str]:
            return ["ip", "netns", "exec", name, *argv]

        subprocess.run(inside("sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"), check=True)
        subprocess.run(inside("sysctl", "-qw", "net.ipv6.conf.lo.disable_ipv6=1"), check=True)
        subprocess.run(inside("ip", "link", "set", "lo", "up"), check=True)
        stderr_path = tmp_path / "proxy.stderr"
        with stderr_path.open("w") as stderr:
            proc = subprocess.Popen(
                inside(sys.executable, "-m", "trio_sni"),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        try:
            wait_until(
                lambda: "workers serving" in stderr_path.read_text() or proc.poll() is not None,
                timeout=STARTUP_TIMEOUT,
                what="the proxy to serve",
            )
            text = stderr_path.read_text()
            assert proc.poll() is None, text
            assert "listening on 127.0.0.1:8443" in text
            assert (
                "listener local6: [::1]:8443: Cannot assign requested address; it is optional: "
                "serving without it"
            ) in text
            probe = subprocess.run(
                inside(
                    sys.executable,
                    "-c",
                    "import socket; socket.create_connection(('127.0.0.1', 8443), 5).close()",
                ),
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            assert probe.returncode == 0, probe.stderr
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0, stderr_path.read_text()
        assert "Traceback" not in stderr_path.read_text()
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False, timeout=10)


# ==========================================================================================
# Restarts that refuse no one: SIGUSR2 handover, systemd socket activation and sd_notify


@attrs.define(eq=False)
class ClientLoop:
    """One TLS request through the proxy after another, in a thread, counting outcomes."""

    port: int
    context: ssl.SSLContext
    ok: int = 0
    failures: list[str] = attrs.Factory(list)
    _stop: threading.Event = attrs.Factory(threading.Event)
    _thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                response = https_get_once(self.port, self.context)
            except (OSError, AssertionError) as exc:
                self.failures.append(f"{type(exc).__name__}: {exc}")
            else:
                if response.startswith(b"HTTP/1.1 200 OK\r\n"):
                    self.ok += 1
                else:
                    self.failures.append(repr(response[:60]))

    def __enter__(self) -> ClientLoop:
        self._thread = threading.Thread(target=self._run)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(EXIT_TIMEOUT)


def _stop_pid(pid: int) -> None:
    """SIGTERM a proxy that is not our child (a successor), and wait until it has exited."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)

    def gone() -> bool:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        return state in ("Z", "X")

    wait_until(gone, timeout=EXIT_TIMEOUT, what=f"pid {pid} to exit")


@pytest.mark.parametrize("workers", [1, 2])
def test_sigusr2_hands_the_listeners_to_a_new_proxy_refusing_no_one(
    workers: int,
    tls_backend: Backend,
    client_context: ssl.SSLContext,
    serve_config: Callable[..., ServedProxy],
) -> None:
    """The same for a single process and for a supervisor with its workers."""
    status_port = free_port()
    served = serve_config(
        lambda port: routing_config(
            port,
            tls_backend.port,
            workers=workers,
            timeouts={"drain": 1},
            status={"listen": f"127.0.0.1:{status_port}"},
        )
    )
    old = served.process
    successor = None
    try:
        with ClientLoop(served.port, client_context) as loop:
            wait_until(lambda: loop.ok >= 20, timeout=STARTUP_TIMEOUT, what="requests")
            old.signal(signal.SIGUSR2)
            old.wait_for_log("SIGUSR2: the new proxy (pid ")
            successor = int(old.stderr.split("SIGUSR2: the new proxy (pid ")[1].split(")")[0])
            assert old.wait() == 0, old.stderr
            before = loop.ok
            # The old proxy is gone: every request now goes to the successor.
            wait_until(lambda: loop.ok >= before + 20, timeout=STARTUP_TIMEOUT, what="requests")
        assert loop.failures == [], loop.failures[:5]
        assert f"serving on the inherited socket 127.0.0.1:{served.port}" in old.stderr
        # The status socket went over too: the successor serves it.
        assert f"serving on the inherited socket 127.0.0.1:{status_port}" in old.stderr
        assert _get(f"http://127.0.0.1:{status_port}/readyz") == (200, "ready\n")
        assert "ERROR" not in old.stderr
    finally:
        if successor is not None:
            _stop_pid(successor)


def test_a_successor_that_fails_leaves_the_old_proxy_serving(
    tls_backend: Backend,
    client_context: ssl.SSLContext,
    serve_config: Callable[..., ServedProxy],
) -> None:
    served = serve_config(lambda port: routing_config(port, tls_backend.port))
    proxy = served.process
    served.write_config("{not json")  # the successor reads this and refuses to start
    proxy.signal(signal.SIGUSR2)
    proxy.wait_for_log("this proxy keeps serving")
    assert "exited with status 1 before it was ready" in proxy.stderr
    assert https_get_once(served.port, client_context).startswith(b"HTTP/1.1 200 OK\r\n")
    status, _ = stop(proxy, signal.SIGTERM)
    assert status == 0, proxy.stderr


def as_fd_3(fd: int, *args: str) -> list[str]:
    """A command line that runs ``python -m trio_sni ARGS`` with ``fd`` moved to fd 3, where
    systemd passes the first socket."""
    move = (
        f"import os, sys; os.dup2({fd}, 3); os.close({fd}); "
        "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
    )
    return [sys.executable, "-c", move, "-m", "trio_sni", *args]


def test_systemd_socket_activation_and_notifications(
    tmp_path: Path, tls_backend: Backend, client_context: ssl.SSLContext
) -> None:
    """As systemd runs it: the listening socket comes as fd 3 (LISTEN_FDS=1) and state changes
    go to NOTIFY_SOCKET."""
    notify_path = str(tmp_path / "notify")
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify,
        socket.create_server(("127.0.0.1", 0)) as listening,
    ):
        notify.bind(notify_path)
        notify.settimeout(STARTUP_TIMEOUT)
        port = listening.getsockname()[1]
        config = tmp_path / "activated.json"
        config.write_text(json.dumps(routing_config(port, tls_backend.port)), "utf-8")
        fd = listening.fileno()
        stderr_path = tmp_path / "activated.stderr"
        with open(stderr_path, "wb") as stderr:
            proc = subprocess.Popen(
                as_fd_3(fd, "--config", str(config)),
                pass_fds=[fd],
                env={**os.environ, "LISTEN_FDS": "1", "NOTIFY_SOCKET": notify_path},
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        proxy = ProxyProcess(proc, stderr_path)
        try:
            listening.close()  # the proxy's copy is the only one now

            def message() -> list[str]:
                return notify.recv(4096).decode().split("\n")

            assert "READY=1" in message()
            assert f"serving on the inherited socket 127.0.0.1:{port}" in proxy.stderr
            response = https_get_once(port, client_context)
            assert response.startswith(b"HTTP/1.1 200 OK\r\n")
            proxy.signal(signal.SIGHUP)
            assert "RELOADING=1" in message()
            assert "READY=1" in message()
            status, _ = stop(proxy, signal.SIGTERM)
            assert status == 0, proxy.stderr
            assert "STOPPING=1" in message()
        finally:
            proxy.kill()


def test_listen_fds_that_are_not_listening_sockets_are_a_clear_startup_error(
    tmp_path: Path,
) -> None:
    path = tmp_path / "x.json"
    path.write_text(json.dumps(routing_config(free_port(), 443)), "utf-8")
    with socket.socket() as unbound:
        fd = unbound.fileno()
        result = subprocess.run(
            as_fd_3(fd, "--config", str(path)),
            pass_fds=[fd],
            env={**os.environ, "LISTEN_FDS": "1"},
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert result.returncode == 1
    assert "cannot start: LISTEN_FDS: fd 3 is not a listening TCP socket" in result.stderr
    assert "Traceback" not in result.stderr


# ==========================================================================================
# workers: a supervisor and N worker processes on the same listeners


def _worker_pids(proxy: ProxyProcess) -> dict[int, int]:
    """The latest pid of each worker, from the supervisor's log."""
    pids: dict[int, int] = {}
    for line in proxy.log_lines():
        if " started (pid " in line and "trio_sni: worker " in line:
            index = int(line.split("trio_sni: worker ")[1].split()[0])
            pids[index] = int(line.split("(pid ")[1].rstrip(")"))
    return pids


def _requests_in_parallel(port: int, context: ssl.SSLContext, count: int) -> list[bytes]:
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        return list(pool.map(lambda _: https_get_once(port, context), range(count)))


def test_workers_share_the_connections_and_drain_together(
    tls_backend: Backend,
    client_context: ssl.SSLContext,
    serve_config: Callable[..., ServedProxy],
) -> None:
    served = serve_config(
        lambda port: routing_config(
            port,
            tls_backend.port,
            workers=2,
            timeouts={"drain": 1},
            limits={"per_client_rate": 0},  # 200 at once: more than one client's burst
        )
    )
    proxy = served.process
    proxy.wait_for_log("2 workers serving")
    responses = _requests_in_parallel(served.port, client_context, 200)
    assert all(r.startswith(b"HTTP/1.1 200 OK\r\n") for r in responses)
    proxy.wait_for_records(200)
    served_by = collections.Counter(r["worker"] for r in proxy.access_log())
    assert set(served_by) == {0, 1}, served_by  # the kernel spreads them over both
    conn, _ = https_get(served.port, client_context)  # one stays open through the stop
    try:
        status, elapsed = stop(proxy, signal.SIGTERM)
        assert status == 0, proxy.stderr
        assert 0.9 <= elapsed < 5, f"exit took {elapsed:.2f} s with timeouts.drain = 1"
        _assert_closed(conn)
    finally:
        conn.close()
    assert proxy.stderr.count("proxy stopped") == 2
    assert [r["reason"] for r in proxy.access_log()].count("shutdown") == 1
    assert proxy.log_lines()[-1].endswith("supervisor stopped")
    assert "ERROR" not in proxy.stderr


def test_a_stop_while_the_workers_start_waits_for_their_handlers(
    tls_backend: Backend, tmp_path: Path, spawn_proxy: Callable[..., ProxyProcess]
) -> None:
    """SIGTERM as soon as the workers are spawned, long before their signal handlers exist:
    they start with the signals blocked, so each still stops cleanly (exit 0), none is
    killed by the signal."""
    path = tmp_path / "workers.json"
    path.write_text(json.dumps(routing_config(free_port(), tls_backend.port, workers=2)))
    proxy = spawn_proxy("--config", str(path))
    proxy.wait_for_log("worker 1 started")
    status, _ = stop(proxy, signal.SIGTERM)
    assert status == 0, proxy.stderr
    assert "killed by" not in proxy.stderr
    assert proxy.stderr.count("stopped (exited with status 0)") == 2, proxy.stderr


def test_a_killed_worker_is_replaced_and_the_proxy_keeps_serving(
    tls_backend: Backend,
    client_context: ssl.SSLContext,
    serve_config: Callable[..., ServedProxy],
) -> None:
    served = serve_config(lambda port: routing_config(port, tls_backend.port, workers=2))
    proxy = served.process
    proxy.wait_for_log("2 workers serving")
    killed = _worker_pids(proxy)[1]
    os.kill(killed, signal.SIGKILL)
    wait_until(
        lambda: _worker_pids(proxy)[1] != killed, timeout=STARTUP_TIMEOUT, what="a new worker 1"
    )
    assert f"worker 1 (pid {killed}) was killed by SIGKILL; starting it again" in proxy.stderr
    responses = _requests_in_parallel(served.port, client_context, 40)
    assert all(r.startswith(b"HTTP/1.1 200 OK\r\n") for r in responses)
    status, _ = stop(proxy, signal.SIGTERM)
    assert status == 0, proxy.stderr


def _bpf_map_ids_of(pid: int) -> set[int]:
    """The ids of the BPF maps process ``pid`` holds an fd to (``map_id`` in its fdinfo)."""
    ids = set()
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines():
                if line.startswith("map_id:"):
                    ids.add(int(line.split()[1]))
    return ids


def _bpf_maps() -> dict[int, str]:
    """Every BPF map loaded on the host: id -> name."""
    out = subprocess.run(
        ["bpftool", "-j", "map", "show"], check=True, capture_output=True, text=True
    ).stdout
    return {m["id"]: m.get("name", "") for m in json.loads(out or "[]")}


#: The maps of a worker's sockhash plane (``bpf/sockhash.bpf.c``); the DNS cache is pinned
#: and shared, so it outlives every worker.
SOCKHASH_PLANE_MAPS = {"sock_hash", "targets", "peer", "progress", "counters", "stops"}


@pytest.mark.bpf
def test_a_killed_kernel_mode_worker_takes_its_maps_and_their_entries_with_it(
    tls_backend: Backend,
    client_context: ssl.SSLContext,
    serve_config: Callable[..., ServedProxy],
) -> None:
    """Each worker owns its sockhash plane: killed with connections registered, its maps (and
    every entry in them) are freed by the kernel, nothing of it stays loaded, and its
    successor loads a plane of its own."""
    served = serve_config(
        lambda port: routing_config(
            port, tls_backend.port, workers=2, forwarding={"mode": "kernel"}, fallback_mode="none"
        )
    )
    proxy = served.process
    proxy.wait_for_log("2 workers serving")
    killed = _worker_pids(proxy)[1]
    held = [https_get(served.port, client_context)[0] for _ in range(12)]
    try:
        names = _bpf_maps()
        owned = {i for i in _bpf_map_ids_of(killed) if names.get(i) in SOCKHASH_PLANE_MAPS}
        assert len(owned) == len(SOCKHASH_PLANE_MAPS), "worker 1 runs no sockhash plane"
        os.kill(killed, signal.SIGKILL)
        wait_until(
            lambda: _worker_pids(proxy)[1] != killed, timeout=STARTUP_TIMEOUT, what="worker 1"
        )
        # The kernel frees a map in a work item after its last reference goes.
        wait_until(lambda: not owned & set(_bpf_maps()), timeout=10, what="its maps freed")
        wait_until(
            lambda: bool(_bpf_map_ids_of(_worker_pids(proxy)[1])),
            timeout=STARTUP_TIMEOUT,
            what="the new worker 1's own plane",
        )
    finally:
        for conn in held:
            conn.close()
    responses = _requests_in_parallel(served.port, client_context, 20)
    assert all(r.startswith(b"HTTP/1.1 200 OK\r\n") for r in responses)
    status, _ = stop(proxy, signal.SIGTERM)
    assert status == 0, proxy.stderr


def test_sighup_reloads_every_worker_and_a_bad_config_reaches_none(
    tls_backend: Backend,
    client_context: ssl.SSLContext,
    serve_config: Callable[..., ServedProxy],
) -> None:
    served = serve_config(lambda port: routing_config(port, tls_backend.port, workers=2))
    proxy = served.process
    proxy.wait_for_log("2 workers serving")
    served.write_config("{not json")
    proxy.signal(signal.SIGHUP)
    proxy.wait_for_log("keeping the current config")
    assert proxy.stderr.count("keeping the current config") == 1  # said once, by the supervisor
    denying = routing_config(served.port, tls_backend.port, workers=2)
    denying["rules"] = [{"match": "bench.test", "action": "deny"}]
    served.write_config(denying)
    proxy.signal(signal.SIGHUP)
    wait_until(
        lambda: proxy.stderr.count("reload: new policy") == 2,
        timeout=STARTUP_TIMEOUT,
        what="both workers to reload",
    )
    for _ in range(20):  # whichever worker accepts, the new policy refuses
        _assert_refused(served.port, client_context)
    status, _ = stop(proxy, signal.SIGTERM)
    assert status == 0, proxy.stderr


def _refused_for_the_limit(port: int, context: ssl.SSLContext) -> bool:
    """Whether a new connection is refused (a per-client or global limit): reset or closed
    before the TLS handshake completes."""
    try:
        conn, _ = https_get(port, context)
    except (ssl.SSLError, OSError):
        return True
    conn.close()
    return False


def test_per_client_limits_count_the_connections_of_every_worker(
    tls_backend: Backend,
    client_context: ssl.SSLContext,
    serve_config: Callable[..., ServedProxy],
) -> None:
    """per_client_connections is one limit for the whole proxy, whichever worker accepts:
    three connections are admitted, then none while they live, and after a worker is killed
    the connections it held no longer count."""
    limits = {"per_client_connections": 3, "per_client_rate": 0}
    served = serve_config(
        lambda port: routing_config(port, tls_backend.port, workers=2, limits=limits)
    )
    proxy = served.process
    proxy.wait_for_log("2 workers serving")
    held = [https_get(served.port, client_context)[0] for _ in range(3)]
    try:
        # Until both workers have refused one (the kernel picks the worker; up to 100 tries).
        attempts = 0
        while attempts < 100:
            attempts += 1
            assert _refused_for_the_limit(served.port, client_context)
            proxy.wait_for_records(attempts)
            refused = [r for r in proxy.access_log() if r["reason"] == "too_many_connections"]
            if {r["worker"] for r in refused} == {0, 1}:
                break
        assert len(refused) == attempts
        assert {r["worker"] for r in refused} == {0, 1}  # both workers refused: one count
        pids = _worker_pids(proxy)
        for index in (0, 1):
            os.kill(pids[index], signal.SIGKILL)
        wait_until(
            lambda: all(_worker_pids(proxy)[i] != pids[i] for i in (0, 1)),
            timeout=STARTUP_TIMEOUT,
            what="new workers",
        )
        given_back = re.findall(r"worker \d's (\d+) connection\(s\)", proxy.stderr)
        assert sum(int(n) for n in given_back) == 3
        again = [https_get(served.port, client_context)[0] for _ in range(3)]
        for conn in again:
            conn.close()
    finally:
        for conn in held:
            conn.close()
    status, _ = stop(proxy, signal.SIGTERM)
    assert status == 0, proxy.stderr


def test_workers_that_keep_dying_stop_the_proxy_with_status_1(
    tls_backend: Backend, tmp_path: Path, spawn_proxy: Callable[..., ProxyProcess]
) -> None:
    # Each worker refuses to start: the mode it must use is off, with no fallback.
    config = routing_config(
        free_port(),
        tls_backend.port,
        workers=2,
        forwarding={"mode": "kernel"},
        fallback_mode="none",
        ebpf={"sockmap": {"enabled": False}},
    )
    path = tmp_path / "dying.json"
    path.write_text(json.dumps(config), "utf-8")
    proxy = spawn_proxy("--config", str(path))
    assert proxy.wait(timeout=30) == 1
    assert "worker deaths within 60 s: stopping the proxy" in proxy.stderr
    assert "starting it again in 0.1 s" in proxy.stderr
    assert "starting it again in 0.2 s" in proxy.stderr


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


#: The build-info series this test run's proxies export.
BUILD_INFO = (
    f'trio_sni_build_info{{python="{platform.python_version()}",version="{trio_sni.__version__}"}}'
)


def _assert_promtool_accepts(metrics: str) -> None:
    """``promtool check metrics``: Prometheus's own lint of an exposition."""
    result = subprocess.run(
        [need("promtool"), "check", "metrics"],
        input=metrics,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _metric(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{series} not in /metrics")


def test_metrics_every_exporter_has(
    tls_backend: Backend,
    client_context: ssl.SSLContext,
    serve_config: Callable[..., ServedProxy],
) -> None:
    """process_* (fds, memory, CPU), build info, and whether the latest reload was applied."""
    status_port = free_port()
    base = f"http://127.0.0.1:{status_port}"

    def config(port: int) -> dict[str, Any]:
        return routing_config(port, tls_backend.port, status={"listen": f"127.0.0.1:{status_port}"})

    served = serve_config(config)
    proxy = served.process
    https_get_once(served.port, client_context)
    # The connection counts once its end is logged, which may be just after the answer.
    wait_until(
        lambda: "trio_sni_connection_duration_seconds_count 1.0" in _get(f"{base}/metrics")[1],
        timeout=STARTUP_TIMEOUT,
        what="the connection in /metrics",
    )
    _, metrics = _get(f"{base}/metrics")
    for series in ("process_open_fds", "process_resident_memory_bytes", "process_max_fds"):
        assert _metric(metrics, series) > 0
    assert "process_cpu_seconds_total " in metrics
    _assert_promtool_accepts(metrics)
    for stage in ("client_hello_wait", "resolve", "connect"):  # latency histograms
        assert _metric(metrics, f"trio_sni_{stage}_seconds_count") == 1
        assert _metric(metrics, f'trio_sni_{stage}_seconds_bucket{{le="+Inf"}}') == 1
    listener = f'trio_sni_listener_connections_total{{listener="127.0.0.1:{served.port}"}}'
    assert _metric(metrics, listener) == 1
    version = BUILD_INFO
    assert _metric(metrics, version) == 1
    assert _metric(metrics, "trio_sni_config_last_reload_successful") == 1
    started = _metric(metrics, "trio_sni_config_last_reload_success_timestamp_seconds")
    assert abs(started - time.time()) < 60
    served.write_config("{not json")
    proxy.signal(signal.SIGHUP)
    proxy.wait_for_log("keeping the current config")
    _, metrics = _get(f"{base}/metrics")
    assert _metric(metrics, "trio_sni_config_last_reload_successful") == 0
    time.sleep(0.01)
    served.write_config(config(served.port))
    proxy.signal(signal.SIGHUP)
    proxy.wait_for_log("reload: new policy")
    _, metrics = _get(f"{base}/metrics")
    assert _metric(metrics, "trio_sni_config_last_reload_successful") == 1
    assert _metric(metrics, "trio_sni_config_last_reload_success_timestamp_seconds") > started
    status, _ = stop(proxy, signal.SIGTERM)
    assert status == 0, proxy.stderr


def test_the_supervisors_status_endpoint_sums_every_worker(
    tls_backend: Backend,
    client_context: ssl.SSLContext,
    serve_config: Callable[..., ServedProxy],
) -> None:
    status_port = free_port()
    base = f"http://127.0.0.1:{status_port}"
    served = serve_config(
        lambda port: routing_config(
            port, tls_backend.port, workers=2, status={"listen": f"127.0.0.1:{status_port}"}
        )
    )
    proxy = served.process
    proxy.wait_for_log("2 workers serving")
    assert _get(f"{base}/readyz") == (200, "ready\n")
    responses = _requests_in_parallel(served.port, client_context, 60)
    assert all(r.startswith(b"HTTP/1.1 200 OK\r\n") for r in responses)
    held = [https_get(served.port, client_context)[0] for _ in range(12)]
    try:
        proxy.wait_for_records(60)
        _, metrics = _get(f"{base}/metrics")
        assert _metric(metrics, "trio_sni_connections_accepted_total") == 72
        assert _metric(metrics, "trio_sni_connections_active") == 12
        assert _metric(metrics, "trio_sni_workers") == 2
        per_worker = [
            _metric(metrics, f'trio_sni_worker_connections_active{{worker="{i}"}}') for i in (0, 1)
        ]
        assert sum(per_worker) == 12
        code, body = _get(f"{base}/connections")
        document = json.loads(body)
        assert (code, document["total"], len(document["connections"])) == (200, 12, 12)
        assert {row["worker"] for row in document["connections"]} <= {0, 1}
        code, body = _get(f"{base}/ebpf/status")
        assert code == 200
        assert [w["index"] for w in json.loads(body)["workers"]] == [0, 1]
        assert _get(f"{base}/nope")[0] == 404
        version = BUILD_INFO
        assert _metric(metrics, version) == 1  # worker 0's, not summed
        for i in (0, 1):  # per process, not summed
            assert _metric(metrics, f'process_open_fds{{worker="{i}"}}') > 0
            assert _metric(metrics, f'process_resident_memory_bytes{{worker="{i}"}}') > 0
        assert _metric(metrics, "trio_sni_config_last_reload_successful") == 1
        _assert_promtool_accepts(metrics)
        served.write_config("{not json")
        proxy.signal(signal.SIGHUP)
        proxy.wait_for_log("keeping the current config")
        _, metrics = _get(f"{base}/metrics")
        assert _metric(metrics, "trio_sni_config_last_reload_successful") == 0  # the supervisor's
        os.kill(_worker_pids(proxy)[1], signal.SIGKILL)
        wait_until(
            lambda: 'trio_sni_worker_restarts_total{worker="1"} 1.0' in _get(f"{base}/metrics")[1],
            timeout=STARTUP_TIMEOUT,
            what="the restart in /metrics",
        )
    finally:
        for conn in held:
            conn.close()
    status, _ = stop(proxy, signal.SIGTERM)
    assert status == 0, proxy.stderr


@pytest.mark.bpf
def test_the_supervisor_runs_xdp_and_tc_for_every_worker_through_restarts_and_reloads(
    tls_backend: Backend,
    client_context: ssl.SSLContext,
    serve_config: Callable[..., ServedProxy],
) -> None:
    """The guard and the shaper are attached once, by the supervisor: a killed worker 0 takes
    nothing down, a reload changes the lists in place, the supervisor's status shows them
    with their counters, and they are gone once the proxy has stopped."""
    status_port = free_port()
    base = f"http://127.0.0.1:{status_port}"
    with veth_namespace(1) as ns:

        def config(port: int, deny: list[str]) -> dict[str, Any]:
            return routing_config(
                port,
                tls_backend.port,
                workers=2,
                listeners=[
                    {"host": host, "port": port, "target_port": tls_backend.port}
                    for host in ("127.0.0.1", ns.host_v4)
                ],
                status={"listen": f"127.0.0.1:{status_port}"},
                clients={"deny": deny},
                ebpf={
                    "sockmap": {"enabled": False},
                    "xdp": {"enabled": True, "interface": ns.host_if},
                    "tc": {"enabled": True, "interface": ns.host_if, "per_client_bps": 10**8},
                },
            )

        def connects_from_the_namespace(port: int) -> bool:
            sock = ns.socket()
            with sock:
                sock.settimeout(1.0)  # a dropped SYN is retransmitted after 1 s
                try:
                    sock.connect((ns.host_v4, port))
                except TimeoutError:
                    return False
                return True

        served = serve_config(lambda port: config(port, [f"{ns.peer_v4}/32"]))
        proxy = served.process
        proxy.wait_for_log("2 workers serving")
        attached = xdp_prog_on(ns.host_if)
        assert attached is not None
        assert proxy.stderr.count("XDP guard attached") == 1, proxy.stderr  # the supervisor's
        assert proxy.stderr.count("TC shaper on ") == 1, proxy.stderr
        assert not connects_from_the_namespace(served.port)  # denied at the edge

        code, body = _get(f"{base}/ebpf/status")
        document = json.loads(body)
        assert code == 200
        assert (document["features"]["xdp"], document["features"]["tc"]) == ("active", "active")
        assert document["details"]["xdp"]["interface"] == ns.host_if
        assert document["maps"]["xdp_deny"]["entries"] == 1
        assert document["counters"]["xdp_dropped_denied"] >= 1
        _, metrics = _get(f"{base}/metrics")
        assert _metric(metrics, 'trio_sni_ebpf_feature_state{feature="xdp",state="active"}') == 1
        assert _metric(metrics, 'trio_sni_ebpf_feature_state{feature="tc",state="active"}') == 1
        assert _metric(metrics, 'trio_sni_ebpf_xdp_dropped_total{reason="denied"}') >= 1
        assert 'feature="xdp",state="disabled"' not in metrics  # the workers' view is replaced
        _assert_promtool_accepts(metrics)

        killed = _worker_pids(proxy)[0]
        os.kill(killed, signal.SIGKILL)
        wait_until(
            lambda: _worker_pids(proxy)[0] != killed, timeout=STARTUP_TIMEOUT, what="worker 0"
        )
        assert xdp_prog_on(ns.host_if) == attached  # still the supervisor's, never detached
        wait_until(lambda: _get(f"{base}/readyz")[0] == 200, timeout=STARTUP_TIMEOUT, what="readyz")
        assert https_get_once(served.port, client_context).startswith(b"HTTP/1.1 200 OK\r\n")

        served.write_config(config(served.port, []))
        proxy.signal(signal.SIGHUP)
        proxy.wait_for_log("reload: XDP guard lists and limits updated")
        assert xdp_prog_on(ns.host_if) == attached
        wait_until(
            lambda: connects_from_the_namespace(served.port),
            timeout=STARTUP_TIMEOUT,
            what="the namespace's client let through after the reload",
        )
        code, body = _get(f"{base}/ebpf/status")
        assert code == 200, body + proxy.stderr
        assert json.loads(body)["maps"]["xdp_deny"]["entries"] == 0

        status, _ = stop(proxy, signal.SIGTERM)
        assert status == 0, proxy.stderr
        assert xdp_prog_on(ns.host_if) is None
