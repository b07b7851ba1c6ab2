# SPDX-License-Identifier: GPL-2.0-or-later
"""lvm_thin volumes through the whole command line and the real adapter, on
qubesd R4.2's own lvm driver (tests/qubes_r42.py: the stand-in lvm keeps
thin LVs as sparse files with a block map; qubesd starts and stops volumes
with its real code, renames, then blkdiscards and removes old revisions).

Every lvm / dmsetup / thin_delta call goes through qbackup's tool runner,
here `ToolStandIn`: lvm goes to the stand-in, thin_delta is the real tool
on metadata built by the real thin_restore from the stand-in's pools."""

from __future__ import annotations

import json
import os
import random

import pytest

from qbackup import cli, copies, tools
from qbackup.qubes import QubesAdminBackend
from qbackup.volume import VolumeFile

pytestmark = pytest.mark.qubesd

MiB = 1 << 20
CS = 256 << 10
VG = "qubes_dom0"
PRIVATE = f"{VG}/vm-work-private"


@pytest.fixture
def bed(qubesd, monkeypatch, tmp_path):
    """An app qube `work` whose private volume is in an lvm_thin pool that
    keeps no revision (a shutdown discards the old volume at once), and the
    backup qube."""
    from qubes_r42 import ToolStandIn, reachable_daemon
    runner = ToolStandIn(qubesd.lvm, tmp_path)
    monkeypatch.setattr(tools, "current", runner)
    monkeypatch.setattr(copies, "DEV_DIR", str(qubesd.lvm.dev))
    qubesd.add_pool("vm-pool", "lvm_thin", volume_group=VG, thin_pool="vm-pool",
                    revisions_to_keep=0)
    qubesd.add_qube("TemplateVM", "fedora", label="black")
    qubesd.add_qube("AppVM", "backup", template="fedora", label="black")
    reply = qubesd.handle("admin.vm.CreateInPool.AppVM", "dom0", "fedora",
                          b"name=work label=red pool:private=vm-pool")
    assert reply.startswith(b"0\0"), reply
    qubesd.lvm.write(PRIVATE, 0, random.Random(5).randbytes(4 * MiB))
    (tmp_path / "pw").write_text("lvm\n")
    with reachable_daemon(monkeypatch, tmp_path):
        yield qubesd, runner, tmp_path


def qbackup(bed, *argv, expect=0):
    qubesd, _, tmp_path = bed
    code = cli.run([*argv, "--passphrase-file", str(tmp_path / "pw")],
                   backend=lambda: QubesAdminBackend(qubesd.client()),
                   config={"backup_vm": "backup", "state_dir": str(tmp_path / "state")})
    assert code == expect


def backup(bed, capfd, *extra) -> dict:
    qbackup(bed, "backup", "work", "--json", *extra)
    out = capfd.readouterr().out
    return {(r["volume"]): r for r in json.loads(out)["reads"]} | {"_": json.loads(out)}


def same_content(a: str, b: str) -> bool:
    """Byte for byte, reading only where either file has data."""
    with VolumeFile(a) as fa, VolumeFile(b) as fb:
        if fa.size != fb.size:
            return False
        ca, cb = dict(fa.chunks(MiB)), dict(fb.chunks(MiB))
        return all(ca.get(i) == cb.get(i) for i in set(ca) | set(cb))


def restore_matches(bed, lv_file: str) -> None:
    qubesd, _, tmp_path = bed
    out = tmp_path / f"out-{len(os.listdir(tmp_path))}"
    qbackup(bed, "restore", "latest", "--qube", "work", "--to", str(out))
    assert same_content(str(out / "work/private.img"), lv_file)


def our_lvs(qubesd) -> list[str]:
    return sorted(n for n in qubesd.lvm.volumes() if n.split("/")[1].startswith("qbackup-"))


