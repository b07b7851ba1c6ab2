# SPDX-License-Identifier: GPL-2.0-or-later
# Install targets used by rpm_spec/qbackup.spec.in and debian/rules.
# Included from Makefile. DESTDIR is the staging root of a package build.
#
#   install-dom0          the qbackup client and dom0's qrexec policy file
#   install-vm            the qbackupd daemon and its files (below)
#   install-vm-files      everything of install-vm but the Python package
#                         (debian/rules installs that with pybuild)
#
# The Python packages go to PYTHON_SITELIB, by default the distribution's
# posix_prefix layout (/usr/lib/python3.X/site-packages, Fedora's), never
# Debian's /usr/local default: the rpm spec passes %{python3_sitelib}.
DESTDIR ?=
PREFIX ?= /usr
PYTHON ?= python3
BINDIR ?= $(PREFIX)/bin
MANDIR ?= $(PREFIX)/share/man
UNITDIR ?= $(PREFIX)/lib/systemd/system
PRESETDIR ?= $(PREFIX)/lib/systemd/system-preset
SYSUSERSDIR ?= $(PREFIX)/lib/sysusers.d
QUBESRPCDIR ?= /etc/qubes-rpc
# The socket qbackupd.socket listens on (ListenStream=), linked from QUBESRPCDIR.
QUBESRPC_SOCKET = /run/qbackupd/qubes.BackupChunk
POLICYDIR ?= /etc/qubes/policy.d
BUILDDIR ?= build
PY_INSTALLER ?= make
PYTHON_SITELIB ?= $(shell $(PYTHON) -c 'import sysconfig; print(sysconfig.get_path("purelib", "posix_prefix", {"base": "$(PREFIX)"}))')

.PHONY: install-dom0 install-vm install-vm-files

# $(call install_python,SOURCE_DIR,IMPORT_NAME,SCRIPT): build SOURCE_DIR (no
# network, no build isolation: the build tools come from the distribution),
# install the package and its dist-info into PYTHON_SITELIB and its console
# script into BINDIR. RECORD (wrong paths after the move) and direct_url.json
# (the build directory) are dropped; INSTALLER names the package manager.
define install_python
	rm -rf "$(1)/build" "$(BUILDDIR)/pyinstall/$(1)"
	$(PYTHON) -m pip install --no-deps --no-build-isolation --no-index --no-compile \
		--disable-pip-version-check --root-user-action=ignore --no-warn-script-location --quiet \
		--target="$(BUILDDIR)/pyinstall/$(1)" ./$(1)
	rm -rf "$(1)/build"
	for d in "$(BUILDDIR)"/pyinstall/$(1)/$(2)-*.dist-info; do \
		rm -f "$$d/RECORD" "$$d/direct_url.json" "$$d/REQUESTED" && echo "$(PY_INSTALLER)" > "$$d/INSTALLER" || exit 1; \
	done
	install -d "$(DESTDIR)$(PYTHON_SITELIB)" "$(DESTDIR)$(BINDIR)"
	cp -R "$(BUILDDIR)/pyinstall/$(1)/$(2)" "$(BUILDDIR)"/pyinstall/$(1)/$(2)-*.dist-info "$(DESTDIR)$(PYTHON_SITELIB)/"
	sed '1s|^#!.*|#!$(PYTHON) -s|' "$(BUILDDIR)/pyinstall/$(1)/bin/$(3)" > "$(BUILDDIR)/pyinstall/$(3).script"
	install -m 0755 "$(BUILDDIR)/pyinstall/$(3).script" "$(DESTDIR)$(BINDIR)/$(3)"
endef

# dom0: the qbackup client, its policy file, the job units and the
# qubes.BackupRequest service.
install-dom0:
	$(call install_python,dom0,qbackup,qbackup)
	install -d "$(DESTDIR)$(POLICYDIR)" "$(DESTDIR)/var/lib/qbackup" "$(DESTDIR)$(UNITDIR)" "$(DESTDIR)$(QUBESRPCDIR)"
	install -m 0664 policy/50-qbackup.policy "$(DESTDIR)$(POLICYDIR)/50-qbackup.policy"
	install -m 0644 dom0/systemd/qbackup-job@.service dom0/systemd/qbackup-job@.timer "$(DESTDIR)$(UNITDIR)/"
	install -m 0755 qubes-rpc/qubes.BackupRequest "$(DESTDIR)$(QUBESRPCDIR)/qubes.BackupRequest"

# Backup qube's template: the daemon, its units (the socket service and the
# scheduled garbage collection), user, preset, manual page
# and the qrexec socket service link.
install-vm: install-vm-files
	$(call install_python,vm-service,qbackupd,qbackupd)

install-vm-files:
	install -d "$(DESTDIR)$(UNITDIR)" "$(DESTDIR)$(PRESETDIR)" "$(DESTDIR)$(SYSUSERSDIR)" \
		"$(DESTDIR)$(MANDIR)/man8" "$(DESTDIR)$(QUBESRPCDIR)"
	install -m 0644 vm-service/systemd/qbackupd.socket vm-service/systemd/qbackupd.service \
		vm-service/systemd/qbackupd-gc.service vm-service/systemd/qbackupd-gc.timer "$(DESTDIR)$(UNITDIR)/"
	install -m 0644 vm-service/systemd/70-qbackupd.preset "$(DESTDIR)$(PRESETDIR)/70-qbackupd.preset"
	install -m 0644 vm-service/systemd/qbackupd.sysusers "$(DESTDIR)$(SYSUSERSDIR)/qbackupd.conf"
	install -m 0644 man/qbackupd.8 "$(DESTDIR)$(MANDIR)/man8/qbackupd.8"
	ln -sfn $(QUBESRPC_SOCKET) "$(DESTDIR)$(QUBESRPCDIR)/qubes.BackupChunk"
