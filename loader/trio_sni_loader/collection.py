"""Load a whole :class:`~loader.spec.CollectionSpec`: BTF, maps, then programs.

``Collection.load(spec)`` closes everything it created if any step fails, so a failed load
leaves no fd behind. A loaded collection is a context manager; closing it closes every map and
program fd (maps still referenced by a loaded program, or pinned, live on in the kernel).
"""

from __future__ import annotations

import errno
import mmap
import os
from collections.abc import Mapping

from ._sys import bpf
from ._sys.fd import FD, ClosesOnExit
from .errors import BPFSyscallError, LoaderError, VerifierError
from .maps import Map, ensure_bpffs
from .programs import Program
from .spec import CollectionSpec, PinType
from .variables import Variable, VariableSpec, global_variables, open_variable

__all__ = ["Collection"]


class Collection(ClosesOnExit):
    """Loaded maps and programs, by name."""

    def __init__(
        self,
        maps: dict[str, Map],
        programs: dict[str, Program],
        btf: FD | None,
        btf_error: BaseException | None = None,
        variables: Mapping[str, VariableSpec] | None = None,
    ) -> None:
        self.maps = maps
        self.programs = programs
        self.btf = btf
        #: Why the object's BTF was not loaded (``None``: it was, or there was none).
        self.btf_error = btf_error
        #: The object's global variables by name (see :meth:`variable`).
        self.variables: Mapping[str, VariableSpec] = dict(variables or {})
        self._memories: dict[str, mmap.mmap] = {}

    def variable(self, name: str) -> Variable:
        """The global variable ``name`` (``.data``, ``.bss`` or ``.rodata``), read and written
        in place through its map's memory, as a libbpf skeleton does.

        Raises:
            LoaderError: no such variable (the object's BTF names them), or its map is not
                in this collection.
        """
        spec = self.variables.get(name)
        if spec is None:
            raise LoaderError(f"no global variable {name!r} (have: {sorted(self.variables)})")
        owner = self.maps.get(spec.section)
        if owner is None:
            raise LoaderError(f"variable {name!r}: its map {spec.section} was not created here")
        return open_variable(spec, owner, self._memories)

    @classmethod
    def load(
        cls,
        spec: CollectionSpec,
        *,
        pin_path: str | None = None,
        replacements: Mapping[str, Map] | None = None,
        programs: list[str] | None = None,
        log_level: int = 0,
    ) -> Collection:
        """Create the maps and load the programs of ``spec``.

        Args:
            pin_path: a directory on bpffs for maps declared with
                ``__uint(pinning, LIBBPF_PIN_BY_NAME)``. A map already pinned there is reused
                if it matches its spec (else :class:`~loader.errors.MapIncompatibleError`
                lists every difference); otherwise it is created and pinned.
            replacements: maps to use instead of creating the named ones (not closed by the
                collection).
            programs: load only these programs (default: all).
            log_level: verifier log level for every program (0: only on failure).

        Raises:
            LoaderError: any failure; nothing created so far is left open.
        """
        replacements = dict(replacements or {})
        maps: dict[str, Map] = {}
        loaded: dict[str, Program] = {}
        btf: FD | None = None
        btf_error: BaseException | None = None
        try:
            if spec.btf is not None:
                try:
                    btf = bpf.btf_load(spec.btf)
                except BPFSyscallError as exc:
                    if exc.errno == errno.EPERM:
                        raise
                    btf_error = exc  # load on without BTF, as libbpf does; callers can look
            for name, map_spec in spec.maps.items():
                if name in replacements:
                    continue
                try:
                    if map_spec.pinning == PinType.BY_NAME and pin_path is not None:
                        maps[name] = _pinned_map(map_spec, pin_path, btf)
                    else:
                        maps[name] = Map.create(map_spec, btf_fd=btf)
                except BPFSyscallError as exc:
                    # Same type and errno (callers test them); the message (which names the
                    # map) gets the object file.
                    if spec.source:
                        exc.strerror = f"{spec.source}: {exc.strerror}"
                    raise
            all_maps = {**maps, **replacements}
            for name, prog_spec in spec.programs.items():
                if programs is not None and name not in programs:
                    continue
                try:
                    loaded[name] = Program.load(
                        prog_spec,
                        maps=all_maps,
                        btf_fd=btf,
                        func_info_rec_size=spec.btf_func_info_rec_size,
                        line_info_rec_size=spec.btf_line_info_rec_size,
                        core_relo_rec_size=spec.btf_core_relo_rec_size,
                        log_level=log_level,
                    )
                except VerifierError as exc:
                    exc.object = spec.source  # which file: the program's name may be common
                    raise
                rodata = all_maps.get(".rodata")
                if rodata is not None:
                    _bind(loaded[name], rodata)
            if programs is not None:
                missing = set(programs) - set(loaded)
                if missing:
                    raise LoaderError(f"no such programs in the object: {sorted(missing)}")
        except BaseException:
            for prog in loaded.values():
                prog.close()
            for m in maps.values():
                m.close()
            if btf is not None:
                btf.close()
            raise
        return cls(maps, loaded, btf, btf_error, global_variables(spec))

    def close(self) -> None:
        """Close every program, map and the BTF fd (idempotent)."""
        for memory in self._memories.values():
            memory.close()
        self._memories.clear()
        for prog in self.programs.values():
            prog.close()
        for m in self.maps.values():
            m.close()
        if self.btf is not None:
            self.btf.close()

    def __repr__(self) -> str:
        return f"<Collection maps={sorted(self.maps)} programs={sorted(self.programs)}>"


def _bind(program: Program, rodata: Map) -> None:
    """Bind the object's ``.rodata`` to ``program``, as libbpf does for every program: the
    constants (and ``bpf_metadata_*`` variables) stay with the program and tools see them
    among its maps. A kernel without ``BPF_PROG_BIND_MAP`` (before 5.10) skips it, as libbpf
    does."""
    try:
        bpf.prog_bind_map(program.fd, rodata.fd)
    except BPFSyscallError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise


def _pinned_map(spec, pin_path: str, btf: FD | None) -> Map:  # type: ignore[no-untyped-def]
    path = os.path.join(pin_path, spec.name)
    ensure_bpffs(pin_path)
    try:
        return Map.open_pinned(path, spec)
    except BPFSyscallError as exc:
        if exc.errno != errno.ENOENT:
            raise
    m = Map.create(spec, btf_fd=btf)
    try:
        m.pin(path)
    except BaseException:
        m.close()
        raise
    return m
