# SPDX-License-Identifier: GPL-2.0-or-later
"""`python -m qbackup`: the same as the `qbackup` command."""

from qbackup.cli import main

main()
