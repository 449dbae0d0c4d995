"""The byte layout of the shared DNS cache (``bpf/dns_cache.bpf.c``), packed and unpacked.

Pure: no clock, no syscalls. :mod:`trio_sni.accel.dns_cache` moves these bytes in and out of
the pinned BPF map; this module decides what they mean, and refuses bytes that do not mean
anything (:class:`RecordError`), so a corrupt entry is dropped instead of trusted.

Key (:data:`KEY_SIZE` bytes): the name in presentation form, lower-case A-labels without the
trailing dot (at most 253 bytes), NUL-padded.

Value (:data:`VALUE_SIZE` bytes, little-endian, ``struct dns_value``)::

    u64 expires_ns          absolute expiry on CLOCK_BOOTTIME, nanoseconds
    u8  families            bit 0: IPv4 was asked for, bit 1: IPv6 (see below)
    u8  n_v6, n_v4          how many of the slots below are used
    u8  pad[5]              zero
    u8  v6[8][16]           IPv6 addresses, in answer order
    u8  v4[8][4]            IPv4 addresses, in answer order

``families`` records which record types the writer asked for (its ``resolver.family``), so
a reader that needs IPv6 does not take an IPv4-only writer's entry for "this name has no
IPv6": it treats the entry as a miss and asks DNS itself.

:data:`LAYOUT_VERSION` goes into the stats map's layout word when the maps are created; bump
it whenever the meaning of these bytes changes, even if the sizes do not, so that pinned maps
written by an older version are replaced rather than misread.
"""

from __future__ import annotations

import enum
import ipaddress
import struct

import attrs

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: ``struct dns_key``: 253 bytes of name plus NUL padding, rounded to 256.
KEY_SIZE = 256
#: The longest name in presentation form without the trailing dot (RFC 1035: 255 octets on
#: the wire, which is 253 characters of text).
MAX_NAME_LENGTH = 253
#: Addresses kept per family (``DNS_MAX_V6`` / ``DNS_MAX_V4``); more are dropped from the end.
MAX_V6 = 8
MAX_V4 = 8
#: Bumped whenever the layout or its meaning changes (stored in the stats map).
LAYOUT_VERSION = 1

_HEADER = struct.Struct("<QBBB5x")
VALUE_SIZE = _HEADER.size + 16 * MAX_V6 + 4 * MAX_V4


class Families(enum.IntFlag):
    """Which address families a writer asked DNS for."""

    IPV4 = 1
    IPV6 = 2


#: The valid ``families`` bytes (IntFlag construction is slow; a lookup is not).
_FAMILIES = {int(f): f for f in (Families.IPV4, Families.IPV6, Families.IPV4 | Families.IPV6)}


class Stat(enum.IntEnum):
    """Slots of the stats map (``enum dns_stat``)."""

    LAYOUT = 0
    INSERTS = 1
    DELETES = 2


#: ``struct stat_add``: the request the counting program reads (after a 14-byte Ethernet
#: header, which BPF_PROG_TEST_RUN strips for socket filters).
STAT_ADD = struct.Struct("<IIq")


class RecordError(ValueError):
    """Bytes that are not a valid cache entry (corrupt, or written by another layout)."""


@attrs.frozen
class DnsRecord:
    """One shared answer: addresses per family, which families were asked, and the expiry."""

    v6: tuple[ipaddress.IPv6Address, ...]
    v4: tuple[ipaddress.IPv4Address, ...]
    families: Families
    expires_ns: int

    @classmethod
    def from_addresses(
        cls, addresses: tuple[IPAddress, ...], families: Families, expires_ns: int
    ) -> DnsRecord:
        """Split ``addresses`` by family (keeping their order), at most 8 of each."""
        v6 = tuple(a for a in addresses if isinstance(a, ipaddress.IPv6Address))[:MAX_V6]
        v4 = tuple(a for a in addresses if isinstance(a, ipaddress.IPv4Address))[:MAX_V4]
        return cls(v6=v6, v4=v4, families=families, expires_ns=expires_ns)

    def covers(self, needed: Families) -> bool:
        """True if the writer asked for every family in ``needed``."""
        return needed & self.families == needed


