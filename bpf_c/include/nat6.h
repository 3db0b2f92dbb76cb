/* SPDX-License-Identifier: GPL-2.0 */
/*
 * BPF SNAT for IPv6: traffic leaving the cluster from a pod is masqueraded to
 * the node's IPv6 address (config.node_ip6) and a NAT port (ICMPv6 echo: its
 * identifier), and the replies, and ICMPv6 errors about its flows, translated
 * back, as nat.h does for IPv4: the same flows (nat_flow.h, instantiated here
 * as nat6_twin, nat6_alive, nat6_lookup_or_create, ...) in their own map,
 * `nat6`, with the same expiry, TCP state, RST plausibility, port reuse and
 * coarse last_seen refresh; the sweep of datapath/nat_table.py covers both.
 *
 * What differs from IPv4:
 * - no header checksum: an address is rewritten with BPF_F_RECOMPUTE_CSUM
 *   (a CHECKSUM_COMPLETE skb stays right) and every L4 checksum covers it
 *   through the pseudo-header, ICMPv6's included (BPF_F_PSEUDO_HDR);
 * - the UDP checksum is mandatory (RFC 8200): a datagram without one is not
 *   NATed (a pod's is dropped as unsupported, a remote's left to the stack,
 *   which drops it); a 0 result is sent as 0xffff (BPF_F_MARK_MANGLED_0);
 * - ICMPv6 errors (destination unreachable, packet too big, time exceeded,
 *   parameter problem) quote an IPv6 header without a checksum of its own; the
 *   quoted L4 checksum (ICMPv6's too) covers the quoted addresses;
 * - fragments: the Fragment header's 32-bit identification tells datagrams
 *   apart (`nat6_frags`, keyed by struct hr_frag6_key with the Fragment
 *   header's next header, which every fragment carries; extension headers
 *   after it are in the first only, so the first records its L4 protocol
 *   beside its ports); a later fragment's only change is its address (the
 *   L4 checksum, in the first, covers it).
 *   TCP fragments, and fragments of other protocols, are not NATed (dropped,
 *   counted), as IPv4's.
 * The maps and their accessors are in host_routing.c's nat6 block.
 */
#ifndef HR_NAT6_H
#define HR_NAT6_H

#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/in6.h>

#include "hostrouting_shared.h"
#include "compat.h"
#include "parse6.h"
#include "frag.h"
#include "nat.h"

/* Offsets in the IPv6 header (from the Ethernet header's end) and the Fragment header. */
#define HR_IP6_SADDR_OFF	8
#define HR_IP6_DADDR_OFF	24
#define HR_FRAG6_ID_OFF		4
#define HR_FRAG6_HLEN		8
/* ICMPv6 error types NAT translates (RFC 4443) */
#define HR_ICMP6_DEST_UNREACH	1
#define HR_ICMP6_PARAMPROB	4	/* 2 packet too big, 3 time exceeded: in between */
#define HR_ICMP6_HLEN		8

/* As struct hr_nat_scratch, for the `nat6` map: per CPU, off the 512-byte stack. */
struct hr_nat6_scratch {
	struct hr_nat6_key key;		/* the packet's own flow */
	struct hr_nat6_key rk;		/* the IN key being claimed */
	struct hr_nat6_key tk;		/* a twin being looked at */
	struct hr_nat6_entry val;	/* an entry about to be inserted */
	struct hr_frag6_key fk;		/* the datagram of a fragment */
	struct hr_frag_entry fv;	/* its record, about to be written */
	struct hr_in6 addr;		/* the address a translation writes */
	struct hr_nat_l4 l4;		/* the packet's ports and TCP header */
	struct ipv6hdr inner;		/* the header an ICMPv6 error quotes */
	__u8 icmp[HR_ICMP6_HLEN];	/* the error's ICMPv6 header */
	__u8 il4[8];			/* the start of the quoted L4 header */
};

