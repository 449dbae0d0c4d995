/* XDP edge guard for the proxy's listening ports: client address lists, a SYN flood guard and
 * an optional fast rejection of QUIC, before the packet costs the TCP stack anything.
 *
 * Maps (all written by Python, except the state the program keeps itself):
 *   allow_v4, allow_v6  LPM_TRIE {prefixlen, address} -> u8   clients.allow
 *   deny_v4, deny_v6    LPM_TRIE {prefixlen, address} -> u8   clients.deny
 *   ports               HASH u16 port (host order) -> u8      the listening ports: PORT_TCP for a
 *                                                             TCP listener, PORT_QUIC for a QUIC
 *                                                             (UDP) listener, or both
 *   config              ARRAY[1] struct guard_config          switches and SYN limits
 *   syn_sources         LRU_HASH 16-byte source -> struct syn_source (the program's own)
 *   syn_global          ARRAY[1] u64                          the global SYN bucket (the program's)
 *   counters            PERCPU_ARRAY u64, indexed by enum xdp_counter
 *
 * Decisions, in order (userspace policy semantics: deny wins, an empty allow list allows all;
 * IPv4 sources are looked up in the v4 tries, IPv4-mapped config entries are stored there too):
 *   not IPv4/IPv6 (ARP, ...)      PASS
 *   not TCP/UDP (ICMP, NDP, ...)  PASS
 *   TCP to a guarded port         deny list -> DROP denied; allow list active and no match ->
 *                                 DROP not_allowed; a SYN (no ACK) over the source's bucket ->
 *                                 DROP syn_flood, over the global bucket -> DROP syn_flood_global;
 *                                 else PASS
 *   UDP to a QUIC listener's port same address lists; else PASS (the proxy routes it)
 *   UDP to 443 or a guarded port, same address lists; then an ICMP/ICMPv6 port unreachable
 *   with reject_quic on           sent back with XDP_TX (docs/kernel-facts.md, fact 39: browsers
 *                                 fall back to TCP at once), or DROP quic if no answer can be built
 *                                 (VLAN tag, IPv4 options, IPv6 extension headers, multicast)
 *   TCP/UDP whose port cannot be  address lists only (a non-first fragment, a first fragment too
 *   read                          short for the TCP header, more IPv6 extension headers than we
 *                                 walk): otherwise a blocked client could slip a SYN through
 *   anything else                 PASS
 *
 * SYN buckets are GCRA ("virtual scheduling"): one u64 per bucket, the theoretical arrival time
 * (TAT), moved forward with a compare-and-swap, so CPUs racing on one source never admit more
 * than the limit (a lost race re-reads; after a few lost races the SYN is admitted rather than
 * spinning). A SYN at `now` is admitted when max(TAT, now) + interval - now <= burst, where
 * interval = 1 s / rate and burst = interval * burst_count.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define GUARD_ALLOW_LIST 1u  /* clients.allow is not empty: unlisted sources are refused */
#define GUARD_REJECT_QUIC 2u /* answer UDP to 443/guarded ports with port unreachable */

#define PORT_TCP 1u  /* a TCP listener's port (ports map value bits) */
#define PORT_QUIC 2u /* a QUIC listener's port: its UDP is the proxy's, never rejected */

#define QUIC_PORT 443
#define MAX_VLAN_TAGS 2
#define MAX_IPV6_EXT 6        /* extension headers walked before the port counts as unknown */
#define MAX_L4_OFFSET 512     /* bounds the walk for the verifier; real headers end far earlier */
#define GCRA_ATTEMPTS 4       /* compare-and-swap retries before a SYN is admitted anyway */
#define ICMP_TTL 64

struct lpm_v4 {
	__u32 prefixlen; /* host order */
	__u8 addr[4];    /* network order */
};

struct lpm_v6 {
	__u32 prefixlen;
	__u8 addr[16];
};

struct guard_config {
	__u32 flags;             /* GUARD_* */
	__u32 _pad;
	__u64 syn_interval_ns;   /* per source: 1 s / rate; 0 = no per-source limit */
	__u64 syn_burst_ns;      /* per source: interval * burst */
	__u64 global_interval_ns; /* all sources together; 0 = no global limit */
	__u64 global_burst_ns;
};

