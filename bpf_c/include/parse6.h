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
	__u8 protocol;		/* the upper-layer protocol, after the extension headers; in a
				 * later fragment the Fragment header's next header */
	__u8 fragment;		/* 1: a Fragment header is there (first or later fragment) */
	__u8 later_fragment;	/* 1: a fragment with a non-zero offset (no upper-layer header) */
	__u8 ports_read;	/* parse_ports6() ran since parse_ipv6() */
	__u8 ext_unwalked;	/* HR_PARSE6_EXT_HEADERS: protocol and l4_off are not known */
	__u8 frag_nexthdr;	/* the Fragment header's next header (fragment); 0 otherwise */
	__u32 end;		/* offset of the end of the IPv6 payload from skb->data */
};

/* Outcome of parse_ipv6(). */
enum hr_parse6 {
	HR_PARSE6_OK = 0,		/* fields of struct hr_pkt6 are valid */
	HR_PARSE6_NOT_IPV6,		/* another ethertype, or a VLAN tag */
	HR_PARSE6_MALFORMED,		/* truncated fixed header, version not 6, bad payload length */
	HR_PARSE6_EXT_HEADERS,		/* fixed header sane (addresses valid), but the extension
					 * headers could not be walked: too many, unknown, truncated */
};

/* Extension headers walked at most (RFC 8200's order has six before the upper layer). */
#define HR_IPV6_MAX_EXT	6

#define HR_NEXTHDR_HOP		0
#define HR_NEXTHDR_ROUTING	43
#define HR_NEXTHDR_FRAGMENT	44
#define HR_NEXTHDR_AUTH		51
#define HR_NEXTHDR_NONE		59
#define HR_NEXTHDR_DEST		60
#define HR_NEXTHDR_MOBILITY	135
#define HR_NEXTHDR_HIP		139
#define HR_NEXTHDR_SHIM6	140
#define HR_NEXTHDR_EXP1		253
#define HR_NEXTHDR_EXP2		254
#define HR_IP6_OFFSET		0xfff8	/* of the Fragment header's offset word (host order) */

/* An extension header (RFC 8200 4, RFC 7045): one the walk knows, or one it cannot walk. */
static __always_inline int ipv6_ext_header(__u8 nexthdr)
{
	switch (nexthdr) {
	case HR_NEXTHDR_HOP:
	case HR_NEXTHDR_ROUTING:
	case HR_NEXTHDR_FRAGMENT:
	case HR_NEXTHDR_DEST:
	case HR_NEXTHDR_AUTH:
	case HR_NEXTHDR_MOBILITY:
	case HR_NEXTHDR_HIP:
	case HR_NEXTHDR_SHIM6:
	case HR_NEXTHDR_EXP1:
	case HR_NEXTHDR_EXP2:
		return 1;
	}
	return 0;
}

/*
 * One step of the walk: the header `nexthdr` at `*off`. Returns 1 when it was
 * an extension header walked past (*nexthdr, *off now the next one's), 0 when
 * `nexthdr` is the upper layer (or a later fragment's payload), -1 when it
 * cannot be walked (truncated, or an extension header the datapath does not
 * know: AH, mobility, HIP, shim6, experimental).
 */
static __always_inline int ipv6_ext_step(struct __sk_buff *skb, struct hr_pkt6 *pkt, __u8 *nexthdr,
					 __u32 *off)
{
	__u8 hdr[4];
	__u16 frag;

	switch (*nexthdr) {
	case HR_NEXTHDR_HOP:
	case HR_NEXTHDR_ROUTING:
	case HR_NEXTHDR_DEST:
		if (*off + 8 > pkt->end || bpf_skb_load_bytes(skb, *off, hdr, 2) < 0)
			return -1;
		*nexthdr = hdr[0];
		*off += ((__u32)hdr[1] + 1) * 8;
		return *off <= pkt->end ? 1 : -1;
	case HR_NEXTHDR_FRAGMENT:
		if (pkt->fragment || *off + 8 > pkt->end ||
		    bpf_skb_load_bytes(skb, *off, hdr, 4) < 0)
			return -1;	/* a second Fragment header: not a sane packet */
		pkt->fragment = 1;
		pkt->frag_off = *off;
		pkt->frag_nexthdr = hdr[0];
		__builtin_memcpy(&frag, hdr + 2, 2);
		pkt->later_fragment = (bpf_ntohs(frag) & HR_IP6_OFFSET) != 0;
		*nexthdr = hdr[0];
		*off += 8;
		return pkt->later_fragment ? 0 : 1;
	}
	return ipv6_ext_header(*nexthdr) ? -1 : 0;
}