/* Accessors of the `nat6`, `nat6_scratch` and `nat6_frags` maps, defined in host_routing.c. */
static __always_inline struct hr_nat6_entry *nat6_lookup(struct hr_nat6_key *key);
static __always_inline int nat6_insert(struct hr_nat6_key *key, struct hr_nat6_entry *value);
static __always_inline void nat6_remove(struct hr_nat6_key *key);
static __always_inline struct hr_nat6_scratch *nat6_scratch_get(void);
static __always_inline struct hr_frag_entry *frag6_lookup(struct hr_frag6_key *key);
static __always_inline void frag6_update(struct hr_frag6_key *key, struct hr_frag_entry *value);

static __always_inline int nat6_addr_eq(const struct hr_in6 *a, const struct hr_in6 *b)
{
	return ((a->a[0] ^ b->a[0]) | (a->a[1] ^ b->a[1]) | (a->a[2] ^ b->a[2]) |
		(a->a[3] ^ b->a[3])) == 0;
}

/*
 * A compiler barrier on a pointer: after it, what is derived from the pointer
 * (the addresses of the scratch's keys, of the config's fields) is computed
 * again, not kept from before. Without it clang hoists a dozen such addresses
 * out of the port allocation loop and spills them: from_pod6 took 504 of its
 * 512 bytes of stack, 440 with it.
 */
#define HR_NAT6_OPAQUE(ptr)	asm volatile("" : "+r"(ptr))

/* The flows of the `nat6` map (nat_flow.h): nat6_twin, nat6_alive, nat6_lookup_or_create, ... */
#define NF(name)		nat6_##name
#define NF_KEY			struct hr_nat6_key
#define NF_ENTRY		struct hr_nat6_entry
#define NF_SCRATCH		struct hr_nat6_scratch
#define NF_ADDR			struct hr_in6
#define NF_ADDR_EQ(a, b)	nat6_addr_eq(&(a), &(b))
#define NF_NODE_ADDR(dst, cfg)	__builtin_memcpy(&(dst), (cfg)->node_ip6, sizeof(dst))
#define NF_OPAQUE(ptr)		HR_NAT6_OPAQUE(ptr)
#include "nat_flow.h"

/* The 16-bit checksum `check` after a 16-byte field went from *from to *to (RFC 1624). */
static __always_inline __u16 csum_replace16(__u16 check, struct hr_in6 *from, struct hr_in6 *to)
{
	__s64 sum = hr_csum_diff(from->a, sizeof(*from), to->a, sizeof(*to), (__u16)~check);

	return sum < 0 ? check : csum_fold32((__u32)sum);
}

/*
 * nat_read_l4_at for IPv6 (ICMPv6 echo); -1 also for UDP without a checksum,
 * which IPv6 does not allow (RFC 8200 8.1), and for an L4 header (TCP's 20
 * bytes, UDP's or ICMPv6's 8) not all within the payload length: bytes past
 * it (Ethernet padding) are no ports, and rewriting them would change what
 * the packet does not carry.
 */
static __always_inline int nat6_read_l4(struct __sk_buff *skb, struct hr_pkt6 *pkt,
					struct hr_nat_l4 *l4, int out)
{
	__u16 check;

	if (pkt->l4_off + (pkt->protocol == IPPROTO_TCP ? 20 : 8) > pkt->end)
		return -1;
	if (nat_read_l4_at(skb, pkt->protocol, pkt->l4_off, l4, out, 1) < 0)
		return -1;
	if (pkt->protocol == IPPROTO_UDP &&
	    (bpf_skb_load_bytes(skb, pkt->l4_off + HR_UDP_CSUM_OFF, &check, 2) < 0 || !check))
		return -1;
	return 0;
}

/* The NAT key of a packet as it is on the wire, going `dir` (enum hr_nat_dir). */
static __always_inline void nat6_packet_key(struct hr_nat6_key *k, struct hr_pkt6 *pkt,
					    __u16 sport, __u16 dport, __u8 dir)
{
	__builtin_memset(k, 0, sizeof(*k));
	k->saddr = pkt->saddr;
	k->daddr = pkt->daddr;
	k->sport = sport;
	k->dport = dport;
	k->protocol = pkt->protocol;
	k->dir = dir;
}

