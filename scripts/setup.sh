#!/bin/sh
# Set up a development/test environment on a fresh Debian machine:
# system tools the tests and benchmarks use, and a venv (.venv) with the
# runtime and test dependencies and the three packages installed editable.
set -eu
cd "$(dirname "$0")/.."

APT_PACKAGES="e2fsprogs btrfs-progs xfsprogs thin-provisioning-tools util-linux zstd coreutils"
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