/*
 * Parse Ethernet + IPv6 and walk the extension headers to the upper layer.
 * On HR_PARSE6_OK (and HR_PARSE6_EXT_HEADERS: then protocol and l4_off are
 * not known) pkt->eth and pkt->ip6 point into the linear data and the
 * addresses are copied. Pointers stay valid until a helper that changes
 * packet data is called. The payload length must fit in what is there
 * (trailing Ethernet padding is fine); a GSO packet above 64 KiB (BIG TCP)
 * carries 0 and is trusted to skb->len; 0 otherwise is a jumbogram (a
 * hop-by-hop option), which only the stack handles.
 */
static __always_inline int parse_ipv6(struct __sk_buff *skb, struct hr_pkt6 *pkt)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct ipv6hdr *ip6;
	__u32 payload, room, off, i;
	__u8 nexthdr;
	int rc;

	if ((void *)(eth + 1) > data_end)
		return HR_PARSE6_MALFORMED;
	if (skb->vlan_present || eth->h_proto != HR_HTONS(ETH_P_IPV6))
		return HR_PARSE6_NOT_IPV6;
	ip6 = (void *)(eth + 1);
	if ((void *)(ip6 + 1) > data_end)
		return HR_PARSE6_MALFORMED;
	if (ip6->version != 6)
		return HR_PARSE6_MALFORMED;

	payload = bpf_ntohs(ip6->payload_len);
	room = skb->len - sizeof(*eth) - sizeof(*ip6);
	if (payload == 0 && skb->gso_size != 0)
		payload = room;
	if (payload > room)
		return HR_PARSE6_MALFORMED;

	pkt->eth = eth;
	pkt->ip6 = ip6;
	__builtin_memcpy(&pkt->saddr, &ip6->saddr, sizeof(pkt->saddr));
	__builtin_memcpy(&pkt->daddr, &ip6->daddr, sizeof(pkt->daddr));
	pkt->end = sizeof(*eth) + sizeof(*ip6) + payload;
	pkt->frag_off = 0;
	pkt->fragment = 0;
	pkt->later_fragment = 0;
	pkt->frag_nexthdr = 0;
	pkt->sport = 0;
	pkt->dport = 0;
	pkt->ports_read = 0;
	pkt->protocol = 0;
	pkt->l4_off = 0;
	pkt->ext_unwalked = 1;
	nexthdr = ip6->nexthdr;
	if (payload == 0 && nexthdr == HR_NEXTHDR_HOP)
		return HR_PARSE6_EXT_HEADERS;	/* a jumbogram */

	off = sizeof(*eth) + sizeof(*ip6);
#pragma unroll
	for (i = 0; i < HR_IPV6_MAX_EXT; i++) {
		rc = ipv6_ext_step(skb, pkt, &nexthdr, &off);
		if (rc < 0)
			return HR_PARSE6_EXT_HEADERS;
		if (rc == 0)
			goto upper;
	}
	/* the bound reached: one more extension header is too many, anything else is fine */
	if (ipv6_ext_header(nexthdr))
		return HR_PARSE6_EXT_HEADERS;
upper:
	pkt->protocol = nexthdr;
	pkt->l4_off = off;
	pkt->ext_unwalked = 0;
	return HR_PARSE6_OK;
}

/*
 * Fill pkt->sport/dport for TCP and UDP, once per parse (as parse_ports() for
 * IPv4): not in a later fragment, and left 0 when the payload is too short.
 */
static __always_inline void parse_ports6(struct __sk_buff *skb, struct hr_pkt6 *pkt)
{
	__u16 ports[2];

	if (pkt->ports_read)
		return;
	pkt->ports_read = 1;
	if (pkt->ext_unwalked || pkt->later_fragment)
		return;
	if (pkt->protocol != IPPROTO_TCP && pkt->protocol != IPPROTO_UDP)
		return;
	if (pkt->l4_off + sizeof(ports) > pkt->end ||
	    bpf_skb_load_bytes(skb, pkt->l4_off, ports, sizeof(ports)) < 0)
		return;
	pkt->sport = ports[0];
	pkt->dport = ports[1];
}

/*
 * The ICMPv6 type of a packet parse_ipv6() walked to an ICMPv6 header, or -1
 * (another protocol, a later fragment, or too short to have one).
 */
static __always_inline int icmp6_type(struct __sk_buff *skb, struct hr_pkt6 *pkt)
{
	__u8 type;

	if (pkt->ext_unwalked || pkt->later_fragment || pkt->protocol != IPPROTO_ICMPV6)
		return -1;
	if (pkt->l4_off + 4 > pkt->end || bpf_skb_load_bytes(skb, pkt->l4_off, &type, 1) < 0)
		return -1;
	return type;
}

#endif /* HR_PARSE6_H */
