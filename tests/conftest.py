# SPDX-License-Identifier: GPL-2.0-or-later
"""Suite-wide rules.

Tests marked `root` need root and loop devices. On a developer machine
without them they are skipped with the reason; in CI (`CI=true`) they fail
loudly instead, so a CI machine that lost its loop devices cannot go green by
running fewer tests.
"""

from __future__ import annotations

import os
import shutil

import pytest


def _missing_root_facilities() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    if not os.path.exists("/dev/loop-control"):
        return "needs loop devices (/dev/loop-control is missing)"
    if shutil.which("losetup") is None:
        return "needs losetup (util-linux)"
    return None


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("root") is None:
        return
    missing = _missing_root_facilities()
    if missing is None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{missing}: this CI machine must provide it", pytrace=False)
    pytest.skip(missing)
