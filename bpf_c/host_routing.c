// SPDX-License-Identifier: GPL-2.0
/*
 * eBPF host routing: two TC (clsact, direct-action) programs that forward pod
 * traffic in the node namespace without the IPv4 forwarding path of the
 * stack (netfilter hooks, conntrack, the qdisc of the host-side veth).
 *
 *   from_pod       ingress of each pod's host-side veth (traffic leaving a pod)
 *   from_underlay  ingress of the node's underlay device (traffic from other nodes)
 *
 * A packet for a pod of this node goes straight into the pod's eth0 with
 * bpf_redirect_peer(); anything else a pod sends is routed with
 * bpf_fib_lookup() and bpf_redirect_neigh(); one too big for its way out is
 * answered or left to the stack (pmtu.h); what leaves the cluster is
 * source-NATed to the node IP on the way (nat.h, frag.h) and its replies
 * translated back in from_underlay. Whatever the programs do not handle goes
 * to the stack unchanged (TC_ACT_OK), so the legacy path is the fallback.
 * Every verdict is counted per program (enum hr_hook) and reason (enum
 * hr_reason) and, while a monitor asks for it, traced to the `trace_events`
 * ring buffer.
 *
 * This file holds the maps and the programs; the mechanics of each decision
 * live in the header named after it (parse.h, ipv4_check.h, pmtu.h, nat.h;
 * csum.h the checksums, compat.h what bcc 0.26 lacks).
 *
 * Built with bcc (datapath/bpf_build.py): maps use bcc's macros, which bcc
 * rewrites in this file only, so the headers reach their maps through the
 * accessors defined here.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/in.h>
#include <uapi/linux/pkt_cls.h>

#include "hostrouting_shared.h"
#include "compat.h"
#include "parse.h"
#include "csum.h"
#include "ipv4_check.h"
#include "pmtu.h"
#include "nat.h"

BPF_HASH(endpoints, __u32, struct hr_endpoint, 1024);
BPF_ARRAY(config, struct hr_config, 1);
BPF_PERCPU_ARRAY(counters, struct hr_counter, HR_HOOK_MAX * HR_REASON_MAX);
BPF_RINGBUF_OUTPUT(trace_events, 16);
/* Destinations inside the cluster: pod CIDRs and the underlay. Anything else leaves it. */
BPF_LPM_TRIE(cluster_cidrs, struct hr_lpm_key, __u32, 64);
BPF_LPM_TRIE(node_routes, struct hr_lpm_key, struct hr_route, 256);
/*
 * BPF SNAT state, two entries per flow (nat.h). The loader sizes it from the
 * lab's [nat] max_flows. A plain hash, not LRU: an LRU evicts one entry of a
 * flow and leaves the other, and the port then goes to another pod's flow
 * while replies are still on the way; a full table refuses new flows instead
 * (HR_DROP_NAT_TABLE_FULL), bounded by the sweep as nf_conntrack_max bounds
 * conntrack.
 */
#ifndef HR_NAT_MAP_SIZE
#define HR_NAT_MAP_SIZE 524288
#endif
BPF_TABLE("hash", struct hr_nat_key, struct hr_nat_entry, nat, HR_NAT_MAP_SIZE);
BPF_PERCPU_ARRAY(nat_scratch, struct hr_nat_scratch, 1);
/*
 * Fragmented datagrams through BPF SNAT (frag.h): the ports of each one's
 * first fragment, for the later ones. LRU: an evicted record costs one
 * datagram's later fragments (counted), no flow.
 */
#ifndef HR_FRAG_MAP_SIZE
#define HR_FRAG_MAP_SIZE 8192
#endif
BPF_TABLE("lru_hash", struct hr_frag_key, struct hr_frag_entry, nat_frags, HR_FRAG_MAP_SIZE);
BPF_PERCPU_ARRAY(icmp_quote, struct hr_icmp_quote, 1);	/* pmtu.h */

/* Map accessors for the headers (bcc rewrites map calls in this file only). */
static __always_inline struct hr_nat_entry *nat_lookup(struct hr_nat_key *key)
{
	return nat.lookup(key);
}

