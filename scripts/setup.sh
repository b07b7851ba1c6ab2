#!/bin/sh
# Set up a development/test environment on a fresh Debian 12 machine: the
# system tools the tests and benchmarks use, and three venvs, each with the
# test tools (requirements-dev.txt):
#   .venv             current releases of the runtime libraries; the three
#                     packages installed editable (make test, make demo)
#   .venv-floor-dom0  dom0's floors (requirements-floor.txt: what Fedora 37,
#                     Qubes R4.2's dom0, ships) from PyPI; qbackup and the sim
#   .venv-floor-vm    the backup qube's floors: Debian 12's own python3 with
#                     Debian's python3-trio and python3-msgpack; qbackupd
# The two sides' floors differ (msgpack), as their machines do, so each has
# its own venv. A venv is brought up to date when a file it is made from is
# newer than its stamp; a floor venv is made anew, so that nothing newer
# than a floor can stay behind in it.
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
# dom0's msgpack floor has no wheel for Python 3.11: pip builds its C extension
APT_PACKAGES="$APT_PACKAGES g++ python3-dev"
# the backup qube's floor venv
APT_PACKAGES="$APT_PACKAGES python3-venv python3-trio python3-msgpack"
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

PIP_OPTIONS="-q --disable-pip-version-check"

# stale VENV FILE...: whether VENV is missing or older than one of the FILEs
stale() {
    venv=$1
    shift
    [ -f "$venv/.qbackup-setup" ] || return 0
    for file in "$@"; do
        [ "$file" -nt "$venv/.qbackup-setup" ] && return 0
    done
    return 1
}

# floor_pins SIDE: that side's NAME==VERSION lines of requirements-floor.txt
floor_pins() {
    sed -n "s/^$1 //p" requirements-floor.txt
}

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
if stale .venv requirements-dev.txt dom0/pyproject.toml vm-service/pyproject.toml sim/pyproject.toml; then
    .venv/bin/pip install $PIP_OPTIONS -r requirements-dev.txt
    # with their dependencies: the current releases of the runtime libraries
    .venv/bin/pip install $PIP_OPTIONS --no-build-isolation -e ./dom0 -e ./vm-service -e ./sim
    touch .venv/.qbackup-setup
fi

if stale .venv-floor-dom0 requirements-floor.txt requirements-dev.txt dom0/pyproject.toml sim/pyproject.toml; then
    echo "setup: making .venv-floor-dom0 (dom0's floors: $(floor_pins dom0 | tr '\n' ' '))" >&2
    rm -rf .venv-floor-dom0
    "$PY" -m venv .venv-floor-dom0
    floor_pins dom0 >.venv-floor-dom0/floors.txt
    .venv-floor-dom0/bin/pip install $PIP_OPTIONS -r requirements-dev.txt
    # the packages' dependencies, at exactly the floors
    .venv-floor-dom0/bin/pip install $PIP_OPTIONS --no-build-isolation -c .venv-floor-dom0/floors.txt \
        -e ./dom0 -e ./sim
    touch .venv-floor-dom0/.qbackup-setup
fi

if stale .venv-floor-vm requirements-floor.txt requirements-dev.txt vm-service/pyproject.toml; then
    echo "setup: making .venv-floor-vm (Debian's python3-trio and python3-msgpack)" >&2
    rm -rf .venv-floor-vm
    /usr/bin/python3 -m venv --system-site-packages .venv-floor-vm
    .venv-floor-vm/bin/pip install $PIP_OPTIONS -r requirements-dev.txt
    # no dependencies from PyPI: the daemon runs on Debian's packages, and
    # tests/test_floors.py checks that they are the floors
    .venv-floor-vm/bin/pip install $PIP_OPTIONS --no-deps --no-build-isolation -e ./vm-service
    touch .venv-floor-vm/.qbackup-setup
fi

# The Qubes R4.2 sources (qubesd, qubesadmin, qrexec) for the tests that run
# qbackup's adapter against the real Admin API (tests/qubes_r42.py). Test
# only: unpacked into build/qubes-r4.2 and installed editable (qubesd finds
# its extensions and storage drivers through entry points) into .venv and
# .venv-floor-dom0, where dom0's suite runs.
QUBES_SOURCES=${QBACKUP_QUBES_SOURCES:-../shared/vendor/qubes-r4.2}
unpacked=build/qubes-r4.2
if [ -d "$QUBES_SOURCES" ]; then
    qstamp=$unpacked/.qbackup-setup
    if [ ! -f "$qstamp" ] || [ -n "$(find "$QUBES_SOURCES" -name '*.tar.gz' -newer "$qstamp")" ] \
       || [ requirements-qubes.txt -nt "$qstamp" ]; then
        rm -rf "$unpacked"
        mkdir -p "$unpacked"
        for t in "$QUBES_SOURCES"/*.tar.gz; do
            tar -xzf "$t" -C "$unpacked"
        done
        rm -f .venv/.qbackup-qubes .venv-floor-dom0/.qbackup-qubes
        touch "$qstamp"
    fi
    for venv in .venv .venv-floor-dom0; do
        [ -f "$venv/.qbackup-qubes" ] && continue
        "$venv/bin/pip" install $PIP_OPTIONS -r requirements-qubes.txt
        "$venv/bin/pip" install $PIP_OPTIONS --no-deps --no-build-isolation \
            -e "$unpacked/qubes-core-admin" -e "$unpacked/qubes-core-admin-client" \
            -e "$unpacked/qubes-core-qrexec"
        touch "$venv/.qbackup-qubes"
    done
else
    echo "setup: no Qubes R4.2 sources at $QUBES_SOURCES (set QBACKUP_QUBES_SOURCES):" \
         "the real-Admin-API tests will skip (and fail in CI)" >&2
fi
