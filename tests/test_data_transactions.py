"""Imports and generate runs killed, run twice at once, or refused: the database is as before or whole.

Real ``ase-bptt`` processes on real files. ase's SQLite backend commits every
5,000 uses of its connection even inside ``with db:``; the imports here hold
6,000 frames, so an import that were not one transaction would show part of
itself to a reader while it runs, and keep that part when killed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import write
from click.testing import CliRunner

from ase_bptt.cli import cli
from ase_bptt.data.db import TrajectoryDB

#: 60 files of 100 frames: more frames than ase's commit interval of 5,000 changes.
N_FILES, N_FRAMES = 60, 100
#: Seconds between two looks at a running import.
POLL = 0.002
#: Seconds SQLite's journal must stay before an import counts as writing.
WRITE_START = 0.05


def write_relaxations(folder: Path, n_files: int, n_frames: int, seed: int = 0) -> list[Path]:
    """``n_files`` relaxation-like trajectories of an 8-atom Cu cell (positions move to the lattice)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    base = bulk("Cu", "fcc", a=3.6, cubic=True) * (2, 1, 1)
    files = []
    for k in range(n_files):
        start = base.positions + rng.normal(scale=0.1, size=base.positions.shape)
        frames = []
        for t in range(n_frames):
            atoms = base.copy()
            atoms.positions = base.positions + (start - base.positions) * (1 - t / n_frames)
            forces = rng.normal(scale=0.01, size=(len(atoms), 3))
            atoms.calc = SinglePointCalculator(atoms, energy=-float(t), forces=forces)
            frames.append(atoms)
        files.append(folder / f"r{seed}-{k:03d}.traj")
        write(files[-1], frames)
    return files


@pytest.fixture(scope="module")
def big_runs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("big") / "runs"
    write_relaxations(folder, N_FILES, N_FRAMES)
    return folder


@pytest.fixture
def before_db(tmp_path) -> Path:
    """A database holding two other relaxations, with splits."""
    files = write_relaxations(tmp_path / "first", 2, 12, seed=1)
    path = tmp_path / "before.db"
    assert CliRunner().invoke(cli, ["-q", "import", *map(str, files), "--db", str(path)]).exit_code == 0
    return path


def content(path: Path) -> tuple:
    """Everything the database holds, independent of row ids and write times.

    Opened read-write, as the next command would: SQLite first rolls back
    what a killed writer left in its journal.
    """
    with closing(sqlite3.connect(path)) as con:
        rows = con.execute("SELECT key_value_pairs, numbers, positions, cell, forces, energy FROM systems").fetchall()
        meta = con.execute("SELECT value FROM information WHERE name='metadata'").fetchall()
    return tuple(sorted(rows)), tuple(meta)


def visible_rows(path: Path) -> int | None:
    """Rows a reader sees now (None while the writer holds the exclusive lock)."""
    try:
        with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=0)) as con:
            return con.execute("SELECT COUNT(*) FROM systems").fetchone()[0]
    except sqlite3.OperationalError:
        return None


def cli_process(*args) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "ase_bptt.cli", "-q", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )


def watch(proc: subprocess.Popen, db: Path, kill_after: float | None) -> tuple[float, bool]:
    """Follow an import writing into ``db``: ``(seconds since it began writing, killed)``.

    It began writing when SQLite's journal beside ``db`` first stayed for
    :data:`WRITE_START` s (the write check before the import is shorter).
    Unless ``kill_after`` is None it is killed (SIGKILL) ``kill_after``
    seconds after that, or at once when a reader sees rows appear while it
    runs: part of an import committed before its end, or all of it just
    before the process exits.
    """
    rows_before = visible_rows(db)
    journal = Path(f"{db}-journal")
    stretch = start = None
    while proc.poll() is None:
        now = time.monotonic()
        stretch = (stretch or now) if journal.exists() else None
        if start is None and stretch is not None and now - stretch >= WRITE_START:
            start = stretch
        seen = visible_rows(db) if kill_after is not None else rows_before
        if (seen is not None and seen != rows_before) or (
            kill_after is not None and start is not None and now - start >= kill_after
        ):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return now - (start or now), True
        time.sleep(POLL)
    return time.monotonic() - (start or time.monotonic()), False


