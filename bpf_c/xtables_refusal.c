// SPDX-License-Identifier: GPL-2.0
/*
 * Refuse x_tables writes (iptables-legacy, ip6tables-legacy, arptables-legacy,
 * ebtables-legacy) in a lab's node namespaces while eBPF host routing is on.
 *
 *   refuse_xtables_write  cgroup/setsockopt, attached to the cgroup v2 root
 *
 * The legacy tools load a whole table at once with one setsockopt() on a raw
 * socket (IPT_SO_SET_REPLACE and its siblings); the x_tables code announces
 * nothing, so without this a rule could only be found by polling and removed
 * after it had taken effect. Here the write fails with EPERM before the kernel
 * sees it, for sockets whose network namespace is in `lab_netns` (netns
 * cookies filled by datapath/xtables_refusal.py) and for nothing else: every
 * other setsockopt() on the machine passes untouched. Each refusal is one
 * record in the `refusals` ring buffer, so that the rule guard can record it.
 *
 * Built with bcc (datapath/bpf_build.py): maps use bcc's macros.
 */
#include <uapi/linux/bpf.h>

#include "hostrouting_shared.h"

/* uapi linux/in.h and linux/in6.h */
#define HR_SOL_IP	0
#define HR_SOL_IPV6	41
/* uapi linux/netfilter_ipv4/ip_tables.h, ip6_tables.h, arp_tables.h,
 * netfilter_bridge/ebtables.h: the options that load a table */
#define HR_IPT_SO_SET_REPLACE	64	/* also IP6T_SO_SET_REPLACE at SOL_IPV6 */
#define HR_ARPT_SO_SET_REPLACE	96
#define HR_EBT_SO_SET_ENTRIES	128
/* the first field of every one of those blobs is the table's name */
#define HR_XT_TABLE_NAME_LEN	32
#define HR_PAGE_SIZE		4096

BPF_HASH(lab_netns, __u64, __u8, 1024);
BPF_RINGBUF_OUTPUT(refusals, 4);

static __always_inline int is_table_write(int level, int optname)
{
	if (level == HR_SOL_IPV6)
		return optname == HR_IPT_SO_SET_REPLACE;
	return level == HR_SOL_IP && (optname == HR_IPT_SO_SET_REPLACE ||
				      optname == HR_ARPT_SO_SET_REPLACE ||
				      optname == HR_EBT_SO_SET_ENTRIES);
}

static __always_inline void report(struct bpf_sockopt *ctx, __u64 cookie)
{
	struct hr_xt_refusal ev = {};
	void *optval = ctx->optval;

	ev.netns_cookie = cookie;
	ev.pid = bpf_get_current_pid_tgid() >> 32;
	ev.level = ctx->level;
	ev.optname = ctx->optname;
	bpf_get_current_comm(ev.comm, sizeof(ev.comm));
	if (optval + HR_XT_TABLE_NAME_LEN <= ctx->optval_end)
		__builtin_memcpy(ev.table, optval, HR_XT_TABLE_NAME_LEN);
	ev.table[HR_XT_TABLE_NAME_LEN - 1] = 0;
	refusals.ringbuf_output(&ev, sizeof(ev), 0);
}

static __always_inline int pass(struct bpf_sockopt *ctx)
{
	/*
	 * Above a page the program sees a truncated copy of optval; optlen 0
	 * tells the kernel to use the caller's buffer as it is (kernels before
	 * 6.5 fail such a call with EFAULT otherwise, for every socket).
	 */
	if (ctx->optlen > HR_PAGE_SIZE)
		ctx->optlen = 0;
	return 1;
}

int refuse_xtables_write(struct bpf_sockopt *ctx)
{
	__u64 cookie;

	if (!is_table_write(ctx->level, ctx->optname))
		return pass(ctx);
	cookie = bpf_get_netns_cookie(ctx);
	if (!lab_netns.lookup(&cookie))
		return pass(ctx);
	report(ctx, cookie);
	return 0;	/* EPERM to the caller; the table stays as it was */
}
