# Install targets used by rpm_spec/*.spec.in and debian/rules.
# Included from Makefile. DESTDIR is the staging root of a package build.
DESTDIR ?=
PREFIX ?= /usr
PYTHON ?= python3
PIP_INSTALL = $(PYTHON) -m pip install --no-deps --no-build-isolation --no-index \
	--disable-pip-version-check --ignore-installed --root="$(DESTDIR)/" --prefix="$(PREFIX)"

.PHONY: install-dom0 install-vm

# dom0: the qbackup client, its policy file, the job units and the
# qubes.BackupRequest service.
install-dom0:
	$(PIP_INSTALL) ./dom0
	install -d "$(DESTDIR)/etc/qubes/policy.d" "$(DESTDIR)/var/lib/qbackup" \
		"$(DESTDIR)/usr/lib/systemd/system" "$(DESTDIR)/etc/qubes-rpc"
	install -m 0664 policy/50-qbackup.policy "$(DESTDIR)/etc/qubes/policy.d/50-qbackup.policy"
	install -m 0644 dom0/systemd/qbackup-job@.service dom0/systemd/qbackup-job@.timer \
		"$(DESTDIR)/usr/lib/systemd/system/"
	install -m 0755 qubes-rpc/qubes.BackupRequest "$(DESTDIR)/etc/qubes-rpc/qubes.BackupRequest"

# Backup qube's template: the daemon, its unit and the qrexec socket service link.
install-vm:
	$(PIP_INSTALL) ./vm-service
	install -d "$(DESTDIR)/usr/lib/systemd/system" "$(DESTDIR)/etc/qubes-rpc"
	install -m 0644 vm-service/systemd/qbackupd.service "$(DESTDIR)/usr/lib/systemd/system/qbackupd.service"
	ln -sfn /run/qbackupd/qubes.BackupChunk "$(DESTDIR)/etc/qubes-rpc/qubes.BackupChunk"
