"""The loader against libbpf on the same object: what the kernel shows (``bpftool -j prog
show``, ``bpftool -j map show``) after our load and after ``bpftool prog loadall`` (libbpf)
must agree field by field.

``tests/data/bpf/parity.bpf.o`` exercises what the project's own objects do not: a sockmap
with a stream parser, a stream verdict and an sk_msg program, per-CPU, LRU per-CPU and LPM
maps, global data with a static and a global subprogram, a TC policer and an XDP program.
Equal program tags mean equal instructions after relocation (the kernel hashes them with map
fds left out), so relocations, subprogram placement and global data offsets agree too.
"""

from __future__ import annotations

import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio_sni_loader as loader
from trio_sni_loader import Collection

from .conftest import DATA, bpftool  # type: ignore[import-not-found]

pytestmark = [
    pytest.mark.bpf,
    pytest.mark.skipif(shutil.which("bpftool") is None, reason="needs bpftool (libbpf's view)"),
]

OBJECT = DATA / "parity.bpf.o"
PROGRAM_FIELDS = ("type", "tag", "gpl_compatible")
MAP_FIELDS = ("type", "bytes_key", "bytes_value", "max_entries", "flags", "frozen")


@pytest.fixture
def libbpf_pins() -> Iterator[Path]:
    """A bpffs folder with the object's programs as libbpf loaded them; removed after."""
    folder = Path("/sys/fs/bpf") / f"parity-{uuid.uuid4().hex[:8]}"
    subprocess.run(
        ["bpftool", "prog", "loadall", str(OBJECT), str(folder)],
        check=True,
        capture_output=True,
        text=True,
    )
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _view(program_ids: dict[str, int]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Programs and the maps they use, by name, as the kernel shows them."""
    programs: dict[str, Any] = {}
    maps: dict[str, Any] = {}
    for name, prog_id in program_ids.items():
        shown = bpftool("prog", "show", "id", str(prog_id))
        assert isinstance(shown, dict)
        programs[name] = {field: shown.get(field) for field in PROGRAM_FIELDS}
        programs[name]["maps"] = set()
        programs[name]["btf"] = "btf_id" in shown
        for map_id in shown.get("map_ids", []):
            m = bpftool("map", "show", "id", str(map_id))
            assert isinstance(m, dict)
            maps[m["name"]] = {field: m.get(field, 0) for field in MAP_FIELDS}
            programs[name]["maps"].add(m["name"])
    return programs, maps


def test_every_program_and_map_is_as_libbpf_loads_it(libbpf_pins: Path) -> None:
    libbpf_ids = {}
    for pinned in sorted(libbpf_pins.iterdir()):
        shown = bpftool("prog", "show", "pinned", str(pinned))
        assert isinstance(shown, dict)
        libbpf_ids[pinned.name] = shown["id"]
    theirs = _view(libbpf_ids)
    spec = loader.load_collection_spec(OBJECT)
    with Collection.load(spec) as coll:
        ours = _view({name: prog.info().id for name, prog in coll.programs.items()})
    assert set(ours[0]) == set(theirs[0]) == {"parse", "verdict", "message", "police", "look"}
    for name in theirs[0]:
        assert ours[0][name] == theirs[0][name], name
    assert ours[1] == theirs[1]
    # The global data maps are among them, named and flagged as libbpf does.
    assert {"parity.data", "parity.bss", "parity.rodata"} <= set(ours[1])
