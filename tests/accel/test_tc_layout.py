"""accel/tc.py mirrors bpf/tc_shaper.bpf.c (checked against the object's BTF), and its
encoders for the configuration maps. Unprivileged: nothing is loaded."""

from __future__ import annotations

import ipaddress
import struct

from trio_sni_loader.btf import Kind, parse_btf

from trio_sni.accel import objects
from trio_sni.accel.tc import (
    CLASS_RATE,
    CLASSES,
    LPM_KEY,
    SLOTS,
    TC_MAPS,
    TC_STATS,
    class_rate,
    lpm_key,
)


def test_the_struct_mirrors_match_the_btf() -> None:
    spec = objects.prebuilt_spec("tc_shaper.bpf.o", TC_MAPS, [])
    assert spec.btf is not None
    btf = parse_btf(spec.btf)
    expected = {
        "class_rate": (CLASS_RATE, ["bytes_per_sec", "burst", "fill_ns"]),
        "tc_stats": (
            TC_STATS,
            ["passed_packets", "passed_bytes", "dropped_packets", "dropped_bytes"],
        ),
        "lpm_key": (LPM_KEY, ["prefixlen", "addr"]),
    }
    for name, (codec, members) in expected.items():
        t = btf.by_name(name, Kind.STRUCT)
        assert t is not None, name
        assert t.size == codec.size
        assert [m.name for m in t.members] == members
    assert spec.maps["rates"].value_size == CLASS_RATE.size
    assert spec.maps["rates"].max_entries == len(CLASSES)
    assert spec.maps["counters"].value_size == TC_STATS.size
    assert spec.maps["counters"].max_entries == len(SLOTS)
    assert spec.maps["exempt"].key_size == LPM_KEY.size


def test_class_rates_are_bytes_per_second_with_the_time_to_fill() -> None:
    assert CLASS_RATE.unpack(class_rate(0, 262144)) == (0, 262144, 0)
    assert CLASS_RATE.unpack(class_rate(20_000_000, 262144)) == (2_500_000, 262144, 104857600)
    assert CLASS_RATE.unpack(class_rate(8000, 1 << 30))[2] == (1 << 30) * 1_000_000


def test_lpm_keys_map_ipv4_into_ipv6() -> None:
    assert lpm_key("198.51.100.7/24") == struct.pack(
        "<I16s", 120, bytes(10) + b"\xff\xff" + bytes([198, 51, 100, 0])
    )
    assert lpm_key("2001:db8::/32") == struct.pack(
        "<I16s", 32, ipaddress.IPv6Address("2001:db8::").packed
    )
