"""bench --node-profile: the rules kube-proxy and AKS write, and the conntrack fill.

The rule text is checked against kube-proxy's shapes (chain names, rules per chain, the
statistic probabilities) and loaded into a namespace made for the test, never the root one.
"""

from __future__ import annotations

import re
import secrets
import subprocess
from collections import Counter

import pytest

from datapath.bench import node_profiles as np_
from netns_lab import legacy, netns


@pytest.fixture
def scratch_ns():
    name = f"hbnp-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def chain_rules(text: str) -> dict[tuple[str, str], list[str]]:
    """(table, chain) -> its rules, in the order they end up in the chain."""
    table, out = "", {}
    for line in text.splitlines():
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith("-A "):
            out.setdefault((table, line.split()[1]), []).append(line)
        elif line.startswith("-I "):
            out.setdefault((table, line.split()[1]), []).insert(0, line)
    return out


def by_prefix(rules: dict, table: str, prefix: str) -> dict[str, list[str]]:
    return {chain: r for (t, chain), r in rules.items() if t == table and chain.startswith(prefix)}


def test_chain_names_are_kube_proxys():
    # from kube-proxy's own tests (pkg/proxy/iptables): ns1/svc1:p80 -> 10.180.0.1:80
    assert "KUBE-SVC-" + np_._hash("ns1/svc1:p80" + "tcp") == "KUBE-SVC-XPGD46QRK7WJZT7O"
    assert "KUBE-SEP-" + np_._hash("ns1/svc1:p80" + "tcp" + "10.180.0.1:80") == \
        "KUBE-SEP-SXIVWICOYRO3J4NJ"


def test_kube_proxy_2x3_has_kube_proxys_rules_per_chain():
    rules = chain_rules(np_.ruleset(np_.parse("kube-proxy:2x3")).text())
    services = rules[("nat", "KUBE-SERVICES")]
    assert len(services) == 3       # one per service port, then the NodePort jump last
    assert "--dst-type LOCAL -j KUBE-NODEPORTS" in services[-1]
    assert all("-d 198.18.240." in r for r in services[:2])
    svcs = by_prefix(rules, "nat", "KUBE-SVC-")
    seps = by_prefix(rules, "nat", "KUBE-SEP-")
    exts = by_prefix(rules, "nat", "KUBE-EXT-")
    assert len(svcs) == 2 and len(seps) == 6 and len(exts) == 1    # service 0 is a NodePort
    for chain, svc in svcs.items():
        assert len(svc) == 4
        assert "! -s 10.244.0.0/16 -j KUBE-MARK-MASQ" in svc[0]
        probabilities = [re.search(r"--probability (\S+)", r) for r in svc[1:]]
        assert [m and m.group(1) for m in probabilities] == ["0.3333333333", "0.5000000000", None]
        assert all(r.split()[-1] in seps for r in svc[1:])
    for sep in seps.values():
        assert len(sep) == 2
        assert sep[0].endswith("-j KUBE-MARK-MASQ") and "-j DNAT --to-destination" in sep[1]
    assert len(rules[("nat", "KUBE-NODEPORTS")]) == 1
    assert [len(r) for r in exts.values()] == [2]
    assert len(rules[("nat", "KUBE-POSTROUTING")]) == 3
    assert "MASQUERADE" in rules[("nat", "KUBE-POSTROUTING")][-1]
    assert rules[("nat", "KUBE-MARK-MASQ")] == ["-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000"]
    for chain in ("PREROUTING", "OUTPUT"):
        assert [r.split()[-1] for r in rules[("nat", chain)]] == ["KUBE-SERVICES"]
    forward = rules[("filter", "KUBE-FORWARD")]
    assert len(forward) == 3
    assert "INVALID -j DROP" in forward[0] and "--mark 0x4000/0x4000 -j ACCEPT" in forward[1]
    assert [r.split()[-1] for r in rules[("filter", "FORWARD")]] == \
        ["KUBE-PROXY-FIREWALL", "KUBE-FORWARD", "KUBE-SERVICES", "KUBE-EXTERNAL-SERVICES"]


