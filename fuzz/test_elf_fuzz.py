"""Fuzz the ELF/BTF reader: any bytes give a CollectionSpec or a LoaderError, nothing else.

Three sources of input: arbitrary bytes; a real test object with bytes overwritten, truncated
or with garbage appended (mitmproxy's trick); and a real object whose ``.BTF`` section alone is
mutated, which reaches the BTF parser and the DATASEC fix-up much more often than random
bytes do. cilium's ``FuzzLoadCollectionSpec`` states the same contract.
"""

from __future__ import annotations

import struct
from pathlib import Path

import trio_sni_loader as loader
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from trio_sni_loader.btf import parse_btf

DATA = Path(__file__).resolve().parent.parent / "tests" / "data" / "bpf"
SEEDS = [
    (DATA / name).read_bytes() for name in ("loader_test.bpf.o", "sockhash.bpf.o", "bad.bpf.o")
]


def _btf_range(blob: bytes) -> tuple[int, int]:
    """File offset and size of the first .BTF section (found through the section headers)."""
    (shoff,) = struct.unpack_from("<Q", blob, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", blob, 0x3A)
    str_off = struct.unpack_from("<Q", blob, shoff + shstrndx * shentsize + 0x18)[0]
    for i in range(shnum):
        base = shoff + i * shentsize
        (name_off,) = struct.unpack_from("<I", blob, base)
        end = blob.index(b"\0", str_off + name_off)
        if blob[str_off + name_off : end] == b".BTF":
            off, size = struct.unpack_from("<QQ", blob, base + 0x18)
            return off, size
    raise AssertionError("no .BTF")


def check(blob: bytes) -> None:
    try:
        spec = loader.load_collection_spec(blob)
    except loader.LoaderError:
        return
    assert isinstance(spec, loader.CollectionSpec)
    for prog in spec.programs.values():
        assert len(prog.instructions) % 8 == 0
        for ref in prog.references:
            assert ref.map in spec.maps
            assert 0 <= ref.insn < prog.insn_count


@st.composite
def mutated_objects(draw: st.DrawFn) -> bytes:
    blob = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 8))):
        pos = draw(st.integers(0, len(blob) - 1))
        chunk = draw(st.binary(min_size=1, max_size=8))
        blob[pos : pos + len(chunk)] = chunk
    if draw(st.booleans()):
        cut = draw(st.integers(0, len(blob)))
        blob = blob[:cut] + bytearray(draw(st.binary(max_size=64)))
    return bytes(blob)


@st.composite
def btf_mutations(draw: st.DrawFn) -> bytes:
    blob = bytearray(draw(st.sampled_from(SEEDS)))
    off, size = _btf_range(bytes(blob))
    for _ in range(draw(st.integers(1, 6))):
        pos = off + draw(st.integers(0, size - 1))
        width = draw(st.sampled_from([1, 2, 4]))
        value = draw(st.integers(0, (1 << (8 * width)) - 1))
        blob[pos : pos + width] = value.to_bytes(width, "little")[: off + size - pos]
    return bytes(blob)


@given(st.binary(max_size=4096))
@example(b"\x7fELF\x02\x01\x01" + bytes(57)).via("header only, no sections")
def test_arbitrary_bytes(blob: bytes) -> None:
    check(blob)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(mutated_objects())
def test_mutated_objects(blob: bytes) -> None:
    check(blob)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(btf_mutations())
def test_mutated_btf(blob: bytes) -> None:
    check(blob)


@given(st.binary(max_size=512))
def test_btf_parser_alone(raw: bytes) -> None:
    try:
        btf = parse_btf(b"\x9f\xeb\x01\x00\x18\x00\x00\x00" + raw)
    except loader.BTFError:
        return
    for t in btf.types:
        assert t.kind_name
