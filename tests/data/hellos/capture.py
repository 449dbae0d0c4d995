"""Capture real ClientHellos from the TLS clients installed here, for the parser's tests.

Run it from anywhere (it writes next to itself) to refresh the fixtures::

    /work/venv/bin/python tests/data/hellos/capture.py          # all of them
    /work/venv/bin/python tests/data/hellos/capture.py curl     # only some, by name

How it works: for each client, a plain TCP listener on 127.0.0.1 (random port) accepts one
connection, reads TLS records until the handshake message in them is complete, saves exactly
those record bytes and closes. The client then fails its handshake, which is expected. Each
``NAME.bin`` gets a ``NAME.json`` sidecar with what the client was asked to do and what the
hello contains. The sidecar fields are computed by a small decoder in *this* file, written
independently of ``trio_sni.sansio.clienthello``, so the tests compare two implementations.

Two fixtures are derived rather than captured, and their sidecars say so:

* ``curl-fragmented``: the curl capture's handshake message re-framed into four records
  (2, 150, 150 and the remaining bytes), so the handshake header itself straddles a record
  boundary, as RFC 8446 5.1 allows and DPI-evasion clients do.
* ``synthetic-pq-ech``: the openssl TLS 1.3 capture with a Chrome-131-shaped X25519MLKEM768
  key share (group 0x11ec, 1216 bytes) and a GREASE-style encrypted_client_hello (0xfe0d)
  extension added. The OpenSSL here (3.0) has no ML-KEM; the bytes are deterministic (seeded).

The real post-quantum hello, ``chromium-pq``, comes from Debian's chromium run headless
(``apt-get install chromium``; only needed to refresh that capture, not to run the tests): an
X25519MLKEM768 key share, GREASE and ECH GREASE, about 1.9 KB.

The real large hello, ``openssl-ffdhe8192-large``, is made by an actual client: OpenSSL's TLS
1.3 key share for the ffdhe8192 group is 1024 bytes, and a long ALPN list brings the hello to
~1.9 KB, the size of a browser's post-quantum hello, so it also arrives in two TCP segments on a
1500-byte MTU.

Requires: openssl, curl, gnutls-cli (Debian package gnutls-bin), chromium, and Python's ssl
module; a client that is not installed is skipped.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
# How long to wait for a client to connect and send its hello; real clients take milliseconds.
TIMEOUT = 10.0

# ALPN ids for the large capture: real-looking plus long ones to reach a PQ-sized hello.
LARGE_ALPN = ["h2", "http/1.1"] + [
    f"x-trio-sni-padding-protocol-{i:02d}-" + "p" * 60 for i in range(7)
]


# --- an independent, minimal decoder (the test oracle) ----------------------------------------


def split_records(data: bytes) -> tuple[bytes, int, int]:
    """Return (handshake message, bytes of records used, record count), or raise if incomplete."""
    pos = 0
    handshake = b""
    records = 0
    while True:
        if len(handshake) >= 4 and len(handshake) >= 4 + int.from_bytes(handshake[1:4], "big"):
            return handshake, pos, records
        if len(data) < pos + 5:
            raise EOFError("incomplete")
        ctype, _version, length = struct.unpack("!BHH", data[pos : pos + 5])
        if ctype != 22:
            raise ValueError(f"record type {ctype}")
        if len(data) < pos + 5 + length:
            raise EOFError("incomplete")
        handshake += data[pos + 5 : pos + 5 + length]
        pos += 5 + length
        records += 1


def describe(raw: bytes) -> dict[str, Any]:
    """Decode the fields the tests check, straight from the RFC 8446 4.1.2 layout."""
    handshake, used, records = split_records(raw)
    assert used == len(raw), "capture holds more than the hello"
    assert handshake[0] == 1, "not a client_hello"
    body = handshake[4:]
    (legacy_version,) = struct.unpack("!H", body[:2])
    p = 2 + 32
    p += 1 + body[p]  # session id
    p += 2 + int.from_bytes(body[p : p + 2], "big")  # cipher suites
    p += 1 + body[p]  # compression methods
    ext_end = p + 2 + int.from_bytes(body[p : p + 2], "big")
    p += 2
    out: dict[str, Any] = {
        "server_name": None,
        "alpn": [],
        "supported_versions": [],
        "legacy_version": legacy_version,
        "has_ech": False,
        "extensions": [],
    }
    while p < ext_end:
        etype, elen = struct.unpack("!HH", body[p : p + 4])
        edata = body[p + 4 : p + 4 + elen]
        p += 4 + elen
        out["extensions"].append(etype)
        if etype == 0:
            # list length (2), name type (1), name length (2), name
            assert edata[2] == 0
            nlen = int.from_bytes(edata[3:5], "big")
            out["server_name"] = edata[5 : 5 + nlen].decode("ascii")
        elif etype == 16:
            q = 2
            while q < len(edata):
                out["alpn"].append(edata[q + 1 : q + 1 + edata[q]].decode("ascii"))
                q += 1 + edata[q]
        elif etype == 43:
            out["supported_versions"] = [
                int.from_bytes(edata[q : q + 2], "big") for q in range(1, 1 + edata[0], 2)
            ]
        elif etype == 0xFE0D:
            out["has_ech"] = True
    out["size"] = len(raw)
    out["record_count"] = records
    return out


# --- capturing ----------------------------------------------------------------------------------


def receive_hello(listener: socket.socket, result: dict[str, bytes]) -> None:
    """Accept one connection and read until its ClientHello records are complete."""
    conn, _ = listener.accept()
    with conn:
        conn.settimeout(TIMEOUT)
        data = b""
        while True:
            try:
                _, used, _ = split_records(data)
            except EOFError:
                chunk = conn.recv(65536)
                if not chunk:
                    raise
                data += chunk
                continue
            result["raw"] = data[:used]
            return


def capture(run_client: Callable[[int], str]) -> tuple[bytes, str]:
    """Run a client against a one-shot listener; return the hello and the client's command."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(TIMEOUT)
        port = listener.getsockname()[1]
        result: dict[str, bytes] = {}
        thread = threading.Thread(target=receive_hello, args=(listener, result))
        thread.start()
        command = run_client(port)
        thread.join(TIMEOUT)
    if "raw" not in result:
        raise RuntimeError(f"no ClientHello captured from: {command}")
    return result["raw"], command


