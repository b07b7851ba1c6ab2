# SPDX-License-Identifier: GPL-2.0-or-later
"""The bodies of the `qbackup` commands, one module per area.

`qbackup.cli` only parses the command line and maps errors to exit codes;
each `cmd_*` function here takes the resolved `Context` and the parsed
arguments and returns the exit code. `common` holds what they share:
the context (backend, backup qube, repository, state directory), the
configuration file, passphrases and output helpers.
"""
