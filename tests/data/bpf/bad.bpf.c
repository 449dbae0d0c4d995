/* A program the verifier must reject: it reads packet data without checking data_end. */
#include "common.h"

SEC("xdp")
int bad_prog(struct xdp_md *ctx)
{
	unsigned char *data = (unsigned char *)(long)ctx->data;

	return data[0] == 0x42 ? 1 : 2; /* BAD: no bounds check */
}

char _license[] SEC("license") = "Dual MIT/GPL";
