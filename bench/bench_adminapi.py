#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""How many Admin API calls reading the qubes costs.

Builds N qubes (default 50) in qubesd R4.2's real Admin API, run in this
process (tests/qubes_r42.py): one TemplateVM in ten with the features a
Fedora template carries, the rest AppVMs with 0-3 features each, every qube
with a tag. Then counts, per method, the calls `QubesAdminBackend.list_qubes`
makes through the real qubesadmin, and, for comparison, the calls of the
straightforward way the adapter used before (qubesadmin's defaults: cache
off, one property.Get per property, one volume.Info per Volume attribute).

Run by hand: `.venv/bin/python bench/bench_adminapi.py [--qubes 50]`.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from workload import machine  # noqa: E402

import qubes_r42  # noqa: E402
from qbackup.qubes import QubesAdminBackend  # noqa: E402

def naive_list(app) -> None:
    """What the adapter did before (commit dee32d1): qubesadmin's defaults
    throughout (cache off), volume attributes read one by one."""
    for vm in app.domains:
        if vm.klass == "AdminVM":
            continue
        for name in vm.property_list():
            if not vm.property_is_default(name):
                getattr(vm, name)
        for vol in vm.volumes.values():
            pool = app.pools[vol.pool]
            (pool.driver, pool.config, vol.vid, vol.pool, vol.size, vol.rw,
             vol.save_on_stop, vol.snap_on_start, vol.revisions_to_keep)
        dict(vm.features.items())
        sorted(vm.tags)


def measure(qubesd, fn) -> tuple[collections.Counter, float]:
    qubesd.calls.clear()
    started = time.perf_counter()
    fn()
    return collections.Counter(m for m, _, _ in qubesd.calls), time.perf_counter() - started


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--qubes", type=int, default=50)
    args = ap.parse_args()
    missing = qubes_r42.missing()
    if missing:
        print(f"cannot run: {missing}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        qubesd = qubes_r42.Testbed(Path(tmp))
        try:
            features = qubesd.populate(args.qubes)
            ours, ours_s = measure(qubesd, lambda: QubesAdminBackend(qubesd.client()).list_qubes())
            naive, naive_s = measure(qubesd, lambda: naive_list(qubesd.client()))
        finally:
            qubesd.close()
    n = args.qubes
    print(f"{n} qubes ({n // 10} templates with {len(qubes_r42.TEMPLATE_FEATURES)} features, "
          f"{features} features in all); {machine()}\n")
    print("| Admin API call | qbackup | per qube | before |")
    print("|---|---|---|---|")
    for method in sorted(set(ours) | set(naive), key=lambda m: (-ours[m], m)):
        print(f"| `{method}` | {ours[method]} | {ours[method] / n:.2f} | {naive[method]} |")
    total, before = sum(ours.values()), sum(naive.values())
    print(f"| **all** | **{total}** | **{total / n:.2f}** | {before} ({before / n:.1f} "
          f"per qube) |")
    print(f"\nin-process wall time: {ours_s:.2f} s (before: {naive_s:.2f} s); on a real "
          "dom0 each call is also a round trip to qubesd over its socket")
    return 0


if __name__ == "__main__":
    sys.exit(main())
