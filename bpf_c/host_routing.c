// SPDX-License-Identifier: GPL-2.0
/*
 * eBPF host routing: two TC (clsact, direct-action) programs that forward pod
 * traffic in the node namespace without the IPv4 forwarding path of the
 * stack (netfilter hooks, conntrack, the qdisc of the host-side veth).
 *
 *   from_pod       ingress of each pod's host-side veth (traffic leaving a pod)
 *   from_underlay  ingress of the node's underlay device (traffic from other nodes)
 *
 * Both hand an IPv6 frame on, by a tail call through `progs6`, to from_pod6 /
 * from_underlay6 (each with a 512-byte stack of its own), which route IPv6
 * the same way: hop limit for TTL, Packet Too Big for frag-needed (pmtu6.h),
 * ICMPv6 control and link-local traffic left to the stack, extension headers
 * walked (parse6.h), BPF SNAT to the node's IPv6 address (nat6.h).
 *
 * A packet for a pod of this node goes straight into the pod's eth0 with
 * bpf_redirect_peer(); anything else a pod sends is routed with
 * bpf_fib_lookup() and bpf_redirect_neigh() (fib.h); one too big for its way
 * out is answered or left to the stack (pmtu.h); what leaves the cluster is
 * source-NATed to the node IP on the way (nat.h, frag.h) and its replies
 * translated back in from_underlay. Whatever the programs do not handle goes
 * to the stack unchanged (TC_ACT_OK), so the legacy path is the fallback.
 * Every verdict is counted per program (enum hr_hook) and reason (enum
 * hr_reason) and, while a monitor asks for it, traced to the `trace_events`
 * ring buffer.
 *
 * This file holds the maps and the programs, which read as the packet's
 * decisions; the mechanics of each decision live in the header named after
 * it (parse.h, ipv4_check.h, fib.h, pmtu.h, nat.h; csum.h the checksums,
 * compat.h what bcc 0.26 lacks).
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
#include "unclone.h"
#include "ipv4_check.h"
#include "fib.h"
#include "pmtu.h"
#include "nat.h"
#include "parse6.h"
#include "pmtu6.h"
#include "nat6.h"

BPF_HASH(endpoints, __u32, struct hr_endpoint, 1024);
/* Each pod's source by its host-side veth's ifindex: the spoof check's fast way. */
BPF_ARRAY(pod_veths, struct hr_pod_veth, HR_POD_VETH_SLOTS);
BPF_ARRAY(config, struct hr_config, 1);
BPF_PERCPU_ARRAY(counters, struct hr_counter, HR_FAMILY_MAX * HR_HOOK_MAX * HR_REASON_MAX);
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

/* ---- IPv6 (from_pod6, from_underlay6: the programs from_pod and from_underlay hand IPv6 to) */
BPF_HASH(endpoints6, struct hr_in6, struct hr_endpoint, 1024);
BPF_LPM_TRIE(cluster_cidrs6, struct hr_lpm6_key, __u32, 64);
BPF_LPM_TRIE(node_routes6, struct hr_lpm6_key, struct hr_route6, 256);
/* from_pod6 and from_underlay6 by enum hr_prog6: the loader fills it */
BPF_PROG_ARRAY(progs6, HR_PROG6_MAX);
BPF_PERCPU_ARRAY(icmp6_quote, struct hr_icmp6_quote, 1);	/* pmtu6.h */

/* ---- IPv6 BPF SNAT state (nat6.h): two entries per flow, as `nat`. */
#ifndef HR_NAT6_MAP_SIZE
#define HR_NAT6_MAP_SIZE 524288
#endif
BPF_TABLE("hash", struct hr_nat6_key, struct hr_nat6_entry, nat6, HR_NAT6_MAP_SIZE);
BPF_PERCPU_ARRAY(nat6_scratch, struct hr_nat6_scratch, 1);
/* Fragmented IPv6 datagrams through BPF SNAT: as `nat_frags` (LRU, HR_FRAG_MAP_SIZE). */
BPF_TABLE("lru_hash", struct hr_frag6_key, struct hr_frag_entry, nat6_frags, HR_FRAG_MAP_SIZE);
/* ---- end of nat6.h's maps */

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

static __always_inline struct hr_route *node_route_lookup(__u32 daddr)
{
	struct hr_lpm_key key = { .prefixlen = 32, .addr = daddr };

	return node_routes.lookup(&key);
}

static __always_inline struct hr_icmp_quote *icmp_quote_get(void)
{
	__u32 zero = 0;

	return icmp_quote.lookup(&zero);
}

static __always_inline struct hr_nat6_entry *nat6_lookup(struct hr_nat6_key *key)
{
	return nat6.lookup(key);
}

static __always_inline int nat6_insert(struct hr_nat6_key *key, struct hr_nat6_entry *value)
{
	return nat6.insert(key, value);
}

static __always_inline void nat6_remove(struct hr_nat6_key *key)
{
	nat6.delete(key);
}

static __always_inline struct hr_nat6_scratch *nat6_scratch_get(void)
{
	__u32 zero = 0;

	return nat6_scratch.lookup(&zero);
}

static __always_inline struct hr_frag_entry *frag6_lookup(struct hr_frag6_key *key)
{
	return nat6_frags.lookup(key);
}

static __always_inline void frag6_update(struct hr_frag6_key *key, struct hr_frag_entry *value)
{
	nat6_frags.update(key, value);
}
/* ---- end of nat6.h's accessors */

static __always_inline struct hr_route6 *node_route6_lookup(const struct hr_in6 *daddr)
{
	struct hr_lpm6_key key = { .prefixlen = 128 };

	__builtin_memcpy(key.addr, daddr->a, sizeof(key.addr));
	return node_routes6.lookup(&key);
}

static __always_inline struct hr_icmp6_quote *icmp6_quote_get(void)
{
	__u32 zero = 0;

	return icmp6_quote.lookup(&zero);
}

