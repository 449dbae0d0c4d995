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
* ``aioquic-v1-0rtt``, ``aioquic-v2-0rtt``: aioquic's client resuming a session with 0-RTT,
  the one real client here whose first datagram holds more than one packet (RFC 9000 section
  12.2): the Initial (a ClientHello with a PSK and early_data) coalesced with a 0-RTT packet
  (an HTTP/3 GET), then zero bytes to 1200. An aioquic server on 127.0.0.1, in this process,
  with a ``trustme`` certificate, issues the session ticket; the resumed connection goes
  through a UDP relay that keeps the client's first flight (what it sent before any answer
  reached it), and the server must accept the early data. ``layout`` says, for each datagram,
  what aioquic's own header parser finds in it. Chromium does not coalesce its first flight,
  and curl here has no HTTP/3.

``capture.py NAME ...`` refreshes only the named fixtures.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any, cast

HERE = Path(__file__).resolve().parent
CHROMIUM_NAME = "chromium.example.test"
ZERO_RTT_NAME = "www.example.com"
QUIC_VERSIONS = {"v1": 0x00000001, "v2": 0x6B3343CF}


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


def aioquic_0rtt_datagrams(quic_version: int) -> list[bytes]:
    """The first flight of aioquic's client resuming a session with 0-RTT (see the module
    docstring); raises SystemExit if the server did not accept the early data, or if the first
    datagram is not an Initial followed by a 0-RTT packet."""
    datagrams = asyncio.run(_aioquic_resumed_first_flight(quic_version))
    first = [part["type"] for part in layout(datagrams[0])]
    if first[:2] != ["INITIAL", "ZERO_RTT"]:
        raise SystemExit(f"aioquic's resumed first datagram holds {first}, not Initial + 0-RTT")
    return datagrams


async def _aioquic_resumed_first_flight(quic_version: int) -> list[bytes]:
    import trustme
    from aioquic.asyncio import QuicConnectionProtocol, connect
    from aioquic.asyncio.server import QuicServer
    from aioquic.h3.connection import H3Connection
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.events import HandshakeCompleted, QuicEvent
    from aioquic.tls import SessionTicket
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    ca = trustme.CA()
    issued = ca.issue_cert(ZERO_RTT_NAME)
    server_configuration = QuicConfiguration(is_client=False, alpn_protocols=["h3"])
    server_configuration.certificate = x509.load_pem_x509_certificate(
        issued.cert_chain_pems[0].bytes()
    )
    server_configuration.private_key = load_pem_private_key(
        issued.private_key_pem.bytes(), password=None
    )
    issued_tickets: dict[bytes, SessionTicket] = {}

    def client_configuration(ticket: SessionTicket | None) -> QuicConfiguration:
        configuration = QuicConfiguration(
            is_client=True,
            alpn_protocols=["h3"],
            server_name=ZERO_RTT_NAME,
            original_version=quic_version,
            supported_versions=[quic_version],
            session_ticket=ticket,
        )
        configuration.load_verify_locations(cadata=ca.cert_pem.bytes())
        return configuration

    class Resumed(QuicConnectionProtocol):
        early_data_accepted = False

        def quic_event_received(self, event: QuicEvent) -> None:
            if isinstance(event, HandshakeCompleted):
                self.early_data_accepted = event.early_data_accepted

    loop = asyncio.get_running_loop()
    server_transport, _ = await loop.create_datagram_endpoint(
        lambda: QuicServer(
            configuration=server_configuration,
            session_ticket_fetcher=lambda label: issued_tickets.pop(label, None),
            session_ticket_handler=lambda t: issued_tickets.__setitem__(t.ticket, t),
        ),
        local_addr=("127.0.0.1", 0),
    )
    relay_transport, relay = await loop.create_datagram_endpoint(
        lambda: _Relay(server_transport.get_extra_info("sockname")),
        local_addr=("127.0.0.1", 0),
    )
    try:
        received: asyncio.Future[SessionTicket] = loop.create_future()
        async with connect(
            "127.0.0.1",
            server_transport.get_extra_info("sockname")[1],
            configuration=client_configuration(None),
            session_ticket_handler=lambda t: received.done() or received.set_result(t),
        ):
            ticket = await asyncio.wait_for(received, 5)
        async with connect(
            "127.0.0.1",
            relay_transport.get_extra_info("sockname")[1],
            configuration=client_configuration(ticket),
            create_protocol=Resumed,
            wait_connected=False,
        ) as client:
            quic = client._quic
            http = H3Connection(quic)
            http.send_headers(
                quic.get_next_available_stream_id(),
                [
                    (b":method", b"GET"),
                    (b":scheme", b"https"),
                    (b":authority", ZERO_RTT_NAME.encode()),
                    (b":path", b"/"),
                ],
                end_stream=True,
            )
            client.transmit()
            await asyncio.wait_for(client.wait_connected(), 5)
            assert isinstance(client, Resumed)
            if not client.early_data_accepted:
                raise SystemExit("the aioquic server did not accept the resumed 0-RTT data")
    finally:
        relay_transport.close()
        server_transport.close()
    return relay.first_flight


