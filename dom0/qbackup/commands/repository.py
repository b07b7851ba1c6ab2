# SPDX-License-Identifier: GPL-2.0-or-later
"""Repository commands: init, list, delete, key change-passphrase."""

from __future__ import annotations

import argparse
from typing import Any

from qbackup import crypto, restore as restore_mod
from qbackup.commands.common import (EXIT_INTEGRITY, EXIT_OK, LOCK_WAIT, Context,
                                     ask_passphrase, clean, find_snapshot, local_time,
                                     open_history, power_of_two, print_json, read_passphrase)
from qbackup.errors import QbackupError, RollbackError, UsageError
from qbackup.progress import human_bytes

PACK_SIZE_RANGE = (8 << 20, 512 << 20)   # PROTOCOL.md, init
DELETE_FREES_NOTHING = ("deleting snapshots frees no space by itself: the backup qube's garbage "
                        "collection (`qbackup gc`) frees what no snapshot uses any more")


def check_scrypt_n(n: int) -> None:
    if not power_of_two(n) or not crypto.MIN_SCRYPT_N <= n <= crypto.MAX_CHOSEN_SCRYPT_N:
        raise UsageError(f"--scrypt-n must be a power of two from {crypto.MIN_SCRYPT_N} "
                         f"to {crypto.MAX_CHOSEN_SCRYPT_N}")


def cmd_init(ctx: Context, args: argparse.Namespace) -> int:
    if not power_of_two(args.chunk_size) or not (
            crypto.MIN_CHUNK_SIZE <= args.chunk_size <= crypto.MAX_CHUNK_SIZE):
        raise UsageError(f"--chunk-size must be a power of two from "
                         f"{human_bytes(crypto.MIN_CHUNK_SIZE)} to "
                         f"{human_bytes(crypto.MAX_CHUNK_SIZE)}")
    if not PACK_SIZE_RANGE[0] <= args.pack_size <= PACK_SIZE_RANGE[1]:
        raise UsageError("--pack-size must be from 8M to 512M")
    check_scrypt_n(args.scrypt_n)
    state = ctx.state()
    pin = state.pins().get((ctx.backup_vm, ctx.repo))
    if pin is not None and not args.replace:
        raise RollbackError(f"'{ctx.repo}' in {ctx.backup_vm} is pinned to repository "
                            f"{pin.repo_id.hex()}, which this dom0 has used; if it is gone for good, "
                            "give --replace to create a new repository and pin that one instead")
    passphrase = read_passphrase(getattr(args, "passphrase_file", None),
                                 "New passphrase: ", confirm=True)
    keys = crypto.create_keys(args.chunk_size)
    config = crypto.wrap_keys(keys, passphrase, scrypt_n=args.scrypt_n)
    with ctx.session() as session:
        session.init(config, args.pack_size)
    state.pin(ctx.backup_vm, ctx.repo, keys.repo_id)
    print(f"initialised repository {ctx.repo} in {ctx.backup_vm} (chunk size "
          f"{human_bytes(args.chunk_size)}, pack size {human_bytes(args.pack_size)})")
    print(f"repository id {keys.repo_id.hex()}: dom0 refuses any other repository served "
          f"as '{ctx.repo}' (see `qbackup repo trust`)")
    print("keep the passphrase safe: without it the backups cannot be read")
    return EXIT_OK


def _snapshot_json(snap: restore_mod.SnapshotInfo, protected: set[bytes]) -> dict[str, Any]:
    return {"id": snap.id.hex(), "time": snap.time, "host": snap.host,
            "predecessor": snap.predecessor.hex() if snap.predecessor else None,
            "qubes": sorted(snap.qubes), "bytes_total": snap.bytes_total,
            "protected": snap.id in protected}


def cmd_list(ctx: Context, args: argparse.Namespace) -> int:
    passphrase = ask_passphrase(args)
    with ctx.session() as session:
        keys, history = open_history(ctx, args, session, passphrase, warn_damaged=False)
    protected = ctx.state().load(keys.repo_id).protected
    code = EXIT_INTEGRITY if history.damaged else EXIT_OK
    if args.json:
        print_json({"snapshots": [_snapshot_json(s, protected) for s in history],
                    "damaged": [{"id": d.id.hex(), "reason": d.reason} for d in history.damaged]})
        return code
    if not history and not history.damaged:
        print("no snapshots")
        return code
    print(f"{'ID':16}  {'TIME':19}  {'SIZE':>10}  QUBES")
    for snap in history:
        mark = "  (protected)" if snap.id in protected else ""
        print(f"{snap.id.hex()[:16]}  {local_time(snap.time)}  "
              f"{human_bytes(snap.bytes_total):>10}  {', '.join(sorted(snap.qubes))}{mark}")
    for bad in history.damaged:
        print(f"{bad.id.hex()[:16]}  DAMAGED: {clean(bad.reason)}")
    return code


def cmd_delete(ctx: Context, args: argparse.Namespace) -> int:
    passphrase = ask_passphrase(args)
    with ctx.session() as session:
        keys, history = open_history(ctx, args, session, passphrase, write=True)
        snap = find_snapshot(history, args.snapshot)
        if snap.id in ctx.state().load(keys.repo_id).protected:
            raise QbackupError(f"snapshot {snap.id.hex()} is protected: run `qbackup unprotect "
                               f"{snap.id.hex()[:16]}` first")
        restore_mod.delete_snapshots(session, keys, ctx.state(), [snap], history)
    print(f"deleted snapshot {snap.id.hex()}")
    print(DELETE_FREES_NOTHING)
    return EXIT_OK


def cmd_change_passphrase(ctx: Context, args: argparse.Namespace) -> int:
    check_scrypt_n(args.scrypt_n)
    old = read_passphrase(getattr(args, "passphrase_file", None), "Current passphrase: ")
    new = read_passphrase(args.new_passphrase_file, "New passphrase: ", confirm=True)
    with ctx.session() as session:
        untrusted_config, _ = session.open(write=True, lock_wait=LOCK_WAIT)
        keys = crypto.unwrap_keys(untrusted_config, old)
        ctx.state().check_pin(ctx.backup_vm, ctx.repo, keys.repo_id)
        session.set_config(crypto.wrap_keys(keys, new, scrypt_n=args.scrypt_n),
                           expect=untrusted_config)
    print(f"passphrase of repository {ctx.repo} changed (data untouched)")
    return EXIT_OK