def families_for(family: str) -> Families:
    """The families a ``resolver.family`` setting asks DNS for."""
    if family == "ipv4":
        return Families.IPV4
    if family == "ipv6":
        return Families.IPV6
    return Families.IPV4 | Families.IPV6


def pack_key(name: str) -> bytes:
    """The key for ``name`` (already normalised: lower-case, no trailing dot).

    Raises:
        ValueError: the name is empty, longer than 253 bytes, not ASCII, or holds a NUL.
    """
    try:
        raw = name.encode("ascii")
    except UnicodeEncodeError:
        raise ValueError(f"{name!r}: not ASCII (A-labels only)") from None
    if not 0 < len(raw) <= MAX_NAME_LENGTH or b"\0" in raw:
        raise ValueError(f"{name!r}: not a name of 1 to {MAX_NAME_LENGTH} bytes")
    return raw.ljust(KEY_SIZE, b"\0")


def unpack_key(data: bytes) -> str:
    """The name in a key.

    Raises:
        RecordError: wrong size, or not a NUL-padded ASCII name.
    """
    if len(data) != KEY_SIZE:
        raise RecordError(f"key is {len(data)} bytes, expected {KEY_SIZE}")
    raw = data.rstrip(b"\0")
    if not 0 < len(raw) <= MAX_NAME_LENGTH or b"\0" in raw or not raw.isascii():
        raise RecordError("key is not a NUL-padded ASCII name")
    return raw.decode("ascii")


def pack_value(record: DnsRecord) -> bytes:
    """The value bytes for ``record``.

    Raises:
        ValueError: more than 8 addresses of a family, none at all, or an expiry outside u64.
    """
    if not record.v6 and not record.v4:
        raise ValueError("a record needs at least one address")
    if len(record.v6) > MAX_V6 or len(record.v4) > MAX_V4:
        raise ValueError(f"at most {MAX_V6} IPv6 and {MAX_V4} IPv4 addresses")
    if not 0 <= record.expires_ns < 1 << 64:
        raise ValueError(f"expires_ns {record.expires_ns} does not fit in 64 bits")
    header = _HEADER.pack(record.expires_ns, record.families, len(record.v6), len(record.v4))
    v6 = b"".join(a.packed for a in record.v6).ljust(16 * MAX_V6, b"\0")
    v4 = b"".join(a.packed for a in record.v4).ljust(4 * MAX_V4, b"\0")
    return header + v6 + v4


def unpack_value(data: bytes) -> DnsRecord:
    """The record in ``data``.

    Raises:
        RecordError: wrong size, unknown family bits, counts beyond the slots, no address,
            addresses of a family that was not asked for, or non-zero padding.
    """
    if len(data) != VALUE_SIZE:
        raise RecordError(f"value is {len(data)} bytes, expected {VALUE_SIZE}")
    expires_ns, families, n_v6, n_v4 = _HEADER.unpack_from(data)
    if data[_HEADER.size - 5 : _HEADER.size].strip(b"\0"):
        raise RecordError("padding is not zero")
    asked = _FAMILIES.get(families)
    if asked is None:
        raise RecordError(f"family bits {families:#x} are not IPv4/IPv6")
    if n_v6 > MAX_V6 or n_v4 > MAX_V4:
        raise RecordError(f"{n_v6} IPv6 / {n_v4} IPv4 addresses exceed the {MAX_V6}/{MAX_V4} slots")
    if n_v6 + n_v4 == 0:
        raise RecordError("no addresses")
    if (n_v6 and not families & Families.IPV6) or (n_v4 and not families & Families.IPV4):
        raise RecordError("addresses of a family that was not asked for")
    v6_at = _HEADER.size
    v4_at = v6_at + 16 * MAX_V6
    v6 = tuple(
        ipaddress.IPv6Address(data[v6_at + 16 * i : v6_at + 16 * (i + 1)]) for i in range(n_v6)
    )
    v4 = tuple(
        ipaddress.IPv4Address(data[v4_at + 4 * i : v4_at + 4 * (i + 1)]) for i in range(n_v4)
    )
    if data[v6_at + 16 * n_v6 : v4_at].strip(b"\0") or data[v4_at + 4 * n_v4 :].strip(b"\0"):
        raise RecordError("unused address slots are not zero")
    return DnsRecord(v6=v6, v4=v4, families=asked, expires_ns=expires_ns)