def run(argv: list[str], port: int) -> str:
    """Run an external client; its failure (we close without a ServerHello) is expected."""
    argv = [a.replace("PORT", str(port)) for a in argv]
    subprocess.run(
        argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=TIMEOUT, check=False
    )
    return " ".join(a.replace(str(port), "PORT") for a in argv)


def tool_version(argv: list[str]) -> str:
    out = subprocess.run(argv, capture_output=True, text=True, check=False).stdout
    return out.strip().splitlines()[0] if out.strip() else "unknown"


def python_ssl_client(port: int) -> str:
    ctx = ssl.create_default_context()
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        try:
            with ctx.wrap_socket(sock, server_hostname="python-ssl.example.test"):
                pass
        except (OSError, ssl.SSLError):
            pass  # expected: the listener closes without answering
    return (
        "python: ssl.create_default_context(); ctx.set_alpn_protocols(['h2', 'http/1.1']); "
        "ctx.wrap_socket(sock, server_hostname='python-ssl.example.test')"
    )


@dataclass
class Client:
    name: str
    client: Callable[[], str]
    run_client: Callable[[int], str]
    note: str
    expected_error: str | None = None
    needs: list[str] = field(default_factory=list)


def openssl(*args: str) -> Callable[[int], str]:
    return lambda port: run(["openssl", "s_client", "-connect", "127.0.0.1:PORT", *args], port)


def openssl_version() -> str:
    return tool_version(["openssl", "version"])


def chromium_client(port: int) -> str:
    """Headless Debian chromium: the one client here that sends an ML-KEM (post-quantum) share.

    The flags keep it from reaching anything but our listener (docs/kernel-facts.md, fact 37;
    the machine's notes on running chromium as root); a fresh profile keeps the hello free of
    session state.
    """
    import tempfile

    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
        argv = [
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--host-resolver-rules=MAP chromium.example.test 127.0.0.1",
            "--dump-dom",
            "https://chromium.example.test:PORT/",
        ]
        argv = [a.replace("PORT", str(port)) for a in argv]
        # Chromium keeps retrying after the failed handshake; a few seconds is plenty for the
        # first hello, then it is stopped.
        with subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        ) as browser:
            try:
                browser.wait(timeout=5)
            except subprocess.TimeoutExpired:
                browser.kill()
        return " ".join(a.replace(str(port), "PORT").replace(profile, "PROFILE") for a in argv)


