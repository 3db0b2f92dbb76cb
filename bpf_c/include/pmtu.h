/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Packets too big for their way out: whether a packet fits its egress
 * device (fits_egress), and the ICMP Destination Unreachable / Fragmentation
 * Needed that answers one with DF set (icmp_frag_needed), so that the sender
 * learns the path MTU although the stack never saw its packet.
 *
 * The quote of the ICMP message is summed in a per-CPU buffer (`icmp_quote`):
 * bcc rewrites map calls only in the file it compiles, so it is reached
 * through an accessor that host_routing.c defines next to the map.
 */
#ifndef HR_PMTU_H
#define HR_PMTU_H

#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/icmp.h>
#include <uapi/linux/in.h>

#include "compat.h"
#include "parse.h"
#include "csum.h"

#define HR_ICMP_TTL	64
/* IP precedence "internetwork control", as the kernel's own ICMP errors use. */
#define HR_ICMP_TOS	0xc0
/* RFC 792: the offending header plus the first 64 bits of its payload, at least. */
#define HR_ICMP_QUOTE	8
/*
 * At most: RFC 1812 4.3.2.3 (and the kernel's own icmp_send()) quote as much
 * of the packet as fits in a 576-byte ICMP datagram, 548 bytes. Quoting that
 * much is also what makes the reply possible at all for a segment whose L4
 * checksum is left to the device (CHECKSUM_PARTIAL): bpf_skb_change_tail()
 * refuses (-EINVAL) to cut such a packet before the end of its checksum field
 * (csum_start + csum_offset + 2, 18 bytes into TCP), so "IPv4 header + 8 bytes"
 * could never be built from an offloaded TCP segment.
 */
#define HR_ICMP_QUOTE_MAX	(576 - 20 - 8)

/* The quote of a frag-needed, for its checksum: too big for the 512-byte stack. */
struct hr_icmp_quote {
	__u8 data[HR_ICMP_QUOTE_MAX + 4];	/* + 4: zeros, summed with an odd-sized quote */
};

/* Accessor of the `icmp_quote` per-CPU array, defined in host_routing.c. */
static __always_inline struct hr_icmp_quote *icmp_quote_get(void);

/*
 * Does the packet fit the MTU of egress device `ifindex`? A GSO packet is
 * checked segment by segment (BPF_MTU_CHK_SEGS; the kernel's ip_forward()
 * does the same), any other by its IPv4 total length, whatever the device's
 * link-layer header. The device's MTU is left in *mtu. A device that cannot be checked
 * (gone) counts as fitting: the redirect to it fails on its own. fits_mtu() takes the
 * length of the L3 datagram (IPv4 total length, IPv6 40 + payload length).
 */
static __always_inline int fits_mtu(struct __sk_buff *skb, __u32 l3_len, __u32 ifindex,
				    __u32 *mtu)
{
	long rc;

	if (skb->gso_size) {
		*mtu = 0;	/* with BPF_MTU_CHK_SEGS: must be 0, the skb is measured */
		rc = hr_check_mtu(skb, ifindex, mtu, 0, BPF_MTU_CHK_SEGS);
	} else {
		*mtu = l3_len;
		rc = hr_check_mtu(skb, ifindex, mtu, 0, 0);
	}
	return rc != BPF_MTU_CHK_RET_FRAG_NEEDED && rc != BPF_MTU_CHK_RET_SEGS_TOOBIG;
}

static __always_inline int fits_egress(struct __sk_buff *skb, struct hr_pkt *pkt, __u32 ifindex,
				       __u32 *mtu)
{
	return fits_mtu(skb, bpf_ntohs(pkt->ip->tot_len), ifindex, mtu);
}

/*
 * Turn the packet into an ICMP error in place: trimmed to Ethernet + its
 * first quote_len bytes (the quote stays where it is), room opened behind the
 * Ethernet header for the new L3 header (l3) and ICMP header (icmp), MACs
 * (`macs`: destination then source) and both headers written. Returns 0, or
 * -1 when a helper failed.
 */
static __always_inline int icmp_rewrite(struct __sk_buff *skb, __u64 quote_len, __u8 *macs,
					void *l3, __u32 l3_len, void *icmp, __u32 icmp_len)
{
	if (bpf_skb_change_tail(skb, sizeof(struct ethhdr) + quote_len, 0) < 0)
		return -1;
	if (bpf_skb_adjust_room(skb, l3_len + icmp_len, BPF_ADJ_ROOM_MAC, 0) < 0)
		return -1;
	if (bpf_skb_store_bytes(skb, 0, macs, 2 * ETH_ALEN, 0) < 0)
		return -1;
	if (bpf_skb_store_bytes(skb, sizeof(struct ethhdr), l3, l3_len, 0) < 0)
		return -1;
	if (bpf_skb_store_bytes(skb, sizeof(struct ethhdr) + l3_len, icmp, icmp_len, 0) < 0)
		return -1;
	return 0;
}

