# Every target sets itself up: a fresh machine needs only python3 (>= 3.11) and make.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test bench bench-compare cassettes clean vcsim vsphere-deps

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "backupd needs Python >= 3.11")'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

## make demo: build a lab of ext4-image VMs, back them up (full, then incremental), restore and check
demo: $(STAMP)
	$(PY) -m backupd.demo --lab demo-lab

# The vSphere simulator tests need Go and the govmomi source (two Debian packages). Installed
# when missing and possible (root with apt-get); otherwise said, and those tests skip.
VSPHERE_DEBS := golang-go golang-github-vmware-govmomi-dev
GOVMOMI_SRC := /usr/share/gocode/src/github.com/vmware/govmomi/simulator
vsphere-deps:
	@if command -v go >/dev/null 2>&1 && test -d $(GOVMOMI_SRC); then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "make: installing $(VSPHERE_DEBS) for the vSphere simulator tests"; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(VSPHERE_DEBS) >/dev/null \
		|| { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(VSPHERE_DEBS) >/dev/null; } \
		|| echo "make: could not install $(VSPHERE_DEBS); the vSphere simulator tests will skip" >&2; \
	else \
		echo "make: the vSphere simulator tests will skip: install $(VSPHERE_DEBS) (apt-get install -y $(VSPHERE_DEBS))" >&2; \
	fi

## make test: the whole test suite (installs the vSphere simulator's Debian packages when it can)
test: $(STAMP) vsphere-deps
	$(PY) -m pytest -q

## make vcsim: build and run the vSphere simulator in the foreground with contrib/vcsim/example-spec.json (Ctrl-C stops; VCSIM_ARGS=-tls for https)
VCSIM_LISTEN ?= 127.0.0.1:8989
vcsim: $(STAMP) vsphere-deps
	@rm -rf .build/vcsim-datastore && mkdir -p .build/vcsim-datastore
	@launcher="$$($(PY) -c 'import sys; sys.path.insert(0, "tests"); import vsphere_sim; print(vsphere_sim.build_launcher())')" \
		&& exec "$$launcher" -listen $(VCSIM_LISTEN) -spec contrib/vcsim/example-spec.json -dir .build/vcsim-datastore $(VCSIM_ARGS)

## make bench: throughput, incremental speed, memory and stop latency, side by side with restic; then the daemon under 100 jobs x 10 VMs due at one minute, on SQLite and PostgreSQL; then backup proxies (dispatch rate, 1 vs 2 proxies vs in-process, stop latency; skipped without PostgreSQL and RabbitMQ); then the vSphere transport (simulator over http and https beside the simulated provider)
bench: $(STAMP) vsphere-deps
	$(PY) bench/run.py --lab bench-lab
	$(PY) bench/daemon.py --lab bench-lab/daemon
	$(PY) bench/proxies.py --lab bench-lab/proxies
	@if $(PY) -c 'import sys; sys.path.insert(0, "tests"); import vsphere_sim; sys.exit(1 if vsphere_sim.unavailable_reason() else 0)'; \
	then $(PY) bench/vsphere.py --lab bench-lab; \
	else echo "make bench: bench/vsphere.py skipped: install $(VSPHERE_DEBS) for the vSphere transport figures" >&2; fi

## make bench-compare BASELINE=REV: the bench's backupd figures of commit REV and of the working tree, in one sitting
bench-compare: $(STAMP)
	$(PY) bench/compare.py --baseline $(BASELINE) --lab bench-lab

## make cassettes: re-record the vSphere cassettes in fixtures/cassettes/ against the simulator launcher (or BACKUPD_VC_URL)
cassettes: $(STAMP)
	$(PY) tests/vsphere/record_cassettes.py

clean:
	rm -rf $(VENV) demo-lab bench-lab .pytest_cache .build
