/* Test object for the loader's parity with libbpf (tests/loader/test_parity.py): what the
 * project's own objects do not use. A sockmap with a stream parser, a stream verdict and an
 * sk_msg program; per-CPU hash, LRU per-CPU hash and LPM maps; global data with a static and
 * a global subprogram; a TC policer over a per-CPU token count; an XDP program. Every section
 * name is one an older libbpf (Debian 12's bpftool) knows, so both can load it. */
#include "common.h"

struct lpm_v6_key {
	__u32 prefixlen;
	__u8 addr[16];
};

struct {
	__uint(type, BPF_MAP_TYPE_SOCKMAP);
	__uint(max_entries, 8);
	__type(key, __u32);
	__type(value, __u32);
} socks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 16);
	__type(key, __u32);
	__type(value, __u64);
} tokens SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_PERCPU_HASH);
	__uint(max_entries, 16);
	__type(key, __u32);
	__type(value, __u64);
} seen SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 8);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct lpm_v6_key);
	__type(value, __u8);
} nets SEC(".maps");

const volatile __u64 rate = 1000; /* .rodata */
__u64 policed = 1;                /* .data */
__u32 parsed;                     /* .bss */

static __attribute__((noinline)) __u64 charge(__u32 key, __u64 cost)
{
	__u64 *have = bpf_map_lookup_elem(&tokens, &key);
	if (!have || *have < cost)
		return 0;
	*have -= cost;
	return cost;
}

/* A global (non-static) subprogram: the verifier checks it on its own, from its BTF. */
__attribute__((noinline)) int over_rate(__u64 bytes)
{
	return bytes > rate;
}

SEC("sk_skb/stream_parser")
int parse(struct __sk_buff *skb)
{
	parsed++;
	return skb->len;
}

SEC("sk_skb/stream_verdict")
int verdict(struct __sk_buff *skb)
{
	return bpf_sk_redirect_map(skb, &socks, 0, 0);
}

SEC("sk_msg")
int message(struct sk_msg_md *msg)
{
	return SK_PASS;
}

SEC("tc")
int police(struct __sk_buff *skb)
{
	__u32 key = skb->ifindex;
	__u64 one = 1;
	bpf_map_update_elem(&seen, &key, &one, BPF_ANY);
	if (over_rate(skb->len) || !charge(key, skb->len)) {
		policed++;
		return TC_ACT_SHOT;
	}
	return TC_ACT_OK;
}

SEC("xdp")
int look(struct xdp_md *ctx)
{
	struct lpm_v6_key key = {.prefixlen = 128};
	return bpf_map_lookup_elem(&nets, &key) ? XDP_DROP : XDP_PASS;
}

char LICENSE[] SEC("license") = "GPL";
