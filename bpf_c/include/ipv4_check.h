/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The IPv4 header checksum, verified as ip_rcv() does before the stack
 * routes a packet: the programs route and redirect without the stack, so a
 * corrupt header (the sender's bug, or a flipped bit on the way) would
 * otherwise be forwarded, NATed or delivered where the stack drops it.
 */
#ifndef HR_IPV4_CHECK_H
#define HR_IPV4_CHECK_H

#include <uapi/linux/bpf.h>
#include <uapi/linux/ip.h>

#include "parse.h"

/*
 * 1 if the header checksum of a packet parse_ipv4() accepted is right: the
 * one's complement sum of its ihl 32-bit words (options included) is all
 * ones. Reads the header in place: the first 20 bytes are known to be in the
 * linear data, each option word is checked against data_end on its own.
 */
static __always_inline int ipv4_csum_ok(struct __sk_buff *skb, struct hr_pkt *pkt)
{
	void *data_end = (void *)(long)skb->data_end;
	__u32 *w = (__u32 *)pkt->ip;
	__u32 ihl = pkt->ihl_len / 4;
	__u64 sum;

	sum = (__u64)w[0] + w[1] + w[2] + w[3] + w[4];
	/*
	 * Options: word by word, each with its own bounds check (a loop over
	 * them is turned into arithmetic on data_end, which the verifier refuses).
	 */
#define HR_IP_OPTION_WORD(n)						\
	if (ihl > (n)) {						\
		if ((void *)(w + (n) + 1) > data_end)			\
			return 0;					\
		sum += w[(n)];						\
	}
	HR_IP_OPTION_WORD(5) HR_IP_OPTION_WORD(6) HR_IP_OPTION_WORD(7) HR_IP_OPTION_WORD(8)
	HR_IP_OPTION_WORD(9) HR_IP_OPTION_WORD(10) HR_IP_OPTION_WORD(11) HR_IP_OPTION_WORD(12)
	HR_IP_OPTION_WORD(13) HR_IP_OPTION_WORD(14)
#undef HR_IP_OPTION_WORD
	sum = (sum & 0xffffffff) + (sum >> 32);
	sum = (sum & 0xffffffff) + (sum >> 32);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return sum == 0xffff;
}

#endif /* HR_IPV4_CHECK_H */
