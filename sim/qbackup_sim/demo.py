# SPDX-License-Identifier: GPL-2.0-or-later
"""End-to-end demo: `python -m qbackup_sim.demo OUTDIR` (what `make demo` runs).

Builds a simulated dom0 in OUTDIR (wiped first) with a template and an app
qube whose volumes are real ext4 images holding real files, then drives the
real `qbackup` command line against the real daemon: init, full backup,
change files, incremental backup, list, show, verify, restore to files, and
compares the restored images with the originals byte for byte (sha256).
Last, a reinstalled system: an empty simulated dom0 in OUTDIR/reinstalled
that has the backup qube's storage gets the qubes back with `restore
--qubes`, and their settings and data are compared with the originals.
Says what happens at each step; exits non-zero on any failure or mismatch.
"""

from __future__ import annotations

import hashlib
import json
import random
import shlex
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from qbackup.errors import QbackupError
from qbackup.progress import human_bytes
from qbackup.qubes import volumes_to_backup
from qbackup_sim.backend import SimBackend
from qbackup_sim.daemon import stop_daemon
from qbackup_sim.ext4 import make_ext4_image, read_file, write_files
from qbackup_sim.inventory import INVENTORY, create_sim

PASSPHRASE = b"correct horse battery staple\n"
TEMPLATE, APPVM = "fedora-41", "work"


class DemoFailed(Exception):
    """A step did not do what it should."""


def _say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def _files(rng: random.Random) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """Files for the template's root and the app qube's private volume."""
    library = rng.randbytes(3 << 20)
    words = "qubes backup chunk pack dom0 template volume snapshot restore".split()
    text = " ".join(rng.choice(words) for _ in range(60000)).encode()
    root = {"usr/lib64/libexample.so.1": library,
            "usr/bin/tool": rng.randbytes(1 << 20),
            "etc/os-release": b'NAME="Fedora Linux"\nVERSION_ID=41\n',
            "usr/share/doc/README": text}
    private = {"home/user/.local/lib/libexample.so.1": library,
               "home/user/Documents/report.txt": text[: 200 << 10],
               "home/user/Pictures/photo.raw": rng.randbytes(2 << 20),
               "home/user/notes.txt": b"first version of my notes\n"}
    return root, private


class Demo:
    """The demo's state: the sim directory and how to call the CLI."""

    def __init__(self, out: Path, passphrase_file: Path | None = None) -> None:
        self.out = out
        self.passphrase_file = passphrase_file or out / "passphrase.txt"

    def qbackup(self, *args: str, expect: int = 0, show: bool = True) -> str:
        """Run `qbackup ARGS...` against the sim in OUT as a user would
        (`python -m qbackup_sim run OUT ARGS...`); its stdout."""
        argv = [*args, "--passphrase-file", str(self.passphrase_file)]
        print(f"$ qbackup-sim run {shlex.quote(str(self.out))} {shlex.join(argv)}", flush=True)
        proc = subprocess.run([sys.executable, "-m", "qbackup_sim", "run", str(self.out), *argv],
                              capture_output=True, text=True)
        if show and proc.stdout:
            print(proc.stdout.rstrip())
        if proc.stderr:
            print(proc.stderr.rstrip())
        if proc.returncode != expect:
            raise DemoFailed(f"qbackup {args[0]} exited with {proc.returncode}, "
                             f"expected {expect}")
        return proc.stdout

    def image(self, qube: str, volume: str) -> Path:
        return self.out / "volumes" / qube / f"{volume}.img"

    def digests(self, paths: dict[str, Path]) -> dict[str, str]:
        return {name: _sha256(path) for name, path in paths.items()}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _compare(label: str, expected: dict[str, str], restored_dir: Path) -> None:
    for name, digest in sorted(expected.items()):
        got = _sha256(restored_dir / f"{name}.img")
        same = got == digest
        print(f"   {name}: sha256 {got[:16]}... {'matches' if same else 'DIFFERS from'} "
              f"the {label} ({digest[:16]}...)")
        if not same:
            raise DemoFailed(f"restored {name} differs from the {label}")


