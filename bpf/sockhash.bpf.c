/* The kernel data plane: every byte received on a registered socket is redirected to the
 * egress of its peer (sk_skb stream verdict on a sockhash), with a per-socket in-flight bound.
 *
 * Maps (keys are socket cookies):
 *   sock_hash  SOCKHASH cookie -> socket; the verdict program is attached to this one
 *   targets    SOCKHASH cookie -> socket; redirect targets, no program attached
 *   peer       HASH     cookie -> struct peer_info (peer cookie, limit, direction)
 *   progress   HASH     cookie -> struct progress (bytes redirected, stopped flag)
 *   counters   PERCPU_ARRAY of u64, indexed by enum counter
 *   stops      RINGBUF  the cookie of every socket the program stops (wakes Python's epoll)
 *
 * Verdicts (docs/kernel-facts.md, facts 1 and 8, and "bare FIN"):
 *   len == 0          SK_DROP   a bare FIN arrives as a 0-byte skb; redirecting it makes the
 *                               peer's backlog fail with EPIPE and disables its TX.
 *   no peer entry     SK_PASS   the bytes are acknowledged already: never drop them; they go to
 *                               the socket's own queue, where only recvmsg reads them.
 *   stopped, or over  SK_PASS   backpressure: queued on this socket (charged to its receive
 *   the bound                   buffer, so TCP's window closes); Python moves the direction to
 *                               userspace once everything redirected before has been sent.
 *   otherwise         redirect  bpf_sk_redirect_hash(skb, &targets, &peer, 0) (egress).
 *
 * Why two sockhashes: the two sockets of a connection cannot be inserted at once. Python puts
 * both into `targets` (no program: their receive path is unchanged) and writes both `peer`
 * entries before inserting either into `sock_hash`, so every skb the verdict program sees
 * already has a redirect target; bytes that arrive earlier wait in the socket's receive queue
 * until the "kick" (recv(MSG_DONTWAIT)). With one map, a skb arriving between the first insert
 * and the second would find no target and be stranded in the wrong queue.
 *
 * The in-flight bound is kept here, per skb, with no help from Python: the bytes this socket
 * redirected minus what the peer has taken into its send queue (the growth of the peer's
 * tcp_sock write_seq since the first verdict: only redirected bytes are written to the peer
 * while this socket is spliced) is what the peer's psock holds for it; over `bound`, stop.
 * write_seq is read through bpf_skc_to_tcp_sock with a CO-RE relocation (the kernel applies
 * it at load time), which needs CAP_PERFMON. A stop is announced in the `stops` ring buffer,
 * whose fd Python watches with epoll: no polling while nothing stops.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "shared.h"

/* The one kernel field the program reads; its offset comes from the kernel's BTF at load. */
struct tcp_sock {
	__u32 write_seq; /* sequence number after the last byte queued to send */
} __attribute__((preserve_access_index));

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, __u64);
} sock_hash SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, __u64);
} targets SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC); /* memory as used: docs/kernel-facts.md, fact 53 */
	__type(key, __u64);
	__type(value, struct peer_info);
} peer SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC); /* memory as used: docs/kernel-facts.md, fact 53 */
	__type(key, __u64);
	__type(value, struct progress);
} progress SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, STOPS_RING_SIZE);
} stops SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, CNT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} counters SEC(".maps");

static __always_inline void count(__u32 index, __u64 n)
{
	__u64 *value = bpf_map_lookup_elem(&counters, &index);

	if (value)
		*value += n; /* per-CPU: no other writer */
}

/* The peer's write_seq (a racy read without its lock: enough for a bound); 0 if it is gone. */
static __always_inline int peer_write_seq(__u64 *peer, __u32 *seq)
{
	struct bpf_sock *sk = bpf_map_lookup_elem(&targets, peer);
	struct tcp_sock *tp;
	int found = 0;

	if (!sk)
		return 0;
	tp = bpf_skc_to_tcp_sock(sk);
	if (tp) {
		*seq = tp->write_seq;
		found = 1;
	}
	bpf_sk_release(sk);
	return found;
}

SEC("sk_skb/stream_verdict")
int stream_verdict(struct __sk_buff *skb)
{
	struct peer_info *info;
	struct progress *prog;
	__u64 cookie, len = skb->len;
	__u32 seq, in_flight;
	int verdict;

	if (len == 0) {
		count(CNT_ZERO_LENGTH, 1);
		return SK_DROP;
	}
	cookie = bpf_get_socket_cookie(skb);
	info = bpf_map_lookup_elem(&peer, &cookie);
	if (!info) {
		count(CNT_PEER_MISSES, 1);
		return SK_PASS;
	}
	prog = bpf_map_lookup_elem(&progress, &cookie);
	if (prog) {
		/* The verdict for one socket runs under that socket's lock, so these plain
		 * read-modify-writes are not concurrent with each other; Python only reads. */
		if (prog->stopped) {
			count(CNT_PASSED_BYTES, len);
			return SK_PASS;
		}
		if (peer_write_seq(&info->peer, &seq)) {
			if (!prog->started) {
				prog->peer_seq0 = seq;
				prog->started = 1;
			}
			/* Modulo 2^32, like sequence numbers: in flight is far below 4 GiB. */
			in_flight = (__u32)prog->redirected - (seq - prog->peer_seq0);
			if (in_flight + len > info->bound) {
				prog->stopped = 1;
				/* If the ring is full, Python's sweep still finds the stopped flag. */
				bpf_ringbuf_output(&stops, &cookie, sizeof(cookie), 0);
				count(CNT_BUDGET_STOPS, 1);
				count(CNT_PASSED_BYTES, len);
				return SK_PASS;
			}
		}
	}
	verdict = bpf_sk_redirect_hash(skb, &targets, &info->peer, 0);
	if (verdict != SK_PASS) {
		/* The peer left the sockhash (closing): keep the bytes on this socket rather than
		 * drop acknowledged data. */
		count(CNT_REDIRECT_FAILURES, 1);
		return SK_PASS;
	}
	if (prog)
		prog->redirected += len;
	if (info->direction == DIR_TO_CLIENT) {
		count(CNT_BYTES_TO_CLIENT, len);
		count(CNT_SKBS_TO_CLIENT, 1);
	} else {
		count(CNT_BYTES_TO_UPSTREAM, len);
		count(CNT_SKBS_TO_UPSTREAM, 1);
	}
	return verdict;
}

char _license[] SEC("license") = "GPL";