/* BPF_NOEXIST: 0 when inserted, -EEXIST when the key exists, -E2BIG when the table is full */
static __always_inline int nat_insert(struct hr_nat_key *key, struct hr_nat_entry *value)
{
	return nat.insert(key, value);
}

static __always_inline void nat_remove(struct hr_nat_key *key)
{
	nat.delete(key);
}

static __always_inline struct hr_nat_scratch *nat_scratch_get(void)
{
	__u32 zero = 0;

	return nat_scratch.lookup(&zero);
}

static __always_inline struct hr_frag_entry *frag_lookup(struct hr_frag_key *key)
{
	return nat_frags.lookup(key);
}

static __always_inline void frag_update(struct hr_frag_key *key, struct hr_frag_entry *value)
{
	nat_frags.update(key, value);
}

static __always_inline struct hr_icmp_quote *icmp_quote_get(void)
{
	__u32 zero = 0;

	return icmp_quote.lookup(&zero);
}

/*
 * Count the verdict and, while tracing is on, record it. `len` is the length
 * of the packet as it arrived (the ICMP reply is shorter than what it answers).
 * `slot` is one variable of the program's for the map keys: every inlined
 * copy of this function would otherwise keep its own on the 512-byte stack.
 */
static __always_inline int verdict(__u32 *slot, struct __sk_buff *skb, __u32 hook,
				   struct hr_pkt *pkt, __u32 len, __u32 reason,
				   __u32 ifindex_out, int action)
{
	struct hr_trace_event *ev;
	struct hr_counter *cnt;
	struct hr_config *cfg;

	*slot = hook * HR_REASON_MAX + reason;
	cnt = counters.lookup(slot);
	if (cnt) {
		cnt->packets++;
		cnt->bytes += len;
	}

	*slot = 0;
	cfg = config.lookup(slot);
	if (!cfg || cfg->trace != 1)
		return action;
	ev = trace_events.ringbuf_reserve(sizeof(*ev));
	if (!ev)
		return action;
	ev->ts_ns = bpf_ktime_get_ns();
	ev->hook = hook;
	ev->reason = reason;
	ev->ifindex_in = skb->ifindex;
	ev->ifindex_out = ifindex_out;
	ev->saddr = pkt ? pkt->saddr : 0;
	ev->daddr = pkt ? pkt->daddr : 0;
	ev->sport = pkt ? pkt->sport : 0;
	ev->dport = pkt ? pkt->dport : 0;
	ev->protocol = pkt ? pkt->protocol : 0;
	ev->pad[0] = 0;
	ev->pad[1] = 0;
	ev->pad[2] = 0;
	ev->len = len;
	trace_events.ringbuf_submit(ev, 0);
	return action;
}

/*
 * Hand the packet to a pod of this node: MACs as if the node had routed it
 * out of the pod's host-side veth, TTL decremented, then straight into the
 * ingress of the pod's eth0 (the veth peer of ep->ifindex).
 */
static __always_inline int to_local_pod(__u32 *slot, struct __sk_buff *skb, __u32 hook,
					struct hr_pkt *pkt, __u32 len, struct hr_endpoint *ep,
					__u32 reason)
{
	__u32 ifindex = ep->ifindex;

	__builtin_memcpy(pkt->eth->h_dest, ep->mac, ETH_ALEN);
	__builtin_memcpy(pkt->eth->h_source, ep->node_mac, ETH_ALEN);
	ip_decrease_ttl(pkt->ip);
	/* With flags 0 this always answers TC_ACT_REDIRECT. */
	return verdict(slot, skb, hook, pkt, len, reason, ifindex, (int)bpf_redirect_peer(ifindex, 0));
}

static __always_inline int mac_equal(const __u8 *a, const __u8 *b)
{
	__u32 a4, b4;
	__u16 a2, b2;

	__builtin_memcpy(&a4, a, 4);
	__builtin_memcpy(&b4, b, 4);
	__builtin_memcpy(&a2, a + 4, 2);
	__builtin_memcpy(&b2, b + 4, 2);
	return a4 == b4 && a2 == b2;
}

