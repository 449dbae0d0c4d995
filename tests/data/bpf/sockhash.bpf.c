/* Test object for sockhash splicing: sockets keyed by SO_COOKIE, a peer table, and the two
 * verdict section spellings the loader must classify. */
#include "common.h"

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 64);
	__type(key, __u64);
	__type(value, __u64);
} sock_hash SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, __u64);
	__type(value, __u64);
} peer SEC(".maps");

static __always_inline int redirect(struct __sk_buff *skb)
{
	__u64 cookie, *target;

	if (skb->len == 0) /* a bare FIN: never redirect a 0-byte skb */
		return SK_DROP;
	cookie = bpf_get_socket_cookie(skb);
	target = bpf_map_lookup_elem(&peer, &cookie);
	if (!target)
		return SK_PASS;
	return bpf_sk_redirect_hash(skb, &sock_hash, target, 0);
}

SEC("sk_skb/stream_verdict")
int stream_verdict(struct __sk_buff *skb)
{
	return redirect(skb);
}

SEC("sk_skb")
int skb_verdict(struct __sk_buff *skb)
{
	return redirect(skb);
}

char _license[] SEC("license") = "GPL";
