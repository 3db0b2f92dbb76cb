/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The BPF SNAT's flows, for one address family: the two entries of a flow
 * (twins), their expiry, deletion by claim, state, port allocation, and the
 * accounting of a packet. nat.h explains the design; this file holds what
 * does not depend on the family, written once and included once per family
 * (no include guard): nat.h for IPv4, nat6.h for IPv6, each after defining
 *
 *   NF(name)          the family's name of a function here (nat_twin, nat6_twin)
 *   NF_KEY, NF_ENTRY  its key and entry types (struct hr_nat_key, struct hr_nat6_key, ...)
 *   NF_SCRATCH        its per-CPU scratch (key, rk, tk, val)
 *   NF_ADDR           its address type (__u32, struct hr_in6), assignable
 *   NF_ADDR_EQ(a, b)  whether two NF_ADDR values are equal
 *   NF_NODE_ADDR(dst, cfg)  dst (an NF_ADDR) = the node's address, the SNAT source
 *   NF_OPAQUE(ptr)    nothing, or a compiler barrier on a pointer (see nat6.h)
 *
 * and declaring the accessors of its map: NF(lookup), NF(insert), NF(remove);
 * NF_RACES, if defined, compiles the test builds' race points in. All of
 * them are #undef'd at the end of this file, ready for the next family. Each
 * family gets its own functions, as if written out twice: IPv4's do what they
 * did before IPv6.
 *
 * On its own (no family chosen), this file is nat.h's IPv4 instance.
 */
#ifndef NF_KEY
#include "nat.h"
#else

/* The key of the other entry of the same flow as entry `e` (key `k`). */
static __always_inline void NF(twin)(const NF_KEY *k, const NF_ENTRY *e, NF_KEY *twin)
{
	twin->protocol = k->protocol;
	twin->pad[0] = 0;
	twin->pad[1] = 0;
	if (k->dir == HR_NAT_OUT) {
		twin->dir = HR_NAT_IN;
		twin->saddr = k->daddr;
		twin->daddr = e->addr;
		twin->sport = k->dport;
		twin->dport = e->port;
	} else {
		twin->dir = HR_NAT_OUT;
		twin->saddr = e->addr;
		twin->daddr = k->saddr;
		twin->sport = e->port;
		twin->dport = k->sport;
	}
}

/*
 * Whether `t`, found under the twin key of key `k` (of direction `dir`: a
 * constant where the caller knows it), is the other entry of k's flow (it
 * translates back to k's own side), not another flow's.
 */
static __always_inline int NF(points_back)(const NF_KEY *k, const NF_ENTRY *t, __u8 dir)
{
	if (dir == HR_NAT_OUT)
		return NF_ADDR_EQ(t->addr, k->saddr) && t->port == k->sport;
	return NF_ADDR_EQ(t->addr, k->daddr) && t->port == k->dport;
}

/* The twin of entry `e` (key `k`, twin key left in s->tk) if it still points back; else NULL. */
static __always_inline NF_ENTRY *NF(twin_entry)(NF_SCRATCH *s, const NF_KEY *k, const NF_ENTRY *e)
{
	NF_ENTRY *t;

	NF(twin)(k, e, &s->tk);
	t = NF(lookup)(&s->tk);
	if (!t || !NF(points_back)(k, t, k->dir))
		return 0;
	return t;
}

/*
 * Whether the flow of entry `e` (key `k`, last seen at `seen`, as read by the
 * caller) is still alive at `now`: its own last packet, or its twin's, is
 * recent enough for the state. The twin is
 * only looked at when `e` alone would have expired.
 */
static __always_inline int NF(alive)(struct hr_config *cfg, NF_SCRATCH *s, NF_KEY *k, NF_ENTRY *e,
				     __u64 seen, __u64 now)
{
	NF_ENTRY *t;

	if (nat_fresh(now, seen, nat_timeout_ns(cfg, k->protocol, e->state)))
		return 1;
	t = NF(twin_entry)(s, k, e);
	if (!t)
		return 0;
	seen = t->last_seen_ns > seen ? t->last_seen_ns : seen;
	return nat_fresh(now, seen, nat_timeout_ns(cfg, k->protocol, e->state | t->state));
}