/* The cluster_cidrs value (enum hr_cidr_flags) of an address; NULL outside the cluster. */
static __always_inline __u32 *cluster_range(__u32 addr)
{
	struct hr_lpm_key key = { .prefixlen = 32, .addr = addr };

	return cluster_cidrs.lookup(&key);
}

static __always_inline int in_cluster(__u32 addr)
{
	return cluster_range(addr) != 0;
}

/* Traffic leaving a pod, at ingress of its host-side veth. */
int from_pod(struct __sk_buff *skb)
{
	__u32 key_slot = 0, *slot = &key_slot;
	struct bpf_fib_lookup fib = {};
	struct bpf_redir_neigh nh = {};
	struct hr_endpoint *ep;
	struct hr_config *cfg;
	struct hr_pkt pkt = {};
	__u32 len = skb->len;
	__u32 ifindex;
	int rc, external, stack_fragments, external_to_stack;
	__u32 *range, mtu;

	rc = parse_ipv4(skb, &pkt);
	if (rc == HR_PARSE_NOT_IPV4)
		return verdict(slot, skb, HR_HOOK_FROM_POD, 0, len, HR_PASS_NOT_IPV4, 0, TC_ACT_OK);
	if (rc != HR_PARSE_OK)
		return verdict(slot, skb, HR_HOOK_FROM_POD, 0, len, HR_DROP_MALFORMED, 0, TC_ACT_SHOT);
	if (!ipv4_csum_ok(skb, &pkt))
		return verdict(slot, skb, HR_HOOK_FROM_POD, &pkt, len, HR_DROP_BAD_CHECKSUM, 0,
			       TC_ACT_SHOT);
	parse_ports(skb, &pkt);
	if (skb->pkt_type == PACKET_BROADCAST || skb->pkt_type == PACKET_MULTICAST)
		return verdict(slot, skb, HR_HOOK_FROM_POD, &pkt, len, HR_PASS_L2_MULTICAST, 0,
			       TC_ACT_OK);
	*slot = 0;
	cfg = config.lookup(slot);
	if (!cfg)
		return verdict(slot, skb, HR_HOOK_FROM_POD, &pkt, len, HR_PASS_NOT_ENDPOINT, 0, TC_ACT_OK);

	/* Anti-spoofing: a pod sends from its own address and MAC, on its own veth. */
	ep = endpoints.lookup(&pkt.saddr);
	if (!ep || ep->ifindex != skb->ifindex || !mac_equal(ep->mac, pkt.eth->h_source))
		return verdict(slot, skb, HR_HOOK_FROM_POD, &pkt, len, HR_DROP_SPOOFED, 0, TC_ACT_SHOT);

	range = cluster_range(pkt.daddr);
	external = cfg->node_ip && !range;
	if (range && (*range & HR_CIDR_DENY_FROM_POD))
		return verdict(slot, skb, HR_HOOK_FROM_POD, &pkt, len, HR_DROP_POD_TO_NODE, 0,
			       TC_ACT_SHOT);
	/*
	 * Fragments inside the cluster go to the stack; leaving it, they are
	 * routed and NATed like whole packets (the fragment map of frag.h).
	 */
	if (pkt.fragment && (!external || endpoints.lookup(&pkt.daddr)))
		return verdict(slot, skb, HR_HOOK_FROM_POD, &pkt, len, HR_PASS_FRAGMENT, 0, TC_ACT_OK);

	ep = endpoints.lookup(&pkt.daddr);
	if (ep) {
		if (pkt.ip->ttl <= 1)
			return verdict(slot, skb, HR_HOOK_FROM_POD, &pkt, len, HR_PASS_TTL, 0, TC_ACT_OK);
		/*
		 * The peer redirect skips the MTU check of the pod's veth: check
		 * against its host side (a CNI gives both ends the pod's MTU).
		 */
		if (fits_egress(skb, &pkt, ep->ifindex, &mtu))
			return to_local_pod(slot, skb, HR_HOOK_FROM_POD, &pkt, len, ep,
					    HR_REDIRECT_PEER);
		/* too big for the pod's link: answered as a routed packet would be */
		rc = BPF_FIB_LKUP_RET_FRAG_NEEDED;
		fib.mtu_result = mtu;
		goto too_big;
	}

	/* Without a node IP to masquerade to, the stack (and its MASQUERADE) takes it. */
	if (!cfg->node_ip && !range)
		return verdict(slot, skb, HR_HOOK_FROM_POD, &pkt, len, HR_PASS_EXTERNAL, 0, TC_ACT_OK);

	fib.family = AF_INET;
	fib.tos = pkt.ip->tos;
	fib.l4_protocol = pkt.protocol;
	fib.sport = pkt.sport;
	fib.dport = pkt.dport;
	fib.tot_len = 0;	/* 0: the kernel checks skb->len against the egress device */
	fib.ifindex = skb->ifindex;
	fib.ipv4_src = pkt.saddr;
	fib.ipv4_dst = pkt.daddr;

	rc = bpf_fib_lookup(skb, &fib, sizeof(fib), BPF_FIB_LOOKUP_SKIP_NEIGH);
	if (rc == -EINVAL) {
		/* a kernel without SKIP_NEIGH: NO_NEIGH goes to the stack, which resolves it */
		fib.tot_len = 0;
		rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
	}
	if (rc == BPF_FIB_LKUP_RET_FWD_DISABLED) {
		/*
		 * Forwarding is off in the node, so the kernel refuses the lookup:
		 * other nodes' pods (and, by a default route, the outside) are still
		 * reached with the datapath's own routes (the MTU check follows).
		 */
		struct hr_lpm_key key = { .prefixlen = 32, .addr = pkt.daddr };
		struct hr_route *route = node_routes.lookup(&key);

		if (!route)
			return verdict(slot, skb, HR_HOOK_FROM_POD, &pkt, len, HR_PASS_FWD_DISABLED, 0,
				       TC_ACT_OK);
		fib.ifindex = route->ifindex;
		fib.ipv4_dst = route->nexthop;
		rc = BPF_FIB_LKUP_RET_SUCCESS;
	}
	if (rc == BPF_FIB_LKUP_RET_SUCCESS || rc == BPF_FIB_LKUP_RET_FRAG_NEEDED) {
		/*
		 * The lookup's own check (tot_len 0) passes every GSO packet, and
		 * others up to 4 bytes (a VLAN tag) over the MTU: check again.
		 */
		rc = fits_egress(skb, &pkt, fib.ifindex, &mtu) ? BPF_FIB_LKUP_RET_SUCCESS :
			BPF_FIB_LKUP_RET_FRAG_NEEDED;
		fib.mtu_result = mtu;
	}
	if (rc == BPF_FIB_LKUP_RET_NOT_FWDED)
		return verdict(slot, skb, HR_HOOK_FROM_POD, &pkt, len, HR_PASS_LOCAL, 0, TC_ACT_OK);
	/*
	 * Leaving the cluster with a next hop not yet resolved (a kernel without
	 * SKIP_NEIGH): NATed, then the stack forwards it and resolves the neighbour.
	 */
	external_to_stack = external && rc == BPF_FIB_LKUP_RET_NO_NEIGH;
	if (rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_FRAG_NEEDED &&
	    !external_to_stack) {
		/* un-NATed, a routable packet must not reach the stack: it would leave as is */
		if (external && rc == BPF_FIB_LKUP_RET_UNSUPP_LWT)
			return verdict(slot, skb, HR_HOOK_FROM_POD, &pkt, len,
				       HR_DROP_NAT_UNSUPPORTED, 0, TC_ACT_SHOT);
		/* no route (blackhole, unreachable, prohibit): the stack answers the pod */
		return verdict(slot, skb, HR_HOOK_FROM_POD, &pkt, len, HR_PASS_FIB_MISS, 0, TC_ACT_OK);
	}
too_big:
	/* The stack checks the TTL before the MTU: so do we. */
	if (pkt.ip->ttl <= 1)
		return verdict(slot, skb, HR_HOOK_FROM_POD, &pkt, len, HR_PASS_TTL, 0, TC_ACT_OK);

	/* Too big, DF clear: the stack fragments it (NATed first if it leaves the cluster). */
	stack_fragments = (rc == BPF_FIB_LKUP_RET_FRAG_NEEDED &&
			   !(pkt.ip->frag_off & HR_HTONS(HR_IP_DF))) || external_to_stack;
	if (stack_fragments && !external)
		return verdict(slot, skb, HR_HOOK_FROM_POD, &pkt, len, HR_PASS_FRAG_NEEDED, 0, TC_ACT_OK);
	if (rc == BPF_FIB_LKUP_RET_FRAG_NEEDED && !stack_fragments) {
		ifindex = skb->ifindex;
		if (icmp_frag_needed(skb, &pkt, fib.mtu_result, cfg->router_ip) < 0)
			return verdict(slot, skb, HR_HOOK_FROM_POD, &pkt, len, HR_DROP_ICMP_FAILED, 0,
				       TC_ACT_SHOT);
		/* Back into the pod it came from: the peer of this very veth. */
		return verdict(slot, skb, HR_HOOK_FROM_POD, &pkt, len, HR_ICMP_FRAG_NEEDED, ifindex,
			       (int)bpf_redirect_peer(ifindex, 0));
	}

	if (!stack_fragments)
		ip_decrease_ttl(pkt.ip);
	nh.nh_family = AF_INET;
	nh.ipv4_nh = fib.ipv4_dst;	/* the next hop: the gateway, or the destination itself */
	ifindex = fib.ifindex;
	if (external) {
		/* Leaves the cluster: from the node IP and a NAT port (pointers stale after). */
		rc = snat_out(skb, &pkt, cfg);
		if (rc)
			return verdict(slot, skb, HR_HOOK_FROM_POD, &pkt, len, rc, 0, TC_ACT_SHOT);
		/* the stack takes it from here (accept_local lets it in with the node IP) */
		if (stack_fragments)
			return verdict(slot, skb, HR_HOOK_FROM_POD, &pkt, len, HR_SNAT_PASS_FRAG_NEEDED, 0,
				       TC_ACT_OK);
		return verdict(slot, skb, HR_HOOK_FROM_POD, &pkt, len,
			       pkt.fragment ? HR_SNAT_FRAGMENT : HR_SNAT_REDIRECT_NEIGH, ifindex,
			       (int)hr_redirect_neigh(ifindex, &nh, sizeof(nh), 0));
	}
	/* The neighbour subsystem fills in the MACs (resolving if it must) on egress. */
	return verdict(slot, skb, HR_HOOK_FROM_POD, &pkt, len, HR_REDIRECT_NEIGH, ifindex,
		       (int)hr_redirect_neigh(ifindex, &nh, sizeof(nh), 0));
}

