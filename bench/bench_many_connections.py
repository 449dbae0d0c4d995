"""Many concurrent connections through one proxy with workers: memory per connection, time.

Run from a checkout as root (``python bench/bench_many_connections.py --help``); it prints
numbers, it is not a test. Method:

* The proxy runs as ``python -m trio_sni`` with ``workers`` (a process may hold at most the
  fd limit, ``ulimit -n``; a proxied connection needs two fds), kernel mode by default,
  access log off.
* Backends: processes sharing one port with ``SO_REUSEPORT`` on every loopback address; the
  proxy reaches them on several target addresses (127.0.2.x, one per 20,000 connections:
  a source address can have only as many connections to one address and port as it has
  ephemeral ports).
* Clients: processes that each open their share of the connections, from source addresses
  spread over 127.1.0.0/16, one after the other: a real ClientHello, the backend reads it and
  answers 2 bytes, the client reads them. Once every connection is open, each client sends
  one request (4 bytes) on each and reads the 4-byte answer.
* Printed: the time to open them all, the proxy's RSS (supervisor and workers) per
  connection over its idle baseline, the kernel's memory for them (TCP buffers from
  ``/proc/net/sockstat``, slab from ``/proc/meminfo``; all four sockets of a connection, the
  peers' included) and each proxy process's RSS.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from proxytest import client_hello  # noqa: E402  (a real ClientHello, as the tests send)

PER_PROCESS = 9000  # connections per client or backend process (two fds each at most)
PER_TARGET = 20000  # connections per target address


# ------------------------------------------------------------------------------------------
# Peers


def backend_main(port: int, hello_size: int) -> None:
    """Accept, read the ClientHello, answer "hi"; later answer each "ping" with "pong"."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    listener.bind(("0.0.0.0", port))
    listener.listen(4096)
    listener.setblocking(False)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ, None)
    got: dict[socket.socket, int] = {}
    print("ready", flush=True)
    while True:
        for key, _ in selector.select():
            if key.data is None:
                try:
                    conn, _ = listener.accept()
                except BlockingIOError:
                    continue
                conn.setblocking(False)
                got[conn] = 0
                selector.register(conn, selectors.EVENT_READ, "conn")
                continue
            conn = key.fileobj  # type: ignore[assignment]
            try:
                data = conn.recv(65536)
            except BlockingIOError:
                continue
            if not data:
                selector.unregister(conn)
                conn.close()
                got.pop(conn, None)
                continue
            before = got[conn]
            got[conn] = before + len(data)
            if before < hello_size <= got[conn]:
                conn.send(b"hi")
            if b"ping" in data:
                conn.send(b"pong")


def client_main(port: int, first: int, count: int, names: list[str]) -> None:
    hellos = [client_hello(name) for name in names]
    held = []
    started = time.monotonic()
    for i in range(first, first + count):
        conn = socket.socket()
        conn.setsockopt(socket.IPPROTO_IP, 24, 1)  # IP_BIND_ADDRESS_NO_PORT
        conn.bind((f"127.1.{i // 250 % 250}.{1 + i % 250}", 0))
        conn.settimeout(60)
        conn.connect(("127.0.0.1", port))
        conn.sendall(hellos[i % len(hellos)])
        if _receive(conn, 2) != b"hi":
            raise SystemExit("no answer from the backend")
        held.append(conn)
    print(f"open {time.monotonic() - started:.3f}", flush=True)
    sys.stdin.readline()
    for conn in held:
        conn.sendall(b"ping")
    for conn in held:
        if _receive(conn, 4) != b"pong":
            raise SystemExit("no answer to a request")
    print("answered", flush=True)
    sys.stdin.readline()


