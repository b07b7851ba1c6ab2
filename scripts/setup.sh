#!/bin/sh
# Set up a development/test environment on a fresh Debian machine:
# system tools the tests and benchmarks use, and a venv (.venv) with the
# runtime and test dependencies and the three packages installed editable.
set -eu
cd "$(dirname "$0")/.."

APT_PACKAGES="e2fsprogs btrfs-progs xfsprogs thin-provisioning-tools util-linux zstd coreutils"
# Package builds and their checks (make rpm, make deb, make lint-packages,
# tests/packaging): rpm's and Debian's build tools, the linters, systemd's
# offline tools and systemd-nspawn, in which the deb's daemon runs under
# systemd on Debian's python3-trio and python3-msgpack.
APT_PACKAGES="$APT_PACKAGES git make cpio rpm rpmlint lintian debhelper dh-python pybuild-plugin-pyproject"
APT_PACKAGES="$APT_PACKAGES python3-all python3-setuptools python3-pip python3-wheel python3-packaging"
APT_PACKAGES="$APT_PACKAGES systemd systemd-container python3-trio python3-msgpack"
[ "${QBACKUP_BENCH:-}" = 1 ] && APT_PACKAGES="$APT_PACKAGES restic borgbackup"

missing=""
for p in $APT_PACKAGES; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    echo "setup: installing Debian packages:$missing" >&2
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
stamp=.venv/.qbackup-setup
if [ ! -f "$stamp" ] || [ requirements-dev.txt -nt "$stamp" ] \
   || [ dom0/pyproject.toml -nt "$stamp" ] || [ vm-service/pyproject.toml -nt "$stamp" ] \
   || [ sim/pyproject.toml -nt "$stamp" ]; then
    .venv/bin/pip install -q --disable-pip-version-check -r requirements-dev.txt
    .venv/bin/pip install -q --disable-pip-version-check --no-deps --no-build-isolation \
        -e ./dom0 -e ./vm-service -e ./sim
    touch "$stamp"
fi

# The Qubes R4.2 sources (qubesd, qubesadmin, qrexec) for the tests that run
# qbackup's adapter against the real Admin API (tests/qubes_r42.py). Test
# only: unpacked into build/qubes-r4.2 and installed editable (qubesd finds
# its extensions and storage drivers through entry points).
QUBES_SOURCES=${QBACKUP_QUBES_SOURCES:-../shared/vendor/qubes-r4.2}
unpacked=build/qubes-r4.2
if [ -d "$QUBES_SOURCES" ]; then
    qstamp=$unpacked/.qbackup-setup
    if [ ! -f "$qstamp" ] || [ -n "$(find "$QUBES_SOURCES" -name '*.tar.gz' -newer "$qstamp")" ] \
       || [ requirements-qubes.txt -nt "$qstamp" ] || [ ! -f .venv/.qbackup-qubes ]; then
        rm -rf "$unpacked"
        mkdir -p "$unpacked"
        for t in "$QUBES_SOURCES"/*.tar.gz; do
            tar -xzf "$t" -C "$unpacked"
        done
        .venv/bin/pip install -q --disable-pip-version-check -r requirements-qubes.txt
        .venv/bin/pip install -q --disable-pip-version-check --no-deps --no-build-isolation \
            -e "$unpacked/qubes-core-admin" -e "$unpacked/qubes-core-admin-client" \
            -e "$unpacked/qubes-core-qrexec"
        touch "$qstamp" .venv/.qbackup-qubes
    fi
else
    echo "setup: no Qubes R4.2 sources at $QUBES_SOURCES (set QBACKUP_QUBES_SOURCES):" \
         "the real-Admin-API tests will skip (and fail in CI)" >&2
fi
