"""Shared fixtures: root check, a private state directory, labs that always go away.

Every lab a test builds has a fresh short name (a letter per pytest-xdist
worker + 3 hex digits) so that tests can run side by side (``pytest -n 2``), and its namespaces are removed however the test
ends. The state directory is private to the test session, so a developer's
own labs are never seen or removed by the suite.
"""

from __future__ import annotations

import os
import secrets

import pytest

from netns_lab import netns
from netns_lab.builder import lab_down, lab_up
from netns_lab.state import lab_names
from netns_lab.topology import load_topology

def pytest_configure(config):
    if os.geteuid() != 0:
        pytest.exit("the suite builds network namespaces and loads BPF: run it as root "
                    "(sudo make test)", returncode=4)


@pytest.fixture(scope="session", autouse=True)
def private_state_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hostrouting-state")
    old = os.environ.get("HOSTROUTING_STATE_DIR")
    os.environ["HOSTROUTING_STATE_DIR"] = str(path)
    yield path
    for name in lab_names():
        lab_down(name)
    if old is None:
        del os.environ["HOSTROUTING_STATE_DIR"]
    else:
        os.environ["HOSTROUTING_STATE_DIR"] = old


def _lab_letter() -> str:
    """One first letter per pytest-xdist worker ("t" without xdist), so that workers running
    side by side never pick the same lab name (4 characters of the 8 a lab name may have)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not worker.startswith("gw"):
        return "t"
    return "uvwxyzabcdefghijklmnopqrs"[int(worker[2:]) % 25]


def fresh_lab_name() -> str:
    while True:
        name = _lab_letter() + secrets.token_hex(2)[:3]
        existing = os.listdir(netns.NETNS_DIR) if os.path.isdir(netns.NETNS_DIR) else []
        if not any(n.startswith(name + "-") for n in existing) and name not in lab_names():
            return name


@pytest.fixture
def lab_name():
    name = fresh_lab_name()
    yield name
    if name in lab_names():
        lab_down(name)


@pytest.fixture
def make_lab():
    """Build labs on demand (``make_lab(mode='legacy', **topology)``); all removed after."""
    made = []

    def make(mode: str = "legacy", nodes: int | None = None, pods_per_node: int | None = None,
             topology: str | None = None):
        from datapath.switch import configure_mode
        topo = load_topology(fresh_lab_name(), topology, nodes, pods_per_node)
        made.append(topo.lab)
        state, _ = lab_up(topo, configure_mode(mode))
        return state, topo

    yield make
    for name in made:
        if name in lab_names():
            lab_down(name)


@pytest.fixture
def legacy_lab(make_lab):
    return make_lab("legacy")


@pytest.fixture
def ebpf_lab(make_lab):
    return make_lab("ebpf")
