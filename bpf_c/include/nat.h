/* SPDX-License-Identifier: GPL-2.0 */
/*
 * BPF SNAT for traffic leaving the cluster: the source becomes the node IP
 * and a port allocated here, the reply is translated back, and ICMP errors
 * about a translated flow (the embedded header included) too. No conntrack:
 * state lives in the `nat` hash (two entries per flow, struct hr_nat_entry)
 * and expires by idle time, per protocol and TCP state; the sweeper of
 * datapath/nat_table.py deletes expired flows, both entries together. A full
 * table refuses new flows (HR_DROP_NAT_TABLE_FULL) and never evicts one
 * entry of a live flow: the two entries of a flow live and die together.
 * Fragmented UDP and ICMP echo datagrams go through their flow both ways:
 * the first fragment by its L4 header, the later ones by the ports it
 * recorded in `nat_frags` (frag.h).
 *
 * The flow logic that does not depend on the address family (twins, expiry,
 * claims, state, port allocation) is in nat_flow.h, instantiated here for
 * IPv4 (nat_twin, nat_alive, ...) and in nat6.h for IPv6 (nat6_twin, ...);
 * the helpers below it that take no address (nat_read_l4_at, nat_fresh,
 * nat_claim, nat_refresh, ...) serve both.
 *
 * An entry is deleted by key only by the CPU that claimed it first
 * (nat_claim: compare-and-swap of its last_seen_ns with the value it judged
 * by), so that a delete never hits a fresh entry another CPU put under the
 * same key meanwhile.
 *
 * bcc rewrites map calls (`nat.lookup()`) only in the file it compiles, not
 * in headers, so the map accesses here go through accessors that
 * host_routing.c defines, next to the maps (declared below).
 */
#ifndef HR_NAT_H
#define HR_NAT_H

#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/icmp.h>
#include <uapi/linux/in.h>
#include <uapi/linux/in6.h>

#include "hostrouting_shared.h"
#include "parse.h"
#include "csum.h"
#include "frag.h"

/* Random ports tried before a flow is dropped as exhausted. */
#define HR_NAT_RETRIES		32
#define HR_NSEC			1000000000ULL

/* Offsets in the IPv4 header, and in the L4 headers the NAT rewrites. */
#define HR_IP_CHECK_OFF		10
#define HR_IP_SADDR_OFF		12
#define HR_IP_DADDR_OFF		16
#define HR_TCP_CSUM_OFF		16
#define HR_TCP_FLAGS_OFF	13
#define HR_TCP_SEQ_OFF		4	/* then the acknowledgment number, at 8 */
/*
 * An RST from outside changes a flow's state (closing timeout, port reusable)
 * only when its sequence number lies this close above the pod's last ACK:
 * RFC 5961 asks for the exact number; this takes the receive window in
 * flight into account without tracking it.
 */
#define HR_RST_WINDOW		(1U << 20)
#define HR_NAT_IP6_HLEN		40	/* the fixed IPv6 header */
#define HR_UDP_CSUM_OFF		6
#define HR_ICMP_CSUM_OFF	2
#define HR_ICMP_ID_OFF		4
#define HR_TCP_FIN		0x01
#define HR_TCP_SYN		0x02
#define HR_TCP_RST		0x04
#define HR_TCP_ACK		0x10
/* ICMPv6 echo (uapi/linux/icmpv6.h needs kernel-internal headers) */
#define HR_NAT_ICMP6_ECHO_REQUEST	128
#define HR_NAT_ICMP6_ECHO_REPLY	129
/* Errors of the map helpers (negated). */
#define HR_E2BIG		7
#define HR_EEXIST		17
/* last_seen_ns of an entry a CPU claimed and is deleting: fresh to everyone else */
#define HR_NAT_CLAIMED		(~0ULL)
/*
 * A SYN may take the port of a flow that ended (RST, FIN both ways) only once
 * that flow has been quiet this long: the remote's last ACK may still be in
 * flight (and would reach the new pod, whose RST would end the new flow).
 */
#define HR_NAT_REUSE_QUIET_NS	(2 * HR_NSEC)
/* The most a packet leaves an entry's last_seen_ns behind (nat_refresh_slack). */
#define HR_NAT_REFRESH_NS	HR_NSEC
/* The key direction of the test builds' race entries (nat_flow.h, HR_TEST_RACES). */
#define HR_RACE_DIR		0xee

