# SPDX-License-Identifier: GPL-2.0-or-later
# qbackup developer entry points (fresh Debian 12 with Python 3.11):
#   make demo   set up the venvs, then run the end-to-end demo in demo-out/
#   make test   set up the venvs, then run test-current and test-floor side by
#               side (one per core; each one's output is printed whole when it
#               ends, and make fails if either fails):
#     test-current  pyflakes, every suite on current library releases and
#                   the mutation check of dom0's trust modules
#                   (docs/INVARIANTS.md)
#     test-floor    the suites on the oldest library versions qbackup
#                   supports (requirements-floor.txt): what Qubes R4.2's
#                   dom0 (Fedora 37) and a Debian 12 backup qube ship
#   make rpm    dom0 and backup-qube (template) rpms in build/rpm/RPMS/noarch/
#   make deb    backup-qube (template) deb in build/deb/
#   make lint-packages   rpmlint and lintian on what rpm and deb built
# Package builds use the install-* targets of install.mk.

VENV_PYTHON := .venv/bin/python
FLOOR_DOM0_PYTHON := .venv-floor-dom0/bin/python
FLOOR_VM_PYTHON := .venv-floor-vm/bin/python
VERSION := $(shell cat version)
BUILDDIR ?= build
# Package builds use the distribution's tools and Python only, never a venv
# or pyenv interpreter that happens to come first in PATH.
SYSTEM_PATH := /usr/sbin:/usr/bin:/sbin:/bin
TARBALL = $(BUILDDIR)/qbackup-$(VERSION).tar.gz
RPM_TOPDIR = $(abspath $(BUILDDIR))/rpm
DEB_DIR = $(abspath $(BUILDDIR))/deb
# A host whose rpm database does not know rpm itself (Debian's `rpm`) has no
# Fedora build dependencies to check and no Fedora macros: see macros.fallback.
FOREIGN_RPM_HOST = $(shell rpm -q --quiet rpm 2>/dev/null || echo yes)
RPMBUILD_FLAGS = $(if $(FOREIGN_RPM_HOST),--nodeps --load=$(CURDIR)/rpm_spec/macros.fallback)

.PHONY: all setup demo test test-current test-floor clean tarball rpm deb packages lint-packages

all: test

setup:
	./scripts/setup.sh

demo: setup
	$(VENV_PYTHON) -m qbackup_sim.demo demo-out

test: setup
	$(MAKE) --no-print-directory -j2 --output-sync=target test-current test-floor

test-current: setup
	$(VENV_PYTHON) -m pyflakes dom0/qbackup vm-service/qbackupd sim/qbackup_sim bench tests scripts
	$(VENV_PYTHON) -m pytest -q
	$(VENV_PYTHON) scripts/mutants.py

# dom0's and the integration suite on dom0's floors, with every daemon they
# start on the backup qube's (the two sides' msgpack floors differ, as their
# machines do: one venv each); then the daemon's suite on the backup qube's.
# tests/test_floors.py checks that each run has exactly its side's floors.
test-floor: setup
	QBACKUP_FLOOR=dom0 QBACKUP_SIM_DAEMON_PYTHON=$(CURDIR)/$(FLOOR_VM_PYTHON) \
		$(FLOOR_DOM0_PYTHON) -m pytest -q tests/test_floors.py tests/dom0 tests/integration
	QBACKUP_FLOOR=vm $(FLOOR_VM_PYTHON) -m pytest -q tests/test_floors.py tests/daemon

# The source tarball: the files git tracks (as they are in the work tree),
# under qbackup-VERSION/, reproducible (sorted, owner 0, last commit's time).
tarball:
	@git rev-parse --git-dir >/dev/null 2>&1 || { echo "make: packages are built from a git checkout (the files git tracks)" >&2; exit 1; }
	mkdir -p "$(BUILDDIR)"
	git ls-files -z | tar --null -T - --ignore-failed-read --sort=name --owner=0 --group=0 --numeric-owner \
		--mtime="@$$(git log -1 --format=%ct)" --transform 's,^,qbackup-$(VERSION)/,S' -cf - | gzip -n > "$(TARBALL)"

rpm: tarball
	rm -rf "$(RPM_TOPDIR)"
	mkdir -p "$(RPM_TOPDIR)/SOURCES" "$(RPM_TOPDIR)/SPECS"
	cp "$(TARBALL)" vm-service/systemd/qbackupd.sysusers "$(RPM_TOPDIR)/SOURCES/"
	sed 's/@VERSION@/$(VERSION)/g' rpm_spec/qbackup.spec.in > "$(RPM_TOPDIR)/SPECS/qbackup.spec"
	PATH=$(SYSTEM_PATH) rpmbuild --quiet -ba --define "_topdir $(RPM_TOPDIR)" $(RPMBUILD_FLAGS) \
		"$(RPM_TOPDIR)/SPECS/qbackup.spec"
	@ls -1 "$(RPM_TOPDIR)"/RPMS/noarch/*.rpm "$(RPM_TOPDIR)"/SRPMS/*.rpm

deb: tarball
	@changelog=$$(dpkg-parsechangelog -l debian/changelog -S Version) && [ "$$changelog" = "$(VERSION)" ] || { \
		echo "make: debian/changelog is at $$changelog but version says $(VERSION): add a changelog entry (dch -v $(VERSION))" >&2; exit 1; }
	rm -rf "$(DEB_DIR)"
	mkdir -p "$(DEB_DIR)"
	tar -xzf "$(TARBALL)" -C "$(DEB_DIR)"
	cd "$(DEB_DIR)/qbackup-$(VERSION)" && PATH=$(SYSTEM_PATH) dpkg-buildpackage --no-sign -us -uc
	@ls -1 "$(DEB_DIR)"/*.deb "$(DEB_DIR)"/*.dsc

packages: rpm deb

# No errors, no warnings: each warning that remains true is explained where
# it is silenced (rpm_spec/rpmlint.toml, debian/qbackup-vm.lintian-overrides).
lint-packages:
	PATH=$(SYSTEM_PATH) rpmlint --strict -c rpm_spec/rpmlint.toml "$(RPM_TOPDIR)"/SPECS/qbackup.spec "$(RPM_TOPDIR)"/RPMS/noarch/*.rpm "$(RPM_TOPDIR)"/SRPMS/*.rpm
	PATH=$(SYSTEM_PATH) lintian --fail-on error,warning --info --display-info "$(DEB_DIR)"/*.changes

clean:
	if [ -f demo-out/inventory.json ]; then $(VENV_PYTHON) -m qbackup_sim stop demo-out; fi
	rm -rf demo-out .pytest_cache "$(BUILDDIR)/rpm" "$(BUILDDIR)/deb" "$(BUILDDIR)/pyinstall" "$(TARBALL)"

include install.mk
