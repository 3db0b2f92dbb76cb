/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Layouts and codes shared by the TC programs (bpf_c/) and Python (datapath/).
 *
 * Python reads this very file with cffi's cdef (datapath/shared_types.py), so
 * it must stay plain C: fixed-width __u* types, enums with explicit values,
 * no macros with arguments, no attributes. Preprocessor lines other than the
 * include guard are not allowed here.
 */
#ifndef HOSTROUTING_SHARED_H
#define HOSTROUTING_SHARED_H

/*
 * Every verdict the programs reach, with its reason. Each one is counted in
 * the per-CPU `counters` array at this index and named in trace events.
 */
enum hr_reason {
	HR_REDIRECT_PEER = 0,		/* local pod: bpf_redirect_peer into its eth0 */
	HR_REDIRECT_NEIGH = 1,		/* FIB hit: bpf_redirect_neigh to the egress device */
	HR_PASS_NOT_IPV4 = 2,		/* ARP, IPv6, any other ethertype: to the stack */
	HR_PASS_FRAGMENT = 3,		/* IPv4 fragment: to the stack */
	HR_PASS_FIB_MISS = 4,		/* FIB lookup found no forwarding route: to the stack */
	HR_PASS_LOCAL = 5,		/* for the node itself: to the stack */
	HR_PASS_TTL = 6,		/* TTL would expire: the stack sends Time Exceeded */
	HR_PASS_NOT_ENDPOINT = 7,	/* underlay: not for a pod of this node: to the stack */
	HR_PASS_FRAG_NEEDED = 8,	/* too big, DF clear: the stack fragments it */
	HR_ICMP_FRAG_NEEDED = 9,	/* too big, DF set: ICMP frag needed sent back to the pod */
	HR_DROP_MALFORMED = 10,		/* truncated Ethernet/IPv4 header or bad IHL / total length */
	HR_DROP_ICMP_FAILED = 11,	/* building the frag-needed reply failed */
	HR_PASS_FWD_DISABLED = 12,	/* forwarding off in the node and no datapath route: to the stack */
	HR_PASS_EXTERNAL = 13,		/* leaves the cluster: to the stack, whose MASQUERADE applies */
	HR_REASON_MAX = 14
};

/* Where a trace event was taken. */
enum hr_hook {
	HR_HOOK_FROM_POD = 0,
	HR_HOOK_FROM_UNDERLAY = 1
};

/* Value of the `endpoints` hash map, keyed by the pod's IPv4 address (network order). */
struct hr_endpoint {
	__u32 ifindex;		/* host-side veth of the pod, in the node namespace */
	__u32 flags;		/* reserved, 0 */
	__u8 mac[6];		/* the pod's eth0 MAC */
	__u8 node_mac[6];	/* the host-side veth's MAC */
};

/* Key of the LPM-trie maps `cluster_cidrs` and `node_routes`. */
struct hr_lpm_key {
	__u32 prefixlen;
	__u32 addr;		/* network order */
};

/*
 * Value of `node_routes`: another node's pod CIDR is reached through its
 * underlay address. Used when the kernel's FIB lookup is refused because
 * forwarding is off in the node (BPF_FIB_LKUP_RET_FWD_DISABLED).
 */
struct hr_route {
	__u32 nexthop;		/* the other node's underlay address (network order) */
	__u32 ifindex;		/* the uplink, in this node's namespace */
};

/* The single entry of the `config` array map. */
struct hr_config {
	__u32 router_ip;	/* pods' gateway address on this node (network order) */
	__u32 trace;		/* 1 while a monitor listens: emit hr_trace_event records */
};

/* One per-CPU slot of the `counters` array, per enum hr_reason. */
struct hr_counter {
	__u64 packets;
	__u64 bytes;
};

/* A record of the `trace_events` ring buffer (only while config.trace is 1). */
struct hr_trace_event {
	__u64 ts_ns;		/* bpf_ktime_get_ns() */
	__u32 hook;		/* enum hr_hook */
	__u32 reason;		/* enum hr_reason */
	__u32 ifindex_in;	/* skb->ifindex where the program ran */
	__u32 ifindex_out;	/* redirect target; 0 when not redirected */
	__u32 saddr;		/* network order; 0 when not IPv4 */
	__u32 daddr;
	__u16 sport;		/* network order; 0 unless TCP/UDP */
	__u16 dport;
	__u8 protocol;
	__u8 pad[3];
	__u32 len;		/* skb->len */
};

#endif /* HOSTROUTING_SHARED_H */