struct syn_source {
	__u64 tat;     /* GCRA theoretical arrival time, bpf_ktime_get_ns() clock */
	__u64 dropped; /* SYNs dropped from this source while its entry lived */
};

enum xdp_counter {
	XDP_CNT_PASSED = 0,
	XDP_CNT_NOT_ALLOWED = 1,
	XDP_CNT_DENIED = 2,
	XDP_CNT_SYN_FLOOD = 3,
	XDP_CNT_SYN_FLOOD_GLOBAL = 4,
	XDP_CNT_QUIC = 5,
	XDP_CNT_QUIC_ANSWERED = 6, /* of the QUIC drops: answered with port unreachable */
	XDP_CNT_SYN_OFFENDERS = 7, /* source entries that went over their SYN limit */
	XDP_CNT_ABORTED = 8,
	XDP_CNT_MAX = 9,
};

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct lpm_v4);
	__type(value, __u8);
} allow_v4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct lpm_v6);
	__type(value, __u8);
} allow_v6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct lpm_v4);
	__type(value, __u8);
} deny_v4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct lpm_v6);
	__type(value, __u8);
} deny_v6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, __u16);
	__type(value, __u8);
} ports SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct guard_config);
} config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct in6_addr);
	__type(value, struct syn_source);
} syn_sources SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} syn_global SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, XDP_CNT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} counters SEC(".maps");

/* What the parser found out about a packet. */
struct packet {
	struct in6_addr src; /* IPv4 as ::ffff:a.b.c.d (the syn_sources key) */
	__u32 l3_off;
	__u32 l4_off;
	__u16 dport;
	__u8 v6;
	__u8 l4;          /* IPPROTO_TCP, IPPROTO_UDP or 0 (neither, or not known) */
	__u8 port_known;  /* dport (and for TCP the flags) could be read */
	__u8 syn;         /* TCP SYN without ACK */
	__u8 plain;       /* no VLAN tag, no IPv4 options, no IPv6 extension headers */
};

static __always_inline int count(__u32 counter, int action)
{
	__u64 *value = bpf_map_lookup_elem(&counters, &counter);

	if (value)
		*value += 1;
	return action;
}

/* DENIED, NOT_ALLOWED, or -1 when the source may talk to the guarded ports. */
static __always_inline int address_verdict(const struct packet *p, __u32 flags)
{
	void *denied, *allowed;

	if (p->v6) {
		struct lpm_v6 key = {.prefixlen = 128};

		__builtin_memcpy(key.addr, &p->src, 16);
		denied = bpf_map_lookup_elem(&deny_v6, &key);
		allowed = (flags & GUARD_ALLOW_LIST) ? bpf_map_lookup_elem(&allow_v6, &key) : &key;
	} else {
		struct lpm_v4 key = {.prefixlen = 32};

		__builtin_memcpy(key.addr, &p->src.s6_addr[12], 4);
		denied = bpf_map_lookup_elem(&deny_v4, &key);
		allowed = (flags & GUARD_ALLOW_LIST) ? bpf_map_lookup_elem(&allow_v4, &key) : &key;
	}
	if (denied)
		return XDP_CNT_DENIED;
	if (!allowed)
		return XDP_CNT_NOT_ALLOWED;
	return -1;
}

/* GCRA admission on one bucket (see the header comment). */
static __always_inline int admit(__u64 *tat, __u64 now, __u64 interval, __u64 burst)
{
	for (int i = 0; i < GCRA_ATTEMPTS; i++) {
		__u64 old = *(volatile __u64 *)tat;
		__u64 start = old > now ? old : now;

		if (start + interval - now > burst)
			return 0;
		if (__sync_val_compare_and_swap(tat, old, start + interval) == old)
			return 1;
	}
	return 1;
}