/* What a program knows of its packet, handed to each step and to the verdict. */
struct hr_ctx {
	/*
	 * The program's one variable for map keys: every inlined copy of
	 * verdict() would otherwise keep its own on the 512-byte stack.
	 */
	__u32 slot;
	struct __sk_buff *skb;
	struct hr_config *cfg;	/* read once, first thing in start() */
	__u32 len;		/* the length as it arrived (an ICMP reply is shorter) */
	__u32 hook;		/* enum hr_hook */
	__u32 family;		/* enum hr_family: the counters' and the trace's */
	/* for the trace: the frame's ethertype; of ARP, the operation and sender MAC */
	__u16 eth_proto;
	__u16 arp_op;
	__u8 arp_sha[6];
	/* last: struct hr_ctx6 puts the IPv6 parse in its place */
	struct hr_pkt pkt;	/* all 0 until parsed: a verdict then traces no addresses */
};

/* An ARP packet for IPv4 over Ethernet (RFC 826), as trace_frame() reads it. */
struct hr_arp_ipv4 {
	__u16 htype;
	__u16 ptype;
	__u8 hlen;
	__u8 plen;
	__u16 op;
	__u8 sha[6];
	__u8 spa[4];
	__u8 tha[6];
	__u8 tpa[4];
};

/*
 * For the trace of a frame that is not IPv4: its ethertype (of the VLAN tag
 * the device pulled into metadata, if any) and, for ARP, who asks or answers
 * about whom, in the context's addresses. Read in place: an ARP frame is all
 * linear data.
 */
static __always_inline void trace_frame_of(struct hr_ctx *c)
{
	void *data = (void *)(long)c->skb->data;
	void *data_end = (void *)(long)c->skb->data_end;
	struct ethhdr *eth = data;
	struct hr_arp_ipv4 *arp = (void *)(eth + 1);

	if ((void *)(eth + 1) > data_end)
		return;
	c->eth_proto = c->skb->vlan_present ? bpf_ntohs(c->skb->vlan_proto) : bpf_ntohs(eth->h_proto);
	if (c->eth_proto != ETH_P_ARP || (void *)(arp + 1) > data_end)
		return;
	if (arp->htype != HR_HTONS(1) || arp->ptype != HR_HTONS(ETH_P_IP) || arp->hlen != ETH_ALEN ||
	    arp->plen != 4)
		return;
	c->arp_op = bpf_ntohs(arp->op);
	__builtin_memcpy(c->arp_sha, arp->sha, ETH_ALEN);
	__builtin_memcpy(&c->pkt.saddr, arp->spa, 4);
	__builtin_memcpy(&c->pkt.daddr, arp->tpa, 4);
}

/* start() is done: the program goes on with the packet. No TC action has this value. */
#define HR_CONTINUE	(-1)

/*
 * Count a verdict and, while tracing is on, reserve its trace record with
 * what every family fills alike (addresses and ports 0: the caller's, who
 * submits it). NULL: not traced.
 */
static __always_inline struct hr_trace_event *count_verdict(struct hr_ctx *c, __u32 reason,
							    __u32 ifindex_out)
{
	struct hr_trace_event *ev;
	struct hr_counter *cnt;

	c->slot = (c->family * HR_HOOK_MAX + c->hook) * HR_REASON_MAX + reason;
	cnt = counters.lookup(&c->slot);
	if (cnt) {
		cnt->packets++;
		cnt->bytes += c->len;
	}

	if (!c->cfg || c->cfg->trace != 1)
		return 0;
	ev = trace_events.ringbuf_reserve(sizeof(*ev));
	if (!ev)
		return 0;
	__builtin_memset(ev, 0, sizeof(*ev));
	ev->ts_ns = bpf_ktime_get_ns();
	ev->hook = c->hook;
	ev->reason = reason;
	ev->ifindex_in = c->skb->ifindex;
	ev->ifindex_out = ifindex_out;
	ev->family = c->family;
	ev->len = c->len;
	ev->eth_proto = c->eth_proto;
	return ev;
}

static __always_inline void trace_submit(struct hr_trace_event *ev)
{
	trace_events.ringbuf_submit(ev, 0);
}

/*
 * Count the verdict and, while tracing is on, record it; returns `action`.
 * ifindex_out: where the packet was sent (0: nowhere, or to the stack).
 */
static __always_inline int verdict(struct hr_ctx *c, __u32 reason, __u32 ifindex_out, int action)
{
	struct hr_trace_event *ev = count_verdict(c, reason, ifindex_out);

	if (!ev)
		return action;
	parse_ports(c->skb, &c->pkt);	/* read now if no step needed them */
	ev->saddr = c->pkt.saddr;
	ev->daddr = c->pkt.daddr;
	ev->sport = c->pkt.sport;
	ev->dport = c->pkt.dport;
	ev->protocol = c->pkt.protocol;
	ev->arp_op = c->arp_op;
	__builtin_memcpy(ev->arp_sha, c->arp_sha, sizeof(ev->arp_sha));
	trace_submit(ev);
	return action;
}

/* To the kernel's stack, which takes the packet from here. */
static __always_inline int pass(struct hr_ctx *c, __u32 reason)
{
	return verdict(c, reason, 0, TC_ACT_OK);
}

static __always_inline int drop(struct hr_ctx *c, __u32 reason)
{
	return verdict(c, reason, 0, TC_ACT_SHOT);
}

/* A packet no longer parsed (a helper moved the data and parsing it again failed). */
static __always_inline int drop_unparsed(struct hr_ctx *c, __u32 reason)
{
	__builtin_memset(&c->pkt, 0, sizeof(c->pkt));
	return drop(c, reason);
}

/* An untagged IPv6 frame (the frame is known to hold an Ethernet header). */
static __always_inline int is_ipv6_frame(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;

	return (void *)(eth + 1) <= data_end && !skb->vlan_present &&
	       eth->h_proto == HR_HTONS(ETH_P_IPV6);
}

/*
 * The first steps of both programs: find the configuration, parse the packet
 * (Ethernet, IPv4, the header checksum; the ports only once a step needs
 * them: parse_ports), leave broadcast and multicast frames to the stack.
 * Returns HR_CONTINUE, or the program's verdict.
 */