/*
 * Test builds only (-DHR_TEST_RACES), and only in a family whose includer
 * defines NF_RACES (IPv4's: the points cost the verifier more states than
 * from_pod6 may have): "another CPU" acts at a race point.
 * A test leaves an entry under the key {dir HR_RACE_DIR, dport `point`} in
 * the family's map; at that point the entry under key `at` is replaced with
 * it (as another CPU's delete and insert would) and the test entry goes.
 * Production builds compile the points to nothing.
 */
#if defined(HR_TEST_RACES) && defined(NF_RACES)
static __always_inline void NF(race_point)(__u16 point, NF_KEY *at)
{
	NF_KEY m = {};
	NF_ENTRY *v;

	m.dir = HR_RACE_DIR;
	m.dport = point;
	v = NF(lookup)(&m);
	if (!v)
		return;
	NF(remove)(at);
	NF(insert)(at, v);
	NF(remove)(&m);
}
#define NF_RACE_POINT(point, at)	NF(race_point)(point, at)
#else
#define NF_RACE_POINT(point, at)	do { } while (0)
#endif

/*
 * Delete the flow of entry `e` (key `k`), judged by its last_seen_ns `seen`:
 * its twin (if it still points back and can be claimed) and itself. Returns
 * 0 when another CPU got there first or a packet refreshed it (nothing
 * deleted then).
 */
static __always_inline int NF(delete_flow)(NF_SCRATCH *s, NF_KEY *k, NF_ENTRY *e, __u64 seen)
{
	NF_ENTRY *t;

	if (!nat_claim(&e->last_seen_ns, seen))
		return 0;
	t = NF(twin_entry)(s, k, e);
	if (t && nat_claim(&t->last_seen_ns, t->last_seen_ns))
		NF(remove)(&s->tk);
	NF(remove)(k);
	return 1;
}

/*
 * Account a packet to entry `e` and fold in new state bits; a state change
 * is copied to the twin too (rare: a few times per flow), so that both
 * entries expire alike.
 */
static __always_inline void NF(touch)(struct hr_config *cfg, NF_SCRATCH *s, NF_KEY *k, NF_ENTRY *e,
				      __u64 bits, __u32 len, __u64 now)
{
	NF_ENTRY *t;

	nat_refresh(&e->last_seen_ns, now, nat_refresh_slack(cfg, k->protocol, e->state, bits));
	__sync_fetch_and_add(&e->packets, 1);
	__sync_fetch_and_add(&e->bytes, len);
	if ((e->state | bits) == e->state)
		return;
	/* atomic: the other direction may be setting its own bits on another CPU */
	__sync_fetch_and_or(&e->state, bits);
	t = NF(twin_entry)(s, k, e);
	if (t)
		__sync_fetch_and_or(&t->state, bits);
}

/* Clear the state bits of both entries of a flow (a new TCP connection on its tuple). */
static __always_inline void NF(reset_state)(NF_SCRATCH *s, NF_KEY *k, NF_ENTRY *e)
{
	NF_ENTRY *t;

	e->state = 0;
	e->seq_hint = 0;
	t = NF(twin_entry)(s, k, e);
	if (t) {
		t->state = 0;
		t->seq_hint = 0;
	}
}

/*
 * An inbound SYN-ACK answers a SYN of this very tuple: whatever ended before
 * (an RST the pod sent about a stray ACK of the tuple's previous flow, a FIN)
 * is over; the new connection is established. Keeps SEEN_REPLY only.
 */
static __always_inline void NF(reopen)(NF_SCRATCH *s, NF_KEY *k, NF_ENTRY *e)
{
	NF_ENTRY *t;

	if (!(e->state & (HR_NAT_RST | HR_NAT_FIN_OUT | HR_NAT_FIN_IN)))
		return;
	e->state = HR_NAT_SEEN_REPLY;
	t = NF(twin_entry)(s, k, e);
	if (t)
		t->state = HR_NAT_SEEN_REPLY;
}

