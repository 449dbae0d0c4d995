"""What an idle forwarded connection costs the proxy in memory and tasks, per forwarding mode.

Run from a checkout (``python bench/bench_idle_memory.py --help``; as root for ``kernel``). It
prints a table; it is a measurement script, not a test. Method:

* The proxy runs in this process (``trio_sni.server.Proxy``, access log off); the clients and
  the backend run in a second process (this file, ``--peers``), so this process's memory is
  the proxy's alone.
* Each connection: the client sends a real ClientHello (``tests/data/hellos/curl.bin``) from
  its own source address in 127.0.0.0/8, the backend reads it and answers 2 bytes, the client
  reads them; then every connection stays open and idle.
* Reported per mode: the proxy's RSS growth (``VmRSS``, after a garbage collection) divided
  by the number of connections, the Trio tasks alive while they are held, and, with
  ``--python-heap``, the Python heap growth per connection (``tracemalloc``; it costs memory
  of its own, so the RSS column is then higher) and the lines that allocated most.

The shared peer harness's ``idle`` scenario (``bench/bench_tls_peers.sh -s idle``) measures
the same thing over TLS beside HAProxy and nginx; this script is the quick one to run while
changing the code.
"""

from __future__ import annotations

import argparse
import gc
import socket
import subprocess
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import trio

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
HELLO = (HERE.parent / "tests" / "data" / "hellos" / "curl.bin").read_bytes()
HELLO_NAME = "x.test"


def rss_kib() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


# ------------------------------------------------------------------------------------------
# The peers (a separate process): open N connections through the proxy and hold them


def peers_main(port: int, backend_port: int, n: int) -> None:
    listener = socket.create_server(("127.0.0.1", backend_port), backlog=4096)
    print("ready", flush=True)
    sys.stdin.readline()
    held = []
    for i in range(n):
        client = socket.socket()
        client.bind((f"127.{1 + i // 62500}.{1 + i // 250 % 250}.{1 + i % 250}", 0))
        client.connect(("127.0.0.1", port))
        client.sendall(HELLO)
        server, _ = listener.accept()
        got = 0
        while got < len(HELLO):
            chunk = server.recv(65536)
            if not chunk:
                raise SystemExit("the proxy closed a connection")
            got += len(chunk)
        server.sendall(b"hi")
        assert client.recv(2) == b"hi"
        held.append((client, server))
    print("open", flush=True)
    sys.stdin.readline()


# ------------------------------------------------------------------------------------------
# The proxy (this process)


def config(mode: str, backend_port: int, n: int) -> dict[str, Any]:
    data: dict[str, Any] = {
        "listeners": [{"host": "127.0.0.1", "port": 0, "target_port": backend_port}],
        "rules": [{"match": HELLO_NAME, "target": "127.0.0.1", "allow_private": True}],
        "limits": {"per_client_rate": 0, "per_client_connections": 0},
        "forwarding": {"mode": mode},
        "fallback_mode": "none",
        "log": {"access_log": None},
        "max_connections": max(50000, n),
    }
    if mode != "kernel":
        data["ebpf"] = {"sockmap": {"enabled": False}}
    return data


async def measure(mode: str, n: int, python_heap: bool) -> dict[str, Any]:
    from trio_sni.sansio.config_load import load_config
    from trio_sni.server import Proxy

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        backend_port = probe.getsockname()[1]
    proxy = Proxy(load_config(config(mode, backend_port, n)))
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(proxy.serve)
        port = listeners[0].socket.getsockname()[1]
        peers = await trio.lowlevel.open_process(
            [sys.executable, __file__, "--peers", str(port), str(backend_port), str(n)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert peers.stdin is not None
        assert peers.stdout is not None
        lines = b""

        async def expect(word: bytes) -> None:
            nonlocal lines
            while b"\n" not in lines:
                chunk = await peers.stdout.receive_some(100)
                if not chunk:
                    raise RuntimeError("the peers process died")
                lines += chunk
            line, lines = lines.split(b"\n", 1)
            assert line == word, line

        await expect(b"ready")
        gc.collect()
        if python_heap:
            tracemalloc.start()
        rss0 = rss_kib()
        heap0 = tracemalloc.get_traced_memory()[0] if python_heap else 0
        await peers.stdin.send_all(b"\n")
        await expect(b"open")
        await trio.sleep(1.0)  # let every hand-off finish
        gc.collect()
        result = {
            "mode": mode,
            "live": len(proxy.context.live),
            "tasks": trio.lowlevel.current_statistics().tasks_living,
            "rss_kib": (rss_kib() - rss0) / n,
        }
        if python_heap:
            result["heap_kib"] = (tracemalloc.get_traced_memory()[0] - heap0) / 1024 / n
            result["top"] = tracemalloc.take_snapshot().statistics("lineno")[:10]
            tracemalloc.stop()
        await peers.stdin.send_all(b"\n")
        await peers.wait()
        proxy.shutdown()
    return result


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--peers":
        peers_main(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", default="kernel,splice,copy")
    parser.add_argument("--connections", type=int, default=3000)
    parser.add_argument("--python-heap", action="store_true", help="also trace the Python heap")
    args = parser.parse_args()
    print(f"{args.connections} idle connections held through the proxy")
    print(f"{'mode':<8} {'live':>6} {'tasks':>6} {'RSS KiB/conn':>13}", end="")
    print(f" {'heap KiB/conn':>14}" if args.python_heap else "")
    for mode in args.modes.split(","):
        r = trio.run(measure, mode, args.connections, args.python_heap)
        print(f"{r['mode']:<8} {r['live']:>6} {r['tasks']:>6} {r['rss_kib']:>13.2f}", end="")
        print(f" {r['heap_kib']:>14.2f}" if args.python_heap else "")
        for stat in r.get("top", []):
            print(f"    {stat}")


if __name__ == "__main__":
    main()