/* What a NAT step needs to know about the packet besides struct hr_pkt. */
struct hr_nat_l4 {
	__u16 sport;		/* network order; ICMP echo: identifier in sport or dport */
	__u16 dport;
	__u8 tcp_flags;
	__u8 icmp_type;
	__u32 seq;		/* TCP sequence and acknowledgment numbers (network order) */
	__u32 ack;
	__u32 seq_end;		/* TCP: seq + segment length (SYN and FIN count 1), host order */
};

/*
 * Keys and values the NAT builds, in a per-CPU scratch slot: all inlined
 * into one program, they would not fit the 512-byte BPF stack.
 */
struct hr_nat_scratch {
	struct hr_nat_key key;		/* the packet's own flow */
	struct hr_nat_key rk;		/* the IN key being claimed */
	struct hr_nat_key tk;		/* a twin being looked at */
	struct hr_nat_entry val;	/* an entry about to be inserted */
	struct hr_frag_key fk;		/* the datagram of a fragment (frag.h) */
	struct hr_frag_entry fv;	/* its record, about to be written */
};

/* Accessors of the `nat` and `nat_scratch` maps, defined in host_routing.c. */
static __always_inline struct hr_nat_entry *nat_lookup(struct hr_nat_key *key);
static __always_inline int nat_insert(struct hr_nat_key *key, struct hr_nat_entry *value);
static __always_inline void nat_remove(struct hr_nat_key *key);
static __always_inline struct hr_nat_scratch *nat_scratch_get(void);

/*
 * Read ports (TCP, UDP) or the ICMP (`v6`: ICMPv6) type and identifier of an
 * L4 header of `protocol` at `l4_off`. `out` says which way the packet goes:
 * an echo request going out keeps its identifier in sport, an echo reply
 * coming in in dport. Returns -1 when the L4 header is not all there (or is
 * not one NAT can handle). `v6` is a constant of the caller (nat_read_l4,
 * nat6_read_l4): the other family's branches compile away.
 */
static __always_inline int nat_read_l4_at(struct __sk_buff *skb, __u8 protocol, __u32 l4_off,
					  struct hr_nat_l4 *l4, int out, int v6)
{
	__u8 icmp_proto = v6 ? IPPROTO_ICMPV6 : IPPROTO_ICMP;
	__u8 echo = v6 ? HR_NAT_ICMP6_ECHO_REQUEST : ICMP_ECHO;
	__u8 echo_reply = v6 ? HR_NAT_ICMP6_ECHO_REPLY : ICMP_ECHOREPLY;
	__u32 l3_len;
	__u8 hdr[8];

	if (protocol == IPPROTO_TCP) {
		if (bpf_skb_load_bytes(skb, l4_off, hdr, sizeof(hdr)) < 0)
			return -1;
		if (bpf_skb_load_bytes(skb, l4_off + HR_TCP_FLAGS_OFF, &l4->tcp_flags, 1) < 0)
			return -1;
		if (bpf_skb_load_bytes(skb, l4_off + HR_TCP_SEQ_OFF, &l4->seq, 8) < 0)
			return -1;
		/* the checksum must be there to be fixed */
		if (skb->len < l4_off + 20)
			return -1;
		/*
		 * Where the segment ends: IPv4 total length (from the Ethernet
		 * header's end), IPv6 payload length (from the fixed header's end;
		 * 0, a jumbogram or BIG TCP: the skb's end), then the TCP header.
		 */
		if (bpf_skb_load_bytes(skb, ETH_HLEN + (v6 ? 4 : 2), hdr, 2) < 0 ||
		    bpf_skb_load_bytes(skb, l4_off + 12, hdr + 2, 1) < 0)
			return -1;
		l3_len = (__u32)hdr[0] << 8 | hdr[1];
		if (v6)
			l3_len = l3_len ? l3_len + HR_NAT_IP6_HLEN : skb->len - ETH_HLEN;
		l4->seq_end = bpf_ntohl(l4->seq) +
			      (ETH_HLEN + l3_len - l4_off - ((hdr[2] >> 4) << 2)) +
			      !!(l4->tcp_flags & HR_TCP_SYN) + !!(l4->tcp_flags & HR_TCP_FIN);
		if (bpf_skb_load_bytes(skb, l4_off, hdr, sizeof(hdr)) < 0)
			return -1;
	} else if (protocol == IPPROTO_UDP || protocol == icmp_proto) {
		if (bpf_skb_load_bytes(skb, l4_off, hdr, sizeof(hdr)) < 0)
			return -1;
	} else {
		return -1;
	}
	if (protocol != icmp_proto) {
		__builtin_memcpy(&l4->sport, hdr, 2);
		__builtin_memcpy(&l4->dport, hdr + 2, 2);
		return 0;
	}
	l4->icmp_type = hdr[0];
	if (out && hdr[0] == echo) {
		__builtin_memcpy(&l4->sport, hdr + HR_ICMP_ID_OFF, 2);
		l4->dport = 0;
		return 0;
	}
	if (!out && hdr[0] == echo_reply) {
		l4->sport = 0;
		__builtin_memcpy(&l4->dport, hdr + HR_ICMP_ID_OFF, 2);
		return 0;
	}
	return -1;
}