/*
 * Whether the IN entry t (key s->rk, last seen at `seen`) of another flow may
 * be taken over by the new flow of this packet: its flow expired; or this is
 * a new TCP connection (a SYN, `l4`), half the tries found no free port, and
 * the flow ended (RST, or FIN both ways) and has been quiet for
 * HR_NAT_REUSE_QUIET_NS, and the SYN starts beyond the sequence numbers the
 * remote saw from it (as conntrack lets a SYN reuse a TIME_WAIT tuple:
 * nf_nat_used_tuple_harder, nf_seq_has_advanced; the remote's TIME_WAIT
 * accepts such a SYN only).
 */
static __always_inline int NF(may_take)(struct hr_config *cfg, NF_SCRATCH *s, NF_ENTRY *t,
					__u64 seen, __u64 now, struct hr_nat_l4 *l4, int syn,
					__u32 try)
{
	NF_ENTRY *old;
	__u32 end;

	if (!NF(alive)(cfg, s, &s->rk, t, seen, now))
		return 1;
	if (!syn || try < HR_NAT_RETRIES / 2 || !nat_tcp_closed(t->state))
		return 0;
	if (seen < now && now - seen < HR_NAT_REUSE_QUIET_NS)
		return 0;
	if (seen >= now)
		return 0;
	old = NF(twin_entry)(s, &s->rk, t);	/* the old flow's OUT entry, with its seq_end */
	if (!old || old->seq_end == 0)
		return 0;
	end = bpf_ntohl(old->seq_end);
	return (__s32)(bpf_ntohl(l4->seq) - end) > 0;
}

/*
 * Find or create the OUT entry of the flow in s->key. On success *addr and
 * *port hold the node address and NAT port to write, and *entry the entry
 * when it was found (NULL when this packet created it); returns 0, or the
 * hr_reason of the drop.
 */
