"""Unprivileged: objects parse into the expected specs (cilium TestLoadCollectionSpec)."""

from __future__ import annotations

import contextlib
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
import trio_sni_loader as loader
from trio_sni_loader import AttachType, MapSpec, MapType, PinType, ProgType
from trio_sni_loader.btf import Kind, parse_btf, parse_btf_ext
from trio_sni_loader.elf import SECTION_DEFS, program_type_for_section

from .conftest import DATA, PREBUILT  # type: ignore[import-not-found]

LOADER_TEST_MAPS = {
    "hash_map": MapSpec("hash_map", MapType.HASH, 4, 8, 64),
    "counters": MapSpec("counters", MapType.ARRAY, 4, 8, 4),
    "percpu": MapSpec("percpu", MapType.PERCPU_ARRAY, 4, 4, 2),
    "lru": MapSpec("lru", MapType.LRU_HASH, 4, 4, 8),
    "allow": MapSpec("allow", MapType.LPM_TRIE, 8, 4, 16, flags=1),
    "pinned": MapSpec("pinned", MapType.HASH, 4, 4, 32, pinning=PinType.BY_NAME),
    # Global data as libbpf makes it: BPF_F_MMAPABLE (0x400), .rodata BPF_F_RDONLY_PROG (0x80).
    ".rodata": MapSpec(
        ".rodata", MapType.ARRAY, 4, 4, 1, flags=0x480, contents=struct.pack("<I", 2), freeze=True
    ),
    ".data": MapSpec(".data", MapType.ARRAY, 4, 4, 1, flags=0x400, contents=struct.pack("<I", 2)),
    ".bss": MapSpec(".bss", MapType.ARRAY, 4, 8, 1, flags=0x400, contents=bytes(8)),
}

# (section, type, attach type, expected_attach_type at load, subprograms, references)
LOADER_TEST_PROGRAMS = {
    "xdp_prog": (
        "xdp",
        ProgType.XDP,
        AttachType.XDP,
        37,
        ("bump",),
        {
            ("map", "percpu", 0),
            ("value", ".rodata", 0),
            ("map", "counters", 0),
            ("value", ".bss", 0),
        },
    ),
    "tc_one": (
        "tc",
        ProgType.SCHED_CLS,
        None,
        0,
        ("bump",),
        {("value", ".data", 0), ("map", "counters", 0), ("value", ".bss", 0)},
    ),
    "tc_two": ("tc", ProgType.SCHED_CLS, None, 0, (), set()),
    "tcx_in": (
        "tcx/ingress",
        ProgType.SCHED_CLS,
        AttachType.TCX_INGRESS,
        0,
        ("bump",),
        {("map", "counters", 0), ("value", ".bss", 0)},
    ),
    "tcx_out": ("tcx/egress", ProgType.SCHED_CLS, AttachType.TCX_EGRESS, 0, (), set()),
    "sock_filter": ("socket", ProgType.SOCKET_FILTER, None, 0, (), set()),
}


def test_loader_test_object() -> None:
    spec = loader.load_collection_spec(DATA / "loader_test.bpf.o")
    assert spec.license == "GPL"
    assert dict(spec.maps) == LOADER_TEST_MAPS
    assert set(spec.programs) == set(LOADER_TEST_PROGRAMS)
    for name, (section, ptype, attach, eat, subs, refs) in LOADER_TEST_PROGRAMS.items():
        prog = spec.programs[name]
        assert (
            prog.section,
            prog.type,
            prog.attach_type,
            prog.expected_attach_type,
            prog.subprograms,
            prog.license,
        ) == (section, ptype, attach, eat, subs, "GPL")
        assert {(r.kind, r.map, r.offset) for r in prog.references} == refs
        # Every function start (entry + appended subprogram) has a func_info record, and
        # line info starts at instruction 0 and is sorted: what the kernel requires.
        assert len(prog.func_info) == 1 + len(subs)
        assert prog.func_info[0][0] == 0
        assert prog.line_info[0][0] == 0
        assert [r[0] for r in prog.line_info] == sorted(r[0] for r in prog.line_info)
    assert spec.btf is not None


