"""Unprivileged: the linker appends called functions and points the calls at them."""

from __future__ import annotations

import struct

import trio_sni_loader as loader

from .conftest import DATA  # type: ignore[import-not-found]


def test_subprogram_call_is_relinked() -> None:
    """The call to bump() points at the appended copy of .text."""
    spec = loader.load_collection_spec(DATA / "loader_test.bpf.o")
    prog = spec.programs["tc_one"]
    insns = prog.instructions
    calls = [
        i for i in range(prog.insn_count) if insns[i * 8] == 0x85 and insns[i * 8 + 1] >> 4 == 1
    ]
    assert len(calls) == 1
    (imm,) = struct.unpack_from("<i", insns, calls[0] * 8 + 4)
    target = calls[0] + 1 + imm
    assert target == prog.func_info[1][0]  # the subprogram's first instruction
    # The entry function of tc_one is 6 instructions; bump() follows it.
    assert target == 6