/*
 * Write address `new_addr` (source or destination) into the IPv6 header,
 * which has no checksum of its own. BPF_F_RECOMPUTE_CSUM keeps the skb's
 * CHECKSUM_COMPLETE sum right (the L4 checksum moves the other way).
 */
static __always_inline int nat6_store_addr(struct __sk_buff *skb, int source,
					   struct hr_in6 *new_addr)
{
	return bpf_skb_store_bytes(skb, ETH_HLEN + (source ? HR_IP6_SADDR_OFF : HR_IP6_DADDR_OFF),
				   new_addr, sizeof(*new_addr), BPF_F_RECOMPUTE_CSUM) < 0 ? -1 : 0;
}

/* Fold an address change into the L4 checksum at csum_off (its pseudo-header). */
static __always_inline int nat6_csum_addr(struct __sk_buff *skb, __u32 csum_off,
					  struct hr_in6 *old_addr, struct hr_in6 *new_addr,
					  __u64 flags)
{
	__s64 diff = hr_csum_diff(old_addr->a, sizeof(*old_addr), new_addr->a, sizeof(*new_addr),
				   0);

	if (diff < 0)
		return -1;
	return bpf_l4_csum_replace(skb, csum_off, 0, (__u32)diff, flags | BPF_F_PSEUDO_HDR) < 0 ?
	       -1 : 0;
}

/*
 * Rewrite one address (source or destination) and the matching port / ICMPv6
 * identifier, fixing the L4 checksum, as nat_rewrite does for IPv4: through
 * bpf_l4_csum_replace, so that CHECKSUM_PARTIAL packets stay right (the
 * address with BPF_F_PSEUDO_HDR, the port without). Returns -1 when a helper
 * failed.
 */
static __always_inline int nat6_rewrite(struct __sk_buff *skb, struct hr_pkt6 *pkt, int source,
					struct hr_in6 *old_addr, struct hr_in6 *new_addr,
					__u16 old_port, __u16 new_port)
{
	__u32 csum_off, port_off;
	__u64 flags = 0;

	if (pkt->protocol == IPPROTO_TCP) {
		csum_off = pkt->l4_off + HR_TCP_CSUM_OFF;
		port_off = pkt->l4_off + (source ? 0 : 2);
	} else if (pkt->protocol == IPPROTO_UDP) {
		csum_off = pkt->l4_off + HR_UDP_CSUM_OFF;
		port_off = pkt->l4_off + (source ? 0 : 2);
		flags = BPF_F_MARK_MANGLED_0;
	} else {
		csum_off = pkt->l4_off + HR_ICMP_CSUM_OFF;
		port_off = pkt->l4_off + HR_ICMP_ID_OFF;
	}
	if (nat6_csum_addr(skb, csum_off, old_addr, new_addr, flags) < 0)
		return -1;
	if (old_port != new_port) {
		if (bpf_l4_csum_replace(skb, csum_off, old_port, new_port,
					flags | sizeof(new_port)) < 0)
			return -1;
		if (bpf_skb_store_bytes(skb, port_off, &new_port, sizeof(new_port), 0) < 0)
			return -1;
	}
	return nat6_store_addr(skb, source, new_addr);
}

/*
 * The datagram of a fragment (its Fragment header's identification and next
 * header, the same in every fragment), as on the wire.
 */
static __always_inline int frag6_key_of(struct __sk_buff *skb, struct hr_frag6_key *k,
					struct hr_pkt6 *pkt)
{
	__builtin_memset(k, 0, sizeof(*k));
	k->saddr = pkt->saddr;
	k->daddr = pkt->daddr;
	k->protocol = pkt->frag_nexthdr;
	return bpf_skb_load_bytes(skb, pkt->frag_off + HR_FRAG6_ID_OFF, &k->id, sizeof(k->id));
}

