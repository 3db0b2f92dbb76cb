/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Ethernet / IPv4 / L4 parsing for the TC programs, with every bounds check
 * the verifier wants and every one a hostile or broken packet needs.
 *
 * Packet pointers come from direct packet access (skb->data .. data_end),
 * which only covers the linear part of the skb; lengths that may reach into
 * paged data (the IPv4 total length of a GSO packet) are checked against
 * skb->len instead.
 */
#ifndef HR_PARSE_H
#define HR_PARSE_H

#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/in.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>

#include "hostrouting_shared.h"
#include "compat.h"

/* Byte-order conversion usable in constant expressions (BPF is little-endian here). */
#define HR_HTONS(x) ((__u16)__builtin_bswap16((__u16)(x)))
#define HR_HTONL(x) ((__u32)__builtin_bswap32((__u32)(x)))

#define HR_IP_MF	0x2000
#define HR_IP_DF	0x4000
#define HR_IP_OFFSET	0x1fff

/* Outcome of parse_ipv4(). */
enum hr_parse {
	HR_PARSE_OK = 0,	/* IPv4, header sane: fields of struct hr_pkt are valid */
	HR_PARSE_NOT_IPV4,	/* another ethertype, or a VLAN tag (in the frame or in metadata) */
	HR_PARSE_MALFORMED,	/* truncated Ethernet/IPv4 header, bad version/IHL/total length */
};

/* What the programs need to know about a packet after parsing. */
struct hr_pkt {
	struct ethhdr *eth;
	struct iphdr *ip;
	__u32 ihl_len;		/* IPv4 header length in bytes, options included (20..60) */
	__u32 l4_off;		/* offset of the L4 header from skb->data */
	__u32 saddr;		/* network order */
	__u32 daddr;
	__u16 sport;		/* network order; 0 unless TCP/UDP and not a fragment */
	__u16 dport;
	__u8 protocol;
	__u8 fragment;		/* 1 for any fragment (MF set or offset non-zero) */
	__u8 ports_read;	/* parse_ports() ran since parse_ipv4() */
};

/*
 * Parse Ethernet + IPv4. On HR_PARSE_OK, pkt->eth and pkt->ip point into the
 * linear data and the whole IPv4 header (options included) is inside it.
 * Pointers stay valid until a helper that changes packet data is called.
 */
static __always_inline int parse_ipv4(struct __sk_buff *skb, struct hr_pkt *pkt)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip;
	__u32 ihl_len, tot_len, ip_room;

	if ((void *)(eth + 1) > data_end)
		return HR_PARSE_MALFORMED;
	/* A tag the device already pulled into metadata hides behind h_proto. */
	if (skb->vlan_present)
		return HR_PARSE_NOT_IPV4;
	if (eth->h_proto != HR_HTONS(ETH_P_IP))
		return HR_PARSE_NOT_IPV4;

	ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > data_end)
		return HR_PARSE_MALFORMED;
	if (ip->version != 4 || ip->ihl < 5)
		return HR_PARSE_MALFORMED;
	ihl_len = ip->ihl * 4;
	if ((void *)ip + ihl_len > data_end)
		return HR_PARSE_MALFORMED;

	/*
	 * The total length must cover the header and fit in what is there
	 * (trailing Ethernet padding is fine). A GSO packet above 64 KiB
	 * (BIG TCP) carries 0 and is trusted to skb->len.
	 */
	tot_len = bpf_ntohs(ip->tot_len);
	ip_room = skb->len - sizeof(*eth);
	if (tot_len == 0 && skb->gso_size != 0)
		tot_len = ip_room;
	if (tot_len < ihl_len || tot_len > ip_room)
		return HR_PARSE_MALFORMED;

	pkt->eth = eth;
	pkt->ip = ip;
	pkt->ihl_len = ihl_len;
	pkt->l4_off = sizeof(*eth) + ihl_len;
	pkt->saddr = ip->saddr;
	pkt->daddr = ip->daddr;
	pkt->protocol = ip->protocol;
	pkt->fragment = (ip->frag_off & HR_HTONS(HR_IP_MF | HR_IP_OFFSET)) != 0;
	pkt->sport = 0;
	pkt->dport = 0;
	pkt->ports_read = 0;
	return HR_PARSE_OK;
}

/*
 * Fill pkt->sport/dport for TCP and UDP, once per parse: only the steps that
 * use them call it (the same-node redirect never does). The ports may lie in
 * paged data, so they are copied with bpf_skb_load_bytes (which never
 * changes the packet). A header too short to hold them leaves them 0: the
 * stack will judge it.
 */
static __always_inline void parse_ports(struct __sk_buff *skb, struct hr_pkt *pkt)
{
	__u16 ports[2];

	if (pkt->ports_read)
		return;
	pkt->ports_read = 1;
	if (pkt->fragment)
		return;
	if (pkt->protocol != IPPROTO_TCP && pkt->protocol != IPPROTO_UDP)
		return;
	if (bpf_skb_load_bytes(skb, pkt->l4_off, ports, sizeof(ports)) < 0)
		return;
	pkt->sport = ports[0];
	pkt->dport = ports[1];
}

#endif /* HR_PARSE_H */
