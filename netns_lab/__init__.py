"""Network-namespace labs that stand for a small Kubernetes cluster.

Every piece of a lab is a network namespace named ``<lab>-<thing>``; nothing
is created in the root network namespace. The default lab (``hr``, 2 nodes x
2 pods) looks like this::

      hr-node1-pod1   hr-node1-pod2          hr-node2-pod1   hr-node2-pod2
      eth0 198.18.1.10 eth0 198.18.1.11      eth0 198.18.2.10 eth0 198.18.2.11
           |  veth         |                      |                |
         hr-1-1          hr-1-2                  hr-2-1          hr-2-2
      +--- netns hr-node1 ------------+      +--- netns hr-node2 ------------+
      | gateway 198.18.1.1/32 on each |      | gateway 198.18.2.1/32 on each |
      | host-side veth; /32 route per |      | host-side veth; /32 route per |
      | pod; 198.18.2.0/24 via node2  |      | pod; 198.18.1.0/24 via node1  |
      +--------- hr-uplink -----------+      +--------- hr-uplink -----------+
                 198.19.0.1 |  veth                     | 198.19.0.2
                       hr-1 |                           | hr-2
                    +-------+---- netns hr-fabric ------+-------+
                    |  bridge br0 198.19.0.254/24 (the underlay) |
                    |  router: forwards underlay <-> external    |
                    +------------------ hr-ext ------------------+
                                  203.0.113.1 |  veth
                                 +---- netns hr-ext ----+
                                 | eth0 203.0.113.10/24 |  the "internet":
                                 | default via .1       |  no route to pods
                                 +----------------------+

A dual-stack lab (``lab up --ip-family dual``, or ``[lab] ip_family`` in a
topology file) has the same namespaces and links with IPv6 beside IPv4, from
the documentation prefix 2001:db8::/32 (node N's pods in 2001:db8:0:N::/64, N
in hex; node N is ::N on the underlay)::

      hr-node1-pod1         hr-node1-pod2         hr-node2-pod1         hr-node2-pod2
      2001:db8:0:1::a/128   2001:db8:0:1::b/128   2001:db8:0:2::a/128   2001:db8:0:2::b/128
      (a /128 route to the gateway on eth0, default via the gateway)
           |                     |                     |                     |
         hr-1-1                hr-1-2                hr-2-1                hr-2-2
      +--- netns hr-node1 ---------------+        +--- netns hr-node2 ---------------+
      | gateway 2001:db8:0:1::1/128 on   |        | gateway 2001:db8:0:2::1/128 on   |
      | each host-side veth (pods find   |        | each host-side veth; /128 route  |
      | it by neighbour discovery);      |        | per pod; 2001:db8:0:1::/64 via   |
      | /128 route per pod;              |        | node1; default via ::fe          |
      | 2001:db8:0:2::/64 via node2;     |        |                                  |
      | default via ::fe                 |        |                                  |
      +--------- hr-uplink --------------+        +--------- hr-uplink --------------+
                 2001:db8:1::1 |                                 | 2001:db8:1::2
                    +----------+--------- netns hr-fabric -------+----------+
                    |  bridge br0 2001:db8:1::fe/64 (the underlay)          |
                    +--------------------- hr-ext --------------------------+
                                  2001:db8:2::1 |
                                 +---- netns hr-ext ------+
                                 | eth0 2001:db8:2::a/64  |  no route to pods:
                                 | default via ::1        |  they reach it NATed
                                 +------------------------+

Every address is added without duplicate address detection (``nodad``, and
``accept_dad`` 0), router advertisements are ignored (``accept_ra`` 0), and
IPv6 forwarding is on in nodes and the fabric, in the lab's namespaces only.
An ``ipv6`` lab is the same but its pods have no IPv4 at all (nodes, fabric
and the external host keep both families). An IPv4-only lab (the default)
turns IPv6 off in every namespace.

Interface names are short, as Linux allows 15 characters: a pod's host-side
veth is ``<lab>-<node #>-<pod #>`` and a node's bridge port ``<lab>-<node #>``,
whatever the names (at most 14 characters for 64 nodes of 64 pods), each with
the namespace it leads to as its alias (``ip link`` shows ``alias
hr-node1-pod1``); every name starts with the lab's.

The underlay is a bridge in a fabric namespace, so any number of nodes share
one L2 segment as VMs on a cloud subnet do; the fabric namespace also routes
to the external host, which has no route to pod CIDRs, so pods reach it only
when their traffic is masqueraded to a node IP.

Modules: ``topology`` (the declarative description and its validation),
``state`` (what a lab should be, written before it is created: intent only),
``netns`` (running things inside a namespace), ``builder`` (lab up/down),
``legacy`` (kernel routing + iptables/ip6tables MASQUERADE + conntrack, the
baseline), ``procs`` (processes known by pid and start time), ``faults``
(fault injection at every kernel-changing call, for the tests).
"""
