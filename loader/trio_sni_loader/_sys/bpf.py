"""One function per ``bpf()`` command.

Each wrapper fills a zeroed attribute struct, passes ``size = offsetofend(last field used)``
(libbpf's discipline, so older kernels accept it) and keeps every buffer it points at alive in a
local until the call returns. Callers pass and get ints, bytes, :class:`~loader._sys.fd.FD`,
:class:`~loader._sys.buffer.Buffer` and the types below, never a cffi object. Nothing here
knows about ELF, BTF or specs.

Errors follow one convention. A command the kernel refuses raises the
:class:`~loader.errors.BPFSyscallError` that :func:`error_for` builds from ``errno`` (read right
after the call): :class:`~loader.errors.MissingPrivilegeError` for ``EPERM``, and a hint that
says what to do. ``ENOENT`` is not a refusal where it answers the question asked (no such key,
no key after this one, the batch walk is over): a map miss is an ordinary result, so lookup,
delete, next-key and batch lookup return it as a value (``None``, ``False``, the end flag).
"""

from __future__ import annotations

import errno
import os
import platform
from typing import Any

import attrs

from ..errors import BPFSyscallError, MissingPrivilegeError
from ._ffi import ffi
from ._ffi import lib as _lib
from .buffer import Buffer
from .consts import SYS_BPF, AttachType
from .consts import Cmd as Cmd
from .fd import FD

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


def error_for(cmd: Cmd, err: int) -> BPFSyscallError:
    """The typed error for ``err`` from ``cmd``, with the hint for that pair (else for ``err``).

    The wrappers raise it; a test raises one to play a kernel that refuses.
    """
    hint = _HINTS.get((cmd, err)) or _HINTS.get((None, err), "")
    name = f"BPF_{cmd.name}"
    if err == errno.EPERM:
        return MissingPrivilegeError(err, name, hint)
    return BPFSyscallError(err, name, hint)


def _call(cmd: Cmd, attr: Any, size: int) -> int:
    ret = _lib.syscall(_SYS_BPF, cmd, attr, size)
    if ret < 0:
        raise error_for(cmd, ffi.errno)
    return ret


def _size(struct: str, last: str) -> int:
    fields = dict(ffi.typeof(struct).fields)
    return int(ffi.offsetof(struct, last) + ffi.sizeof(fields[last].type))


def _address(memory: Any) -> int:
    """Where cffi ``memory`` lives, as the ``__aligned_u64`` an attr holds."""
    return int(ffi.cast("uintptr_t", memory))


def _name(value: str) -> bytes:
    return value.encode()[:15]


_MAP_CREATE_SIZE = _size("struct map_create_attr", "map_extra")
_ELEM_SIZE = _size("struct map_elem_attr", "flags")
_DELETE_SIZE = _size("struct map_elem_attr", "key")
_NEXT_KEY_SIZE = _size("struct map_elem_attr", "value")
_BATCH_SIZE = _size("struct map_batch_attr", "flags")
_PROG_LOAD_SIZE = _size("struct prog_load_attr", "log_true_size")
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


#: Plain ints: converting an IntEnum costs measurably on the element hot path.
_LOOKUP = int(Cmd.MAP_LOOKUP_ELEM)
_UPDATE = int(Cmd.MAP_UPDATE_ELEM)
_DELETE = int(Cmd.MAP_DELETE_ELEM)


