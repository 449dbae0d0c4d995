"""Forwarding modes side by side: no proxy, userspace copy, splice(2), kernel (BPF sockhash).

Run as root from a checkout (``python bench/bench_forwarders.py --help``). Prints one table;
it is a measurement script, not a test. Method:

* Everything on loopback. A backend process (this file, ``--serve-backend``) serves each
  connection by reading the ClientHello (a real capture) and then doing what the client's first
  bytes ask: ``B`` bulk download of N bytes, ``P`` 100-byte ping-pong echo, ``S`` a paced
  stream. The proxy runs as ``python -m trio_sni --config ...`` in its own process, so its CPU
  time is read from ``/proc/<pid>/stat``; machine CPU from ``/proc/stat`` (all CPUs, busy time:
  it includes the kernel workers that send redirected skbs).
* Modes: ``direct`` (client to backend), ``copy`` (``ebpf.sockmap.enabled: false``),
  ``splice`` (``forwarding.mode: splice``: splice(2) through a 1 MiB pipe per direction),
  ``kernel`` (default config: 4 MiB in-flight bound, so a bulk transfer is handed to userspace
  once it outruns the redirect worker) and ``kernel-unbounded`` (bound 1 TiB: every byte in the
  kernel; what the data plane does without the memory bound).
* Rounds alternate the modes (A B C A B C ...); the table shows the median and min-max.
* Rows: bulk download throughput (1 and 4 streams); CPU seconds per GiB (proxy process, whole
  machine); 100-byte ping-pong round trip p50/p99; many connections: N concurrent connections
  each receiving a paced stream (about 1 MB/s) for T seconds, proxy CPU seconds per second
  over the whole run (opening and closing the connections included) and while streaming only
  (the middle half of the T seconds, once every connection is open; CPU time from
  ``/proc/<pid>/task/*/schedstat``, in nanoseconds rather than clock ticks).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
HELLO = (HERE.parent / "tests" / "data" / "hellos" / "curl.bin").read_bytes()
HELLO_NAME = "x.test"
MiB = 1024 * 1024
TICK = os.sysconf("SC_CLK_TCK")

# ------------------------------------------------------------------------------------------
# Backend (a separate process)


def _recv_exactly(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def _serve_one(conn: socket.socket, blob: memoryview) -> None:
    try:
        _recv_exactly(conn, len(HELLO))
        kind = _recv_exactly(conn, 1)
        if kind == b"B":
            size = int.from_bytes(_recv_exactly(conn, 8), "little")
            while size > 0:
                n = conn.send(blob[: min(size, len(blob))])
                size -= n
        elif kind == b"P":
            while True:
                msg = conn.recv(100)
                if not msg:
                    break
                conn.sendall(msg)
        elif kind == b"S":
            rate, seconds = (int.from_bytes(_recv_exactly(conn, 8), "little") for _ in range(2))
            chunk = bytes(blob[: rate // 10])
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                conn.sendall(chunk)
                time.sleep(0.1)
        conn.shutdown(socket.SHUT_WR)
        while conn.recv(65536):
            pass
    except (EOFError, OSError):
        pass
    finally:
        conn.close()


def serve_backend() -> None:
    server = socket.create_server(("127.0.0.1", 0), backlog=4096)
    print(server.getsockname()[1], flush=True)
    blob = memoryview(os.urandom(4 * MiB))
    while True:
        conn, _ = server.accept()
        threading.Thread(target=_serve_one, args=(conn, blob), daemon=True).start()


# ------------------------------------------------------------------------------------------
# Proxy processes


def start_proxy(mode: str, backend_port: int, tmp: Path) -> tuple[subprocess.Popen[bytes], int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config: dict[str, object] = {
        "workers": 1,
        "listeners": [{"host": "127.0.0.1", "port": port, "target_port": backend_port}],
        "rules": [{"match": HELLO_NAME, "allow_private": True}],
        "resolver": {"hosts": {HELLO_NAME: ["127.0.0.1"]}},
        "limits": {"per_client_rate": 0, "per_client_connections": 0},
        "log": {"access_log": None, "level": "warning"},
        "fallback_mode": "none" if mode != "copy" else "auto",
        "ebpf": {
            "sockmap": {
                "enabled": mode.startswith("kernel"),
                **({"max_in_flight": 1 << 40} if mode == "kernel-unbounded" else {}),
            }
        },
        # splice: splice(2) through a 1 MiB pipe per direction (the default pipe_size)
        "forwarding": {"mode": "splice" if mode == "splice" else "auto"},
    }
    path = tmp / f"{mode}.json"
    path.write_text(json.dumps(config))
    proc = subprocess.Popen([sys.executable, "-m", "trio_sni", "--config", str(path)])
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"proxy ({mode}) did not start")


def proc_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def proc_cpu_exact(pid: int) -> float:
    """CPU seconds of every thread of ``pid`` (scheduler statistics, nanoseconds)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):
            total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


