"""scripts/provision.sh takes netperf's apt component from the machine's own archive.

Only the script's functions run here (it is sourced; nothing is installed), against fake apt
sources in a temporary directory: one-line and deb822 formats, Debian and Ubuntu, mirrors,
proxies and keys. No network, no apt-get.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "provision.sh"
OURS = "ebpf-hostrouting-netperf.sources"


def run(tmp_path: Path, call: str, distro: str, codename: str, sources_list: str | None = None,
        parts: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Source the script and run `call` with the fake sources of tmp_path."""
    parts_dir = tmp_path / "sources.list.d"
    parts_dir.mkdir(exist_ok=True)
    for name, text in (parts or {}).items():
        (parts_dir / name).write_text(text)
    list_file = tmp_path / "sources.list"
    if sources_list is not None:
        list_file.write_text(sources_list)
    env = {"PATH": "/usr/bin:/bin", "ID": distro, "VERSION_CODENAME": codename,
           "PROVISION_APT_SOURCES_LIST": str(list_file),
           "PROVISION_APT_SOURCES_PARTS": str(parts_dir)}
    return subprocess.run(["bash", "-c", f'source "{SCRIPT}"; {call}'], env=env,
                          capture_output=True, text=True, timeout=30)


def derived(tmp_path: Path, *args, **kw) -> str:
    proc = run(tmp_path, "netperf_sources", *args, **kw)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def fields(text: str) -> dict[str, str]:
    return dict(re.findall(r"^([A-Za-z-]+): (.*)$", text, re.M))


DEBIAN_ONE_LINE = """\
# deb http://old-mirror.example/debian bookworm main
deb http://security.mirror.example/debian-security bookworm-security main
deb-src http://src.mirror.example/debian bookworm main
deb http://ftp.mirror.example/debian/ bookworm main contrib   # the main archive
deb http://ftp.mirror.example/debian/ bookworm-updates main
"""

DEBIAN_DEB822 = """\
Types: deb
# a comment inside a stanza
URIs: http://apt-cacher.example:3142/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb deb-src
URIs: http://apt-cacher.example:3142/debian
Suites: bookworm bookworm-updates
Components: main non-free-firmware
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""

UBUNTU_DEB822 = """\
Types: deb
URIs: http://disabled.example/ubuntu
Suites: noble
Components: main
Enabled: no

Types: deb
URIs: http://eu-west-1.ci-mirror.example/ubuntu/
Suites: noble noble-updates noble-backports
Components: main restricted universe
Signed-By: /usr/share/keyrings/ubuntu-archive-keyring.gpg