/* SYN_FLOOD, SYN_FLOOD_GLOBAL, or -1 when the SYN may pass. */
static __always_inline int syn_verdict(const struct packet *p, const struct guard_config *cfg)
{
	__u64 now = bpf_ktime_get_ns();

	if (cfg->syn_interval_ns) {
		struct syn_source *src = bpf_map_lookup_elem(&syn_sources, &p->src);

		if (!src) {
			struct syn_source fresh = {};

			bpf_map_update_elem(&syn_sources, &p->src, &fresh, BPF_NOEXIST);
			src = bpf_map_lookup_elem(&syn_sources, &p->src);
		}
		if (src && !admit(&src->tat, now, cfg->syn_interval_ns, cfg->syn_burst_ns)) {
			if (__sync_fetch_and_add(&src->dropped, 1) == 0)
				count(XDP_CNT_SYN_OFFENDERS, 0);
			return XDP_CNT_SYN_FLOOD;
		}
	}
	if (cfg->global_interval_ns) {
		__u32 zero = 0;
		__u64 *tat = bpf_map_lookup_elem(&syn_global, &zero);

		if (tat && !admit(tat, now, cfg->global_interval_ns, cfg->global_burst_ns))
			return XDP_CNT_SYN_FLOOD_GLOBAL;
	}
	return -1;
}

/* Reads the TCP or UDP header at p->l4_off, if the whole header is there. */
static __always_inline void parse_l4(struct xdp_md *ctx, struct packet *p)
{
	void *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;
	__u32 off = p->l4_off;

	if (off > MAX_L4_OFFSET)
		return;
	if (p->l4 == IPPROTO_TCP) {
		struct tcphdr *tcp = data + off;

		if ((void *)(tcp + 1) > end)
			return;
		p->dport = bpf_ntohs(tcp->dest);
		p->syn = tcp->syn && !tcp->ack;
		p->port_known = 1;
	} else if (p->l4 == IPPROTO_UDP) {
		struct udphdr *udp = data + off;

		if ((void *)(udp + 1) > end)
			return;
		p->dport = bpf_ntohs(udp->dest);
		p->port_known = 1;
	}
}

/* 0 when there is no IP header we can read (the stack will drop the packet anyway). */
static __always_inline int parse_ipv4(struct xdp_md *ctx, struct packet *p)
{
	void *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;
	struct iphdr *ip = data + p->l3_off;

	if ((void *)(ip + 1) > end || ip->ihl < 5)
		return 0;
	p->src.s6_addr16[5] = 0xffff;
	p->src.s6_addr32[3] = ip->saddr;
	p->l4_off = p->l3_off + ip->ihl * 4;
	p->plain = p->plain && ip->ihl == 5;
	if (ip->protocol != IPPROTO_TCP && ip->protocol != IPPROTO_UDP)
		return 1;
	p->l4 = ip->protocol;
	if (bpf_ntohs(ip->frag_off) & 0x1fff) /* not the first fragment: no port */
		return 1;
	parse_l4(ctx, p);
	return 1;
}

static __always_inline int parse_ipv6(struct xdp_md *ctx, struct packet *p)
{
	void *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;
	struct ipv6hdr *ip6 = data + p->l3_off;
	__u8 next;
	__u32 off;

	if ((void *)(ip6 + 1) > end)
		return 0;
	p->v6 = 1;
	p->src = ip6->saddr;
	next = ip6->nexthdr;
	off = p->l3_off + sizeof(*ip6);
	for (int i = 0; i < MAX_IPV6_EXT; i++) {
		__u8 *ext;

		if (next == IPPROTO_TCP || next == IPPROTO_UDP)
			break;
		if (next != IPPROTO_HOPOPTS && next != IPPROTO_ROUTING && next != IPPROTO_DSTOPTS &&
		    next != IPPROTO_FRAGMENT && next != IPPROTO_AH)
			return 1; /* ICMPv6 (neighbour discovery), ESP, no next header, ... */
		p->plain = 0;
		if (off > MAX_L4_OFFSET)
			goto unknown;
		ext = data + off;
		if ((void *)(ext + 8) > end)
			goto unknown;
		if (next == IPPROTO_FRAGMENT) {
			if (bpf_ntohs(*(__be16 *)(ext + 2)) & 0xfff8) {
				p->l4 = ext[0] == IPPROTO_TCP || ext[0] == IPPROTO_UDP ? ext[0] : 0;
				return 1; /* not the first fragment: no port */
			}
			off += 8;
		} else if (next == IPPROTO_AH) {
			off += (ext[1] + 2) * 4;
		} else {
			off += (ext[1] + 1) * 8;
		}
		next = ext[0];
	}
	if (next != IPPROTO_TCP && next != IPPROTO_UDP)
		goto unknown;
	p->l4 = next;
	p->l4_off = off;
	parse_l4(ctx, p);
	return 1;
unknown:
	p->l4 = IPPROTO_TCP; /* maybe for a guarded port: the address lists apply */
	return 1;
}

