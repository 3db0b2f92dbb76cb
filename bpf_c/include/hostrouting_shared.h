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
 * the per-CPU `counters` array at index
 * (family * HR_HOOK_MAX + hook) * HR_REASON_MAX + reason (enum hr_family and
 * enum hr_hook below; IPv4's indexes are those of the programs before IPv6)
 * and named in trace events. A reason that speaks of IPv4 (TTL, frag-needed)
 * means its IPv6 counterpart (hop limit, Packet Too Big) under HR_FAMILY_IPV6.
 */
enum hr_reason {
	HR_REDIRECT_PEER = 0,		/* local pod: bpf_redirect_peer into its eth0 */
	HR_REDIRECT_NEIGH = 1,		/* FIB hit: bpf_redirect_neigh to the egress device */
	HR_PASS_NOT_IPV4 = 2,		/* neither IPv4 nor IPv6 (ARP, VLAN, ...): to the stack */
	HR_PASS_FRAGMENT = 3,		/* IPv4 fragment: to the stack */
	HR_PASS_FIB_MISS = 4,		/* FIB lookup found no forwarding route: to the stack */
	HR_PASS_LOCAL = 5,		/* for the node itself: to the stack */
	HR_PASS_TTL = 6,		/* TTL would expire: the stack sends Time Exceeded */
	HR_PASS_NOT_ENDPOINT = 7,	/* underlay: not for a pod of this node: to the stack */
	HR_PASS_FRAG_NEEDED = 8,	/* too big, DF clear: the stack fragments it */
	HR_ICMP_FRAG_NEEDED = 9,	/* too big, DF set: ICMP frag needed sent back (to the pod, or out to a remote) */
	HR_DROP_MALFORMED = 10,		/* truncated Ethernet/IPv4 header or bad IHL / total length */
	HR_DROP_ICMP_FAILED = 11,	/* building the frag-needed reply failed */
	HR_PASS_FWD_DISABLED = 12,	/* forwarding off in the node and no datapath route: to the stack */
	HR_PASS_EXTERNAL = 13,		/* leaves the cluster, BPF SNAT off (no node_ip): to the stack */
	HR_SNAT_REDIRECT_NEIGH = 14,	/* leaves the cluster: source NATed to the node IP, redirected */
	HR_SNAT_PASS_FRAG_NEEDED = 15,	/* NATed, then to the stack: too big with DF clear (the stack
					 * fragments it) or next hop unresolved (old kernels) */
	HR_RNAT_REDIRECT_PEER = 16,	/* reply to a NATed flow: translated back, into the pod */
	HR_RNAT_ICMP_ERROR = 17,	/* ICMP error about a NATed flow: translated back, into the pod */
	HR_PASS_NAT_MISS = 18,		/* for the node IP, no NAT entry: to the stack (the node's own) */
	HR_DROP_NAT_EXHAUSTED = 19,	/* no free NAT port for this destination after bounded retries */
	HR_DROP_NAT_UNSUPPORTED = 20,	/* leaves the cluster but cannot be NATed: TCP fragment, protocol
					 * other than TCP/UDP/ICMP echo, truncated L4 header */
	HR_DROP_NAT_FAILED = 21,	/* a helper failed while rewriting, or a racing flow won */
	HR_DROP_NAT_NO_ENDPOINT = 22,	/* translated back to a pod this node does not have (any more) */
	HR_DROP_SPOOFED = 23,		/* from a pod, source IP or MAC not that pod's own */
	HR_DROP_NOT_FROM_CLUSTER = 24,	/* from outside the cluster to a pod, and not a NAT reply */
	HR_DROP_NAT_TTL = 25,		/* reply to a NATed flow with TTL <= 1: would expire on the way
					 * (the stack would answer for the node and break the flow) */
	HR_DROP_POD_TO_NODE = 26,	/* from a pod to another node's host namespace, which the
					 * topology does not allow ([lab] pods_reach_nodes) */
	HR_PASS_L2_MULTICAST = 27,	/* IPv4 in an Ethernet broadcast/multicast frame: to the stack
					 * (which does not route it; a redirect would drop it unseen) */
	HR_DROP_NAT_TABLE_FULL = 28,	/* a new flow, but the NAT table is full: refused, as
					 * nf_conntrack_max refuses one (the sweep frees expired flows) */
	HR_DROP_BAD_CHECKSUM = 29,	/* IPv4 header checksum wrong: dropped, as ip_rcv() would */
	HR_SNAT_FRAGMENT = 30,		/* a fragment of a UDP / ICMP echo datagram leaving the cluster:
					 * NATed (the first by its L4 header, which it records in
					 * `nat_frags`; later ones by that record), redirected */
	HR_RNAT_FRAGMENT = 31,		/* a fragment of a reply to a NATed flow: translated back (the
					 * first by its L4 header, later ones by `nat_frags`), into the pod */
	HR_DROP_FRAG_UNTRACKED = 32,	/* a later fragment leaving the cluster whose first fragment was
					 * not seen (out of order, or its record gone): cannot be NATed */
	HR_PASS_FRAG_UNTRACKED = 33,	/* a later fragment for the node IP without a record: to the
					 * stack (the node's own, or a reply whose first fragment is late) */
	HR_PASS_ICMP6_CONTROL = 34,	/* IPv6: neighbour discovery, router solicitation/advertisement,
					 * MLD, redirect, other ICMPv6 control: to the stack */
	HR_PASS_EXT_HEADERS = 35,	/* IPv6: extension headers not walked (too many, unknown,
					 * truncated, or in paged data): to the stack */
	HR_DROP_LINK_LOCAL = 36,	/* IPv6 from a pod with a link-local source (or to a link-local
					 * destination) that is not ICMPv6 control: never routed */
	HR_REASON_MAX = 37
};

/* The counters' outer dimension and the family of a trace event. */
enum hr_family {
	HR_FAMILY_IPV4 = 0,	/* also every frame that is neither IPv4 nor IPv6 (ARP, ...) */
	HR_FAMILY_IPV6 = 1,
	HR_FAMILY_MAX = 2
};

/* Which program reached a verdict: in trace events, and the counters' second dimension. */
enum hr_hook {
	HR_HOOK_FROM_POD = 0,
	HR_HOOK_FROM_UNDERLAY = 1,
	HR_HOOK_MAX = 2
};

/*
 * Slots of the `progs6` program array: from_pod and from_underlay hand an
 * IPv6 frame to these programs (a tail call); an empty slot leaves it to the
 * stack (pass_not_ipv4, counted under HR_FAMILY_IPV6).
 */
enum hr_prog6 {
	HR_PROG_FROM_POD6 = 0,
	HR_PROG_FROM_UNDERLAY6 = 1,
	HR_PROG6_MAX = 2
};

/*
 * Value of the `endpoints` hash map, keyed by the pod's IPv4 address (network
 * order), and of `endpoints6`, keyed by its IPv6 address (struct hr_in6).
 */
struct hr_endpoint {
	__u32 ifindex;		/* host-side veth of the pod, in the node namespace */
	__u32 flags;		/* reserved, 0 */
	__u8 mac[6];		/* the pod's eth0 MAC */
	__u8 node_mac[6];	/* the host-side veth's MAC */
};

/*
 * Value of the `pod_veths` array, indexed by the ifindex of a pod's host-side
 * veth: the pod's address and MAC, so that from_pod checks a packet's source
 * without a hash lookup. It repeats what `endpoints` holds (DatapathMaps
 * writes both); addr 0: no pod known there (or a veth with an ifindex beyond
 * the array), and `endpoints` decides.
 */
struct hr_pod_veth {
	__u32 addr;		/* the pod's IPv4 address (network order) */
	__u8 mac[6];		/* the pod's eth0 MAC */
	__u8 pad[2];
	__u32 addr6[4];		/* the pod's IPv6 address (network order); all 0: none known */
};

/* An IPv6 address as the programs keep it: 16 bytes in network order, as four words. */
struct hr_in6 {
	__u32 a[4];
};

/* Sizes of the maps Python must know. */
enum hr_map_sizes {
	HR_POD_VETH_SLOTS = 4096	/* `pod_veths`: ifindexes 0..4095 */
};

/* Bits of the `cluster_cidrs` value (a __u32). */
enum hr_cidr_flags {
	HR_CIDR_DENY_FROM_POD = 1	/* pods may not send here (another node's host namespace) */
};

/* Key of the LPM-trie maps `cluster_cidrs` and `node_routes`. */
struct hr_lpm_key {
	__u32 prefixlen;
	__u32 addr;		/* network order */
};

/* Key of the LPM-trie maps `cluster_cidrs6` and `node_routes6`. */
struct hr_lpm6_key {
	__u32 prefixlen;
	__u32 addr[4];		/* network order */
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

/* Value of `node_routes6`: as struct hr_route, for IPv6 (next hop: a global address). */
struct hr_route6 {
	__u32 nexthop[4];	/* the other node's underlay IPv6 address (network order) */
	__u32 ifindex;
};

/* The single entry of the `config` array map. */
struct hr_config {
	__u32 router_ip;	/* pods' gateway address on this node (network order) */
	__u32 trace;		/* 1 while a monitor listens: emit hr_trace_event records */
	__u32 node_ip;		/* SNAT source for traffic leaving the cluster (network order);
				 * 0: no BPF SNAT, such traffic goes to the stack */
	__u16 nat_port_min;	/* NAT ports are allocated from [min, max] (host order) */
	__u16 nat_port_max;
	__u32 nat_timeout_tcp_syn;		/* seconds idle before a NAT entry expires: */
	__u32 nat_timeout_tcp_established;	/* TCP once a reply was seen */
	__u32 nat_timeout_tcp_closing;		/* TCP after RST, or FIN both ways */
	__u32 nat_timeout_udp;
	__u32 nat_timeout_icmp;		/* ICMP and ICMPv6 echo */
	__u32 router_ip6[4];	/* pods' IPv6 gateway on this node: the source of a Packet Too
				 * Big sent to a pod; all 0 in an IPv4-only lab */
	__u32 node_ip6[4];	/* IPv6 SNAT source (the node's underlay IPv6 address); all 0: no
				 * BPF SNAT for IPv6, such traffic goes to the stack */
};

/* Which way a NAT entry translates. */
enum hr_nat_dir {
	HR_NAT_OUT = 0,		/* key: the pod's packet as sent; value: new source (node IP, port) */
	HR_NAT_IN = 1		/* key: the reply as it arrives; value: new destination (pod, port) */
};

/* Bits of hr_nat_entry.state, the same in both entries of a flow. */
enum hr_nat_state {
	HR_NAT_SEEN_REPLY = 1,	/* a packet came back (TCP: established) */
	HR_NAT_FIN_OUT = 2,	/* TCP FIN from the pod */
	HR_NAT_FIN_IN = 4,	/* TCP FIN from outside */
	HR_NAT_RST = 8		/* TCP RST either way */
};

/*
 * Key of the `nat` hash: a flow's 5-tuple as it is on the wire in one
 * direction. ICMP echo keeps its identifier in sport (request, HR_NAT_OUT)
 * or dport (reply, HR_NAT_IN); the other port is 0.
 */
struct hr_nat_key {
	__u32 saddr;		/* network order */
	__u32 daddr;
	__u16 sport;		/* network order */
	__u16 dport;
	__u8 protocol;
	__u8 dir;		/* enum hr_nat_dir */
	__u8 pad[2];
};

/*
 * Value of the `nat` map. Each flow has two entries (OUT and IN), each able
 * to rebuild the other's key: OUT {pod, dst, pod port, dst port} -> (node IP,
 * NAT port); IN {dst, node IP, dst port, NAT port} -> (pod, pod port).
 */
struct hr_nat_entry {
	__u64 created_ns;	/* bpf_ktime_get_ns() (CLOCK_MONOTONIC) */
	__u64 last_seen_ns;	/* last packet this way */
	__u64 packets;		/* this way */
	__u64 bytes;
	__u32 addr;		/* address written into the packet (network order) */
	__u16 port;		/* port / ICMP identifier written into the packet (network order) */
	__u16 pad;
	__u64 state;		/* enum hr_nat_state bits (64 bits: updated with atomic OR,
				 * which bcc's BPF target has for 64-bit words only) */
	__u32 seq_hint;		/* OUT, TCP: the pod's last ACK number (network order), i.e. the
				 * sequence number a genuine RST from the remote is near; 0: none */
	__u32 seq_end;		/* OUT, TCP: the sequence number after the pod's last segment
				 * (network order): a SYN that takes the port of this flow once it
				 * ended must start beyond it (the remote's TIME_WAIT); 0: none */
};

/*
 * Key of the `nat6` hash: as struct hr_nat_key, for IPv6 (ICMPv6 echo: the
 * identifier as ICMP echo's).
 */
struct hr_nat6_key {
	struct hr_in6 saddr;	/* network order */
	struct hr_in6 daddr;
	__u16 sport;		/* network order */
	__u16 dport;
	__u8 protocol;		/* IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMPV6 */
	__u8 dir;		/* enum hr_nat_dir */
	__u8 pad[2];
};

/* Value of the `nat6` map: as struct hr_nat_entry, with an IPv6 address. */
struct hr_nat6_entry {
	__u64 created_ns;
	__u64 last_seen_ns;
	__u64 packets;
	__u64 bytes;
	struct hr_in6 addr;	/* address written into the packet (network order) */
	__u16 port;		/* port / ICMPv6 identifier written into the packet (network order) */
	__u16 pad;
	__u32 pad2;
	__u64 state;		/* enum hr_nat_state bits */
	__u32 seq_hint;		/* as in struct hr_nat_entry */
	__u32 seq_end;
};

/*
 * Key of the `nat_frags` LRU hash: one fragmented datagram as it is on the
 * wire (before translation), as IPv4 reassembly tells datagrams apart.
 */
struct hr_frag_key {
	__u32 saddr;		/* network order */
	__u32 daddr;
	__u16 id;		/* IPv4 identification (network order) */
	__u8 protocol;
	__u8 pad;
};

/*
 * Value of `nat_frags` and `nat6_frags`: the ports (ICMP echo: the
 * identifier, as in the NAT key) the first fragment carried, for the later
 * ones, which carry none; in `nat6_frags` also its upper-layer protocol (a
 * later IPv6 fragment does not tell it: extension headers may follow its
 * Fragment header, in the first fragment only).
 */
struct hr_frag_entry {
	__u64 seen_ns;		/* bpf_ktime_get_ns() of the first fragment */
	__u16 sport;		/* network order, as in struct hr_nat_key (before translation) */
	__u16 dport;
	__u8 protocol;		/* nat6_frags: the L4 protocol of the flow; nat_frags: 0 */
	__u8 pad[3];
};

/*
 * Key of the `nat6_frags` LRU hash (value: struct hr_frag_entry): one
 * fragmented IPv6 datagram as it is on the wire (before translation), as
 * IPv6 reassembly tells datagrams apart (the Fragment header's 32-bit
 * identification).
 */
struct hr_frag6_key {
	struct hr_in6 saddr;	/* network order */
	struct hr_in6 daddr;
	__u32 id;		/* Fragment header identification (network order) */
	__u8 protocol;		/* the Fragment header's next header */
	__u8 pad[3];
};

/* One per-CPU slot of the `counters` array, per enum hr_hook x enum hr_reason. */
struct hr_counter {
	__u64 packets;
	__u64 bytes;
};

/*
 * A record of the `trace_events` ring buffer (only while config.trace is 1).
 * The frame is told by its ethertype: IPv4 fills the addresses, ports and
 * protocol from its headers; ARP (Ethernet/IPv4) its operation, sender and
 * target; any other leaves them 0.
 */
struct hr_trace_event {
	__u64 ts_ns;		/* bpf_ktime_get_ns() */
	__u32 hook;		/* enum hr_hook */
	__u32 reason;		/* enum hr_reason */
	__u32 ifindex_in;	/* skb->ifindex where the program ran */
	__u32 ifindex_out;	/* redirect target; 0 when not redirected */
	__u32 saddr;		/* network order. IPv4: source; ARP: sender protocol address */
	__u32 daddr;		/* IPv4: destination; ARP: target protocol address */
	__u16 sport;		/* network order; 0 unless TCP/UDP */
	__u16 dport;
	__u8 protocol;		/* IPv6: the upper-layer protocol, after the extension headers */
	__u8 family;		/* enum hr_family */
	__u16 eth_proto;	/* the frame's ethertype (host order); ETH_P_IP also for a frame
				 * too short to have one (those are drop_malformed) */
	__u32 len;		/* skb->len */
	__u16 arp_op;		/* ARP: 1 request, 2 reply (host order); 0 when not ARP */
	__u8 arp_sha[6];	/* ARP: the sender's hardware address */
	__u32 saddr6[4];	/* IPv6: source, destination (network order); 0 otherwise */
	__u32 daddr6[4];
};

/* A record of the `refusals` ring buffer of bpf_c/xtables_refusal.c: one refused
 * x_tables write (iptables-legacy and friends) in a lab's node namespace. */
struct hr_xt_refusal {
	__u64 netns_cookie;	/* bpf_get_netns_cookie() of the socket */
	__u32 pid;		/* thread group id of the writer */
	__s32 level;		/* SOL_IP or SOL_IPV6 */
	__s32 optname;		/* IPT_SO_SET_REPLACE, ARPT_SO_SET_REPLACE, ... */
	char comm[16];		/* the writer's task name */
	char table[32];		/* the table it tried to replace (the blob's first field) */
	__u32 pad;
};

#endif /* HOSTROUTING_SHARED_H */
