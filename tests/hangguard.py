# SPDX-License-Identifier: GPL-2.0-or-later
"""Run a call that might hang (a client facing a hostile or broken daemon)
so that a hang fails the test instead of blocking the whole suite."""

import concurrent.futures

HANG_LIMIT = 60  # seconds: far beyond any legitimate call in the tests


def within(fn, *args, hang_limit: float = HANG_LIMIT, **kwargs):
    """fn(*args, **kwargs), or a TimeoutError after `hang_limit` seconds."""
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        return pool.submit(fn, *args, **kwargs).result(timeout=hang_limit)
    finally:
        pool.shutdown(wait=False)
