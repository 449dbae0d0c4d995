"""One function per ``bpf()`` command.

Each wrapper fills a zeroed attribute struct, passes ``size = offsetofend(last field used)``
(libbpf's discipline, so older kernels accept it), keeps every buffer it points at alive in a
local until the call returns, reads ``errno`` immediately and raises a typed error with a hint
that says what to do. Nothing here knows about ELF, BTF or specs.
"""

from __future__ import annotations

import errno
import os
import platform
from typing import Any

from ..errors import BPFSyscallError, MissingPrivilegeError
from . import _ffi
from .consts import SYS_BPF, AttachType
from .consts import Cmd as Cmd
from .fd import FD

ffi = _ffi.ffi
_lib = _ffi.lib

try:
    _SYS_BPF = SYS_BPF[platform.machine()]
except KeyError:  # pragma: no cover - architectures we do not run on
    _SYS_BPF = -1

#: ``BPF_PROG_LOAD`` can return EAGAIN when the verifier is interrupted; libbpf retries 5 times.
_EAGAIN_RETRIES = 5

_CAPS = "CAP_BPF (Linux 5.8+; CAP_SYS_ADMIN before)"
_NET = "CAP_BPF and CAP_NET_ADMIN"

#: (command, errno) -> what to do. Checked first, then errno-only hints.
_HINTS: dict[tuple[Cmd | None, int], str] = {
    (Cmd.MAP_CREATE, errno.EPERM): f"creating maps needs {_CAPS}; sockmap/sockhash, devmap and "
    "xskmap also need CAP_NET_ADMIN. On kernels before 5.11 also raise RLIMIT_MEMLOCK",
    (Cmd.PROG_LOAD, errno.EPERM): f"loading programs needs {_CAPS}; networking programs (xdp, "
    "tc, sk_skb, sk_msg) also need CAP_NET_ADMIN",
    (Cmd.BTF_LOAD, errno.EPERM): f"loading BTF needs {_CAPS}",
    (Cmd.PROG_ATTACH, errno.EPERM): f"attaching needs {_NET}",
    (Cmd.LINK_CREATE, errno.EPERM): f"creating links needs {_NET}",
    (Cmd.OBJ_GET, errno.ENOENT): "nothing is pinned at this path",
    (Cmd.OBJ_PIN, errno.EEXIST): "something is already pinned at this path",
    (Cmd.OBJ_PIN, errno.EPERM): "the path is not on a bpffs mount (mount -t bpf bpf "
    "/sys/fs/bpf), or the directory is not writable",
    (Cmd.MAP_UPDATE_ELEM, errno.EOPNOTSUPP): "sockets can be added to a sockmap/sockhash only in "
    "TCP ESTABLISHED or LISTEN state (or bound UDP / AF_UNIX)",
    (Cmd.MAP_UPDATE_ELEM, errno.E2BIG): "the map is full (max_entries reached)",
    (Cmd.MAP_UPDATE_ELEM, errno.EEXIST): "the key exists and BPF_NOEXIST was given",
    (Cmd.MAP_UPDATE_ELEM, errno.ENOENT): "the key does not exist and BPF_EXIST was given",
    (Cmd.PROG_ATTACH, errno.EBUSY): "another program of a conflicting attach type is attached "
    "(stream_verdict and skb_verdict exclude each other)",
    (Cmd.LINK_CREATE, errno.EBUSY): "the hook is taken (an XDP program attached by netlink, or "
    "another link)",
    (Cmd.LINK_CREATE, errno.EEXIST): "this program is already attached to this hook",
    (Cmd.LINK_CREATE, errno.EOPNOTSUPP): "the device or mode does not support this attachment "
    "(native XDP needs driver support; use generic mode on lo)",
    (Cmd.PROG_TEST_RUN, 524): "this program type has no BPF_PROG_TEST_RUN support",
    (None, errno.E2BIG): "the kernel does not know an attribute we set (kernel too old?)",
    (None, errno.EPERM): f"missing privilege: needs {_CAPS}",
    (None, errno.EBADF): "a file descriptor passed to the kernel is not valid",
    (None, 524): "ENOTSUPP: the kernel does not support this operation for this object",
}


