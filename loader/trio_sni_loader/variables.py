"""Global variables (``.data``, ``.bss``, ``.rodata``) by name, as libbpf skeletons give them:
where each lives (its section's map, offset and size, from the object's BTF ``DATASEC``), and,
once loaded, its bytes read and written in place through the map's memory (``Map.mmap``)."""

from __future__ import annotations

import mmap

import attrs

from .btf import BTFType, Kind, parse_btf
from .errors import LoaderError
from .maps import Map
from .spec import CollectionSpec

__all__ = ["Variable", "VariableSpec", "global_variables"]


@attrs.frozen
class VariableSpec:
    """One global variable: its section (the map's name), offset, size and BTF type (the
    variable's declared type; follow it with the object's BTF for fields)."""

    name: str
    section: str
    offset: int
    size: int
    type: BTFType


def global_variables(spec: CollectionSpec) -> dict[str, VariableSpec]:
    """Every variable the object's BTF places in one of its global data maps (empty without
    BTF: there is no name to find a variable by)."""
    if spec.btf is None:
        return {}
    btf = parse_btf(spec.btf)
    found: dict[str, VariableSpec] = {}
    for datasec in btf.datasecs():
        if datasec.name not in spec.maps or not spec.maps[datasec.name].is_global_data:
            continue
        for var_id, offset, size in datasec.secinfo:
            var = btf.type(var_id)
            if var.kind == Kind.VAR:
                found[var.name] = VariableSpec(
                    var.name, datasec.name, offset, size, btf.type(var.type_id)
                )
    return found


class Variable:
    """A global variable of a loaded collection: ``read()`` its bytes, ``write()`` new ones
    (a ``.rodata`` variable is frozen: read-only). The program sees a write at once."""

    def __init__(self, spec: VariableSpec, memory: mmap.mmap, writable: bool) -> None:
        self.spec = spec
        self._memory = memory
        self._writable = writable

    def read(self) -> bytes:
        return self._memory[self.spec.offset : self.spec.offset + self.spec.size]

    def write(self, data: bytes) -> None:
        if not self._writable:
            raise LoaderError(f"{self.spec.name} is in {self.spec.section}: read-only (frozen)")
        if len(data) != self.spec.size:
            raise LoaderError(f"{self.spec.name} is {self.spec.size} bytes, not {len(data)}")
        self._memory[self.spec.offset : self.spec.offset + self.spec.size] = data


def open_variable(spec: VariableSpec, owner: Map, memories: dict[str, mmap.mmap]) -> Variable:
    """``spec``'s variable in ``owner`` (its section's map), mapping the map's memory once
    (kept in ``memories``, which the collection closes)."""
    memory = memories.get(spec.section)
    if memory is None:
        memory = memories[spec.section] = owner.mmap()
    return Variable(spec, memory, writable=not owner.spec.freeze)
