"""TrajectoryDB: round trip, validation, convergence, splits, summary, errors."""

from __future__ import annotations

import ase.db
import numpy as np
import pytest
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from ase_bptt.data.db import (
    DuplicateTrajectoryError,
    InvalidTrajectoryError,
    NotATrajectoryDBError,
    TrajectoryDB,
)
from ase_bptt.data.db_store import RowStore

EXACT = 0.0  # values pass through SQLite as float64 blobs: bit-exact


def make_frames(n_frames=3, *, seed=0, last_fmax=0.01, n_atoms=2, energy=True):
    """A hand-made 'relaxation': forces scaled so the last frame's max force is last_fmax."""
    rng = np.random.default_rng(seed)
    cell = np.eye(3) * 4.0
    base = rng.uniform(0, 4, size=(n_atoms, 3))
    frames = []
    for i in range(n_frames):
        a = Atoms("Cu" * n_atoms, positions=base + 0.01 * i, cell=cell, pbc=True)
        f = rng.normal(size=(n_atoms, 3))
        f /= np.linalg.norm(f, axis=1).max()
        scale = last_fmax if i == n_frames - 1 else 1.0
        a.calc = SinglePointCalculator(a, energy=(-1.0 - i if energy else None), forces=f * scale)
        frames.append(a)
    return frames


@pytest.fixture
def db(tmp_path):
    return TrajectoryDB(tmp_path / "t.db")


def test_round_trip_positions_forces_energies(db):
    frames = make_frames(4, seed=1)
    tid = db.add_trajectory(frames, label="lab", source="src")
    (traj,) = db.trajectories()
    assert traj.traj_id == tid and traj.label == "lab" and traj.source == "src" and traj.split is None
    assert len(traj.frames) == 4 and len(db) == 1
    for a, b in zip(frames, traj.frames):
        assert np.abs(a.positions - b.positions).max() <= EXACT
        assert np.abs(a.get_forces() - b.get_forces()).max() <= EXACT
        assert a.get_potential_energy() == b.get_potential_energy()
        assert np.array_equal(a.cell.array, b.cell.array) and (b.pbc == a.pbc).all()


def test_metadata_and_reopen(tmp_path):
    path = tmp_path / "t.db"
    db = TrajectoryDB(path, converged_fmax=0.02)
    assert db.metadata["ase_bptt_schema"] == 1 and db.metadata["converged_fmax"] == 0.02
    db.add_trajectory(make_frames())
    again = TrajectoryDB(path, create=False)
    assert again.converged_fmax == 0.02 and len(again) == 1
    with pytest.raises(ValueError, match="converged_fmax=0.02"):
        TrajectoryDB(path, converged_fmax=0.05)


def test_missing_database_without_create(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.db"):
        TrajectoryDB(tmp_path / "nothere.db", create=False)


def test_database_made_by_another_program(tmp_path):
    path = tmp_path / "other.db"
    ase.db.connect(path).write(Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.7]]))
    before = path.read_bytes()
    with pytest.raises(NotATrajectoryDBError, match=r"other\.db.*another program.*ase-bptt import"):
        TrajectoryDB(path)
    assert path.read_bytes() == before


def test_file_that_is_no_database(tmp_path):
    path = tmp_path / "notes.db"
    path.write_text("just some text, not SQLite\n" * 20)
    with pytest.raises(NotATrajectoryDBError, match="notes.db"):
        TrajectoryDB(path)