def hint_for(cmd: Cmd, err: int) -> str:
    return _HINTS.get((cmd, err)) or _HINTS.get((None, err), "")


def raise_for(cmd: Cmd, err: int, hint: str | None = None) -> BPFSyscallError:
    """Build the typed error for ``err`` from ``cmd`` (the caller raises it)."""
    text = hint if hint is not None else hint_for(cmd, err)
    name = f"BPF_{cmd.name}"
    if err == errno.EPERM:
        return MissingPrivilegeError(err, name, text)
    return BPFSyscallError(err, name, text)


def addr(buf: Any) -> int:
    """Address of a cffi buffer, as the ``__aligned_u64`` the kernel wants."""
    if buf is None or buf == ffi.NULL:
        return 0
    return int(ffi.cast("uintptr_t", buf))


def raw_bpf(cmd: Cmd, attr: Any, size: int) -> int:
    """``bpf(cmd, attr, size)``; returns the result or ``-errno``."""
    ret = int(_lib.syscall(_SYS_BPF, cmd, attr, size))
    if ret < 0:
        return -int(ffi.errno)
    return ret


def _call(cmd: Cmd, attr: Any, size: int) -> int:
    ret = _lib.syscall(_SYS_BPF, cmd, attr, size)
    if ret < 0:
        err = ffi.errno
        raise raise_for(cmd, err)
    return ret


def _size(struct: str, last: str) -> int:
    fields = dict(ffi.typeof(struct).fields)
    return int(ffi.offsetof(struct, last) + ffi.sizeof(fields[last].type))


def _name(value: str) -> bytes:
    return value.encode()[:15]


_MAP_CREATE_SIZE = _size("struct map_create_attr", "map_extra")
_ELEM_SIZE = _size("struct map_elem_attr", "flags")
_DELETE_SIZE = _size("struct map_elem_attr", "key")
_NEXT_KEY_SIZE = _size("struct map_elem_attr", "value")
_BATCH_SIZE = _size("struct map_batch_attr", "flags")
_OBJ_SIZE = _size("struct obj_attr", "file_flags")
_ATTACH_SIZE = _size("struct prog_attach_attr", "replace_bpf_fd")
_TEST_RUN_SIZE = _size("struct test_run_attr", "cpu")
_INFO_SIZE = _size("struct info_attr", "info")
_BTF_SIZE = _size("struct btf_load_attr", "btf_log_true_size")
_LINK_SIZE = _size("struct link_create_attr", "flags")
_LINK_TCX_SIZE = _size("struct link_create_attr", "expected_revision")
_LINK_DETACH_SIZE = _size("struct link_detach_attr", "link_fd")


def map_create(
    map_type: int,
    key_size: int,
    value_size: int,
    max_entries: int,
    *,
    flags: int = 0,
    name: str = "",
    inner_map_fd: int = 0,
    numa_node: int = 0,
    btf_fd: int = 0,
    btf_key_type_id: int = 0,
    btf_value_type_id: int = 0,
    map_extra: int = 0,
) -> FD:
    attr = ffi.new("struct map_create_attr *")
    attr.map_type = map_type
    attr.key_size = key_size
    attr.value_size = value_size
    attr.max_entries = max_entries
    attr.map_flags = flags
    attr.inner_map_fd = inner_map_fd
    attr.numa_node = numa_node
    attr.map_name = _name(name)
    attr.btf_fd = btf_fd
    attr.btf_key_type_id = btf_key_type_id
    attr.btf_value_type_id = btf_value_type_id
    attr.map_extra = map_extra
    size = _MAP_CREATE_SIZE if map_extra else ffi.offsetof("struct map_create_attr", "map_extra")
    return FD(_call(Cmd.MAP_CREATE, attr, size), "map")


def map_lookup_elem(map_fd: int, key: Any, value: Any, flags: int = 0) -> bool:
    """Fill ``value`` (a writable cffi buffer); ``False`` if the key is absent."""
    attr = ffi.new("struct map_elem_attr *")
    attr.map_fd = map_fd
    attr.key = addr(key)
    attr.value = addr(value)
    attr.flags = flags
    ret = _lib.syscall(_SYS_BPF, Cmd.MAP_LOOKUP_ELEM, attr, _ELEM_SIZE)
    if ret < 0:
        err = ffi.errno
        if err == errno.ENOENT:
            return False
        raise raise_for(Cmd.MAP_LOOKUP_ELEM, err)
    return True


