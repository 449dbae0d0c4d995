"""ELF object file -> :class:`~loader.spec.CollectionSpec`, without a syscall.

Theory of operation
-------------------
1. Read sections and symbols with pyelftools. Any exception it raises on a malformed file
   becomes :class:`~loader.errors.ELFFormatError` (cilium's ``SafeELFFile``).
2. Classify sections: executable sections other than ``.text`` hold programs (one per
   ``STT_FUNC`` symbol, since several programs can share a section); ``.text`` holds
   subprograms; ``.maps`` holds BTF-defined maps (their parameters exist only in ``.BTF``);
   ``.rodata*``/``.data*``/``.bss*`` become one-entry array maps; ``license`` is the license.
3. Collect relocations from ``.rel<section>`` of code sections: ``R_BPF_64_64`` on an
   ``ld_imm64`` names a map or a global variable, ``R_BPF_64_32`` names a call target.
   Relocations of non-code sections (``.rel.BTF``, ``.rel.BTF.ext``, DWARF) are debug
   information and ignored.
4. Link each program (:mod:`loader.linker`): its function and every function it calls, map
   references as :class:`~loader.spec.Reference` records, ``.BTF.ext`` info moved along.
5. Fix up the BTF's DATASECs so the kernel accepts it.

Program types follow libbpf's ``SEC()`` rules for the names this project uses: an exact name
(``xdp``, ``tc``, ``sk_skb``, ``socket``, ``sk_skb/stream_verdict``, ``tcx/ingress`` ...)
matches only itself, so ``SEC("xdp/foo")`` is *not* an XDP program (libbpf >= 1.0).
"""

from __future__ import annotations

import io
import os
import struct
from collections.abc import Mapping
from typing import IO, Any

import attrs

from ._sys.consts import PROG_F_XDP_HAS_FRAGS, AttachType, MapFlag, MapType, ProgType
from .btf import BTF, BTFExt, Kind, parse_btf, parse_btf_ext
from .errors import BTFError, ELFFormatError, LoaderError
from .linker import (
    R_BPF_64_32,
    R_BPF_64_64,
    R_BPF_64_ABS32,
    R_BPF_64_ABS64,
    R_BPF_64_NODYLD32,
    Function,
    LinkedProgram,
    Linker,
    Relocations,
    Symbol,
)
from .spec import CollectionSpec, MapSpec, PinType, ProgramSpec

__all__ = ["load_collection_spec", "program_type_for_section"]

EM_BPF = 247
SHF_EXECINSTR = 0x4
SHN_UNDEF = 0

#: Largest object we read (a guard for fuzzed length fields, not a format limit).
MAX_OBJECT_SIZE = 64 << 20


@attrs.frozen
class SectionDef:
    """One row of libbpf's ``section_defs[]``, restricted to what this project uses."""

    pattern: str
    prog_type: ProgType
    attach_type: AttachType | None  # the hook to attach to (None: caller decides)
    load_attach_type: bool  # pass attach_type as expected_attach_type at load
    flags: int = 0

    def matches(self, name: str) -> bool:
        if self.pattern.endswith("/"):
            return name.startswith(self.pattern)
        if self.pattern.endswith("+"):
            stem = self.pattern[:-1]
            return name == stem or name.startswith(stem + "/")
        return name == self.pattern


#: In libbpf's order: the first match wins.
SECTION_DEFS = (
    SectionDef("socket", ProgType.SOCKET_FILTER, None, False),
    SectionDef("tc/ingress", ProgType.SCHED_CLS, AttachType.TCX_INGRESS, False),
    SectionDef("tc/egress", ProgType.SCHED_CLS, AttachType.TCX_EGRESS, False),
    SectionDef("tcx/ingress", ProgType.SCHED_CLS, AttachType.TCX_INGRESS, False),
    SectionDef("tcx/egress", ProgType.SCHED_CLS, AttachType.TCX_EGRESS, False),
    SectionDef("tc", ProgType.SCHED_CLS, None, False),
    SectionDef("classifier", ProgType.SCHED_CLS, None, False),
    SectionDef("action", ProgType.SCHED_ACT, None, False),
    SectionDef("xdp.frags", ProgType.XDP, AttachType.XDP, True, PROG_F_XDP_HAS_FRAGS),
    SectionDef("xdp", ProgType.XDP, AttachType.XDP, True),
    SectionDef("sk_skb/stream_parser", ProgType.SK_SKB, AttachType.SK_SKB_STREAM_PARSER, True),
    SectionDef("sk_skb/stream_verdict", ProgType.SK_SKB, AttachType.SK_SKB_STREAM_VERDICT, True),
    SectionDef("sk_skb/verdict", ProgType.SK_SKB, AttachType.SK_SKB_VERDICT, True),
    SectionDef("sk_skb", ProgType.SK_SKB, None, False),
    SectionDef("sk_msg", ProgType.SK_MSG, AttachType.SK_MSG_VERDICT, True),
)