def test_sockhash_object() -> None:
    spec = loader.load_collection_spec(DATA / "sockhash.bpf.o")
    assert dict(spec.maps) == {
        "sock_hash": MapSpec("sock_hash", MapType.SOCKHASH, 8, 8, 64),
        "peer": MapSpec("peer", MapType.HASH, 8, 8, 64),
    }
    verdict = spec.programs["stream_verdict"]
    assert (verdict.type, verdict.attach_type, verdict.expected_attach_type) == (
        ProgType.SK_SKB,
        AttachType.SK_SKB_STREAM_VERDICT,
        5,
    )
    plain = spec.programs["skb_verdict"]
    assert (plain.type, plain.attach_type, plain.expected_attach_type) == (ProgType.SK_SKB, None, 0)
    assert {r.map for r in verdict.references} == {"peer", "sock_hash"}
    assert all(r.kind == "map" for r in verdict.references)


def test_bad_object() -> None:
    spec = loader.load_collection_spec(DATA / "bad.bpf.o")
    assert spec.license == "Dual MIT/GPL"
    assert dict(spec.maps) == {}
    assert list(spec.programs) == ["bad_prog"]
    assert spec.programs["bad_prog"].references == ()


def test_sources_of_reading_agree() -> None:
    path = DATA / "loader_test.bpf.o"
    by_path = loader.load_collection_spec(path)
    by_str = loader.load_collection_spec(str(path))
    by_bytes = loader.load_collection_spec(path.read_bytes())
    with open(path, "rb") as f:
        by_file = loader.load_collection_spec(f)
    assert by_path == by_str == by_bytes == by_file


def test_prebuilt_objects_parse() -> None:
    """Every shipped object parses, and every program has a known type.

    (The expected literals for each product object belong with the issue that adds it.)
    """
    for path in sorted(PREBUILT.glob("*.bpf.o")) + sorted(DATA.glob("*.bpf.o")):
        spec = loader.load_collection_spec(path)
        assert spec.programs or spec.maps, path.name
        for prog in spec.programs.values():
            assert prog.type != ProgType.UNSPEC, f"{path.name}: {prog.name} in {prog.section}"


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ("xdp", (ProgType.XDP, AttachType.XDP)),
        ("xdp.frags", (ProgType.XDP, AttachType.XDP)),
        ("xdp/foo", None),  # libbpf >= 1.0: not an XDP program
        ("tc", (ProgType.SCHED_CLS, None)),
        ("tc/ingress", (ProgType.SCHED_CLS, AttachType.TCX_INGRESS)),
        ("tcx/ingress", (ProgType.SCHED_CLS, AttachType.TCX_INGRESS)),
        ("tcx/egress", (ProgType.SCHED_CLS, AttachType.TCX_EGRESS)),
        ("tcx/other", None),
        ("classifier", (ProgType.SCHED_CLS, None)),
        ("socket", (ProgType.SOCKET_FILTER, None)),
        ("socket/x", None),
        ("sk_skb", (ProgType.SK_SKB, None)),
        ("sk_skb/stream_verdict", (ProgType.SK_SKB, AttachType.SK_SKB_STREAM_VERDICT)),
        ("sk_skb/stream_parser", (ProgType.SK_SKB, AttachType.SK_SKB_STREAM_PARSER)),
        ("sk_skb/verdict", (ProgType.SK_SKB, AttachType.SK_SKB_VERDICT)),
        ("sk_skb/other", None),
        ("sk_msg", (ProgType.SK_MSG, AttachType.SK_MSG_VERDICT)),
        ("kprobe/foo", None),
    ],
)
def test_section_rules(section: str, expected: tuple[ProgType, AttachType | None] | None) -> None:
    found = program_type_for_section(section)
    assert (None if found is None else (found.prog_type, found.attach_type)) == expected


def test_section_table_order_puts_specific_names_first() -> None:
    names = [d.pattern for d in SECTION_DEFS]
    assert names.index("tc/ingress") < names.index("tc")
    assert names.index("sk_skb/stream_verdict") < names.index("sk_skb")
    assert names.index("xdp.frags") < names.index("xdp")