static __always_inline int NF(lookup_or_create)(struct hr_config *cfg, NF_SCRATCH *s, __u64 now,
						struct hr_nat_l4 *l4, int syn, NF_ADDR *addr,
						__u16 *port, NF_ENTRY **entry)
{
	NF_KEY *k = &s->key, *rk = &s->rk;
	NF_ENTRY *e, *t, *v = &s->val;
	__u32 range, i;
	__u64 seen;
	__u16 p;
	int rc;

	e = NF(lookup)(k);
	if (e) {
		seen = e->last_seen_ns;
		NF(twin)(k, e, rk);
		t = NF(lookup)(rk);
		if (t && NF(points_back)(k, t, HR_NAT_OUT)) {
			if (NF(alive)(cfg, s, k, e, seen, now))
				goto found;
		} else if (!t && nat_fresh(now, seen, nat_timeout_ns(cfg, k->protocol, e->state))) {
			/* the IN entry of a live flow is gone: put it back if the port is free */
			__builtin_memset(v, 0, sizeof(*v));
			v->created_ns = e->created_ns;
			v->last_seen_ns = now;
			v->addr = k->saddr;
			v->port = k->sport;
			v->state = e->state;
			NF_RACE_POINT(1, rk);
			rc = NF(insert)(rk, v);
			if (rc == 0)
				goto found;
			if (rc == -HR_E2BIG)
				return HR_DROP_NAT_TABLE_FULL;
			/* another CPU put it back meanwhile: the flow goes on with its port */
			t = NF(lookup)(rk);
			if (t && NF(points_back)(k, t, HR_NAT_OUT))
				goto found;
		}
		/* expired, or its port went to another flow: start afresh */
		if (!NF(delete_flow)(s, k, e, seen))
			return HR_DROP_NAT_FAILED;	/* another CPU is at it: a racing flow won */
	}

	if (cfg->nat_port_min == 0 || cfg->nat_port_max < cfg->nat_port_min)
		return HR_DROP_NAT_EXHAUSTED;
	range = (__u32)cfg->nat_port_max - cfg->nat_port_min + 1;

	__builtin_memset(rk, 0, sizeof(*rk));
	rk->protocol = k->protocol;
	rk->dir = HR_NAT_IN;
	rk->saddr = k->daddr;
	NF_NODE_ADDR(rk->daddr, cfg);
	rk->sport = k->dport;
	__builtin_memset(v, 0, sizeof(*v));
	v->created_ns = now;
	v->last_seen_ns = now;
	v->addr = k->saddr;
	v->port = k->sport;

	for (i = 0; i < HR_NAT_RETRIES; i++) {
		NF_OPAQUE(s);
		NF_OPAQUE(cfg);
		/* a random port each try: linear probing would pile flows into runs */
		p = bpf_htons((__u16)(cfg->nat_port_min + bpf_get_prandom_u32() % range));
		rk->dport = p;
		rc = NF(insert)(rk, v);
		if (rc == 0)
			goto claimed;
		if (rc == -HR_E2BIG)
			return HR_DROP_NAT_TABLE_FULL;
		t = NF(lookup)(rk);
		if (!t)
			continue;
		seen = t->last_seen_ns;
		/* a flow that expired, or a TCP connection that ended: free it, claim it like anyone */
		if (NF(may_take)(cfg, s, t, seen, now, l4, syn, i)) {
			NF_RACE_POINT(2, rk);
			if (NF(delete_flow)(s, rk, t, seen) && NF(insert)(rk, v) == 0)
				goto claimed;
		}
	}
	return HR_DROP_NAT_EXHAUSTED;

claimed:
	NF_NODE_ADDR(v->addr, cfg);
	v->port = p;
	rc = NF(insert)(k, v);
	if (rc != 0) {
		/* table full, or another CPU created this flow meanwhile: give our port back */
		NF(remove)(rk);
		if (rc == -HR_E2BIG)
			return HR_DROP_NAT_TABLE_FULL;
		e = NF(lookup)(k);
		if (!e)
			return HR_DROP_NAT_FAILED;
		goto found;
	}
	*addr = v->addr;
	*port = v->port;
	*entry = 0;
	return 0;

found:
	*addr = e->addr;
	*port = e->port;
	*entry = e;
	return 0;
}

/*
 * A packet leaving (`l4`, its TCP SYN-ness `syn`, `len` bytes) went through
 * the OUT entry of s->key: `e` when it was found, NULL when the packet
 * created it (looked up here). A reopened 5-tuple starts its state afresh;
 * the packet is accounted; TCP keeps the pod's last ACK (RST plausibility)
 * and the furthest sequence number it sent (port reuse).
 */
static __always_inline void NF(account_out)(struct hr_config *cfg, NF_SCRATCH *s, NF_ENTRY *e,
					    struct hr_nat_l4 *l4, int syn, __u32 len, __u64 now)
{
	if (!e)	/* created by this packet: accounted below like any */
		e = NF(lookup)(&s->key);
	if (!e)
		return;
	/* the pod reopened the very same 5-tuple: a new connection, state afresh */
	if (syn && nat_tcp_closed(e->state))
		NF(reset_state)(s, &s->key, e);
	NF(touch)(cfg, s, &s->key, e, nat_state_bits(s->key.protocol, l4, 1), len, now);
	if (s->key.protocol != IPPROTO_TCP)
		return;
	/* written only when they move: a shared cache line costs every CPU */
	if ((l4->tcp_flags & HR_TCP_ACK) && e->seq_hint != l4->ack)
		e->seq_hint = l4->ack;
	/* the furthest the pod has sent (a SYN starts over; retransmits do not go back) */
	if (syn || e->seq_end == 0 || (__s32)(l4->seq_end - bpf_ntohl(e->seq_end)) > 0)
		e->seq_end = bpf_htonl(l4->seq_end);
}