def test_converged_flag_uses_threshold(db):
    db.add_trajectory(make_frames(seed=1, last_fmax=0.04), traj_id="relaxed")
    db.add_trajectory(make_frames(seed=2, last_fmax=0.06), traj_id="unrelaxed")
    assert [t.traj_id for t in db.trajectories()] == ["relaxed"]
    all_ = {t.traj_id: t.converged for t in db.trajectories(converged_only=False)}
    assert all_ == {"relaxed": True, "unrelaxed": False}


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda fr: fr[:1], "at least 2"),
        (lambda fr: [fr[0], Atoms("Cu2", positions=fr[1].positions, cell=fr[1].cell, pbc=True)], "no forces"),
        (lambda fr: [fr[0], _with(fr[1], positions=np.full((2, 3), np.nan))], "non-finite positions"),
        (lambda fr: [fr[0], _with(fr[1], forces=np.full((2, 3), np.inf))], "non-finite forces"),
        (lambda fr: [fr[0], _with(fr[1], energy=np.nan)], "non-finite energy"),
        (lambda fr: [fr[0], make_frames(2, n_atoms=3)[1]], "atom count changes"),
        (lambda fr: [fr[0], _with(fr[1], symbols="CuAu")], "species order"),
    ],
)
def test_invalid_trajectories_write_nothing(db, mutate, message):
    with pytest.raises(InvalidTrajectoryError, match=message):
        db.add_trajectory(mutate(make_frames()))
    assert len(db) == 0 and db._db.count() == 0


def _with(atoms, *, positions=None, forces=None, energy=None, symbols=None):
    a = atoms.copy()
    if positions is not None:
        a.positions = positions
    if symbols is not None:
        a.symbols = symbols
    a.calc = SinglePointCalculator(
        a,
        energy=atoms.get_potential_energy() if energy is None else energy,
        forces=atoms.get_forces() if forces is None else forces,
    )
    return a


def test_duplicates_rejected(db):
    frames = make_frames()
    tid = db.add_trajectory(frames)
    with pytest.raises(DuplicateTrajectoryError, match=f"already in the database as {tid}"):
        db.add_trajectory(frames, traj_id="other-name")
    with pytest.raises(DuplicateTrajectoryError, match="already exists"):
        db.add_trajectory(make_frames(seed=5), traj_id=tid)
    assert len(db) == 1


def test_transaction_rolls_back(db):
    with pytest.raises(RuntimeError):
        with db.transaction():
            db.add_trajectory(make_frames(seed=1))
            db.add_trajectory(make_frames(seed=2))
            raise RuntimeError("simulated failure")
    assert len(db) == 0 and db._db.count() == 0


def test_splits_per_trajectory_deterministic_and_stable(tmp_path):
    a = TrajectoryDB(tmp_path / "a.db")
    b = TrajectoryDB(tmp_path / "b.db")
    for i in range(24):
        a.add_trajectory(make_frames(seed=i), traj_id=f"t{i:02d}")
        b.add_trajectory(make_frames(seed=i), traj_id=f"t{i:02d}")
    counts = a.assign_splits(val=0.25, test=0.25, seed=3)
    assert sum(counts.values()) == 24 and all(counts[s] > 0 for s in ("train", "val", "test"))
    # b gets more trajectories before its splits are assigned: old ones must not move.
    for i in range(24, 36):
        b.add_trajectory(make_frames(seed=i), traj_id=f"t{i:02d}")
    b.assign_splits(val=0.25, test=0.25, seed=3)
    split_a = {t.traj_id: t.split for t in a.trajectories()}
    split_b = {t.traj_id: t.split for t in b.trajectories()}
    assert all(split_b[k] == v for k, v in split_a.items())
    # every frame row of a trajectory carries its trajectory's split
    for row in a._db.select(include_data=False):
        assert row.split == split_a[row.traj_id]
    # existing splits are kept unless reassign=True
    a.assign_splits(val=0.25, test=0.25, seed=99)
    assert {t.traj_id: t.split for t in a.trajectories()} == split_a
    a.assign_splits(val=0.0, test=0.0, seed=99, reassign=True)
    assert {t.split for t in a.trajectories()} == {"train"}
    assert len(a.trajectories("train")) == 24 and a.trajectories("val") == []


def test_summary_counts(db):
    db.add_trajectory(make_frames(3, seed=1), label="vacancy")
    db.add_trajectory(make_frames(4, seed=2), label="vacancy")
    db.add_trajectory(make_frames(5, seed=3, last_fmax=1.0), label="interstitial")
    text = db.summary()
    lines = {tuple(line.split()) for line in text.splitlines()}
    assert ("-", "vacancy", "yes", "2", "7") in lines
    assert ("-", "interstitial", "no", "1", "5") in lines
    assert ("total", "3", "12") in lines


