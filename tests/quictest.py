"""QUIC client Initial packets built by the tests themselves (RFC 9001 section 5), so that
shuffled, split, overlapping and coalesced CRYPTO frames can be tried; real clients' packets
(aioquic's) are the other half of the checks."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from trio_sni.sansio.quic_initial import QUIC_V1, QUIC_V2, initial_keys

HELLOS = Path(__file__).resolve().parent / "data" / "hellos"
INITIAL_TYPE = {QUIC_V1: 0b00, QUIC_V2: 0b01}
DCID = bytes.fromhex("8394c8f03e515708")
SCID = bytes.fromhex("c0ffee")


def handshake_message(capture: str) -> bytes:
    """The ClientHello handshake message of a captured TLS hello (its records' payloads)."""
    data = (HELLOS / capture).read_bytes()
    message = bytearray()
    while data:
        length = int.from_bytes(data[3:5], "big")
        message += data[5 : 5 + length]
        data = data[5 + length :]
    return bytes(message)


def varint(value: int, size: int | None = None) -> bytes:
    """RFC 9000 section 16; ``size`` forces a longer encoding (clients often use 2 bytes)."""
    if size is None:
        size = 1 if value < 1 << 6 else 2 if value < 1 << 14 else 4 if value < 1 << 30 else 8
    prefix = {1: 0, 2: 1, 4: 2, 8: 3}[size] << (size * 8 - 2)
    return (prefix | value).to_bytes(size, "big")


def crypto(offset: int, data: bytes) -> bytes:
    return b"\x06" + varint(offset) + varint(len(data)) + data


def initial(
    payload: bytes,
    *,
    pn: int = 0,
    pn_len: int = 2,
    version: int = QUIC_V1,
    dcid: bytes = DCID,
    token: bytes = b"",
) -> bytes:
    """One protected client Initial packet carrying ``payload`` (frames; padded to 20 bytes)."""
    payload = payload.ljust(20, b"\x00")
    keys = initial_keys(version, dcid)
    length = pn_len + len(payload) + 16
    header = bytearray(
        bytes([0xC0 | INITIAL_TYPE[version] << 4 | (pn_len - 1)])
        + version.to_bytes(4, "big")
        + bytes([len(dcid)])
        + dcid
        + bytes([len(SCID)])
        + SCID
        + varint(len(token))
        + token
        + varint(length, 2)
        + (pn & ((1 << (8 * pn_len)) - 1)).to_bytes(pn_len, "big")
    )
    nonce = (int.from_bytes(keys.iv, "big") ^ pn).to_bytes(12, "big")
    sealed = AESGCM(keys.key).encrypt(nonce, payload, bytes(header))
    sample = sealed[4 - pn_len : 4 - pn_len + 16]
    encryptor = Cipher(algorithms.AES(keys.hp), modes.ECB()).encryptor()
    mask = encryptor.update(sample) + encryptor.finalize()
    header[0] ^= mask[0] & 0x0F
    for i in range(pn_len):
        header[len(header) - pn_len + i] ^= mask[1 + i]
    return bytes(header) + sealed


def padded(datagram: bytes, size: int = 1200) -> bytes:
    """A client pads its Initial datagrams to at least 1200 bytes (RFC 9000 section 14.1):
    here with zero bytes after the packets, as RFC 9000 section 12.2 allows."""
    return datagram.ljust(size, b"\x00")