/* Look up the IN entry (s->key) a reply or an ICMP error belongs to; NULL unless alive. */
static __always_inline NF_ENTRY *NF(find_in)(struct hr_config *cfg, NF_SCRATCH *s, __u64 now)
{
	NF_ENTRY *e = NF(lookup)(&s->key);
	__u64 seen;

	if (!e)
		return 0;
	seen = e->last_seen_ns;
	if (!NF(alive)(cfg, s, &s->key, e, seen, now)) {
		NF(delete_flow)(s, &s->key, e, seen);
		return 0;
	}
	return e;
}

/*
 * Whether an RST or a FIN from outside (`l4`) about the flow of IN entry
 * (s->key, e) may change its NAT state. Its sequence number must lie near
 * what the pod acknowledged last (the OUT entry's seq_hint). Without a hint
 * (the pod has acknowledged nothing: its SYN unanswered, or the tuple reset
 * by a new SYN) only one that acknowledges exactly what the pod sent is
 * believed (an RST answering the SYN); without that either (the OUT entry was
 * put back by a reply) nothing is until the pod acknowledges again: a hint
 * of 0 must not make every sequence number plausible.
 */
static __always_inline int NF(close_plausible)(NF_SCRATCH *s, NF_ENTRY *e, struct hr_nat_l4 *l4)
{
	NF_ENTRY *t = NF(twin_entry)(s, &s->key, e);

	if (!t)
		return 0;
	if (t->seq_hint == 0)
		return (l4->tcp_flags & HR_TCP_ACK) && t->seq_end != 0 && l4->ack == t->seq_end;
	return bpf_ntohl(l4->seq) - bpf_ntohl(t->seq_hint) < HR_RST_WINDOW;
}

/*
 * A reply came through the IN entry (s->key, e) of a live flow: if its OUT
 * entry is gone (a race with a delete), put it back, or the pod's next packet would get a
 * new port and the remote would reset the connection.
 */
static __always_inline void NF(restore_out)(NF_SCRATCH *s, NF_ENTRY *e, __u64 now)
{
	NF(twin)(&s->key, e, &s->tk);
	if (NF(lookup)(&s->tk))
		return;
	__builtin_memset(&s->val, 0, sizeof(s->val));
	s->val.created_ns = e->created_ns;
	s->val.last_seen_ns = now;
	s->val.addr = s->key.daddr;	/* the IN key's: the node's address and NAT port */
	s->val.port = s->key.dport;
	s->val.state = e->state;
	NF(insert)(&s->tk, &s->val);
}

/*
 * A reply (`l4`, `len` bytes) came through the live IN entry (s->key, e): its
 * state bits (an implausible RST or FIN from outside changes nothing: the pod
 * still gets it and judges it), a SYN-ACK reopening the tuple, the packet
 * accounted, the OUT entry put back if it went.
 */
static __always_inline void NF(account_in)(struct hr_config *cfg, NF_SCRATCH *s, NF_ENTRY *e,
					   struct hr_nat_l4 *l4, __u32 len, __u64 now)
{
	__u64 bits = nat_state_bits(s->key.protocol, l4, 0);

	if ((bits & (HR_NAT_RST | HR_NAT_FIN_IN)) && !NF(close_plausible)(s, e, l4))
		/* delivered, the pod judges it; the NAT state ignores it */
		bits &= ~(__u64)(HR_NAT_RST | HR_NAT_FIN_IN);
	if (s->key.protocol == IPPROTO_TCP &&
	    (l4->tcp_flags & (HR_TCP_SYN | HR_TCP_ACK | HR_TCP_RST)) == (HR_TCP_SYN | HR_TCP_ACK))
		NF(reopen)(s, &s->key, e);
	NF(touch)(cfg, s, &s->key, e, bits, len, now);
	NF(restore_out)(s, e, now);
}

#undef NF_RACE_POINT
#undef NF_RACES
#undef NF
#undef NF_ENTRY
#undef NF_SCRATCH
#undef NF_ADDR
#undef NF_ADDR_EQ
#undef NF_NODE_ADDR
#undef NF_OPAQUE
#undef NF_KEY
#endif /* NF_KEY */
