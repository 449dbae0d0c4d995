"""The one cffi FFI of the loader, in ABI mode (no compiler needed at install or run time).

``syscall`` is declared with a fixed prototype instead of the variadic ``long syscall(long,
...)``: with ``dlopen`` a variadic call needs every argument cast to cdata and costs about
0.4 µs more per call (docs/kernel-facts.md, fact 35). On the ABIs we run on (x86_64,
aarch64) the fixed prototype passes the same registers as the variadic one.

The ``bpf_attr`` union is declared as one struct per command, each field at its UAPI offset
(``__aligned_u64`` is ``uint64_t``, naturally 8-aligned on 64-bit ABIs). ``tests/loader/
test_sys.py`` checks every offset against numbers taken from ``include/uapi/linux/bpf.h``.
Attributes are sized to the last field a command uses (libbpf's ``offsetofend``), so an older
kernel, which rejects non-zero bytes past what it knows, still accepts them.
"""

from __future__ import annotations

from typing import Any, Protocol, cast

import cffi  # type: ignore[import-untyped]

CDEF = """
long syscall(long number, int cmd, void *attr, unsigned int size);
int mount(const char *source, const char *target, const char *fstype, unsigned long flags,
          const void *data);

struct map_create_attr {
    uint32_t map_type;
    uint32_t key_size;
    uint32_t value_size;
    uint32_t max_entries;
    uint32_t map_flags;
    uint32_t inner_map_fd;
    uint32_t numa_node;
    char     map_name[16];
    uint32_t map_ifindex;
    uint32_t btf_fd;
    uint32_t btf_key_type_id;
    uint32_t btf_value_type_id;
    uint32_t btf_vmlinux_value_type_id;
    uint64_t map_extra;
};

struct map_elem_attr {
    uint32_t map_fd;
    uint32_t _pad0;
    uint64_t key;
    uint64_t value;      /* also next_key */
    uint64_t flags;
};

struct map_batch_attr {
    uint64_t in_batch;
    uint64_t out_batch;
    uint64_t keys;
    uint64_t values;
    uint32_t count;
    uint32_t map_fd;
    uint64_t elem_flags;
    uint64_t flags;
};

struct prog_load_attr {
    uint32_t prog_type;
    uint32_t insn_cnt;
    uint64_t insns;
    uint64_t license;
    uint32_t log_level;
    uint32_t log_size;
    uint64_t log_buf;
    uint32_t kern_version;
    uint32_t prog_flags;
    char     prog_name[16];
    uint32_t prog_ifindex;
    uint32_t expected_attach_type;
    uint32_t prog_btf_fd;
    uint32_t func_info_rec_size;
    uint64_t func_info;
    uint32_t func_info_cnt;
    uint32_t line_info_rec_size;
    uint64_t line_info;
    uint32_t line_info_cnt;
    uint32_t attach_btf_id;
    uint32_t attach_prog_fd;
    uint32_t core_relo_cnt;
    uint64_t fd_array;
    uint64_t core_relos;
    uint32_t core_relo_rec_size;
    uint32_t log_true_size;
};

struct obj_attr {
    uint64_t pathname;
    uint32_t bpf_fd;
    uint32_t file_flags;
};

struct prog_attach_attr {
    uint32_t target_fd;
    uint32_t attach_bpf_fd;
    uint32_t attach_type;
    uint32_t attach_flags;
    uint32_t replace_bpf_fd;
};

struct test_run_attr {
    uint32_t prog_fd;
    uint32_t retval;
    uint32_t data_size_in;
    uint32_t data_size_out;
    uint64_t data_in;
    uint64_t data_out;
    uint32_t repeat;
    uint32_t duration;
    uint32_t ctx_size_in;
    uint32_t ctx_size_out;
    uint64_t ctx_in;
    uint64_t ctx_out;
    uint32_t flags;
    uint32_t cpu;
};

struct prog_bind_map_attr {
    uint32_t prog_fd;
    uint32_t map_fd;
    uint32_t flags;
};

struct info_attr {
    uint32_t bpf_fd;
    uint32_t info_len;
    uint64_t info;
};

struct btf_load_attr {
    uint64_t btf;
    uint64_t btf_log_buf;
    uint32_t btf_size;
    uint32_t btf_log_size;
    uint32_t btf_log_level;
    uint32_t btf_log_true_size;
};

struct link_create_attr {
    uint32_t prog_fd;         /* or map_fd */
    uint32_t target_fd;       /* or target_ifindex */
    uint32_t attach_type;
    uint32_t flags;
    uint32_t relative_fd;     /* tcx.relative_fd */
    uint32_t _pad0;
    uint64_t expected_revision;
};

struct link_detach_attr {
    uint32_t link_fd;
};

struct bpf_map_info {
    uint32_t type;
    uint32_t id;
    uint32_t key_size;
    uint32_t value_size;
    uint32_t max_entries;
    uint32_t map_flags;
    char     name[16];
    uint32_t ifindex;
    uint32_t btf_vmlinux_value_type_id;
    uint64_t netns_dev;
    uint64_t netns_ino;
    uint32_t btf_id;
    uint32_t btf_key_type_id;
    uint32_t btf_value_type_id;
    uint32_t btf_vmlinux_id;
    uint64_t map_extra;
};

struct bpf_prog_info {
    uint32_t type;
    uint32_t id;
    uint8_t  tag[8];
    uint32_t jited_prog_len;
    uint32_t xlated_prog_len;
    uint64_t jited_prog_insns;
    uint64_t xlated_prog_insns;
    uint64_t load_time;
    uint32_t created_by_uid;
    uint32_t nr_map_ids;
    uint64_t map_ids;
    char     name[16];
};

struct bpf_link_info {
    uint32_t type;
    uint32_t id;
    uint32_t prog_id;
    uint32_t _pad0;
    uint32_t target0;   /* xdp.ifindex, tcx.ifindex, sockmap.map_id */
    uint32_t target1;   /* tcx.attach_type, sockmap.attach_type */
};
"""


class _Lib(Protocol):
    """Typed face of the dlopen'ed C library (only what the loader calls)."""

    def syscall(self, number: int, cmd: int, attr: Any, size: int) -> int: ...

    def mount(self, source: bytes, target: bytes, fstype: bytes, flags: int, data: Any) -> int: ...


ffi = cffi.FFI()
ffi.cdef(CDEF)
lib = cast(_Lib, ffi.dlopen(None))
