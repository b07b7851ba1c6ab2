# SPDX-License-Identifier: GPL-2.0-or-later
"""`qbackup check JOB`, `qbackup status`, and the bookkeeping of job runs
(`qbackup backup --job JOB`): a lock per running job and the outcome of each
job's last run (docs/JOBS.md)."""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator

from qbackup import jobs
from qbackup.commands.common import (EXIT_CHECK_ERRORS, EXIT_CHECK_WARNINGS, EXIT_ERROR,
                                     EXIT_OK, JOBS_FILE, Context, clean, failure, local_time,
                                     print_json)
from qbackup.errors import QbackupError, RemoteError
from qbackup.progress import human_bytes


# -- check ------------------------------------------------------------------------

def _backup_qube_space(ctx: Context) -> tuple[dict | None, str | None]:
    """The repository's figures as the backup qube reports them (untrusted),
    or why they could not be had."""
    try:
        with ctx.session() as session:
            session.open(write=False)
            return session.stats(), None
    except RemoteError as e:
        if e.code == "no_repository":
            return None, f"repository {ctx.repo} does not exist in {ctx.backup_vm} (qbackup init)"
        return None, str(e)
    except QbackupError as e:
        return None, str(e)


def _check_json(job: jobs.Job, result: jobs.Review, space: dict | None) -> dict[str, Any]:
    return {"job": job.name, "backup_vm": job.backup_vm, "repo": job.repo, "live": job.live,
            "included": result.selection.included,
            "not_included": result.selection.not_included,
            "errors": result.errors, "warnings": result.warnings,
            "volumes": result.volumes, "bytes_total": result.bytes_total,
            "bytes_used": result.bytes_used,
            "backup_vm_free": space["fs_free"] if space else None,
            "repository_bytes": space["pack_bytes"] if space else None}


def review_job(ctx: Context) -> jobs.Review:
    """What check says about the context's job, qubes read once."""
    assert ctx.job is not None
    return jobs.review(ctx.job, ctx.backend.list_qubes())


def cmd_check(ctx: Context, args: argparse.Namespace) -> int:
    job = ctx.job
    result = review_job(ctx)
    space, unreachable = (None, None)
    if job.backup_vm in result.selection.not_included:  # the backup qube exists
        space, unreachable = _backup_qube_space(ctx)
        if unreachable:
            result.errors.append(f"backup qube: {unreachable}")
        elif space["fs_free"] < result.bytes_used:
            result.warnings.append(
                f"{job.backup_vm} reports {human_bytes(space['fs_free'])} free, less than the "
                f"{human_bytes(result.bytes_used)} the volumes hold (a first backup needs "
                "up to that, less after compression and deduplication)")
    if args.json:
        print_json(_check_json(job, result, space))
    else:
        _print_check(job, result, space)
    if result.errors:
        return EXIT_CHECK_ERRORS
    return EXIT_CHECK_WARNINGS if result.warnings else EXIT_OK


def _print_check(job: jobs.Job, result: jobs.Review, space: dict | None) -> None:
    sel = result.selection
    print(f"job {job.name}: backs up to repository {job.repo} in {job.backup_vm}"
          + (", running qubes live" if job.live else ""))
    width = max((len(n) for n in (*sel.included, *sel.not_included)), default=0)
    print(f"included ({len(sel.included)}):")
    for name, why in sel.included.items():
        print(f"  {name:{width}}  {why}")
    print(f"not included ({len(sel.not_included)}):")
    for name, why in sel.not_included.items():
        print(f"  {name:{width}}  {why}")
    print(f"size: {result.volumes} volumes of {human_bytes(result.bytes_total)}, holding "
          f"{human_bytes(result.bytes_used)}")
    if space is not None:
        print(f"backup qube: {human_bytes(space['fs_free'])} free of "
              f"{human_bytes(space['fs_size'])}; the repository holds "
              f"{human_bytes(space['pack_bytes'])} (as {job.backup_vm} reports it)")
    for title, lines in (("warnings", result.warnings), ("errors", result.errors)):
        if lines:
            print(f"{title} ({len(lines)}):")
            for line in lines:
                print(f"  {clean(line)}")
    verdict = ("refused: fix the errors above" if result.errors else
               "runs, see the warnings above" if result.warnings else "ok")
    print(f"job {job.name}: {verdict}")


# -- job runs: lock and outcome ------------------------------------------------------

def _lock_path(run_dir: str, name: str) -> Path:
    return Path(run_dir) / "jobs" / f"{name}.lock"


