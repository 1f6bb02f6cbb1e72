"""One relaxation from two files is imported once: duplicates by content within POSITION_TOL.

The files of one run differ in the digits they print: extxyz keeps 8
decimals (5e-9 A off a .traj), VASP's OUTCAR 5 for positions (and may write
an atom a lattice vector away from where vasprun.xml has it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import read, write
from click.testing import CliRunner

from ase_bptt.cli import cli
from ase_bptt.data.db import TrajectoryDB
from ase_bptt.data.duplicates import POSITION_TOL, same_relaxation
from ase_bptt.data.generate import relax_frames
from ase_bptt.data.ingest import import_paths


def cu_relaxation(seed: int) -> list:
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True) * (2, 1, 1)
    atoms.rattle(0.05, seed=seed)
    return relax_frames(atoms, EMT(), fmax=0.05)


def copied(frames: list, change) -> list:
    """The frames with ``change(positions) -> positions`` applied, forces kept."""
    out = []
    for a in frames:
        b = a.copy()
        b.positions = change(a.positions.copy())
        b.calc = SinglePointCalculator(b, energy=a.get_potential_energy(), forces=a.get_forces())
        out.append(b)
    return out


@pytest.fixture(scope="module")
def relaxation() -> list:
    return cu_relaxation(0)


# ----------------------------------------------------------------- the rule
def test_what_counts_as_the_same_relaxation(relaxation):
    grid = 1e-4  # a rounding grid as fine as the tolerance: values on its half-way points round apart
    on_boundary = copied(relaxation, lambda p: (np.floor(p / grid) + 0.5) * grid)
    nudged = [copied(on_boundary, lambda p, s=s: p + s * 1e-9) for s in (1, -1)]
    assert not np.array_equal(np.round(nudged[0][0].positions, 4), np.round(nudged[1][0].positions, 4))
    assert same_relaxation(nudged[0], nudged[1])
    assert same_relaxation(relaxation, copied(relaxation, lambda p: np.round(p, 5)))  # OUTCAR's 5 decimals

    def wrapped(p):
        p[0] += relaxation[0].cell[0]  # one atom written a lattice vector away
        return p

    assert same_relaxation(relaxation, copied(relaxation, wrapped))
    assert same_relaxation(relaxation, copied(relaxation, lambda p: p + 0.9 * POSITION_TOL))
    assert not same_relaxation(relaxation, copied(relaxation, lambda p: p + 2 * POSITION_TOL))
    assert not same_relaxation(relaxation, relaxation[:-1])  # one frame fewer
    swapped = copied(relaxation, lambda p: p)
    for a in swapped:
        a.numbers[[0, 1]] = (28, 29)  # another species order
    assert not same_relaxation(relaxation, swapped)
    other_cell = copied(relaxation, lambda p: p)
    for a in other_cell:
        a.set_cell(a.cell * (1 + 1e-3), scale_atoms=False)
    assert not same_relaxation(relaxation, other_cell)


# ---------------------------------------------------------------- importing
def test_traj_and_extxyz_of_twelve_relaxations_import_once(tmp_path):
    folder = tmp_path / "good"
    folder.mkdir()
    for seed in range(12):
        frames = cu_relaxation(seed)
        write(folder / f"run{seed:02d}.traj", frames)
        write(folder / f"run{seed:02d}.extxyz", frames)
    extxyz = read(folder / "run00.extxyz", index=":")
    offset = max(np.abs(a.positions - b.positions).max() for a, b in zip(extxyz, read(folder / "run00.traj", ":")))
    assert 0 < offset < 1e-8  # not byte-equal: the old exact-hash check imported both
    result = CliRunner().invoke(cli, ["-q", "import", str(folder), "--db", str(tmp_path / "d.db")])
    assert result.exit_code == 0, result.output
    assert "added 12 trajectories, skipped 12" in result.output
    for seed in range(12):
        kept, copy = folder / f"run{seed:02d}.extxyz", folder / f"run{seed:02d}.traj"
        assert f"skipped {copy}: same relaxation as {kept} in this import (that one is kept)" in result.output
    db = TrajectoryDB(tmp_path / "d.db")
    assert len(db) == 12 and db.check() == []


def test_a_later_import_of_another_format_names_the_stored_copy(tmp_path, relaxation):
    write(tmp_path / "a.traj", relaxation)
    write(tmp_path / "a.extxyz", relaxation)
    db = TrajectoryDB(tmp_path / "d.db")
    (traj_id,) = import_paths([tmp_path / "a.traj"], db).added
    report = import_paths([tmp_path / "a.extxyz"], db)
    assert report.added == []
    assert report.skipped == [
        (str(tmp_path / "a.extxyz"), f"already in the database as {traj_id} (from {tmp_path / 'a.traj'})")
    ]


def test_vasprun_and_an_outcar_precision_copy_of_one_run_import_once(tmp_path, vasp_data):
    # si8_relax/vasprun.xml is a real VASP relaxation; its copy has OUTCAR's printed precision
    # (positions 5 decimals, forces 6) and one atom written a lattice vector away.
    run = tmp_path / "si8"
    run.mkdir()
    vasprun = Path(run / "vasprun.xml")
    vasprun.write_bytes((vasp_data / "si8_relax" / "vasprun.xml").read_bytes())
    frames = read(vasprun, index=":")
    outcar_like = []
    for a in frames:
        b = a.copy()
        b.positions = np.round(a.positions, 5)
        b.positions[3] -= a.cell[2]
        b.calc = SinglePointCalculator(b, energy=a.get_potential_energy(), forces=np.round(a.get_forces(), 6))
        outcar_like.append(b)
    write(run / "outcar_precision.extxyz", outcar_like)
    db = TrajectoryDB(tmp_path / "v.db")
    report = import_paths([run], db)
    assert len(report.added) == 1
    assert report.skipped == [
        (
            str(run / "vasprun.xml"),
            f"same relaxation as {run / 'outcar_precision.extxyz'} in this import (that one is kept)",
        )
    ]
