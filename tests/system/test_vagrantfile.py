"""The Vagrantfile is valid, checked offline by `vagrant validate` (no box download, no VM).

`make test` installs vagrant where the distro packages it (scripts/provision.sh
--test-tools); elsewhere these tests skip and say why.

`vagrant validate` wants a usable provider, and none is installed here. A stub
VBoxManage that only answers ``--version`` makes the built-in VirtualBox provider
usable, so its settings (``vb.cpus``, ``vb.memory``) are validated too, which
``--ignore-provider`` would skip. Vagrant state goes to a temporary directory, so
neither ``~/.vagrant.d`` nor the repo's ``.vagrant/`` is created.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VAGRANT = shutil.which("vagrant")

pytestmark = pytest.mark.skipif(
    VAGRANT is None,
    reason="vagrant is not installed (scripts/provision.sh --test-tools installs it where "
           "the distro packages it)")

STUB_VBOXMANAGE = """#!/bin/sh
case "$1" in --version) echo 7.0.14r161095 ;; *) echo "stub VBoxManage: $*" >&2; exit 1 ;; esac
"""


@pytest.fixture
def vagrant_env(tmp_path) -> dict[str, str]:
    stub_dir = tmp_path / "bin"
    stub_dir.mkdir()
    stub = stub_dir / "VBoxManage"
    stub.write_text(STUB_VBOXMANAGE)
    stub.chmod(0o755)
    env = dict(os.environ)
    env.update({
        "PATH": f"{stub_dir}{os.pathsep}{env.get('PATH', '')}",
        "VAGRANT_CWD": str(REPO),
        "VAGRANT_HOME": str(tmp_path / "vagrant.d"),
        "VAGRANT_DOTFILE_PATH": str(tmp_path / "dotfile"),
        "VAGRANT_CHECKPOINT_DISABLE": "1",   # no version check over the network
        "VAGRANT_DEFAULT_PROVIDER": "virtualbox",
        "VAGRANT_NO_COLOR": "1",
    })
    env.pop("HOSTROUTING_BOX", None)
    return env


def validate(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([VAGRANT, "validate", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=120)


def test_vagrantfile_validates_with_provider_settings(vagrant_env):
    proc = validate(vagrant_env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "validated successfully" in proc.stdout


def test_validation_catches_a_bad_provider_setting(vagrant_env, tmp_path):
    """The stub really makes vagrant check the provider block (a typo must fail)."""
    broken = tmp_path / "broken"
    broken.mkdir()
    text = (REPO / "Vagrantfile").read_text()
    assert "vb.cpus = 2" in text
    (broken / "Vagrantfile").write_text(text.replace("vb.cpus = 2", "vb.cpu = 2"))
    proc = subprocess.run([VAGRANT, "validate"], cwd=broken, env={**vagrant_env,
                          "VAGRANT_CWD": str(broken)}, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=120)
    assert proc.returncode != 0
    assert "cpu" in proc.stdout + proc.stderr


def test_vagrantfile_provisions_with_the_one_script():
    text = (REPO / "Vagrantfile").read_text()
    assert "bento/ubuntu-24.04" in text
    assert "scripts/provision.sh" in text