class ElemCalls:
    """``BPF_MAP_LOOKUP_ELEM``, ``UPDATE_ELEM`` and ``DELETE_ELEM`` on one map, for hot paths.

    Building the attr and taking buffer addresses costs more than the syscall itself from
    Python (docs/kernel-facts.md, fact 35), so a map keeps one of these: the attr and the key
    and value buffers are built once, and a call only copies the key (and value) in. Not
    thread-safe: the owner serialises calls.
    """

    __slots__ = ("_attr", "_key", "_value", "_value_size")

    def __init__(self, map_fd: int, key_size: int, value_size: int) -> None:
        self._key = ffi.new("char[]", max(key_size, 1))
        self._value = ffi.new("char[]", max(value_size, 1))
        self._value_size = value_size
        self._attr = ffi.new("struct map_elem_attr *")
        self._attr.map_fd = map_fd
        self._attr.key = _address(self._key)
        self._attr.value = _address(self._value)

    def lookup(self, key: bytes) -> bytes | None:
        """The value stored under ``key``; ``None`` if the map has no such key."""
        ffi.memmove(self._key, key, len(key))
        self._attr.flags = 0
        if _lib.syscall(_SYS_BPF, _LOOKUP, self._attr, _ELEM_SIZE) < 0:
            err = ffi.errno
            if err == errno.ENOENT:
                return None
            raise error_for(Cmd.MAP_LOOKUP_ELEM, err)
        return bytes(ffi.buffer(self._value, self._value_size))

    def update(self, key: bytes, value: bytes, flags: int = 0) -> None:
        """Store ``value`` (exactly the map's value size) under ``key``."""
        ffi.memmove(self._key, key, len(key))
        ffi.memmove(self._value, value, len(value))
        self._attr.flags = flags
        if _lib.syscall(_SYS_BPF, _UPDATE, self._attr, _ELEM_SIZE) < 0:
            raise error_for(Cmd.MAP_UPDATE_ELEM, ffi.errno)

    def delete(self, key: bytes) -> bool:
        """Delete ``key``; ``False`` if the map had no such key."""
        ffi.memmove(self._key, key, len(key))
        # DELETE's last field is ``key``: the kernel wants everything after it zero, so the
        # attr is cut before ``value``.
        if _lib.syscall(_SYS_BPF, _DELETE, self._attr, _DELETE_SIZE) < 0:
            err = ffi.errno
            if err == errno.ENOENT:
                return False
            raise error_for(Cmd.MAP_DELETE_ELEM, err)
        return True


def map_get_next_key(map_fd: int, key: bytes | None, key_size: int) -> bytes | None:
    """The key after ``key`` (``None``: the first key); ``None`` after the last one."""
    c_key = ffi.from_buffer(key) if key is not None else None
    c_next = ffi.new("char[]", key_size)
    attr = ffi.new("struct map_elem_attr *")
    attr.map_fd = map_fd
    attr.key = _address(c_key) if c_key is not None else 0
    attr.value = _address(c_next)
    if _lib.syscall(_SYS_BPF, Cmd.MAP_GET_NEXT_KEY, attr, _NEXT_KEY_SIZE) < 0:
        err = ffi.errno
        if err == errno.ENOENT:
            return None
        raise error_for(Cmd.MAP_GET_NEXT_KEY, err)
    return bytes(ffi.buffer(c_next, key_size))


def map_lookup_batch(
    map_fd: int,
    in_batch: Buffer | None,
    out_batch: Buffer,
    keys: Buffer,
    values: Buffer,
    count: int,
    elem_flags: int = 0,
) -> tuple[int, bool]:
    """One ``BPF_MAP_LOOKUP_BATCH`` step: returns ``(entries read, this was the last batch)``.

    ``in_batch`` is the previous step's ``out_batch`` (``None`` for the first step). The kernel
    ends a walk with ``ENOENT`` *and* a partial count (docs/kernel-facts.md, fact 23).
    """
    attr = ffi.new("struct map_batch_attr *")
    attr.in_batch = in_batch.address if in_batch is not None else 0
    attr.out_batch = out_batch.address
    attr.keys = keys.address
    attr.values = values.address
    attr.count = count
    attr.map_fd = map_fd
    attr.elem_flags = elem_flags
    if _lib.syscall(_SYS_BPF, Cmd.MAP_LOOKUP_BATCH, attr, _BATCH_SIZE) < 0:
        err = ffi.errno
        if err == errno.ENOENT:
            return int(attr.count), True
        raise error_for(Cmd.MAP_LOOKUP_BATCH, err)
    return int(attr.count), False


