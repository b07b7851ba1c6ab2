# SPDX-License-Identifier: GPL-2.0-or-later
"""Child process of the garbage collection crash tests (run as a script):

    gc_child.py ROOT NAME KILL_AT REPACK_BELOW

runs a garbage collection of repository NAME under ROOT and dies by SIGKILL
at the KILL_AT-th step it takes that touches the disk or the index: an
fsync, a rename, an unlink, a state or index transaction (killed before or
after it, alternately). Prints "done" and exits 0 if the collection ends
first. Steps are counted, not timed, so a seed gives the same kill point.
"""

import contextlib
import os
import signal
import sys
from pathlib import Path

from qbackupd import gc, graph
from qbackupd.index import Index
from qbackupd.storage import Storage

steps = 0


def step() -> None:
    global steps
    steps += 1
    if steps == KILL_AT:
        os.kill(os.getpid(), signal.SIGKILL)


def counted(function, after: bool):
    def wrapper(*args, **kwargs):
        if not after:
            step()
        result = function(*args, **kwargs)
        if after:
            step()
        return result

    return wrapper


def counted_context(function):
    """A context manager (a transaction): a step before it begins and one after it commits."""

    @contextlib.contextmanager
    def wrapper(*args, **kwargs):
        step()
        with function(*args, **kwargs):
            yield
        step()

    return wrapper


if __name__ == "__main__":
    root, name, kill_at, repack_below = sys.argv[1:]
    KILL_AT = int(kill_at)
    os.fsync = counted(os.fsync, after=False)
    os.rename = counted(os.rename, after=True)
    os.unlink = counted(os.unlink, after=False)
    Index.move_blobs = counted(Index.move_blobs, after=True)
    Index.drop_rows = counted(Index.drop_rows, after=False)
    graph.Walk.transaction = counted_context(graph.Walk.transaction)
    gc.collect_garbage(Storage(Path(root)), name, repack_below=int(repack_below))
    print("done", steps, flush=True)