static __always_inline int start(struct hr_ctx *c, struct __sk_buff *skb, __u32 hook)
{
	int rc;

	c->skb = skb;
	c->hook = hook;
	c->len = skb->len;
	c->slot = 0;
	c->cfg = config.lookup(&c->slot);	/* an array's entry 0: always there */
	c->eth_proto = ETH_P_IP;
	rc = parse_ipv4(skb, &c->pkt);
	if (rc == HR_PARSE_NOT_IPV4) {
		if (is_ipv6_frame(skb)) {
			/* to from_pod6 / from_underlay6; here only when the slot is empty */
			progs6.call(skb, hook == HR_HOOK_FROM_POD ? HR_PROG_FROM_POD6 :
				    HR_PROG_FROM_UNDERLAY6);
			c->family = HR_FAMILY_IPV6;
		}
		if (c->cfg && c->cfg->trace == 1)
			trace_frame_of(c);
		return pass(c, HR_PASS_NOT_IPV4);
	}
	if (rc != HR_PARSE_OK)
		return drop(c, HR_DROP_MALFORMED);
	if (!ipv4_csum_ok(skb, &c->pkt))
		return drop(c, HR_DROP_BAD_CHECKSUM);
	if (skb->pkt_type == PACKET_BROADCAST || skb->pkt_type == PACKET_MULTICAST)
		return pass(c, HR_PASS_L2_MULTICAST);
	if (!c->cfg)
		return pass(c, HR_PASS_NOT_ENDPOINT);
	return HR_CONTINUE;
}

/*
 * Hand the packet to a pod of this node: MACs as if the node had routed it
 * out of the pod's host-side veth, TTL decremented, un-cloned if it is bulk,
 * then straight into the ingress of the pod's eth0 (the veth peer of
 * ep->ifindex).
 */
