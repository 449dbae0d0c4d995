"""What relaying an established QUIC flow costs the proxy: datagrams per second and CPU per GiB.

Run from a checkout (``python bench/bench_quic_relay.py --help``). It prints a table; it is a
measurement script, not a test. Method:

* The proxy runs as ``python -m trio_sni`` with one ``quic`` listener on loopback, in its own
  process, so its CPU time is read from ``/proc/<pid>/stat``. A UDP sink (this file,
  ``--sink``, another process) counts what arrives; the sender is this process.
* The sender opens a flow with a real client Initial (the ClientHello of
  ``tests/data/hellos/curl.bin`` in a QUIC v1 Initial built by ``tests/quictest.py``, padded
  to 1200 bytes), then sends ``--datagrams`` datagrams of ``--size`` bytes from the same
  socket, at most ``--rate`` per second. Once the flow is routed, the proxy relays every
  datagram of it unchanged without parsing it, which is what is measured.
* Systems (``--systems``): ``direct`` sends the same datagrams to the sink without the proxy;
  ``userspace`` is the proxy relaying the flow itself (kernel forwarding off); ``kernel`` is
  the proxy in kernel mode, where the QUIC sockhash redirects the flow's datagrams (root).
  Each proxy is its own process on its own port. Rounds alternate.
* Reported: datagrams per second that reached the sink, the share lost (UDP on loopback drops
  what a full receive buffer cannot take), and the proxy's CPU seconds per GiB delivered.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

NAME = "x.test"
DONE = b"\xffdone"


def sink(port_out: int) -> None:
    """Count datagrams until one says DONE; print the counts as JSON."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        sock.bind(("127.0.0.1", port_out))
        print(json.dumps({"port": sock.getsockname()[1]}), flush=True)
        while True:
            count = size = 0
            first = last = 0.0
            while True:
                data = sock.recv(65536)
                if data == DONE:
                    break
                if not count:
                    first = time.monotonic()
                last = time.monotonic()
                count += 1
                size += len(data)
            print(json.dumps({"count": count, "bytes": size, "seconds": last - first}), flush=True)


def proxy_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def send(target: tuple[str, int], first: bytes, datagrams: int, size: int, rate: int) -> float:
    """Send ``first``, then ``datagrams`` of ``size`` bytes paced at ``rate``; the seconds."""
    payload = b"\x40" + os.urandom(size - 1)  # a short-header packet, as after the handshake
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
        sock.connect(target)
        if first:
            sock.send(first)
            time.sleep(0.2)  # routed (resolve, connect) before the stream starts
        started = time.monotonic()
        burst = max(1, rate // 1000)
        for i in range(0, datagrams, burst):
            for _ in range(min(burst, datagrams - i)):
                sock.send(payload)
            ahead = started + (i + burst) / rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
        seconds = time.monotonic() - started
        time.sleep(0.3)  # let the relay finish before the sink is told
    return seconds


def start_proxy(system: str, sink_port: int) -> tuple[subprocess.Popen[bytes], int, str]:
    """``python -m trio_sni`` relaying one ``quic`` listener to the sink: ``userspace`` with
    kernel forwarding off, ``kernel`` in kernel mode; ``(process, port, config path)``."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = {
        "workers": 1,
        "listeners": [{"host": "127.0.0.1", "port": port, "protocol": "quic"}],
        "rules": [{"match": NAME, "target": f"127.0.0.1:{sink_port}", "allow_private": True}],
        "limits": {"per_client_rate": 0, "per_client_connections": 0},
        "timeouts": {"quic_idle": 2},
        "log": {"access_log": None, "level": "warning"},
        "ebpf": {"enabled": system == "kernel", "dns_cache": {"enabled": False}},
        "forwarding": {"mode": "kernel" if system == "kernel" else "splice"},
        "fallback_mode": "none",
    }
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(config, f)
    proc = subprocess.Popen([sys.executable, "-m", "trio_sni", "--config", f.name])
    return proc, port, f.name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sink", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--datagrams", type=int, default=200_000)
    parser.add_argument("--size", type=int, default=1200)
    parser.add_argument("--rate", type=int, default=100_000, help="datagrams per second at most")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--systems", default="direct,userspace,kernel")
    args = parser.parse_args()
    if args.sink:
        sink(0)
        return
    from quictest import crypto, handshake_message, initial, padded

    first = padded(initial(crypto(0, handshake_message("curl.bin"))))
    sink_proc = subprocess.Popen(
        [sys.executable, __file__, "--sink"], stdout=subprocess.PIPE, text=True
    )
    assert sink_proc.stdout is not None
    sink_port = json.loads(sink_proc.stdout.readline())["port"]
    systems = args.systems.split(",")
    proxies: dict[str, tuple[subprocess.Popen[bytes], int, str]] = {}
    results: dict[str, list[tuple[float, float, float]]] = {system: [] for system in systems}
    try:
        for system in systems:
            if system != "direct":
                proxies[system] = start_proxy(system, sink_port)
        time.sleep(2)
        for _round in range(args.rounds):
            for system in systems:
                pid, port = (0, sink_port) if system == "direct" else proxies[system][:2]
                if system != "direct":
                    pid = proxies[system][0].pid
                cpu0 = proxy_cpu(pid) if pid else 0.0
                opening = b"" if system == "direct" else first
                send(("127.0.0.1", port), opening, args.datagrams, args.size, args.rate)
                cpu = proxy_cpu(pid) - cpu0 if pid else 0.0
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as done:
                    done.sendto(DONE, ("127.0.0.1", sink_port))
                got = json.loads(sink_proc.stdout.readline())
                if system != "direct":
                    got["count"] -= 1  # the Initial
                    got["bytes"] -= len(first)
                rate = got["count"] / got["seconds"] if got["seconds"] else 0.0
                lost = 1 - got["count"] / args.datagrams
                per_gib = cpu / (got["bytes"] / (1 << 30)) if got["bytes"] else float("nan")
                results[system].append((rate, lost, per_gib))
                time.sleep(2.5)  # the flow's idle timeout: the next round opens a new one
    finally:
        for proc, _port, path in proxies.values():
            proc.terminate()
            proc.wait(10)
            os.unlink(path)
        sink_proc.kill()
    print(
        f"\n{args.datagrams} datagrams of {args.size} bytes at most {args.rate}/s, "
        f"{args.rounds} rounds; median (min-max)"
    )
    print("| measure | " + " | ".join(systems) + " |\n|---|" + "---|" * len(systems))
    for index, label, fmt in (
        (0, "datagrams/s delivered", "{:.0f}"),
        (1, "lost", "{:.1%}"),
        (2, "proxy CPU s per GiB delivered", "{:.2f}"),
    ):
        cells = []
        for system in results:
            values = [r[index] for r in results[system]]
            if system == "direct" and index == 2:
                cells.append("-")
                continue
            med = statistics.median(values)
            cells.append(f"{fmt.format(med)} ({fmt.format(min(values))}-{fmt.format(max(values))})")
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
