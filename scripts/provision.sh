#!/usr/bin/env bash
# Provision a Debian 12 / Ubuntu 24.04 machine for ebpf-hostrouting.
#
# One script for every place the project runs: `make demo`, `make test`, the
# Vagrantfile, GitHub CI and .ci/run. Idempotent: a second run installs nothing
# and takes a few seconds. Must run as root (it uses apt-get).
#
# USAGE: sudo scripts/provision.sh [--no-venv] [--test-tools]
#   --no-venv     system packages only (no .venv)
#   --test-tools  also what only the test suite uses: vagrant, for
#                 tests/test_vagrantfile.py (`vagrant validate`). `make test`
#                 passes it, `make demo` does not, so a demo machine gets no
#                 Ruby stack. Best effort: where the distro has no vagrant
#                 package it says so and that one test skips.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$repo/.venv"
stamp="$venv/.provisioned"
make_venv=1
test_tools=0

say() { printf 'provision: %s\n' "$*"; }
die() { printf 'provision: error: %s\n' "$*" >&2; exit 1; }

for arg in "$@"; do
	case "$arg" in
	--no-venv) make_venv=0 ;;
	--test-tools) test_tools=1 ;;
	-h | --help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d'; exit 0 ;;
	*) die "unknown option '$arg' (options: --no-venv --test-tools)" ;;
	esac
done

[ "$(id -u)" -eq 0 ] || die "must run as root (try: sudo $0)"
[ -r /etc/os-release ] || die "/etc/os-release missing: unsupported distribution"
. /etc/os-release

# netperf is outside the distros' main archives: Debian ships it in non-free,
# Ubuntu in multiverse. Enable exactly that component, in a file of our own.
enable_netperf_component() {
	local list=/etc/apt/sources.list.d/ebpf-hostrouting-netperf.sources
	[ -e "$list" ] && return 1
	case "$ID" in
	debian)
		cat >"$list" <<SRC
# Added by ebpf-hostrouting scripts/provision.sh: netperf lives in non-free.
Types: deb
URIs: http://deb.debian.org/debian
Suites: $VERSION_CODENAME
Components: non-free
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
		;;
	ubuntu)
		cat >"$list" <<SRC
# Added by ebpf-hostrouting scripts/provision.sh: netperf lives in multiverse.
Types: deb
URIs: http://archive.ubuntu.com/ubuntu
Suites: $VERSION_CODENAME ${VERSION_CODENAME}-updates
Components: multiverse
Signed-By: /usr/share/keyrings/ubuntu-archive-keyring.gpg
SRC
		;;
	*) die "unsupported distribution '$ID' (Debian 12 and Ubuntu 24.04 are supported)" ;;
	esac
	say "enabled the apt component that carries netperf ($list)"
}

# Kernel headers: the exact ones for the running kernel where the distro has
# them, else the distro's generic headers. bcc looks in /lib/modules/$(uname
# -r)/build, so point that at what we installed when it is missing.
headers_package() {
	local exact="linux-headers-$(uname -r)"
	if apt-cache show "$exact" >/dev/null 2>&1; then
		echo "$exact"
	elif [ "$ID" = debian ]; then
		echo "linux-headers-$(dpkg --print-architecture)"
	else
		echo "linux-headers-generic"
	fi
}

link_headers_for_bcc() {
	local mine="/lib/modules/$(uname -r)"
	[ -e "$mine/build" ] && [ -e "$mine/build/include/linux/kconfig.h" -o -e "$mine/source/include/linux/kconfig.h" ] && return 0
	# The generic headers package lays out /lib/modules/<its version>/{build,source}:
	# point the running kernel's build and source at the newest such pair.
	local other
	other=$(ls -d /lib/modules/*/build 2>/dev/null | grep -v "^$mine/" | sort -V | tail -n 1 || true)
	[ -n "$other" ] || die "no kernel headers under /lib/modules after installing them"
	other=$(dirname "$other")
	mkdir -p "$mine"
	ln -sfn "$(readlink -f "$other/build")" "$mine/build"
	[ -e "$other/source" ] && ln -sfn "$(readlink -f "$other/source")" "$mine/source"
	say "headers for $(uname -r) are not packaged: linked $mine/{build,source} to $(basename "$other")'s"
}

packages=(python3-bpfcc bpfcc-tools libbpf1 clang llvm iproute2 iptables nftables
	conntrack netperf iputils-ping python3-venv python3-pip procps ethtool tcpdump make)

# Test-only tools are added only where the archive has them (apt-cache policy
# is local and fast, so a machine without them stays quick on every run).
add_test_tools() {
	if apt-cache policy vagrant 2>/dev/null | grep -q 'Candidate: [0-9]'; then
		packages+=(vagrant)
	elif ! command -v vagrant >/dev/null; then
		say "vagrant: no package in this distribution's archives; tests/test_vagrantfile.py will skip"
	fi
}

missing_packages() {
	local p
	for p in "${packages[@]}" "$(headers_package)"; do
		dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || echo "$p"
	done
}

added_component=0
enable_netperf_component && added_component=1
export DEBIAN_FRONTEND=noninteractive
if [ "$added_component" = 1 ] || [ ! -d /var/lib/apt/lists ] || [ -z "$(ls /var/lib/apt/lists 2>/dev/null | grep -v lock)" ]; then
	say "apt-get update"
	apt-get update -qq
fi
[ "$test_tools" = 1 ] && add_test_tools
mapfile -t todo < <(missing_packages)
if [ "${#todo[@]}" -gt 0 ]; then
	say "apt-get update (to install: ${todo[*]})"
	apt-get update -qq
	mapfile -t todo < <(missing_packages)
	apt-get install -y -qq --no-install-recommends "${todo[@]}" >/dev/null
	say "installed: ${todo[*]}"
else
	say "system packages: all present"
fi
link_headers_for_bcc

[ "$make_venv" = 1 ] || exit 0

# The venv uses the distro python, because bcc is a distro package that is
# not on PyPI; --system-site-packages makes it importable from the venv.
sys_python=/usr/bin/python3
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import bcc' 2>/dev/null; then
	rm -rf "$venv"
	"$sys_python" -m venv --system-site-packages "$venv"
	say "created $venv from $sys_python with system site packages"
fi
if [ ! -e "$stamp" ] || [ "$repo/pyproject.toml" -nt "$stamp" ]; then
	"$venv/bin/pip" install -q -e "$repo[test]"
	touch "$stamp"
	say "installed ebpf-hostrouting with its test extras into $venv"
else
	say "python environment: up to date"
fi
say "done"
