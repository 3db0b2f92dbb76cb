// SPDX-License-Identifier: GPL-2.0
/*
 * The benchmark's mechanism floor (datapath/bench/floor.py): on the hooks
 * host_routing.c uses, a redirect and nothing else. No maps, no parsing
 * beyond the EtherType (IPv6: see below), no MAC or TTL rewrite, no FIB
 * lookup: the target device is a constant, FLOOR_IFINDEX, compiled in at load
 * time (one build per constant). What eBPF host routing costs above this
 * floor is its own logic; what the floor costs above the lab's limit is the
 * redirect itself.
 *
 * Part of that mechanism, as host_routing.c does it, is the un-cloning of a
 * skb of several segments before the peer redirect into a pod (unclone.h says
 * why): without it, a receiving socket cannot coalesce a bulk flow, and eBPF
 * ran 1.20x the floor at TCP_STREAM 64 KiB on two CPUs (docs/benchmarks.md).
 * With it, the floor is eBPF's own path without its logic.
 *
 *   floor_peer   bpf_redirect_peer(): straight into the peer of FLOOR_IFINDEX
 *                (a pod's eth0), as from_pod/from_underlay hand packets to pods
 *   floor_neigh  bpf_redirect_neigh() out of FLOOR_IFINDEX (the node's uplink),
 *                the next hop found by the kernel's FIB, as from_pod routes
 *
 * Only IPv4 is redirected: ARP must reach the node, or no neighbour would
 * ever be resolved. Built with -DFLOOR_IPV6 (bench --ip-family 6), IPv6 is
 * redirected instead, but not ICMPv6 other than echo, so that neighbour
 * discovery reaches the node as ARP does (the one read beyond the EtherType:
 * the next header and an ICMPv6 message's type). A peer redirect needs no MAC
 * rewrite to be delivered: the kernel scrubs the skb to PACKET_HOST on the
 * way into the peer.
 *
 * Built with bcc (datapath/bpf_build.py).
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/icmpv6.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/pkt_cls.h>

#include "unclone.h"

#ifndef FLOOR_IFINDEX
#error "FLOOR_IFINDEX: the target device's ifindex, given at load time (-DFLOOR_IFINDEX=n)"
#endif

/* bcc 0.26 declares bpf_redirect_neigh() with the wrong prototype (as host_routing.c notes). */
static long (*floor_redirect_neigh)(__u32 ifindex, struct bpf_redir_neigh *params, int plen,
				    __u64 flags) = (void *)BPF_FUNC_redirect_neigh;

#ifdef FLOOR_IPV6
/*
 * IPv6 but ICMPv6 control (neighbour discovery, router solicitations: the
 * stack's); ICMPv6 echo is redirected, as eBPF host routing does.
 */
static __always_inline int floor_takes(struct __sk_buff *skb)
{
	void *data_end = (void *)(long)skb->data_end;
	struct ipv6hdr *ip6 = (void *)(long)skb->data + sizeof(struct ethhdr);
	__u8 *icmp6_type = (void *)(ip6 + 1);

	if (skb->protocol != bpf_htons(ETH_P_IPV6) || (void *)(ip6 + 1) > data_end)
		return 0;
	if (ip6->nexthdr != IPPROTO_ICMPV6)
		return 1;
	if ((void *)(icmp6_type + 1) > data_end)
		return 0;
	return *icmp6_type == ICMPV6_ECHO_REQUEST || *icmp6_type == ICMPV6_ECHO_REPLY;
}
#else
static __always_inline int floor_takes(struct __sk_buff *skb)
{
	return skb->protocol == bpf_htons(ETH_P_IP);
}
#endif

int floor_peer(struct __sk_buff *skb)
{
	if (!floor_takes(skb))
		return TC_ACT_OK;
	unclone_bulk(skb);
	return bpf_redirect_peer(FLOOR_IFINDEX, 0);
}

int floor_neigh(struct __sk_buff *skb)
{
	if (!floor_takes(skb))
		return TC_ACT_OK;
	return floor_redirect_neigh(FLOOR_IFINDEX, NULL, 0, 0);
}