def test_a_killed_import_leaves_the_database_as_before_and_a_rerun_completes_it(tmp_path, big_runs, before_db):
    complete_db = Path(shutil.copy(before_db, tmp_path / "complete.db"))
    proc = cli_process("import", big_runs, "--db", complete_db)
    writing, killed = watch(proc, complete_db, kill_after=None)
    assert proc.returncode == 0 and not killed, proc.stderr.read()
    complete = content(complete_db)
    assert len(TrajectoryDB(complete_db)) == 2 + N_FILES
    before = content(before_db)
    pristine = shutil.copy(before_db, tmp_path / "pristine.db")
    mid_write = []
    for fraction in (0.1, 0.7):  # early and late in the write
        shutil.copy(pristine, before_db)
        proc = cli_process("import", big_runs, "--db", before_db)
        _, killed = watch(proc, before_db, kill_after=fraction * writing)
        if killed:
            assert proc.returncode == -signal.SIGKILL
            assert content(before_db) in (before, complete)
            mid_write.append(content(before_db) == before)
        else:  # this run wrote faster than the first: it finished before the moment came
            assert proc.returncode == 0 and content(before_db) == complete
    assert any(mid_write), "no kill landed while the import was writing"
    # The re-run completes what a kill left; when the last kill came after the commit there is nothing left to
    # add, and import then exits 1 by design ("nothing imported: every input was skipped").
    already_complete = content(before_db) == complete
    again = cli_process("import", big_runs, "--db", before_db)
    assert again.wait() == (1 if already_complete else 0), again.stderr.read()
    assert content(before_db) == complete
    assert TrajectoryDB(before_db).check() == []


def test_an_unsatisfiable_hold_out_writes_nothing(tmp_path, big_runs):
    # Checked before the first write, also for an import larger than ase's commit interval.
    db = tmp_path / "h.db"
    files = write_relaxations(tmp_path / "train", 3, 12, seed=1)
    assert CliRunner().invoke(cli, ["-q", "import", *map(str, files), "--db", str(db), "--label", "old"]).exit_code == 0
    digest = hashlib.sha256(db.read_bytes()).hexdigest()
    args = ["--label", "new", "--val", "0", "--test", "0", "--hold-out-label", "*"]
    result = CliRunner().invoke(cli, ["-q", "import", str(big_runs), "--db", str(db), *args])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"hold-out label * takes all {3 + N_FILES} trajectories" in result.output
    assert hashlib.sha256(db.read_bytes()).hexdigest() == digest


def test_two_imports_at_once_skip_what_the_other_added(tmp_path, before_db):
    files = write_relaxations(tmp_path / "runs", 120, 20, seed=2)
    first, second = files[:80], files[40:]  # 40 files in both
    procs = [cli_process("import", *chunk, "--db", before_db) for chunk in (first, second)]
    outputs = [p.communicate() for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err
        assert "added" in out and "Error" not in err
    added = [int(out.split("added ")[1].split()[0]) for out, _ in outputs]
    skipped = [int(out.split("skipped ")[1].split()[0]) for out, _ in outputs]
    assert sum(added) == 120 and [a + s for a, s in zip(added, skipped)] == [80, 80]
    db = TrajectoryDB(before_db)
    assert len(db) == 2 + 120 and db.check() == []


def test_a_killed_generate_keeps_whole_trajectories_with_splits(tmp_path):
    db = tmp_path / "g.db"
    proc = cli_process("generate", "alloys", db, "-n", "40", "--option", "size=1")
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if db.exists() and (visible_rows(db) or 0) > 0 and len(TrajectoryDB(db, read_only=True)) >= 3:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "generate finished before it could be killed"
    kept = TrajectoryDB(db)
    assert 3 <= len(kept) < 40 and kept.check() == []
    assert (
        CliRunner().invoke(cli, ["-q", "generate", "alloys", str(db), "-n", "40", "--option", "size=1"]).exit_code == 0
    )
    done = TrajectoryDB(db)
    assert len(done) == 40 and done.check() == []


# ------------------------------------------------------------------ ase-bptt check
def test_check_names_every_break_and_changes_nothing(tmp_path, before_db):
    import ase.db

    ok = CliRunner().invoke(cli, ["check", str(before_db)])
    assert ok.exit_code == 0 and "2 trajectories, each whole" in ok.output
    # What the old import left behind when killed: 11 of 108 frames, no final frame, no split;
    # and a frame written twice.
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.calc = SinglePointCalculator(atoms, forces=np.zeros((len(atoms), 3)))
    with ase.db.connect(before_db) as con:
        for i in range(11):
            con.write(atoms, traj_id="cut-off", frame=i, n_frames=108, is_final=False)
        con.write(atoms, traj_id="cut-off", frame=3, n_frames=108, is_final=False)
    digest = hashlib.sha256(before_db.read_bytes()).hexdigest()
    result = CliRunner().invoke(cli, ["check", str(before_db)])
    assert result.exit_code == 1 and "1 problem" not in result.output
    lines = result.output.splitlines()
    assert any("cut-off: frame(s) 3 stored more than once" in line for line in lines)
    assert any("cut-off: holds 11 of its 108 frames (missing 11-107" in line for line in lines)
    assert any("cut-off: no final frame" in line for line in lines)
    assert any("cut-off: has no split" in line for line in lines)
    assert "Error: " in lines[-1] and "4 problem(s)" in lines[-1]
    assert hashlib.sha256(before_db.read_bytes()).hexdigest() == digest