/* nat_read_l4_at for an IPv4 packet. */
static __always_inline int nat_read_l4(struct __sk_buff *skb, struct hr_pkt *pkt,
				       struct hr_nat_l4 *l4, int out)
{
	return nat_read_l4_at(skb, pkt->protocol, pkt->l4_off, l4, out, 0);
}

/*
 * The ports of the flow an ICMP error quotes (its quoted TCP or UDP header
 * `il4`) as the flow's NAT key holds them: out (the pod's error about a
 * remote's packet), the OUT key's; in, the IN key's. Returns the port the
 * translation changes: in, the NAT port (the quote's source); out, the pod's
 * (its destination).
 */
static __always_inline __u16 nat_quoted_ports(const __u8 *il4, int out, __u16 *sport,
					      __u16 *dport)
{
	__u16 old_port;

	__builtin_memcpy(&old_port, il4 + (out ? 2 : 0), 2);
	if (out) {
		*sport = old_port;
		__builtin_memcpy(dport, il4, 2);
	} else {
		__builtin_memcpy(sport, il4 + 2, 2);
		*dport = old_port;
	}
	return old_port;
}

/* A TCP flow that ended: RST either way, or FIN both ways. */
static __always_inline int nat_tcp_closed(__u64 state)
{
	return (state & HR_NAT_RST) ||
	       (state & (HR_NAT_FIN_OUT | HR_NAT_FIN_IN)) == (HR_NAT_FIN_OUT | HR_NAT_FIN_IN);
}

/* The NAT key of a packet as it is on the wire, going `dir` (enum hr_nat_dir). */
static __always_inline void nat_packet_key(struct hr_nat_key *k, struct hr_pkt *pkt,
					   struct hr_nat_l4 *l4, __u8 dir)
{
	__builtin_memset(k, 0, sizeof(*k));
	k->saddr = pkt->saddr;
	k->daddr = pkt->daddr;
	k->sport = l4->sport;
	k->dport = l4->dport;
	k->protocol = pkt->protocol;
	k->dir = dir;
}

/* How long a flow may stay idle, by protocol and state. */
static __always_inline __u64 nat_timeout_ns(struct hr_config *cfg, __u8 protocol, __u64 state)
{
	__u32 s;

	if (protocol == IPPROTO_TCP) {
		if (nat_tcp_closed(state))
			s = cfg->nat_timeout_tcp_closing;
		else if (state & HR_NAT_SEEN_REPLY)
			s = cfg->nat_timeout_tcp_established;
		else
			s = cfg->nat_timeout_tcp_syn;
	} else if (protocol == IPPROTO_UDP) {
		s = cfg->nat_timeout_udp;
	} else {
		s = cfg->nat_timeout_icmp;
	}
	return (__u64)s * HR_NSEC;
}

/*
 * Whether a flow last seen at `seen` is still within `timeout` at `now`.
 * Another CPU may have stamped the entry after this packet read the clock:
 * `seen` later than `now` is fresh, not 2^64 ns old.
 */
static __always_inline int nat_fresh(__u64 now, __u64 seen, __u64 timeout)
{
	return seen >= now || now - seen <= timeout;
}

/*
 * Claim an entry for deletion (its last_seen_ns at `last_seen`), judged by
 * the value `seen` it was read with: succeeds
 * on one CPU only, and only if no packet refreshed the entry (and no other
 * CPU replaced it under the same key) since it was judged. A claimed entry
 * looks fresh to everyone else (and to the sweep) until it is deleted.
 */
static __always_inline int nat_claim(__u64 *last_seen, __u64 seen)
{
	return seen != HR_NAT_CLAIMED &&
	       __sync_val_compare_and_swap(last_seen, seen, HR_NAT_CLAIMED) == seen;
}

/* TCP state bits a packet adds, by direction. */
static __always_inline __u64 nat_state_bits(__u8 protocol, struct hr_nat_l4 *l4, int out)
{
	__u64 bits = out ? 0 : HR_NAT_SEEN_REPLY;

	if (protocol != IPPROTO_TCP)
		return bits;
	if (l4->tcp_flags & HR_TCP_RST)
		bits |= HR_NAT_RST;
	if (l4->tcp_flags & HR_TCP_FIN)
		bits |= out ? HR_NAT_FIN_OUT : HR_NAT_FIN_IN;
	return bits;
}