def machine_cpu() -> float:
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / TICK


# ------------------------------------------------------------------------------------------
# Workloads (clients in this process, threads)


def _open(port: int, kind: bytes, extra: bytes = b"") -> socket.socket:
    conn = socket.create_connection(("127.0.0.1", port))
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn.sendall(HELLO + kind + extra)
    return conn


def bulk(port: int, streams: int, size: int) -> float:
    """Seconds to download ``size`` bytes on each of ``streams`` connections at once."""
    done = [0] * streams

    def one(i: int) -> None:
        conn = _open(port, b"B", size.to_bytes(8, "little"))
        buf = bytearray(4 * MiB)
        got = 0
        while n := conn.recv_into(buf):
            got += n
        conn.close()
        done[i] = got

    threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    assert done == [size] * streams, done
    return elapsed


def ping_pong(port: int, count: int) -> list[float]:
    conn = _open(port, b"P")
    msg = os.urandom(100)
    times = []
    for _ in range(count):
        t = time.perf_counter()
        conn.sendall(msg)
        got = b""
        while len(got) < 100:
            got += conn.recv(100 - len(got))
        times.append(time.perf_counter() - t)
    conn.close()
    return times


def paced(
    port: int, conns: int, rate: int, seconds: int, opened: threading.Event | None = None
) -> int:
    """``conns`` connections each receiving ``rate`` bytes/s for ``seconds``; bytes received.

    ``opened`` is set once every connection is open (and streaming)."""
    import selectors

    sel = selectors.DefaultSelector()
    socks = []
    for _ in range(conns):
        s = _open(port, b"S", rate.to_bytes(8, "little") + seconds.to_bytes(8, "little"))
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
        socks.append(s)
    if opened is not None:
        opened.set()
    total, open_count = 0, conns
    buf = bytearray(1 << 20)
    while open_count:
        for key, _ in sel.select(timeout=5):
            ready = key.fileobj
            assert isinstance(ready, socket.socket)
            try:
                n = ready.recv_into(buf)
            except BlockingIOError:
                continue
            if n == 0:
                sel.unregister(ready)
                ready.close()
                open_count -= 1
            total += n
    return total


# ------------------------------------------------------------------------------------------


