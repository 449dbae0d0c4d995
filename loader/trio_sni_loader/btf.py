"""A reader for ``.BTF`` and ``.BTF.ext`` (pyelftools has no BTF support).

Theory of operation
-------------------
BTF is a header, a type section and a string section. Types are numbered from 1 in the order
they appear (0 is ``void``). Each type is a 12-byte ``btf_type`` (``name_off``, ``info`` =
``kind << 24 | kind_flag << 31 | vlen``, and ``size`` or ``type``) followed by kind-specific
data. The loader needs BTF for three things:

* map definitions in ``.maps`` (docs/kernel-facts.md, fact 25): ``__uint(x, N)`` is a
  member whose type is PTR -> ARRAY with ``nelems = N``; ``__type(key, T)`` is PTR -> T;
* uploading it to the kernel (``BPF_BTF_LOAD``) after the DATASEC fix-ups the kernel requires
  (clang leaves DATASEC sizes and variable offsets zero; docs/kernel-facts.md, fact 26). We
  patch the raw bytes in place, so everything else is passed through untouched;
* ``.BTF.ext`` func and line info, so the kernel annotates verifier logs with source lines.

Only little-endian objects (``-target bpfel``) are supported. Every malformation raises
:class:`~loader.errors.BTFError`; nothing else escapes :func:`parse_btf` or :func:`parse_btf_ext`.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping

import attrs

from .errors import BTFError

__all__ = ["BTF", "BTFExt", "BTFType", "CoreRelo", "Kind", "parse_btf", "parse_btf_ext"]

BTF_MAGIC = 0xEB9F


class Kind:
    UNKN = 0
    INT = 1
    PTR = 2
    ARRAY = 3
    STRUCT = 4
    UNION = 5
    ENUM = 6
    FWD = 7
    TYPEDEF = 8
    VOLATILE = 9
    CONST = 10
    RESTRICT = 11
    FUNC = 12
    FUNC_PROTO = 13
    VAR = 14
    DATASEC = 15
    FLOAT = 16
    DECL_TAG = 17
    TYPE_TAG = 18
    ENUM64 = 19


_KIND_NAMES = {v: k for k, v in vars(Kind).items() if k.isupper()}
#: Kinds whose third word is a size (the others carry a type id there).
_SIZED = {Kind.INT, Kind.STRUCT, Kind.UNION, Kind.ENUM, Kind.DATASEC, Kind.FLOAT, Kind.ENUM64}
#: Modifiers skipped when resolving a type to its underlying definition.
_QUALIFIERS = {Kind.TYPEDEF, Kind.VOLATILE, Kind.CONST, Kind.RESTRICT, Kind.TYPE_TAG}


@attrs.frozen
class Member:
    name: str
    type_id: int
    offset: int  # bits (or bitfield-encoded when the struct's kind_flag is set)


@attrs.frozen
class BTFType:
    """One BTF type. Fields beyond ``kind``/``name`` are filled only for kinds that have them."""

    id: int
    kind: int
    name: str
    vlen: int
    kind_flag: bool
    size: int = 0  # INT, STRUCT, UNION, ENUM, DATASEC, FLOAT, ENUM64
    type_id: int = 0  # PTR, TYPEDEF, qualifiers, FUNC, FUNC_PROTO (return), VAR, tags
    members: tuple[Member, ...] = ()  # STRUCT, UNION, FUNC_PROTO params (offset 0)
    array: tuple[int, int, int] = (0, 0, 0)  # ARRAY: (elem type, index type, nelems)
    linkage: int = 0  # VAR, FUNC (vlen)
    secinfo: tuple[tuple[int, int, int], ...] = ()  # DATASEC: (var type, offset, size)
    raw_offset: int = 0  # where the btf_type starts inside the type section

    @property
    def kind_name(self) -> str:
        return _KIND_NAMES.get(self.kind, f"kind{self.kind}")


@attrs.frozen
class BTF:
    """Parsed ``.BTF``: ``types[i]`` is type id ``i`` (``types[0]`` is void)."""

    raw: bytes = attrs.field(repr=False)
    hdr_len: int
    type_off: int
    type_len: int
    str_off: int
    str_len: int
    types: tuple[BTFType, ...] = attrs.field(repr=False)

    def string(self, off: int) -> str:
        return _string(self.raw, self.hdr_len + self.str_off, self.str_len, off)

    def type(self, type_id: int) -> BTFType:
        if not 0 <= type_id < len(self.types):
            raise BTFError(f"BTF type id {type_id} out of range (have {len(self.types)})")
        return self.types[type_id]

    def resolve(self, type_id: int) -> BTFType:
        """Follow typedefs and qualifiers to the defining type."""
        t = self.type(type_id)
        for _ in range(32):
            if t.kind not in _QUALIFIERS:
                return t
            t = self.type(t.type_id)
        raise BTFError(f"BTF type {type_id}: qualifier chain too long (a loop?)")

    def size_of(self, type_id: int) -> int:
        """Byte size of a type, as the kernel computes it."""
        t = self.resolve(type_id)
        depth = 0
        nelems = 1
        while t.kind == Kind.ARRAY:
            depth += 1
            if depth > 32:
                raise BTFError(f"BTF type {type_id}: array nesting too deep")
            nelems *= t.array[2]
            t = self.resolve(t.array[0])
        if t.kind in _SIZED:
            return nelems * t.size
        if t.kind == Kind.PTR:
            return nelems * 8
        raise BTFError(f"BTF type {type_id} ({t.kind_name}) has no size")

    def by_name(self, name: str, kind: int | None = None) -> BTFType | None:
        for t in self.types[1:]:
            if t.name == name and (kind is None or t.kind == kind):
                return t
        return None

    def datasecs(self) -> list[BTFType]:
        return [t for t in self.types if t.kind == Kind.DATASEC]

    def fixed_up(
        self, section_sizes: Mapping[str, int], symbol_offsets: Mapping[str, Mapping[str, int]]
    ) -> bytes:
        """Return the raw BTF with every DATASEC's size and variable offsets filled in.

        Args:
            section_sizes: ELF section name -> size.
            symbol_offsets: ELF section name -> {symbol name -> offset in that section}.

        Raises:
            BTFError: a DATASEC names a variable that has no symbol in its section.
        """
        out = bytearray(self.raw)
        base = self.hdr_len + self.type_off
        for sec in self.datasecs():
            if sec.name not in section_sizes:
                continue  # e.g. .kconfig/.ksyms externs: left as they are
            struct.pack_into("<I", out, base + sec.raw_offset + 8, section_sizes[sec.name])
            offsets = symbol_offsets.get(sec.name, {})
            for i, (var_id, _off, _size) in enumerate(sec.secinfo):
                var = self.type(var_id)
                if var.name not in offsets:
                    raise BTFError(f"DATASEC {sec.name}: variable {var.name!r} has no ELF symbol")
                entry = base + sec.raw_offset + 12 + 12 * i
                struct.pack_into("<I", out, entry + 4, offsets[var.name])
        return bytes(out)


def _string(raw: bytes, start: int, length: int, off: int) -> str:
    if not 0 <= off < length:
        raise BTFError(f"string offset {off} outside the string section ({length} bytes)")
    end = raw.find(b"\0", start + off, start + length)
    if end < 0:
        raise BTFError(f"string at {off} is not NUL-terminated")
    try:
        return raw[start + off : end].decode()
    except UnicodeDecodeError as exc:
        raise BTFError(f"string at {off} is not UTF-8") from exc


def _header(data: bytes, what: str) -> tuple[int, int]:
    if len(data) < 8:
        raise BTFError(f"{what}: {len(data)} bytes is shorter than the header")
    magic, version, _flags, hdr_len = struct.unpack_from("<HBBI", data)
    if magic == 0x9FEB:
        raise BTFError(f"{what}: big-endian BTF is not supported (build with -target bpfel)")
    if magic != BTF_MAGIC:
        raise BTFError(f"{what}: bad magic {magic:#06x}")
    if version != 1:
        raise BTFError(f"{what}: unsupported version {version}")
    if hdr_len < 8 or hdr_len > len(data):
        raise BTFError(f"{what}: header length {hdr_len} out of range")
    return version, hdr_len


def parse_btf(data: bytes) -> BTF:
    """Parse a ``.BTF`` section.

    Raises:
        BTFError: the section is malformed.
    """
    try:
        return _parse_btf(bytes(data))
    except BTFError:
        raise
    except (struct.error, IndexError, ValueError, OverflowError) as exc:
        raise BTFError(f".BTF: malformed ({exc})") from exc


def _parse_btf(data: bytes) -> BTF:
    _, hdr_len = _header(data, ".BTF")
    if hdr_len < 24:
        raise BTFError(f".BTF: header length {hdr_len} too short")
    type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", data, 8)
    body = len(data) - hdr_len
    if type_off + type_len > body or str_off + str_len > body:
        raise BTFError(".BTF: type or string section runs past the end")
    if str_len == 0 or data[hdr_len + str_off] != 0:
        raise BTFError(".BTF: string section must start with an empty string")
    base = hdr_len + type_off
    end = base + type_len
    sbase = hdr_len + str_off

    def name(off: int) -> str:
        return _string(data, sbase, str_len, off)

    types: list[BTFType] = [BTFType(id=0, kind=Kind.UNKN, name="void", vlen=0, kind_flag=False)]
    pos = base
    while pos < end:
        if pos + 12 > end:
            raise BTFError(".BTF: truncated type")
        name_off, info, size_type = struct.unpack_from("<III", data, pos)
        kind = (info >> 24) & 0x1F
        vlen = info & 0xFFFF
        kflag = bool(info >> 31)
        tid = len(types)
        common = {
            "id": tid,
            "kind": kind,
            "name": name(name_off),
            "vlen": vlen,
            "kind_flag": kflag,
            "raw_offset": pos - base,
        }
        p = pos + 12
        if kind in _SIZED:
            common["size"] = size_type
        else:
            common["type_id"] = size_type
        if kind == Kind.INT:
            p += 4
            t = BTFType(**common)
        elif kind in (
            Kind.PTR,
            Kind.FWD,
            Kind.TYPEDEF,
            Kind.VOLATILE,
            Kind.CONST,
            Kind.RESTRICT,
            Kind.FLOAT,
            Kind.TYPE_TAG,
        ):
            t = BTFType(**common)
        elif kind == Kind.FUNC:
            t = BTFType(**common, linkage=vlen)
        elif kind == Kind.ARRAY:
            arr = struct.unpack_from("<III", data, p)
            p += 12
            t = BTFType(**common, array=arr)
        elif kind in (Kind.STRUCT, Kind.UNION):
            members = []
            for _ in range(vlen):
                m_name, m_type, m_off = struct.unpack_from("<III", data, p)
                p += 12
                members.append(Member(name(m_name), m_type, m_off))
            t = BTFType(**common, members=tuple(members))
        elif kind == Kind.ENUM:
            p += 8 * vlen
            t = BTFType(**common)
        elif kind == Kind.ENUM64:
            p += 12 * vlen
            t = BTFType(**common)
        elif kind == Kind.FUNC_PROTO:
            params = []
            for _ in range(vlen):
                p_name, p_type = struct.unpack_from("<II", data, p)
                p += 8
                params.append(Member(name(p_name), p_type, 0))
            t = BTFType(**common, members=tuple(params))
        elif kind == Kind.VAR:
            (linkage,) = struct.unpack_from("<I", data, p)
            p += 4
            t = BTFType(**common, linkage=linkage)
        elif kind == Kind.DATASEC:
            info_list = []
            for _ in range(vlen):
                info_list.append(struct.unpack_from("<III", data, p))
                p += 12
            t = BTFType(**common, secinfo=tuple(info_list))
        elif kind == Kind.DECL_TAG:
            p += 4
            t = BTFType(**common)
        else:
            raise BTFError(f".BTF: type {tid} has unknown kind {kind}")
        if p > end:
            raise BTFError(f".BTF: type {tid} ({t.kind_name}) runs past the type section")
        types.append(t)
        pos = p
    return BTF(
        raw=data,
        hdr_len=hdr_len,
        type_off=type_off,
        type_len=type_len,
        str_off=str_off,
        str_len=str_len,
        types=tuple(types),
    )


@attrs.frozen
class FuncInfo:
    insn_off: int  # bytes from the start of the section (instructions after linking)
    type_id: int


@attrs.frozen
class LineInfo:
    insn_off: int
    file_name_off: int
    line_off: int
    line_col: int

    @property
    def line(self) -> int:
        return self.line_col >> 10


@attrs.frozen
class CoreRelo:
    """A CO-RE relocation (``struct bpf_core_relo``): the kernel applies it at load time."""

    insn_off: int
    type_id: int
    access_str_off: int
    kind: int


@attrs.frozen
class BTFExt:
    """Parsed ``.BTF.ext``: func and line info and CO-RE relocations per ELF section name."""

    func_info_rec_size: int
    line_info_rec_size: int
    func_info: Mapping[str, tuple[FuncInfo, ...]]
    line_info: Mapping[str, tuple[LineInfo, ...]]
    core_relo_rec_size: int = 16
    core_relos: Mapping[str, tuple[CoreRelo, ...]] = attrs.field(factory=dict)


def parse_btf_ext(data: bytes, btf: BTF) -> BTFExt:
    """Parse ``.BTF.ext``; section names are looked up in ``btf``'s strings.

    Raises:
        BTFError: the section is malformed.
    """
    try:
        return _parse_btf_ext(bytes(data), btf)
    except BTFError:
        raise
    except (struct.error, IndexError, ValueError, OverflowError) as exc:
        raise BTFError(f".BTF.ext: malformed ({exc})") from exc


def _parse_btf_ext(data: bytes, btf: BTF) -> BTFExt:
    _, hdr_len = _header(data, ".BTF.ext")
    if hdr_len < 24:
        raise BTFError(f".BTF.ext: header length {hdr_len} too short")
    func_off, func_len, line_off, line_len = struct.unpack_from("<IIII", data, 8)

    def records(
        off: int, length: int, min_rec: int, what: str
    ) -> tuple[int, dict[str, list[bytes]]]:
        if length == 0:
            return min_rec, {}
        start = hdr_len + off
        end = start + length
        if end > len(data) or length < 4:
            raise BTFError(f".BTF.ext: {what} runs past the end")
        (rec_size,) = struct.unpack_from("<I", data, start)
        if rec_size < min_rec or rec_size % 4:
            raise BTFError(f".BTF.ext: {what} record size {rec_size} is invalid")
        p = start + 4
        out: dict[str, list[bytes]] = {}
        while p < end:
            sec_name_off, num = struct.unpack_from("<II", data, p)
            p += 8
            if num == 0 or p + num * rec_size > end:
                raise BTFError(f".BTF.ext: {what} block runs past the end")
            sec = btf.string(sec_name_off)
            out.setdefault(sec, []).extend(
                data[p + i * rec_size : p + (i + 1) * rec_size] for i in range(num)
            )
            p += num * rec_size
        return rec_size, out

    f_size, f_raw = records(func_off, func_len, 8, "func_info")
    l_size, l_raw = records(line_off, line_len, 16, "line_info")
    c_size, c_raw = 16, dict[str, list[bytes]]()
    if hdr_len >= 32:  # the header has core_relo_off/len
        core_off, core_len = struct.unpack_from("<II", data, 24)
        c_size, c_raw = records(core_off, core_len, 16, "core_relo")
    funcs = {
        sec: tuple(FuncInfo(*struct.unpack_from("<II", r)) for r in recs)
        for sec, recs in f_raw.items()
    }
    lines = {
        sec: tuple(LineInfo(*struct.unpack_from("<IIII", r)) for r in recs)
        for sec, recs in l_raw.items()
    }
    relos = {
        sec: tuple(CoreRelo(*struct.unpack_from("<IIII", r)) for r in recs)
        for sec, recs in c_raw.items()
    }
    return BTFExt(
        func_info_rec_size=f_size,
        line_info_rec_size=l_size,
        func_info=funcs,
        line_info=lines,
        core_relo_rec_size=c_size,
        core_relos=relos,
    )