static __always_inline __u32 fold(__u32 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return ~sum & 0xffff;
}

static __always_inline __u32 add16(__u32 sum, const void *buf, int len)
{
	const __u16 *w = buf;

	for (int i = 0; i < len / 2; i++)
		sum += w[i];
	return sum;
}

/* The answer to a refused QUIC packet, on the stack first so its checksums are easy. */
struct icmp4_answer {
	struct ethhdr eth;
	struct iphdr ip;
	__u8 icmp[8];
	__u8 quote[sizeof(struct iphdr) + sizeof(struct udphdr)];
} __attribute__((packed));

struct icmp6_answer {
	struct ethhdr eth;
	struct ipv6hdr ip6;
	__u8 icmp[8];
	__u8 quote[sizeof(struct ipv6hdr) + sizeof(struct udphdr)];
} __attribute__((packed));

/* Replaces the packet by `answer` (`size` bytes): room in front, then the tail cut off. */
static __always_inline int rewrite(struct xdp_md *ctx, const void *answer, int size)
{
	void *data, *end;
	int len = ctx->data_end - ctx->data;

	if (size > len && bpf_xdp_adjust_head(ctx, len - size))
		return 0;
	if (size < len && bpf_xdp_adjust_tail(ctx, size - len))
		return 0;
	data = (void *)(long)ctx->data;
	end = (void *)(long)ctx->data_end;
	if (data + size > end)
		return 0;
	__builtin_memcpy(data, answer, size);
	return 1;
}

static __always_inline int answer_ipv4(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = data + sizeof(*eth);
	struct icmp4_answer a = {};
	__u32 sum;

	if (data + sizeof(*eth) + sizeof(a.quote) > end)
		return 0;
	if ((eth->h_dest[0] & 1) || (bpf_ntohl(ip->saddr) >> 28) >= 14 || ip->saddr == 0)
		return 0; /* never answer multicast or broadcast (RFC 1122 3.2.2) */
	__builtin_memcpy(a.eth.h_dest, eth->h_source, ETH_ALEN);
	__builtin_memcpy(a.eth.h_source, eth->h_dest, ETH_ALEN);
	a.eth.h_proto = bpf_htons(ETH_P_IP);
	a.ip.version = 4;
	a.ip.ihl = 5;
	a.ip.tot_len = bpf_htons(sizeof(a) - sizeof(a.eth));
	a.ip.ttl = ICMP_TTL;
	a.ip.protocol = IPPROTO_ICMP;
	a.ip.saddr = ip->daddr;
	a.ip.daddr = ip->saddr;
	a.ip.check = fold(add16(0, &a.ip, sizeof(a.ip)));
	a.icmp[0] = 3; /* destination unreachable */
	a.icmp[1] = 3; /* port unreachable */
	__builtin_memcpy(a.quote, ip, sizeof(a.quote));
	sum = add16(0, a.icmp, sizeof(a.icmp) + sizeof(a.quote));
	*(__u16 *)&a.icmp[2] = fold(sum);
	return rewrite(ctx, &a, sizeof(a));
}

