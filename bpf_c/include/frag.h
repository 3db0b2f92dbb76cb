/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Fragments through BPF SNAT. Only the first fragment of a datagram carries
 * its L4 header (ports, ICMP identifier); the others carry none, so the NAT
 * cannot find their flow by themselves. The first fragment, once its flow is
 * found, records the ports in `nat_frags`, keyed by what tells datagrams
 * apart in IPv4 reassembly (source, destination, identification, protocol,
 * as on the wire before translation); a later fragment looks its datagram up
 * there and goes through the flow of those ports. Only the IPv4 header of a
 * later fragment changes (its address and header checksum): the L4 checksum,
 * in the first fragment, already covers the whole datagram.
 *
 * `nat_frags` is an LRU hash: an evicted record only costs the later
 * fragments of one datagram (counted), never another flow's packets. A
 * record older than the reassembly timeout (ipfrag_time, 30 s) is ignored,
 * so that a datagram reusing an old identification is never sent after the
 * ports of another.
 *
 * IPv6 (nat6.h) does the same with the Fragment header's identification, in
 * `nat6_frags` (struct hr_frag6_key), through frag_fill and frag_fresh here.
 *
 * Included by nat.h; the map accessors are defined in host_routing.c (bcc
 * rewrites map calls only in the file it compiles).
 */
#ifndef HR_FRAG_H
#define HR_FRAG_H

#include <uapi/linux/bpf.h>
#include <uapi/linux/ip.h>

#include "hostrouting_shared.h"
#include "parse.h"

/* How long a first fragment's record holds: net.ipv4.ipfrag_time's default. */
#define HR_FRAG_TIMEOUT_NS	(30 * 1000000000ULL)

/* Accessors of the `nat_frags` map, defined in host_routing.c. */
static __always_inline struct hr_frag_entry *frag_lookup(struct hr_frag_key *key);
static __always_inline void frag_update(struct hr_frag_key *key, struct hr_frag_entry *value);

/* A fragment other than the first (offset > 0): no L4 header in it. Packet pointers valid. */
static __always_inline int frag_is_later(struct hr_pkt *pkt)
{
	return (pkt->ip->frag_off & HR_HTONS(HR_IP_OFFSET)) != 0;
}

/* The datagram a fragment belongs to, as on the wire. Packet pointers valid. */
static __always_inline void frag_key_of(struct hr_frag_key *k, struct hr_pkt *pkt)
{
	k->saddr = pkt->saddr;
	k->daddr = pkt->daddr;
	k->id = pkt->ip->id;
	k->protocol = pkt->protocol;
	k->pad = 0;
}

/* A record of a first fragment that carried these ports (network order), either family's. */
static __always_inline void frag_fill(struct hr_frag_entry *v, __u16 sport, __u16 dport,
				      __u64 now)
{
	v->seen_ns = now;
	v->sport = sport;
	v->dport = dport;
	v->protocol = 0;
	v->pad[0] = 0;
	v->pad[1] = 0;
	v->pad[2] = 0;
}

/* Record `f` (NULL: none), unless its first fragment is older than the reassembly timeout. */
static __always_inline struct hr_frag_entry *frag_fresh(struct hr_frag_entry *f, __u64 now)
{
	if (f && f->seen_ns < now && now - f->seen_ns > HR_FRAG_TIMEOUT_NS)
		return 0;
	return f;
}

/* The first fragment of datagram `k` carried these ports (network order). */
static __always_inline void frag_record(struct hr_frag_key *k, struct hr_frag_entry *v,
					__u16 sport, __u16 dport, __u64 now)
{
	frag_fill(v, sport, dport, now);
	frag_update(k, v);
}

/*
 * The record of datagram `k`, if its first fragment was seen within the
 * reassembly timeout; NULL otherwise (out of order, evicted, or stale).
 */
static __always_inline struct hr_frag_entry *frag_find(struct hr_frag_key *k, __u64 now)
{
	return frag_fresh(frag_lookup(k), now);
}

#endif /* HR_FRAG_H */