def test_btf_datasec_fixup() -> None:
    """Raw clang BTF has DATASEC sizes of 0; the spec's BTF has them filled in."""
    from elftools.elf.elffile import ELFFile

    with open(DATA / "loader_test.bpf.o", "rb") as f:
        elf = ELFFile(f)
        raw = elf.get_section_by_name(".BTF").data()
        ext_raw = elf.get_section_by_name(".BTF.ext").data()
        sizes = {s.name: s["sh_size"] for s in elf.iter_sections()}
    before = parse_btf(raw)
    after = parse_btf(loader.load_collection_spec(DATA / "loader_test.bpf.o").btf or b"")
    secs_before = {t.name: t for t in before.datasecs()}
    secs_after = {t.name: t for t in after.datasecs()}
    assert secs_before[".maps"].size == 0
    for name in (".maps", ".rodata", ".data", ".bss", "license"):
        assert secs_after[name].size == sizes[name]
    offsets = {after.type(v).name: off for v, off, _ in secs_after[".maps"].secinfo}
    assert offsets == {
        "percpu": 0,
        "hash_map": 0x20,
        "counters": 0x40,
        "lru": 0x60,
        "allow": 0x80,
        "pinned": 0xA8,
    }
    ext = parse_btf_ext(ext_raw, before)
    assert set(ext.func_info) == {".text", "xdp", "tc", "tcx/ingress", "tcx/egress", "socket"}
    assert ext.func_info_rec_size == 8
    assert ext.line_info_rec_size == 16
    func = before.type(ext.func_info[".text"][0].type_id)
    assert (func.kind, func.name) == (Kind.FUNC, "bump")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "not an ELF file"),
        (b"\x7fELF", "malformed ELF"),
        (b"hello world" * 10, "not an ELF file"),
    ],
)
def test_malformed_input_is_a_typed_error(data: bytes, message: str) -> None:
    with pytest.raises(loader.ELFFormatError, match=message):
        loader.load_collection_spec(data)


def test_wrong_machine() -> None:
    import sys

    with open(sys.executable, "rb") as f:
        head = f.read()
    with pytest.raises(loader.ELFFormatError, match="not a BPF object"):
        loader.load_collection_spec(head)


def test_truncated_objects_never_escape_the_error_family() -> None:
    blob = (DATA / "loader_test.bpf.o").read_bytes()
    for cut in range(0, len(blob), 97):
        with contextlib.suppress(loader.LoaderError):
            loader.load_collection_spec(blob[:cut])


def test_a_truncated_file_is_named_and_called_truncated(tmp_path: Path) -> None:
    """The path, and the word: not pyelftools' "expected 8, found 7"."""
    blob = (DATA / "loader_test.bpf.o").read_bytes()
    cut = tmp_path / "cut.bpf.o"
    for size in (40, len(blob) // 2, len(blob) - 1):
        cut.write_bytes(blob[:size])
        with pytest.raises(loader.ELFFormatError) as exc:
            loader.load_collection_spec(cut)
        assert str(exc.value).startswith(f"{cut}: truncated: "), str(exc.value)
    # Other problems name the file too.
    corrupt = bytearray(blob)
    pos = corrupt.index(b"\x9f\xeb\x01\x00")
    corrupt[pos : pos + 2] = b"\xeb\x9f"
    cut.write_bytes(bytes(corrupt))
    with pytest.raises(loader.BTFError, match=f"^{cut}: .*big-endian"):
        loader.load_collection_spec(cut)
    assert loader.load_collection_spec(DATA / "loader_test.bpf.o").source == str(
        DATA / "loader_test.bpf.o"
    )


def test_corrupt_btf_magic() -> None:
    blob = bytearray((DATA / "loader_test.bpf.o").read_bytes())
    pos = blob.index(b"\x9f\xeb\x01\x00")  # .BTF header (the first one)
    blob[pos : pos + 2] = b"\xeb\x9f"
    with pytest.raises(loader.BTFError, match="big-endian"):
        loader.load_collection_spec(bytes(blob))


@pytest.mark.skipif(
    shutil.which("clang-19") is None or shutil.which("make") is None,
    reason="needs clang-19 and make (a build check; CI installs them)",
)
def test_objects_rebuild_byte_identical(tmp_path: Path) -> None:
    """The Makefile is reproducible: a rebuild in another folder gives the same bytes."""
    objects = ("loader_test.bpf.o", "sockhash.bpf.o", "bad.bpf.o", "parity.bpf.o")
    for name in ("Makefile", "common.h", *(obj.removesuffix(".o") + ".c" for obj in objects)):
        shutil.copy(DATA / name, tmp_path / name)
    subprocess.run(["make", "-s", "-C", str(tmp_path)], check=True, capture_output=True)
    for obj in objects:
        assert (tmp_path / obj).read_bytes() == (DATA / obj).read_bytes(), obj
