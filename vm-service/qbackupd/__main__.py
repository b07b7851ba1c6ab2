# SPDX-License-Identifier: GPL-2.0-or-later
"""`python -m qbackupd`: the daemon's command line (see qbackupd.cli)."""

import sys

from .cli import main

sys.exit(main())
