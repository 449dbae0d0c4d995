"""Where the prebuilt BPF objects are, and loading their specs.

A wheel ships ``prebuilt/`` as ``trio_sni/_prebuilt`` (pyproject's force-include); an editable
install or a checkout has no such package, so the repository's ``prebuilt/`` is used instead.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Iterable
from pathlib import Path

import trio_sni_loader as loader

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


def prebuilt_spec(name: str, maps: Iterable[str], programs: Iterable[str]) -> loader.CollectionSpec:
    """The spec of prebuilt object ``name``, checked to have the ``maps`` and ``programs`` its
    user needs (a stale or foreign object fails here, with what it lacks, not later).

    Raises:
        FileNotFoundError: the object is missing.
        loader.LoaderError: it does not parse, or lacks a map or a program.
    """
    spec = loader.load_collection_spec(object_bytes(name))
    missing = [m for m in maps if m not in spec.maps]
    missing += [p for p in programs if p not in spec.programs]
    if missing:
        raise loader.LoaderError(f"{name} lacks {', '.join(missing)}")
    return spec
