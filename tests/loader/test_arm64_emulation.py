"""The loader under an emulated arm64 Python (qemu-user): what can be checked without arm64.

qemu-user does not implement ``bpf()``: the call returns ENOSYS before any kernel sees it
(docs/arm64.md), so no object can be loaded under emulation. What runs is everything up to the
syscall, on a real aarch64 CPython with the aarch64 cffi backend:

- ``platform.machine()`` is ``aarch64`` and the loader picks syscall 280 (the arm64 number);
- every struct the loader declares for cffi has the same size, alignment and field offsets as
  on the host (whose offsets ``test_sys.py`` checks against the UAPI header), and so have the
  attr sizes the wrappers pass (``_*_SIZE``);
- the prebuilt objects parse into the same specs as on the host;
- ``bpf.map_create`` reaches qemu as ``bpf(0, attr, 64)``: number, command, pointer and size
  in the registers the kernel reads (qemu's ``-d strace`` log), which is the claim in
  ``loader/trio_sni_loader/_sys/_ffi.py`` that the fixed ``syscall`` prototype passes the
  same registers as the variadic one on aarch64; and it fails with the typed ENOSYS error.

Needs ``qemu-aarch64-static`` and the sysroot that ``.ci/arm64-sysroot`` builds (at
``$TRIO_SNI_ARM64_ROOT``, default ``/opt/arm64-root``); skips without them, fails instead
with ``TRIO_SNI_REQUIRE_ARM64=1``. About 3 s, most of it the emulated interpreter.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from trio_sni_loader._sys.consts import SYS_BPF

REPO = Path(__file__).resolve().parents[2]
#: Where ``trio_sni_loader`` lives in the checkout.
LOADER_ROOT = REPO / "loader"
ROOT = Path(os.environ.get("TRIO_SNI_ARM64_ROOT", "/opt/arm64-root"))
PYTHON = ROOT / "usr" / "bin" / "python3.11"
SITE = ROOT / "site-packages"
#: Generous: the emulated run takes about 2 s on the 2-core machines the tests run on.
TIMEOUT = 120

#: Run by both interpreters; prints one JSON object. With ``--call`` it also makes one real
#: ``bpf()`` call (only ever under emulation: on the host it would create a map).
PROBE = r"""
import hashlib, json, platform, sys

import attrs
import cffi

import trio_sni_loader as loader
from trio_sni_loader._sys import bpf
from trio_sni_loader._sys._ffi import ffi
from trio_sni_loader._sys.consts import MapType


def layouts():
    out = {}
    for name in sorted(ffi.list_types()[1]):
        ctype = ffi.typeof(f"struct {name}")
        fields = [
            [field, info.offset, ffi.sizeof(info.type), info.type.cname]
            for field, info in ctype.fields
        ]
        out[name] = [ffi.sizeof(ctype), ffi.alignof(ctype), fields]
    return out


def serialize(inst, field, value):
    if isinstance(value, bytes):
        return hashlib.sha256(value).hexdigest()
    return value


def spec(path):
    return attrs.asdict(loader.load_collection_spec(path), value_serializer=serialize)


out = {
    "machine": platform.machine(),
    "python": platform.python_version(),
    "cffi": cffi.__version__,
    "sys_bpf": bpf._SYS_BPF,
    "layouts": layouts(),
    "sizes": {k: v for k, v in sorted(vars(bpf).items()) if k.endswith("_SIZE")},
    "specs": {path: spec(path) for path in sys.argv[1:] if path != "--call"},
}
if "--call" in sys.argv:
    out["map_create_size"] = ffi.offsetof("struct map_create_attr", "map_extra")
    try:
        bpf.map_create(MapType.ARRAY, 4, 8, 1).close()
    except loader.BPFSyscallError as e:
        out["map_create"] = [e.errno, str(e)]
    else:
        out["map_create"] = [0, "created"]