/*
 * Mark an entry (its last_seen_ns at `last_seen`) seen at `now`, unless it
 * was seen within `slack` ns (or later than `now`: another CPU stamped it
 * meanwhile), or a CPU has claimed it for deletion (nat_claim): a plain store
 * could overwrite HR_NAT_CLAIMED, and the entry, already being deleted, could
 * then be judged and claimed again. A compare-and-swap from the value just
 * read: a lost race with another packet's refresh leaves that one's `now`, as
 * good; with a claim, the claim stands.
 */
static __always_inline void nat_refresh(__u64 *last_seen, __u64 now, __u64 slack)
{
	__u64 seen = *last_seen;

	if (seen == HR_NAT_CLAIMED || seen >= now || now - seen <= slack)
		return;
	__sync_val_compare_and_swap(last_seen, seen, now);
}

/*
 * How stale a packet may leave the last_seen_ns of a flow in `state`: a
 * sixteenth of its timeout, at most HR_NAT_REFRESH_NS, so that a busy flow
 * writes its entry's clock about once a second, not per packet (the cache
 * line stays shared between the CPUs of both directions). 0 once the flow is
 * closing or `bits` change its state: the quiet time before a port is taken
 * again (HR_NAT_REUSE_QUIET_NS) is measured from its very last packet.
 */
static __always_inline __u64 nat_refresh_slack(struct hr_config *cfg, __u8 protocol, __u64 state,
					       __u64 bits)
{
	__u64 slack;

	if ((state | bits) != state || (state & (HR_NAT_RST | HR_NAT_FIN_OUT | HR_NAT_FIN_IN)))
		return 0;
	slack = nat_timeout_ns(cfg, protocol, state) >> 4;
	return slack < HR_NAT_REFRESH_NS ? slack : HR_NAT_REFRESH_NS;
}

/*
 * Rewrite one address (source or destination) and the matching port / ICMP
 * identifier, fixing the IPv4 and L4 checksums. The L4 checksum goes through
 * bpf_l4_csum_replace so that CHECKSUM_PARTIAL packets (TSO from a pod)
 * stay right: the address with BPF_F_PSEUDO_HDR (it is in the pseudo
 * header), the port without. Returns -1 when a helper failed.
 */
static __always_inline int nat_rewrite(struct __sk_buff *skb, struct hr_pkt *pkt, int source,
				       __u32 old_addr, __u32 new_addr, __u16 old_port,
				       __u16 new_port)
{
	__u32 addr_off = ETH_HLEN + (source ? HR_IP_SADDR_OFF : HR_IP_DADDR_OFF);
	__u32 csum_off, port_off;
	__u64 flags;

	if (pkt->protocol == IPPROTO_TCP) {
		csum_off = pkt->l4_off + HR_TCP_CSUM_OFF;
		port_off = pkt->l4_off + (source ? 0 : 2);
		flags = BPF_F_PSEUDO_HDR;
	} else if (pkt->protocol == IPPROTO_UDP) {
		csum_off = pkt->l4_off + HR_UDP_CSUM_OFF;
		port_off = pkt->l4_off + (source ? 0 : 2);
		flags = BPF_F_PSEUDO_HDR | BPF_F_MARK_MANGLED_0;
	} else {
		csum_off = pkt->l4_off + HR_ICMP_CSUM_OFF;
		port_off = pkt->l4_off + HR_ICMP_ID_OFF;
		flags = 0;
	}
	/* ICMP has no pseudo header: only the identifier is in its checksum. */
	if (pkt->protocol != IPPROTO_ICMP &&
	    bpf_l4_csum_replace(skb, csum_off, old_addr, new_addr, flags | sizeof(new_addr)) < 0)
		return -1;
	if (old_port != new_port) {
		/*
		 * The port is L4 data, not pseudo header: without BPF_F_PSEUDO_HDR, so that
		 * a CHECKSUM_PARTIAL field (pseudo-header sum only) is left alone and the
		 * device or skb_checksum_help() sums the new port in.
		 */
		if (bpf_l4_csum_replace(skb, csum_off, old_port, new_port,
					(flags & ~BPF_F_PSEUDO_HDR) | sizeof(new_port)) < 0)
			return -1;
		if (bpf_skb_store_bytes(skb, port_off, &new_port, sizeof(new_port), 0) < 0)
			return -1;
	}
	if (bpf_l3_csum_replace(skb, ETH_HLEN + HR_IP_CHECK_OFF, old_addr, new_addr,
				sizeof(new_addr)) < 0)
		return -1;
	if (bpf_skb_store_bytes(skb, addr_off, &new_addr, sizeof(new_addr), 0) < 0)
		return -1;
	return 0;
}