/*
 * A packet for the node IP: a reply to a flow BPF SNAT opened (or an ICMP
 * error about one) goes back into its pod; anything else is the node's own.
 *
 * A reply too big for the pod's link (narrower than the underlay) is checked
 * after the translation, when the pod is known (the length does not change):
 *
 * - DF clear (and every ICMP error, which Linux sends with DF clear): to the
 *   stack, pod-addressed, which fragments it on the way to the pod
 *   (pass_frag_needed). Handed over untranslated it would be for the node
 *   IP, and the node (no conntrack entry: BPF did the NAT) would take it as
 *   its own.
 * - DF set, TCP or UDP: the frag-needed is built here, after the translation
 *   is undone, so that it quotes the datagram as the remote sent it (to the
 *   node IP and NAT port) and comes from the node IP; it leaves by the
 *   underlay device it came in on (icmp_frag_needed). The stack would answer
 *   a pod-addressed packet quoting the pod's address and port, a datagram the
 *   remote never sent: its TCP or UDP finds no socket for the quote and
 *   learns nothing (legacy mode gets this right through conntrack, which
 *   translates the quote of an error about a NATed flow back).
 * - DF set, ICMP echo reply (Linux replies with DF clear; another host
 *   might not): to the stack, whose frag-needed quotes the pod's identifier;
 *   an echo only loses that reply.
 */