def job_running(run_dir: str, name: str) -> bool:
    """Whether a run of job `name` holds its lock now. Needs only read
    access: the qubes.BackupRequest service (the dom0 user) asks it too."""
    try:
        fd = os.open(_lock_path(run_dir, name), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


@contextlib.contextmanager
def job_lock(run_dir: str, name: str) -> Iterator[None]:
    """Hold job `name`'s lock for one run; refuse if another run holds it."""
    path = _lock_path(run_dir, name)
    try:
        os.makedirs(path.parent, mode=0o755, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise QbackupError(f"cannot create the lock of job {name} in {path.parent}: "
                           f"{e.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise QbackupError(f"job {name} is already running") from None
            raise
        yield
    finally:
        os.close(fd)


def _write_outcome(state_dir: str, name: str, outcome: dict[str, Any]) -> None:
    path = jobs.state_path(state_dir, name)
    os.makedirs(path.parent, mode=0o700, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(outcome, f, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_outcome(state_dir: str, name: str) -> dict[str, Any] | None:
    """The recorded outcome of job `name`'s last run (None: never run)."""
    path = jobs.state_path(state_dir, name)
    try:
        with open(path) as f:
            outcome = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        return {"state": "unknown", "error": f"cannot read {path}: {e}"}
    return outcome if isinstance(outcome, dict) else {"state": "unknown",
                                                      "error": f"{path} is not a record"}


@contextlib.contextmanager
def job_run(ctx: Context) -> Iterator[dict[str, Any]]:
    """One run of the context's job: its lock held, its outcome recorded
    (state running, then ok or failed with the exit code and the one-line
    error, or interrupted); the caller puts its figures in the dict yielded."""
    assert ctx.job is not None
    name = ctx.job.name
    figures: dict[str, Any] = {}
    with job_lock(ctx.run_dir, name):
        started = time.time()
        _write_outcome(ctx.state_dir, name, {"state": "running", "started": started,
                                             "pid": os.getpid()})
        outcome: dict[str, Any] = {"started": started}
        try:
            yield figures
            outcome.update(state="ok", exit=EXIT_OK, figures=figures)
        except (QbackupError, OSError) as e:
            code, line = failure(e)
            outcome.update(state="failed", exit=code, error=line)
            raise
        except KeyboardInterrupt:
            outcome.update(state="interrupted", exit=130, error="interrupted")
            raise
        except BaseException as e:
            outcome.update(state="failed", exit=EXIT_ERROR,
                           error=f"internal error: {type(e).__name__}: {clean(str(e))}")
            raise
        finally:
            outcome["ended"] = time.time()
            try:
                _write_outcome(ctx.state_dir, name, outcome)
            except OSError as e:
                print(f"qbackup: warning: cannot record the outcome of job {name}: "
                      f"{e.strerror}", file=sys.stderr)


# -- status ------------------------------------------------------------------------

def cmd_status(ctx: Context, args: argparse.Namespace) -> int:
    jobs_file = args.jobs_file or JOBS_FILE
    defined = jobs.load_jobs(jobs_file)
    rows = []
    for name in sorted(defined):
        outcome = read_outcome(ctx.state_dir, name) or {"state": "never run"}
        if outcome.get("state") == "running" and not job_running(ctx.run_dir, name):
            outcome = {**outcome, "state": "failed", "error": "the run ended without "
                       "recording its outcome (killed?)"}
        elif job_running(ctx.run_dir, name):
            outcome = {**outcome, "state": "running"}
        rows.append({"job": name, **outcome})
    failed = [r for r in rows if r["state"] in ("failed", "interrupted", "unknown")]
    if args.json:
        print_json({"jobs": rows, "ok": not failed})
    elif not rows:
        print(f"no jobs ({jobs_file} defines none)")
    else:
        for row in rows:
            when = f" at {local_time(row['ended'])}" if row.get("ended") else (
                f" since {local_time(row['started'])}" if row.get("started") else "")
            line = f"{row['job']}: {row['state']}{when}"
            if row.get("error"):
                line += f": {row['error']}"
            elif row.get("figures", {}).get("snapshot"):
                fig = row["figures"]
                line += (f": snapshot {fig['snapshot'][:16]}, read "
                         f"{human_bytes(fig.get('bytes_read', 0))}, sent "
                         f"{human_bytes(fig.get('bytes_sent', 0))}")
            print(clean(line, 1000))
    return EXIT_ERROR if failed else EXIT_OK
