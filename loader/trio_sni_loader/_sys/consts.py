"""Constants from the kernel's UAPI header ``include/uapi/linux/bpf.h``.

Values follow the header of Linux 6.18 (the kernel these tests run on); every value below is
part of the stable UAPI, so older kernels use the same numbers for what they know. The
``MIN_KERNEL`` tables say in which mainline release a type first appeared; they are used only
to word error messages (features are probed, never inferred from ``uname``).
"""

from __future__ import annotations

import enum

#: Header the numbers were taken from.
UAPI_HEADER = "include/uapi/linux/bpf.h (Linux 6.18)"

#: ``BPF_OBJ_NAME_LEN``: map and program names are at most 15 bytes plus a NUL.
OBJ_NAME_LEN = 16

#: The bpf() syscall number differs per architecture.
SYS_BPF = {"x86_64": 321, "aarch64": 280, "arm64": 280, "riscv64": 280, "ppc64le": 361}


class Cmd(enum.IntEnum):
    MAP_CREATE = 0
    MAP_LOOKUP_ELEM = 1
    MAP_UPDATE_ELEM = 2
    MAP_DELETE_ELEM = 3
    MAP_GET_NEXT_KEY = 4
    PROG_LOAD = 5
    OBJ_PIN = 6
    OBJ_GET = 7
    PROG_ATTACH = 8
    PROG_DETACH = 9
    PROG_TEST_RUN = 10
    PROG_GET_NEXT_ID = 11
    MAP_GET_NEXT_ID = 12
    PROG_GET_FD_BY_ID = 13
    MAP_GET_FD_BY_ID = 14
    OBJ_GET_INFO_BY_FD = 15
    PROG_QUERY = 16
    BTF_LOAD = 18
    MAP_LOOKUP_AND_DELETE_ELEM = 21
    MAP_FREEZE = 22
    MAP_LOOKUP_BATCH = 24
    MAP_UPDATE_BATCH = 26
    MAP_DELETE_BATCH = 27
    LINK_CREATE = 28
    LINK_DETACH = 34
    PROG_BIND_MAP = 35


class MapType(enum.IntEnum):
    UNSPEC = 0
    HASH = 1
    ARRAY = 2
    PROG_ARRAY = 3
    PERF_EVENT_ARRAY = 4
    PERCPU_HASH = 5
    PERCPU_ARRAY = 6
    STACK_TRACE = 7
    CGROUP_ARRAY = 8
    LRU_HASH = 9
    LRU_PERCPU_HASH = 10
    LPM_TRIE = 11
    ARRAY_OF_MAPS = 12
    HASH_OF_MAPS = 13
    DEVMAP = 14
    SOCKMAP = 15
    CPUMAP = 16
    XSKMAP = 17
    SOCKHASH = 18
    CGROUP_STORAGE = 19
    REUSEPORT_SOCKARRAY = 20
    PERCPU_CGROUP_STORAGE = 21
    QUEUE = 22
    STACK = 23
    SK_STORAGE = 24
    DEVMAP_HASH = 25
    STRUCT_OPS = 26
    RINGBUF = 27
    INODE_STORAGE = 28
    TASK_STORAGE = 29
    BLOOM_FILTER = 30
    USER_RINGBUF = 31
    CGRP_STORAGE = 32
    ARENA = 33


MAP_TYPE_MIN_KERNEL = {
    MapType.HASH: "3.19",
    MapType.ARRAY: "3.19",
    MapType.PROG_ARRAY: "4.2",
    MapType.PERF_EVENT_ARRAY: "4.3",
    MapType.PERCPU_HASH: "4.6",
    MapType.PERCPU_ARRAY: "4.6",
    MapType.STACK_TRACE: "4.6",
    MapType.CGROUP_ARRAY: "4.8",
    MapType.LRU_HASH: "4.10",
    MapType.LRU_PERCPU_HASH: "4.10",
    MapType.LPM_TRIE: "4.11",
    MapType.ARRAY_OF_MAPS: "4.12",
    MapType.HASH_OF_MAPS: "4.12",
    MapType.DEVMAP: "4.14",
    MapType.SOCKMAP: "4.14",
    MapType.CPUMAP: "4.15",
    MapType.XSKMAP: "4.18",
    MapType.SOCKHASH: "4.18",
    MapType.CGROUP_STORAGE: "4.19",
    MapType.REUSEPORT_SOCKARRAY: "4.19",
    MapType.PERCPU_CGROUP_STORAGE: "4.20",
    MapType.QUEUE: "4.20",
    MapType.STACK: "4.20",
    MapType.SK_STORAGE: "5.2",
    MapType.DEVMAP_HASH: "5.4",
    MapType.STRUCT_OPS: "5.6",
    MapType.RINGBUF: "5.8",
    MapType.INODE_STORAGE: "5.10",
    MapType.TASK_STORAGE: "5.11",
    MapType.BLOOM_FILTER: "5.16",
    MapType.USER_RINGBUF: "6.1",
    MapType.CGRP_STORAGE: "6.2",
    MapType.ARENA: "6.9",
}