def program_type_for_section(name: str) -> SectionDef | None:
    """The libbpf section definition ``name`` matches, or ``None`` (unknown program type)."""
    for sec_def in SECTION_DEFS:
        if sec_def.matches(name):
            return sec_def
    return None


def load_collection_spec(source: str | os.PathLike[str] | bytes | IO[bytes]) -> CollectionSpec:
    """Parse a BPF object (a path, the bytes, or a binary file) into a :class:`CollectionSpec`.

    Raises:
        ELFFormatError: the bytes are not a BPF ELF object this loader understands
            (:class:`~loader.errors.BTFError` for BTF problems).
    """
    path = ""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    elif isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        with open(source, "rb") as f:
            data = f.read(MAX_OBJECT_SIZE + 1)
    else:
        path = str(getattr(source, "name", ""))
        data = source.read(MAX_OBJECT_SIZE + 1)
    where = f"{path}: " if path else ""
    if len(data) > MAX_OBJECT_SIZE:
        raise ELFFormatError(f"{where}object larger than {MAX_OBJECT_SIZE} bytes")
    truncated = _truncation(data)
    if truncated is not None:
        raise ELFFormatError(f"{where}{truncated}")
    try:
        object_name = os.path.basename(path).split(".", 1)[0]  # libbpf's: up to the first dot
        return _Reader(data, object_name).read().copy(source=path)
    except ELFFormatError as exc:
        if not path:
            raise
        raise type(exc)(f"{where}{exc}") from exc
    except LoaderError:
        raise
    except RecursionError as exc:
        raise ELFFormatError(f"{where}malformed object: too deeply nested ({exc})") from exc
    except Exception as exc:  # pyelftools raises many kinds on malformed input
        raise ELFFormatError(f"{where}malformed ELF object: {type(exc).__name__}: {exc}") from exc


def global_data_map_name(object_name: str, section: str) -> str:
    """The name libbpf gives a global data map, which ``bpftool map`` then shows: as much of
    the object's name as fits before the section's (``globals_test`` + ``.rodata`` ->
    ``globals_.rodata``: 15 bytes at most, the section taking at least 7); a section with a
    second dot (``.rodata.str1.1``) alone; characters the kernel refuses as ``_``."""
    suffix = min(max(7, len(section)), _MAP_NAME_MAX)
    prefix = 0 if "." in section[1:] else min(_MAP_NAME_MAX - suffix, len(object_name))
    name = object_name[:prefix] + section[:suffix]
    return "".join(c if c.isalnum() or c in "_." else "_" for c in name)


#: The longest name the kernel keeps for a map (``BPF_OBJ_NAME_LEN`` 16, with its NUL).
_MAP_NAME_MAX = 15

#: ``e_ident``'s byte order values (``EI_DATA``) and the ELF64 header's size.
_ELF_BYTE_ORDERS = {1: "<", 2: ">"}
_ELF64_HEADER_SIZE = 64


def _truncation(data: bytes) -> str | None:
    """Why ``data`` is a cut-off ELF64 object (the header, or the section headers it announces,
    reach past its end), in words; ``None`` if it is not one (other problems are reported
    by the parser)."""
    if not data.startswith(b"\x7fELF") or len(data) < 6 or data[4] != 2:
        return None  # not ELF64: the parser says what it is
    if len(data) < _ELF64_HEADER_SIZE:
        return f"truncated: {len(data)} bytes, fewer than an ELF64 header's {_ELF64_HEADER_SIZE}"
    order = _ELF_BYTE_ORDERS.get(data[5])
    if order is None:
        return None
    (shoff,) = struct.unpack_from(order + "Q", data, 0x28)
    shentsize, shnum = struct.unpack_from(order + "HH", data, 0x3A)
    end = shoff + shentsize * shnum
    if end > len(data):
        return (
            f"truncated: its {shnum} section headers end at byte {end}, but it has only "
            f"{len(data)} bytes"
        )
    return None