class _Relay(asyncio.DatagramProtocol):
    """Passes datagrams between one client and the server, and keeps the client's first flight:
    its datagrams read before the server's first one. One socket takes both directions, so the
    order it reads them in is the order they arrived in, and a client datagram that arrived
    before any answer was on its way to the client cannot depend on one."""

    def __init__(self, server: tuple[str, int]) -> None:
        self.server = server
        self.client: tuple[str, int] | None = None
        self.first_flight: list[bytes] = []
        self.answered = False
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        if addr == self.server:
            self.answered = True
            if self.client is not None:
                self.transport.sendto(data, self.client)
            return
        self.client = addr
        if not self.answered:
            self.first_flight.append(data)
        self.transport.sendto(data, self.server)


def layout(datagram: bytes) -> list[dict[str, Any]]:
    """What aioquic's header parser finds in a client datagram: each packet's type (for long
    headers, decoded by the packet's version), offset and size, then the zero bytes after the
    last packet, if any. Our own reader is not asked, so the tests can hold it to this."""
    from aioquic.buffer import Buffer
    from aioquic.quic.packet import pull_quic_header

    buf = Buffer(data=datagram)
    parts: list[dict[str, Any]] = []
    while not buf.eof() and datagram[buf.tell()] & 0x80:
        start = buf.tell()
        header = pull_quic_header(buf)
        parts.append(
            {"type": header.packet_type.name, "offset": start, "size": header.packet_length}
        )
        buf.seek(start + header.packet_length)
    if not buf.eof():
        rest = datagram[buf.tell() :]
        if rest.strip(b"\x00"):
            raise SystemExit(f"a datagram has {len(rest)} bytes after its long-header packets")
        parts.append({"type": "zero bytes", "offset": buf.tell(), "size": len(rest)})
    return parts


def save(
    name: str,
    client: str,
    asked: dict[str, object],
    datagrams: list[bytes],
    about: dict[str, object] | None = None,
) -> None:
    record = {
        "how": "captured",
        "client": client,
        **asked,
        **(about or {}),
        "datagrams": [d.hex() for d in datagrams],
    }
    (HERE / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"{name}: {len(datagrams)} datagrams", file=sys.stderr)


def main() -> None:
    wanted = set(sys.argv[1:])
    known = {"chromium-v1", *(f"aioquic-{v}{t}" for v in QUIC_VERSIONS for t in ("", "-0rtt"))}
    if wanted - known:
        raise SystemExit(f"no such fixture: {sorted(wanted - known)} (known: {sorted(known)})")
    wanted = wanted or known
    if "chromium-v1" in wanted:
        chromium = subprocess.run(["chromium", "--version"], capture_output=True, text=True)
        save(
            "chromium-v1",
            chromium.stdout.strip(),
            {"server_name": CHROMIUM_NAME, "alpn": ["h3"], "quic_version": 1},
            chromium_datagrams(),
        )
    for v, quic_version in QUIC_VERSIONS.items():
        if f"aioquic-{v}" in wanted:
            save(
                f"aioquic-{v}",
                f"aioquic {version('aioquic')}",
                {
                    "server_name": "www.example.com",
                    "alpn": ["h3", "acme-tls/1"],
                    "quic_version": quic_version,
                },
                aioquic_datagrams(quic_version),
            )
        if f"aioquic-{v}-0rtt" in wanted:
            datagrams = aioquic_0rtt_datagrams(quic_version)
            save(
                f"aioquic-{v}-0rtt",
                f"aioquic {version('aioquic')}",
                {"server_name": ZERO_RTT_NAME, "alpn": ["h3"], "quic_version": quic_version},
                datagrams,
                {
                    "holds": (
                        "the first flight of a resumed connection: an Initial (a ClientHello "
                        "with pre_shared_key and early_data) coalesced with a 0-RTT packet (an "
                        "HTTP/3 GET), then zero bytes to the datagram's end"
                    ),
                    "layout": [layout(d) for d in datagrams],
                },
            )


if __name__ == "__main__":
    main()
