# SPDX-License-Identifier: GPL-2.0-or-later
"""Every thread qbackup starts, started so that Ctrl-C is never lost.

The kernel hands a signal sent to the process (Ctrl-C: SIGINT; SIGTERM) to
any one of its threads that does not block it. Python runs the handler
(KeyboardInterrupt) only in the main thread, and only when that thread runs
bytecode again: if a worker took the signal while the main thread slept in
an untimed wait (a future's result, a queue), the interrupt waited as long
as the wait did — for ever with a stalled backup qube. So every other thread
blocks SIGINT and SIGTERM: the kernel then always hands them to the main
thread, whose waits they interrupt (lock waits are interruptible on POSIX).
A process started from such a thread would inherit the blocked mask (it
survives exec): these threads start none; tools, qrexec and imports run on
the main thread.
"""

import signal
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

HELD = (signal.SIGINT, signal.SIGTERM)


def hold_signals() -> None:
    """Block HELD in the calling thread (pool workers run it first)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, HELD)


def start(target: Callable[..., object], name: str, *args: object) -> threading.Thread:
    """Start a daemon thread running target(*args) with HELD blocked from its
    very first instruction: it inherits the mask the caller has while
    starting it (a signal that arrives meanwhile stays pending, then goes
    to the caller)."""
    thread = threading.Thread(target=target, args=args, name=name, daemon=True)
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, HELD)
    try:
        thread.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    return thread


def pool(workers: int, name: str) -> ThreadPoolExecutor:
    """A thread pool whose workers block HELD. A worker is started by the
    thread that submits work to the pool (the main thread), which runs on
    at once: a signal a new worker takes before it blocks HELD is acted on
    at the main thread's next bytecode."""
    return ThreadPoolExecutor(workers, thread_name_prefix=name, initializer=hold_signals)
