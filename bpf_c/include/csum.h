/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Internet checksum helpers for the TC programs.
 *
 * All values are kept in network byte order, as they sit in the packet; the
 * one's complement sum does not care about byte order as long as everything
 * added together uses the same one.
 */
#ifndef HR_CSUM_H
#define HR_CSUM_H

#include <uapi/linux/ip.h>

#include "compat.h"

/* Fold a 32-bit partial sum (as returned by bpf_csum_diff) to the 16-bit checksum. */
static __always_inline __u16 csum_fold32(__u32 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)~sum;
}

/* Incremental checksum update (RFC 1624) of a 16-bit checksum for a 4-byte change. */
static __always_inline __u16 csum_replace4(__u16 check, __u32 from, __u32 to)
{
	__s64 sum = hr_csum_diff(&from, sizeof(from), &to, sizeof(to), (__u16)~check);

	return sum < 0 ? check : csum_fold32((__u32)sum);
}

/* The same for a 2-byte field (held in the low half, in packet byte order). */
static __always_inline __u16 csum_replace2(__u16 check, __u16 from, __u16 to)
{
	return csum_replace4(check, (__u32)from, (__u32)to);
}

/*
 * Decrement the TTL and patch the header checksum incrementally (RFC 1624):
 * the TTL is the high byte of a 16-bit word, so the word drops by 0x0100 and
 * the checksum, its one's complement, rises by the same amount.
 */
static __always_inline void ip_decrease_ttl(struct iphdr *ip)
{
	__u32 check = ip->check;

	check += bpf_htons(0x0100);
	ip->check = (__u16)(check + (check >= 0xffff));
	ip->ttl--;
}

#endif /* HR_CSUM_H */