def prog_bind_map(prog_fd: int, map_fd: int) -> None:
    """``BPF_PROG_BIND_MAP``: ``map_fd`` lives as long as the program, and the kernel lists
    it among the program's maps, though no instruction refers to it (5.10+)."""
    attr = ffi.new("struct prog_bind_map_attr *")
    attr.prog_fd = prog_fd
    attr.map_fd = map_fd
    _call(Cmd.PROG_BIND_MAP, attr, ffi.sizeof("struct prog_bind_map_attr"))


def map_freeze(map_fd: int) -> None:
    attr = ffi.new("struct map_elem_attr *")
    attr.map_fd = map_fd
    _call(Cmd.MAP_FREEZE, attr, 4)


class VerifierLog:
    """Where ``BPF_PROG_LOAD`` writes the verifier's log, ``size`` bytes at ``level`` (1 or 2).

    After the load, refused or not, :attr:`true_size` is how many bytes the whole log needs
    (6.4+; 0 before), so a refused load can be retried with a buffer that fits
    (docs/kernel-facts.md, fact 32).
    """

    __slots__ = ("_buffer", "level", "size", "true_size")

    def __init__(self, size: int, level: int = 1) -> None:
        self._buffer = Buffer(size)
        self.size = size
        self.level = level
        self.true_size = 0

    @property
    def address(self) -> int:
        return self._buffer.address

    def text(self) -> str:
        return self._buffer.text()


def prog_load(
    prog_type: int,
    insns: bytes,
    license: str,
    *,
    name: str = "",
    expected_attach_type: int = 0,
    prog_flags: int = 0,
    log: VerifierLog | None = None,
    btf_fd: int = 0,
    func_info: bytes = b"",
    func_info_rec_size: int = 0,
    line_info: bytes = b"",
    line_info_rec_size: int = 0,
    core_relos: bytes = b"",
    core_relo_rec_size: int = 0,
) -> FD:
    """``BPF_PROG_LOAD``, retried while the kernel answers ``EAGAIN`` (as libbpf does).

    A refusal raises like every command; the verifier's reasons are in ``log``.
    """
    c_insns = ffi.from_buffer(insns)
    c_license = ffi.new("char[]", license.encode())
    attr = ffi.new("struct prog_load_attr *")
    attr.prog_type = prog_type
    attr.insn_cnt = len(insns) // 8
    attr.insns = _address(c_insns)
    attr.license = _address(c_license)
    if log is not None:
        attr.log_level = log.level
        attr.log_size = log.size
        attr.log_buf = log.address
    attr.prog_flags = prog_flags
    attr.prog_name = _name(name)
    attr.expected_attach_type = expected_attach_type
    attr.prog_btf_fd = btf_fd
    if func_info:
        c_func = ffi.from_buffer(func_info)
        attr.func_info_rec_size = func_info_rec_size
        attr.func_info = _address(c_func)
        attr.func_info_cnt = len(func_info) // func_info_rec_size
    if line_info:
        c_line = ffi.from_buffer(line_info)
        attr.line_info_rec_size = line_info_rec_size
        attr.line_info = _address(c_line)
        attr.line_info_cnt = len(line_info) // line_info_rec_size
    if core_relos:
        c_core = ffi.from_buffer(core_relos)
        attr.core_relo_rec_size = core_relo_rec_size
        attr.core_relos = _address(c_core)
        attr.core_relo_cnt = len(core_relos) // core_relo_rec_size
    for _ in range(_EAGAIN_RETRIES):
        ret = _lib.syscall(_SYS_BPF, Cmd.PROG_LOAD, attr, _PROG_LOAD_SIZE)
        err = 0 if ret >= 0 else ffi.errno
        if err != errno.EAGAIN:
            break
    if log is not None:
        log.true_size = int(attr.log_true_size)
    if err:
        raise error_for(Cmd.PROG_LOAD, err)
    return FD(ret, "prog")