#: Map types whose userspace values are one slot per possible CPU.
PERCPU_MAP_TYPES = frozenset(
    {
        MapType.PERCPU_HASH,
        MapType.PERCPU_ARRAY,
        MapType.LRU_PERCPU_HASH,
        MapType.PERCPU_CGROUP_STORAGE,
    }
)

#: Map types that hold sockets: userspace writes fds, and the kernel rejects key/value BTF.
SOCKET_MAP_TYPES = frozenset({MapType.SOCKMAP, MapType.SOCKHASH})


class ProgType(enum.IntEnum):
    UNSPEC = 0
    SOCKET_FILTER = 1
    KPROBE = 2
    SCHED_CLS = 3
    SCHED_ACT = 4
    TRACEPOINT = 5
    XDP = 6
    PERF_EVENT = 7
    CGROUP_SKB = 8
    CGROUP_SOCK = 9
    LWT_IN = 10
    LWT_OUT = 11
    LWT_XMIT = 12
    SOCK_OPS = 13
    SK_SKB = 14
    CGROUP_DEVICE = 15
    SK_MSG = 16
    RAW_TRACEPOINT = 17
    CGROUP_SOCK_ADDR = 18
    LWT_SEG6LOCAL = 19
    LIRC_MODE2 = 20
    SK_REUSEPORT = 21
    FLOW_DISSECTOR = 22
    CGROUP_SYSCTL = 23
    RAW_TRACEPOINT_WRITABLE = 24
    CGROUP_SOCKOPT = 25
    TRACING = 26
    STRUCT_OPS = 27
    EXT = 28
    LSM = 29
    SK_LOOKUP = 30
    SYSCALL = 31
    NETFILTER = 32


PROG_TYPE_MIN_KERNEL = {
    ProgType.SOCKET_FILTER: "3.19",
    ProgType.SCHED_CLS: "4.1",
    ProgType.SCHED_ACT: "4.1",
    ProgType.XDP: "4.8",
    ProgType.SK_SKB: "4.14",
    ProgType.SK_MSG: "4.17",
}


class AttachType(enum.IntEnum):
    CGROUP_INET_INGRESS = 0
    CGROUP_INET_EGRESS = 1
    CGROUP_INET_SOCK_CREATE = 2
    CGROUP_SOCK_OPS = 3
    SK_SKB_STREAM_PARSER = 4
    SK_SKB_STREAM_VERDICT = 5
    CGROUP_DEVICE = 6
    SK_MSG_VERDICT = 7
    XDP_DEVMAP = 33
    XDP_CPUMAP = 35
    SK_LOOKUP = 36
    XDP = 37
    SK_SKB_VERDICT = 38
    TCX_INGRESS = 46
    TCX_EGRESS = 47


class LinkType(enum.IntEnum):
    UNSPEC = 0
    XDP = 6
    TCX = 11
    SOCKMAP = 14


class MapFlag(enum.IntFlag):
    NO_PREALLOC = 1 << 0
    NO_COMMON_LRU = 1 << 1
    NUMA_NODE = 1 << 2
    RDONLY = 1 << 3
    WRONLY = 1 << 4
    ZERO_SEED = 1 << 6
    RDONLY_PROG = 1 << 7
    WRONLY_PROG = 1 << 8
    MMAPABLE = 1 << 10


class UpdateFlag(enum.IntEnum):
    ANY = 0
    NOEXIST = 1
    EXIST = 2
    LOCK = 4


class XDPFlag(enum.IntFlag):
    UPDATE_IF_NOEXIST = 1 << 0
    SKB_MODE = 1 << 1
    DRV_MODE = 1 << 2
    HW_MODE = 1 << 3
    REPLACE = 1 << 4


#: ``BPF_F_XDP_HAS_FRAGS`` program flag (``SEC("xdp.frags")``).
PROG_F_XDP_HAS_FRAGS = 1 << 5

#: mprog (tcx) attach flags.
F_BEFORE = 1 << 3
F_AFTER = 1 << 4

#: TCX verdicts (``TCX_NEXT`` ... ``TCX_REDIRECT``).
TCX_NEXT = -1
TCX_PASS = 0
TCX_DROP = 2
TCX_REDIRECT = 7

#: ``src_reg`` values of ``ld_imm64`` and ``call``.
PSEUDO_MAP_FD = 1
PSEUDO_MAP_VALUE = 2
PSEUDO_FUNC = 4
PSEUDO_CALL = 1
PSEUDO_KFUNC_CALL = 2

#: XDP verdicts.
XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT = range(5)
#: TC verdicts (``TC_ACT_*``).
TC_ACT_OK = 0
TC_ACT_SHOT = 2
#: sk_skb verdicts.
SK_DROP, SK_PASS = 0, 1