/* The flows of the `nat` map (nat_flow.h): nat_twin, nat_alive, nat_lookup_or_create, ... */
#define NF(name)		nat_##name
#define NF_KEY			struct hr_nat_key
#define NF_ENTRY		struct hr_nat_entry
#define NF_SCRATCH		struct hr_nat_scratch
#define NF_ADDR			__u32
#define NF_ADDR_EQ(a, b)	((a) == (b))
#define NF_NODE_ADDR(dst, cfg)	((dst) = (cfg)->node_ip)
#define NF_OPAQUE(ptr)		do { } while (0)
#define NF_RACES
#include "nat_flow.h"

static __always_inline int nat_icmp_error(struct __sk_buff *skb, struct hr_pkt *pkt,
					  struct hr_config *cfg, int out, __u32 *new_ip);

/*
 * Rewrite one address of a later fragment (no L4 header in it: only the
 * IPv4 header and its checksum change). Returns -1 when a helper failed.
 */
static __always_inline int frag_rewrite(struct __sk_buff *skb, int source, __u32 old_addr,
					__u32 new_addr)
{
	if (bpf_l3_csum_replace(skb, ETH_HLEN + HR_IP_CHECK_OFF, old_addr, new_addr,
				sizeof(new_addr)) < 0)
		return -1;
	if (bpf_skb_store_bytes(skb, ETH_HLEN + (source ? HR_IP_SADDR_OFF : HR_IP_DADDR_OFF),
				&new_addr, sizeof(new_addr), 0) < 0)
		return -1;
	return 0;
}

/* The NAT key (s->key) of a later fragment's flow, from its datagram's record `f`. */
static __always_inline void frag_nat_key(struct hr_nat_scratch *s, struct hr_pkt *pkt,
					 struct hr_frag_entry *f, __u8 dir)
{
	__builtin_memset(&s->key, 0, sizeof(s->key));
	s->key.saddr = pkt->saddr;
	s->key.daddr = pkt->daddr;
	s->key.sport = f->sport;
	s->key.dport = f->dport;
	s->key.protocol = pkt->protocol;
	s->key.dir = dir;
}

/*
 * A later fragment leaving the cluster (datagram in s->fk): from the node IP,
 * as its first fragment. Returns 0 once rewritten (packet pointers stale),
 * HR_DROP_FRAG_UNTRACKED when its first fragment was not seen or its flow is
 * gone, or the hr_reason of another drop.
 */
static __always_inline int snat_frag_later(struct __sk_buff *skb, struct hr_pkt *pkt,
					   struct hr_config *cfg, struct hr_nat_scratch *s,
					   __u64 now)
{
	struct hr_frag_entry *f = frag_find(&s->fk, now);
	struct hr_nat_entry *e;
	__u32 addr;

	if (!f)
		return HR_DROP_FRAG_UNTRACKED;
	frag_nat_key(s, pkt, f, HR_NAT_OUT);
	/*
	 * The first fragment went through this entry (and refreshed it) moments
	 * ago: its own freshness is the test, no twin to look at (nor stack to
	 * spend on it), and no state bits to fold in.
	 */
	e = nat_lookup(&s->key);
	if (!e || !nat_fresh(now, e->last_seen_ns, nat_timeout_ns(cfg, s->key.protocol, e->state)))
		return HR_DROP_FRAG_UNTRACKED;
	addr = e->addr;
	nat_refresh(&e->last_seen_ns, now, nat_refresh_slack(cfg, s->key.protocol, e->state, 0));
	__sync_fetch_and_add(&e->packets, 1);
	__sync_fetch_and_add(&e->bytes, skb->len);
	if (frag_rewrite(skb, 1, pkt->saddr, addr) < 0)
		return HR_DROP_NAT_FAILED;
	return 0;
}

/*
 * A later fragment for the node IP (datagram in s->fk): to the pod, as its
 * first fragment. Returns 0 once rewritten (*pod_ip set, packet pointers
 * stale), or HR_PASS_FRAG_UNTRACKED when no record or flow matches (the
 * packet is untouched: the node's own datagram, or a reply's whose first
 * fragment is late).
 */
