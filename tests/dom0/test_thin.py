# SPDX-License-Identifier: GPL-2.0-or-later
"""LVM thin change tracking: thin_delta's output parsed from the real tool
(metadata built with the real thin_restore from XML generated here), the
parser refusing anything else, and the metadata snapshot reserved and
released on every path, through the one tool runner."""

from __future__ import annotations

import os
import random
import signal
import subprocess

import pytest

from qbackup import thin, tools
from qbackup.tools import ToolError

BLOCK_SECTORS = 128  # 64 KiB


def metadata(tmp_path, devices: dict[int, dict[int, int]]) -> str:
    """A pool metadata file holding `devices` = {thin id: {virtual block: data block}}."""
    top = max([d for m in devices.values() for d in m.values()], default=0) + 1
    lines = [f'<superblock uuid="" time="1" transaction="1" flags="0" version="2" '
             f'data_block_size="{BLOCK_SECTORS}" nr_data_blocks="{top + 16}">']
    for dev_id, mapping in sorted(devices.items()):
        lines.append(f'<device dev_id="{dev_id}" mapped_blocks="{len(mapping)}" '
                     'transaction="0" creation_time="0" snap_time="0">')
        lines += [f'<single_mapping origin_block="{v}" data_block="{d}" time="0"/>'
                  for v, d in sorted(mapping.items())]
        lines.append("</device>")
    lines.append("</superblock>")
    xml, meta = tmp_path / "meta.xml", tmp_path / "meta.bin"
    xml.write_text("\n".join(lines) + "\n")
    with open(meta, "wb") as f:
        f.truncate(16 << 20)
    subprocess.run(["thin_restore", "-i", str(xml), "-o", str(meta)], check=True,
                   capture_output=True)
    return str(meta)


def real_delta(meta: str, old: int, new: int) -> str:
    return subprocess.run(["thin_delta", "--snap1", str(old), "--snap2", str(new), meta],
                          check=True, capture_output=True, text=True).stdout


def expected_changes(old: dict[int, int], new: dict[int, int]) -> list[tuple[int, int]]:
    """Blocks whose mapping differs (different, left only, right only), merged."""
    blocks = sorted(v for v in set(old) | set(new) if old.get(v) != new.get(v))
    runs: list[tuple[int, int]] = []
    for v in blocks:
        if runs and runs[-1][1] == v:
            runs[-1] = (runs[-1][0], v + 1)
        else:
            runs.append((v, v + 1))
    return runs


def test_every_kind_of_range_from_real_thin_delta(tmp_path):
    # shared 0-9, different 10-11, shared 12, left only 20-22, right only 30-31,
    # shared 40-49 then different 50 (adjacent kinds), unmapped in both 60-99
    old = {v: v for v in range(0, 10)} | {10: 100, 11: 101, 12: 12} | {
        20: 120, 21: 121, 22: 122} | {v: v for v in range(40, 51)}
    new = {v: v for v in range(0, 10)} | {10: 200, 11: 201, 12: 12} | {
        30: 230, 31: 231} | {v: v for v in range(40, 50)} | {50: 250}
    out = real_delta(metadata(tmp_path, {1: old, 2: new}), 1, 2)
    for kind in ("same", "different", "left_only", "right_only"):
        assert f"<{kind} " in out  # the real output has every kind
    block, changed = thin.parse_delta(out, 1, 2)
    assert block == BLOCK_SECTORS * 512
    assert changed == [(10, 12), (20, 23), (30, 32), (50, 51)] == expected_changes(old, new)


@pytest.mark.parametrize("seed", range(4))
def test_random_pools_match_the_model(tmp_path, seed):
    rng = random.Random(seed)
    old = {v: v for v in rng.sample(range(4000), 1500)}
    new = {}
    for v, d in old.items():  # a snapshot, then writes, discards, new data
        roll = rng.random()
        if roll < 0.8:
            new[v] = d
        elif roll < 0.9:
            new[v] = 10000 + v
    for v in rng.sample(range(4000), 200):
        new.setdefault(v, 20000 + v)
    out = real_delta(metadata(tmp_path, {5: old, 9: new}), 5, 9)
    assert thin.parse_delta(out, 5, 9) == (BLOCK_SECTORS * 512, expected_changes(old, new))


GOOD = """<superblock uuid="" time="1" transaction="2" data_block_size="128" nr_data_blocks="1000">
  <diff left="1" right="2">
    <same begin="0" length="2"/>
    <different begin="2" length="1"/>
  </diff>
</superblock>
"""


@pytest.mark.parametrize("bad, why", [
    (GOOD.replace('left="1"', 'left="3"'), "other devices"),
    (GOOD.replace('right="2"', 'right="1"'), "other devices"),
    (GOOD.replace('<same begin="0"', '<same begin="9"'), "out of order"),
    (GOOD.replace('length="1"', 'length="0"'), "bad length"),
    (GOOD.replace('length="1"', 'length="-1"'), "bad length"),
    (GOOD.replace('length="1"', 'length="99999999999999999999"'), "bad length"),
    (GOOD.replace('data_block_size="128"', 'data_block_size="0"'), "data_block_size"),
    (GOOD.replace('data_block_size="128"', ''), "data_block_size"),
    (GOOD.replace("  </diff>\n", ""), "unexpected </superblock>"),
    (GOOD.replace("</superblock>\n", ""), "incomplete"),
    (GOOD + "<diff left=\"1\" right=\"2\">\n", "unexpected <diff>"),
    (GOOD.replace("<same", "<mystery"), "unexpected <mystery>"),
    (GOOD.replace('length="2"/>', 'length="2" extra="1"/>'), "unexpected <same>"),
    (GOOD.replace('length="2"/>', 'length="2">'), "unexpected <same>"),
    (GOOD.replace("<same", "text <same"), "not one XML element"),
    ('<!DOCTYPE x [<!ENTITY a "b">]>\n' + GOOD, "not one XML element"),
    (GOOD.replace('begin="0"', 'begin="&a;"'), "not one XML element"),
    ("", "incomplete"),
    ("thin_delta: no such device\n", "not one XML element"),
])
def test_anything_but_the_exact_shape_is_refused(bad, why):
    assert thin.parse_delta(GOOD, 1, 2) == (65536, [(2, 3)])
    with pytest.raises(ToolError, match=why):
        thin.parse_delta(bad, 1, 2)