def measure(mode: str, port: int, pid: int | None, args: argparse.Namespace) -> dict[str, float]:
    out: dict[str, float] = {}
    for streams in (1, 4):
        size = args.bulk_mib * MiB // streams
        c0, m0 = (proc_cpu(pid) if pid else 0.0), machine_cpu()
        elapsed = bulk(port, streams, size)
        c1, m1 = (proc_cpu(pid) if pid else 0.0), machine_cpu()
        gib = size * streams / (1 << 30)
        out[f"bulk{streams}_gbps"] = size * streams * 8 / elapsed / 1e9
        out[f"bulk{streams}_proxy_cpu_per_gib"] = (c1 - c0) / gib
        out[f"bulk{streams}_machine_cpu_per_gib"] = (m1 - m0) / gib
    times = sorted(ping_pong(port, args.pings))
    out["ping_p50_us"] = times[len(times) // 2] * 1e6
    out["ping_p99_us"] = times[int(len(times) * 0.99)] * 1e6
    if args.paced_conns and pid:
        # Whole run (connection setup and teardown included), and the steady state: the
        # middle half of the streaming time, once every connection is open.
        opened = threading.Event()
        c0, t0 = proc_cpu(pid), time.perf_counter()
        run = threading.Thread(
            target=paced,
            args=(port, args.paced_conns, args.paced_rate, args.paced_seconds, opened),
        )
        run.start()
        opened.wait()
        time.sleep(args.paced_seconds / 4)
        s0, w0 = proc_cpu_exact(pid), time.perf_counter()
        time.sleep(args.paced_seconds / 2)
        s1, w1 = proc_cpu_exact(pid), time.perf_counter()
        run.join()
        out["paced_proxy_cpu_per_s"] = (proc_cpu(pid) - c0) / (time.perf_counter() - t0)
        out["paced_steady_proxy_cpu_per_s"] = (s1 - s0) / (w1 - w0)
    elif args.paced_conns:
        paced(port, args.paced_conns, args.paced_rate, args.paced_seconds)
    return out


ROWS = [
    ("bulk1_gbps", "bulk download, 1 stream (Gbit/s)"),
    ("bulk4_gbps", "bulk download, 4 streams (Gbit/s)"),
    ("bulk1_proxy_cpu_per_gib", "proxy CPU s/GiB, 1 stream"),
    ("bulk4_proxy_cpu_per_gib", "proxy CPU s/GiB, 4 streams"),
    ("bulk1_machine_cpu_per_gib", "machine CPU s/GiB, 1 stream"),
    ("bulk4_machine_cpu_per_gib", "machine CPU s/GiB, 4 streams"),
    ("ping_p50_us", "100 B ping-pong p50 (µs)"),
    ("ping_p99_us", "100 B ping-pong p99 (µs)"),
    ("paced_proxy_cpu_per_s", "paced conns: proxy CPU (s per s)"),
    ("paced_steady_proxy_cpu_per_s", "paced conns, streaming only: proxy CPU (s per s)"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve-backend", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--bulk-mib", type=int, default=1024, help="per bulk run (split over streams)"
    )
    parser.add_argument("--pings", type=int, default=2000)
    parser.add_argument("--paced-conns", type=int, default=1000)
    parser.add_argument("--paced-rate", type=int, default=1_000_000, help="bytes/s per connection")
    parser.add_argument("--paced-seconds", type=int, default=30)
    parser.add_argument("--modes", default="direct,copy,splice,kernel,kernel-unbounded")
    args = parser.parse_args()
    if args.serve_backend:
        serve_backend()
        return
    import resource

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    modes = args.modes.split(",")
    backend = subprocess.Popen(
        [sys.executable, __file__, "--serve-backend"], stdout=subprocess.PIPE, text=True
    )
    assert backend.stdout is not None
    backend_port = int(backend.stdout.readline())
    results: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(args.rounds):
                for mode in modes:
                    if mode == "direct":
                        port, proc = backend_port, None
                    else:
                        proc, port = start_proxy(mode, backend_port, Path(tmp))
                    try:
                        print(f"round {r + 1}/{args.rounds}: {mode}", file=sys.stderr)
                        results[mode].append(measure(mode, port, proc.pid if proc else None, args))
                    finally:
                        if proc is not None:
                            proc.terminate()
                            proc.wait(timeout=30)
    finally:
        backend.kill()
        backend.wait()
    print(
        f"\n{args.rounds} rounds, alternating; median (min-max). bulk {args.bulk_mib} MiB; "
        f"{args.pings} pings; {args.paced_conns} paced connections x "
        f"{args.paced_rate / 1e6:g} MB/s x {args.paced_seconds} s\n"
    )
    print("| measure | " + " | ".join(modes) + " |")
    print("|---|" + "---|" * len(modes))
    for key, label in ROWS:
        cells = []
        for mode in modes:
            values = [run[key] for run in results[mode] if key in run]
            if not values or (mode == "direct" and "proxy" in key):
                cells.append("-")
                continue
            med = statistics.median(values)
            cells.append(f"{med:.3g} ({min(values):.3g}-{max(values):.3g})")
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
