# SPDX-License-Identifier: GPL-2.0-or-later
"""Suite-wide rules and fixtures.

Tests marked `root` need root and loop devices; tests marked `qubesd` need
the Qubes R4.2 sources (tests/qubes_r42.py). On a developer machine without
them they are skipped with the reason; in CI (`CI=true`) they fail loudly
instead, so a CI machine that lost its loop devices or the R4.2 sources
cannot go green by running fewer tests.

Fixture `qubesd`: a real R4.2 qubesd in this process (`qubes_r42.Testbed`).
"""

from __future__ import annotations

import os
import shutil
from typing import Iterator

import pytest

import qubes_r42


def _missing_root_facilities() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    if not os.path.exists("/dev/loop-control"):
        return "needs loop devices (/dev/loop-control is missing)"
    if shutil.which("losetup") is None:
        return "needs losetup (util-linux)"
    return None


def pytest_runtest_setup(item: pytest.Item) -> None:
    missing = None
    if item.get_closest_marker("root") is not None:
        missing = _missing_root_facilities()
    if missing is None and item.get_closest_marker("qubesd") is not None:
        missing = qubes_r42.missing()
    if missing is None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{missing}: this CI machine must provide it", pytrace=False)
    pytest.skip(missing)


@pytest.fixture
def qubesd(tmp_path_factory) -> Iterator[qubes_r42.Testbed]:
    """qubesd R4.2's Admin API in this process (mark the test `qubesd`)."""
    testbed = qubes_r42.Testbed(tmp_path_factory.mktemp("qubesd"))
    yield testbed
    testbed.close()