static __always_inline int rnat_frag_later(struct __sk_buff *skb, struct hr_pkt *pkt,
					   struct hr_config *cfg, struct hr_nat_scratch *s,
					   __u64 now, __u32 *pod_ip)
{
	struct hr_frag_entry *f = frag_find(&s->fk, now);
	struct hr_nat_entry *e;
	__u32 addr;

	if (!f)
		return HR_PASS_FRAG_UNTRACKED;
	frag_nat_key(s, pkt, f, HR_NAT_IN);
	e = nat_find_in(cfg, s, now);
	if (!e)
		return HR_PASS_FRAG_UNTRACKED;
	addr = e->addr;
	nat_touch(cfg, s, &s->key, e, HR_NAT_SEEN_REPLY, skb->len, now);
	if (frag_rewrite(skb, 0, pkt->daddr, addr) < 0)
		return HR_DROP_NAT_FAILED;
	*pod_ip = addr;
	return 0;
}

/*
 * Source-NAT a packet leaving the cluster. Returns 0 once the packet carries
 * the node IP and NAT port (packet pointers are stale then), or the
 * hr_reason of the drop. A fragment (UDP, ICMP echo): the first is NATed by
 * its L4 header and records its ports for the later ones (frag.h), which
 * only get the node IP; without a record, HR_DROP_FRAG_UNTRACKED.
 */
static __always_inline int snat_out(struct __sk_buff *skb, struct hr_pkt *pkt,
				    struct hr_config *cfg)
{
	struct hr_nat_scratch *s;
	struct hr_nat_entry *e;
	struct hr_nat_l4 l4 = {};
	__u64 now = bpf_ktime_get_ns();
	__u32 addr = 0;
	__u16 port = 0;
	int reason, syn;

	s = nat_scratch_get();
	if (!s)
		return HR_DROP_NAT_FAILED;
	/* an ICMP error of the pod's about a flow's packet (a port unreachable, say) */
	if (pkt->protocol == IPPROTO_ICMP) {
		reason = nat_icmp_error(skb, pkt, cfg, 1, &addr);
		if (reason != HR_PASS_NAT_MISS)
			return reason;
	}
	if (pkt->fragment) {
		/* UDP and ICMP echo; a TCP segment is never fragmented by its sender (PMTU) */
		if (pkt->protocol != IPPROTO_UDP && pkt->protocol != IPPROTO_ICMP)
			return HR_DROP_NAT_UNSUPPORTED;
		frag_key_of(&s->fk, pkt);
		if (frag_is_later(pkt))
			return snat_frag_later(skb, pkt, cfg, s, now);
	}
	if (nat_read_l4(skb, pkt, &l4, 1) < 0)
		return HR_DROP_NAT_UNSUPPORTED;
	nat_packet_key(&s->key, pkt, &l4, HR_NAT_OUT);

	syn = pkt->protocol == IPPROTO_TCP && (l4.tcp_flags & HR_TCP_SYN) &&
	      !(l4.tcp_flags & HR_TCP_ACK);
	reason = nat_lookup_or_create(cfg, s, now, &l4, syn, &addr, &port, &e);
	if (reason)
		return reason;
	nat_account_out(cfg, s, e, &l4, syn, skb->len, now);
	/* a first fragment: its datagram's later fragments go by the ports it carries */
	if (pkt->fragment)
		frag_record(&s->fk, &s->fv, l4.sport, l4.dport, now);
	if (nat_rewrite(skb, pkt, 1, pkt->saddr, addr, l4.sport, port) < 0)
		return HR_DROP_NAT_FAILED;
	return 0;
}

/*
 * Translate a reply (TCP, UDP, ICMP echo reply) to the node IP back to the
 * pod, fragments included (frag.h). Returns 0 when translated (*pod_ip set,
 * packet pointers stale), HR_PASS_NAT_MISS when no live flow matches, or
 * HR_PASS_FRAG_UNTRACKED for a later fragment without a record (the packet
 * is untouched then), or the hr_reason of a drop.
 */
static __always_inline int rnat_in(struct __sk_buff *skb, struct hr_pkt *pkt,
				   struct hr_config *cfg, __u32 *pod_ip)
{
	struct hr_nat_scratch *s;
	struct hr_nat_entry *e;
	struct hr_nat_l4 l4 = {};
	__u64 now = bpf_ktime_get_ns();
	__u32 addr;
	__u16 port;