/*
 * A later fragment (datagram in s->fk) through the flow its first fragment
 * recorded (its ports and L4 protocol): `out`, from node_ip6
 * (HR_DROP_FRAG_UNTRACKED without a record or a live flow); in, to the pod
 * (*pod set; HR_PASS_FRAG_UNTRACKED without, the packet untouched: the node's
 * own, or a reply whose first fragment is late). Only the address changes.
 * Returns 0 once rewritten.
 */
static __always_inline int nat6_frag_later(struct __sk_buff *skb, struct hr_pkt6 *pkt,
					   struct hr_config *cfg, struct hr_nat6_scratch *s,
					   int out, struct hr_in6 *addr)
{
	__u64 now = bpf_ktime_get_ns();
	struct hr_frag_entry *f = frag_fresh(frag6_lookup(&s->fk), now);
	struct hr_nat6_entry *e;

	if (!f)
		return out ? HR_DROP_FRAG_UNTRACKED : HR_PASS_FRAG_UNTRACKED;
	nat6_packet_key(&s->key, pkt, f->sport, f->dport, out ? HR_NAT_OUT : HR_NAT_IN);
	s->key.protocol = f->protocol;
	if (out) {
		/* its first fragment refreshed the flow moments ago: as snat_frag_later */
		e = nat6_lookup(&s->key);
		if (!e || !nat_fresh(now, e->last_seen_ns,
				     nat_timeout_ns(cfg, s->key.protocol, e->state)))
			return HR_DROP_FRAG_UNTRACKED;
		nat_refresh(&e->last_seen_ns, now,
			    nat_refresh_slack(cfg, s->key.protocol, e->state, 0));
		__sync_fetch_and_add(&e->packets, 1);
		__sync_fetch_and_add(&e->bytes, skb->len);
	} else {
		e = nat6_find_in(cfg, s, now);
		if (!e)
			return HR_PASS_FRAG_UNTRACKED;
		nat6_touch(cfg, s, &s->key, e, HR_NAT_SEEN_REPLY, skb->len, now);
	}
	*addr = e->addr;
	return nat6_store_addr(skb, out, addr) < 0 ? HR_DROP_NAT_FAILED : 0;
}

static __always_inline int nat6_icmp_error(struct __sk_buff *skb, struct hr_pkt6 *pkt,
					   struct hr_config *cfg, int out, struct hr_in6 *new_ip);

/*
 * A pod's packet leaving the cluster, routed: from node_ip6 and a NAT port
 * (ICMPv6 echo: identifier). Returns 0 when translated (pkt's pointers are
 * stale then), or the drop reason (enum hr_reason). An ICMPv6 error of the
 * pod's about a flow's packet is translated (nat6_icmp_error); a fragment of
 * a UDP or ICMPv6 echo datagram goes through its flow (the first by its L4
 * header, which it records; later ones by that record).
 */
static __always_inline int snat_out6(struct __sk_buff *skb, struct hr_pkt6 *pkt,
				     struct hr_config *cfg)
{
	struct hr_nat6_scratch *s;
	struct hr_nat6_entry *e;
	struct hr_nat_l4 *l4;
	__u64 now;
	__u32 len;
	__u16 port = 0;
	int reason, syn;

	s = nat6_scratch_get();
	if (!s)
		return HR_DROP_NAT_FAILED;
	l4 = &s->l4;
	__builtin_memset(l4, 0, sizeof(*l4));
	if (pkt->protocol == IPPROTO_ICMPV6) {
		reason = nat6_icmp_error(skb, pkt, cfg, 1, &s->addr);
		if (reason != HR_PASS_NAT_MISS)
			return reason;
	}
	if (pkt->fragment) {
		if (frag6_key_of(skb, &s->fk, pkt) < 0)
			return HR_DROP_NAT_UNSUPPORTED;
		/* a later one is judged by its first's record, which only UDP and echo leave */
		if (pkt->later_fragment)
			return nat6_frag_later(skb, pkt, cfg, s, 1, &s->addr);
		/* UDP and ICMPv6 echo; a TCP segment is never fragmented by its sender (PMTU) */
		if (pkt->protocol != IPPROTO_UDP && pkt->protocol != IPPROTO_ICMPV6)
			return HR_DROP_NAT_UNSUPPORTED;
	}
	if (nat6_read_l4(skb, pkt, l4, 1) < 0)
		return HR_DROP_NAT_UNSUPPORTED;
	nat6_packet_key(&s->key, pkt, l4->sport, l4->dport, HR_NAT_OUT);

