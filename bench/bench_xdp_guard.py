"""The XDP guard's numbers: what a SYN flood gets through, and what a packet costs.

Run as root from a checkout (``python bench/bench_xdp_guard.py --help``). Prints two tables;
it is a measurement script, not a test. Method:

* Flood: a namespace joined by a veth pair (tests/netns.py), the guard attached natively to the
  host end for one port, and a child process inside the namespace sending raw SYNs from one
  source at a steady pace for a few seconds. Admitted = sent - ``dropped_syn_flood``; the
  bucket's promise is at most ``burst + rate * elapsed``.
* Cost: ``BPF_PROG_TEST_RUN`` with ``repeat`` on crafted frames (the kernel's average run time
  per packet; the program alone, no driver), with the allow list holding ``--prefixes``
  networks.
"""

from __future__ import annotations

import argparse
import socket
import struct
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "tests"), str(HERE.parent / "tests" / "e2e")]

from netns import veth_namespace  # noqa: E402
from test_xdp_e2e import FLOOD_SCRIPT  # noqa: E402

from trio_sni.accel.xdp import XdpGuard  # noqa: E402
from trio_sni.sansio.config import Clients, FloodGuard, XdpConfig  # noqa: E402

PORT = 8443


def flood_row(rate: float, burst: int, pps: int, seconds: float) -> list[str]:
    with veth_namespace(0) as ns:
        config = XdpConfig(
            interface=ns.host_if,
            mode="native",
            flood_guard=FloodGuard(per_source_rate=rate, per_source_burst=burst),
        )
        with XdpGuard.start(config, Clients(), [PORT]) as guard:
            count = int(pps * seconds)
            out = subprocess.run(
                [
                    "ip",
                    "netns",
                    "exec",
                    ns.name,
                    sys.executable,
                    "-c",
                    FLOOD_SCRIPT,
                    ns.peer_v4,
                    ns.host_v4,
                    str(PORT),
                    str(count),
                    str(seconds),
                ],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            elapsed = float(out)
            counters = guard.counters()
    admitted = count - counters["xdp_dropped_syn_flood"]
    promise = burst + rate * elapsed
    return [
        f"{rate:g}",
        str(burst),
        f"{count / elapsed:,.0f}",
        f"{elapsed:.2f}",
        str(count),
        str(admitted),
        f"{promise:.0f}",
        f"{admitted / elapsed:.1f}",
    ]


def frame(src: str, dport: int, flags: int = 0x02) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", 40000, dport, 1, 0, 5 << 4, flags, 65535, 0, 0)
    ip = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(tcp),
        1,
        0,
        64,
        6,
        0,
        socket.inet_aton(src),
        socket.inet_aton("198.51.100.1"),
    )
    return bytes(6) + bytes.fromhex("020000000002") + b"\x08\x00" + ip + tcp


def cost_rows(prefixes: int, repeat: int) -> list[list[str]]:
    allow = tuple(f"10.{i >> 8 & 255}.{i & 255}.0/24" for i in range(prefixes - 1))
    clients = Clients(allow=(*allow, "198.51.100.2/32"))
    cases = [
        ("TCP to another port", frame("203.0.113.9", 22), {}),
        ("SYN, source not allowed (drop)", frame("203.0.113.9", PORT), {}),
        (
            "SYN, allowed, under its bucket",
            frame("198.51.100.2", PORT),
            {"flood_guard": FloodGuard(per_source_rate=1e9, per_source_burst=1_000_000)},
        ),
        (
            "SYN, allowed, over its bucket (drop)",
            frame("198.51.100.2", PORT),
            {"flood_guard": FloodGuard(per_source_rate=0.001, per_source_burst=1)},
        ),
        ("ACK, allowed", frame("198.51.100.2", PORT, 0x10), {}),
    ]
    rows = []
    for name, data, xdp in cases:
        with XdpGuard.load(XdpConfig(**xdp), clients, [PORT]) as guard:  # type: ignore[arg-type]
            result = guard.program.test_run(data, repeat=repeat)
        rows.append(
            [
                name,
                {1: "drop", 2: "pass"}.get(result.retval, str(result.retval)),
                str(result.duration_ns),
            ]
        )
    return rows


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"
        for r in [header, *rows]
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each flood")
    parser.add_argument("--pps", type=int, default=20000, help="SYNs per second sent")
    parser.add_argument("--prefixes", type=int, default=10000, help="allow-list networks")
    parser.add_argument("--repeat", type=int, default=1_000_000, help="test_run repetitions")
    args = parser.parse_args()
    flood = [
        flood_row(rate, burst, args.pps, args.seconds)
        for rate, burst in ((10, 20), (100, 200), (1000, 100))
    ]
    print(
        table(
            [
                "rate/s",
                "burst",
                "sent/s",
                "seconds",
                "sent",
                "admitted",
                "burst+rate*t",
                "admitted/s",
            ],
            flood,
        )
    )
    print()
    print(table(["packet", "verdict", "ns per run"], cost_rows(args.prefixes, args.repeat)))


if __name__ == "__main__":
    main()