Types: deb
URIs: http://security.ci-mirror.example/ubuntu/
Suites: noble-security
Components: main restricted universe
Signed-By: /usr/share/keyrings/ubuntu-archive-keyring.gpg
"""

UBUNTU_ONE_LINE = """\
deb [arch=amd64 signed-by=/etc/apt/keyrings/mirror.gpg] https://proxy.example/ports/ubuntu noble main restricted
deb https://proxy.example/ports/ubuntu noble-security main
"""


def test_debian_one_line_sources_list(tmp_path):
    text = derived(tmp_path, "debian", "bookworm", sources_list=DEBIAN_ONE_LINE)
    assert fields(text) == {"Types": "deb", "URIs": "http://ftp.mirror.example/debian/",
                            "Suites": "bookworm", "Components": "non-free"}


def test_debian_deb822_behind_a_proxy_keeps_the_key(tmp_path):
    text = derived(tmp_path, "debian", "bookworm", parts={"debian.sources": DEBIAN_DEB822})
    assert fields(text) == {"Types": "deb", "URIs": "http://apt-cacher.example:3142/debian",
                            "Suites": "bookworm", "Components": "non-free",
                            "Signed-By": "/usr/share/keyrings/debian-archive-keyring.gpg"}


def test_ubuntu_deb822_regional_mirror(tmp_path):
    text = derived(tmp_path, "ubuntu", "noble", sources_list="",
                   parts={"ubuntu.sources": UBUNTU_DEB822})
    assert fields(text) == {"Types": "deb", "URIs": "http://eu-west-1.ci-mirror.example/ubuntu/",
                            "Suites": "noble noble-updates", "Components": "multiverse",
                            "Signed-By": "/usr/share/keyrings/ubuntu-archive-keyring.gpg"}


def test_ubuntu_one_line_with_options(tmp_path):
    text = derived(tmp_path, "ubuntu", "noble", parts={"mirror.list": UBUNTU_ONE_LINE})
    assert fields(text) == {"Types": "deb", "URIs": "https://proxy.example/ports/ubuntu",
                            "Suites": "noble noble-updates", "Components": "multiverse",
                            "Signed-By": "/etc/apt/keyrings/mirror.gpg"}


def test_an_embedded_key_is_copied_whole(tmp_path):
    key = ("Signed-By:\n -----BEGIN PGP PUBLIC KEY BLOCK-----\n .\n mQINBF\n"
           " -----END PGP PUBLIC KEY BLOCK-----\n")
    text = derived(tmp_path, "debian", "trixie", parts={"d.sources": (
        "Types: deb\nURIs: http://m.example/debian\nSuites: trixie\nComponents: main\n" + key)})
    assert text.endswith(key)


def test_component_already_enabled_needs_no_file(tmp_path):
    assert derived(tmp_path, "ubuntu", "noble", parts={"ubuntu.sources": UBUNTU_DEB822.replace(
        "main restricted universe\nSigned", "main restricted universe multiverse\nSigned")}) == ""


def test_no_main_source_is_a_one_line_error(tmp_path):
    proc = run(tmp_path, "netperf_sources", "debian", "bookworm",
               sources_list="deb http://m.example/debian bullseye main\n")
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("provision: error: no apt source of debian bookworm main")


def test_enable_rewrites_an_older_file_once_then_changes_nothing(tmp_path):
    """A machine provisioned by an older script has our file with another archive."""
    old = ("# Added by ebpf-hostrouting scripts/provision.sh: netperf lives in non-free.\n"
           "Types: deb\nURIs: http://fixed-host.example/debian\nSuites: bookworm\n"
           "Components: non-free\n")
    parts = {"debian.sources": DEBIAN_DEB822, OURS: old}
    call = "enable_netperf_component && echo changed=0 || echo changed=1"  # as the script calls it
    first = run(tmp_path, call, "debian", "bookworm", parts=parts)
    assert first.returncode == 0, first.stderr
    assert first.stdout.endswith("changed=0\n") and "enabled the apt component" in first.stdout
    written = (tmp_path / "sources.list.d" / OURS).read_text()
    assert fields(written)["URIs"] == "http://apt-cacher.example:3142/debian"
    again = run(tmp_path, call, "debian", "bookworm")
    assert again.stdout == "changed=1\n", again.stderr
    assert (tmp_path / "sources.list.d" / OURS).read_text() == written
    # the machine's own sources gain the component: our file goes
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        DEBIAN_DEB822.replace("main non-free-firmware", "main non-free non-free-firmware"))
    gone = run(tmp_path, call, "debian", "bookworm")
    assert gone.stdout.endswith("changed=0\n") and not (tmp_path / "sources.list.d" / OURS).exists()


def test_the_script_names_no_host_of_its_own():
    urls = re.findall(r"[a-z][a-z0-9+.-]*://[^\s\"')]+", SCRIPT.read_text())
    assert urls == []


@pytest.mark.parametrize("distro", ["centos"])
def test_unsupported_distribution(tmp_path, distro):
    proc = run(tmp_path, "netperf_sources", distro, "x", sources_list="")
    assert proc.returncode == 1 and "unsupported distribution 'centos'" in proc.stderr
