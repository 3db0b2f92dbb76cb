/* SPDX-License-Identifier: GPL-2.0 */
/*
 * IPv6 packets too big for their way out. IPv6 routers never fragment: a
 * packet that does not fit its egress device is answered with an ICMPv6
 * Packet Too Big (RFC 4443 3.2) built here from the packet, so that the
 * sender learns the path MTU although the stack never saw its packet.
 *
 * The quote is summed in a per-CPU buffer (`icmp6_quote`): bcc rewrites map
 * calls only in the file it compiles, so it is reached through an accessor
 * that host_routing.c defines next to the map.
 */
#ifndef HR_PMTU6_H
#define HR_PMTU6_H

#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/in6.h>

#include "hostrouting_shared.h"
#include "compat.h"
#include "parse6.h"
#include "csum.h"
#include "pmtu.h"

#define HR_ICMP6_PKT_TOOBIG	2
#define HR_ICMP6_HOP_LIMIT	64
/*
 * RFC 4443 2.4 (c): an ICMPv6 error carries as much of the offending packet
 * as fits without the error exceeding the minimum IPv6 MTU, 1280 bytes.
 */
#define HR_ICMP6_QUOTE_MAX	(1280 - 40 - 8)
/* bpf_csum_diff() sums at most 512 bytes a call: the quote is summed in up to three. */
#define HR_CSUM_CHUNK		512

/* The quote of a Packet Too Big, for its checksum (padded with zeros to 4 bytes). */
struct hr_icmp6_quote {
	__u8 data[HR_ICMP6_QUOTE_MAX + 4];
};

/* Accessor of the `icmp6_quote` per-CPU array, defined in host_routing.c. */
static __always_inline struct hr_icmp6_quote *icmp6_quote_get(void);

/* The ICMPv6 checksum's pseudo-header (RFC 8200 8.1) after the two addresses. */
struct hr_pseudo6_tail {
	__u32 len;		/* upper-layer packet length (network order) */
	__u8 zero[3];
	__u8 nexthdr;
};

/* The ICMPv6 header of a Packet Too Big. */
struct hr_icmp6_ptb {
	__u8 type;
	__u8 code;
	__u16 checksum;
	__u32 mtu;		/* network order */
};

/* Does the IPv6 packet fit the MTU of egress device `ifindex`? As fits_egress() (pmtu.h). */
static __always_inline int fits_egress6(struct __sk_buff *skb, struct hr_pkt6 *pkt,
					__u32 ifindex, __u32 *mtu)
{
	return fits_mtu(skb, pkt->end - sizeof(struct ethhdr), ifindex, mtu);
}

/*
 * Answer a packet too big for the egress device with an ICMPv6 Packet Too
 * Big built from it:
 *
 *   before: eth | IPv6 ... (the whole packet, extension headers included)
 *   after:  eth (MACs swapped) | IPv6 (40) | ICMPv6 (8) | the packet's first
 *           quote_len bytes: 1232 at most, so that the reply is 1280 bytes
 *
 * from `saddr` (the pods' gateway) to the packet's source, for the caller to
 * send back where it came from. Returns 0, or -1 when a helper failed (the
 * packet may then be half rewritten: the caller drops it). An offloaded TCP
 * checksum (CHECKSUM_PARTIAL) is left as pmtu.h's icmp_frag_needed() leaves
 * it: harmless at the ingress of the pod's eth0.
 */
static __always_inline int icmp6_packet_too_big(struct __sk_buff *skb, struct hr_pkt6 *pkt,
						__u32 mtu, const struct hr_in6 *saddr)
{
	struct hr_icmp6_quote *quote;
	struct hr_icmp6_ptb icmp = {};
	struct hr_pseudo6_tail pseudo = {};
	struct ipv6hdr ip6 = {};
	__u8 macs[2 * ETH_ALEN];
	__u64 quote_len, padded, chunk;
	__s64 sum;

	quote = icmp6_quote_get();
	if (!quote)
		return -1;
	quote_len = pkt->end - sizeof(struct ethhdr);
	if (quote_len > HR_ICMP6_QUOTE_MAX)
		quote_len = HR_ICMP6_QUOTE_MAX;
	if (quote_len < sizeof(ip6))
		return -1;
	quote_len &= 0x7ff;	/* already 40..1232: tells the verifier so */
	if (quote_len < 1 || quote_len > HR_ICMP6_QUOTE_MAX)
		return -1;

	__builtin_memcpy(macs, pkt->eth->h_source, ETH_ALEN);
	__builtin_memcpy(macs + ETH_ALEN, pkt->eth->h_dest, ETH_ALEN);
	if (bpf_skb_load_bytes(skb, sizeof(struct ethhdr), quote->data, quote_len) < 0)
		return -1;
	/* zeros to the next multiple of 4, which bpf_csum_diff() sums in */
	quote->data[quote_len] = 0;
	quote->data[quote_len + 1] = 0;
	quote->data[quote_len + 2] = 0;
	padded = (quote_len + 3) & 0x7fc;

	ip6.version = 6;
	ip6.payload_len = bpf_htons(sizeof(icmp) + quote_len);
	ip6.nexthdr = IPPROTO_ICMPV6;
	ip6.hop_limit = HR_ICMP6_HOP_LIMIT;
	__builtin_memcpy(&ip6.saddr, saddr, sizeof(ip6.saddr));
	__builtin_memcpy(&ip6.daddr, &pkt->saddr, sizeof(ip6.daddr));

	pseudo.len = bpf_htonl(sizeof(icmp) + quote_len);
	pseudo.nexthdr = IPPROTO_ICMPV6;
	icmp.type = HR_ICMP6_PKT_TOOBIG;
	icmp.mtu = bpf_htonl(mtu);
	/* the addresses as the reply's header holds them, then the rest of the pseudo-header */
	sum = hr_csum_diff(0, 0, (void *)&ip6.saddr, 2 * sizeof(ip6.saddr), 0);
	if (sum >= 0)
		sum = hr_csum_diff(0, 0, (void *)&pseudo, sizeof(pseudo), (__u32)sum);
	if (sum >= 0)
		sum = hr_csum_diff(0, 0, (void *)&icmp, sizeof(icmp), (__u32)sum);
	chunk = padded > HR_CSUM_CHUNK ? HR_CSUM_CHUNK : padded;
	if (sum >= 0)
		sum = hr_csum_diff(0, 0, (void *)quote->data, chunk, (__u32)sum);
	if (sum >= 0 && padded > HR_CSUM_CHUNK) {
		chunk = padded - HR_CSUM_CHUNK;
		if (chunk > HR_CSUM_CHUNK)
			chunk = HR_CSUM_CHUNK;
		sum = hr_csum_diff(0, 0, (void *)(quote->data + HR_CSUM_CHUNK), chunk, (__u32)sum);
	}
	if (sum >= 0 && padded > 2 * HR_CSUM_CHUNK) {
		chunk = padded - 2 * HR_CSUM_CHUNK;
		if (chunk > sizeof(*quote) - 2 * HR_CSUM_CHUNK)
			return -1;
		sum = hr_csum_diff(0, 0, (void *)(quote->data + 2 * HR_CSUM_CHUNK), chunk,
				   (__u32)sum);
	}
	if (sum < 0)
		return -1;
	icmp.checksum = csum_fold32((__u32)sum);
	return icmp_rewrite(skb, quote_len, macs, &ip6, sizeof(ip6), &icmp, sizeof(icmp));
}

#endif /* HR_PMTU6_H */
