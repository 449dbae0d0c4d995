/* TC egress shaper: a per-client bandwidth cap per QoS class on the proxy's traffic toward its
 * clients, attached with a TCX link to the egress of the interface the clients are behind.
 *
 * Which packets: TCP over IPv4 or IPv6 whose *source* port is one of the proxy's listening
 * ports (`ports`), i.e. what the proxy sends to its clients. Everything else (the proxy's own
 * upstream connections, other programs, ARP, fragments, IPv6 with extension headers, short or
 * truncated packets) is "other": counted and passed untouched. Locally generated TCP is never
 * fragmented (DF, PMTU), so passing fragments lets nothing of the proxy's through unshaped.
 *
 * Class: the proxy sets SO_PRIORITY on a client socket after routing (the rule's `qos`); the
 * kernel copies it into every skb that socket sends, including those the sockhash redirect
 * worker sends for it. PRIO_HIGH and PRIO_BULK select those classes, anything else is normal.
 *
 * Cap: a token bucket per (client address, class) in an LRU hash, refilled at the class's
 * rate up to its burst (`rates`); a packet that finds fewer tokens than its length is dropped,
 * and TCP sends it again later (there is no `fq` qdisc to pace with EDT on the test kernel:
 * docs/kernel-facts.md, fact 19). A drop at egress is refused to the socket, not lost: TCP
 * keeps the packet and, with nothing in flight, waits for its probe timer (>= 200 ms, fact 45).
 * So a bucket must hold more than 200 ms of its rate (Python sizes it for 250 ms) and more
 * than a GSO skb (64 KiB: >= 256 KiB, "token-bucket burst"), or the flow idles below its cap.
 * A class with rate 0 is not capped. Clients in `exempt` (an LPM trie) are never capped.
 *
 * Concurrency: LRU_HASH values cannot hold a bpf_spin_lock (docs/kernel-facts.md,
 * "bpf_spin_lock in LRU maps"), so the bucket uses atomics: the CPU that wins a
 * compare-and-swap on `last_ns` adds the refill for the time it moved `last_ns` over; tokens
 * are taken with an atomic add. Two CPUs may both pass on the last tokens (the bucket then
 * goes briefly negative and repays it): at most one packet per CPU of overshoot.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

/* TCX verdicts (docs/kernel-facts.md, fact 17): NEXT lets later programs on the hook decide. */
#define TCX_NEXT (-1)
#define TCX_DROP 2

/* skb->priority values that select a class (TC_PRIO_INTERACTIVE, TC_PRIO_BULK from
 * linux/pkt_sched.h); both may be set with SO_PRIORITY without CAP_NET_ADMIN (0..6). */
#define PRIO_HIGH 6
#define PRIO_BULK 2

#define NSEC_PER_SEC 1000000000ULL

/* Indices into `counters`; the first three are also the classes indexing `rates`. */
enum tc_slot {
	SLOT_HIGH = 0,
	SLOT_NORMAL = 1,
	SLOT_BULK = 2,
	SLOT_EXEMPT = 3, /* the proxy's traffic to an exempt client */
	SLOT_OTHER = 4,  /* not the proxy's traffic to a client: passed untouched */
	SLOT_MAX = 5,
};
#define CLASS_MAX 3

struct class_rate {
	__u64 bytes_per_sec; /* 0: this class is not capped */
	__u64 burst;         /* bucket size, bytes */
	__u64 fill_ns;       /* time to fill an empty bucket: burst * 1e9 / bytes_per_sec */
};

struct bucket_key {
	__u8 addr[16]; /* the client: IPv6, or IPv4 as ::ffff:a.b.c.d */
	__u32 class;
};

struct bucket {
	__s64 tokens;  /* bytes that may pass now; briefly negative after a race */
	__u64 last_ns; /* when tokens were last refilled (bpf_ktime_get_ns) */
};

struct lpm_key {
	__u32 prefixlen; /* IPv4 prefixes are stored as ::ffff:0:0/96 + their length */
	__u8 addr[16];
};

struct tc_stats {
	__u64 passed_packets;
	__u64 passed_bytes;
	__u64 dropped_packets;
	__u64 dropped_bytes;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct bucket_key);
	__type(value, struct bucket);
} buckets SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, CLASS_MAX);
	__type(key, __u32);
	__type(value, struct class_rate);
} rates SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, __u16); /* host byte order */
	__type(value, __u8);
} ports SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 1024);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct lpm_key);
	__type(value, __u8);
} exempt SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, SLOT_MAX);
	__type(key, __u32);
	__type(value, struct tc_stats);
} counters SEC(".maps");

