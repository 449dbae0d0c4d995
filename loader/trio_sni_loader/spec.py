"""Pure-data descriptions of what an object file contains (cilium's ``*Spec`` types).

Specs are attrs frozen classes: comparable with ``==``, printable, and built without a single
syscall. :func:`loader.elf.load_collection_spec` makes them; :mod:`loader.collection` turns
them into kernel objects. Change a spec with :meth:`MapSpec.copy` (``attrs.evolve``), e.g. to
resize a map before loading.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any

import attrs

from ._sys.consts import AttachType, MapFlag, MapType, ProgType

__all__ = ["CollectionSpec", "MapSpec", "PinType", "ProgramSpec", "Reference"]


class PinType(enum.IntEnum):
    """libbpf's ``__uint(pinning, ...)`` values."""

    NONE = 0
    BY_NAME = 1


@attrs.frozen
class MapSpec:
    """A map as declared in the object (or by hand).

    ``contents`` holds the initial value of key 0 for global-data maps (``.rodata``, ``.data``,
    ``.bss``). ``freeze`` maps are frozen (read-only from userspace too) after writing it.
    ``key_type_id``/``value_type_id`` are BTF ids in the object's BTF (0: none).
    """

    name: str
    type: MapType = attrs.field(converter=MapType)
    key_size: int
    value_size: int
    max_entries: int
    flags: int = 0
    pinning: PinType = attrs.field(default=PinType.NONE, converter=PinType)
    numa_node: int = 0
    map_extra: int = 0
    key_type_id: int = attrs.field(default=0, eq=False)
    value_type_id: int = attrs.field(default=0, eq=False)
    contents: bytes | None = attrs.field(default=None, repr=False)
    freeze: bool = False
    #: The name the kernel gets (``bpftool map`` shows it), when it is not ``name``: global
    #: data maps are ``<object>.bss`` and the like, as libbpf names them.
    kernel_name: str = attrs.field(default="", eq=False)

    def copy(self, **changes: Any) -> MapSpec:
        return attrs.evolve(self, **changes)

    @property
    def is_global_data(self) -> bool:
        return self.contents is not None

    def differences(
        self, *, type: int, key_size: int, value_size: int, max_entries: int, flags: int
    ) -> list[str]:
        """Every way an existing map (e.g. a pinned one) differs from this spec.

        Each entry reads ``"value_size: 16 changed to 24"`` (spec value first). The
        ``BPF_F_RDONLY_PROG``-style access flags are compared too; ``BPF_F_MMAPABLE`` is not,
        as it does not change what the map holds.
        """
        diffs = []
        want = {
            "type": int(self.type),
            "key_size": self.key_size,
            "value_size": self.value_size,
            "max_entries": self.max_entries,
            "flags": self.flags & ~MapFlag.MMAPABLE,
        }
        have = {
            "type": type,
            "key_size": key_size,
            "value_size": value_size,
            "max_entries": max_entries,
            "flags": flags & ~MapFlag.MMAPABLE,
        }
        for field, value in want.items():
            if have[field] != value:
                if field == "type":
                    diffs.append(
                        f"type: {_map_type_name(value)} changed to {_map_type_name(have[field])}"
                    )
                elif field == "flags":
                    diffs.append(f"flags: {value:#x} changed to {have[field]:#x}")
                else:
                    diffs.append(f"{field}: {value} changed to {have[field]}")
        return diffs


def _map_type_name(value: int) -> str:
    try:
        return MapType(value).name
    except ValueError:
        return str(value)


@attrs.frozen
class Reference:
    """An ``ld_imm64`` that must point at a map: ``kind`` is ``"map"`` (the map itself) or
    ``"value"`` (an address ``offset`` bytes into the value of key 0, for global data)."""

    insn: int
    kind: str
    map: str
    offset: int = 0


@attrs.frozen
class ProgramSpec:
    """A program after linking its ``.text`` subprograms in.

    ``attach_type`` is the hook the section name implies (``None``: the caller chooses, e.g.
    ``SEC("tc")`` or ``SEC("sk_skb")``). ``expected_attach_type`` is what libbpf would pass at
    load time. ``func_info``/``line_info`` are ``(instruction index, ...)`` records from
    ``.BTF.ext``, already relative to the linked instructions. ``core_relos`` are CO-RE
    relocations ``(byte offset in the linked instructions, type id, access string offset,
    kind)``; the kernel applies them against its own BTF at load time
    (docs/kernel-facts.md, fact 30).
    """

    name: str
    section: str
    type: ProgType = attrs.field(converter=ProgType)
    attach_type: AttachType | None
    expected_attach_type: int = 0
    flags: int = 0
    license: str = ""
    instructions: bytes = attrs.field(default=b"", repr=False)
    references: tuple[Reference, ...] = attrs.field(default=(), repr=False)
    subprograms: tuple[str, ...] = ()
    func_info: tuple[tuple[int, int], ...] = attrs.field(default=(), repr=False, eq=False)
    line_info: tuple[tuple[int, int, int, int], ...] = attrs.field(default=(), repr=False, eq=False)
    core_relos: tuple[tuple[int, int, int, int], ...] = attrs.field(
        default=(), repr=False, eq=False
    )

    @property
    def insn_count(self) -> int:
        return len(self.instructions) // 8

    def copy(self, **changes: Any) -> ProgramSpec:
        return attrs.evolve(self, **changes)


@attrs.frozen
class CollectionSpec:
    """Everything an object file declares: maps (BTF-defined and global data) and programs.

    ``btf`` is the object's ``.BTF`` after the DATASEC fix-ups, ready for ``BPF_BTF_LOAD``
    (``None`` if the object has no BTF). It does not take part in ``==``.
    """

    maps: Mapping[str, MapSpec]
    programs: Mapping[str, ProgramSpec]
    license: str = ""
    btf: bytes | None = attrs.field(default=None, repr=False, eq=False)
    #: The object file's path, for error messages (empty when it was read from bytes).
    source: str = attrs.field(default="", eq=False)
    btf_func_info_rec_size: int = attrs.field(default=8, repr=False, eq=False)
    btf_line_info_rec_size: int = attrs.field(default=16, repr=False, eq=False)
    btf_core_relo_rec_size: int = attrs.field(default=16, repr=False, eq=False)

    def copy(self, **changes: Any) -> CollectionSpec:
        return attrs.evolve(self, **changes)