print(json.dumps(out))
"""

PREBUILT = sorted(str(p) for p in (REPO / "prebuilt").glob("*.bpf.o"))
STRACE_BPF = re.compile(r"\bbpf\((\d+),(\d+),(\d+),")


def _missing() -> str | None:
    if sys.platform != "linux":
        return "qemu-user runs Linux binaries on Linux only"
    if shutil.which("qemu-aarch64-static") is None:
        return "qemu-aarch64-static is not installed (Debian's qemu-user-static)"
    if not PYTHON.exists() or not list(SITE.glob("_cffi_backend.*aarch64*.so")):
        return f"no arm64 sysroot at {ROOT} (build it with .ci/arm64-sysroot)"
    return None


def _probe(cmd: list[str], env: dict[str, str], *extra: str) -> dict[str, Any]:
    run = subprocess.run(
        [*cmd, "-c", PROBE, *PREBUILT, *extra],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert run.returncode == 0, f"{cmd[0]} failed:\n{run.stdout}\n{run.stderr}"
    result: dict[str, Any] = json.loads(run.stdout)
    return result


@pytest.fixture(scope="module")
def host() -> dict[str, Any]:
    return _probe([sys.executable, "-B"], {**os.environ, "PYTHONPATH": str(LOADER_ROOT)})


@pytest.fixture(scope="module")
def emulated(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    """The probe's output under qemu-aarch64-static, and qemu's strace/unimp log."""
    missing = _missing()
    if missing is not None:
        if os.environ.get("TRIO_SNI_REQUIRE_ARM64") == "1":
            pytest.fail(f"TRIO_SNI_REQUIRE_ARM64=1 but {missing}")
        pytest.skip(missing)
    log = tmp_path_factory.mktemp("qemu") / "qemu.log"
    # Nothing from the host's Python setup leaks in: only the sysroot's wheels and the checkout.
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONPATH": f"{SITE}:{LOADER_ROOT}"}
    qemu = ["qemu-aarch64-static", "-d", "strace,unimp", "-D", str(log), "-L", str(ROOT)]
    result = _probe([*qemu, str(PYTHON), "-B"], env, "--call")
    return result, log.read_text(errors="replace")


def test_the_emulated_python_is_arm64_and_the_loader_picks_syscall_280(
    emulated: tuple[dict[str, Any], str],
) -> None:
    result, _ = emulated
    assert result["machine"] == "aarch64"
    assert result["sys_bpf"] == SYS_BPF["aarch64"] == 280


def test_struct_layouts_and_attr_sizes_are_the_hosts(
    emulated: tuple[dict[str, Any], str], host: dict[str, Any]
) -> None:
    result, _ = emulated
    assert result["layouts"], "the probe found no structs"
    assert result["layouts"] == host["layouts"]
    assert result["sizes"] == host["sizes"]


def test_prebuilt_objects_parse_the_same(
    emulated: tuple[dict[str, Any], str], host: dict[str, Any]
) -> None:
    result, _ = emulated
    assert PREBUILT, "no objects in prebuilt/"
    assert sorted(result["specs"]) == PREBUILT
    assert result["specs"] == host["specs"]


def test_bpf_reaches_qemu_with_the_kernels_arguments_and_fails_enosys(
    emulated: tuple[dict[str, Any], str],
) -> None:
    """docs/arm64.md: qemu-user has no ``bpf()``; a qemu that gained one would fail here."""
    result, log = emulated
    err, message = result["map_create"]
    assert err != 0, "qemu-user now passes bpf() through: load an object here (docs/arm64.md)"
    assert err == errno.ENOSYS, message
    assert "BPF_MAP_CREATE" in message
    assert "Unsupported syscall: 280" in log
    calls = [tuple(int(n) for n in m.groups()) for m in STRACE_BPF.finditer(log)]
    assert len(calls) == 1, calls
    [(cmd, address, size)] = calls
    assert cmd == 0  # BPF_MAP_CREATE
    assert address != 0
    assert size == result["map_create_size"] == 64