/*
 * Answer a packet too big for the egress device (DF set) with an ICMP
 * Destination Unreachable / Fragmentation Needed built from the packet:
 *
 *   before: eth | IPv4 (ihl_len) | payload ...
 *   after:  eth (MACs swapped) | IPv4 (20) | ICMP (8) | the packet's first
 *           quote_len bytes: its IPv4 header and payload, 548 bytes at most
 *
 * from `saddr` (the pods' gateway, or the node IP), for the caller to send
 * back where it came from (into a pod, or out of the underlay to a remote).
 * Returns 0, or -1 when a helper failed (the packet may then be half
 * rewritten: the caller drops it).
 *
 * A TCP segment from a pod usually has its checksum left to the device
 * (CHECKSUM_PARTIAL), and no helper changes that state: the reply keeps it,
 * with csum_start/csum_offset now pointing at the quoted TCP checksum field.
 * That is harmless where the reply goes, the ingress of the pod's eth0
 * (CHECKSUM_PARTIAL counts as verified there and nothing finishes it); its
 * ICMP checksum is computed here over the bytes as they are.
 */
static __always_inline int icmp_frag_needed(struct __sk_buff *skb, struct hr_pkt *pkt, __u32 mtu,
					    __u32 saddr)
{
	struct hr_icmp_quote *quote;
	__u8 macs[2 * ETH_ALEN];
	struct icmphdr icmp = {};
	struct iphdr ip = {};
	__u64 quote_len, ip_len, *word;
	__u32 i;
	__s64 sum;

	quote = icmp_quote_get();
	if (!quote)
		return -1;

	/* The datagram without Ethernet padding (a GSO packet's may be 0: then skb->len). */
	quote_len = skb->len - sizeof(struct ethhdr);
	ip_len = bpf_ntohs(pkt->ip->tot_len);
	if (ip_len && ip_len < quote_len)
		quote_len = ip_len;
	if (quote_len > HR_ICMP_QUOTE_MAX)
		quote_len = HR_ICMP_QUOTE_MAX;
	if (quote_len < pkt->ihl_len + HR_ICMP_QUOTE)
		return -1;
	quote_len &= 0x3ff;	/* already 28..548: tells the verifier so */
	if (quote_len < 1 || quote_len > HR_ICMP_QUOTE_MAX)
		return -1;

	/* Everything the reply needs from the packet, read before it changes. */
	__builtin_memcpy(macs, pkt->eth->h_source, ETH_ALEN);
	__builtin_memcpy(macs + ETH_ALEN, pkt->eth->h_dest, ETH_ALEN);
	/* zeros after the quote, so that summing the whole buffer sums the quote */
	word = (__u64 *)quote->data;
#pragma unroll
	for (i = 0; i < sizeof(*quote) / sizeof(*word); i++)
		word[i] = 0;
	if (bpf_skb_load_bytes(skb, sizeof(struct ethhdr), quote->data, quote_len) < 0)
		return -1;

	ip.version = 4;
	ip.ihl = 5;
	ip.tos = HR_ICMP_TOS;
	ip.tot_len = bpf_htons(sizeof(ip) + sizeof(icmp) + quote_len);
	ip.ttl = HR_ICMP_TTL;
	ip.protocol = IPPROTO_ICMP;
	ip.saddr = saddr;
	ip.daddr = pkt->saddr;
	sum = hr_csum_diff(0, 0, (void *)&ip, sizeof(ip), 0);
	if (sum < 0)
		return -1;
	ip.check = csum_fold32((__u32)sum);

	icmp.type = ICMP_DEST_UNREACH;
	icmp.code = ICMP_FRAG_NEEDED;
	icmp.un.frag.mtu = bpf_htons((__u16)mtu);
	sum = hr_csum_diff(0, 0, (void *)&icmp, sizeof(icmp), 0);
	if (sum < 0)
		return -1;
	/* in two halves: older kernels sum at most 512 bytes a call */
	sum = hr_csum_diff(0, 0, (void *)quote->data, sizeof(*quote) / 2, (__u32)sum);
	if (sum < 0)
		return -1;
	sum = hr_csum_diff(0, 0, (void *)(quote->data + sizeof(*quote) / 2), sizeof(*quote) / 2,
			   (__u32)sum);
	if (sum < 0)
		return -1;
	icmp.checksum = csum_fold32((__u32)sum);
	return icmp_rewrite(skb, quote_len, macs, &ip, sizeof(ip), &icmp, sizeof(icmp));
}

#endif /* HR_PMTU_H */
