"""The shared DNS cache's byte layout (trio_sni.sansio.dns_record): pure, no kernel.

Round trips (hypothesis), the exact bytes of one record, every way a value can be refused, and
the layout checked against the BTF of prebuilt/dns_cache.bpf.o.
"""

from __future__ import annotations

import ipaddress

import pytest
import trio_sni_loader as loader
from hypothesis import given
from hypothesis import strategies as st
from trio_sni_loader.btf import Kind, parse_btf

from trio_sni.accel.objects import object_bytes
from trio_sni.sansio import dns_record
from trio_sni.sansio.dns_record import DnsRecord, Families, RecordError

V6 = ipaddress.IPv6Address("2001:db8::1")
V4 = ipaddress.IPv4Address("192.0.2.1")


@st.composite
def records(draw: st.DrawFn) -> DnsRecord:
    families = draw(st.sampled_from([Families.IPV4, Families.IPV6, Families.IPV4 | Families.IPV6]))
    v6 = (
        draw(st.lists(st.ip_addresses(v=6), max_size=dns_record.MAX_V6))
        if (families & Families.IPV6)
        else []
    )
    v4 = (
        draw(st.lists(st.ip_addresses(v=4), max_size=dns_record.MAX_V4))
        if (families & Families.IPV4)
        else []
    )
    if not v6 and not v4:
        if families & Families.IPV4:
            v4 = [V4]
        else:
            v6 = [V6]
    expires = draw(st.integers(0, (1 << 64) - 1))
    return DnsRecord(v6=tuple(v6), v4=tuple(v4), families=families, expires_ns=expires)


@given(records())
def test_values_round_trip(record: DnsRecord) -> None:
    data = dns_record.pack_value(record)
    assert len(data) == dns_record.VALUE_SIZE
    assert dns_record.unpack_value(data) == record


@given(st.from_regex(r"[a-z0-9](?:[a-z0-9.-]{0,251}[a-z0-9])?", fullmatch=True))
def test_keys_round_trip(name: str) -> None:
    key = dns_record.pack_key(name)
    assert len(key) == dns_record.KEY_SIZE
    assert dns_record.unpack_key(key) == name


@given(st.binary(min_size=dns_record.VALUE_SIZE, max_size=dns_record.VALUE_SIZE))
def test_arbitrary_bytes_decode_or_are_refused(data: bytes) -> None:
    try:
        record = dns_record.unpack_value(data)
    except RecordError:
        return
    assert dns_record.pack_value(record) == data  # what decodes is exactly what we write


def test_the_bytes_of_one_record() -> None:
    record = DnsRecord(
        v6=(V6,), v4=(V4,), families=Families.IPV4 | Families.IPV6, expires_ns=0x0102030405060708
    )
    data = dns_record.pack_value(record)
    assert data[:16] == bytes.fromhex("08070605040302010301010000000000")
    assert data[16:32] == V6.packed
    assert data[32:144] == bytes(112)
    assert data[144:148] == V4.packed
    assert data[148:] == bytes(28)


def test_from_addresses_splits_by_family_and_keeps_eight_of_each() -> None:
    v4 = tuple(ipaddress.IPv4Address(f"192.0.2.{i}") for i in range(1, 11))
    record = DnsRecord.from_addresses((V6, *v4), Families.IPV4 | Families.IPV6, 5)
    assert record.v6 == (V6,)
    assert record.v4 == v4[:8]


def test_covers() -> None:
    both = DnsRecord(v6=(), v4=(V4,), families=Families.IPV4 | Families.IPV6, expires_ns=1)
    v4_only = DnsRecord(v6=(), v4=(V4,), families=Families.IPV4, expires_ns=1)
    assert both.covers(dns_record.families_for("any"))
    assert both.covers(dns_record.families_for("ipv6"))  # asked, and there was no AAAA
    assert v4_only.covers(dns_record.families_for("ipv4"))
    assert not v4_only.covers(dns_record.families_for("prefer_ipv6"))


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d[:-1], "value is 175 bytes, expected 176"),
        (lambda d: d[:11] + b"\x01" + d[12:], "padding is not zero"),
        (lambda d: d[:8] + b"\x04" + d[9:], "family bits 0x4 are not IPv4/IPv6"),
        (lambda d: d[:8] + b"\x00" + d[9:], "family bits 0x0 are not IPv4/IPv6"),
        (lambda d: d[:9] + b"\x09" + d[10:], "9 IPv6 / 1 IPv4 addresses exceed the 8/8 slots"),
        (lambda d: d[:9] + b"\x00\x00" + d[11:], "no addresses"),
        (lambda d: d[:8] + b"\x01" + d[9:], "addresses of a family that was not asked for"),
        (lambda d: d[:9] + b"\x00" + d[10:], "unused address slots are not zero"),
        (lambda d: d[:-1] + b"\x01", "unused address slots are not zero"),
    ],
)
def test_corrupt_values_are_refused(mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    good = dns_record.pack_value(
        DnsRecord(v6=(V6,), v4=(V4,), families=Families.IPV4 | Families.IPV6, expires_ns=9)
    )
    with pytest.raises(RecordError) as caught:
        dns_record.unpack_value(mutate(good))
    assert str(caught.value) == message


@pytest.mark.parametrize("name", ["", "a" * 254, "bücher.test", "a\0b.test"])
def test_names_that_cannot_be_keys(name: str) -> None:
    with pytest.raises(ValueError, match="not"):
        dns_record.pack_key(name)


def test_keys_that_are_not_names() -> None:
    with pytest.raises(RecordError, match="expected 256"):
        dns_record.unpack_key(b"a")
    with pytest.raises(RecordError, match="NUL-padded ASCII"):
        dns_record.unpack_key(bytes(256))
    with pytest.raises(RecordError, match="NUL-padded ASCII"):
        dns_record.unpack_key(b"a\0b".ljust(256, b"\0"))


def test_pack_refuses_what_does_not_fit() -> None:
    with pytest.raises(ValueError, match="at least one address"):
        dns_record.pack_value(DnsRecord(v6=(), v4=(), families=Families.IPV4, expires_ns=1))
    with pytest.raises(ValueError, match="64 bits"):
        dns_record.pack_value(
            DnsRecord(v6=(), v4=(V4,), families=Families.IPV4, expires_ns=1 << 64)
        )


def test_layout_matches_the_btf_of_the_object() -> None:
    """sansio/dns_record.py mirrors bpf/dns_cache.bpf.c: sizes and member offsets."""
    spec = loader.load_collection_spec(object_bytes("dns_cache.bpf.o"))
    cache, stats = spec.maps["dns_cache"], spec.maps["dns_cache_stats"]
    assert (cache.key_size, cache.value_size) == (dns_record.KEY_SIZE, dns_record.VALUE_SIZE)
    assert (stats.key_size, stats.value_size, stats.max_entries) == (4, 8, len(dns_record.Stat))
    assert spec.btf is not None
    btf = parse_btf(spec.btf)
    value = btf.by_name("dns_value", Kind.STRUCT)
    assert value is not None
    assert [(m.name, m.offset // 8) for m in value.members] == [
        ("expires_ns", 0),
        ("families", 8),
        ("n_v6", 9),
        ("n_v4", 10),
        ("pad", 11),
        ("v6", 16),
        ("v4", 16 + 16 * dns_record.MAX_V6),
    ]
    # struct stat_add is a local of the program (not in BTF): u32 index, u32 pad, s64 delta.
    assert dns_record.STAT_ADD.format == "<IIq"