	now = bpf_ktime_get_ns();
	syn = pkt->protocol == IPPROTO_TCP && (l4->tcp_flags & HR_TCP_SYN) &&
	      !(l4->tcp_flags & HR_TCP_ACK);
	reason = nat6_lookup_or_create(cfg, s, now, l4, syn, &s->addr, &port, &e);
	if (reason)
		return reason;
	/* a first fragment: its datagram's later fragments go by the ports it carries */
	if (pkt->fragment) {
		frag_fill(&s->fv, l4->sport, l4->dport, now);
		s->fv.protocol = pkt->protocol;
		frag6_update(&s->fk, &s->fv);
	}
	len = skb->len;
	if (nat6_rewrite(skb, pkt, 1, &pkt->saddr, &s->addr, l4->sport, port) < 0)
		return HR_DROP_NAT_FAILED;
	/* last, behind a barrier: fewer values live across its map calls (the stack) */
	HR_NAT6_OPAQUE(s);
	HR_NAT6_OPAQUE(cfg);
	nat6_account_out(cfg, s, e, &s->l4, syn, len, now);
	return 0;
}

/*
 * A packet for node_ip6: a reply to a flow snat_out6() opened is translated
 * back to the pod (*pod), fragments included. Returns 0 when translated,
 * HR_PASS_NAT_MISS when it is not one (the node's own),
 * HR_PASS_FRAG_UNTRACKED for a later fragment without a record (untouched),
 * or the drop reason.
 */
static __always_inline int rnat_in6(struct __sk_buff *skb, struct hr_pkt6 *pkt,
				    struct hr_config *cfg, struct hr_in6 *pod)
{
	struct hr_nat6_scratch *s;
	struct hr_nat6_entry *e;
	struct hr_nat_l4 *l4;
	__u64 now;
	__u16 port;

	s = nat6_scratch_get();
	if (!s)
		return HR_DROP_NAT_FAILED;
	l4 = &s->l4;
	__builtin_memset(l4, 0, sizeof(*l4));
	if (pkt->fragment) {
		if (frag6_key_of(skb, &s->fk, pkt) < 0)
			return HR_PASS_NAT_MISS;
		if (pkt->later_fragment)
			return nat6_frag_later(skb, pkt, cfg, s, 0, pod);
		if (pkt->protocol != IPPROTO_UDP && pkt->protocol != IPPROTO_ICMPV6)
			return HR_PASS_NAT_MISS;
	}
	if (nat6_read_l4(skb, pkt, l4, 0) < 0)
		return HR_PASS_NAT_MISS;
	nat6_packet_key(&s->key, pkt, l4->sport, l4->dport, HR_NAT_IN);
	now = bpf_ktime_get_ns();
	e = nat6_find_in(cfg, s, now);
	if (!e)
		return HR_PASS_NAT_MISS;
	s->addr = e->addr;
	port = e->port;
	if (pkt->fragment) {
		frag_fill(&s->fv, l4->sport, l4->dport, now);
		s->fv.protocol = pkt->protocol;
		frag6_update(&s->fk, &s->fv);
	}
	nat6_account_in(cfg, s, e, l4, skb->len, now);
	if (nat6_rewrite(skb, pkt, 0, &pkt->daddr, &s->addr, l4->dport, port) < 0)
		return HR_DROP_NAT_FAILED;
	*pod = s->addr;
	return 0;
}

