/* Structs and counter indices shared by the BPF programs and Python.
 * Mirrored by trio_sni/accel/layout.py (tests/accel/test_layout.py checks it against the BTF
 * of the prebuilt objects). */
#pragma once
#include <linux/types.h>

/* Per-socket splice state, key = socket cookie, in the `peer` hash. Written by Python only,
 * at registration. */
struct peer_info {
	__u64 peer;       /* cookie of the socket this one's bytes are redirected to */
	__u64 bound;      /* most bytes redirected that the peer has not taken to send yet */
	__u32 direction;  /* DIR_TO_UPSTREAM or DIR_TO_CLIENT: which counters to bump */
	__u32 _pad;
};

/* Per-socket progress, key = socket cookie, in the `progress` hash. Created zeroed by Python,
 * then written only by the verdict program (which runs under the source socket's lock). */
struct progress {
	__u64 redirected; /* bytes redirected to the peer since registration */
	__u32 stopped;    /* 1 once over the bound: every later skb is SK_PASSed to this socket */
	__u32 started;    /* 1 once peer_seq0 is set (at the first verdict) */
	__u32 peer_seq0;  /* the peer's write_seq at the first verdict (nothing redirected yet) */
	__u32 _pad;
};

/* Bytes in the `stops` ring buffer (a power of two, whole pages): 256 records of a cookie. */
#define STOPS_RING_SIZE 4096

enum direction {
	DIR_TO_UPSTREAM = 0,
	DIR_TO_CLIENT = 1,
};

/* Indices into the per-CPU `counters` array (u64 each). */
enum counter {
	CNT_BYTES_TO_UPSTREAM = 0,
	CNT_SKBS_TO_UPSTREAM = 1,
	CNT_BYTES_TO_CLIENT = 2,
	CNT_SKBS_TO_CLIENT = 3,
	CNT_REDIRECT_FAILURES = 4,
	CNT_PEER_MISSES = 5,
	CNT_ZERO_LENGTH = 6,
	CNT_BUDGET_STOPS = 7,
	CNT_PASSED_BYTES = 8,
	CNT_MAX = 9,
};