def _receive(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


# ------------------------------------------------------------------------------------------
# The run


def tree_rss_kib(pid: int) -> tuple[int, dict[int, int]]:
    """VmRSS of ``pid`` and of each child, KiB."""
    children = [
        int(p)
        for p in os.listdir("/proc")
        if p.isdigit() and _status(int(p)).get("PPid") == str(pid)
    ]
    rss = {p: int(_status(p).get("VmRSS", "0 kB").split()[0]) for p in [pid, *children]}
    return sum(rss.values()), rss


def _status(pid: int) -> dict[str, str]:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


def tcp_memory_kib() -> int:
    for line in Path("/proc/net/sockstat").read_text().splitlines():
        if line.startswith("TCP:"):
            fields = line.split()
            return int(fields[fields.index("mem") + 1]) * os.sysconf("SC_PAGESIZE") // 1024
    return 0


def slab_kib() -> int:
    """The kernel's slab memory (sockets, their files, epoll items, ...), KiB."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("Slab:"):
            return int(line.split()[1])
    return 0


def spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, __file__, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--backend":
        backend_main(int(sys.argv[2]), int(sys.argv[3]))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        client_main(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=0, help="default: enough for the fds")
    parser.add_argument("--mode", default="kernel")
    args = parser.parse_args()
    n = args.connections
    fd_limit = os.sysconf("SC_OPEN_MAX")
    workers = args.workers or math.ceil(n / ((fd_limit - 512) // 2)) + 1
    targets = [f"127.0.2.{t + 1}" for t in range(math.ceil(n / PER_TARGET))]
    names = [f"t{t}.many.test" for t in range(len(targets))]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        proxy_port = probe.getsockname()[1]
    with socket.socket() as probe:
        probe.bind(("0.0.0.0", 0))
        backend_port = probe.getsockname()[1]
    config = {
        "listeners": [{"host": "127.0.0.1", "port": proxy_port, "target_port": backend_port}],
        "rules": [
            {"match": name, "target": target, "allow_private": True}
            for name, target in zip(names, targets, strict=True)
        ],
        "workers": workers,
        "max_connections": n,
        "limits": {"per_client_rate": 0, "per_client_connections": 0},
        "forwarding": {"mode": args.mode},
        "fallback_mode": "none",
        "timeouts": {"idle": 3600, "client_hello": 60},
        "log": {"access_log": None, "level": "warning"},
    }
    if args.mode != "kernel":
        config["ebpf"] = {"sockmap": {"enabled": False}}
    backends = [
        spawn("--backend", str(backend_port), str(len(client_hello(names[0]))))
        for _ in range(math.ceil(n / PER_PROCESS))
    ]
    for b in backends:
        assert b.stdout is not None
        assert b.stdout.readline().strip() == "ready"
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as file:
        json.dump(config, file)
    proxy = subprocess.Popen(
        [sys.executable, "-m", "trio_sni", "--config", file.name], cwd=HERE.parent
    )
    clients: list[subprocess.Popen[str]] = []
    try:
        _wait_listening(proxy_port)
        time.sleep(2)
        rss0, _ = tree_rss_kib(proxy.pid)
        tcp0, slab0 = tcp_memory_kib(), slab_kib()
        shares = [min(PER_PROCESS, n - i) for i in range(0, n, PER_PROCESS)]
        started = time.monotonic()
        first = 0
        for share in shares:
            clients.append(spawn("--client", str(proxy_port), str(first), str(share), *names))
            first += share
        for c in clients:
            assert c.stdout is not None
            line = c.stdout.readline()
            if not line.startswith("open"):
                raise SystemExit(f"a client failed: {line!r}")
        opened = time.monotonic() - started
        time.sleep(2)
        rss1, per_process = tree_rss_kib(proxy.pid)
        tcp1, slab1 = tcp_memory_kib(), slab_kib()
        for c in clients:
            assert c.stdin is not None
            c.stdin.write("\n")
            c.stdin.flush()
        for c in clients:
            assert c.stdout is not None
            assert c.stdout.readline().strip() == "answered"
        print(f"{n} connections through {workers} workers ({args.mode} mode), all answered")
        print(f"time to open them all: {opened:.1f} s ({n / opened:.0f} per second)")
        print(
            f"proxy RSS: {rss0 / 1024:.0f} MiB idle, {rss1 / 1024:.0f} MiB with them: "
            f"{(rss1 - rss0) / n:.2f} KiB per connection"
        )
        print(
            f"kernel: TCP buffers (sockstat) {(tcp1 - tcp0) / n:.2f} KiB, slab (sockets, "
            f"files, epoll) {(slab1 - slab0) / n:.2f} KiB per connection (its 4 sockets: "
            "client, proxy x2, backend)"
        )
        print("RSS per process (KiB):", sorted(per_process.values()))
    finally:
        for c in clients:
            c.kill()
        proxy.send_signal(signal.SIGINT)
        proxy.send_signal(signal.SIGINT)
        proxy.wait(60)
        for b in backends:
            b.kill()
        os.unlink(file.name)


def _wait_listening(port: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise SystemExit("the proxy did not start")


if __name__ == "__main__":
    main()
