"""Importers: real VASP outputs, ASE formats round trip, MPtrj, and the bad-input table."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import read, write
from ase.io.trajectory import Trajectory as AseTrajectory

from ase_bptt.data import ingest
from ase_bptt.data.db import TrajectoryDB
from ase_bptt.data.generate import relax_frames
from ase_bptt.data.ingest import import_paths

# extxyz writes floats as text with enough digits for float64 round trips.
TEXT_TOL = 1e-12

# Facts from tests/data/vasp/SOURCES.md: (frames, first energy, last energy).
GOOD_VASP = {
    "si8_relax/vasprun.xml": (19, -42.91113348, -43.39087657),
    "si2_relax_outcar/OUTCAR.converged": (8, -6.50161629, -10.84171139),
    "gan_vN_relax/vasprun.xml.gz": (8, -200.46943203, -200.60111399),
    "gan_MgGa_relax/OUTCAR.gz": (5, -206.59344647, -206.95793434),
}


@pytest.fixture
def db(tmp_path):
    return TrajectoryDB(tmp_path / "t.db")


def emt_relaxation(seed=0, steps=6):
    """A short EMT relaxation of a rattled 4-atom Cu cell (frames with energy and forces)."""
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.rattle(0.1, seed=seed)
    return relax_frames(atoms, EMT(), fmax=1e-3, max_steps=steps)


def test_real_vasp_outputs(vasp_data, db):
    vasp = vasp_data
    report = import_paths([vasp], db)
    assert len(report.added) == 4
    by_source = {Path(t.source).relative_to(vasp).as_posix(): t for t in db.trajectories(converged_only=False)}
    assert set(by_source) == set(GOOD_VASP)
    for rel, (n, e_first, e_last) in GOOD_VASP.items():
        t = by_source[rel]
        assert len(t.frames) == n, rel
        assert t.frames[0].get_potential_energy() == pytest.approx(e_first, abs=1e-8)
        assert t.frames[-1].get_potential_energy() == pytest.approx(e_last, abs=1e-8)
    # fmax of the last frame (SOURCES.md): only the Si2 OUTCAR (0.0733 eV/A) is above 0.05.
    assert {rel for rel, t in by_source.items() if not t.converged} == {"si2_relax_outcar/OUTCAR.converged"}
    reasons = {Path(p).relative_to(vasp).as_posix(): r for p, r in report.skipped}
    assert "truncated" in reasons["si8_relax_truncated/vasprun.xml"]
    assert "19 <calculation> blocks, 18 with forces" in reasons["si8_relax_truncated/vasprun.xml"]
    assert "1 <calculation> blocks, 0 with forces" in reasons["si2_unfinished/vasprun.xml"]
    assert reasons["si2_unfinished/OUTCAR"] == "ASE reads no frames from it as vasp-out (unfinished or broken file?)"
    assert len({reasons[k] for k in reasons if k.startswith("si")}) == 3
    # importing again adds nothing and names the stored trajectory
    again = import_paths([vasp], db)
    assert again.added == [] and len(db) == 4
    dup = [r for _, r in again.skipped if r.startswith("already in the database as ")]
    assert len(dup) == 4


@pytest.mark.parametrize("name", ["relax.traj", "relax.extxyz"])
def test_ase_formats_round_trip(tmp_path, db, name):
    frames = emt_relaxation()
    path = tmp_path / name
    if name.endswith(".traj"):
        with AseTrajectory(path, "w") as tr:
            for f in frames:
                tr.write(f)
    else:
        write(path, frames)
    expected = read(path, index=":")
    report = import_paths(path, db, label="cu")
    assert len(report.added) == 1 and report.skipped == []
    (t,) = db.trajectories(converged_only=False)
    assert t.label == "cu" and len(t.frames) == len(expected)
    tol = 0.0 if name.endswith(".traj") else TEXT_TOL
    for a, b in zip(expected, t.frames):
        assert np.abs(a.positions - b.positions).max() <= tol
        assert np.abs(a.get_forces() - b.get_forces()).max() <= tol
        assert abs(a.get_potential_energy() - b.get_potential_energy()) <= tol


def _mptrj_sample(tmp_path):
    from pymatgen.io.ase import AseAtomsAdaptor

    frames = emt_relaxation(steps=11)  # 12 frames: ids 0..11 test numeric (not string) order
    entries = {}
    for i, a in enumerate(frames):
        entries[f"mp-30-1-{i}"] = {
            "structure": AseAtomsAdaptor.get_structure(a).as_dict(),
            "uncorrected_total_energy": a.get_potential_energy(),
            "corrected_total_energy": a.get_potential_energy() - 1.0,
            "force": a.get_forces().tolist(),
            "stress": [[0.0] * 3] * 3,
        }
    shuffled = dict(sorted(entries.items()))  # string order: 0, 1, 10, 11, 2, ...
    bad = {"mp-99-0-0": dict(entries["mp-30-1-0"])}  # one frame only
    path = tmp_path / "mptrj.json"
    path.write_text(json.dumps({"mp-30": shuffled, "mp-99": bad}))
    return path, frames


def test_mptrj_layout(tmp_path, db):
    path, frames = _mptrj_sample(tmp_path)
    report = import_paths(path, db)
    assert report.added == ["mp-30"]
    assert report.skipped == [(f"{path}:mp-99", "1 frame(s); a relaxation needs at least 2 (initial and relaxed)")]
    (t,) = db.trajectories(converged_only=False)
    assert len(t.frames) == len(frames)
    for a, b in zip(frames, t.frames):
        assert np.abs(a.positions - b.positions).max() < 1e-10
        assert np.abs(a.get_forces() - b.get_forces()).max() == 0.0
        # the uncorrected energy is preferred (forces are its gradient)
        assert b.get_potential_energy() == a.get_potential_energy()


def test_mptrj_bad_frame_id(tmp_path, db):
    path, _ = _mptrj_sample(tmp_path)
    data = json.loads(path.read_text())
    data["mp-30"]["weird"] = data["mp-30"]["mp-30-1-0"]
    path.write_text(json.dumps(data))
    report = import_paths(path, db)
    assert report.added == []
    assert any("<task>-<calculation>-<ionic step>" in r for _, r in report.skipped)


# ------------------------------------------------------------ bad-input table
def _bad_empty(tmp_path):
    p = tmp_path / "empty.traj"
    p.write_bytes(b"")
    return p, "empty file"


def _bad_truncated(tmp_path, vasp_data):
    return vasp_data / "si8_relax_truncated" / "vasprun.xml", "truncated vasprun.xml"


def _bad_no_forces(tmp_path):
    p = tmp_path / "noforces.xyz"
    frames = emt_relaxation()
    write(p, [f.copy() for f in frames])  # copy() drops the calculator
    return p, "frame 0 has no forces"


def _bad_atom_count(tmp_path):
    p = tmp_path / "count.extxyz"
    frames = emt_relaxation()
    short = frames[1].copy()
    del short[0]
    short.calc = SinglePointCalculator(short, energy=0.0, forces=np.zeros((len(short), 3)))
    write(p, [frames[0], short])
    return p, "atom count changes"


def _bad_nan(tmp_path):
    p = tmp_path / "nan.extxyz"
    frames = emt_relaxation()
    write(p, frames)
    # ASE will not write a calculator for NaN positions, so edit the text:
    # first atom of frame 2, x coordinate.
    lines = p.read_text().splitlines()
    n = len(frames[0])
    k = 2 * (n + 2) + 2
    parts = lines[k].split()
    parts[1] = "nan"
    lines[k] = " ".join(parts)
    p.write_text("\n".join(lines) + "\n")
    return p, "frame 2 has non-finite positions"


def _bad_unknown(tmp_path):
    p = tmp_path / "blob.bin"
    p.write_bytes(bytes(range(256)) * 4)
    return p, "unknown format"


BAD = {
    "empty": _bad_empty,
    "truncated": _bad_truncated,
    "no_forces": _bad_no_forces,
    "atom_count": _bad_atom_count,
    "nan_positions": _bad_nan,
    "unknown_format": _bad_unknown,
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_inputs_leave_database_unchanged(tmp_path, vasp_data, case):
    db_path = tmp_path / "t.db"
    db = TrajectoryDB(db_path)
    good = tmp_path / "good.traj"
    write(good, emt_relaxation(seed=7))
    import_paths(good, db)
    before = db_path.read_bytes()
    maker = BAD[case]
    path, reason = maker(tmp_path, vasp_data) if case == "truncated" else maker(tmp_path)
    report = import_paths(path, db)
    assert report.added == []
    assert len(report.skipped) == 1
    assert report.skipped[0][0] == str(path) and reason in report.skipped[0][1]
    assert db_path.read_bytes() == before and len(db) == 1


def test_same_file_twice_in_one_call(tmp_path, db):
    a = tmp_path / "a.traj"
    write(a, emt_relaxation())
    b = tmp_path / "b.traj"
    b.write_bytes(a.read_bytes())
    report = import_paths([a, b], db)
    assert len(report.added) == 1
    assert report.skipped == [(str(b), f"same relaxation as {a} in this import (that one is kept)")]


def test_failure_part_way_rolls_back(tmp_path, monkeypatch):
    db_path = tmp_path / "t.db"
    db = TrajectoryDB(db_path)
    write(tmp_path / "first.traj", emt_relaxation(seed=1))
    import_paths(tmp_path / "first.traj", db)
    before = db_path.read_bytes()
    rows_before = db._db.count()
    for i in range(3):
        write(tmp_path / f"new{i}.traj", emt_relaxation(seed=10 + i))
    original = TrajectoryDB.add_trajectory
    calls = []

    def failing(self, frames, **kw):
        calls.append(kw["traj_id"])
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        return original(self, frames, **kw)

    monkeypatch.setattr(TrajectoryDB, "add_trajectory", failing)
    with pytest.raises(OSError, match="simulated"):
        import_paths([tmp_path / f"new{i}.traj" for i in range(3)], db)
    assert len(calls) == 2  # the first one was written inside the transaction, then undone
    assert db._db.count() == rows_before and len(db) == 1
    assert db_path.read_bytes() == before


def test_read_trajectory_names_the_file(tmp_path):
    p = tmp_path / "broken.bin"
    p.write_bytes(b"\x00\x01garbage")
    with pytest.raises(ingest.InvalidTrajectoryError, match="broken.bin"):
        ingest.read_trajectory(p)


def test_missing_path_reported(tmp_path, db):
    report = import_paths(tmp_path / "nope", db)
    assert report.skipped == [(str(tmp_path / "nope"), "no such file or directory")]


def test_target_database_inside_walked_directory(tmp_path):
    db = TrajectoryDB(tmp_path / "inside.db")
    write(tmp_path / "a.traj", emt_relaxation())
    report = import_paths(tmp_path, db)
    assert len(report.added) == 1
    assert (str(tmp_path / "inside.db"), "the target database itself") in report.skipped
    again = import_paths(tmp_path, db)
    assert again.added == [] and len(db) == 1
