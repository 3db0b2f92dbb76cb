/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Un-cloning a bulk skb before a peer redirect into a pod: host_routing.c
 * does it on its way into local pods, the bench's floor (redirect_floor.c)
 * on its peer redirect, so that the floor is eBPF's path without its logic.
 */
#ifndef HR_UNCLONE_H
#define HR_UNCLONE_H

#include <uapi/linux/bpf.h>

#include "compat.h"

/*
 * A TSO skb from a sender's TCP is a clone (TCP keeps the original until it
 * is acknowledged). Handed to the receiving socket still a clone, it cannot be
 * merged with the skb before it, in the socket backlog or the receive queue
 * (skb_try_coalesce() refuses a cloned one), and a bulk flow is received one
 * skb at a time. The kernel's forwarding path un-clones every packet it
 * routes (skb_cow() in ip_forward()); bpf_skb_change_head() with no room does
 * the same (its skb_cow() gives a cloned skb a header of its own, the payload
 * stays shared). Only for skbs of several segments: a single one has nothing
 * to merge into, and the copy would be a cost for request/response traffic.
 * A failure (no memory) leaves the packet as it was. Packet pointers are
 * stale after it.
 */
static __always_inline void unclone_bulk(struct __sk_buff *skb)
{
	if (skb->gso_segs > 1)
		bpf_skb_change_head(skb, 0, 0);
}

#endif /* HR_UNCLONE_H */
