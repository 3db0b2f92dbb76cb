"""Topology validation: every bad description is refused with the field (and line) named."""

import re

import pytest

from netns_lab.topology import TopologyError, load_topology


def write(tmp_path, text: str):
    path = tmp_path / "lab.toml"
    path.write_text(text)
    return path


def test_default_topology_is_two_by_two_in_reserved_ranges():
    topo = load_topology("hr")
    assert [n.name for n in topo.nodes] == ["node1", "node2"]
    assert [len(n.pods) for n in topo.nodes] == [2, 2]
    addresses = [n.ip for n in topo.nodes] + [p.ip for n in topo.nodes for p in n.pods]
    assert all(a.startswith(("198.18.", "198.19.")) for a in addresses)
    assert topo.external.ip.startswith("203.0.113.")
    assert all(ns.startswith("hr-") for ns in topo.namespaces)
    assert len(set(topo.namespaces)) == len(topo.namespaces) == 8


def test_file_and_round_trip(tmp_path):
    path = write(tmp_path, """
[lab]
underlay_mtu = 1400
[[nodes]]
name = "a"
pod_cidr = "198.18.10.0/24"
pods = ["web", "db"]
""")
    topo = load_topology("lab1", path)
    assert topo.underlay_mtu == 1400
    assert [p.name for p in topo.nodes[0].pods] == ["web", "db"]
    assert topo.nodes[0].pods[0].ip == "198.18.10.10"
    from netns_lab.topology import Topology
    assert Topology.from_dict(topo.to_dict()) == topo


