# SPDX-License-Identifier: GPL-2.0-or-later
"""The shipped dom0 package imports only what dom0 has: the standard library,
msgpack, zstandard, cryptography, and qubesadmin in the one adapter module;
never the simulation or the daemon's package."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import qbackup

PACKAGE = Path(qbackup.__file__).parent
THIRD_PARTY = {"msgpack", "zstandard", "cryptography"}
ONLY_IN = {"qubesadmin": {"qubes.py"}}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_dom0_imports_only_what_dom0_has():
    modules = sorted(PACKAGE.rglob("*.py"))
    assert len(modules) > 10
    for path in modules:
        relative = str(path.relative_to(PACKAGE))
        for name in imported_modules(path):
            if name in sys.stdlib_module_names or name in THIRD_PARTY or name == "qbackup":
                continue
            assert relative in ONLY_IN.get(name, ()), f"{relative} imports {name}"


def test_running_the_cli_loads_no_simulation():
    code = ("import sys, qbackup.cli\n"
            "try:\n    qbackup.cli.run(['--backup-vm', 'b', 'list'])\nexcept SystemExit:\n    pass\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('qbackup_sim', 'qbackupd', 'trio'))\n"
            "print(bad)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=60)
    assert proc.stdout.strip() == "[]", proc.stdout + proc.stderr


# What parsing a command line may load: the modules every command that talks
# to the backup qube needs (bench/README.md, "Fixed cost of a command").
PARSING_LOADS = {"qbackup", "qbackup.cli", "qbackup.commands", "qbackup.commands.common",
                 "qbackup.crypto", "qbackup.errors", "qbackup.proto", "qbackup.qubes",
                 "qbackup.state", "qbackup.threads", "qbackup.transport"}


def test_parsing_a_command_loads_no_command_module():
    """The command modules, the backup, restore and recreation engines, the
    jobs file's parser (tomllib) and qubesadmin load only for the command
    that needs them: what `qbackup stats` loads before it connects."""
    code = ("import sys, qbackup.cli\n"
            "qbackup.cli.build_parser().parse_args(['--backup-vm', 'b', 'stats', '--json'])\n"
            "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('qbackup', 'tomllib', 'qubesadmin'))))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=60, check=True)
    loaded = set(proc.stdout.split())
    assert {"qbackup.cli", "qbackup.crypto"} <= loaded, proc.stdout
    assert loaded <= PARSING_LOADS, sorted(loaded - PARSING_LOADS)


def test_every_subpackage_is_shipped():
    """pyproject.toml lists the packages explicitly: a subpackage missing from
    the list is missing from the installed client (qbackup.commands was)."""
    listed = set(tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())
                 ["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(PACKAGE.parent).parts) for p in PACKAGE.rglob("__init__.py")}
    assert found == listed


THREAD_STARTERS = {"Thread", "ThreadPoolExecutor", "Timer", "start_new_thread", "start_new"}


def test_every_thread_is_started_through_qbackup_threads():
    """A thread started anywhere else does not block SIGINT and SIGTERM, and
    can take the Ctrl-C the main thread never sees (qbackup/threads.py)."""
    starters = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = str(path.relative_to(PACKAGE))
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in THREAD_STARTERS:
                starters.append((relative, node.lineno, name))
    assert starters, "qbackup/threads.py starts threads: the check sees nothing"
    assert {relative for relative, _, _ in starters} == {"threads.py"}, starters