static __always_inline int from_outside_to_node(__u32 *slot, struct __sk_buff *skb,
						struct hr_pkt *pkt, struct hr_config *cfg,
						__u32 len)
{
	struct hr_endpoint *ep;
	__u32 pod_ip = 0, reason = HR_RNAT_REDIRECT_PEER, mtu, ifindex;
	__u32 node_ip = pkt->daddr;
	__u16 nat_port = pkt->dport;	/* TCP, UDP: parse_ports read it */
	int rc;

	rc = rnat_in(skb, pkt, cfg, &pod_ip);
	if (rc == HR_PASS_NAT_MISS && pkt->protocol == IPPROTO_ICMP) {
		rc = rnat_icmp_error(skb, pkt, cfg, &pod_ip);
		reason = HR_RNAT_ICMP_ERROR;
	}
	if (rc == HR_PASS_NAT_MISS || rc == HR_PASS_FRAG_UNTRACKED)
		return verdict(slot, skb, HR_HOOK_FROM_UNDERLAY, pkt, len, rc, 0, TC_ACT_OK);
	if (rc)
		return verdict(slot, skb, HR_HOOK_FROM_UNDERLAY, pkt, len, rc, 0, TC_ACT_SHOT);

	/* The helpers moved the data: parse again for the MAC and TTL rewrite. */
	if (parse_ipv4(skb, pkt) != HR_PARSE_OK)
		return verdict(slot, skb, HR_HOOK_FROM_UNDERLAY, 0, len, HR_DROP_NAT_FAILED, 0,
			       TC_ACT_SHOT);
	ep = endpoints.lookup(&pod_ip);
	if (!ep)
		return verdict(slot, skb, HR_HOOK_FROM_UNDERLAY, pkt, len, HR_DROP_NAT_NO_ENDPOINT, 0,
			       TC_ACT_SHOT);
	/* Routed on to the pod it would expire; the stack would answer for the node instead. */
	if (pkt->ip->ttl <= 1)
		return verdict(slot, skb, HR_HOOK_FROM_UNDERLAY, pkt, len, HR_DROP_NAT_TTL, 0,
			       TC_ACT_SHOT);
	if (!fits_egress(skb, pkt, ep->ifindex, &mtu)) {
		if (!(pkt->ip->frag_off & HR_HTONS(HR_IP_DF)) || reason == HR_RNAT_ICMP_ERROR ||
		    (pkt->protocol != IPPROTO_TCP && pkt->protocol != IPPROTO_UDP))
			return verdict(slot, skb, HR_HOOK_FROM_UNDERLAY, pkt, len,
				       HR_PASS_FRAG_NEEDED, 0, TC_ACT_OK);
		/* back to the node IP and NAT port, then answered as the remote's datagram */
		parse_ports(skb, pkt);
		if (nat_rewrite(skb, pkt, 0, pod_ip, node_ip, pkt->dport, nat_port) < 0 ||
		    parse_ipv4(skb, pkt) != HR_PARSE_OK)
			return verdict(slot, skb, HR_HOOK_FROM_UNDERLAY, 0, len, HR_DROP_ICMP_FAILED, 0,
				       TC_ACT_SHOT);
		ifindex = skb->ifindex;
		if (icmp_frag_needed(skb, pkt, mtu, node_ip) < 0)
			return verdict(slot, skb, HR_HOOK_FROM_UNDERLAY, pkt, len, HR_DROP_ICMP_FAILED,
				       0, TC_ACT_SHOT);
		/* out of the underlay device, MACs swapped: to the sender's next hop */
		return verdict(slot, skb, HR_HOOK_FROM_UNDERLAY, pkt, len, HR_ICMP_FRAG_NEEDED, ifindex,
			       (int)bpf_redirect(ifindex, 0));
	}
	return to_local_pod(slot, skb, HR_HOOK_FROM_UNDERLAY, pkt, len, ep,
			    pkt->fragment ? HR_RNAT_FRAGMENT : reason);
}

