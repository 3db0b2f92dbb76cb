"""Fixtures for the whole suite: root check, a private state directory, labs that always go away.

The suite goes by kind: tests/bpf/ runs the programs under BPF_PROG_TEST_RUN (its own
fixtures in tests/bpf/conftest.py), tests/lab/ sends real packets through labs, tests/system/
checks the product as a whole (hardening, signals, doctor, provisioning, CLI, topology).
Tests that build a lab are marked `slow`: `pytest -m "not slow"` is the quick loop.

Every lab a test builds has a fresh short name (labtools.fresh_lab_name: a letter per
pytest-xdist worker + 3 hex digits) so that tests can run side by side (``pytest -n 2``),
and its namespaces are removed however the test ends. The state directory is private to the
test session, so a developer's own labs are never seen or removed by the suite.
"""

from __future__ import annotations

import contextlib
import os

import pytest

from netns_lab.builder import lab_down, lab_up
from netns_lab.state import lab_names
from netns_lab.topology import load_topology
from tests.labtools import fresh_lab_name


def pytest_configure(config):
    if os.geteuid() != 0:
        pytest.exit("the suite builds network namespaces and loads BPF: run it as root "
                    "(sudo make test)", returncode=4)


def pytest_collection_modifyitems(config, items):
    """Under ``pytest -n 2 --dist loadgroup`` (make test) the tests that build labs run one
    after the other on one worker, in file order, as they would serially; the others share
    the second worker. Without --dist loadgroup the mark changes nothing."""
    for item in items:
        if item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.xdist_group("labs"))


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


@pytest.fixture
def lab_name():
    name = fresh_lab_name()
    yield name
    if name in lab_names():
        lab_down(name)


@contextlib.contextmanager
def lab_maker():
    """``make(mode='legacy', **topology)`` builds labs (``ip_family="dual"``: dual stack);
    all are removed when the block ends."""
    made = []

    def make(mode: str = "legacy", nodes: int | None = None, pods_per_node: int | None = None,
             topology: str | None = None, ip_family: str | None = None):
        from datapath.switch import configure_mode
        topo = load_topology(fresh_lab_name(), topology, nodes, pods_per_node, ip_family)
        made.append(topo.lab)
        state, _ = lab_up(topo, configure_mode(mode))
        return state, topo

    try:
        yield make
    finally:
        for name in made:
            if name in lab_names():
                lab_down(name)


@pytest.fixture
def make_lab():
    """Build labs on demand (``make_lab(mode='legacy', **topology)``); all removed after."""
    with lab_maker() as make:
        yield make


@pytest.fixture(scope="module")
def make_module_lab():
    """make_lab for labs that serve a whole module (its tests each leave the lab usable)."""
    with lab_maker() as make:
        yield make


@pytest.fixture
def legacy_lab(make_lab):
    return make_lab("legacy")


@pytest.fixture
def ebpf_lab(make_lab):
    return make_lab("ebpf")


@pytest.fixture
def no_tcp_counters(monkeypatch):
    """For bench tests with no lab behind their namespaces: TCP's counters read as zeros."""
    from datapath.bench import runner, tcp_counters
    monkeypatch.setattr(runner.Bench, "server_netns", lambda self, scenario, mode: "server-ns")
    monkeypatch.setattr(tcp_counters, "read", lambda ns, which: dict.fromkeys(which.values(), 0))