def map_update_elem(map_fd: int, key: Any, value: Any, flags: int = 0) -> None:
    attr = ffi.new("struct map_elem_attr *")
    attr.map_fd = map_fd
    attr.key = addr(key)
    attr.value = addr(value)
    attr.flags = flags
    _call(Cmd.MAP_UPDATE_ELEM, attr, _ELEM_SIZE)


def map_delete_elem(map_fd: int, key: Any) -> bool:
    """Delete ``key``; ``False`` if it was absent."""
    attr = ffi.new("struct map_elem_attr *")
    attr.map_fd = map_fd
    attr.key = addr(key)
    ret = _lib.syscall(_SYS_BPF, Cmd.MAP_DELETE_ELEM, attr, _DELETE_SIZE)
    if ret < 0:
        err = ffi.errno
        if err == errno.ENOENT:
            return False
        raise raise_for(Cmd.MAP_DELETE_ELEM, err)
    return True


def map_get_next_key(map_fd: int, key: Any, next_key: Any) -> bool:
    """Write the key after ``key`` (``None``: the first key); ``False`` at the end."""
    attr = ffi.new("struct map_elem_attr *")
    attr.map_fd = map_fd
    attr.key = addr(key)
    attr.value = addr(next_key)
    ret = _lib.syscall(_SYS_BPF, Cmd.MAP_GET_NEXT_KEY, attr, _NEXT_KEY_SIZE)
    if ret < 0:
        err = ffi.errno
        if err == errno.ENOENT:
            return False
        raise raise_for(Cmd.MAP_GET_NEXT_KEY, err)
    return True


def map_lookup_batch(
    map_fd: int,
    in_batch: Any,
    out_batch: Any,
    keys: Any,
    values: Any,
    count: int,
    elem_flags: int = 0,
) -> tuple[int, bool]:
    """One ``BPF_MAP_LOOKUP_BATCH`` step: returns ``(entries read, this was the last batch)``.

    The kernel ends a walk with ``ENOENT`` *and* a partial count (docs/kernel-facts.md, fact 23).
    """
    attr = ffi.new("struct map_batch_attr *")
    attr.in_batch = addr(in_batch)
    attr.out_batch = addr(out_batch)
    attr.keys = addr(keys)
    attr.values = addr(values)
    attr.count = count
    attr.map_fd = map_fd
    attr.elem_flags = elem_flags
    ret = _lib.syscall(_SYS_BPF, Cmd.MAP_LOOKUP_BATCH, attr, _BATCH_SIZE)
    if ret < 0:
        err = ffi.errno
        if err == errno.ENOENT:
            return int(attr.count), True
        raise raise_for(Cmd.MAP_LOOKUP_BATCH, err)
    return int(attr.count), False


def map_freeze(map_fd: int) -> None:
    attr = ffi.new("struct map_elem_attr *")
    attr.map_fd = map_fd
    _call(Cmd.MAP_FREEZE, attr, 4)