@pytest.mark.parametrize("text, expected", [
    ('[[nodes]]\nname = "a"\npod_cidr = "198.18.1.0/24"\n[[nodes]]\nname = "b"\n'
     'pod_cidr = "198.18.1.128/25"\n', "lab.toml:6: nodes[1].pod_cidr: 198.18.1.128/25 overlaps"),
    ('[[nodes]]\nname = "a"\npod_cidr = "198.18.1.0/24"\n[[nodes]]\nname = "a"\n'
     'pod_cidr = "198.18.2.0/24"\n', "lab.toml:5: nodes[1].name: duplicate name 'a'"),
    ('[[nodes]]\nname = "a"\npod_cidr = "198.18.1.0/24"\npods = ["p", "p"]\n',
     "lab.toml:4: nodes[0].pods: duplicate name 'p'"),
    ('[[nodes]]\nname = "a"\npod_cidr = "198.18.1.0/24"\npods = ["' + "p" * 64 + '"]\n',
     "lab.toml:4: nodes[0].pods: '" + "p" * 64 + "' must be 1 to 63 lowercase letters"),
    ('[[nodes]]\nname = "a"\npod_cidr = "198.18.0.0/16"\npods = ['
     + ", ".join(f'"p{i}"' for i in range(65)) + ']\n',
     "lab.toml:4: nodes[0].pods: 65 pods, at most 64"),
    ('[[nodes]]\nname = "a"\npod_cidr = "198.18.1.300/24"\n',
     "lab.toml:3: nodes[0].pod_cidr: '198.18.1.300/24' is not an IPv4 network"),
    ('[[nodes]]\nname = "a"\npod_cidr = "198.18.1.1/24"\n',
     "lab.toml:3: nodes[0].pod_cidr: '198.18.1.1/24' is not an IPv4 network"),
    ('[external]\nip = "203.0.113.999"\n[[nodes]]\nname = "a"\npod_cidr = "198.18.1.0/24"\n',
     "lab.toml:2: external.ip: '203.0.113.999' is not an IPv4 address"),
    ('[[nodes]]\nname = "a"\npod_cidr = "198.19.0.0/25"\n',
     "lab.toml:3: nodes[0].pod_cidr: 198.19.0.0/25 overlaps underlay_cidr"),
    # no [[nodes]]: the default nodes' pod CIDRs, so the file's line is the underlay's
    ('# a comment\nunderlay_cidr = "198.18.1.0/24"\n',
     "lab.toml:2: (top level).underlay_cidr: 198.18.1.0/24 overlaps nodes[0].pod_cidr "
     "(198.18.1.0/24, the default)"),
    ('[lab]\nunderlay_cidr = "198.18.0.0/16"\n',
     "lab.toml:2: lab.underlay_cidr: 198.18.0.0/16 overlaps nodes[0].pod_cidr"),
    # nodes written inline are the file's: their own line is named
    ('underlay_cidr = "198.18.0.0/16"\nnodes = [{name = "a", pod_cidr = "198.18.1.0/24"}]\n',
     "lab.toml:2: nodes[0].pod_cidr: 198.18.1.0/24 overlaps underlay_cidr (198.18.0.0/16)"),
    ('[[nodes]]\nname = "Bad_Name"\npod_cidr = "198.18.1.0/24"\n', "lab.toml:2: nodes[0].name"),
    ('[[nodes]]\nname = "a"\npod_cidr = "198.18.1.0/24"\ncolour = "red"\n',
     "lab.toml:4: nodes[0].colour: unknown key"),
    ('[[nodes]]\nname = "a"\npod_cidr = "198.18.1.0/24"\npods = 1000\n',
     "lab.toml:4: nodes[0].pods: 1000 must be an integer from 0 to 64"),
    ('[lab]\nunderlay_mtu = 100\n[[nodes]]\nname = "a"\npod_cidr = "198.18.1.0/24"\n',
     "lab.toml:2: lab.underlay_mtu: 100 must be an integer"),
    ('[[nodes]\nname = "a"\n', "lab.toml: not valid TOML"),
    ('nodes = []\n', "lab.toml:1: nodes[0]: at least one [[nodes]] table is needed"),
])
def test_bad_topology_names_field_and_line(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(TopologyError) as err:
        load_topology("lab1", path)
    assert expected in str(err.value)


def test_an_underlay_without_room_names_its_line(tmp_path):
    path = write(tmp_path, '[lab]\nunderlay_cidr = "198.19.0.0/29"\n')
    with pytest.raises(TopologyError, match=r"lab\.toml:2: lab\.underlay_cidr: 198\.19\.0\.0/29 "
                       "has no room for 6 nodes and the router"):
        load_topology("lab1", path, nodes=6)


NODE = '[[nodes]]\nname = "a"\npod_cidr = "198.18.1.0/24"\n'


@pytest.mark.parametrize("text, expected", [
    ('[[nodes]]\nname = "a"\npod_cidr = "224.1.1.0/24"\n',
     "lab.toml:3: nodes[0].pod_cidr: 224.1.1.0/24 is in the multicast range 224.0.0.0/4"),
    ('[[nodes]]\nname = "a"\npod_cidr = "127.0.0.0/24"\n',
     "lab.toml:3: nodes[0].pod_cidr: 127.0.0.0/24 is in the loopback range 127.0.0.0/8"),
    ('[[nodes]]\nname = "a"\npod_cidr = "169.254.7.0/24"\n',
     "lab.toml:3: nodes[0].pod_cidr: 169.254.7.0/24 is in the link-local range"),
    ('[[nodes]]\nname = "a"\npod_cidr = "0.0.0.0/24"\n',
     "lab.toml:3: nodes[0].pod_cidr: 0.0.0.0/24 is in the 'this network' range 0.0.0.0/8"),
    ('[[nodes]]\nname = "a"\npod_cidr = "255.255.255.0/29"\n',
     "lab.toml:3: nodes[0].pod_cidr: 255.255.255.0/29 is in the reserved (240/4 and broadcast)"),
    ('[[nodes]]\nname = "a"\npod_cidr = "0.0.0.0/1"\n',
     "lab.toml:3: nodes[0].pod_cidr: 0.0.0.0/1 overlaps the 'this network' range"),
    ('[lab]\nunderlay_cidr = "127.1.0.0/24"\n' + NODE,
     "lab.toml:2: lab.underlay_cidr: 127.1.0.0/24 is in the loopback range"),
    ('underlay_cidr = "240.0.0.0/24"\n' + NODE,
     "lab.toml:1: (top level).underlay_cidr: 240.0.0.0/24 is in the reserved (240/4 and broadcast)"),
    ('[external]\ncidr = "169.254.0.0/24"\nip = "169.254.0.10"\n' + NODE,
     "lab.toml:2: external.cidr: 169.254.0.0/24 is in the link-local range"),
    ('[external]\ncidr = "203.0.113.0/24"\nip = "224.0.0.10"\n' + NODE,
     "lab.toml:3: external.ip: 224.0.0.10 is in the multicast range"),
    ('[nat]\nexclude = ["10.0.0.0/8", "232.0.0.0/8"]\n' + NODE,
     "lab.toml:2: nat.exclude: 232.0.0.0/8 is in the multicast range"),
    ('[nat]\nexclude = ["127.0.0.1/32"]\n' + NODE,
     "lab.toml:2: nat.exclude: 127.0.0.1/32 is in the loopback range"),
])
def test_reserved_ranges_are_refused_with_the_line(tmp_path, text, expected):
    """Loopback, multicast, link-local, 0/8 and 240/4 cannot carry a lab's traffic: a multicast
    pod CIDR ended in a pyroute2 traceback, a loopback one in a lab that could not route."""
    path = write(tmp_path, text)
    with pytest.raises(TopologyError) as err:
        load_topology("lab1", path)
    assert str(err.value).startswith(f"{path}:")
    assert expected in str(err.value)


# -- IPv6 and dual stack (issue 12) --------------------------------------------------------------

IPV4_RECORD_KEYS = {"lab", "underlay_cidr", "router_ip", "underlay_mtu", "external_mtu",
                    "pods_reach_nodes", "node_local_port_range", "external", "nodes", "nat"}


def test_an_ipv4_lab_has_no_ipv6_and_its_record_is_as_before():
    topo = load_topology("hr")
    assert (topo.ip_family, topo.has_ipv4, topo.has_ipv6) == ("ipv4", True, False)
    assert (topo.underlay_cidr6, topo.router_ip6) == (None, None)
    assert (topo.cluster_cidrs6, topo.non_masquerade_cidrs6) == ([], [])
    ext = topo.external
    assert (ext.ip6, ext.cidr6, ext.router_ip6) == (None, None, None)
    assert {(n.ip6, n.pod_cidr6, n.gateway6) for n in topo.nodes} == {(None, None, None)}
    assert {p.ip6 for n in topo.nodes for p in n.pods} == {None}
    data = topo.to_dict()
    assert set(data) == IPV4_RECORD_KEYS
    assert data["external"] == {"cidr": "203.0.113.0/24", "ip": "203.0.113.10"}
    assert set(data["nodes"][0]) == {"name", "pod_cidr", "pods"}


def test_dual_stack_defaults_follow_the_plan():
    topo = load_topology("hr", None, 3, 2, ip_family="dual")
    assert (topo.has_ipv4, topo.has_ipv6) == (True, True)
    assert (topo.underlay_cidr6, topo.router_ip6) == ("2001:db8:1::/64", "2001:db8:1::fe")
    node3 = topo.nodes[2]
    assert (node3.ip6, node3.pod_cidr6, node3.gateway6) == \
        ("2001:db8:1::3", "2001:db8:0:3::/64", "2001:db8:0:3::1")
    assert [p.ip6 for p in node3.pods] == ["2001:db8:0:3::a", "2001:db8:0:3::b"]
    assert [p.ip for p in node3.pods] == ["198.18.3.10", "198.18.3.11"]     # both families
    ext = topo.external
    assert (ext.cidr6, ext.router_ip6, ext.ip6) == \
        ("2001:db8:2::/64", "2001:db8:2::1", "2001:db8:2::a")
    assert topo.cluster_cidrs6 == ["2001:db8:0:1::/64", "2001:db8:0:2::/64",
                                   "2001:db8:0:3::/64", "2001:db8:1::/64"]
    assert topo.non_masquerade_cidrs6 == topo.cluster_cidrs6
    from netns_lab.topology import Topology
    assert Topology.from_dict(topo.to_dict()) == topo


def test_pod_cidr6_numbers_nodes_in_hex():
    topo = load_topology("hr", None, 12, 0, ip_family="dual")
    assert topo.nodes[11].pod_cidr6 == "2001:db8:0:c::/64"
    assert topo.nodes[11].ip6 == "2001:db8:1::c"


def test_a_dual_file_with_its_own_plan_and_ipv6_excludes(tmp_path):
    path = write(tmp_path, """
[lab]
ip_family = "dual"
underlay_cidr6 = "fd00:1::/120"
[external]
cidr6 = "fd00:2::/64"
ip6 = "fd00:2::99"
[[nodes]]
name = "a"
pod_cidr = "198.18.10.0/24"
pod_cidr6 = "fd00:10::/64"
pods = ["web"]
[[nodes]]
name = "b"
pod_cidr = "198.18.11.0/24"
pods = 1
[nat]
exclude = ["10.0.0.0/8", "2001:db8:99::/48"]
""")
    topo = load_topology("lab1", path)
    a, b = topo.nodes
    assert (a.ip6, a.gateway6, a.pods[0].ip6) == ("fd00:1::1", "fd00:10::1", "fd00:10::a")
    assert b.pod_cidr6 == "2001:db8:0:2::/64"       # the default of node 2
    assert topo.router_ip6 == "fd00:1::fe"
    assert (topo.external.ip6, topo.external.router_ip6) == ("fd00:2::99", "fd00:2::1")
    assert topo.nat.exclude == ("10.0.0.0/8", "2001:db8:99::/48")
    assert topo.non_masquerade_cidrs == [a.pod_cidr, b.pod_cidr, topo.underlay_cidr,
                                         "10.0.0.0/8"]
    assert topo.non_masquerade_cidrs6 == ["fd00:10::/64", "2001:db8:0:2::/64", "fd00:1::/120",
                                          "2001:db8:99::/48"]
    from netns_lab.topology import Topology
    assert Topology.from_dict(topo.to_dict()) == topo


def test_an_ipv6_lab_plans_ipv4_for_pods_but_says_they_have_none(tmp_path):
    topo = load_topology("hr", write(tmp_path, '[lab]\nip_family = "ipv6"\n'))
    assert (topo.has_ipv4, topo.has_ipv6) == (False, True)
    assert topo.nodes[0].pods[0].ip6 == "2001:db8:0:1::a"
    from netns_lab.topology import Topology
    assert Topology.from_dict(topo.to_dict()).ip_family == "ipv6"


def test_the_command_line_family_fills_the_file_or_must_agree(tmp_path):
    path = write(tmp_path, '[lab]\nunderlay_mtu = 1400\n')
    assert load_topology("hr", path, ip_family="ipv6").ip_family == "ipv6"
    path = write(tmp_path, '[lab]\nip_family = "dual"\n')
    assert load_topology("hr", path, ip_family="dual").ip_family == "dual"
    with pytest.raises(TopologyError, match="sets ip_family 'dual'; --ip-family ipv4"):
        load_topology("hr", path, ip_family="ipv4")


DUAL = '[lab]\nip_family = "dual"\n'


@pytest.mark.parametrize("text, expected", [
    ('[lab]\nip_family = "ipv5"\n' + NODE,
     'lab.toml:2: lab.ip_family: \'ipv5\' must be "ipv4", "dual" or "ipv6"'),
    ('ip_family = 6\n' + NODE, 'lab.toml:1: (top level).ip_family: 6 must be "ipv4"'),
    ('[lab]\nunderlay_cidr6 = "2001:db8:1::/64"\n' + NODE,
     'lab.toml:2: lab.underlay_cidr6: IPv6 needs [lab] ip_family = "dual" or "ipv6"'),
    ('[external]\nip6 = "2001:db8:2::a"\n' + NODE, "lab.toml:2: external.ip6: IPv6 needs"),
    ('[external]\ncidr6 = "2001:db8:2::/64"\n' + NODE, "lab.toml:2: external.cidr6: IPv6 needs"),
    (NODE + 'pod_cidr6 = "2001:db8:0:1::/64"\n', "lab.toml:4: nodes[0].pod_cidr6: IPv6 needs"),
    (DUAL + 'underlay_cidr6 = "2001:db8:1::1/64"\n' + NODE,
     "lab.toml:3: lab.underlay_cidr6: '2001:db8:1::1/64' is not an IPv6 network"),
    (DUAL + 'underlay_cidr6 = "198.19.0.0/24"\n' + NODE,
     "lab.toml:3: lab.underlay_cidr6: '198.19.0.0/24' is not an IPv6 network"),
    (DUAL + 'underlay_cidr6 = "2001:db8:1::/121"\n' + NODE,
     "lab.toml:3: lab.underlay_cidr6: 2001:db8:1::/121 is too small (at most /120)"),
    (DUAL + 'underlay_cidr6 = "fe80::/64"\n' + NODE,
     "lab.toml:3: lab.underlay_cidr6: fe80::/64 is in the link-local range fe80::/10"),
    (DUAL + 'underlay_cidr6 = "ff02::/64"\n' + NODE,
     "lab.toml:3: lab.underlay_cidr6: ff02::/64 is in the multicast range ff00::/8"),
    (DUAL + 'underlay_cidr6 = "::ffff:0:0/104"\n' + NODE,
     "lab.toml:3: lab.underlay_cidr6: ::ffff:0:0/104 is in the IPv4-mapped range"),
    (DUAL + 'underlay_cidr6 = "::/120"\n' + NODE,
     "lab.toml:3: lab.underlay_cidr6: ::/120 overlaps the unspecified range ::/128"),
    (DUAL + 'underlay_cidr6 = "::/0"\n' + NODE,
     "lab.toml:3: lab.underlay_cidr6: ::/0 overlaps the unspecified range"),
    (DUAL + '[external]\ncidr6 = "2001:db8:1::/64"\n' + NODE,
     "lab.toml:4: external.cidr6: 2001:db8:1::/64 overlaps underlay_cidr6 (2001:db8:1::/64)"),
    # external.cidr6 is a default: the line named is the file's underlay_cidr6
    ('ip_family = "dual"\nunderlay_cidr6 = "2001:db8::/32"\n',
     "lab.toml:2: (top level).underlay_cidr6: 2001:db8::/32 overlaps external.cidr6 "
     "(2001:db8:2::/64, the default)"),
    (DUAL + '[external]\nip6 = "2001:db8:3::a"\n' + NODE,
     "lab.toml:4: external.ip6: 2001:db8:3::a must be a host address of 2001:db8:2::/64"),
    (DUAL + '[external]\nip6 = "2001:db8:2::1"\n' + NODE,
     "lab.toml:4: external.ip6: 2001:db8:2::1 must be a host address"),
    (DUAL + '[external]\nip6 = "2001:db8:2::zz"\n' + NODE,
     "lab.toml:4: external.ip6: '2001:db8:2::zz' is not an IPv6 address"),
    (DUAL + '[external]\ncidr6 = "::1/128"\nip6 = "::1"\n' + NODE,
     "lab.toml:4: external.cidr6: ::1/128 is in the loopback range"),
    (DUAL + NODE + 'pod_cidr6 = "2001:db8:2::/64"\n',
     "lab.toml:6: nodes[0].pod_cidr6: 2001:db8:2::/64 overlaps external.cidr6"),
    (DUAL + NODE + 'pod_cidr6 = "2001:db8::/32"\n',
     "lab.toml:6: nodes[0].pod_cidr6: 2001:db8::/32 overlaps underlay_cidr6"),
    (DUAL + NODE + '[[nodes]]\nname = "b"\npod_cidr = "198.18.2.0/24"\n'
     'pod_cidr6 = "2001:db8:0:1::/64"\n',
     "lab.toml:9: nodes[1].pod_cidr6: 2001:db8:0:1::/64 overlaps nodes[0].pod_cidr6"),
    (DUAL + '[nat]\nexclude = ["ff00::/8"]\n' + NODE,
     "lab.toml:4: nat.exclude: ff00::/8 is in the multicast range"),
    ('[nat]\nexclude = ["2001:db8::1/32"]\n' + NODE,
     "lab.toml:2: nat.exclude: '2001:db8::1/32' is not an IPv4 or IPv6 network"),
])
def test_bad_ipv6_names_field_and_line(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(TopologyError) as err:
        load_topology("lab1", path)
    assert str(err.value).startswith(f"{path}:")
    assert expected in str(err.value)


def test_interface_names_fit_for_the_longest_lab_name_and_the_most_nodes_and_pods(tmp_path):
    """Every interface a lab creates fits in IFNAMSIZ (15), is unique in its namespace, and
    starts with the lab's name (how leftovers are found); pod and node names may be long."""
    topo = load_topology("abcdefgh", None, 64, 64)
    for node in topo.nodes:
        in_node = [p.host_ifname for p in node.pods] + [topo.uplink_ifname]
        assert len(set(in_node)) == len(in_node)
        assert all(len(name) <= 15 and name.startswith("abcdefgh-") for name in in_node)
    in_fabric = [n.fabric_ifname for n in topo.nodes] + ["abcdefgh-ext", "br0"]
    assert len(set(in_fabric)) == len(in_fabric) and max(map(len, in_fabric)) <= 15
    assert topo.nodes[9].pods[0].host_ifname == "abcdefgh-10-1"
    assert topo.nodes[63].pods[63].host_ifname == "abcdefgh-64-64"
    long = "n" * 63
    path = write(tmp_path, f'[[nodes]]\nname = "{long}"\npod_cidr = "198.18.1.0/24"\n'
                           f'pods = ["{long[:-1]}p"]\n')
    node = load_topology("abcdefgh", path).nodes[0]
    assert (node.fabric_ifname, node.pods[0].host_ifname) == ("abcdefgh-1", "abcdefgh-1-1")
    assert node.pods[0].netns == f"abcdefgh-{long[:-1]}p"


@pytest.mark.parametrize("lab, nodes, pods, expected", [
    ("Bad", None, None, "lab name 'Bad'"),
    ("waytoolongname", None, None, "lab name"),
    ("hr", 0, None, "--nodes: 0 must be from 1 to 64"),
    ("hr", 2, -1, "--pods-per-node: -1"),
])
def test_bad_command_line_values(lab, nodes, pods, expected):
    with pytest.raises(TopologyError, match=expected.replace("(", r"\(")):
        load_topology(lab, None, nodes, pods)


# -- a fuzz corpus: generated files either build or name the error -------------------------------

from hypothesis import HealthCheck, given, settings, strategies as hst  # noqa: E402

TOPO_FUZZ_CASES = 400
_KEYS = ["lab", "external", "nodes", "nat", "underlay_cidr", "underlay_mtu", "external_mtu",
         "pods_reach_nodes", "name", "pod_cidr", "pods", "cidr", "ip", "max_flows", "port_min",
         "port_max", "exclude", "timeout_udp", "bogus", "ip_family", "underlay_cidr6",
         "pod_cidr6", "cidr6", "ip6"]
_SCALARS = hst.one_of(
    hst.integers(-70000, 5_000_000), hst.booleans(), hst.floats(allow_nan=False, width=32),
    hst.sampled_from(["198.18.1.0/24", "198.18.1.0/33", "203.0.113.0/24", "198.19.0.0/24",
                      "10.0.0.1", "node1", "", "UPPER", "a" * 20, "198.18.0.0/16", "x-1",
                      "dual", "ipv6", "ipv4", "2001:db8:0:1::/64", "2001:db8:1::/64",
                      "2001:db8:2::a", "fe80::/64", "2001:db8::/32", "fd00::/120"]),
    hst.text(max_size=8))


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


@hst.composite
def topology_texts(draw):
    lines = []
    for _ in range(draw(hst.integers(0, 3))):            # top-level keys
        lines.append(f"{draw(hst.sampled_from(_KEYS))} = {_toml_value(draw(_SCALARS))}")
    for _ in range(draw(hst.integers(0, 4))):            # tables and arrays of tables
        name = draw(hst.sampled_from(["lab", "external", "nat", "nodes", "bogus"]))
        lines.append(f"[[{name}]]" if draw(hst.booleans()) else f"[{name}]")
        for _ in range(draw(hst.integers(0, 4))):
            value = draw(hst.one_of(_SCALARS, hst.lists(_SCALARS, max_size=3)))
            lines.append(f"{draw(hst.sampled_from(_KEYS))} = {_toml_value(value)}")
    if draw(hst.integers(0, 9)) == 0:                    # now and then, broken syntax
        lines.insert(draw(hst.integers(0, len(lines))), draw(hst.sampled_from(
            ["[nodes", "x = ", "= 1", "[[a]]]", 'pods = "unterminated', "\t\x00"])))
    return "\n".join(lines) + "\n"


@settings(max_examples=TOPO_FUZZ_CASES, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(text=topology_texts())
def test_fuzzed_topologies_build_or_name_the_error(tmp_path, text):
    path = tmp_path / "fuzz.toml"
    path.write_text(text)
    try:
        topo = load_topology("fz", path)
    except TopologyError as e:
        message = str(e)
        # names the file and the line: path:LINE: field, or TOML's own "(at line N, column M)"
        assert re.match(rf"{re.escape(str(path))}:\d+: ", message) or (
            message.startswith(f"{path}: not valid TOML") and "line" in message), message
    else:
        from netns_lab.topology import Topology
        assert Topology.from_dict(topo.to_dict()) == topo
