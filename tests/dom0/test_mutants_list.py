# SPDX-License-Identifier: GPL-2.0-or-later
"""The mutation check's list (docs/mutants.toml) matches the source and
docs/INVARIANTS.md: checked here in every test run, so a change that moves
an anchor fails at once, not only when scripts/mutants.py runs."""

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("qbackup_mutants", ROOT / "scripts" / "mutants.py")
mutants = sys.modules["qbackup_mutants"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mutants)


def test_every_mutant_matches_the_source_and_its_invariant_row():
    listed = mutants.load()
    assert len(listed) >= 30
    rows = mutants.invariant_rows(mutants.INVARIANTS.read_text())
    assert set(rows) == set(range(1, 12))
    assert {m.invariant for m in listed} == set(range(1, 12))  # every invariant has mutants
    assert {m.module for m in listed} == mutants.MODULES  # and every trust module


def test_a_rotten_anchor_fails_loudly(tmp_path):
    package = tmp_path / "qbackup"
    shutil.copytree(mutants.PACKAGE, package)
    first = mutants.load()[0]
    module = package / first.module
    module.write_text(module.read_text().replace(first.edits[0][0], "# moved elsewhere\n"))
    with pytest.raises(mutants.ListError, match=f"mutant {first.id}: its anchor occurs 0 times"):
        mutants.load(package=package)


def test_a_test_not_named_in_its_row_fails_loudly(tmp_path):
    first = mutants.load()[0]
    name = first.tests[0].split("::")[-1]
    invariants = tmp_path / "INVARIANTS.md"
    invariants.write_text(mutants.INVARIANTS.read_text().replace(name, "test_renamed"))
    with pytest.raises(mutants.ListError, match=f"is not named in row {first.invariant}"):
        mutants.load(invariants=invariants)


def test_a_mutant_is_a_copy_with_the_replacements(tmp_path):
    m = mutants.load()[0]
    path = mutants.mutate(m, tmp_path)
    source = (path / "qbackup" / m.module).read_text()
    assert m.edits[0][0] not in source and m.edits[0][1] in source
    assert (mutants.PACKAGE / m.module).read_text().count(m.edits[0][0]) == 1
