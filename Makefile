# ebpf-hostrouting: the two commands, and a clean-up.
#
#   sudo make demo          provision, then benchmark legacy vs eBPF (quick)
#   sudo make test          provision (with test tools), then the test suite
#   sudo make test PYTEST_ARGS='tests/system/test_doctor.py -x'
#   sudo make clean-labs    remove every lab, also after a crash
#
# All need root: provisioning uses apt-get, labs are network namespaces, and
# programs are loaded into the kernel. Provisioning is idempotent and takes a
# couple of seconds when nothing is missing, so demo and test run it each time.
#
# `make test` passes --test-tools to scripts/provision.sh: it also installs
# vagrant and prometheus (where the distro packages them) for
# tests/system/test_vagrantfile.py and tests/lab/test_metrics.py, which a demo
# machine does not need.
#
# PYTEST_STATUS_FILE (optional): `make test` writes pytest's exit status there,
# because make itself reports any failure as 2 (.ci/run uses it to tell "no
# tests collected", pytest's 5, from other failures).

REPO := $(patsubst %/,%,$(dir $(abspath $(lastword $(MAKEFILE_LIST)))))
VENV := $(REPO)/.venv
PROVISION := $(REPO)/scripts/provision.sh
PYTEST_ARGS ?=
PYTEST_STATUS_FILE ?=

.PHONY: demo test clean-labs require-root

demo: require-root
	$(PROVISION)
	cd $(REPO) && $(VENV)/bin/hostrouting bench --quick

# pytest takes its paths from PYTEST_ARGS, else testpaths (tests/) in pyproject.toml.
# Two workers: the tests that build labs (marked slow) run one after the other on one of them
# (tests/conftest.py groups them), the quick ones beside them on the other.
test: require-root
	$(PROVISION) --test-tools
	@cd $(REPO) && { $(VENV)/bin/pytest -n 2 --dist loadgroup $(PYTEST_ARGS); status=$$?; \
	  $(if $(PYTEST_STATUS_FILE),echo $$status > '$(PYTEST_STATUS_FILE)';) \
	  if [ $$status -eq 5 ]; then echo "make test: pytest collected no tests (exit 5)" >&2; fi; \
	  exit $$status; }

clean-labs: require-root
	$(VENV)/bin/hostrouting lab down --all

require-root:
	@if [ "$$(id -u)" -ne 0 ]; then \
	  echo "make $(or $(MAKECMDGOALS),demo): must run as root (apt-get, network namespaces, BPF): try sudo make $(MAKECMDGOALS)" >&2; \
	  exit 1; fi