CLIENTS = [
    Client(
        "openssl-tls12",
        openssl_version,
        openssl("-tls1_2", "-servername", "openssl-tls12.example.test", "-alpn", "h2,http/1.1"),
        "TLS 1.2 only: no supported_versions extension",
        needs=["openssl"],
    ),
    Client(
        "openssl-tls13",
        openssl_version,
        openssl("-tls1_3", "-servername", "openssl-tls13.example.test", "-alpn", "h2,http/1.1"),
        "TLS 1.3 only",
        needs=["openssl"],
    ),
    Client(
        "openssl-nosni",
        openssl_version,
        openssl("-noservername", "-alpn", "h2,http/1.1"),
        "no server_name extension at all: the reader must raise NoSNIError",
        expected_error="NoSNIError",
        needs=["openssl"],
    ),
    Client(
        "openssl-ffdhe8192-large",
        openssl_version,
        openssl(
            "-tls1_3",
            "-groups",
            "ffdhe8192",
            "-servername",
            "large.example.test",
            "-alpn",
            ",".join(LARGE_ALPN),
        ),
        "a real ~1.9 KB hello, the size of a browser's post-quantum one: a 1024-byte ffdhe8192 "
        "key share plus a long ALPN list (this OpenSSL has no ML-KEM)",
        needs=["openssl"],
    ),
    Client(
        "curl",
        lambda: tool_version(["curl", "--version"]),
        lambda port: run(
            [
                "curl",
                "--silent",
                "--max-time",
                "5",
                "--connect-to",
                "x.test:443:127.0.0.1:PORT",
                "https://x.test/",
            ],
            port,
        ),
        "curl's default hello (SNI x.test via --connect-to)",
        needs=["curl"],
    ),
    Client(
        "gnutls",
        lambda: tool_version(["gnutls-cli", "--version"]),
        lambda port: run(
            [
                "gnutls-cli",
                "--port",
                "PORT",
                "--sni-hostname",
                "gnutls.example.test",
                "--alpn",
                "h2",
                "--alpn",
                "http/1.1",
                "--insecure",
                "127.0.0.1",
            ],
            port,
        ),
        "GnuTLS's default priority string",
        needs=["gnutls-cli"],
    ),
    Client(
        "chromium-pq",
        lambda: tool_version(["chromium", "--version"]),
        chromium_client,
        "a real browser hello with an X25519MLKEM768 key share (~1.8 KB, two TCP segments on a "
        "1500-byte MTU), GREASE values and ECH GREASE",
        needs=["chromium"],
    ),
    Client(
        "python-ssl",
        lambda: f"Python {sys.version.split()[0]} ssl, {ssl.OPENSSL_VERSION}",
        python_ssl_client,
        "Python's ssl module with create_default_context()",
    ),
]


# --- derived fixtures ---------------------------------------------------------------------------


def frame(handshake: bytes, sizes: list[int], version: bytes = b"\x03\x01") -> bytes:
    """Cut a handshake message into records of the given sizes (the last takes the rest)."""
    out = b""
    pos = 0
    for size in [*sizes, len(handshake)]:
        piece = handshake[pos : pos + size]
        if piece:
            out += b"\x16" + version + struct.pack("!H", len(piece)) + piece
        pos += len(piece)
    return out


def vec(width: int, data: bytes) -> bytes:
    return len(data).to_bytes(width, "big") + data


def pseudo_random(seed: str, n: int) -> bytes:
    out = b""
    counter = 0
    while len(out) < n:
        out += hashlib.sha256(f"{seed}/{counter}".encode()).digest()
        counter += 1
    return out[:n]


