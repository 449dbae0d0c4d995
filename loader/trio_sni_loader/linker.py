"""Linking: a program's entry function and every function it calls, in one instruction stream.

:mod:`loader.elf` finds the functions and relocations of an object's code sections; the linker
turns them into each program's instructions, kept apart from the ELF reader as cilium/ebpf
keeps its linker apart from its ELF reader:

1. Copy the entry function, then walk its calls (``call`` with ``src=1`` and ``ld_imm64`` with
   ``src=4``), appending each called function once and pointing the call at it. Calls inside
   one section carry no relocation and are resolved pc-relative.
2. Turn relocations against maps and global data into :class:`~loader.spec.Reference` records,
   resolved to fds at load time.
3. Carry ``.BTF.ext`` func/line info and CO-RE relocations over to the linked instruction
   indices.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import attrs

from . import asm
from ._sys.consts import PSEUDO_CALL, PSEUDO_FUNC
from .btf import BTFExt
from .errors import ELFFormatError
from .spec import MapSpec, Reference

__all__ = ["Function", "LinkedProgram", "Linker", "Symbol"]

#: ELF relocation types for BPF (``R_BPF_*``).
R_BPF_64_64 = 1
R_BPF_64_ABS64 = 2
R_BPF_64_ABS32 = 3
R_BPF_64_NODYLD32 = 4
R_BPF_64_32 = 10


@attrs.frozen
class Function:
    """A function in a code section, ``[start, end)`` in bytes."""

    name: str
    section: str
    start: int
    end: int


@attrs.frozen
class Symbol:
    name: str
    section: str | None  # None: undefined / special index
    value: int
    size: int
    kind: str  # STT_FUNC, STT_OBJECT, STT_SECTION, ...


#: ``(section, byte offset)`` of a relocated instruction -> ``(R_BPF_* type, symbol)``.
Relocations = Mapping[tuple[str, int], tuple[int, Symbol]]


@attrs.frozen
class LinkedProgram:
    """What linking makes of an entry function; every index is into :attr:`instructions`."""

    instructions: bytes
    references: tuple[Reference, ...]
    subprograms: tuple[str, ...]
    func_info: tuple[tuple[int, int], ...]
    line_info: tuple[tuple[int, int, int, int], ...]
    core_relos: tuple[tuple[int, int, int, int], ...]


class Linker:
    """Links programs out of one object's code sections.

    Args:
        code: the bytes of each code section, by name.
        functions: the functions of each code section, by section name.
        relocations: the relocations of the code sections.
        btf_ext: the object's ``.BTF.ext`` (``None``: no func/line info, no CO-RE).
        maps: the object's maps, which references must name.
    """

    def __init__(
        self,
        code: Mapping[str, bytes],
        functions: Mapping[str, Sequence[Function]],
        relocations: Relocations,
        btf_ext: BTFExt | None,
        maps: Mapping[str, MapSpec],
    ) -> None:
        self._code = code
        self._functions = functions
        self._relocations = relocations
        self._btf_ext = btf_ext
        self._maps = maps

    def link(self, entry: Function) -> LinkedProgram:
        insns = bytearray()
        origin: list[tuple[str, int]] = []  # (section, byte offset) of every slot
        placed: dict[tuple[str, int], int] = {}  # function start -> first index
        order: list[tuple[Function, int]] = []

        def place(func: Function) -> int:
            key = (func.section, func.start)
            if key not in placed:
                placed[key] = len(origin)
                order.append((func, len(origin)))
                insns.extend(self._code[func.section][func.start : func.end])
                origin.extend((func.section, off) for off in range(func.start, func.end, 8))
            return placed[key]

        place(entry)
        references: list[Reference] = []
        i = 0
        while i < len(origin):
            ins = asm.Instruction.decode(insns, i)
            section, offset = origin[i]
            reloc = self._relocations.get((section, offset))
            is_call = ins.code == asm.CALL and ins.src == PSEUDO_CALL
            is_func_ptr = ins.code == asm.LD_IMM64 and ins.src == PSEUDO_FUNC
            if reloc is not None:
                kind, sym = reloc
                if kind == R_BPF_64_32:
                    if not is_call:
                        raise ELFFormatError(f"{section}+{offset}: R_BPF_64_32 on a non-call")
                    target = self._target(sym, sym.value + (ins.imm + 1) * 8, section, offset)
                    self._point_call(insns, i, target, place)
                elif ins.code != asm.LD_IMM64 or i + 1 >= len(origin):
                    raise ELFFormatError(f"{section}+{offset}: R_BPF_64_64 on a non-ld_imm64")
                elif sym.section in self._code:  # callback: ld_imm64 of a function
                    target = self._target(sym, sym.value + ins.imm, section, offset)
                    asm.set_src(insns, i, PSEUDO_FUNC)
                    self._point_call(insns, i, target, place)
                else:
                    references.append(self._data_reference(i, ins, sym, section, offset))
            elif is_call or is_func_ptr:
                # A call inside one section carries no relocation: it is pc-relative.
                delta = (ins.imm + 1) * 8 if is_call else ins.imm * 8 + 8
                self._point_call(insns, i, (section, offset + delta), place)
            i += 2 if ins.code == asm.LD_IMM64 else 1

        func_info: list[tuple[int, int]] = []
        line_info: list[tuple[int, int, int, int]] = []
        core_relos: list[tuple[int, int, int, int]] = []
        if self._btf_ext is not None:
            for func, base in order:
                for rec in self._btf_ext.func_info.get(func.section, ()):
                    if func.start <= rec.insn_off < func.end:
                        func_info.append((base + (rec.insn_off - func.start) // 8, rec.type_id))
                for line in self._btf_ext.line_info.get(func.section, ()):
                    if func.start <= line.insn_off < func.end:
                        line_info.append(
                            (
                                base + (line.insn_off - func.start) // 8,
                                line.file_name_off,
                                line.line_off,
                                line.line_col,
                            )
                        )
                for relo in self._btf_ext.core_relos.get(func.section, ()):
                    if func.start <= relo.insn_off < func.end:
                        core_relos.append(
                            (
                                base * 8 + relo.insn_off - func.start,
                                relo.type_id,
                                relo.access_str_off,
                                relo.kind,
                            )
                        )
        return LinkedProgram(
            instructions=bytes(insns),
            references=tuple(references),
            subprograms=tuple(func.name for func, _ in order[1:]),
            func_info=tuple(func_info),
            line_info=tuple(line_info),
            core_relos=tuple(core_relos),
        )

    def _func_at(self, section: str, offset: int) -> Function:
        for func in self._functions.get(section, ()):
            if func.start == offset:
                return func
        raise ELFFormatError(f"call into {section}+{offset} does not start a function")

    def _target(self, sym: Symbol, offset: int, section: str, at: int) -> tuple[str, int]:
        if sym.section is None or sym.section not in self._code:
            raise ELFFormatError(
                f"{section}+{at}: call to {sym.name!r}, which is not code "
                "(extern functions and kfuncs are not supported)"
            )
        return sym.section, offset

    def _point_call(
        self,
        insns: bytearray,
        index: int,
        target: tuple[str, int],
        place: Callable[[Function], int],
    ) -> None:
        func = self._func_at(*target)
        new = place(func) + (target[1] - func.start) // 8
        asm.set_imm(insns, index, new - (index + 1))

    def _data_reference(
        self, index: int, ins: asm.Instruction, sym: Symbol, section: str, at: int
    ) -> Reference:
        maps = self._maps
        if sym.section is None:
            raise ELFFormatError(
                f"{section}+{at}: reference to undefined symbol {sym.name!r} "
                "(externs, ksyms and kconfig are not supported)"
            )
        if sym.section == ".maps":
            if sym.name not in maps:
                raise ELFFormatError(f"{section}+{at}: reference to unknown map {sym.name!r}")
            return Reference(index, "map", sym.name)
        if sym.section in maps and maps[sym.section].is_global_data:
            offset = sym.value + ins.imm
            if not 0 <= offset < maps[sym.section].value_size:
                raise ELFFormatError(f"{section}+{at}: offset {offset} outside {sym.section}")
            return Reference(index, "value", sym.section, offset)
        raise ELFFormatError(
            f"{section}+{at}: relocation against {sym.name!r} in unsupported section "
            f"{sym.section!r}"
        )