static __always_inline int account(__u32 slot, __u64 len, int verdict)
{
	struct tc_stats *stats = bpf_map_lookup_elem(&counters, &slot);

	if (stats) { /* per-CPU: no other writer */
		if (verdict == TCX_DROP) {
			stats->dropped_packets += 1;
			stats->dropped_bytes += len;
		} else {
			stats->passed_packets += 1;
			stats->passed_bytes += len;
		}
	}
	return verdict;
}

/* Fill `key->addr` with the destination of a TCP packet from one of `ports`; 0 if it is one. */
static __always_inline int proxy_client(struct __sk_buff *skb, struct bucket_key *key)
{
	__u16 eth_proto, sport;
	__u32 l4;

	if (bpf_skb_load_bytes(skb, 12, &eth_proto, sizeof(eth_proto)))
		return -1;
	if (eth_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr ip;

		if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)))
			return -1;
		if (ip.version != 4 || ip.ihl < 5 || ip.protocol != IPPROTO_TCP)
			return -1;
		if (ip.frag_off & bpf_htons(0x3fff)) /* MF or a fragment offset */
			return -1;
		key->addr[10] = 0xff;
		key->addr[11] = 0xff;
		__builtin_memcpy(&key->addr[12], &ip.daddr, 4);
		l4 = ETH_HLEN + ip.ihl * 4;
	} else if (eth_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr ip6;

		if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip6, sizeof(ip6)))
			return -1;
		if ((ip6.version) != 6 || ip6.nexthdr != IPPROTO_TCP)
			return -1;
		__builtin_memcpy(key->addr, &ip6.daddr, 16);
		l4 = ETH_HLEN + sizeof(ip6);
	} else {
		return -1;
	}
	if (bpf_skb_load_bytes(skb, l4, &sport, sizeof(sport)))
		return -1;
	sport = bpf_ntohs(sport);
	return bpf_map_lookup_elem(&ports, &sport) ? 0 : -1;
}

/* Take `len` tokens from the bucket; 0 if they were there. */
static __always_inline int take(struct bucket *b, const struct class_rate *rate, __u64 len)
{
	__u64 now = bpf_ktime_get_ns();
	__u64 last = b->last_ns;
	__s64 burst = rate->burst, tokens;

	if (now > last && __sync_val_compare_and_swap(&b->last_ns, last, now) == last) {
		__u64 elapsed = now - last;

		/* Capped at the time to fill the bucket, so elapsed * rate <= burst * 1e9 cannot
		 * overflow (the config keeps buckets under 2^32 bytes: 2^32 * 1e9 < 2^64). */
		if (elapsed > rate->fill_ns)
			elapsed = rate->fill_ns;
		__sync_fetch_and_add(&b->tokens, elapsed * rate->bytes_per_sec / NSEC_PER_SEC);
		tokens = b->tokens;
		if (tokens > burst)
			__sync_val_compare_and_swap(&b->tokens, tokens, burst);
	}
	if (b->tokens < (__s64)len)
		return -1;
	__sync_fetch_and_add(&b->tokens, -(__s64)len);
	return 0;
}

SEC("tcx/egress")
int tc_shaper(struct __sk_buff *skb)
{
	struct bucket_key key = {};
	struct lpm_key client = {.prefixlen = 128};
	const struct class_rate *rate;
	struct bucket *b;
	__u64 len = skb->len;
	__u32 class;

	if (proxy_client(skb, &key))
		return account(SLOT_OTHER, len, TCX_NEXT);
	__builtin_memcpy(client.addr, key.addr, 16);
	if (bpf_map_lookup_elem(&exempt, &client))
		return account(SLOT_EXEMPT, len, TCX_NEXT);

	class = skb->priority == PRIO_HIGH   ? SLOT_HIGH
		: skb->priority == PRIO_BULK ? SLOT_BULK
					     : SLOT_NORMAL;
	key.class = class;
	rate = bpf_map_lookup_elem(&rates, &class);
	if (!rate || rate->bytes_per_sec == 0)
		return account(class, len, TCX_NEXT);

	b = bpf_map_lookup_elem(&buckets, &key);
	if (!b) {
		/* A new client starts with a full bucket. */
		struct bucket fresh = {.tokens = rate->burst, .last_ns = bpf_ktime_get_ns()};

		bpf_map_update_elem(&buckets, &key, &fresh, BPF_NOEXIST);
		b = bpf_map_lookup_elem(&buckets, &key);
		if (!b) /* evicted at once under heavy churn: let this one packet pass */
			return account(class, len, TCX_NEXT);
	}
	if (take(b, rate, len))
		return account(class, len, TCX_DROP);
	return account(class, len, TCX_NEXT);
}

char _license[] SEC("license") = "GPL";