/* Traffic from other nodes and the outside, at ingress of the node's underlay device. */
int from_underlay(struct __sk_buff *skb)
{
	__u32 key_slot = 0, *slot = &key_slot;
	struct hr_endpoint *ep;
	struct hr_config *cfg;
	struct hr_pkt pkt = {};
	__u32 len = skb->len;
	__u32 mtu;
	int rc;

	rc = parse_ipv4(skb, &pkt);
	if (rc == HR_PARSE_NOT_IPV4)
		return verdict(slot, skb, HR_HOOK_FROM_UNDERLAY, 0, len, HR_PASS_NOT_IPV4, 0, TC_ACT_OK);
	if (rc != HR_PARSE_OK)
		return verdict(slot, skb, HR_HOOK_FROM_UNDERLAY, 0, len, HR_DROP_MALFORMED, 0,
			       TC_ACT_SHOT);
	if (!ipv4_csum_ok(skb, &pkt))
		return verdict(slot, skb, HR_HOOK_FROM_UNDERLAY, &pkt, len, HR_DROP_BAD_CHECKSUM, 0,
			       TC_ACT_SHOT);
	parse_ports(skb, &pkt);
	if (skb->pkt_type == PACKET_BROADCAST || skb->pkt_type == PACKET_MULTICAST)
		return verdict(slot, skb, HR_HOOK_FROM_UNDERLAY, &pkt, len, HR_PASS_L2_MULTICAST, 0,
			       TC_ACT_OK);
	*slot = 0;
	cfg = config.lookup(slot);
	if (!cfg)
		return verdict(slot, skb, HR_HOOK_FROM_UNDERLAY, &pkt, len, HR_PASS_NOT_ENDPOINT, 0,
			       TC_ACT_OK);
	if (cfg->node_ip && pkt.daddr == cfg->node_ip)
		return from_outside_to_node(slot, skb, &pkt, cfg, len);
	if (pkt.fragment) {
		/* from outside, not even in pieces: the stack would reassemble it for the pod */
		if (!in_cluster(pkt.saddr) && endpoints.lookup(&pkt.daddr))
			return verdict(slot, skb, HR_HOOK_FROM_UNDERLAY, &pkt, len,
				       HR_DROP_NOT_FROM_CLUSTER, 0, TC_ACT_SHOT);
		return verdict(slot, skb, HR_HOOK_FROM_UNDERLAY, &pkt, len, HR_PASS_FRAGMENT, 0,
			       TC_ACT_OK);
	}

	ep = endpoints.lookup(&pkt.daddr);
	if (!ep)
		return verdict(slot, skb, HR_HOOK_FROM_UNDERLAY, &pkt, len, HR_PASS_NOT_ENDPOINT, 0,
			       TC_ACT_OK);
	/* Pods are reached directly from inside the cluster only; the outside gets replies. */
	if (!in_cluster(pkt.saddr))
		return verdict(slot, skb, HR_HOOK_FROM_UNDERLAY, &pkt, len, HR_DROP_NOT_FROM_CLUSTER, 0,
			       TC_ACT_SHOT);
	if (pkt.ip->ttl <= 1)
		return verdict(slot, skb, HR_HOOK_FROM_UNDERLAY, &pkt, len, HR_PASS_TTL, 0, TC_ACT_OK);
	/*
	 * Too big for the pod's link (narrower than the underlay): the stack
	 * fragments it, or with DF answers the sender on its other node.
	 */
	if (!fits_egress(skb, &pkt, ep->ifindex, &mtu))
		return verdict(slot, skb, HR_HOOK_FROM_UNDERLAY, &pkt, len, HR_PASS_FRAG_NEEDED, 0,
			       TC_ACT_OK);
	return to_local_pod(slot, skb, HR_HOOK_FROM_UNDERLAY, &pkt, len, ep, HR_REDIRECT_PEER);
}
