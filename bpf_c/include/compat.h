/* SPDX-License-Identifier: GPL-2.0 */
/*
 * What bcc 0.26 and the 6.1 uapi headers it compiles against lack or get
 * wrong, in one place: constants the BPF side cannot take from libc, flags
 * of newer kernels, and helpers whose bcc prototype differs from the kernel's.
 * Everything here is guarded or prefixed (hr_), so a newer bcc or uapi that
 * gets it right changes nothing.
 */
#ifndef HR_COMPAT_H
#define HR_COMPAT_H

#include <uapi/linux/bpf.h>

#ifndef __always_inline
#define __always_inline inline __attribute__((always_inline))
#endif

#ifndef AF_INET
#define AF_INET 2
#endif
#ifndef AF_INET6
#define AF_INET6 10
#endif
#ifndef EINVAL
#define EINVAL 22
#endif
/* skb->pkt_type, as uapi/linux/if_packet.h numbers them */
#ifndef PACKET_BROADCAST
#define PACKET_BROADCAST	1
#define PACKET_MULTICAST	2
#endif

/*
 * Linux 6.3+: find the route and next hop but leave the neighbour alone
 * (the 6.1 uapi headers bcc compiles against do not have it yet).
 * bpf_redirect_neigh() resolves the next hop itself, queueing the packet
 * meanwhile, so the first packets towards a next hop not yet in the
 * neighbour table need not take the stack's path (and its conntrack).
 */
#ifndef BPF_FIB_LOOKUP_SKIP_NEIGH
#define BPF_FIB_LOOKUP_SKIP_NEIGH	(1U << 2)
#endif

/*
 * bcc 0.26 declares two helpers with the wrong prototype: the kernel's
 * bpf_redirect_neigh() takes (ifindex, params, plen, flags), and
 * bpf_csum_diff() returns a 64-bit value whose low 32 bits are the sum (an
 * int would turn sums >= 2^31 into "errors"). Declared here as the kernel
 * does; bpf_check_mtu() beside them, named alike (bcc's prototype of that
 * one is right).
 */
static long (*hr_check_mtu)(void *ctx, __u32 ifindex, __u32 *mtu_len, __s32 len_diff,
			    __u64 flags) = (void *)BPF_FUNC_check_mtu;
static long (*hr_redirect_neigh)(__u32 ifindex, struct bpf_redir_neigh *params, int plen,
				 __u64 flags) = (void *)BPF_FUNC_redirect_neigh;
static __s64 (*hr_csum_diff)(void *from, __u32 from_size, void *to, __u32 to_size,
			     __u32 seed) = (void *)BPF_FUNC_csum_diff;

#endif /* HR_COMPAT_H */