def test_json_path_rejected(tmp_path):
    with pytest.raises(ValueError, match="SQLite"):
        TrajectoryDB(tmp_path / "x.json")


def test_any_extension_is_sqlite(tmp_path):
    db = TrajectoryDB(tmp_path / "trajectories.sqlite")
    db.add_trajectory(make_frames())
    assert (tmp_path / "trajectories.sqlite").read_bytes()[:15] == b"SQLite format 3"
    assert len(TrajectoryDB(tmp_path / "trajectories.sqlite", create=False)) == 1


def test_fast_sqlite_reader_matches_ase_select(db):
    from ase.constraints import FixAtoms

    frames = make_frames(3, seed=4, n_atoms=3)
    for f in frames:
        f.set_constraint(FixAtoms(indices=[1]))
        f.set_masses([1.0, 2.0, 3.0])
    db.add_trajectory(frames, traj_id="fixed", label="x")
    db.add_trajectory(make_frames(2, seed=5, energy=False), traj_id="plain")
    db.assign_splits(val=0.0, test=0.0)
    for split, conv in ((None, True), ("train", False), ("val", False)):
        fast = db._store.frame_records(split, conv)
        slow = RowStore(db._db, db.name).frame_records(split, conv)
        assert len(fast) == len(slow)
        for (ka, fa), (kb, fb) in zip(
            sorted(fast, key=lambda r: (r[0]["traj_id"], r[0]["frame"])),
            sorted(slow, key=lambda r: (r[0]["traj_id"], r[0]["frame"])),
        ):
            assert ka == kb
            for key in ("numbers", "positions", "cell", "pbc", "forces"):
                assert np.array_equal(fa[key], fb[key]), key
            assert fa["energy"] == fb["energy"]
            assert (fa["masses"] is None) == (fb["masses"] is None)
            assert [c.todict() for c in fa["constraints"]] == [c.todict() for c in fb["constraints"]]
    (t,) = [t for t in db.trajectories() if t.traj_id == "fixed"]
    assert list(t.frames[0].constraints[0].get_indices()) == [1]
    assert np.array_equal(t.frames[0].get_masses(), [1.0, 2.0, 3.0])
    # forces come back raw (FixAtoms is not applied to stored forces)
    assert np.array_equal(t.frames[0].get_forces(apply_constraint=False), frames[0].get_forces(apply_constraint=False))


def test_split_update_is_visible_to_ase(db):
    for i in range(6):
        db.add_trajectory(make_frames(seed=i), traj_id=f"t{i}")
    db.assign_splits(val=0.3, test=0.3, seed=1)
    db.assign_splits(val=0.5, test=0.2, seed=2, reassign=True)
    splits = {t.traj_id: t.split for t in db.trajectories()}
    # ase's own query machinery (keys and text_key_values tables) sees the same splits
    for split in ("train", "val", "test"):
        via_ase = {row.traj_id for row in db._db.select(split=split, is_final=True)}
        assert via_ase == {k for k, v in splits.items() if v == split}
        assert db._db.count(split=split) == 3 * len(via_ase)
    assert db._db.count("split") == 18  # one 'split' key per frame row, not duplicated
    # row objects decode the updated key-value pairs too
    assert all(row.split == splits[row.traj_id] for row in db._db.select())


def test_read_only_database_can_be_read(tmp_path, monkeypatch):
    import sqlite3

    from ase.db.sqlite import SQLite3Database

    path = tmp_path / "ro.db"
    TrajectoryDB(path).add_trajectory(make_frames(), traj_id="x")
    # SQLite opens a file it may not write read-only; file permissions cannot
    # make that happen here (the tests may run as root), its URI mode=ro can.
    monkeypatch.setattr(
        SQLite3Database, "_connect", lambda self: sqlite3.connect(f"file:{self.filename}?mode=ro", uri=True)
    )
    db = TrajectoryDB(path, create=False)
    assert [t.traj_id for t in db.trajectories()] == ["x"]