def add_pq_and_ech(raw: bytes) -> bytes:
    """Rebuild a TLS 1.3 hello with a 0x11ec key share and an ECH extension added.

    The server name becomes ``pq-ech.example.test``.
    """
    handshake, _, _ = split_records(raw)
    body = handshake[4:]
    p = 2 + 32
    p += 1 + body[p]
    p += 2 + int.from_bytes(body[p : p + 2], "big")
    p += 1 + body[p]
    head = body[:p]
    ext_block = body[p + 2 :]
    extensions = []
    q = 0
    while q < len(ext_block):
        etype, elen = struct.unpack("!HH", ext_block[q : q + 4])
        extensions.append((etype, ext_block[q + 4 : q + 4 + elen]))
        q += 4 + elen
    rebuilt = []
    for etype, edata in extensions:
        if etype == 0:  # server_name: a name of its own, so tests can tell it from its source
            edata = vec(2, b"\x00" + vec(2, b"pq-ech.example.test"))
        elif etype == 51:  # key_share: prepend the hybrid share, as Chrome does
            shares = edata[2:]
            pq = struct.pack("!H", 0x11EC) + vec(2, pseudo_random("mlkem768", 1216))
            edata = vec(2, pq + shares)
        rebuilt.append((etype, edata))
    # ECHClientHello (outer): type 0, HPKE suite (HKDF-SHA256, AES-128-GCM), config_id,
    # enc (32-byte X25519 key), payload; sizes as in a GREASE ECH from Chrome.
    ech = (
        b"\x00"
        + struct.pack("!HH", 0x0001, 0x0001)
        + b"\x5a"
        + vec(2, pseudo_random("ech-enc", 32))
        + vec(2, pseudo_random("ech-payload", 208))
    )
    rebuilt.insert(1, (0xFE0D, ech))
    ext_bytes = b"".join(struct.pack("!HH", t, len(d)) + d for t, d in rebuilt)
    new_body = head + vec(2, ext_bytes)
    return frame(b"\x01" + vec(3, new_body), [], version=raw[1:3])


def write(name: str, raw: bytes, meta: dict[str, Any]) -> None:
    facts = describe(raw)
    sidecar = {**meta, **{k: v for k, v in facts.items() if k != "extensions"}}
    sidecar["extension_types"] = [f"0x{t:04x}" for t in facts["extensions"]]
    (HERE / f"{name}.bin").write_bytes(raw)
    (HERE / f"{name}.json").write_text(json.dumps(sidecar, indent=2) + "\n")
    records, sni = facts["record_count"], facts["server_name"]
    print(f"{name}: {len(raw)} bytes in {records} record(s), SNI {sni!r}")


DERIVED_FROM = {"curl-fragmented": "curl", "synthetic-pq-ech": "openssl-tls13"}


def main(argv: list[str]) -> int:
    wanted = set(argv)
    # A derived fixture needs a fresh capture of its source.
    sources = wanted | {DERIVED_FROM[name] for name in wanted if name in DERIVED_FROM}
    captured: dict[str, bytes] = {}
    for client in CLIENTS:
        if wanted and client.name not in sources:
            continue
        missing = [tool for tool in client.needs if shutil.which(tool) is None]
        if missing:
            print(f"{client.name}: skipped, {', '.join(missing)} not installed", file=sys.stderr)
            continue
        raw, command = capture(client.run_client)
        captured[client.name] = raw
        write(
            client.name,
            raw,
            {
                "how": "captured",
                "client": client.client(),
                "command": command,
                "note": client.note,
                "expected_error": client.expected_error,
            },
        )
    if "curl" in captured and (not wanted or "curl-fragmented" in wanted):
        handshake, _, _ = split_records(captured["curl"])
        write(
            "curl-fragmented",
            frame(handshake, [2, 150, 150], version=captured["curl"][1:3]),
            {
                "how": "re-framed",
                "derived_from": "curl.bin",
                "client": "curl (see curl.json), re-framed by capture.py",
                "command": "frame(curl handshake message, [2, 150, 150, rest])",
                "note": "the curl hello's handshake message split into 4 TLS records of 2, 150, "
                "150 and the remaining bytes; the 4-byte handshake header straddles records 1-2",
                "expected_error": None,
            },
        )
    if "openssl-tls13" in captured and (not wanted or "synthetic-pq-ech" in wanted):
        write(
            "synthetic-pq-ech",
            add_pq_and_ech(captured["openssl-tls13"]),
            {
                "how": "synthetic",
                "derived_from": "openssl-tls13.bin",
                "client": "openssl-tls13 capture, rebuilt by capture.py",
                "command": "add_pq_and_ech(openssl-tls13 hello)",
                "note": "NOT from a real client: a Chrome-131-shaped X25519MLKEM768 key share "
                "(group 0x11ec, 1216 deterministic bytes) and a GREASE-style "
                "encrypted_client_hello (0xfe0d) added to a real TLS 1.3 hello, whose "
                "server_name is replaced by pq-ech.example.test",
                "expected_error": None,
            },
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
