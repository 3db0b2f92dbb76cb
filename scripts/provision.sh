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
#                 tests/system/test_vagrantfile.py (`vagrant validate`), and
#                 prometheus, for tests/lab/test_metrics.py (a real server
#                 scraping `hostrouting metrics serve`). `make test` passes
#                 it, `make demo` does not, so a demo machine gets no Ruby
#                 stack. Best effort: where the distro has no such package it
#                 says so and those tests skip.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$repo/.venv"
stamp="$venv/.provisioned"
make_venv=1
test_tools=0

say() { printf 'provision: %s\n' "$*"; }
die() { printf 'provision: error: %s\n' "$*" >&2; exit 1; }

# netperf is outside the distros' main archives: Debian ships it in non-free,
# Ubuntu in multiverse. Enable exactly that component, in a file of our own,
# from the same archive (URIs and Signed-By) as the machine's own source of
# the release's main component: a mirror, a proxy or a CI runner's regional
# mirror is followed, and this script names no archive host of its own.
# Both formats are read: one-line (sources.list, *.list) and deb822 (*.sources).
# PROVISION_APT_SOURCES_LIST / PROVISION_APT_SOURCES_PARTS move them (tests).
apt_sources_list=${PROVISION_APT_SOURCES_LIST:-/etc/apt/sources.list}
apt_sources_parts=${PROVISION_APT_SOURCES_PARTS:-/etc/apt/sources.list.d}
netperf_sources_name=ebpf-hostrouting-netperf.sources

# Every source entry of one file as a line: types, URIs, suites, components,
# signed-by (a deb822 multi-line value joined by \001), enabled; tab-separated.
_one_line_entries() {
	awk '{
		sub(/#.*/, "")
		if (NF < 3 || ($1 != "deb" && $1 != "deb-src")) next
		i = 2; signed = ""; opts = ""
		if ($2 ~ /^\[/) {
			for (; i <= NF; i++) { opts = opts " " $i; if ($i ~ /\]$/) { i++; break } }
			gsub(/[][]/, " ", opts)
			n = split(opts, kv, /[ \t]+/)
			for (j = 1; j <= n; j++)
				if (tolower(substr(kv[j], 1, 10)) == "signed-by=") signed = substr(kv[j], 11)
		}
		comps = ""
		for (j = i + 2; j <= NF; j++) comps = comps (comps == "" ? "" : " ") $j
		printf "%s\t%s\t%s\t%s\t%s\tyes\n", $1, $i, $(i + 1), comps, signed
	}' "$1"
}

_deb822_entries() {
	awk '
	function trim(s) { gsub(/^[ \t]+|[ \t]+$/, "", s); return s }
	function flush() {
		if (n) printf "%s\t%s\t%s\t%s\t%s\t%s\n", f["types"], f["uris"], f["suites"],
			f["components"], f["signed-by"], (f["enabled"] == "" ? "yes" : tolower(f["enabled"]))
		n = 0; key = ""; delete f
	}
	/^#/ { next }
	/^[ \t]*$/ { flush(); next }
	/^[ \t]/ {
		if (key == "signed-by") f[key] = f[key] "\001" $0
		else if (key != "") f[key] = trim(f[key] " " trim($0))
		next
	}
	{
		c = index($0, ":"); if (!c) next
		key = tolower(trim(substr($0, 1, c - 1))); f[key] = trim(substr($0, c + 1)); n++
	}
	END { flush() }' "$1"
}

_apt_source_entries() {
	local f
	[ -r "$apt_sources_list" ] && _one_line_entries "$apt_sources_list"
	for f in "$apt_sources_parts"/*.list; do
		[ -r "$f" ] && _one_line_entries "$f"
	done
	for f in "$apt_sources_parts"/*.sources; do
		[ "${f##*/}" = "$netperf_sources_name" ] && continue  # ours: derived, not a source
		[ -r "$f" ] && _deb822_entries "$f"
	done
	return 0
}

# The first enabled "deb" entry whose suites include $1 and components $2:
# prints its URIs, a tab, and its Signed-By (empty when it has none).
apt_archive_of() {
	_apt_source_entries | awk -F'\t' -v suite="$1" -v comp="$2" '
	function has(list, word,   i, n, w) {
		n = split(list, w, /[ \t]+/)
		for (i = 1; i <= n; i++) if (w[i] == word) return 1
		return 0
	}
	!found && $6 != "no" && has($1, "deb") && has($3, suite) && has($4, comp) {
		print $2 "\t" $5; found = 1      # no early exit: the writer must not see SIGPIPE
	}
	END { exit !found }'
}