def test_incremental_reads_only_what_thin_delta_reports(bed, capfd):
    qubesd, runner, _ = bed
    qbackup(bed, "init", "--scrypt-n", "16384", "--pack-size", "8M")
    capfd.readouterr()
    first = backup(bed, capfd)
    assert first["private"]["read"] == "full"
    assert first["private"]["reason"] == "no base copy yet for this repository"
    [snap_cmd] = [c for c in runner.calls if c[:2] == ["lvm", "lvcreate"]
                  and c[-1] == PRIVATE]
    name = snap_cmd[6].removeprefix("--name=")
    assert snap_cmd == ["lvm", "lvcreate", "--snapshot", "--setactivationskip=n",
                        "--activate=y", "--permission=r", f"--name={name}", "--", PRIVATE]
    assert name.startswith("qbackup-") and name.endswith("-work.private-back")
    assert len(our_lvs(qubesd)) == 1  # kept as the base

    # The qube runs, writes scattered 4 KiB blocks, shuts down: qubesd's
    # own commit renames, then blkdiscards and removes the old volume.
    vm = qubesd.app.domains["work"]
    qubesd.run(vm.volumes["private"].start())
    offsets = sorted(random.Random(9).sample(range(0, 4 * MiB, 4096), 12))
    for offset in offsets:
        qubesd.lvm.write(f"{PRIVATE}-snap", offset, os.urandom(4096))
    qubesd.run(vm.volumes["private"].stop())
    discarded = [c for c in qubesd.lvm.commands() if c[0] == "blkdiscard"]
    assert discarded and discarded[-1][-1].startswith(f"/dev/{PRIVATE}-")
    assert discarded[-1][-1].endswith("-back")
    runner.calls.clear()

    second = backup(bed, capfd)
    touched = {o // CS for o in offsets}
    assert second["private"]["read"] == "changed" and second["private"]["reason"] is None
    assert second["private"]["bytes_read"] == len(touched) * CS
    assert second["_"]["chunks_new"] == len(touched)
    # one reserved metadata snapshot for the pool, released; thin_delta -m
    # between the base and the new copy
    dm = [c for c in runner.calls if c[0] in ("dmsetup", "thin_delta")]
    assert [c[4] if c[0] == "dmsetup" else c[:3] for c in dm] == [
        "reserve_metadata_snap", ["thin_delta", "-m", "--snap1"], "release_metadata_snap"]
    assert all(c[2] == "qubes_dom0-vm--pool-tpool" for c in dm if c[0] == "dmsetup")
    assert runner.reserved == set()
    restore_matches(bed, str(qubesd.lvm.dev / PRIVATE))
    # the first copies are gone, the new ones are the bases; qubesd never
    # counts them as its own volumes or revisions
    assert len(our_lvs(qubesd)) == 1
    assert [c[-1].split("/")[1] for c in runner.calls if c[:2] == ["lvm", "lvremove"]] == [name]
    listed = qubesd.handle("admin.pool.volume.List", "dom0", "vm-pool", b"").decode()
    assert "qbackup" not in listed and "vm-work-private" in listed
    assert vm.volumes["private"].revisions == {}
    qbackup(bed, "verify", "--all")


def test_a_shutdown_during_the_read_never_turns_data_into_zeros(bed, capfd, monkeypatch):
    """While the backup reads its copy, the qube shuts down: qubesd renames
    the committed LV away and discards it (revisions_to_keep 0). The copy
    is qbackup's own thin snapshot: the backup holds the data as it was."""
    qubesd, _, tmp_path = bed
    qbackup(bed, "init", "--scrypt-n", "16384", "--pack-size", "8M")
    vm = qubesd.app.domains["work"]
    qubesd.run(vm.volumes["private"].start())
    qubesd.set_running("work")
    qubesd.lvm.write(f"{PRIVATE}-snap", MiB, b"\xff" * MiB)  # not yet committed
    with open(qubesd.lvm.dev / PRIVATE, "rb") as f:
        before = f.read(4 * MiB)
    read = VolumeFile._read
    shutdowns = []

    def read_then_shut_down(self, *args):
        if not shutdowns and "qbackup-" in self.path:
            shutdowns.append(self.path)
            qubesd.set_running("work", False)
            qubesd.run(vm.volumes["private"].stop())
            with open(qubesd.lvm.dev / PRIVATE, "rb") as f:
                f.seek(MiB)
                assert f.read(MiB) == b"\xff" * MiB  # committed: the new state
        return read(self, *args)
    monkeypatch.setattr(VolumeFile, "_read", read_then_shut_down)
    capfd.readouterr()
    backup(bed, capfd)
    assert shutdowns
    assert any(c[0] == "blkdiscard" for c in qubesd.lvm.commands())
    out = tmp_path / "restored"
    qbackup(bed, "restore", "latest", "--qube", "work", "--to", str(out))
    with open(out / "work/private.img", "rb") as f:
        assert f.read(4 * MiB) == before


def test_live_backup_of_a_running_qube(bed, capfd):
    qubesd, runner, tmp_path = bed
    qbackup(bed, "init", "--scrypt-n", "16384", "--pack-size", "8M")
    vm = qubesd.app.domains["work"]
    qubesd.run(vm.volumes["private"].start())
    qubesd.set_running("work")
    qubesd.lvm.write(f"{PRIVATE}-snap", 2 * MiB, b"\x11" * MiB)
    capfd.readouterr()
    shutdown = backup(bed, capfd)
    assert shutdown["private"]["state"] == "shutdown"
    live = backup(bed, capfd, "--live")
    assert live["private"]["state"] == "live"
    assert any(c[:2] == ["lvm", "lvcreate"] and c[-1] == f"{PRIVATE}-snap" for c in runner.calls)
    # the live copy's base is the last-shutdown copy: only the written MiB is read
    assert live["private"]["read"] == "changed" and live["private"]["bytes_read"] == MiB
    restore_matches(bed, str(qubesd.lvm.dev / f"{PRIVATE}-snap"))


def test_thin_delta_unavailable_falls_back_to_a_full_read(bed, capfd):
    qubesd, runner, _ = bed
    qbackup(bed, "init", "--scrypt-n", "16384", "--pack-size", "8M")
    capfd.readouterr()
    backup(bed, capfd)
    qubesd.lvm.write(PRIVATE, 0, b"\x22" * 4096)
    runner.fail["reserve_metadata_snap"] = "File exists"  # wyng holds it, say
    second = backup(bed, capfd)
    assert second["private"]["read"] == "fallback"
    assert "thin_delta could not be used" in second["private"]["reason"]
    assert "File exists" in second["private"]["reason"]
    assert second["private"]["bytes_read"] == 4 * MiB  # everything with data
    assert second["_"]["chunks_new"] == 1  # still only the changed chunk is sent
    assert runner.reserved == set()
    restore_matches(bed, str(qubesd.lvm.dev / PRIVATE))