/*
 * An ICMPv6 error (destination unreachable, packet too big, time exceeded,
 * parameter problem) about a NATed flow, either way (`out`), as nat.h's
 * nat_icmp_error for IPv4:
 *
 * in:  IPv6 (ext -> node) | ICMPv6 | inner IPv6 (node -> ext) | inner L4 (NAT port -> ext port)
 * out: IPv6 (pod -> ext)  | ICMPv6 | inner IPv6 (ext -> pod)  | inner L4 (ext port -> pod port)
 *
 * in, the outer destination and the inner source and source port go back to
 * the pod's; out, the outer source and the inner destination and destination
 * port become node_ip6 and the NAT port. The inner L4 checksum (when quoted,
 * within the outer payload length; it covers the quoted addresses, ICMPv6
 * echo's too) and the ICMPv6 checksum (over the outer pseudo-header and the
 * whole quote) are fixed. The quote must be an IPv6 header followed by TCP,
 * UDP or (in) an ICMPv6 echo request: straight, or (in) after the Fragment
 * header of a first fragment. Returns 0 when translated
 * (*new_ip: the outer address written; packet pointers stale),
 * HR_PASS_NAT_MISS when no live flow matches (untouched), or the hr_reason of
 * a drop. Not a refresh.
 */
static __always_inline int nat6_icmp_error(struct __sk_buff *skb, struct hr_pkt6 *pkt,
					   struct hr_config *cfg, int out, struct hr_in6 *new_ip)
{
	struct hr_nat6_scratch *s;
	struct hr_nat6_entry *e;
	struct ipv6hdr *inner;
	struct hr_in6 *isrc, *idst, *old_addr;
	__u8 *icmp, *il4;
	__u32 ip_off = pkt->l4_off + HR_ICMP6_HLEN;
	__u32 il4_off = ip_off + sizeof(struct ipv6hdr);
	__u32 csum_off = 0, port_off;
	__u16 icmp_check, l4_check = 0, new_l4_check = 0, old_port, new_port;
	__u8 nexthdr;

	s = nat6_scratch_get();
	if (!s)
		return HR_DROP_NAT_FAILED;
	inner = &s->inner;
	icmp = s->icmp;
	il4 = s->il4;
	isrc = (struct hr_in6 *)&inner->saddr;
	idst = (struct hr_in6 *)&inner->daddr;
	if (pkt->fragment || bpf_skb_load_bytes(skb, pkt->l4_off, icmp, HR_ICMP6_HLEN) < 0)
		return HR_PASS_NAT_MISS;
	if (icmp[0] < HR_ICMP6_DEST_UNREACH || icmp[0] > HR_ICMP6_PARAMPROB)
		return HR_PASS_NAT_MISS;
	if (bpf_skb_load_bytes(skb, ip_off, inner, sizeof(*inner)) < 0)
		return HR_PASS_NAT_MISS;
	nexthdr = inner->nexthdr;
	/*
	 * in: the quote of a first fragment (a router's Packet Too Big about a
	 * fragmented datagram): its L4 header follows the Fragment header. A later
	 * fragment's quote has none: not translated.
	 */
	if (!out && nexthdr == HR_NEXTHDR_FRAGMENT) {
		if (bpf_skb_load_bytes(skb, il4_off, il4, HR_FRAG6_HLEN) < 0 ||
		    (il4[2] | (il4[3] & 0xf8)))
			return HR_PASS_NAT_MISS;
		nexthdr = il4[0];
		il4_off += HR_FRAG6_HLEN;
	}
	if (il4_off + sizeof(s->il4) > pkt->end ||
	    bpf_skb_load_bytes(skb, il4_off, il4, sizeof(s->il4)) < 0)
		return HR_PASS_NAT_MISS;
	/* in: what we sent, from node_ip6; out: what the remote sent the pod, the error back */
	if (inner->version != 6)
		return HR_PASS_NAT_MISS;
	if (out ? !nat6_addr_eq(idst, &pkt->saddr) || !nat6_addr_eq(isrc, &pkt->daddr)
		: !nat6_addr_eq(isrc, (struct hr_in6 *)cfg->node_ip6))
		return HR_PASS_NAT_MISS;

