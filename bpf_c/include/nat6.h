/* SPDX-License-Identifier: GPL-2.0 */
/*
 * BPF SNAT for IPv6: traffic leaving the cluster from a pod is masqueraded to
 * the node's IPv6 address (config.node_ip6), and the replies, and ICMPv6
 * errors about its flows, translated back, as nat.h does for IPv4.
 *
 * STUB: until this header is written, nothing is NATed: a pod's IPv6 packet
 * leaving the cluster is dropped (never leaked un-NATed) and nothing for the
 * node is taken for a reply.
 */
#ifndef HR_NAT6_H
#define HR_NAT6_H

#include <uapi/linux/bpf.h>

#include "hostrouting_shared.h"
#include "compat.h"
#include "parse6.h"

/* Accessors of the `nat6` map, defined in host_routing.c. */
static __always_inline struct hr_nat6_entry *nat6_lookup(struct hr_nat6_key *key);
static __always_inline int nat6_insert(struct hr_nat6_key *key, struct hr_nat6_entry *value);
static __always_inline void nat6_remove(struct hr_nat6_key *key);

/*
 * A pod's packet leaving the cluster, routed: from node_ip6 and a NAT port
 * (ICMPv6 echo: identifier). Returns 0 when translated (pkt's pointers are
 * stale then), or the drop reason (enum hr_reason).
 */
static __always_inline int snat_out6(struct __sk_buff *skb, struct hr_pkt6 *pkt,
				     struct hr_config *cfg)
{
	return HR_DROP_NAT_UNSUPPORTED;
}

/*
 * A packet for node_ip6: a reply to a flow snat_out6() opened is translated
 * back to the pod (*pod). Returns 0 when translated, HR_PASS_NAT_MISS when it
 * is not one (the node's own), or the drop reason.
 */
static __always_inline int rnat_in6(struct __sk_buff *skb, struct hr_pkt6 *pkt,
				    struct hr_config *cfg, struct hr_in6 *pod)
{
	return HR_PASS_NAT_MISS;
}

/*
 * An ICMPv6 error (destination unreachable, packet too big, time exceeded,
 * parameter problem) for node_ip6 about a flow snat_out6() opened: the outer
 * destination and the embedded header translated back (*pod). Returns as
 * rnat_in6().
 */
static __always_inline int rnat_icmp6_error(struct __sk_buff *skb, struct hr_pkt6 *pkt,
					    struct hr_config *cfg, struct hr_in6 *pod)
{
	return HR_PASS_NAT_MISS;
}

#endif /* HR_NAT6_H */