class _Reader:
    """One object's sections, symbols, license and BTF, read when it is built; :meth:`read`
    makes the maps and programs from them."""

    def __init__(self, data: bytes, object_name: str = "") -> None:
        from elftools.elf.elffile import ELFFile

        self.object_name = object_name

        if data[:4] != b"\x7fELF":
            raise ELFFormatError("not an ELF file (bad magic)")
        self.elf = ELFFile(io.BytesIO(data))
        if self.elf.header["e_machine"] not in ("EM_BPF", EM_BPF):
            raise ELFFormatError(
                f"not a BPF object: machine is {self.elf.header['e_machine']} (want EM_BPF)"
            )
        if not self.elf.little_endian or self.elf.elfclass != 64:
            raise ELFFormatError("only 64-bit little-endian objects (-target bpfel) are supported")
        #: Sections by name (the first of a name) and section names by index.
        self.sections: dict[str, Any] = {}
        self.by_index: dict[int, str] = {}
        for index, sec in enumerate(self.elf.iter_sections()):
            name = sec.name
            self.by_index[index] = name
            if name and name not in self.sections:
                self.sections[name] = sec
        self.symbols = self._symbols()
        self.license = self._license()
        self.btf = self._btf()
        self.btf_ext = self._btf_ext()

    def read(self) -> CollectionSpec:
        maps = self._maps()
        programs = self._programs(maps)
        blob = None
        if self.btf is not None:
            blob = self.btf.fixed_up(self._section_sizes(), self._symbol_offsets())
        return CollectionSpec(
            maps=maps,
            programs=programs,
            license=self.license,
            btf=blob,
            btf_func_info_rec_size=self.btf_ext.func_info_rec_size if self.btf_ext else 8,
            btf_line_info_rec_size=self.btf_ext.line_info_rec_size if self.btf_ext else 16,
            btf_core_relo_rec_size=self.btf_ext.core_relo_rec_size if self.btf_ext else 16,
        )

    # -- simple sections -------------------------------------------------------------------

    def _symbols(self) -> list[Symbol]:
        symtab = self.elf.get_section_by_name(".symtab")
        symbols: list[Symbol] = []
        if symtab is not None and hasattr(symtab, "iter_symbols"):
            for sym in symtab.iter_symbols():
                shndx = sym["st_shndx"]
                section = self.by_index.get(shndx) if isinstance(shndx, int) else None
                symbols.append(
                    Symbol(
                        sym.name, section, sym["st_value"], sym["st_size"], sym["st_info"]["type"]
                    )
                )
        return symbols

    def _data(self, name: str) -> bytes:
        sec = self.sections[name]
        if sec["sh_size"] > MAX_OBJECT_SIZE:
            raise ELFFormatError(f"section {name}: size {sec['sh_size']} is implausible")
        if sec["sh_type"] == "SHT_NOBITS":
            return bytes(sec["sh_size"])
        data = sec.data()
        if len(data) != sec["sh_size"]:
            raise ELFFormatError(f"section {name} is truncated")
        return bytes(data)

    def _license(self) -> str:
        if "license" not in self.sections:
            return ""
        raw = self._data("license").split(b"\0", 1)[0]
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError as exc:
            raise ELFFormatError("license section is not ASCII") from exc

    def _btf(self) -> BTF | None:
        if ".BTF" not in self.sections:
            return None
        return parse_btf(self._data(".BTF"))

    def _btf_ext(self) -> BTFExt | None:
        if ".BTF.ext" not in self.sections or self.btf is None:
            return None
        return parse_btf_ext(self._data(".BTF.ext"), self.btf)

    def _section_sizes(self) -> dict[str, int]:
        return {name: sec["sh_size"] for name, sec in self.sections.items()}

    def _symbol_offsets(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for sym in self.symbols:
            if sym.section and sym.kind in ("STT_OBJECT", "STT_FUNC", "STT_NOTYPE") and sym.name:
                out.setdefault(sym.section, {}).setdefault(sym.name, sym.value)
        return out

    # -- maps ------------------------------------------------------------------------------

    def _maps(self) -> dict[str, MapSpec]:
        maps: dict[str, MapSpec] = {}
        if ".maps" in self.sections:
            if self.btf is None:
                raise ELFFormatError(".maps needs BTF, but the object has no .BTF section")
            maps.update(self._btf_maps())
        if "maps" in self.sections and self.sections["maps"]["sh_size"]:
            raise ELFFormatError(
                'legacy SEC("maps") definitions are not supported; use BTF-defined maps '
                'in SEC(".maps") (libbpf 1.0 removed them too)'
            )
        for name, sec in self.sections.items():
            if not _is_data_section(name) or sec["sh_flags"] & SHF_EXECINSTR:
                continue
            size = sec["sh_size"]
            if size == 0:
                continue
            readonly = name.startswith(".rodata")
            # As libbpf: mmap-able (userspace reads and writes the variables in place), and
            # .rodata read-only for programs and frozen once written.
            flags = MapFlag.MMAPABLE | (MapFlag.RDONLY_PROG if readonly else 0)
            maps[name] = MapSpec(
                name=name,
                type=MapType.ARRAY,
                key_size=4,
                value_size=size,
                max_entries=1,
                flags=int(flags),
                contents=self._data(name),
                freeze=readonly,
                kernel_name=global_data_map_name(self.object_name, name),
            )
        return maps

    def _btf_maps(self) -> dict[str, MapSpec]:
        btf = self.btf
        assert btf is not None
        datasec = btf.by_name(".maps", Kind.DATASEC)
        if datasec is None:
            raise BTFError(".maps section has no DATASEC in .BTF")
        maps = {}
        for var_id, _, _ in datasec.secinfo:
            var = btf.type(var_id)
            if var.kind != Kind.VAR:
                raise BTFError(f"DATASEC .maps: type {var_id} is {var.kind_name}, not VAR")
            maps[var.name] = self._btf_map(btf, var.name, var.type_id)
        return maps

    def _btf_map(self, btf: BTF, name: str, type_id: int) -> MapSpec:
        struct_t = btf.resolve(type_id)
        if struct_t.kind != Kind.STRUCT:
            raise BTFError(f"map {name}: definition is {struct_t.kind_name}, not a struct")
        fields: dict[str, int] = {}
        key_size = value_size = None
        key_type = value_type = 0
        for member in struct_t.members:
            ptr = btf.resolve(member.type_id)
            if member.name in ("key", "value"):
                if ptr.kind != Kind.PTR:
                    raise BTFError(f"map {name}: {member.name} must be __type(...)")
                size = btf.size_of(ptr.type_id)
                if member.name == "key":
                    key_size, key_type = size, ptr.type_id
                else:
                    value_size, value_type = size, ptr.type_id
                continue
            if member.name == "values":
                raise ELFFormatError(
                    f"map {name}: map-in-map and prog-array initialisers are not supported"
                )
            if ptr.kind != Kind.PTR:
                raise BTFError(f"map {name}: {member.name} must be __uint(...)")
            arr = btf.resolve(ptr.type_id)
            if arr.kind != Kind.ARRAY:
                raise BTFError(f"map {name}: {member.name} must be __uint(...)")
            fields[member.name] = arr.array[2]
        if "key_size" in fields:
            if key_size is not None and key_size != fields["key_size"]:
                raise BTFError(f"map {name}: key and key_size disagree")
            key_size = fields["key_size"]
        if "value_size" in fields:
            if value_size is not None and value_size != fields["value_size"]:
                raise BTFError(f"map {name}: value and value_size disagree")
            value_size = fields["value_size"]
        if "type" not in fields:
            raise BTFError(f"map {name}: no type")
        try:
            map_type = MapType(fields["type"])
        except ValueError as exc:
            raise ELFFormatError(f"map {name}: unknown map type {fields['type']}") from exc
        pinning = fields.get("pinning", 0)
        if pinning not in (0, 1):
            raise ELFFormatError(f"map {name}: unsupported pinning {pinning}")
        return MapSpec(
            name=name,
            type=map_type,
            key_size=key_size or 0,
            value_size=value_size or 0,
            max_entries=fields.get("max_entries", 0),
            flags=fields.get("map_flags", 0),
            pinning=PinType(pinning),
            numa_node=fields.get("numa_node", 0),
            map_extra=fields.get("map_extra", 0),
            key_type_id=key_type,
            value_type_id=value_type,
        )

    # -- code ------------------------------------------------------------------------------

    def _code_sections(self) -> tuple[dict[str, bytes], dict[str, list[Function]], Relocations]:
        """The bytes, functions and relocations of every executable section."""
        code: dict[str, bytes] = {}
        functions: dict[str, list[Function]] = {}
        for name, sec in self.sections.items():
            if not sec["sh_flags"] & SHF_EXECINSTR or sec["sh_type"] != "SHT_PROGBITS":
                continue
            data = self._data(name)
            if len(data) % 8:
                raise ELFFormatError(f"section {name}: size {len(data)} is not a multiple of 8")
            if not data:
                continue
            code[name] = data
            funcs = sorted(
                (s for s in self.symbols if s.section == name and s.kind == "STT_FUNC"),
                key=lambda s: s.value,
            )
            if not funcs:
                functions[name] = [Function(name, name, 0, len(data))]
                continue
            out = []
            for sym in funcs:
                end = sym.value + sym.size if sym.size else len(data)
                if sym.value % 8 or end % 8 or sym.value >= end or end > len(data):
                    raise ELFFormatError(f"function {sym.name} in {name}: bad bounds")
                out.append(Function(sym.name, name, sym.value, end))
            functions[name] = out
        relocations: dict[tuple[str, int], tuple[int, Symbol]] = {}
        for sec in self.elf.iter_sections():
            if sec["sh_type"] not in ("SHT_REL", "SHT_RELA"):
                continue
            target = self.by_index.get(sec["sh_info"])
            if target not in code:
                continue  # .rel.BTF, .rel.BTF.ext, .rel.debug_*: debug info only
            if sec["sh_type"] == "SHT_RELA":
                raise ELFFormatError(f"{sec.name}: RELA relocations are not used by BPF")
            rel_section: Any = sec
            for rel in rel_section.iter_relocations():
                index = rel["r_info_sym"]
                if not 0 <= index < len(self.symbols):
                    raise ELFFormatError(f"{sec.name}: symbol index {index} out of range")
                kind = rel["r_info_type"]
                if kind in (R_BPF_64_ABS64, R_BPF_64_ABS32, R_BPF_64_NODYLD32):
                    continue
                if kind not in (R_BPF_64_64, R_BPF_64_32):
                    raise ELFFormatError(f"{sec.name}: unsupported relocation type {kind}")
                offset = rel["r_offset"]
                if offset % 8 or offset + 8 > len(code[target]):
                    raise ELFFormatError(f"{sec.name}: relocation offset {offset} out of range")
                relocations[(target, offset)] = (kind, self.symbols[index])
        return code, functions, relocations

    def _programs(self, maps: Mapping[str, MapSpec]) -> dict[str, ProgramSpec]:
        code, functions, relocations = self._code_sections()
        linker = Linker(code, functions, relocations, self.btf_ext, maps)
        programs = {}
        for section, funcs in functions.items():
            if section == ".text":
                continue
            sec_def = program_type_for_section(section)
            for func in funcs:
                if func.name in programs:
                    raise ELFFormatError(f"duplicate program name {func.name}")
                programs[func.name] = self._program(func, sec_def, linker.link(func))
        return programs

    def _program(
        self, entry: Function, sec_def: SectionDef | None, linked: LinkedProgram
    ) -> ProgramSpec:
        attach = sec_def.attach_type if sec_def else None
        return ProgramSpec(
            name=entry.name,
            section=entry.section,
            type=sec_def.prog_type if sec_def else ProgType.UNSPEC,
            attach_type=attach,
            expected_attach_type=int(attach)
            if sec_def and sec_def.load_attach_type and attach is not None
            else 0,
            flags=sec_def.flags if sec_def else 0,
            license=self.license,
            instructions=linked.instructions,
            references=linked.references,
            subprograms=linked.subprograms,
            func_info=linked.func_info,
            line_info=linked.line_info,
            core_relos=linked.core_relos,
        )


def _is_data_section(name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in (".rodata", ".data", ".bss"))