def prog_load(
    prog_type: int,
    insns: bytes,
    license: str,
    *,
    name: str = "",
    expected_attach_type: int = 0,
    prog_flags: int = 0,
    log_buf: Any = None,
    log_size: int = 0,
    log_level: int = 0,
    btf_fd: int = 0,
    func_info: bytes = b"",
    func_info_rec_size: int = 0,
    line_info: bytes = b"",
    line_info_rec_size: int = 0,
    core_relos: bytes = b"",
    core_relo_rec_size: int = 0,
) -> tuple[FD | None, int, int]:
    """``BPF_PROG_LOAD``. Returns ``(fd, 0, log_true_size)`` or ``(None, errno, log_true_size)``.

    Errors are returned, not raised, because the caller turns them into a
    :class:`~loader.errors.VerifierError` with the log or retries with a larger buffer.
    """
    c_insns = ffi.from_buffer(insns)
    c_license = ffi.new("char[]", license.encode())
    c_func = ffi.from_buffer(func_info) if func_info else ffi.NULL
    c_line = ffi.from_buffer(line_info) if line_info else ffi.NULL
    c_core = ffi.from_buffer(core_relos) if core_relos else ffi.NULL
    attr = ffi.new("struct prog_load_attr *")
    attr.prog_type = prog_type
    attr.insn_cnt = len(insns) // 8
    attr.insns = addr(c_insns)
    attr.license = addr(c_license)
    attr.log_level = log_level
    attr.log_size = log_size
    attr.log_buf = addr(log_buf)
    attr.prog_flags = prog_flags
    attr.prog_name = _name(name)
    attr.expected_attach_type = expected_attach_type
    attr.prog_btf_fd = btf_fd
    if func_info:
        attr.func_info_rec_size = func_info_rec_size
        attr.func_info = addr(c_func)
        attr.func_info_cnt = len(func_info) // func_info_rec_size
    if line_info:
        attr.line_info_rec_size = line_info_rec_size
        attr.line_info = addr(c_line)
        attr.line_info_cnt = len(line_info) // line_info_rec_size
    if core_relos:
        attr.core_relo_rec_size = core_relo_rec_size
        attr.core_relos = addr(c_core)
        attr.core_relo_cnt = len(core_relos) // core_relo_rec_size
    size = _size("struct prog_load_attr", "log_true_size")
    for _ in range(_EAGAIN_RETRIES):
        ret = _lib.syscall(_SYS_BPF, Cmd.PROG_LOAD, attr, size)
        if ret >= 0:
            return FD(ret, "prog"), 0, int(attr.log_true_size)
        err = ffi.errno
        if err != errno.EAGAIN:
            break
    return None, err, int(attr.log_true_size)


def btf_load(data: bytes, log_buf: Any = None, log_size: int = 0, log_level: int = 0) -> FD:
    c_data = ffi.from_buffer(data)
    attr = ffi.new("struct btf_load_attr *")
    attr.btf = addr(c_data)
    attr.btf_size = len(data)
    attr.btf_log_buf = addr(log_buf)
    attr.btf_log_size = log_size
    attr.btf_log_level = log_level
    return FD(_call(Cmd.BTF_LOAD, attr, _BTF_SIZE), "btf")


def obj_pin(fd: int, path: str) -> None:
    c_path = ffi.new("char[]", os.fsencode(path))
    attr = ffi.new("struct obj_attr *")
    attr.pathname = addr(c_path)
    attr.bpf_fd = fd
    _call(Cmd.OBJ_PIN, attr, _OBJ_SIZE)


def obj_get(path: str, file_flags: int = 0, kind: str = "bpf") -> FD:
    c_path = ffi.new("char[]", os.fsencode(path))
    attr = ffi.new("struct obj_attr *")
    attr.pathname = addr(c_path)
    attr.file_flags = file_flags
    return FD(_call(Cmd.OBJ_GET, attr, _OBJ_SIZE), kind)


def prog_attach(target_fd: int, prog_fd: int, attach_type: AttachType, flags: int = 0) -> None:
    attr = ffi.new("struct prog_attach_attr *")
    attr.target_fd = target_fd
    attr.attach_bpf_fd = prog_fd
    attr.attach_type = attach_type
    attr.attach_flags = flags
    _call(Cmd.PROG_ATTACH, attr, _ATTACH_SIZE)


def prog_detach(target_fd: int, prog_fd: int, attach_type: AttachType) -> None:
    attr = ffi.new("struct prog_attach_attr *")
    attr.target_fd = target_fd
    attr.attach_bpf_fd = prog_fd
    attr.attach_type = attach_type
    _call(Cmd.PROG_DETACH, attr, _ATTACH_SIZE)


def link_create(
    prog_fd: int,
    target: int,
    attach_type: AttachType,
    flags: int = 0,
    *,
    relative_fd: int = 0,
    expected_revision: int = 0,
) -> FD:
    """``BPF_LINK_CREATE``; ``target`` is an ifindex (XDP, TCX) or a map fd (sockmap)."""
    attr = ffi.new("struct link_create_attr *")
    attr.prog_fd = prog_fd
    attr.target_fd = target
    attr.attach_type = attach_type
    attr.flags = flags
    size = _LINK_SIZE
    if relative_fd or expected_revision:
        attr.relative_fd = relative_fd
        attr.expected_revision = expected_revision
        size = _LINK_TCX_SIZE
    return FD(_call(Cmd.LINK_CREATE, attr, size), "link")


