"""Datasets: frames and relaxations as padded Batches, minimum-image relaxed targets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from ase_bptt.data.datasets import FrameDataset, RelaxationDataset
from ase_bptt.data.db import TrajectoryDB

F32 = 1e-6  # float32 storage of float64 values of order 1-10


def traj(n_atoms, n_frames, *, seed, last_fmax=0.01, energy=True, cell=5.0):
    rng = np.random.default_rng(seed)
    base = rng.uniform(0, cell, size=(n_atoms, 3))
    frames = []
    for i in range(n_frames):
        a = Atoms(
            numbers=rng.choice([13, 29], size=n_atoms) if i == 0 else frames[0].numbers,
            positions=base + 0.02 * i,
            cell=np.eye(3) * cell,
            pbc=True,
        )
        f = rng.normal(size=(n_atoms, 3))
        f *= (last_fmax if i == n_frames - 1 else 1.0) / np.linalg.norm(f, axis=1).max()
        a.calc = SinglePointCalculator(a, energy=float(seed * 10 + i) if energy else None, forces=f)
        frames.append(a)
    return frames


@pytest.fixture
def db(tmp_path):
    db = TrajectoryDB(tmp_path / "d.db")
    db.add_trajectory(traj(2, 3, seed=1), traj_id="a", label="small")
    db.add_trajectory(traj(5, 4, seed=2), traj_id="b", label="big")
    db.add_trajectory(traj(3, 2, seed=3, last_fmax=1.0), traj_id="c", label="unrelaxed")
    return db


def test_frame_dataset_covers_every_frame(db):
    ds = FrameDataset(db, None)
    assert len(ds) == 9
    stored = {(t.traj_id, i): f for t in db.trajectories(converged_only=False) for i, f in enumerate(t.frames)}
    seen = []
    for fb in ds.batches(4, shuffle=True, generator=torch.Generator().manual_seed(0)):
        b = fb.batch
        assert b.positions.dtype == torch.float32 and fb.forces.shape == b.positions.shape
        # padded per batch: N is the largest structure of this batch
        assert b.positions.shape[1] == int(b.n_atoms.max())
        assert fb.energy is not None
        for k in range(len(b)):
            n = int(b.n_atoms[k])
            energy = float(fb.energy[k])
            matches = [key for key, f in stored.items() if len(f) == n and f.get_potential_energy() == energy]
            assert len(matches) == 1
            f = stored[matches[0]]
            seen.append(matches[0])
            assert np.abs(b.positions[k, :n].double().numpy() - f.positions).max() < F32
            assert np.abs(fb.forces[k, :n].double().numpy() - f.get_forces()).max() < F32
            assert np.array_equal(b.numbers[k, :n].numpy(), f.numbers)
            assert torch.all(fb.forces[k, n:] == 0) and not b.mask[k, n:].any()
    assert sorted(seen) == sorted(stored)


def test_frame_dataset_without_energy(tmp_path):
    db = TrajectoryDB(tmp_path / "e.db")
    db.add_trajectory(traj(2, 3, seed=1, energy=False))
    ds = FrameDataset(db, None, dtype=torch.float64)
    (fb,) = list(ds.batches(10))
    assert fb.energy is None and not ds.has_energy and fb.batch.positions.dtype == torch.float64


def test_relaxation_dataset_converged_only(db):
    ds = RelaxationDataset(db, None)
    assert len(ds) == 2
    (rb,) = list(ds.batches(8))
    assert rb.traj_ids == ["a", "b"] and rb.labels == ["small", "big"]
    expected = 0.02 * 3  # b moved 0.02 A per frame along (1,1,1) for 3 steps
    disp = (rb.relaxed[1, :5] - rb.initial.positions[1, :5]).double()
    assert torch.allclose(disp, torch.full_like(disp, expected), atol=F32)
    assert len(RelaxationDataset(db, None, converged_only=False)) == 3


def test_relaxed_is_unwrapped_to_the_minimum_image(tmp_path):
    # One atom crosses the boundary of a 4 A cube: x goes 3.95 -> 4.05, stored wrapped as 0.05.
    cell = np.eye(3) * 4.0
    first = Atoms("Cu2", positions=[[3.95, 1.0, 1.0], [2.0, 2.0, 2.0]], cell=cell, pbc=True)
    last = Atoms("Cu2", positions=[[0.05, 1.0, 1.0], [2.0, 2.0, 2.1]], cell=cell, pbc=True)
    first.calc = SinglePointCalculator(first, energy=0.0, forces=np.ones((2, 3)))
    last.calc = SinglePointCalculator(last, energy=-1.0, forces=np.zeros((2, 3)))
    db = TrajectoryDB(tmp_path / "w.db")
    db.add_trajectory([first, last])
    (rb,) = list(RelaxationDataset(db, None, dtype=torch.float64).batches(1))
    d = (rb.relaxed - rb.initial.positions)[0].numpy()
    assert np.allclose(d, [[0.1, 0.0, 0.0], [0.0, 0.0, 0.1]], atol=1e-12)


def test_splits_and_paths(db):
    db.assign_splits(val=0.0, test=1.0)
    assert len(FrameDataset(db.name, "test")) == 9  # opened by path
    assert len(FrameDataset(db, "train")) == 0
    assert list(FrameDataset(db, "train").batches(4)) == []
    with pytest.raises(ValueError, match="batch_size"):
        next(RelaxationDataset(db, "test").batches(0))


def test_fixed_atoms_and_masses_reach_the_batch(tmp_path):
    from ase.constraints import FixAtoms

    frames = traj(3, 2, seed=4)
    for f in frames:
        f.set_constraint(FixAtoms(indices=[0]))
    db = TrajectoryDB(tmp_path / "f.db")
    db.add_trajectory(frames)
    (rb,) = list(RelaxationDataset(db, None, dtype=torch.float64).batches(1))
    assert rb.initial.fixed[0].tolist() == [True, False, False]
    assert np.allclose(rb.initial.masses[0].numpy(), frames[0].get_masses())
    # same as Batch.from_atoms on the stored initial frame
    ref = __import__("ase_bptt.batch", fromlist=["Batch"]).Batch.from_atoms(db.trajectories()[0].frames[0])
    for name in ("positions", "numbers", "masses", "mask", "fixed", "cell", "pbc"):
        assert torch.equal(getattr(rb.initial, name), getattr(ref, name)), name
