"""The TC shaper measured: a capped client next to an uncapped one, for several caps.

Run as root from a checkout (``python bench/bench_tc.py --help``). Prints one table; it is a
measurement script, not a test. Method:

* A network namespace joined by a veth pair (``tests/netns.py``: documentation addresses, no
  route out, removed at the end). The proxy runs as ``python -m trio_sni --config ...`` in its
  own process, listening on the host end, with ``ebpf.tc`` on that interface's egress; its
  status endpoint (``/metrics``) gives the shaper's counters.
* A backend thread on loopback sends a random payload after the ClientHello. Two clients in
  the namespace (threads, blocking sockets) download at the same time from the same address:
  ``capped.test`` (QoS class ``normal``, capped at ``per_client_bps``) and ``fast.test``
  (class ``high``, not capped). The capped client fetches ``--seconds`` worth of its cap, the
  fast one ``--fast-mib``.
* Each cap runs ``--rounds`` times (caps alternating); the table shows the median and min-max,
  and the packets the shaper dropped for the capped class per round.
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
import threading
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the namespace and ClientHello helpers of the tests

from netns import VethNamespace, veth_namespace  # noqa: E402
from proxytest import client_hello  # noqa: E402

MiB = 1024 * 1024
NAMES = {"capped.test": "normal", "fast.test": "high"}


def download(ns: VethNamespace, port: int, name: str, size: int, out: dict[str, float]) -> None:
    sock = ns.socket()
    with sock:
        sock.connect((ns.host_v4, port))
        sock.sendall(client_hello(name))
        started = time.monotonic()
        buf = bytearray(4 * MiB)
        got = 0
        while n := sock.recv_into(buf):
            got += n
        out[name] = got * 8 / (time.monotonic() - started) / 1e6
    if got != size:
        raise RuntimeError(f"{name}: {got} of {size} bytes")


def dropped_packets(status: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{status}/metrics", timeout=5) as answer:
        for line in answer.read().decode().splitlines():
            if line.startswith("trio_sni_ebpf_tc_packets_total") and (
                'class="normal"' in line and 'verdict="dropped"' in line
            ):
                return int(float(line.rsplit(" ", 1)[1]))
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--caps", default="10,20,50,100", help="Mbit/s, comma-separated")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0, help="capped download length")
    parser.add_argument("--fast-mib", type=int, default=64)
    args = parser.parse_args()
    caps = [int(float(c) * 1e6) for c in args.caps.split(",")]
    sizes = {cap: int(cap / 8 * args.seconds) for cap in caps}
    fast_size = args.fast_mib * MiB
    payloads = {size: memoryview(os.urandom(size)) for size in {*sizes.values(), fast_size}}
    results: dict[int, list[tuple[float, float, int]]] = {cap: [] for cap in caps}
    with veth_namespace(0) as ns, tempfile.TemporaryDirectory() as tmp:
        # One backend listener per payload size; each rule targets its client's.
        backends = {}
        for size in payloads:
            server = socket.create_server(("127.0.0.1", 0))
            threading.Thread(target=serve_sized, args=(server, payloads[size]), daemon=True).start()
            backends[size] = server
        for r in range(args.rounds):
            for cap in caps:
                print(f"round {r + 1}/{args.rounds}: cap {cap / 1e6:g} Mbit/s", file=sys.stderr)
                results[cap].append(measure(ns, backends, sizes[cap], fast_size, cap, Path(tmp)))
        for server in backends.values():
            server.close()
    print(
        f"\n{args.rounds} rounds; median (min-max). Capped client: {args.seconds:g} s of its "
        f"cap; fast client (class high, no cap): {args.fast_mib} MiB at the same time.\n"
    )
    print(
        "| cap (Mbit/s) | capped client (Mbit/s) | capped / cap | fast client (Mbit/s) "
        "| packets dropped per round |"
    )
    print("|---|---|---|---|---|")
    for cap in caps:
        capped = [c for c, _, _ in results[cap]]
        fast = [f for _, f, _ in results[cap]]
        drops = [d for _, _, d in results[cap]]
        print(
            f"| {cap / 1e6:g} | {_cell(capped)} | {statistics.median(capped) * 1e6 / cap:.2f} "
            f"| {_cell(fast)} | {statistics.median(drops):g} |"
        )


def serve_sized(server: socket.socket, blob: memoryview) -> None:
    """One listener per payload size: after the ClientHello record, send the payload."""

    def one(conn: socket.socket) -> None:
        with conn:
            header = conn.recv(5, socket.MSG_WAITALL)
            conn.recv(int.from_bytes(header[3:5], "big"), socket.MSG_WAITALL)
            conn.sendall(blob)

    while True:
        try:
            conn, _ = server.accept()
        except OSError:
            return
        threading.Thread(target=one, args=(conn,), daemon=True).start()


def measure(
    ns: VethNamespace,
    backends: dict[int, socket.socket],
    capped_size: int,
    fast_size: int,
    cap: int,
    tmp: Path,
) -> tuple[float, float, int]:
    """One round: capped and fast downloads at once; returns their Mbit/s and the drops."""
    rates: dict[str, float] = {}
    proc, port, status = start_proxy(ns, backends, capped_size, fast_size, cap, tmp)
    try:
        threads = [
            threading.Thread(target=download, args=(ns, port, name, size, rates))
            for name, size in (("capped.test", capped_size), ("fast.test", fast_size))
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return rates["capped.test"], rates["fast.test"], dropped_packets(status)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def start_proxy(
    ns: VethNamespace,
    backends: dict[int, socket.socket],
    capped_size: int,
    fast_size: int,
    cap: int,
    tmp: Path,
) -> tuple[subprocess.Popen[bytes], int, int]:
    """The proxy with one rule per client name, each with a fixed target: its payload size's
    backend."""
    with socket.socket() as s, socket.socket() as t:
        s.bind((ns.host_v4, 0))
        t.bind(("127.0.0.1", 0))
        port, status = s.getsockname()[1], t.getsockname()[1]
    targets = {
        "capped.test": backends[capped_size].getsockname()[1],
        "fast.test": backends[fast_size].getsockname()[1],
    }
    config = {
        "workers": 1,  # one process: the shaper and the counters are its own
        "listeners": [{"host": ns.host_v4, "port": port}],
        "rules": [
            {"match": n, "allow_private": True, "qos": q, "target": f"127.0.0.1:{targets[n]}"}
            for n, q in NAMES.items()
        ],
        "log": {"access_log": None, "level": "warning"},
        "status": {"listen": f"127.0.0.1:{status}"},
        "ebpf": {
            "sockmap": {"enabled": False},
            "tc": {"enabled": True, "interface": ns.host_if, "per_client_bps": cap},
        },
    }
    path = tmp / f"tc-{cap}.json"
    path.write_text(json.dumps(config))
    proc = subprocess.Popen([sys.executable, "-m", "trio_sni", "--config", str(path)])
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{status}/readyz", timeout=1):
                return proc, port, status
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("proxy did not start")


def _cell(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


if __name__ == "__main__":
    main()
