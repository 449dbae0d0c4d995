"""Programs against the kernel: load everything, verifier errors, test runs."""

from __future__ import annotations

import pytest
import trio_sni_loader as loader
from trio_sni_loader import Collection, Int, Program, ProgType, asm

from .conftest import DATA, bpftool  # type: ignore[import-not-found]

pytestmark = pytest.mark.bpf

PACKET = bytes(range(64))  # any 64 bytes: the programs do not parse the packet

BPFTOOL_TYPES = {
    ProgType.XDP: "xdp",
    ProgType.SCHED_CLS: "sched_cls",
    ProgType.SOCKET_FILTER: "socket_filter",
    ProgType.SK_SKB: "sk_skb",
}


@pytest.mark.parametrize("obj", ["loader_test.bpf.o", "sockhash.bpf.o"])
def test_every_program_loads_with_btf(obj: str) -> None:
    spec = loader.load_collection_spec(DATA / obj)
    with Collection.load(spec) as coll:
        assert coll.btf is not None
        assert coll.btf_error is None
        assert set(coll.programs) == set(spec.programs)
        for name, prog in coll.programs.items():
            info = prog.info()
            seen = bpftool("prog", "show", "id", str(info.id))
            assert seen["name"] == name[:15]
            assert seen["type"] == BPFTOOL_TYPES[spec.programs[name].type]
            assert seen["tag"] == info.tag
            assert seen.get("btf_id", 0) > 0  # func/line info went with it
            map_ids = {m.info().id for m in coll.maps.values()}
            assert set(seen.get("map_ids", [])) <= map_ids
        for m in coll.maps.values():
            info = m.info()
            kernel_name = m.spec.kernel_name or m.name  # global data: <object>.data
            assert bpftool("map", "show", "id", str(info.id))["name"] == kernel_name[:15]
            # Key/value BTF goes with BTF-defined maps, never with socket maps.
            has_btf = m.spec.type != loader.MapType.SOCKHASH and not m.spec.is_global_data
            assert bool(info.btf_key_type_id and info.btf_value_type_id) == has_btf, m.name


def test_no_libbpf_or_compiler_at_run_time() -> None:
    """The loader drives the kernel itself: libbpf is never mapped into the process."""
    spec = loader.load_collection_spec(DATA / "loader_test.bpf.o")
    with Collection.load(spec) as coll:
        coll.programs["xdp_prog"].test_run(PACKET)
        with open("/proc/self/maps") as f:
            mapped = f.read()
    assert "libbpf" not in mapped
    assert "libclang" not in mapped
    assert "libLLVM" not in mapped


def test_bad_program_gives_verifier_error_with_source_lines() -> None:
    spec = loader.load_collection_spec(DATA / "bad.bpf.o")
    with pytest.raises(loader.VerifierError) as exc:
        Collection.load(spec)
    err = exc.value
    assert err.program == "bad_prog"
    log = "\n".join(err.log)
    assert "invalid access to packet" in log
    # BTF line info makes the kernel quote the C source with file and line.
    assert "BAD: no bounds check" in log
    assert "bad.bpf.c:9" in log
    assert "bad_prog" in str(err)
    assert "invalid access to packet" in str(err)
    assert err.object == str(DATA / "bad.bpf.o")  # which file, in the message too
    assert f"verifier rejected program 'bad_prog' of {DATA / 'bad.bpf.o'} " in str(err)


#: ``call bpf_trace_printk; r0 = 0; exit``: the GPL check comes before the arguments'.
GPL_ONLY_CALL = (
    asm.Instruction(asm.CALL, imm=6).encode() + asm.exit_with(0)  # helper 6: bpf_trace_printk
)


@pytest.mark.parametrize("license", ["Proprietary", ""])
def test_a_non_gpl_program_calling_a_gpl_only_helper_is_refused_by_name(license: str) -> None:
    """The object's licence is passed as it is (none stays none, never "GPL"), and the
    kernel's refusal names the helper and the licence."""
    spec = loader.ProgramSpec(
        name="printk",
        section="socket",
        type=ProgType.SOCKET_FILTER,
        attach_type=None,
        license=license,
        instructions=GPL_ONLY_CALL,
    )
    with pytest.raises(loader.LicenseError) as exc:
        Program.load(spec)
    assert exc.value.helper == "bpf_trace_printk#6"
    assert exc.value.license == license
    text = str(exc.value)
    assert "calls the GPL-only helper bpf_trace_printk#6" in text
    assert (f"its licence is {license!r}" if license else "it has no licence") in text
    # Under GPL the same call gets past the licence check (and fails on its arguments).
    with pytest.raises(loader.VerifierError) as gpl:
        Program.load(spec.copy(license="GPL"))
    assert not isinstance(gpl.value, loader.LicenseError)


