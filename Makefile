# Every target sets itself up: a fresh machine needs only python3 (>= 3.11) and make.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test bench bench-compare cassettes clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "backupd needs Python >= 3.11")'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

## make demo: build a lab of ext4-image VMs, back them up (full, then incremental), restore and check
demo: $(STAMP)
	$(PY) -m backupd.demo --lab demo-lab

## make test: the whole test suite
test: $(STAMP)
	$(PY) -m pytest -q

## make bench: throughput, incremental speed, memory and stop latency, side by side with restic; then the daemon under 100 jobs x 10 VMs due at one minute, on SQLite and PostgreSQL
bench: $(STAMP)
	$(PY) bench/run.py --lab bench-lab
	$(PY) bench/daemon.py --lab bench-lab/daemon

## make bench-compare BASELINE=REV: the bench's backupd figures of commit REV and of the working tree, in one sitting
bench-compare: $(STAMP)
	$(PY) bench/compare.py --baseline $(BASELINE) --lab bench-lab

## make cassettes: re-record the vSphere cassettes in fixtures/cassettes/ against the simulator launcher (or BACKUPD_VC_URL)
cassettes: $(STAMP)
	$(PY) tests/vsphere/record_cassettes.py

clean:
	rm -rf $(VENV) demo-lab bench-lab .pytest_cache