static __always_inline int to_local_pod(struct hr_ctx *c, struct hr_endpoint *ep, __u32 reason)
{
	__u32 ifindex = ep->ifindex;

	__builtin_memcpy(c->pkt.eth->h_dest, ep->mac, ETH_ALEN);
	__builtin_memcpy(c->pkt.eth->h_source, ep->node_mac, ETH_ALEN);
	ip_decrease_ttl(c->pkt.ip);
	unclone_bulk(c->skb);
	/* With flags 0 this always answers TC_ACT_REDIRECT. */
	return verdict(c, reason, ifindex, (int)bpf_redirect_peer(ifindex, 0));
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

/*
 * Anti-spoofing: a pod sends from its own address and MAC, on its own veth.
 * `pod_veths` answers with an array read (which the verifier inlines); only
 * where it does not know the veth (or disagrees) does `endpoints` decide, so
 * the verdict is the endpoint's either way.
 */
static __always_inline int sent_by_its_pod(struct hr_ctx *c)
{
	struct hr_pod_veth *v;
	struct hr_endpoint *ep;

	c->slot = c->skb->ifindex;
	v = pod_veths.lookup(&c->slot);
	if (v && v->addr && v->addr == c->pkt.saddr && mac_equal(v->mac, c->pkt.eth->h_source))
		return 1;
	ep = endpoints.lookup(&c->pkt.saddr);
	return ep && ep->ifindex == c->skb->ifindex && mac_equal(ep->mac, c->pkt.eth->h_source);
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

/*
 * Route a packet from a pod to another node or the outside (fib_route_v4).
 * Returns HR_CONTINUE when it goes on to the next hop in *fib, with
 * *nat_then_stack set when, leaving the cluster, its next hop is not resolved
 * yet (a kernel without SKIP_NEIGH): NATed, the stack forwards it and
 * resolves the neighbour. Otherwise the verdict.
 */
static __always_inline int route_from_pod(struct hr_ctx *c, struct bpf_fib_lookup *fib,
					  int external, int *nat_then_stack)
{
	int rc;

	parse_ports(c->skb, &c->pkt);	/* the FIB hashes them (multipath), the trace shows them */
	rc = fib_route_v4(c->skb, &c->pkt, fib);

	if (rc == BPF_FIB_LKUP_RET_SUCCESS)
		return HR_CONTINUE;
	if (rc == BPF_FIB_LKUP_RET_FWD_DISABLED)
		return pass(c, HR_PASS_FWD_DISABLED);
	if (rc == BPF_FIB_LKUP_RET_NOT_FWDED)
		return pass(c, HR_PASS_LOCAL);
	if (external && rc == BPF_FIB_LKUP_RET_NO_NEIGH) {
		*nat_then_stack = 1;
		return HR_CONTINUE;
	}
	/* un-NATed, a routable packet must not reach the stack: it would leave as is */
	if (external && rc == BPF_FIB_LKUP_RET_UNSUPP_LWT)
		return drop(c, HR_DROP_NAT_UNSUPPORTED);
	/* no route (blackhole, unreachable, prohibit): the stack answers the pod */
	return pass(c, HR_PASS_FIB_MISS);
}

/* Too big for its way out, DF set: the pod hears so, from its gateway, into its eth0. */
static __always_inline int frag_needed_to_pod(struct hr_ctx *c, __u32 mtu)
{
	__u32 ifindex = c->skb->ifindex;	/* the peer of this very veth */

	parse_ports(c->skb, &c->pkt);	/* for the trace, before the reply replaces them */
	if (icmp_frag_needed(c->skb, &c->pkt, mtu, c->cfg->router_ip) < 0)
		return drop(c, HR_DROP_ICMP_FAILED);
	return verdict(c, HR_ICMP_FRAG_NEEDED, ifindex, (int)bpf_redirect_peer(ifindex, 0));
}

/*
 * From a pod to another node, or out of the cluster: the packet is routed
 * (route_from_pod) and, leaving the cluster, source-NATed.
 */
static __always_inline int from_pod_routed(struct hr_ctx *c)
{
	struct bpf_fib_lookup fib = {};
	__u32 *range, mtu;
	int rc, external;
	int nat_then_stack = 0;	/* leaves the cluster, through the stack once NATed */

	range = cluster_range(c->pkt.daddr);
	external = c->cfg->node_ip && !range;
	if (range && (*range & HR_CIDR_DENY_FROM_POD))
		return drop(c, HR_DROP_POD_TO_NODE);
	/*
	 * Fragments inside the cluster go to the stack; leaving it, they are
	 * routed and NATed like whole packets (the fragment map of frag.h).
	 */
	if (c->pkt.fragment && !external)
		return pass(c, HR_PASS_FRAGMENT);
	/* Without a node IP to masquerade to, the stack (and its MASQUERADE) takes it. */
	if (!c->cfg->node_ip && !range)
		return pass(c, HR_PASS_EXTERNAL);
	rc = route_from_pod(c, &fib, external, &nat_then_stack);
	if (rc != HR_CONTINUE)
		return rc;
	/* The stack checks the TTL before the MTU: so do we. */
	if (c->pkt.ip->ttl <= 1)
		return pass(c, HR_PASS_TTL);
	if (!nat_then_stack && !fits_egress(c->skb, &c->pkt, fib.ifindex, &mtu)) {
		if (c->pkt.ip->frag_off & HR_HTONS(HR_IP_DF))
			return frag_needed_to_pod(c, mtu);
		/* DF clear: the stack fragments it (NATed first if it leaves the cluster). */
		if (!external)
			return pass(c, HR_PASS_FRAG_NEEDED);
		nat_then_stack = 1;
	}
	if (!nat_then_stack)
		ip_decrease_ttl(c->pkt.ip);
	if (!external)
		return verdict(c, HR_REDIRECT_NEIGH, fib.ifindex, fib_redirect_v4(&fib));

	/* Leaves the cluster: from the node IP and a NAT port (pointers stale after). */
	rc = snat_out(c->skb, &c->pkt, c->cfg);
	if (rc)
		return drop(c, rc);
	/* the stack takes it from here (accept_local lets it in with the node IP) */
	if (nat_then_stack)
		return pass(c, HR_SNAT_PASS_FRAG_NEEDED);
	return verdict(c, c->pkt.fragment ? HR_SNAT_FRAGMENT : HR_SNAT_REDIRECT_NEIGH, fib.ifindex,
		       fib_redirect_v4(&fib));
}

/* Traffic leaving a pod, at ingress of its host-side veth. */
int from_pod(struct __sk_buff *skb)
{
	struct hr_ctx c = {};
	struct hr_endpoint *ep;
	__u32 mtu;
	int rc;

	rc = start(&c, skb, HR_HOOK_FROM_POD);
	if (rc != HR_CONTINUE)
		return rc;
	if (!sent_by_its_pod(&c))
		return drop(&c, HR_DROP_SPOOFED);

	/*
	 * A pod of this node first, without the cluster trie: a pod's address is
	 * in the cluster and never in a range closed to pods (another node's
	 * host namespace).
	 */
	ep = endpoints.lookup(&c.pkt.daddr);
	if (!ep)
		return from_pod_routed(&c);
	if (c.pkt.fragment)
		return pass(&c, HR_PASS_FRAGMENT);
	if (c.pkt.ip->ttl <= 1)
		return pass(&c, HR_PASS_TTL);
	/*
	 * The MTU of the pod's host-side veth (the peer redirect skips the
	 * check of its eth0; a CNI gives both ends one).
	 */
	if (!fits_egress(skb, &c.pkt, ep->ifindex, &mtu)) {
		if (c.pkt.ip->frag_off & HR_HTONS(HR_IP_DF))
			return frag_needed_to_pod(&c, mtu);
		return pass(&c, HR_PASS_FRAG_NEEDED);
	}
	return to_local_pod(&c, ep, HR_REDIRECT_PEER);
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
static __always_inline int from_outside_to_node(struct hr_ctx *c)
{
	struct __sk_buff *skb = c->skb;
	struct hr_pkt *pkt = &c->pkt;
	struct hr_endpoint *ep;
	__u32 pod_ip = 0, reason = HR_RNAT_REDIRECT_PEER, mtu, ifindex;
	__u32 node_ip = pkt->daddr;
	__u16 nat_port;
	int rc;

	parse_ports(skb, pkt);
	nat_port = pkt->dport;	/* TCP, UDP */
	rc = rnat_in(skb, pkt, c->cfg, &pod_ip);
	if (rc == HR_PASS_NAT_MISS && pkt->protocol == IPPROTO_ICMP) {
		rc = rnat_icmp_error(skb, pkt, c->cfg, &pod_ip);
		reason = HR_RNAT_ICMP_ERROR;
	}
	if (rc == HR_PASS_NAT_MISS || rc == HR_PASS_FRAG_UNTRACKED)
		return pass(c, rc);
	if (rc)
		return drop(c, rc);

	/* The helpers moved the data: parse again for the MAC and TTL rewrite. */
	if (parse_ipv4(skb, pkt) != HR_PARSE_OK)
		return drop_unparsed(c, HR_DROP_NAT_FAILED);
	ep = endpoints.lookup(&pod_ip);
	if (!ep)
		return drop(c, HR_DROP_NAT_NO_ENDPOINT);
	/* Routed on to the pod it would expire; the stack would answer for the node instead. */
	if (pkt->ip->ttl <= 1)
		return drop(c, HR_DROP_NAT_TTL);
	if (!fits_egress(skb, pkt, ep->ifindex, &mtu)) {
		if (!(pkt->ip->frag_off & HR_HTONS(HR_IP_DF)) || reason == HR_RNAT_ICMP_ERROR ||
		    (pkt->protocol != IPPROTO_TCP && pkt->protocol != IPPROTO_UDP))
			return pass(c, HR_PASS_FRAG_NEEDED);
		/* back to the node IP and NAT port, then answered as the remote's datagram */
		parse_ports(skb, pkt);
		if (nat_rewrite(skb, pkt, 0, pod_ip, node_ip, pkt->dport, nat_port) < 0 ||
		    parse_ipv4(skb, pkt) != HR_PARSE_OK)
			return drop_unparsed(c, HR_DROP_ICMP_FAILED);
		parse_ports(skb, pkt);	/* for the trace, before the reply replaces them */
		ifindex = skb->ifindex;
		if (icmp_frag_needed(skb, pkt, mtu, node_ip) < 0)
			return drop(c, HR_DROP_ICMP_FAILED);
		/* out of the underlay device, MACs swapped: to the sender's next hop */
		return verdict(c, HR_ICMP_FRAG_NEEDED, ifindex, (int)bpf_redirect(ifindex, 0));
	}
	return to_local_pod(c, ep, pkt->fragment ? HR_RNAT_FRAGMENT : reason);
}

/* Traffic from other nodes and the outside, at ingress of the node's underlay device. */
int from_underlay(struct __sk_buff *skb)
{
	struct hr_ctx c = {};
	struct hr_endpoint *ep;
	__u32 mtu;
	int rc;

	rc = start(&c, skb, HR_HOOK_FROM_UNDERLAY);
	if (rc != HR_CONTINUE)
		return rc;
	if (c.cfg->node_ip && c.pkt.daddr == c.cfg->node_ip)
		return from_outside_to_node(&c);
	if (c.pkt.fragment) {
		/* from outside, not even in pieces: the stack would reassemble it for the pod */
		if (!in_cluster(c.pkt.saddr) && endpoints.lookup(&c.pkt.daddr))
			return drop(&c, HR_DROP_NOT_FROM_CLUSTER);
		return pass(&c, HR_PASS_FRAGMENT);
	}

	ep = endpoints.lookup(&c.pkt.daddr);
	if (!ep)
		return pass(&c, HR_PASS_NOT_ENDPOINT);
	/* Pods are reached directly from inside the cluster only; the outside gets replies. */
	if (!in_cluster(c.pkt.saddr))
		return drop(&c, HR_DROP_NOT_FROM_CLUSTER);
	if (c.pkt.ip->ttl <= 1)
		return pass(&c, HR_PASS_TTL);
	/*
	 * Too big for the pod's link (narrower than the underlay): the stack
	 * fragments it, or with DF answers the sender on its other node.
	 */
	if (!fits_egress(skb, &c.pkt, ep->ifindex, &mtu))
		return pass(&c, HR_PASS_FRAG_NEEDED);
	return to_local_pod(&c, ep, HR_REDIRECT_PEER);
}

/* ---- IPv6: from_pod6 and from_underlay6, tail-called by from_pod and from_underlay --------- */

/*
 * What an IPv6 program knows of its packet: the context every step and
 * count_verdict() use (c), with the IPv6 parse (pkt) where IPv4's would be,
 * so that the IPv6 programs keep their 512-byte stack for BPF SNAT. The IPv6
 * steps never read c.pkt.
 */
struct hr_ctx6 {
	union {
		struct hr_ctx c;
		struct {
			__u8 head[__builtin_offsetof(struct hr_ctx, pkt)];
			struct hr_pkt6 pkt;
		};
	};
};

/* verdict() for IPv6: the trace record carries the IPv6 addresses. */
static __always_inline int verdict6(struct hr_ctx6 *x, __u32 reason, __u32 ifindex_out,
				    int action)
{
	struct hr_trace_event *ev = count_verdict(&x->c, reason, ifindex_out);

	if (!ev)
		return action;
	parse_ports6(x->c.skb, &x->pkt);
	__builtin_memcpy(ev->saddr6, x->pkt.saddr.a, sizeof(ev->saddr6));
	__builtin_memcpy(ev->daddr6, x->pkt.daddr.a, sizeof(ev->daddr6));
	ev->sport = x->pkt.sport;
	ev->dport = x->pkt.dport;
	ev->protocol = x->pkt.protocol;
	trace_submit(ev);
	return action;
}

static __always_inline int pass6(struct hr_ctx6 *x, __u32 reason)
{
	return verdict6(x, reason, 0, TC_ACT_OK);
}

static __always_inline int drop6(struct hr_ctx6 *x, __u32 reason)
{
	return verdict6(x, reason, 0, TC_ACT_SHOT);
}

static __always_inline int in6_is_zero(const struct hr_in6 *a)
{
	return !(a->a[0] | a->a[1] | a->a[2] | a->a[3]);
}

static __always_inline int in6_equal(const struct hr_in6 *a, const struct hr_in6 *b)
{
	return !((a->a[0] ^ b->a[0]) | (a->a[1] ^ b->a[1]) | (a->a[2] ^ b->a[2]) |
		 (a->a[3] ^ b->a[3]));
}

/* fe80::/10 */
static __always_inline int in6_link_local(const struct hr_in6 *a)
{
	return (a->a[0] & HR_HTONL(0xffc00000)) == HR_HTONL(0xfe800000);
}

/* ff00::/8 */
static __always_inline int in6_multicast(const struct hr_in6 *a)
{
	return (a->a[0] & HR_HTONL(0xff000000)) == HR_HTONL(0xff000000);
}

/*
 * ICMPv6 the stack must see, never routed blindly: every informational
 * message but echo (RFC 4443 types 128-129), i.e. router and neighbour
 * discovery (133-137), MLD (130-132, 143), and the rest of the control
 * plane. Errors (types below 128) and echo are routed like any packet.
 */
static __always_inline int icmp6_control(struct hr_ctx6 *x)
{
	return icmp6_type(x->c.skb, &x->pkt) > 129;
}

/* An ICMPv6 error message (types below 128): never answered with another (RFC 4443 2.4 (e)). */
static __always_inline int icmp6_error(struct hr_ctx6 *x)
{
	int type = icmp6_type(x->c.skb, &x->pkt);

	return type >= 0 && type < 128;
}

/*
 * The first steps of both IPv6 programs, as start(): the configuration, the
 * parse (a malformed fixed header is dropped; extension headers that cannot
 * be walked leave pkt.ext_unwalked set for the program to judge).
 */
static __always_inline int start6(struct hr_ctx6 *x, struct __sk_buff *skb, __u32 hook)
{
	int rc;

	x->c.skb = skb;
	x->c.hook = hook;
	x->c.family = HR_FAMILY_IPV6;
	x->c.len = skb->len;
	x->c.slot = 0;
	x->c.cfg = config.lookup(&x->c.slot);
	x->c.eth_proto = ETH_P_IPV6;
	rc = parse_ipv6(skb, &x->pkt);
	if (rc == HR_PARSE6_NOT_IPV6)	/* not from from_pod / from_underlay's hand-over */
		return pass6(x, HR_PASS_NOT_IPV4);
	if (rc == HR_PARSE6_MALFORMED)
		return drop6(x, HR_DROP_MALFORMED);
	if (!x->c.cfg)
		return pass6(x, HR_PASS_NOT_ENDPOINT);
	return HR_CONTINUE;
}

/* A frame sent to a group (ff00::/8, or an Ethernet broadcast/multicast): the stack's. */
static __always_inline int multicast6(struct hr_ctx6 *x)
{
	return in6_multicast(&x->pkt.daddr) || x->c.skb->pkt_type == PACKET_BROADCAST ||
	       x->c.skb->pkt_type == PACKET_MULTICAST;
}

/*
 * to_local_pod() for IPv6: MACs rewritten, hop limit decremented, un-cloned if
 * bulk, into the pod's eth0.
 */
static __always_inline int to_local_pod6(struct hr_ctx6 *x, struct hr_endpoint *ep, __u32 reason)
{
	__u32 ifindex = ep->ifindex;

	__builtin_memcpy(x->pkt.eth->h_dest, ep->mac, ETH_ALEN);
	__builtin_memcpy(x->pkt.eth->h_source, ep->node_mac, ETH_ALEN);
	x->pkt.ip6->hop_limit--;
	unclone_bulk(x->c.skb);
	return verdict6(x, reason, ifindex, (int)bpf_redirect_peer(ifindex, 0));
}

/* sent_by_its_pod() for IPv6: pod_veths' addr6 and MAC, else endpoints6. */
static __always_inline int sent_by_its_pod6(struct hr_ctx6 *x)
{
	struct hr_pod_veth *v;
	struct hr_endpoint *ep;

	x->c.slot = x->c.skb->ifindex;
	v = pod_veths.lookup(&x->c.slot);
	if (v && !in6_is_zero((struct hr_in6 *)v->addr6) &&
	    in6_equal((struct hr_in6 *)v->addr6, &x->pkt.saddr) &&
	    mac_equal(v->mac, x->pkt.eth->h_source))
		return 1;
	ep = endpoints6.lookup(&x->pkt.saddr);
	return ep && ep->ifindex == x->c.skb->ifindex && mac_equal(ep->mac, x->pkt.eth->h_source);
}

/* The cluster_cidrs6 value (enum hr_cidr_flags) of an address; NULL outside the cluster. */
static __always_inline __u32 *cluster_range6(const struct hr_in6 *addr)
{
	struct hr_lpm6_key key = { .prefixlen = 128 };

	__builtin_memcpy(key.addr, addr->a, sizeof(key.addr));
	return cluster_cidrs6.lookup(&key);
}

/* Too big for its way out: the pod hears so, from its gateway, into its eth0. */
static __always_inline int packet_too_big_to_pod(struct hr_ctx6 *x, __u32 mtu)
{
	__u32 ifindex = x->c.skb->ifindex;

	parse_ports6(x->c.skb, &x->pkt);	/* for the trace, before the reply replaces them */
	if (icmp6_packet_too_big(x->c.skb, &x->pkt, mtu, (struct hr_in6 *)x->c.cfg->router_ip6) < 0)
		return drop6(x, HR_DROP_ICMP_FAILED);
	return verdict6(x, HR_ICMP_FRAG_NEEDED, ifindex, (int)bpf_redirect_peer(ifindex, 0));
}

/*
 * route_from_pod() for IPv6 (fib_route_v6): the next hop in *nh. The lookup's
 * 64 bytes live in here only, so that BPF SNAT after it has their stack.
 */
static __always_inline int route_from_pod6(struct hr_ctx6 *x, struct hr_nexthop6 *nh,
					   int external, int *nat_then_stack)
{
	struct bpf_fib_lookup fib = {};
	int rc;

	parse_ports6(x->c.skb, &x->pkt);
	rc = fib_route_v6(x->c.skb, &x->pkt, &fib);
	nh->ifindex = fib.ifindex;
	__builtin_memcpy(nh->addr.a, fib.ipv6_dst, sizeof(nh->addr));
	if (rc == BPF_FIB_LKUP_RET_SUCCESS)
		return HR_CONTINUE;
	if (rc == BPF_FIB_LKUP_RET_FWD_DISABLED)
		return pass6(x, HR_PASS_FWD_DISABLED);
	if (rc == BPF_FIB_LKUP_RET_NOT_FWDED)
		return pass6(x, HR_PASS_LOCAL);
	if (external && rc == BPF_FIB_LKUP_RET_NO_NEIGH) {
		*nat_then_stack = 1;
		return HR_CONTINUE;
	}
	if (external && rc == BPF_FIB_LKUP_RET_UNSUPP_LWT)
		return drop6(x, HR_DROP_NAT_UNSUPPORTED);
	return pass6(x, HR_PASS_FIB_MISS);
}

/* from_pod_routed() for IPv6: to another node, or out of the cluster (snat_out6). */
static __always_inline int from_pod6_routed(struct hr_ctx6 *x)
{
	struct hr_nexthop6 nh = {};
	__u32 *range, mtu;
	int rc, external, snat;
	int nat_then_stack = 0;

	range = cluster_range6(&x->pkt.daddr);
	snat = !in6_is_zero((struct hr_in6 *)x->c.cfg->node_ip6);
	external = snat && !range;
	if (range && (*range & HR_CIDR_DENY_FROM_POD))
		return drop6(x, HR_DROP_POD_TO_NODE);
	if (x->pkt.fragment && !external)
		return pass6(x, HR_PASS_FRAGMENT);
	if (!snat && !range)
		return pass6(x, HR_PASS_EXTERNAL);
	rc = route_from_pod6(x, &nh, external, &nat_then_stack);
	if (rc != HR_CONTINUE)
		return rc;
	if (x->pkt.ip6->hop_limit <= 1)
		return pass6(x, HR_PASS_TTL);
	/* IPv6 routers never fragment: too big is answered, whatever the next hop */
	if (!fits_egress6(x->c.skb, &x->pkt, nh.ifindex, &mtu)) {
		if (!icmp6_error(x))
			return packet_too_big_to_pod(x, mtu);
		/* an error about an error: the stack drops it (NATed first if it leaves) */
		if (!external)
			return pass6(x, HR_PASS_FRAG_NEEDED);
		nat_then_stack = 1;
	}
	if (!nat_then_stack)
		x->pkt.ip6->hop_limit--;
	if (!external)
		return verdict6(x, HR_REDIRECT_NEIGH, nh.ifindex, fib_redirect_v6(&nh));

	/* Leaves the cluster: from node_ip6 and a NAT port (pointers stale after). */
	rc = snat_out6(x->c.skb, &x->pkt, x->c.cfg);
	if (rc)
		return drop6(x, rc);
	if (nat_then_stack)
		return pass6(x, HR_SNAT_PASS_FRAG_NEEDED);
	return verdict6(x, x->pkt.fragment ? HR_SNAT_FRAGMENT : HR_SNAT_REDIRECT_NEIGH,
			nh.ifindex, fib_redirect_v6(&nh));
}

/* For the node itself: its pods' gateway or its IPv6 SNAT address. */
static __always_inline int for_the_node6(struct hr_ctx6 *x)
{
	struct hr_in6 *gw = (struct hr_in6 *)x->c.cfg->router_ip6;
	struct hr_in6 *node = (struct hr_in6 *)x->c.cfg->node_ip6;

	return (!in6_is_zero(gw) && in6_equal(&x->pkt.daddr, gw)) ||
	       (!in6_is_zero(node) && in6_equal(&x->pkt.daddr, node));
}

/*
 * A pod's packet the program does not route (extension headers it cannot
 * walk, ICMPv6 control) is the stack's when it stays on the pod's link (a
 * link-local or group destination) or is for the node; to elsewhere in the
 * cluster the stack routes it as the program would. Un-NATed, a routable
 * packet must not reach the stack: leaving the cluster with BPF SNAT on it is
 * dropped, and another node's host namespace stays closed to pods.
 */
static __always_inline int from_pod6_to_stack(struct hr_ctx6 *x, __u32 reason)
{
	__u32 *range;

	if (in6_link_local(&x->pkt.daddr) || multicast6(x) || for_the_node6(x))
		return pass6(x, reason);
	range = cluster_range6(&x->pkt.daddr);
	if (range && (*range & HR_CIDR_DENY_FROM_POD))
		return drop6(x, HR_DROP_POD_TO_NODE);
	if (!range && !in6_is_zero((struct hr_in6 *)x->c.cfg->node_ip6))
		return drop6(x, HR_DROP_NAT_UNSUPPORTED);
	return pass6(x, reason);
}

/* IPv6 leaving a pod, at ingress of its host-side veth (from from_pod). */
int from_pod6(struct __sk_buff *skb)
{
	struct hr_ctx6 x = {};
	struct hr_endpoint *ep;
	__u32 mtu;
	int rc;

	rc = start6(&x, skb, HR_HOOK_FROM_POD);
	if (rc != HR_CONTINUE)
		return rc;
	if (x.pkt.ext_unwalked) {
		/* the stack judges it, but only from the pod's own address (or its link's) */
		if (!in6_link_local(&x.pkt.saddr) && !sent_by_its_pod6(&x))
			return drop6(&x, HR_DROP_SPOOFED);
		return from_pod6_to_stack(&x, HR_PASS_EXT_HEADERS);
	}
	if (icmp6_control(&x)) {
		/* from the pod's link-local address, its own, or none (DAD, to a group) */
		if (!in6_link_local(&x.pkt.saddr) &&
		    !(in6_is_zero(&x.pkt.saddr) && in6_multicast(&x.pkt.daddr)) &&
		    !sent_by_its_pod6(&x))
			return drop6(&x, HR_DROP_SPOOFED);
		return from_pod6_to_stack(&x, HR_PASS_ICMP6_CONTROL);
	}
	if (in6_link_local(&x.pkt.saddr) || in6_link_local(&x.pkt.daddr))
		return drop6(&x, HR_DROP_LINK_LOCAL);
	if (multicast6(&x))
		return pass6(&x, HR_PASS_L2_MULTICAST);
	if (!sent_by_its_pod6(&x))
		return drop6(&x, HR_DROP_SPOOFED);

	ep = endpoints6.lookup(&x.pkt.daddr);
	if (!ep)
		return from_pod6_routed(&x);
	if (x.pkt.fragment)
		return pass6(&x, HR_PASS_FRAGMENT);
	if (x.pkt.ip6->hop_limit <= 1)
		return pass6(&x, HR_PASS_TTL);
	if (!fits_egress6(skb, &x.pkt, ep->ifindex, &mtu))
		return icmp6_error(&x) ? pass6(&x, HR_PASS_FRAG_NEEDED)
				       : packet_too_big_to_pod(&x, mtu);
	return to_local_pod6(&x, ep, HR_REDIRECT_PEER);
}

/*
 * A reply translated for its pod (from_outside_to_node6) but too big for the
 * pod's link (narrower than the underlay). IPv6 routers never fragment, and
 * the stack's Packet Too Big about the translated packet would quote the
 * pod's address and port, a datagram the remote never sent: its TCP or UDP
 * would find no socket for the quote and learn nothing. So, as IPv4's
 * from_outside_to_node does for DF set: TCP and UDP are translated back (to
 * node_ip6 and the NAT port, `nat_port`) and answered here with a Packet Too
 * Big from node_ip6 quoting the datagram as the remote sent it, out of the
 * underlay device it came in on (MACs swapped). ICMPv6 errors, echo replies
 * and later fragments (no L4 header to undo; the first, the largest, was
 * answered) go to the stack translated (pass_frag_needed).
 */
static __always_inline int reply_too_big6(struct hr_ctx6 *x, struct hr_in6 *pod,
					  __u16 nat_port, __u32 reason, __u32 mtu)
{
	struct __sk_buff *skb = x->c.skb;
	struct hr_in6 *node_ip6 = (struct hr_in6 *)x->c.cfg->node_ip6;
	__u32 ifindex = skb->ifindex;

	if (reason == HR_RNAT_ICMP_ERROR || x->pkt.later_fragment ||
	    (x->pkt.protocol != IPPROTO_TCP && x->pkt.protocol != IPPROTO_UDP))
		return pass6(x, HR_PASS_FRAG_NEEDED);
	parse_ports6(skb, &x->pkt);
	if (nat6_rewrite(skb, &x->pkt, 0, pod, node_ip6, x->pkt.dport, nat_port) < 0 ||
	    parse_ipv6(skb, &x->pkt) != HR_PARSE6_OK) {
		__builtin_memset(&x->pkt, 0, sizeof(x->pkt));
		return drop6(x, HR_DROP_ICMP_FAILED);
	}
	parse_ports6(skb, &x->pkt);	/* for the trace, before the reply replaces them */
	if (icmp6_packet_too_big(skb, &x->pkt, mtu, node_ip6) < 0)
		return drop6(x, HR_DROP_ICMP_FAILED);
	return verdict6(x, HR_ICMP_FRAG_NEEDED, ifindex, (int)bpf_redirect(ifindex, 0));
}

/*
 * An IPv6 packet for node_ip6: a reply to a flow snat_out6() opened (or an
 * ICMPv6 error about one) goes back into its pod; anything else is the
 * node's own. A reply too big for the pod's link: reply_too_big6().
 */
static __always_inline int from_outside_to_node6(struct hr_ctx6 *x)
{
	struct hr_endpoint *ep;
	struct hr_in6 pod = {};
	__u32 reason = HR_RNAT_REDIRECT_PEER, mtu;
	__u16 nat_port;
	int rc;

	parse_ports6(x->c.skb, &x->pkt);
	nat_port = x->pkt.dport;	/* TCP, UDP */
	rc = rnat_in6(x->c.skb, &x->pkt, x->c.cfg, &pod);
	if (rc == HR_PASS_NAT_MISS && x->pkt.protocol == IPPROTO_ICMPV6) {
		rc = rnat_icmp6_error(x->c.skb, &x->pkt, x->c.cfg, &pod);
		reason = HR_RNAT_ICMP_ERROR;
	}
	if (rc == HR_PASS_NAT_MISS || rc == HR_PASS_FRAG_UNTRACKED)
		return pass6(x, rc);
	if (rc)
		return drop6(x, rc);
	if (parse_ipv6(x->c.skb, &x->pkt) != HR_PARSE6_OK) {
		__builtin_memset(&x->pkt, 0, sizeof(x->pkt));
		return drop6(x, HR_DROP_NAT_FAILED);
	}
	ep = endpoints6.lookup(&pod);
	if (!ep)
		return drop6(x, HR_DROP_NAT_NO_ENDPOINT);
	if (x->pkt.ip6->hop_limit <= 1)
		return drop6(x, HR_DROP_NAT_TTL);
	if (!fits_egress6(x->c.skb, &x->pkt, ep->ifindex, &mtu))
		return reply_too_big6(x, &pod, nat_port, reason, mtu);
	return to_local_pod6(x, ep, x->pkt.fragment ? HR_RNAT_FRAGMENT : reason);
}

/* IPv6 from other nodes and the outside, at ingress of the underlay (from from_underlay). */
int from_underlay6(struct __sk_buff *skb)
{
	struct hr_ctx6 x = {};
	struct hr_endpoint *ep;
	__u32 mtu;
	int rc;

	rc = start6(&x, skb, HR_HOOK_FROM_UNDERLAY);
	if (rc != HR_CONTINUE)
		return rc;
	/* Pods are reached directly from inside the cluster only, whatever the headers. */
	ep = endpoints6.lookup(&x.pkt.daddr);
	if (ep && !cluster_range6(&x.pkt.saddr))
		return drop6(&x, HR_DROP_NOT_FROM_CLUSTER);
	if (x.pkt.ext_unwalked)
		return pass6(&x, HR_PASS_EXT_HEADERS);
	if (icmp6_control(&x))
		return pass6(&x, HR_PASS_ICMP6_CONTROL);
	/* link-local: for the node on this link, never a pod's */
	if (in6_link_local(&x.pkt.saddr) || in6_link_local(&x.pkt.daddr))
		return pass6(&x, HR_PASS_LOCAL);
	if (multicast6(&x))
		return pass6(&x, HR_PASS_L2_MULTICAST);
	if (!in6_is_zero((struct hr_in6 *)x.c.cfg->node_ip6) &&
	    in6_equal(&x.pkt.daddr, (struct hr_in6 *)x.c.cfg->node_ip6))
		return from_outside_to_node6(&x);
	if (x.pkt.fragment)
		return pass6(&x, HR_PASS_FRAGMENT);
	if (!ep)
		return pass6(&x, HR_PASS_NOT_ENDPOINT);
	if (x.pkt.ip6->hop_limit <= 1)
		return pass6(&x, HR_PASS_TTL);
	if (!fits_egress6(skb, &x.pkt, ep->ifindex, &mtu))
		return pass6(&x, HR_PASS_FRAG_NEEDED);
	return to_local_pod6(&x, ep, HR_REDIRECT_PEER);
}
