/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Routing a packet as the node's IPv4 (IPv6) forwarding would, without it: the
 * route and next hop from the kernel's FIB (bpf_fib_lookup), or, where the
 * node does not forward, from the datapath's own routes (`node_routes`,
 * `node_routes6`);
 * then out of the egress device to the next hop (bpf_redirect_neigh), whose
 * neighbour entry the kernel resolves and fills in.
 *
 * bcc rewrites map calls only in the file it compiles, so `node_routes` is
 * reached through an accessor that host_routing.c defines next to the map.
 */
#ifndef HR_FIB_H
#define HR_FIB_H

#include <uapi/linux/bpf.h>

#include "hostrouting_shared.h"
#include "compat.h"
#include "parse.h"
#include "parse6.h"

/* Accessor of the `node_routes` LPM trie, defined in host_routing.c: the route to `daddr`. */
static __always_inline struct hr_route *node_route_lookup(__u32 daddr);
/* Accessor of the `node_routes6` LPM trie, defined in host_routing.c. */
static __always_inline struct hr_route6 *node_route6_lookup(const struct hr_in6 *daddr);

/*
 * bpf_fib_lookup() without resolving the neighbour (SKIP_NEIGH) where the
 * kernel has it, else with; a FRAG_NEEDED of its own MTU check is no verdict
 * (see fib_route_v4()).
 */
static __always_inline int fib_lookup_skip_neigh(struct __sk_buff *skb, struct bpf_fib_lookup *fib)
{
	int rc = bpf_fib_lookup(skb, fib, sizeof(*fib), BPF_FIB_LOOKUP_SKIP_NEIGH);

	if (rc == -EINVAL) {
		/* a kernel without SKIP_NEIGH: NO_NEIGH goes to the stack, which resolves it */
		fib->tot_len = 0;
		rc = bpf_fib_lookup(skb, fib, sizeof(*fib), 0);
	}
	return rc == BPF_FIB_LKUP_RET_FRAG_NEEDED ? BPF_FIB_LKUP_RET_SUCCESS : rc;
}

/*
 * Route a packet that came in on skb->ifindex. Returns a
 * BPF_FIB_LKUP_RET_* code:
 *
 *   SUCCESS        routed: fib->ifindex is the egress device, fib->ipv4_dst
 *                  the next hop (the gateway, or the destination itself);
 *                  whether the packet fits that device is the caller's to
 *                  check (fits_egress, pmtu.h), a FRAG_NEEDED of the lookup
 *                  included (it checks against 4 bytes too many, and passes
 *                  every GSO packet)
 *   FWD_DISABLED   forwarding is off in the node and `node_routes` has no
 *                  route either
 *   NO_NEIGH       routed, next hop not in the neighbour table, on a kernel
 *                  without BPF_FIB_LOOKUP_SKIP_NEIGH (before 6.3)
 *   anything else  not forwarded by the kernel (NOT_FWDED: for the node
 *                  itself), or no route (blackhole, unreachable, prohibit),
 *                  or one it cannot use (UNSUPP_LWT)
 */
static __always_inline int fib_route_v4(struct __sk_buff *skb, struct hr_pkt *pkt,
					struct bpf_fib_lookup *fib)
{
	struct hr_route *route;
	int rc;

	fib->family = AF_INET;
	fib->tos = pkt->ip->tos;
	fib->l4_protocol = pkt->protocol;
	fib->sport = pkt->sport;
	fib->dport = pkt->dport;
	fib->tot_len = 0;	/* 0: the kernel checks skb->len against the egress device */
	fib->ifindex = skb->ifindex;
	fib->ipv4_src = pkt->saddr;
	fib->ipv4_dst = pkt->daddr;

	rc = fib_lookup_skip_neigh(skb, fib);
	if (rc != BPF_FIB_LKUP_RET_FWD_DISABLED)
		return rc;
	/*
	 * Forwarding is off in the node, so the kernel refuses the lookup:
	 * other nodes' pods (and, by a default route, the outside) are still
	 * reached with the datapath's own routes.
	 */
	route = node_route_lookup(pkt->daddr);
	if (!route)
		return BPF_FIB_LKUP_RET_FWD_DISABLED;
	fib->ifindex = route->ifindex;
	fib->ipv4_dst = route->nexthop;
	return BPF_FIB_LKUP_RET_SUCCESS;
}

/*
 * Out of fib->ifindex to the next hop fib->ipv4_dst, as routed by
 * fib_route_v4(): the neighbour subsystem fills in the MACs (resolving the
 * next hop if it must) on egress. Returns the TC action.
 */
static __always_inline int fib_redirect_v4(struct bpf_fib_lookup *fib)
{
	struct bpf_redir_neigh nh = {};

	nh.nh_family = AF_INET;
	nh.ipv4_nh = fib->ipv4_dst;
	return (int)hr_redirect_neigh(fib->ifindex, &nh, sizeof(nh), 0);
}

/*
 * Route an IPv6 packet that came in on skb->ifindex, as fib_route_v4() does
 * (the same return codes; fib->ipv6_dst is the next hop on SUCCESS), with
 * `node_routes6` where forwarding is off (net.ipv6.conf.<in>.forwarding 0).
 */
static __always_inline int fib_route_v6(struct __sk_buff *skb, struct hr_pkt6 *pkt,
					struct bpf_fib_lookup *fib)
{
	struct hr_route6 *route;
	__u32 flow;
	int rc;

	__builtin_memcpy(&flow, pkt->ip6, sizeof(flow));	/* version, class, flow label */
	fib->family = AF_INET6;
	fib->flowinfo = flow & HR_HTONL(0x0fffffff);
	fib->l4_protocol = pkt->protocol;
	fib->sport = pkt->sport;
	fib->dport = pkt->dport;
	fib->tot_len = 0;
	fib->ifindex = skb->ifindex;
	__builtin_memcpy(fib->ipv6_src, pkt->saddr.a, sizeof(fib->ipv6_src));
	__builtin_memcpy(fib->ipv6_dst, pkt->daddr.a, sizeof(fib->ipv6_dst));

	rc = fib_lookup_skip_neigh(skb, fib);
	if (rc != BPF_FIB_LKUP_RET_FWD_DISABLED)
		return rc;
	route = node_route6_lookup(&pkt->daddr);
	if (!route)
		return BPF_FIB_LKUP_RET_FWD_DISABLED;
	fib->ifindex = route->ifindex;
	__builtin_memcpy(fib->ipv6_dst, route->nexthop, sizeof(fib->ipv6_dst));
	return BPF_FIB_LKUP_RET_SUCCESS;
}

/*
 * Where fib_route_v6() sends a packet: what the IPv6 programs keep of the
 * lookup (a fifth of struct bpf_fib_lookup, for the stack NAT needs after it).
 */
struct hr_nexthop6 {
	__u32 ifindex;
	struct hr_in6 addr;
};

/* Out of nh->ifindex to the next hop nh->addr, as fib_redirect_v4(). */
static __always_inline int fib_redirect_v6(const struct hr_nexthop6 *nh)
{
	struct bpf_redir_neigh neigh = {};

	neigh.nh_family = AF_INET6;
	__builtin_memcpy(neigh.ipv6_nh, nh->addr.a, sizeof(neigh.ipv6_nh));
	return (int)hr_redirect_neigh(nh->ifindex, &neigh, sizeof(neigh), 0);
}

#endif /* HR_FIB_H */