	s = nat_scratch_get();
	if (!s)
		return HR_DROP_NAT_FAILED;
	if (pkt->fragment) {
		if (pkt->protocol != IPPROTO_UDP && pkt->protocol != IPPROTO_ICMP)
			return HR_PASS_NAT_MISS;
		frag_key_of(&s->fk, pkt);
		if (frag_is_later(pkt))
			return rnat_frag_later(skb, pkt, cfg, s, now, pod_ip);
	}
	if (nat_read_l4(skb, pkt, &l4, 0) < 0)
		return HR_PASS_NAT_MISS;
	nat_packet_key(&s->key, pkt, &l4, HR_NAT_IN);
	e = nat_find_in(cfg, s, now);
	if (!e)
		return HR_PASS_NAT_MISS;
	addr = e->addr;
	port = e->port;
	/* a first fragment: its datagram's later fragments go by the ports it carries */
	if (pkt->fragment)
		frag_record(&s->fk, &s->fv, l4.sport, l4.dport, now);
	nat_account_in(cfg, s, e, &l4, skb->len, now);
	if (nat_rewrite(skb, pkt, 0, pkt->daddr, addr, l4.dport, port) < 0)
		return HR_DROP_NAT_FAILED;
	*pod_ip = addr;
	return 0;
}

/*
 * An ICMP error (destination unreachable, time exceeded, parameter problem)
 * about a NATed flow, either way (`out`):
 *
 * in:  IPv4 (ext -> node) | ICMP | inner IPv4 (node -> ext) | inner L4 (NAT port -> ext port)
 * out: IPv4 (pod -> ext)  | ICMP | inner IPv4 (ext -> pod)  | inner L4 (ext port -> pod port)
 *
 * becomes the error the other side would have got without NAT, as conntrack
 * translates it: in, the outer destination and the inner source and source
 * port go back to the pod's; out (the pod's port unreachable, say, about a
 * remote's datagram), the outer source and the inner destination and
 * destination port become the node IP and NAT port. The outer IPv4
 * checksum, the inner IPv4 checksum, the inner L4 checksum (when quoted,
 * within the outer IPv4 total length) and the ICMP checksum are all fixed.
 * Returns 0 when translated (*new_ip: the outer address written; packet
 * pointers stale), HR_PASS_NAT_MISS when no live flow matches (the packet is
 * untouched), or the hr_reason of a drop. Not a refresh: errors (repeated,
 * or spoofed) do not keep a flow alive.
 */
static __always_inline int nat_icmp_error(struct __sk_buff *skb, struct hr_pkt *pkt,
					  struct hr_config *cfg, int out, __u32 *new_ip)
{
	struct hr_nat_scratch *s;
	struct hr_nat_entry *e;
	struct iphdr inner;
	__u8 icmp[8], il4[8];
	__u32 ip_off = pkt->l4_off + sizeof(struct icmphdr);
	__u32 il4_off = ip_off + sizeof(struct iphdr);
	__u32 csum_off = 0, port_off, old_addr, new_addr;
	__u16 icmp_check, inner_check, l4_check = 0, new_l4_check = 0, old_port, new_port, tot_len;
	__u64 now = bpf_ktime_get_ns();

	s = nat_scratch_get();
	if (!s)
		return HR_DROP_NAT_FAILED;
	if (pkt->fragment || bpf_skb_load_bytes(skb, pkt->l4_off, icmp, sizeof(icmp)) < 0)
		return HR_PASS_NAT_MISS;
	if (icmp[0] != ICMP_DEST_UNREACH && icmp[0] != ICMP_TIME_EXCEEDED &&
	    icmp[0] != ICMP_PARAMETERPROB)
		return HR_PASS_NAT_MISS;
	if (bpf_skb_load_bytes(skb, ip_off, &inner, sizeof(inner)) < 0 ||
	    bpf_skb_load_bytes(skb, il4_off, il4, sizeof(il4)) < 0 ||
	    bpf_skb_load_bytes(skb, ETH_HLEN + 2, &tot_len, 2) < 0)
		return HR_PASS_NAT_MISS;
	/* no options, not a later fragment; in: what we sent, from the node IP;
	 * out: what the remote sent the pod, and the error goes back to the remote */
	if (inner.version != 4 || inner.ihl != 5 || (inner.frag_off & HR_HTONS(HR_IP_OFFSET)))
		return HR_PASS_NAT_MISS;
	if (out ? inner.daddr != pkt->saddr || inner.saddr != pkt->daddr
		: inner.saddr != cfg->node_ip)
		return HR_PASS_NAT_MISS;

