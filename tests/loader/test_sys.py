"""The syscall layer: attr layouts, wrappers, fd ownership, error messages."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest
import trio_sni_loader as loader
from trio_sni_loader import asm
from trio_sni_loader._sys import bpf
from trio_sni_loader._sys._ffi import ffi
from trio_sni_loader._sys.buffer import Buffer
from trio_sni_loader._sys.consts import Cmd, MapType, ProgType
from trio_sni_loader._sys.fd import FD, live_fds

# Offsets from include/uapi/linux/bpf.h (Linux 6.18), counted by hand from the header.
UAPI_OFFSETS = [
    ("struct map_create_attr", "map_name", 28),
    ("struct map_create_attr", "map_ifindex", 44),
    ("struct map_create_attr", "btf_fd", 48),
    ("struct map_create_attr", "btf_value_type_id", 56),
    ("struct map_create_attr", "map_extra", 64),
    ("struct map_elem_attr", "key", 8),
    ("struct map_elem_attr", "value", 16),
    ("struct map_elem_attr", "flags", 24),
    ("struct map_batch_attr", "count", 32),
    ("struct map_batch_attr", "map_fd", 36),
    ("struct map_batch_attr", "elem_flags", 40),
    ("struct map_batch_attr", "flags", 48),
    ("struct prog_load_attr", "insns", 8),
    ("struct prog_load_attr", "log_buf", 32),
    ("struct prog_load_attr", "prog_name", 48),
    ("struct prog_load_attr", "expected_attach_type", 68),
    ("struct prog_load_attr", "prog_btf_fd", 72),
    ("struct prog_load_attr", "func_info", 80),
    ("struct prog_load_attr", "line_info", 96),
    ("struct prog_load_attr", "line_info_cnt", 104),
    ("struct prog_load_attr", "fd_array", 120),
    ("struct prog_load_attr", "log_true_size", 140),  # docs/kernel-facts.md, fact 32
    ("struct obj_attr", "bpf_fd", 8),
    ("struct obj_attr", "file_flags", 12),
    ("struct prog_attach_attr", "attach_type", 8),
    ("struct prog_attach_attr", "replace_bpf_fd", 16),
    ("struct test_run_attr", "data_in", 16),
    ("struct test_run_attr", "repeat", 32),
    ("struct test_run_attr", "ctx_in", 48),
    ("struct test_run_attr", "cpu", 68),
    ("struct info_attr", "info", 8),
    ("struct btf_load_attr", "btf_size", 16),
    ("struct btf_load_attr", "btf_log_true_size", 28),
    ("struct link_create_attr", "attach_type", 8),
    ("struct link_create_attr", "relative_fd", 16),
    ("struct link_create_attr", "expected_revision", 24),
    ("struct bpf_map_info", "name", 24),
    ("struct bpf_map_info", "btf_id", 64),
    ("struct bpf_map_info", "map_extra", 80),
    ("struct bpf_prog_info", "tag", 8),
    ("struct bpf_prog_info", "name", 64),
    ("struct bpf_link_info", "target0", 16),
]


@pytest.mark.parametrize(("struct", "field", "offset"), UAPI_OFFSETS)
def test_attr_layout_matches_uapi(struct: str, field: str, offset: int) -> None:
    assert ffi.offsetof(struct, field) == offset


#: Where the kernel's own headers (Debian's linux-libc-dev, in .ci/apt-packages) define
#: ``__NR_bpf`` for each machine name ``platform.machine()`` gives: x86_64's own table, and
#: the generic table arm64 and riscv64 use.
SYSCALL_HEADERS = {
    "x86_64": "/usr/include/x86_64-linux-gnu/asm/unistd_64.h",
    "aarch64": "/usr/include/asm-generic/unistd.h",
    "arm64": "/usr/include/asm-generic/unistd.h",
    "riscv64": "/usr/include/asm-generic/unistd.h",
}


@pytest.mark.parametrize("machine", sorted(SYSCALL_HEADERS))
def test_the_bpf_syscall_number_per_architecture_is_the_kernels(machine: str) -> None:
    """The loader calls ``syscall(SYS_BPF[machine], ...)``: a wrong number on another
    architecture would call some other syscall. The numbers come from the kernel headers."""
    from trio_sni_loader._sys.consts import SYS_BPF

    header = SYSCALL_HEADERS[machine]
    if not os.path.exists(header):
        pytest.skip(f"{header} is not installed (linux-libc-dev)")
    with open(header) as f:
        [number] = [
            int(line.split()[2]) for line in f if line.split()[:2] == ["#define", "__NR_bpf"]
        ]
    assert SYS_BPF[machine] == number


def test_eperm_names_the_capability() -> None:
    err = bpf.error_for(Cmd.MAP_CREATE, errno.EPERM)
    assert isinstance(err, loader.MissingPrivilegeError)
    assert isinstance(err, PermissionError)
    assert err.errno == errno.EPERM
    assert "CAP_BPF" in str(err)
    assert "CAP_NET_ADMIN" in str(err)
    assert "BPF_MAP_CREATE" in str(err)
    prog = bpf.error_for(Cmd.PROG_LOAD, errno.EPERM)
    assert "CAP_BPF" in str(prog)
    assert "CAP_NET_ADMIN" in str(prog)


def test_other_errno_keeps_errno() -> None:
    err = bpf.error_for(Cmd.OBJ_GET, errno.ENOENT)
    assert isinstance(err, loader.BPFSyscallError)
    assert isinstance(err, OSError)
    assert err.errno == errno.ENOENT
    assert "nothing is pinned" in str(err)


def test_buffer_gives_back_what_was_written() -> None:
    buf = Buffer(8)
    assert buf.read() == bytes(8)
    buf.write(b"log\0tail")
    assert buf.read(3) == b"log"
    assert buf.text() == "log"
    with pytest.raises(ValueError, match="do not fit"):
        buf.write(bytes(9))


def test_fd_owner_is_idempotent_and_tracked() -> None:
    r, w = os.pipe()
    os.close(w)
    fd = FD(r, "test")
    assert live_fds()[r].startswith("test created at ")
    with fd:
        assert fd.raw == r
        assert not fd.closed
    assert fd.closed
    assert r not in live_fds()
    fd.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        fd.raw  # noqa: B018


def test_fd_below_3_is_moved() -> None:
    saved = os.dup(0)
    try:
        r, w = os.pipe()
        os.dup2(r, 0)
        os.close(r)
        os.close(w)
        fd = FD(0, "test")
        try:
            assert fd.raw >= 3
        finally:
            fd.close()
    finally:
        os.dup2(saved, 0)
        os.close(saved)


def test_unclosed_fd_warns() -> None:
    r, w = os.pipe()
    os.close(w)
    fd = FD(r, "test")
    with pytest.warns(ResourceWarning, match="unclosed test fd"):
        del fd
    assert r not in live_fds()


@pytest.mark.bpf
def test_map_wrappers_roundtrip() -> None:
    with bpf.map_create(MapType.HASH, 4, 8, 4, name="sys_test") as fd:
        elems = bpf.ElemCalls(fd.raw, 4, 8)
        key = b"\x01\0\0\0"
        elems.update(key, b"abcdefgh")
        assert elems.lookup(key) == b"abcdefgh"
        first = bpf.map_get_next_key(fd.raw, None, 4)
        assert first == key
        assert bpf.map_get_next_key(fd.raw, first, 4) is None
        assert elems.delete(key)
        assert not elems.delete(key)
        assert elems.lookup(key) is None
        info = bpf.map_info(fd.raw)
        assert (info.type, info.key_size, info.value_size, info.max_entries) == (1, 4, 8, 4)
        assert info.name == "sys_test"


@pytest.mark.bpf
def test_a_refusal_raises_and_a_miss_is_a_value() -> None:
    """The module's one error convention: ENOENT answers a lookup, any refusal raises."""
    with bpf.map_create(MapType.HASH, 4, 8, 1, name="sys_test") as fd:
        elems = bpf.ElemCalls(fd.raw, 4, 8)
        assert elems.lookup(b"\0\0\0\0") is None
        elems.update(b"\0\0\0\0", bytes(8))
        with pytest.raises(loader.BPFSyscallError, match="max_entries") as full:
            elems.update(b"\1\0\0\0", bytes(8))
        assert full.value.errno == errno.E2BIG
    log = bpf.VerifierLog(4096)
    exit_only = asm.Instruction(asm.EXIT).encode()  # r0 is never set: the verifier refuses
    with pytest.raises(loader.BPFSyscallError) as refused:
        bpf.prog_load(ProgType.SOCKET_FILTER, exit_only, "GPL", log=log)
    assert refused.value.errno == errno.EACCES
    assert "R0 !read_ok" in log.text()
    assert log.true_size == len(log.text()) + 1  # the log and its NUL


@pytest.mark.bpf
def test_obj_get_missing_path() -> None:
    with pytest.raises(loader.BPFSyscallError) as exc:
        bpf.obj_get("/sys/fs/bpf/does-not-exist-loader-test")
    assert exc.value.errno == errno.ENOENT


@pytest.mark.bpf
def test_unprivileged_process_gets_the_capability_hint() -> None:
    """Without capabilities, map creation fails with EPERM and the message names CAP_BPF.

    The process stays uid 0 with an empty capability bounding set, rather than switching to
    user nobody, so it can still read the checkout and the venv wherever CI put them.
    """
    code = (
        "import trio_sni_loader as loader\n"
        "from trio_sni_loader import MapSpec, MapType, Map\n"
        "try:\n"
        "    Map.create(MapSpec('x', MapType.HASH, 4, 4, 1))\n"
        "except loader.MissingPrivilegeError as e:\n"
        "    print('OK', e)\n"
    )
    out = subprocess.run(
        ["setpriv", "--bounding-set=-all", "--inh-caps=-all", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=os.path.dirname(os.path.dirname(loader.__file__)),
        check=False,
    )
    assert out.stdout.startswith("OK"), out.stderr
    assert "CAP_BPF" in out.stdout