static __always_inline int answer_ipv6(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct ipv6hdr *ip6 = data + sizeof(*eth);
	struct icmp6_answer a = {};
	__u32 sum;

	if (data + sizeof(*eth) + sizeof(a.quote) > end)
		return 0;
	if ((eth->h_dest[0] & 1) || ip6->saddr.s6_addr[0] == 0xff)
		return 0; /* never answer multicast (RFC 4443 2.4 (e)) */
	__builtin_memcpy(a.eth.h_dest, eth->h_source, ETH_ALEN);
	__builtin_memcpy(a.eth.h_source, eth->h_dest, ETH_ALEN);
	a.eth.h_proto = bpf_htons(ETH_P_IPV6);
	a.ip6.version = 6;
	a.ip6.payload_len = bpf_htons(sizeof(a.icmp) + sizeof(a.quote));
	a.ip6.nexthdr = IPPROTO_ICMPV6;
	a.ip6.hop_limit = ICMP_TTL;
	a.ip6.saddr = ip6->daddr;
	a.ip6.daddr = ip6->saddr;
	a.icmp[0] = 1; /* destination unreachable */
	a.icmp[1] = 4; /* port unreachable */
	__builtin_memcpy(a.quote, ip6, sizeof(a.quote));
	/* pseudo-header: addresses, upper-layer length, next header */
	sum = add16(0, &a.ip6.saddr, 32);
	sum += bpf_htons(sizeof(a.icmp) + sizeof(a.quote)) + bpf_htons(IPPROTO_ICMPV6);
	sum = add16(sum, a.icmp, sizeof(a.icmp) + sizeof(a.quote));
	*(__u16 *)&a.icmp[2] = fold(sum);
	return rewrite(ctx, &a, sizeof(a));
}

SEC("xdp")
int xdp_guard(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct packet p = {};
	struct guard_config *cfg;
	__u32 zero = 0;
	__u16 proto;
	__u8 kinds = 0;
	int verdict, parsed;

	if ((void *)(eth + 1) > end)
		return count(XDP_CNT_PASSED, XDP_PASS);
	proto = eth->h_proto;
	p.l3_off = sizeof(*eth);
	p.plain = 1;
	for (int i = 0; i < MAX_VLAN_TAGS; i++) {
		__be16 *tag = data + p.l3_off;

		if (proto != bpf_htons(ETH_P_8021Q) && proto != bpf_htons(ETH_P_8021AD))
			break;
		if ((void *)(tag + 2) > end)
			return count(XDP_CNT_PASSED, XDP_PASS);
		proto = tag[1];
		p.l3_off += 4;
		p.plain = 0;
	}
	if (proto == bpf_htons(ETH_P_IP))
		parsed = parse_ipv4(ctx, &p);
	else if (proto == bpf_htons(ETH_P_IPV6))
		parsed = parse_ipv6(ctx, &p);
	else
		return count(XDP_CNT_PASSED, XDP_PASS); /* ARP and the rest */
	if (!parsed || !p.l4)
		return count(XDP_CNT_PASSED, XDP_PASS);

	cfg = bpf_map_lookup_elem(&config, &zero);
	if (!cfg)
		return count(XDP_CNT_ABORTED, XDP_ABORTED);
	if (p.port_known) {
		__u8 *listening = bpf_map_lookup_elem(&ports, &p.dport);

		kinds = listening ? *listening : 0;
		if (p.l4 == IPPROTO_TCP && !(kinds & PORT_TCP))
			return count(XDP_CNT_PASSED, XDP_PASS);
		if (p.l4 == IPPROTO_UDP && !(kinds & PORT_QUIC) &&
		    !((cfg->flags & GUARD_REJECT_QUIC) && (kinds || p.dport == QUIC_PORT)))
			return count(XDP_CNT_PASSED, XDP_PASS);
	}
	verdict = address_verdict(&p, cfg->flags);
	if (verdict >= 0)
		return count(verdict, XDP_DROP);
	if (!p.port_known || (p.l4 == IPPROTO_UDP && (kinds & PORT_QUIC)))
		return count(XDP_CNT_PASSED, XDP_PASS);
	if (p.l4 == IPPROTO_UDP) {
		count(XDP_CNT_QUIC, 0);
		if (!p.plain)
			return XDP_DROP;
		if (!(p.v6 ? answer_ipv6(ctx) : answer_ipv4(ctx)))
			return XDP_DROP;
		return count(XDP_CNT_QUIC_ANSWERED, XDP_TX);
	}
	if (p.syn) {
		verdict = syn_verdict(&p, cfg);
		if (verdict >= 0)
			return count(verdict, XDP_DROP);
	}
	return count(XDP_CNT_PASSED, XDP_PASS);
}

char LICENSE[] SEC("license") = "GPL";
