"""The 8-byte eBPF instruction codec, and the patches relocations need.

An instruction is ``code:u8, dst:4 | src:4 << 4, off:s16, imm:s32`` (little-endian). ``ld_imm64``
(``code == 0x18``) takes two slots; the second carries the upper 32 bits of the immediate, or
for ``src == BPF_PSEUDO_MAP_VALUE`` the offset into the map value.
"""

from __future__ import annotations

import struct

import attrs

INSN_SIZE = 8

#: ``BPF_LD | BPF_IMM | BPF_DW``
LD_IMM64 = 0x18
#: ``BPF_JMP | BPF_CALL``
CALL = 0x85
#: ``BPF_JMP | BPF_EXIT``
EXIT = 0x95
#: ``BPF_ALU64 | BPF_MOV | BPF_K``
MOV64_IMM = 0xB7

_FMT = struct.Struct("<BBhi")


@attrs.frozen
class Instruction:
    code: int
    dst: int = 0
    src: int = 0
    off: int = 0
    imm: int = 0

    def encode(self) -> bytes:
        return _FMT.pack(self.code, (self.src << 4) | self.dst, self.off, self.imm)

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview, index: int = 0) -> Instruction:
        code, regs, off, imm = _FMT.unpack_from(data, index * INSN_SIZE)
        return cls(code, regs & 0xF, regs >> 4, off, imm)


def count(insns: bytes | bytearray) -> int:
    return len(insns) // INSN_SIZE


def set_imm(insns: bytearray, index: int, imm: int) -> None:
    struct.pack_into("<i", insns, index * INSN_SIZE + 4, imm)


def set_src(insns: bytearray, index: int, src: int) -> None:
    pos = index * INSN_SIZE + 1
    insns[pos] = (insns[pos] & 0x0F) | (src << 4)


def patch_map_fd(insns: bytearray, index: int, fd: int) -> None:
    """Make the ``ld_imm64`` at ``index`` load map ``fd`` (``src = BPF_PSEUDO_MAP_FD``)."""
    set_src(insns, index, 1)
    set_imm(insns, index, fd)
    set_imm(insns, index + 1, 0)


def patch_map_value(insns: bytearray, index: int, fd: int, offset: int) -> None:
    """Make the ``ld_imm64`` at ``index`` load ``&value_of(map fd)[offset]``."""
    set_src(insns, index, 2)
    set_imm(insns, index, fd)
    set_imm(insns, index + 1, offset)


def exit_with(value: int) -> bytes:
    """``r0 = value; exit``: the smallest valid program (used by feature probes)."""
    return Instruction(MOV64_IMM, 0, 0, 0, value).encode() + Instruction(EXIT).encode()
