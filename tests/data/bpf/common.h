/* Shared includes for the loader's test objects (not product code). */
#pragma once
#include <linux/types.h>
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

/* TCX verdicts; Debian 12's linux-libc-dev (6.1) predates enum tcx_action_base. */
#define TCX_NEXT (-1)
#define TCX_PASS 0
#define TCX_DROP 2
/* TC_ACT_* from linux/pkt_cls.h, kept here so the objects need fewer headers. */
#define TC_ACT_OK 0
#define TC_ACT_SHOT 2