def link_detach(link_fd: int) -> None:
    attr = ffi.new("struct link_detach_attr *")
    attr.link_fd = link_fd
    _call(Cmd.LINK_DETACH, attr, _LINK_DETACH_SIZE)


def prog_test_run(
    prog_fd: int,
    data: bytes,
    *,
    data_out_size: int | None = None,
    repeat: int = 1,
    ctx: bytes = b"",
) -> tuple[int, bytes, int]:
    """``BPF_PROG_TEST_RUN``: returns ``(retval, data_out, duration_ns)``."""
    c_in = ffi.from_buffer(data)
    out_size = len(data) + 256 if data_out_size is None else data_out_size
    c_out = ffi.new("char[]", max(out_size, 1))
    c_ctx = ffi.from_buffer(ctx) if ctx else ffi.NULL
    attr = ffi.new("struct test_run_attr *")
    attr.prog_fd = prog_fd
    attr.data_size_in = len(data)
    attr.data_size_out = out_size
    attr.data_in = addr(c_in)
    attr.data_out = addr(c_out)
    attr.repeat = repeat
    if ctx:
        attr.ctx_size_in = len(ctx)
        attr.ctx_in = addr(c_ctx)
    _call(Cmd.PROG_TEST_RUN, attr, _TEST_RUN_SIZE)
    n = min(int(attr.data_size_out), out_size)
    return int(attr.retval), bytes(ffi.buffer(c_out, n)), int(attr.duration)


def obj_get_info_by_fd(fd: int, struct: str) -> Any:
    """Return a filled ``struct bpf_map_info`` / ``bpf_prog_info`` / ``bpf_link_info``."""
    info = ffi.new(f"struct {struct} *")
    attr = ffi.new("struct info_attr *")
    attr.bpf_fd = fd
    attr.info_len = ffi.sizeof(info[0])
    attr.info = addr(info)
    _call(Cmd.OBJ_GET_INFO_BY_FD, attr, _INFO_SIZE)
    return info


LOOKUP = int(Cmd.MAP_LOOKUP_ELEM)
UPDATE = int(Cmd.MAP_UPDATE_ELEM)
_DELETE = DELETE = int(Cmd.MAP_DELETE_ELEM)


class ElemCall:
    """A prebuilt ``map_elem_attr`` with its own key and value buffers, for hot paths.

    Building the attr and taking buffer addresses costs more than the syscall itself from
    Python (docs/kernel-facts.md, fact 35), so a map keeps one of these and only copies the
    key in. Not thread-safe: the owner serialises calls.
    """

    __slots__ = ("attr", "key", "size", "value", "value_size")

    def __init__(self, map_fd: int, key_size: int, value_size: int) -> None:
        self.key = ffi.new("char[]", max(key_size, 1))
        self.value = ffi.new("char[]", max(value_size, 1))
        self.value_size = value_size
        self.attr = ffi.new("struct map_elem_attr *")
        self.attr.map_fd = map_fd
        self.attr.key = addr(self.key)
        self.attr.value = addr(self.value)
        self.size = _ELEM_SIZE

    def call(self, cmd: int, key: bytes, flags: int = 0) -> int:
        """Copy ``key`` in and run ``cmd`` (a plain int: converting an IntEnum costs
        measurably on this path); returns 0 or ``-errno``."""
        ffi.memmove(self.key, key, len(key))
        self.attr.flags = flags
        # DELETE's last field is ``key``: the kernel wants everything after it zero, so the
        # attr is cut before ``value`` (LOOKUP and UPDATE end at ``flags``).
        size = _DELETE_SIZE if cmd == _DELETE else _ELEM_SIZE
        if _lib.syscall(_SYS_BPF, cmd, self.attr, size) < 0:
            return -int(ffi.errno)
        return 0

    def read_value(self) -> bytes:
        return bytes(ffi.buffer(self.value, self.value_size))

    def write_value(self, value: bytes) -> None:
        ffi.memmove(self.value, value, len(value))