def test_large_clusters_drop_the_endpoint_comments_as_kube_proxy_does():
    small = chain_rules(np_.ruleset(np_.parse("kube-proxy:10x3")).text())
    large = chain_rules(np_.ruleset(np_.parse("kube-proxy:400x3")).text())   # 1,200 endpoints
    assert all("--comment" in r for c in by_prefix(small, "nat", "KUBE-SEP-").values() for r in c)
    assert not any("--comment" in r for c in by_prefix(large, "nat", "KUBE-SEP-").values()
                   for r in c)
    assert all("--comment" in r for r in large[("nat", "KUBE-SERVICES")])


def test_aks_adds_ip_masq_agent_and_the_wireserver_rules():
    profile = np_.parse("aks")
    assert (profile.services, profile.endpoints, profile.conntrack_entries) == (1000, 3, 100_000)
    rules = chain_rules(np_.ruleset(profile).text())
    masq = rules[("nat", "IP-MASQ-AGENT")]
    assert masq[0].startswith("-A IP-MASQ-AGENT -d 169.254.0.0/16 ")
    assert all(r.endswith("-j RETURN") for r in masq[:-1]) and masq[-1].endswith("MASQUERADE")
    assert rules[("nat", "POSTROUTING")][-1].endswith("! --dst-type LOCAL -j IP-MASQ-AGENT")
    drops = [r for r in rules[("filter", "FORWARD")] if "168.63.129.16" in r]
    assert [re.search(r"--dport (\d+)", r).group(1) for r in drops] == ["32526", "80"]
    assert len(rules[("nat", "KUBE-SERVICES")]) == 1001


@pytest.mark.parametrize("text", ["kube-proxy", "kube-proxy:0x3", "kube-proxy:10x0",
                                  "kube-proxy:5000x1", "kube-proxy:10X3", "azure"])
def test_bad_profiles_are_one_line_errors(text):
    with pytest.raises(ValueError) as err:
        np_.parse(text)
    assert "\n" not in str(err.value) and repr(text) in str(err.value)


def test_kube_proxy_2x3_loads_into_a_namespace(scratch_ns):
    tables = np_.ruleset(np_.parse("kube-proxy:2x3"))
    restore = legacy.iptables_binary() + "-restore"
    netns.run(scratch_ns, [restore, "--test", "--noflush"], input=tables.text())
    netns.run(scratch_ns, [restore, "--noflush"], input=tables.text())
    saved = netns.run(scratch_ns, [legacy.iptables_binary() + "-save"]).stdout
    per_chain = Counter((line.split()[1]) for line in saved.splitlines() if line.startswith("-A "))
    expected = Counter()
    for (_, chain), rules in chain_rules(tables.text()).items():
        expected[chain] += len(rules)
    assert per_chain == expected
    assert sum(per_chain.values()) == tables.rule_count() == 45


def test_conntrack_fill_survives_the_removal_of_the_bench_flows(scratch_ns):
    fill = np_.conntrack_fill(2000)
    tuples = {tuple(line.split()[i] for i in (2, 4, 8)) for line in fill.splitlines()}
    assert len(tuples) == 2000       # (src, dst, sport) distinct: no entry replaces another
    netns.run(scratch_ns, ["conntrack", "-R", "-"], input=fill)
    netns.run(scratch_ns, ["conntrack", "-I", "-s", "198.18.1.10", "-d", "198.18.2.10", "-p",
                           "tcp", "--sport", "40000", "--dport", "12865", "--state",
                           "TIME_WAIT", "-t", "120"])
    assert np_.conntrack_count(scratch_ns) == 2001
    np_.delete_bench_flows(scratch_ns)
    assert np_.conntrack_count(scratch_ns) == 2000
    left = netns.run(scratch_ns, ["conntrack", "-L", "-s", "198.18.1.10"], check=False).stdout
    assert "198.18.1.10" not in left
