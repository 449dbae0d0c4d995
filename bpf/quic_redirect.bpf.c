/* The kernel data plane for QUIC (UDP) flows: every datagram a registered socket receives is
 * redirected to the egress of its peer socket (sk_skb verdict on a sockhash), so the peer
 * sends it as if by send(): one datagram in, one datagram out, to the peer's connected address.
 *
 * A flow is two connected UDP sockets (docs/kernel-facts.md, facts 50 and 52): the client-facing
 * one, bound to the listener's address and port with SO_REUSEPORT and connected to the client
 * (the kernel's UDP lookup then gives it that client's datagrams instead of the listener's
 * socket), and the upstream one, connected to the target. Egress needs a destination, so only
 * connected sockets can be redirect targets.
 *
 * Maps (keys are socket cookies, docs/kernel-facts.md, fact 5):
 *   quic_socks    SOCKHASH cookie -> socket; the verdict program is attached to this one
 *   quic_targets  SOCKHASH cookie -> socket; redirect targets, no program attached
 *   quic_peer     HASH     cookie -> cookie of the socket its datagrams are redirected to
 *   quic_counts   HASH     cookie -> struct quic_count (datagrams and bytes this socket
 *                          received and redirected)
 *   counters      PERCPU_ARRAY of u64, indexed by enum quic_counter
 *
 * Verdicts (docs/kernel-facts.md, fact 52):
 *   len == 0          SK_DROP   the egress path sends nothing for an empty skb and then stops
 *                               the peer's psock with EPIPE (as for TCP's "bare FIN"); QUIC
 *                               never sends an empty datagram.
 *   no peer entry     SK_DROP   never while registered (see the order below).
 *   payload not made  SK_DROP   bpf_skb_pull_data failed (no memory).
 *   linear
 *   redirect fails    SK_DROP   the peer left quic_targets (closed): the flow is ending.
 *   otherwise         redirect  bpf_sk_redirect_hash(skb, &quic_targets, &peer, 0) (egress).
 *
 * Never SK_PASS: unlike TCP's (fact 8), a passed datagram is not kept as one. It goes to the
 * psock's ingress_msg queue, where recvmsg (udp_bpf_recvmsg -> sk_msg_recvmsg) reads it as a
 * byte stream: two passed datagrams come back from one recv() as one, without the sender's
 * address, an empty one fails recv() with EFAULT, and whatever is unread is discarded when the
 * socket leaves the maps. A drop is what UDP promises anyway; QUIC retransmits.
 *
 * Why two sockhashes (as in sockhash.bpf.c): the two sockets of a flow cannot be inserted at
 * once. Python puts both into quic_targets (no program: their receive path is unchanged) and
 * writes both quic_peer entries before inserting either into quic_socks, so every datagram the
 * program sees has a redirect target. Datagrams queued before the insert stay in the socket's
 * own receive queue (recv() gets them whole: nothing is ever passed to the psock queue); each
 * later arrival makes the kernel run the verdict on the oldest queued one (udp_read_skb takes
 * one skb per wake-up), so Python reads and relays what is queued after registering.
 *
 * UDP delivers to a socket from several CPUs at once without the socket lock (the verdict runs
 * from sk_data_ready), so quic_counts is updated with atomic adds.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

/* What one socket received and redirected to its peer, key = socket cookie, in quic_counts.
 * Created zeroed by Python at registration, then written only by the verdict program. */
struct quic_count {
	__u64 datagrams; /* datagrams redirected to the peer */
	__u64 bytes;     /* their payload bytes (UDP payload: the header is pulled already) */
};

/* Indices into the per-CPU `counters` array (u64 each). */
enum quic_counter {
	QCNT_REDIRECTED = 0,        /* datagrams redirected */
	QCNT_REDIRECTED_BYTES = 1,  /* their payload bytes */
	QCNT_REDIRECT_FAILURES = 2, /* the peer is not in quic_targets: dropped */
	QCNT_NO_PEER = 3,           /* no peer entry: dropped */
	QCNT_EMPTY = 4,             /* empty datagrams: dropped */
	QCNT_PULL_FAILURES = 5,     /* could not make the payload linear: dropped */
	QCNT_MAX = 6,
};

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, __u64);
} quic_socks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, __u64);
} quic_targets SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC); /* memory as used: docs/kernel-facts.md, fact 53 */
	__type(key, __u64);
	__type(value, __u64);
} quic_peer SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC); /* memory as used: docs/kernel-facts.md, fact 53 */
	__type(key, __u64);
	__type(value, struct quic_count);
} quic_counts SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, QCNT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} counters SEC(".maps");

static __always_inline void count(__u32 index, __u64 n)
{
	__u64 *value = bpf_map_lookup_elem(&counters, &index);

	if (value)
		*value += n; /* per-CPU: no other writer */
}

SEC("sk_skb/verdict")
int quic_verdict(struct __sk_buff *skb)
{
	struct quic_count *counts;
	__u64 cookie, *peer, len = skb->len; /* the UDP payload: the header is pulled already */
	int verdict;

	if (len == 0) {
		count(QCNT_EMPTY, 1);
		return SK_DROP;
	}
	cookie = bpf_get_socket_cookie(skb);
	peer = bpf_map_lookup_elem(&quic_peer, &cookie);
	if (!peer) {
		count(QCNT_NO_PEER, 1);
		return SK_DROP;
	}
	/* One datagram must leave as one: the egress path sends the linear part and each page
	 * fragment with a sendmsg of its own (__skb_send_sock), a datagram each for UDP. Received
	 * skbs can be paged (a GSO burst segmented on receive; NIC drivers), so make the payload
	 * linear first; a no-op for a linear skb. */
	if (bpf_skb_pull_data(skb, len) != 0) {
		count(QCNT_PULL_FAILURES, 1);
		return SK_DROP;
	}
	verdict = bpf_sk_redirect_hash(skb, &quic_targets, peer, 0);
	if (verdict != SK_PASS) {
		count(QCNT_REDIRECT_FAILURES, 1);
		return SK_DROP;
	}
	counts = bpf_map_lookup_elem(&quic_counts, &cookie);
	if (counts) {
		__sync_fetch_and_add(&counts->datagrams, 1);
		__sync_fetch_and_add(&counts->bytes, len);
	}
	count(QCNT_REDIRECTED, 1);
	count(QCNT_REDIRECTED_BYTES, len);
	return verdict;
}

char _license[] SEC("license") = "GPL";
