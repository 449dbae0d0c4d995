"""Where the prebuilt BPF objects are, and loading their specs.

A wheel ships ``prebuilt/`` as ``trio_sni/_prebuilt`` (pyproject's force-include); an editable
install or a checkout has no such package, so the repository's ``prebuilt/`` is used instead.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

import loader

from .layout import SOCKHASH_MAPS, SOCKHASH_PROGRAM

_REPO_PREBUILT = Path(__file__).resolve().parents[2] / "prebuilt"


def object_bytes(name: str) -> bytes:
    """The bytes of prebuilt object ``name`` (e.g. ``"sockhash.bpf.o"``).

    Raises:
        FileNotFoundError: neither the installed package nor the checkout has it.
    """
    try:
        resource = importlib.resources.files("trio_sni") / "_prebuilt" / name
        return resource.read_bytes()
    except (FileNotFoundError, ModuleNotFoundError, NotADirectoryError):
        pass
    path = _REPO_PREBUILT / name
    if not path.is_file():
        raise FileNotFoundError(
            f"prebuilt BPF object {name} not found (neither trio_sni/_prebuilt nor {path})"
        )
    return path.read_bytes()


def sockhash_spec() -> loader.CollectionSpec:
    """The spec of ``sockhash.bpf.o``, checked to have the maps and program we use.

    Raises:
        FileNotFoundError: the object is missing.
        loader.LoaderError: it does not parse, or lacks a map or the program.
    """
    spec = loader.load_collection_spec(object_bytes("sockhash.bpf.o"))
    missing = [m for m in SOCKHASH_MAPS if m not in spec.maps]
    if SOCKHASH_PROGRAM not in spec.programs:
        missing.append(SOCKHASH_PROGRAM)
    if missing:
        raise loader.LoaderError(f"sockhash.bpf.o lacks {', '.join(missing)}")
    return spec


def tc_shaper_spec() -> loader.CollectionSpec:
    """The spec of ``tc_shaper.bpf.o``, checked to have the maps and program the shaper uses.

    Raises:
        FileNotFoundError: the object is missing.
        loader.LoaderError: it does not parse, or lacks a map or the program.
    """
    from .tc import TC_MAPS, TC_PROGRAM

    spec = loader.load_collection_spec(object_bytes("tc_shaper.bpf.o"))
    missing = [m for m in TC_MAPS if m not in spec.maps]
    if TC_PROGRAM not in spec.programs:
        missing.append(TC_PROGRAM)
    if missing:
        raise loader.LoaderError(f"tc_shaper.bpf.o lacks {', '.join(missing)}")
    return spec