def run_demo(out: Path) -> None:
    demo = Demo(out)
    volumes = {f"{TEMPLATE}/root": demo.image(TEMPLATE, "root"),
               f"{TEMPLATE}/private": demo.image(TEMPLATE, "private"),
               f"{APPVM}/private": demo.image(APPVM, "private")}

    _say(f"1. A simulated dom0 in {out}: template {TEMPLATE} (root + private volume) and "
         f"app qube {APPVM} (private volume), real ext4 images with real files; the "
         "backup qube's daemon (qbackupd) starts on first use")
    create_sim(out, {
        TEMPLATE: {"class": "TemplateVM", "label": "black",
                   "features": {"os": "Linux"},
                   "volumes": {"root": 64 << 20, "private": 8 << 20, "volatile": 10 << 30}},
        APPVM: {"class": "AppVM", "label": "blue", "template": TEMPLATE, "netvm": None,
                "properties": {"memory": 800, "maxmem": 4000}, "tags": ["demo"],
                "features": {"service.cups": "1"},
                "firewall": ["action=accept specialtarget=dns",
                             "action=accept dst4=192.168.1.0/24 proto=tcp dstports=22-22",
                             "action=drop"],
                "volumes": {"root": 64 << 20, "private": {"size": 32 << 20,
                                                         "revisions_to_keep": 2},
                            "volatile": 10 << 30}}})
    root_files, private_files = _files(random.Random(4242))
    make_ext4_image(volumes[f"{TEMPLATE}/root"], 64 << 20, root_files)
    make_ext4_image(volumes[f"{TEMPLATE}/private"], 8 << 20, {"home/user/.bashrc": b"# bash\n"})
    make_ext4_image(volumes[f"{APPVM}/private"], 32 << 20, private_files)
    demo.passphrase_file.write_bytes(PASSPHRASE)
    demo.passphrase_file.chmod(0o600)
    for name, path in volumes.items():
        print(f"   {name}: {human_bytes(path.stat().st_size)} image {path}")

    _say("2. Create the repository: dom0 makes the keys and stores them in the backup "
         "qube only wrapped by the passphrase (scrypt)")
    demo.qbackup("init")

    _say("3. Full backup of both qubes: their settings, and every chunk of their "
         "volumes that is not all zeros, compressed and encrypted in dom0")
    full = json.loads(demo.qbackup("backup", TEMPLATE, APPVM, "--json", show=False))
    print(f"   snapshot {full['snapshot'][:16]}: {full['volumes']} volumes, "
          f"{human_bytes(full['bytes_total'])} in all, {human_bytes(full['bytes_read'])} "
          f"read, {human_bytes(full['bytes_sent'])} sent; {full['chunks_zero']} "
          "all-zero chunks not stored")
    before = demo.digests(volumes)

    _say("4. Use the qubes: edit the notes, add a file in the app qube, update a "
         "program in the template")
    write_files(volumes[f"{APPVM}/private"],
                {"home/user/notes.txt": b"second version of my notes\n",
                 "home/user/Documents/todo.txt": b"back up the qubes\n"})
    write_files(volumes[f"{TEMPLATE}/root"],
                {"usr/bin/tool": random.Random(7).randbytes(256 << 10)})

    _say("5. Incremental backup: the same command; chunks the repository already "
         "holds are not sent again")
    incr = json.loads(demo.qbackup("backup", TEMPLATE, APPVM, "--json", show=False))
    print(f"   snapshot {incr['snapshot'][:16]}: {human_bytes(incr['bytes_sent'])} sent "
          f"({incr['chunks_new']} new chunks) against {human_bytes(full['bytes_sent'])} "
          "for the full backup")
    if not incr["bytes_sent"] * 4 < full["bytes_sent"]:
        raise DemoFailed("the incremental backup did not send far less than the full one")
    after = demo.digests(volumes)

    _say("6. List the snapshots (each one authenticated by dom0)")
    demo.qbackup("list")

    _say("7. Verify every snapshot: all chunks read back, authenticated and decrypted "
         "in dom0, nothing written")
    demo.qbackup("verify", "--all")

    _say("8. Restore the latest snapshot to new files and compare with the volumes")
    demo.qbackup("restore", "latest", "--to", str(out / "restored-latest"))
    _compare("current volume", after, out / "restored-latest")
    notes = read_file(out / "restored-latest" / APPVM / "private.img", "home/user/notes.txt")
    print(f"   notes.txt in the restored image: {notes.decode().strip()!r}")
    if notes != b"second version of my notes\n":
        raise DemoFailed("the restored notes are not the latest version")

    _say("9. Restore the first snapshot: the volumes as they were before the changes")
    demo.qbackup("restore", full["snapshot"][:16], "--to", str(out / "restored-first"))
    _compare("volume before the changes", before, out / "restored-first")

    _say("10. Restore never overwrites without --force")
    demo.qbackup("restore", "latest", "--to", str(out / "restored-latest"), expect=1)

    _say("11. What the latest snapshot holds, and what changed since the first one")
    demo.qbackup("show", "latest")

    _say("12. Repository size: stored, logical, dedup ratio, each snapshot's unique part")
    demo.qbackup("stats")

    _say("13. The backup qube checks every byte of its packs, then collects garbage (no keys)")
    demo.qbackup("check-storage", "--read-data")
    demo.qbackup("gc")

    reinstall(demo)