class Recorder(tools.Runner):
    """A runner that records and answers dmsetup; `fail` = {word: error}."""

    def __init__(self):
        self.calls: list[list[str]] = []
        self.fail: dict[str, str] = {}

    def run(self, argv, *, timeout):
        self.calls.append(list(argv))
        for word, error in self.fail.items():
            if word in argv:
                raise ToolError(f"{tools.describe(argv)} failed: {error}")
        return ""


@pytest.fixture
def recorder(monkeypatch):
    r = Recorder()
    monkeypatch.setattr(tools, "current", r)
    return r


RESERVE = ["dmsetup", "message", "qubes_dom0-vm--pool-tpool", "0", "reserve_metadata_snap"]
RELEASE = ["dmsetup", "message", "qubes_dom0-vm--pool-tpool", "0", "release_metadata_snap"]


def test_metadata_snapshot_is_released_after_use(recorder, tmp_path):
    with thin.metadata_snapshot("qubes_dom0", "vm-pool", str(tmp_path)) as meta:
        assert meta == "/dev/mapper/qubes_dom0-vm--pool_tmeta"
        assert (tmp_path / "thin-qubes_dom0-vm--pool.reserved").exists()
    assert recorder.calls == [RESERVE, RELEASE]
    assert not (tmp_path / "thin-qubes_dom0-vm--pool.reserved").exists()


def test_metadata_snapshot_is_released_on_error(recorder, tmp_path):
    with pytest.raises(ToolError):
        with thin.metadata_snapshot("qubes_dom0", "vm-pool", str(tmp_path)):
            thin.delta("/dev/mapper/x", 1, 2)  # the recorder answers "": not XML
    assert recorder.calls[0] == RESERVE and recorder.calls[-1] == RELEASE


def test_sigint_waits_for_the_release(recorder, tmp_path):
    """Ctrl-C while thin_delta runs: the reservation is released first,
    then the interrupt acts as the handler in place would have (here
    Python's default one: KeyboardInterrupt)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            with thin.metadata_snapshot("qubes_dom0", "vm-pool", str(tmp_path)):
                os.kill(os.getpid(), signal.SIGINT)
                recorder.run(["thin_delta", "still running"], timeout=1)
        assert recorder.calls == [RESERVE, ["thin_delta", "still running"], RELEASE]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_reservation_left_by_a_killed_run_is_released_first(recorder, tmp_path):
    (tmp_path / "thin-qubes_dom0-vm--pool.reserved").write_text("12345\n")
    with thin.metadata_snapshot("qubes_dom0", "vm-pool", str(tmp_path)):
        pass
    assert recorder.calls == [RELEASE, RESERVE, RELEASE]


def test_a_reservation_held_by_another_program_is_not_released(recorder, tmp_path):
    recorder.fail["reserve_metadata_snap"] = "File exists"
    with pytest.raises(ToolError, match="dmsetup message failed: File exists"):
        with thin.metadata_snapshot("qubes_dom0", "vm-pool", str(tmp_path)):
            pytest.fail("must not get here")
    assert recorder.calls == [RESERVE]
    assert not (tmp_path / "thin-qubes_dom0-vm--pool.reserved").exists()


def test_lvm_commands(recorder):
    thin.snapshot("qubes_dom0", "vm-work-private", "qbackup-x-back")
    thin.activate("qubes_dom0", "qbackup-x-back")
    thin.remove("qubes_dom0", "qbackup-x-back")
    assert recorder.calls == [
        ["lvm", "lvcreate", "--snapshot", "--setactivationskip=n", "--activate=y",
         "--permission=r", "--name=qbackup-x-back", "--", "qubes_dom0/vm-work-private"],
        ["lvm", "lvchange", "--activate=y", "--", "qubes_dom0/qbackup-x-back"],
        ["lvm", "lvremove", "--force", "--", "qubes_dom0/qbackup-x-back"]]
    with pytest.raises(ToolError, match="invalid LVM name"):
        thin.remove("qubes_dom0", "../../etc")
    with pytest.raises(ToolError, match="invalid LVM name"):
        thin.snapshot("qubes_dom0", "-rf", "x")


def test_the_runner_says_what_failed_in_one_line(tmp_path):
    runner = tools.Runner()
    with pytest.raises(ToolError, match="^ls failed: .*No such file"):
        runner.run(["ls", "-d", str(tmp_path / "missing")])
    with pytest.raises(ToolError, match="no-such-tool-qbackup is not installed"):
        runner.run(["no-such-tool-qbackup", "x"])
    with pytest.raises(ToolError, match="sleep 5 did not finish within 0.2 s"):
        runner.run(["sleep", "5"], timeout=0.2)
    assert runner.run(["echo", "ok"]) == "ok\n"
