/* The DNS cache shared by every proxy process on a host: a pinned LRU hash of resolved names,
 * and a pinned array of host-wide counters with the tiny program that adds to them.
 *
 * No program reads the cache: userspace writes and reads it with bpf() syscalls. The object
 * exists so that the layout is described by BTF (bpftool map dump shows names and addresses,
 * and a test checks trio_sni/sansio/dns_record.py against it), and for the counting program.
 *
 * Maps (both pinned by name in the configured directory, ebpf.dns_cache.pin_path):
 *   dns_cache        LRU_HASH struct dns_key -> struct dns_value
 *   dns_cache_stats  ARRAY of u64, indexed by enum dns_stat
 *
 * Why a program: the kernel does not count LRU evictions, so userspace derives them as
 * inserts - deletes - entries, which needs inserts and deletes counted host-wide, by many
 * processes at once. Userspace cannot add to a map value atomically; this program can
 * (BPF_ATOMIC add), and BPF_PROG_TEST_RUN runs it on demand with the request as packet data.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

/* A name in presentation form (lower-case A-labels, no trailing dot: at most 253 bytes),
 * NUL-padded: the key is the name itself, so a lookup needs no collision handling. */
#define DNS_NAME_SIZE 256
/* Addresses kept per family: enough for the connector's attempts, and bounds the value. */
#define DNS_MAX_V6 8
#define DNS_MAX_V4 8

struct dns_key {
	char name[DNS_NAME_SIZE];
};

struct dns_value {
	__u64 expires_ns;	/* CLOCK_BOOTTIME: shared by all processes, kept across restarts */
	__u8 families;		/* bit 0: IPv4 was asked for, bit 1: IPv6 */
	__u8 n_v6;
	__u8 n_v4;
	__u8 pad[5];
	__u8 v6[DNS_MAX_V6][16];
	__u8 v4[DNS_MAX_V4][4];
};

/* The layout word (DNS_STAT_LAYOUT) holds the layout version that wrote the maps; the other
 * slots are counters. */
enum dns_stat {
	DNS_STAT_LAYOUT,
	DNS_STAT_INSERTS,	/* new names written (not refreshes of a name already there) */
	DNS_STAT_DELETES,	/* names removed by userspace (undecodable entries) */
	DNS_STAT_MAX,
};

struct stat_add {
	__u32 index;
	__u32 pad;
	__s64 delta;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 10000);
	__type(key, struct dns_key);
	__type(value, struct dns_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} dns_cache SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, DNS_STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} dns_cache_stats SEC(".maps");

/* Add stat_add.delta to counter stat_add.index; returns 1 if it did. */
SEC("socket")
int dns_stat_add(struct __sk_buff *skb)
{
	struct stat_add req;
	__u64 *value;

	if (bpf_skb_load_bytes(skb, 0, &req, sizeof(req)))
		return 0;
	if (req.index == DNS_STAT_LAYOUT)
		return 0; /* written once, by whoever creates the maps */
	value = bpf_map_lookup_elem(&dns_cache_stats, &req.index);
	if (!value)
		return 0;
	__sync_fetch_and_add(value, req.delta);
	return 1;
}

char LICENSE[] SEC("license") = "GPL";