# The file that enables netperf's component for $ID / $VERSION_CODENAME, on
# stdout; nothing when a source of the machine has that component already.
netperf_sources() {
	local component suites archive uris signed
	case "$ID" in
	debian) component=non-free suites=$VERSION_CODENAME ;;
	ubuntu) component=multiverse suites="$VERSION_CODENAME ${VERSION_CODENAME}-updates" ;;
	*) die "unsupported distribution '$ID' (Debian 12 and Ubuntu 24.04 are supported)" ;;
	esac
	apt_archive_of "$VERSION_CODENAME" "$component" >/dev/null && return 0
	archive=$(apt_archive_of "$VERSION_CODENAME" main) ||
		die "no apt source of $ID $VERSION_CODENAME main in $apt_sources_list or $apt_sources_parts: cannot tell which archive to take $component from"
	uris=${archive%%$'\t'*} signed=${archive#*$'\t'}
	printf '# Added by ebpf-hostrouting scripts/provision.sh: netperf lives in %s.\n' "$component"
	printf '# The archive and key of this machine'"'"'s own %s main source.\n' "$VERSION_CODENAME"
	printf 'Types: deb\nURIs: %s\nSuites: %s\nComponents: %s\n' "$uris" "$suites" "$component"
	signed=${signed//$'\001'/$'\n'}  # an embedded key: its continuation lines as they were
	case "$signed" in
	'') ;;
	$'\n'*) printf 'Signed-By:%s\n' "$signed" ;;
	*) printf 'Signed-By: %s\n' "$signed" ;;
	esac
}

# Writes (or rewrites, e.g. a file of an older version of this script) the
# component's file; returns 0 when it changed anything, 1 when not.
enable_netperf_component() {
	local file="$apt_sources_parts/$netperf_sources_name" want
	want=$(netperf_sources) || exit 1  # its error is printed; `set -e` is off in `f && x`
	if [ -z "$want" ]; then
		[ -e "$file" ] || return 1
		rm -f "$file"
		say "netperf's component is enabled by this machine's own sources: removed $file"
		return 0
	fi
	[ -e "$file" ] && [ "$(cat "$file")" = "$want" ] && return 1
	printf '%s\n' "$want" >"$file.tmp"
	mv "$file.tmp" "$file"
	say "enabled the apt component that carries netperf ($file)"
}

# Sourced (tests/system/test_provision.py): the functions above, and nothing is run.
[ "${BASH_SOURCE[0]}" = "$0" ] || return 0

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

# perf, for `hostrouting bench --profile`: Debian packages it once (linux-perf),
# Ubuntu per kernel (linux-tools-<release>); a kernel with no such package gets
# none, and bench --profile says what to install.
perf_package() {
	if [ "$ID" = debian ]; then
		echo linux-perf
	elif apt-cache show "linux-tools-$(uname -r)" >/dev/null 2>&1; then
		echo "linux-tools-$(uname -r)"
	else
		say "perf: no linux-tools-$(uname -r) in this distribution's archives; bench --profile will say so" >&2
	fi
}

packages=(python3-bpfcc bpfcc-tools libbpf1 clang llvm iproute2 iptables nftables
	conntrack netperf iputils-ping python3-venv python3-pip procps ethtool tcpdump socat make)

# Test-only tools are added only where the archive has them (apt-cache policy
# is local and fast, so a machine without them stays quick on every run).
add_test_tools() {
	local tool
	for tool in vagrant:tests/system/test_vagrantfile.py prometheus:tests/lab/test_metrics.py; do
		if apt-cache policy "${tool%%:*}" 2>/dev/null | grep -q 'Candidate: [0-9]'; then
			packages+=("${tool%%:*}")
		elif ! command -v "${tool%%:*}" >/dev/null; then
			say "${tool%%:*}: no package in this distribution's archives; ${tool#*:} will skip"
		fi
	done
}

# The prometheus package enables and starts a server of its own (every address, port 9090,
# scraping itself into /var/lib/prometheus); the tests start theirs on a free loopback port.
# So the packaged service is stopped and disabled, once: when this run installed it.
disable_packaged_prometheus() {
	[ -d /run/systemd/system ] || return 0
	systemctl disable --now prometheus.service >/dev/null 2>&1 || true
	say "prometheus: stopped and disabled the package's own service (the tests start theirs)"
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
perf=$(perf_package)
[ -n "$perf" ] && packages+=("$perf")
mapfile -t todo < <(missing_packages)
if [ "${#todo[@]}" -gt 0 ]; then
	say "apt-get update (to install: ${todo[*]})"
	apt-get update -qq
	mapfile -t todo < <(missing_packages)
	apt-get install -y -qq --no-install-recommends "${todo[@]}" >/dev/null
	say "installed: ${todo[*]}"
	[[ " ${todo[*]} " == *" prometheus "* ]] && disable_packaged_prometheus
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