def test_verifier_log_buffer_grows() -> None:
    spec = loader.load_collection_spec(DATA / "loader_test.bpf.o")
    with Collection.load(spec, programs=[]) as coll:
        prog = Program.load(spec.programs["xdp_prog"], maps=coll.maps, log_level=2, log_size=256)
        with prog:
            assert len(prog.log) > 256
            assert "processed" in prog.log.splitlines()[-1] or "processed" in prog.log


def test_xdp_and_tc_test_run_values() -> None:
    spec = loader.load_collection_spec(DATA / "loader_test.bpf.o")
    with Collection.load(spec) as coll:
        progs, maps = coll.programs, coll.maps
        counters = maps["counters"]
        counters.key_codec = counters.value_codec = Int()
        # xdp_prog returns xdp_verdict from .rodata (2 = XDP_PASS) and calls bump(0).
        result = progs["xdp_prog"].test_run(PACKET, repeat=3)
        assert result.retval == 2
        assert result.data == PACKET
        assert counters[0] == 3
        # tc_one returns tc_verdict from .data (2 = TC_ACT_SHOT); .data is writable.
        assert progs["tc_one"].test_run(PACKET).retval == 2
        maps[".data"].update(0, (0).to_bytes(4, "little"))
        assert progs["tc_one"].test_run(PACKET).retval == 0
        assert progs["tc_two"].test_run(PACKET).retval == 0
        assert progs["tcx_in"].test_run(PACKET).retval == 0xFFFFFFFF  # TCX_NEXT (-1)
        assert counters[1] == 2
        assert counters[2] == 1
        # .bss packets is bumped by every bump() call: 3 + 2 + 1.
        assert int.from_bytes(maps[".bss"][0], "little") == 6
        percpu = maps["percpu"]
        assert sum(int.from_bytes(v, "little") for v in percpu[b"\0\0\0\0"]) == 3


def test_sk_skb_cannot_be_test_run() -> None:
    spec = loader.load_collection_spec(DATA / "sockhash.bpf.o")
    with (
        Collection.load(spec, programs=["stream_verdict"]) as coll,
        pytest.raises(loader.NotSupportedError, match="real sockets"),
    ):
        coll.programs["stream_verdict"].test_run(PACKET)


def test_unknown_section_is_refused_before_the_kernel() -> None:
    spec = loader.load_collection_spec(DATA / "loader_test.bpf.o")
    odd = spec.programs["tc_two"].copy(type=ProgType.UNSPEC, section="weird")
    with pytest.raises(loader.LoaderError, match="section 'weird'"):
        Program.load(odd)


def test_core_relocations_are_passed_to_the_kernel() -> None:
    """``.BTF.ext`` CO-RE records go to BPF_PROG_LOAD as they are (byte offsets in the linked
    program) and the kernel resolves them against its own BTF: the product's verdict program
    reads ``struct tcp_sock``'s ``write_seq`` through one."""
    from .conftest import PREBUILT  # type: ignore[import-not-found]

    spec = loader.load_collection_spec(PREBUILT / "sockhash.bpf.o")
    prog = spec.programs["stream_verdict"]
    [(insn_off, type_id, access_off, kind)] = prog.core_relos
    assert insn_off % 8 == 0
    assert insn_off // 8 < prog.insn_count
    assert kind == 0  # BPF_CORE_FIELD_BYTE_OFFSET
    assert spec.btf is not None
    btf = loader.btf.parse_btf(spec.btf)
    assert btf.types[type_id].name == "tcp_sock"
    assert btf.string(access_off) == "0:0"  # first member of the local struct: write_seq
    with Collection.load(spec, programs=["stream_verdict"]) as coll:
        assert coll.programs["stream_verdict"].info().id > 0
    # Without the object's BTF the records cannot be resolved: say so instead of failing late.
    with pytest.raises(loader.LoaderError, match="CO-RE relocations"):
        Program.load(prog)
