"""`ase-bptt import` / `generate` on bad input: one ``Error:`` line, the database byte-for-byte unchanged.

Every case runs the real command on real files (VASP outputs from
tests/data/vasp, ASE ``.traj``/extxyz/``ase.db`` files written here by a
real EMT relaxation).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import subprocess
from pathlib import Path

import ase.db
import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.io import write
from click.testing import CliRunner

from ase_bptt.cli import cli
from ase_bptt.data.db import DatabaseAccessError, SplitFractionError, SplitFractions, TrajectoryDB
from ase_bptt.data.generate import relax_frames
from ase_bptt.data.ingest import import_paths
from ase_bptt.errors import AseBpttError

#: Positions go through ase.db as float64 blobs: bit-exact.
EXACT = 0.0


def run(*args) -> object:
    return CliRunner().invoke(cli, ["--quiet", *map(str, args)])


def the_error(result) -> str:
    """The one ``Error: ...`` line of a failed command; no traceback."""
    assert result.exit_code in (1, 2) and isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output
    (line,) = [line for line in result.output.splitlines() if line.startswith("Error:")]
    return line


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cu_relaxation(seed: int, label: str | None = None) -> list:
    """A real EMT relaxation of a rattled 8-atom copper cell, frames labelled in atoms.info."""
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True) * (2, 1, 1)
    atoms.rattle(0.05, seed=seed)
    frames = relax_frames(atoms, EMT(), fmax=0.05)
    for frame in frames:
        if label is not None:
            frame.info["label"] = label
        frame.info["defect"] = f"d{seed}"
    return frames


@pytest.fixture
def si8(vasp_data) -> Path:
    return vasp_data / "si8_relax" / "vasprun.xml"


@pytest.fixture
def existing_db(tmp_path, vasp_data) -> Path:
    """A trajectory database holding one real VASP relaxation, with splits."""
    path = tmp_path / "t.db"
    assert run("import", vasp_data / "si2_relax_outcar", "--db", path).exit_code == 0
    return path


# ------------------------------------------------------------ split fractions
@pytest.mark.parametrize("val, test", [(0.7, 0.7), (0.5, 0.5), (-0.1, 0.1), (1.0, 0.0), (0.1, 1.5)])
def test_bad_split_fractions_are_a_usage_error_before_import_writes(existing_db, si8, val, test):
    before = sha256(existing_db)
    result = run("import", si8, "--db", existing_db, "--val", val, "--test", test)
    assert result.exit_code == 2 and "Invalid value for '--" in the_error(result)
    assert sha256(existing_db) == before


def test_bad_split_fractions_are_a_usage_error_before_generate_writes(tmp_path, existing_db):
    before = sha256(existing_db)
    result = run("generate", "alloys", existing_db, "-n", 1, "--option", "size=1", "--val", 0.7, "--test", 0.7)
    assert result.exit_code == 2 and "--test" in the_error(result)
    assert sha256(existing_db) == before
    result = run("generate", "alloys", tmp_path / "new.db", "-n", 1, "--val", 0.6, "--test", 0.6)
    assert result.exit_code == 2 and not (tmp_path / "new.db").exists()


@pytest.mark.parametrize("val, test", [(0.7, 0.7), (-0.1, 0.1), (0.5, 0.5), (float("nan"), 0.1)])
def test_split_fractions_in_the_python_api(existing_db, val, test):
    with pytest.raises(SplitFractionError, match="val \\+ test") as info:
        SplitFractions(val=val, test=test)
    assert isinstance(info.value, ValueError) and isinstance(info.value, AseBpttError)
    before = sha256(existing_db)
    if val + test != 1:  # a test-only database (val + test == 1) is fine for assign_splits
        with pytest.raises(SplitFractionError):
            TrajectoryDB(existing_db).assign_splits(val=val, test=test)
    assert sha256(existing_db) == before


def test_trajectories_and_splits_are_one_transaction(tmp_path, existing_db, si8, monkeypatch):
    # The splits are written in the transaction that adds the trajectories:
    # when assigning them fails, the new trajectories are rolled back too.
    before = sha256(existing_db)

    def dies(self, *args, **kwargs):
        raise KeyboardInterrupt  # a kill between adding and splitting

    monkeypatch.setattr(TrajectoryDB, "assign_splits", dies)
    with pytest.raises(KeyboardInterrupt):
        import_paths([si8], TrajectoryDB(existing_db), splits=SplitFractions(val=0.1, test=0.1))
    assert sha256(existing_db) == before
    monkeypatch.undo()
    report = import_paths([si8], TrajectoryDB(existing_db), splits=SplitFractions(val=0.1, test=0.1))
    assert len(report.added) == 1
    assert all(
        t.split in ("train", "val", "test") for t in TrajectoryDB(existing_db).trajectories(converged_only=False)
    )


# ----------------------------------------------------------- database access
def make_read_only(path: Path) -> None:
    """Make a file or folder unwritable for everybody, also for root (``chattr +i``), or skip."""
    if os.geteuid() != 0:
        path.chmod(0o555 if path.is_dir() else 0o444)
        return
    # root ignores permission bits; the immutable attribute binds root too.
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode:
        pytest.skip(f"cannot make {path} read-only as root here (no chattr, or a file system without it)")


@pytest.fixture
def read_only():
    made: list[Path] = []

    def make(path: Path) -> Path:
        make_read_only(path)
        made.append(path)
        return path

    yield make
    for path in made:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(path)], check=False)
        path.chmod(0o755 if path.is_dir() else 0o644)


def test_read_only_database_file(existing_db, si8, read_only):
    before = sha256(read_only(existing_db))
    line = the_error(run("import", si8, "--db", existing_db))
    assert str(existing_db) in line and "cannot write" in line and "writable" in line
    assert sha256(existing_db) == before


def test_existing_database_in_read_only_folder(tmp_path, existing_db, si8, read_only):
    folder = tmp_path / "ro"
    folder.mkdir()
    db = Path(shutil.copy(existing_db, folder / "t.db"))
    before = sha256(db)
    read_only(folder)
    line = the_error(run("import", si8, "--db", db))
    assert str(db) in line and "t.db-journal" in line and "writable" in line
    line = the_error(run("generate", "alloys", db, "-n", 1, "--option", "size=1"))
    assert str(db) in line and "writable" in line
    assert sha256(db) == before


def test_new_database_in_read_only_folder(tmp_path, si8, read_only):
    folder = read_only(tmp_path)
    line = the_error(run("import", si8, "--db", folder / "new.db"))
    assert "new.db" in line and "cannot create" in line and "writable folder" in line
    assert "not an ase.db" not in line
    assert not (folder / "new.db").exists()


def test_locked_database(existing_db, si8, monkeypatch):
    from ase.db.sqlite import SQLite3Database

    # ase waits 20 s for a lock before it gives up; 0.1 s keeps the test short.
    monkeypatch.setattr(SQLite3Database, "_connect", lambda self: sqlite3.connect(self.filename, timeout=0.1))
    before = sha256(existing_db)
    other = sqlite3.connect(existing_db)
    other.execute("BEGIN EXCLUSIVE")  # another program writing
    try:
        line = the_error(run("import", si8, "--db", existing_db))
    finally:
        other.rollback()
        other.close()
    assert str(existing_db) in line and "locked by another program" in line and "run again" in line
    assert "not an ase.db" not in line
    assert sha256(existing_db) == before
    with pytest.raises(DatabaseAccessError):  # the write check in the Python API too
        other = sqlite3.connect(existing_db)
        other.execute("BEGIN IMMEDIATE")
        try:
            import_paths([si8], TrajectoryDB(existing_db))
        finally:
            other.rollback()
            other.close()


@pytest.mark.parametrize("command", ["import", "generate"])
def test_json_database_path(tmp_path, si8, command):
    args = (
        ("import", si8, "--db", tmp_path / "j.json")
        if command == "import"
        else ("generate", "alloys", tmp_path / "j.json")
    )
    line = the_error(run(*args))
    assert "j.json" in line and "not a JSON file" in line and "j.db" in line
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------- nothing imported
def test_import_exits_nonzero_when_everything_was_skipped(existing_db, vasp_data):
    before = sha256(existing_db)
    result = run("import", vasp_data / "si8_relax_truncated", vasp_data / "si2_unfinished", "--db", existing_db)
    assert result.exit_code == 1
    assert "every input was skipped" in the_error(result) and "truncated vasprun.xml" in result.output
    assert sha256(existing_db) == before
    # the same data again: nothing new, so the same
    again = run("import", vasp_data / "si2_relax_outcar", "--db", existing_db)
    assert again.exit_code == 1 and "already in the database" in again.output
    assert sha256(existing_db) == before


def test_import_of_nothing_usable_leaves_no_new_database(tmp_path, vasp_data):
    result = run("import", vasp_data / "si8_relax_truncated", "--db", tmp_path / "new.db")
    assert result.exit_code == 1 and "new.db" in the_error(result)
    assert not (tmp_path / "new.db").exists()


# ------------------------------------------------------- ase.db from elsewhere
@pytest.fixture
def foreign_db(tmp_path) -> tuple[Path, list[list]]:
    """An ase.db written by another program: two relaxations, told apart by a relaxation_id key."""
    relaxations = [cu_relaxation(seed) for seed in (1, 2)]
    path = tmp_path / "foreign.db"
    with ase.db.connect(path) as con:
        for rid, frames in enumerate(relaxations):
            for frame in frames:
                con.write(frame, relaxation_id=rid)
    return path, relaxations


def test_foreign_ase_db_is_refused_without_group_key(tmp_path, foreign_db):
    path, relaxations = foreign_db
    before = sha256(path)
    result = run("import", path, "--db", tmp_path / "new.db")
    assert "--group-key" in result.output and "relaxation_id" in result.output
    assert "every input was skipped" in the_error(result)
    assert not (tmp_path / "new.db").exists() and sha256(path) == before


def test_foreign_ase_db_grouped_by_key(tmp_path, foreign_db):
    path, relaxations = foreign_db
    result = run("import", path, "--db", tmp_path / "new.db", "--group-key", "relaxation_id")
    assert result.exit_code == 0, result.output
    stored = TrajectoryDB(tmp_path / "new.db").trajectories(converged_only=False)
    assert sorted(len(t.frames) for t in stored) == sorted(len(r) for r in relaxations)
    for traj in stored:
        (source,) = [r for r in relaxations if len(r) == len(traj.frames)] or pytest.fail("frame counts differ")
        for a, b in zip(source, traj.frames):
            assert np.abs(a.positions - b.positions).max() <= EXACT
            assert np.abs(a.get_forces() - b.get_forces()).max() <= EXACT


def test_trajectory_database_imports_by_traj_id(tmp_path, existing_db, si8):
    assert run("import", si8, "--db", existing_db).exit_code == 0
    original = {t.traj_id: t for t in TrajectoryDB(existing_db).trajectories(converged_only=False)}
    assert run("import", existing_db, "--db", tmp_path / "copy.db").exit_code == 0
    copied = {t.traj_id: t for t in TrajectoryDB(tmp_path / "copy.db").trajectories(converged_only=False)}
    assert set(copied) == set(original)
    for traj_id, traj in copied.items():
        assert len(traj.frames) == len(original[traj_id].frames)
        assert np.abs(traj.final.positions - original[traj_id].final.positions).max() <= EXACT


# ------------------------------------------------------------------- labels
@pytest.mark.parametrize("suffix", [".traj", ".extxyz"])
def test_labels_from_atoms_info(tmp_path, suffix):
    files = []
    for seed, label in ((1, "vacancy"), (2, "interstitial"), (3, None)):
        files.append(tmp_path / f"relax{seed}{suffix}")
        write(files[-1], cu_relaxation(seed, label))
    assert run("import", *files, "--db", tmp_path / "a.db").exit_code == 0
    labels = {Path(t.source).name: t.label for t in TrajectoryDB(tmp_path / "a.db").trajectories(converged_only=False)}
    assert labels == {f"relax1{suffix}": "vacancy", f"relax2{suffix}": "interstitial", f"relax3{suffix}": None}
    assert run("import", *files, "--db", tmp_path / "b.db", "--label-key", "defect").exit_code == 0
    labels = {Path(t.source).name: t.label for t in TrajectoryDB(tmp_path / "b.db").trajectories(converged_only=False)}
    assert labels == {f"relax{s}{suffix}": f"d{s}" for s in (1, 2, 3)}
    assert run("import", *files, "--db", tmp_path / "c.db", "--label", "given").exit_code == 0
    assert {t.label for t in TrajectoryDB(tmp_path / "c.db").trajectories(converged_only=False)} == {"given"}


def test_foreign_ase_db_group_without_forces_is_skipped_by_its_group(tmp_path):
    relaxation = cu_relaxation(1)
    path = tmp_path / "foreign.db"
    with ase.db.connect(path) as con:
        for frame in relaxation:
            con.write(frame, relaxation_id=0)
        for frame in cu_relaxation(2):
            bare = frame.copy()  # positions only: no calculator, no forces
            con.write(bare, relaxation_id=1)
    result = run("import", path, "--db", tmp_path / "new.db", "--group-key", "relaxation_id")
    assert result.exit_code == 0, result.output
    assert "added 1 trajectories, skipped 1" in result.output
    assert f"skipped {path}:relaxation_id=1: frame 0 has no forces" in result.output
    (stored,) = TrajectoryDB(tmp_path / "new.db").trajectories(converged_only=False)
    assert len(stored.frames) == len(relaxation)


# ----------------------------------------------- what the database layer may turn into one line, and what not
def test_a_missing_driver_is_one_line_but_a_bug_keeps_its_traceback(tmp_path, monkeypatch):
    import ase_bptt.data.db as db_module

    def no_driver(name):
        raise ModuleNotFoundError("No module named 'psycopg2'")

    monkeypatch.setattr(db_module, "open_store", no_driver)
    with pytest.raises(DatabaseAccessError, match="cannot connect"):
        TrajectoryDB("postgresql://user@host/db")

    def bug(name):
        raise AttributeError("'NoneType' object has no attribute 'connect'")

    monkeypatch.setattr(db_module, "open_store", bug)
    with pytest.raises(AttributeError):  # not dressed up as "cannot connect"
        TrajectoryDB(tmp_path / "new.db")


def test_a_bug_while_reading_metadata_is_not_called_a_foreign_file(tmp_path, monkeypatch):
    path = tmp_path / "d.db"
    TrajectoryDB(path)
    monkeypatch.setattr(type(ase.db.connect(path)), "count", lambda self, *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        TrajectoryDB(path)