def _settings(root: Path, names: list[str]) -> dict:
    """Every setting of the qubes, without where their images are and how
    much of them is allocated (state of this machine, not settings)."""
    backend = SimBackend(root)
    qubes = {q.name: q for q in backend.list_qubes()}
    return {name: (replace(qubes[name], volumes={n: replace(v, path=None, usage=0)
                                                 for n, v in qubes[name].volumes.items()}),
                   backend.qube_details(name)) for name in names}


def _volume_digests(root: Path, names: list[str]) -> dict[str, str]:
    qubes = {q.name: q for q in SimBackend(root).list_qubes()}
    return {f"{name}/{vol.name}": _sha256(Path(vol.path))
            for name in names for vol in volumes_to_backup(qubes[name])}


def reinstall(demo: Demo) -> None:
    """Dom0's disk fails: a new dom0, the backup qube's storage back, the qubes
    restored from the latest snapshot and compared with the originals."""
    out = demo.out
    names = [TEMPLATE, APPVM]
    new = out / "reinstalled"
    _say(f"14. dom0's disk fails. A fresh install ({new}): no qubes but the backup qube, "
         "whose storage is the old one's")
    stop_daemon(out)
    create_sim(new, {})
    shutil.rmtree(new / "storage")
    shutil.copytree(out / "storage", new / "storage")
    fresh = Demo(new, demo.passphrase_file)

    _say("15. The restore plan: every step, checked before anything changes (--dry-run)")
    fresh.qbackup("restore", "latest", "--qubes", "--dry-run")

    _say("16. Restore the qubes: created in dependency order, settings set, each volume "
         "streamed from the backup qube and authenticated straight into the new qube")
    fresh.qbackup("restore", "latest", "--qubes")

    _say("17. Compare the restored qubes with the originals")
    before, after = _settings(out, names), _settings(new, names)
    for name in names:
        info, details = after[name]
        same = (info, details) == before[name]
        print(f"   {name}: class {info.klass}, {len(info.properties)} properties, "
              f"{len(info.features)} features, {len(info.tags)} tags, "
              f"{len(details.firewall)} firewall rules, {len(info.volumes)} volume settings: "
              f"{'the same as' if same else 'DIFFERENT from'} the original")
        if not same:
            raise DemoFailed(f"the settings of the restored {name} differ")
    restored = _volume_digests(new, names)
    for name, digest in sorted(_volume_digests(out, names).items()):
        same = restored[name] == digest
        print(f"   {name}: sha256 {restored[name][:16]}... "
              f"{'matches' if same else 'DIFFERS from'} the original ({digest[:16]}...)")
        if not same:
            raise DemoFailed(f"restored {name} differs from the original")
    notes = read_file(new / "volumes" / APPVM / "private.img", "home/user/notes.txt")
    print(f"   notes.txt in the restored {APPVM}: {notes.decode().strip()!r}")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m qbackup_sim.demo OUTDIR", file=sys.stderr)
        return 2
    out = Path(args[0]).absolute()
    if (out / INVENTORY).exists():
        stop_daemon(out)
    shutil.rmtree(out, ignore_errors=True)
    try:
        run_demo(out)
    except (DemoFailed, QbackupError, OSError) as e:
        print(f"\ndemo FAILED: {e}", file=sys.stderr)
        return 1
    finally:
        for sim in (out, out / "reinstalled"):
            if (sim / INVENTORY).exists():
                stop_daemon(sim)
    print("\ndemo OK: backups, incremental, verify, restores and the qubes restored on a "
          f"reinstalled system all check out (everything is in {out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
