/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Ethernet / IPv6 parsing for the TC programs: the fixed header, then the
 * extension headers a router walks past (hop-by-hop, routing, destination
 * options, fragment) up to a bounded count, to the upper-layer header.
 *
 * As parse.h: packet pointers from direct packet access cover the linear
 * data only; what may lie beyond it is read with bpf_skb_load_bytes.
 */
#ifndef HR_PARSE6_H
#define HR_PARSE6_H

#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/in6.h>

#include "hostrouting_shared.h"
#include "compat.h"
#include "parse.h"

/* What the IPv6 steps need to know about a packet after parsing (parse_ipv6()). */
struct hr_pkt6 {
	struct ethhdr *eth;
	struct ipv6hdr *ip6;
	__u32 l4_off;		/* offset of the upper-layer header from skb->data */
	__u32 frag_off;		/* offset of the Fragment header from skb->data; 0: none */
	struct hr_in6 saddr;
	struct hr_in6 daddr;
	__u16 sport;		/* network order; TCP/UDP, 0 otherwise and in later fragments */
	__u16 dport;
	__u8 protocol;		/* the upper-layer protocol, after the extension headers */
	__u8 fragment;		/* 1: a Fragment header is there (first or later fragment) */
	__u8 later_fragment;	/* 1: a fragment with a non-zero offset (no upper-layer header) */
	__u8 ports_read;	/* parse_ports6() ran since parse_ipv6() */
};

#endif /* HR_PARSE6_H */
