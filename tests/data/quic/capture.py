"""Capture real QUIC clients' first datagrams (their Initial packets), for the reader's tests.

Run it from anywhere (it writes next to itself) to refresh the fixtures::

    /work/venv/bin/python tests/data/quic/capture.py

Each ``NAME.json`` holds the datagrams in the order the client sent them (hex), what the
client was asked for, and the client's version:

* ``chromium-v1``: Debian's chromium run headless with QUIC forced on for one origin (the
  same isolating flags as ``tests/data/hellos/capture.py``; ``apt-get install chromium``). A
  UDP socket on 127.0.0.1 takes its datagrams for a few seconds; its first flight is a
  post-quantum ClientHello (~1.9 KB, X25519MLKEM768, ECH GREASE) over two Initial packets in
  two datagrams, then retransmissions. The first four datagrams are kept.
* ``aioquic-v1``, ``aioquic-v2``: aioquic's client, in this process (QUIC v1 and v2).
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

HERE = Path(__file__).resolve().parent
CHROMIUM_NAME = "chromium.example.test"


def chromium_datagrams() -> list[bytes]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(0.2)
        port = sock.getsockname()[1]
        with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
            argv = [
                "chromium",
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--enable-quic",
                f"--origin-to-force-quic-on={CHROMIUM_NAME}:{port}",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={profile}",
                f"--host-resolver-rules=MAP {CHROMIUM_NAME} 127.0.0.1",
                "--dump-dom",
                f"https://{CHROMIUM_NAME}:{port}/",
            ]
            with subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            ) as browser:
                got: list[bytes] = []
                deadline = time.monotonic() + 6
                while time.monotonic() < deadline and len(got) < 4:
                    with contextlib.suppress(TimeoutError):  # nothing this 0.2 s
                        got.append(sock.recv(65536))
                browser.kill()
    return got


def aioquic_datagrams(quic_version: int) -> list[bytes]:
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection

    configuration = QuicConfiguration(
        is_client=True,
        alpn_protocols=["h3", "acme-tls/1"],
        server_name="www.example.com",
        original_version=quic_version,
        supported_versions=[quic_version],
    )
    connection = QuicConnection(configuration=configuration)
    connection.connect(("127.0.0.1", 443), now=0.0)
    return [data for data, _addr in connection.datagrams_to_send(now=0.0)]


def save(name: str, client: str, asked: dict[str, object], datagrams: list[bytes]) -> None:
    record = {
        "how": "captured",
        "client": client,
        **asked,
        "datagrams": [d.hex() for d in datagrams],
    }
    (HERE / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"{name}: {len(datagrams)} datagrams", file=sys.stderr)


def main() -> None:
    chromium = subprocess.run(["chromium", "--version"], capture_output=True, text=True)
    save(
        "chromium-v1",
        chromium.stdout.strip(),
        {"server_name": CHROMIUM_NAME, "alpn": ["h3"], "quic_version": 1},
        chromium_datagrams(),
    )
    for name, quic_version in (("aioquic-v1", 0x00000001), ("aioquic-v2", 0x6B3343CF)):
        save(
            name,
            f"aioquic {version('aioquic')}",
            {
                "server_name": "www.example.com",
                "alpn": ["h3", "acme-tls/1"],
                "quic_version": quic_version,
            },
            aioquic_datagrams(quic_version),
        )


if __name__ == "__main__":
    main()
