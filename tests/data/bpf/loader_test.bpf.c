/* Test object for the loader: every map kind the project uses, global data in .rodata, .data
 * and .bss, a .text subprogram called from several programs, several programs in one section,
 * and one program per section kind the loader must classify. */
#include "common.h"

struct lpm_v4_key {
	__u32 prefixlen;
	__u32 addr;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, __u32);
	__type(value, __u64);
} hash_map SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 4);
	__type(key, __u32);
	__type(value, __u64);
} counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u32);
} percpu SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 8);
	__type(key, __u32);
	__type(value, __u32);
} lru SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 16);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct lpm_v4_key);
	__type(value, __u32);
} allow SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__type(key, __u32);
	__type(value, __u32);
} pinned SEC(".maps");

const volatile __u32 xdp_verdict = 2; /* .rodata: XDP_PASS */
__u32 tc_verdict = 2;                 /* .data: TC_ACT_SHOT */
__u64 packets;                        /* .bss */

static __attribute__((noinline)) __u32 bump(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&counters, &idx);

	if (v)
		__sync_fetch_and_add(v, 1);
	packets++;
	return idx;
}

SEC("xdp")
int xdp_prog(struct xdp_md *ctx)
{
	__u32 key = 0;
	__u32 *seen = bpf_map_lookup_elem(&percpu, &key);

	if (seen)
		*seen += 1;
	bump(0);
	return xdp_verdict;
}

SEC("tc")
int tc_one(struct __sk_buff *skb)
{
	bump(1);
	return tc_verdict;
}

SEC("tc")
int tc_two(struct __sk_buff *skb)
{
	return TC_ACT_OK;
}

SEC("tcx/ingress")
int tcx_in(struct __sk_buff *skb)
{
	bump(2);
	return TCX_NEXT;
}

SEC("tcx/egress")
int tcx_out(struct __sk_buff *skb)
{
	return TCX_NEXT;
}

SEC("socket")
int sock_filter(struct __sk_buff *skb)
{
	return 0;
}

char _license[] SEC("license") = "GPL";
