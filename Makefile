# SPDX-License-Identifier: GPL-2.0-or-later
# qbackup developer entry points (fresh Debian with Python 3.11):
#   make demo   set up .venv, then run the end-to-end demo in demo-out/
#   make test   set up .venv, then run the whole test suite
# Package builds use the install-* targets of install.mk.

VENV_PYTHON := .venv/bin/python

.PHONY: all setup demo test clean

all: test

setup:
	./scripts/setup.sh

demo: setup
	$(VENV_PYTHON) -m qbackup_sim.demo demo-out

test: setup
	$(VENV_PYTHON) -m pyflakes dom0/qbackup vm-service/qbackupd sim/qbackup_sim bench tests
	$(VENV_PYTHON) -m pytest -q

clean:
	if [ -f demo-out/inventory.json ]; then $(VENV_PYTHON) -m qbackup_sim stop demo-out; fi
	rm -rf demo-out .pytest_cache

include install.mk