	/* out: the flow's OUT key, the quote turned around; in: its IN key, a reply's */
	__builtin_memset(&s->key, 0, sizeof(s->key));
	s->key.protocol = nexthdr;
	s->key.saddr = *idst;
	s->key.daddr = *isrc;
	s->key.dir = out ? HR_NAT_OUT : HR_NAT_IN;
	old_addr = out ? idst : isrc;
	if (nexthdr == IPPROTO_TCP || nexthdr == IPPROTO_UDP) {
		old_port = nat_quoted_ports(il4, out, &s->key.sport, &s->key.dport);
		port_off = il4_off + (out ? 2 : 0);
		csum_off = il4_off + (nexthdr == IPPROTO_TCP ? HR_TCP_CSUM_OFF
								      : HR_UDP_CSUM_OFF);
	} else if (!out && nexthdr == IPPROTO_ICMPV6 &&
		   il4[0] == HR_NAT_ICMP6_ECHO_REQUEST) {
		__builtin_memcpy(&old_port, il4 + HR_ICMP_ID_OFF, 2);
		s->key.dport = old_port;
		port_off = il4_off + HR_ICMP_ID_OFF;
		csum_off = il4_off + HR_ICMP_CSUM_OFF;
	} else {
		return HR_PASS_NAT_MISS;
	}
	/* quoted only if within the payload: bytes past it are no checksum to fix */
	if (csum_off + 2 > pkt->end)
		csum_off = 0;

	e = nat6_find_in(cfg, s, bpf_ktime_get_ns());
	if (!e)
		return HR_PASS_NAT_MISS;
	s->addr = e->addr;
	new_port = e->port;

	__builtin_memcpy(&icmp_check, icmp + HR_ICMP_CSUM_OFF, 2);
	if (csum_off) {
		if (bpf_skb_load_bytes(skb, csum_off, &l4_check, 2) < 0)
			return HR_DROP_NAT_FAILED;
		new_l4_check = l4_check;
		/* a quoted UDP checksum of 0 (not allowed, but quoted as sent) stays */
		if (nexthdr != IPPROTO_UDP || l4_check != 0) {
			new_l4_check = csum_replace16(new_l4_check, old_addr, &s->addr);
			new_l4_check = csum_replace2(new_l4_check, old_port, new_port);
			if (nexthdr == IPPROTO_UDP && new_l4_check == 0)
				new_l4_check = 0xffff;
		}
		icmp_check = csum_replace2(icmp_check, l4_check, new_l4_check);
	}
	/* the quote's address and port, inside the ICMPv6 message */
	icmp_check = csum_replace16(icmp_check, old_addr, &s->addr);
	icmp_check = csum_replace2(icmp_check, old_port, new_port);

	if (csum_off && bpf_skb_store_bytes(skb, csum_off, &new_l4_check, 2, 0) < 0)
		return HR_DROP_NAT_FAILED;
	if (bpf_skb_store_bytes(skb, port_off, &new_port, 2, 0) < 0 ||
	    bpf_skb_store_bytes(skb, ip_off + (out ? HR_IP6_DADDR_OFF : HR_IP6_SADDR_OFF),
				&s->addr, sizeof(s->addr), 0) < 0 ||
	    bpf_skb_store_bytes(skb, pkt->l4_off + HR_ICMP_CSUM_OFF, &icmp_check, 2, 0) < 0)
		return HR_DROP_NAT_FAILED;
	/* the outer header (in the pseudo-header): in, destination -> pod; out, source -> node */
	if (nat6_csum_addr(skb, pkt->l4_off + HR_ICMP_CSUM_OFF, old_addr, &s->addr, 0) < 0 ||
	    nat6_store_addr(skb, out, &s->addr) < 0)
		return HR_DROP_NAT_FAILED;
	*new_ip = s->addr;
	return 0;
}

/*
 * An ICMPv6 error for node_ip6 about a flow snat_out6() opened: the outer
 * destination and the embedded header translated back (*pod). Returns as
 * rnat_in6().
 */
static __always_inline int rnat_icmp6_error(struct __sk_buff *skb, struct hr_pkt6 *pkt,
					    struct hr_config *cfg, struct hr_in6 *pod)
{
	return nat6_icmp_error(skb, pkt, cfg, 0, pod);
}

#endif /* HR_NAT6_H */