	__builtin_memset(&s->key, 0, sizeof(s->key));
	s->key.protocol = inner.protocol;
	if (out) {
		/* the flow's OUT key: the quoted packet turned around */
		s->key.saddr = inner.daddr;
		s->key.daddr = inner.saddr;
		s->key.dir = HR_NAT_OUT;
		old_addr = inner.daddr;
	} else {
		/* the flow's IN key: what the reply to the quoted packet looks like */
		s->key.saddr = inner.daddr;
		s->key.daddr = inner.saddr;
		s->key.dir = HR_NAT_IN;
		old_addr = inner.saddr;
	}
	if (inner.protocol == IPPROTO_TCP || inner.protocol == IPPROTO_UDP) {
		old_port = nat_quoted_ports(il4, out, &s->key.sport, &s->key.dport);
		port_off = il4_off + (out ? 2 : 0);
		if (inner.protocol == IPPROTO_TCP) {
			/*
			 * Quoted only if within the IPv4 total length: bytes past it
			 * (Ethernet padding, a trailer) are no checksum to fix.
			 */
			if (ETH_HLEN + (__u32)bpf_ntohs(tot_len) >= il4_off + HR_TCP_CSUM_OFF + 2)
				csum_off = il4_off + HR_TCP_CSUM_OFF;
		} else {
			csum_off = il4_off + HR_UDP_CSUM_OFF;
		}
	} else if (!out && inner.protocol == IPPROTO_ICMP && il4[0] == ICMP_ECHO) {
		__builtin_memcpy(&old_port, il4 + HR_ICMP_ID_OFF, 2);
		s->key.sport = 0;
		s->key.dport = old_port;
		port_off = il4_off + HR_ICMP_ID_OFF;
		csum_off = il4_off + HR_ICMP_CSUM_OFF;
	} else {
		return HR_PASS_NAT_MISS;
	}

	e = nat_find_in(cfg, s, now);
	if (!e)
		return HR_PASS_NAT_MISS;
	new_addr = e->addr;
	new_port = e->port;

	__builtin_memcpy(&icmp_check, icmp + HR_ICMP_CSUM_OFF, 2);
	/* the inner L4 checksum: pseudo header (TCP, UDP) and port / identifier */
	if (csum_off) {
		if (bpf_skb_load_bytes(skb, csum_off, &l4_check, 2) < 0)
			return HR_DROP_NAT_FAILED;
		new_l4_check = l4_check;
		if (inner.protocol != IPPROTO_UDP || l4_check != 0) {
			if (inner.protocol != IPPROTO_ICMP)
				new_l4_check = csum_replace4(new_l4_check, old_addr, new_addr);
			new_l4_check = csum_replace2(new_l4_check, old_port, new_port);
			if (inner.protocol == IPPROTO_UDP && new_l4_check == 0)
				new_l4_check = 0xffff;
		}
		icmp_check = csum_replace2(icmp_check, l4_check, new_l4_check);
	}
	inner_check = csum_replace4(inner.check, old_addr, new_addr);
	icmp_check = csum_replace4(icmp_check, old_addr, new_addr);
	icmp_check = csum_replace2(icmp_check, inner.check, inner_check);
	icmp_check = csum_replace2(icmp_check, old_port, new_port);

	if (csum_off && bpf_skb_store_bytes(skb, csum_off, &new_l4_check, 2, 0) < 0)
		return HR_DROP_NAT_FAILED;
	if (bpf_skb_store_bytes(skb, port_off, &new_port, 2, 0) < 0 ||
	    bpf_skb_store_bytes(skb, ip_off + HR_IP_CHECK_OFF, &inner_check, 2, 0) < 0 ||
	    bpf_skb_store_bytes(skb, ip_off + (out ? HR_IP_DADDR_OFF : HR_IP_SADDR_OFF), &new_addr,
				4, 0) < 0 ||
	    bpf_skb_store_bytes(skb, pkt->l4_off + HR_ICMP_CSUM_OFF, &icmp_check, 2, 0) < 0)
		return HR_DROP_NAT_FAILED;
	/* the outer header: in, destination node IP -> pod; out, source pod -> node IP */
	old_addr = out ? pkt->saddr : pkt->daddr;
	if (bpf_l3_csum_replace(skb, ETH_HLEN + HR_IP_CHECK_OFF, old_addr, new_addr, 4) < 0 ||
	    bpf_skb_store_bytes(skb, ETH_HLEN + (out ? HR_IP_SADDR_OFF : HR_IP_DADDR_OFF),
				&new_addr, 4, 0) < 0)
		return HR_DROP_NAT_FAILED;
	*new_ip = new_addr;
	return 0;
}

/* An ICMP error to the node IP about a flow it NATed, back to the pod (nat_icmp_error). */
static __always_inline int rnat_icmp_error(struct __sk_buff *skb, struct hr_pkt *pkt,
					   struct hr_config *cfg, __u32 *pod_ip)
{
	return nat_icmp_error(skb, pkt, cfg, 0, pod_ip);
}

#endif /* HR_NAT_H */