def btf_load(data: bytes) -> FD:
    c_data = ffi.from_buffer(data)
    attr = ffi.new("struct btf_load_attr *")
    attr.btf = _address(c_data)
    attr.btf_size = len(data)
    return FD(_call(Cmd.BTF_LOAD, attr, _BTF_SIZE), "btf")


def obj_pin(fd: int, path: str) -> None:
    c_path = ffi.new("char[]", os.fsencode(path))
    attr = ffi.new("struct obj_attr *")
    attr.pathname = _address(c_path)
    attr.bpf_fd = fd
    _call(Cmd.OBJ_PIN, attr, _OBJ_SIZE)


def obj_get(path: str, file_flags: int = 0, kind: str = "bpf") -> FD:
    c_path = ffi.new("char[]", os.fsencode(path))
    attr = ffi.new("struct obj_attr *")
    attr.pathname = _address(c_path)
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
    attr = ffi.new("struct test_run_attr *")
    attr.prog_fd = prog_fd
    attr.data_size_in = len(data)
    attr.data_size_out = out_size
    attr.data_in = _address(c_in)
    attr.data_out = _address(c_out)
    attr.repeat = repeat
    if ctx:
        c_ctx = ffi.from_buffer(ctx)
        attr.ctx_size_in = len(ctx)
        attr.ctx_in = _address(c_ctx)
    _call(Cmd.PROG_TEST_RUN, attr, _TEST_RUN_SIZE)
    n = min(int(attr.data_size_out), out_size)
    return int(attr.retval), bytes(ffi.buffer(c_out, n)), int(attr.duration)


@attrs.frozen
class MapInfo:
    """The kernel's view of a map (``BPF_OBJ_GET_INFO_BY_FD``)."""

    id: int
    type: int
    name: str
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    btf_id: int
    btf_key_type_id: int
    btf_value_type_id: int


@attrs.frozen
class ProgramInfo:
    """The kernel's view of a program (``BPF_OBJ_GET_INFO_BY_FD``)."""

    id: int
    type: int
    name: str
    tag: str


@attrs.frozen
class LinkInfo:
    """The kernel's view of a link (``BPF_OBJ_GET_INFO_BY_FD``)."""

    id: int
    type: int
    prog_id: int
    target: int  # ifindex (xdp, tcx) or map id (sockmap)
    attach_type: int  # tcx and sockmap only


def _obj_info(fd: int, struct: str) -> Any:
    """A filled ``struct bpf_map_info`` / ``bpf_prog_info`` / ``bpf_link_info``."""
    info = ffi.new(f"struct {struct} *")
    attr = ffi.new("struct info_attr *")
    attr.bpf_fd = fd
    attr.info_len = ffi.sizeof(info[0])
    attr.info = _address(info)
    _call(Cmd.OBJ_GET_INFO_BY_FD, attr, _INFO_SIZE)
    return info


def _text(name: Any) -> str:
    return bytes(ffi.string(name)).decode(errors="replace")


def map_info(map_fd: int) -> MapInfo:
    info = _obj_info(map_fd, "bpf_map_info")
    return MapInfo(
        id=info.id,
        type=info.type,
        name=_text(info.name),
        key_size=info.key_size,
        value_size=info.value_size,
        max_entries=info.max_entries,
        flags=info.map_flags,
        btf_id=info.btf_id,
        btf_key_type_id=info.btf_key_type_id,
        btf_value_type_id=info.btf_value_type_id,
    )


def prog_info(prog_fd: int) -> ProgramInfo:
    info = _obj_info(prog_fd, "bpf_prog_info")
    return ProgramInfo(
        id=info.id,
        type=info.type,
        name=_text(info.name),
        tag=bytes(ffi.buffer(info.tag, 8)).hex(),
    )


def link_info(link_fd: int) -> LinkInfo:
    info = _obj_info(link_fd, "bpf_link_info")
    return LinkInfo(
        id=info.id,
        type=info.type,
        prog_id=info.prog_id,
        target=info.target0,
        attach_type=info.target1,
    )
