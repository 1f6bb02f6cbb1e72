"""Augmentation of BPTT rollouts: the cube operations and rigid shifts are exact symmetries.

The references are independent of :mod:`ase_bptt.train.augment`: ASE's EMT
forces and energies of the moved structure, the forces of the original moved
by the Cartesian map the test builds itself (for an axis-aligned cube, ``P``
acting on Cartesian coordinates), and Dq computed by :func:`ase_bptt.metrics.dq`
before and after.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import bulk
from ase.calculators.emt import EMT

from ase_bptt import metrics
from ase_bptt.batch import Batch
from ase_bptt.train.augment import CUBIC_OPS, augment_rollouts, is_cubic, rollout_draws

#: float64 EMT forces of the moved structure vs the moved forces (eV/A).
FORCE_ATOL = 1e-10
#: EMT energy of the moved structure vs the original (eV).
ENERGY_ATOL = 1e-10
#: Dq after the move vs before (relative).
DQ_RTOL = 1e-12


def rattled_pair(cell_scale=(1.0, 1.0, 1.0), seed=0):
    """A cubic fcc Cu cell (32 atoms), rattled (initial) and rattled again (a stand-in 'relaxed')."""
    rng = np.random.default_rng(seed)
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True) * (2, 2, 2)
    atoms.set_cell(atoms.cell.array * np.asarray(cell_scale)[:, None], scale_atoms=True)
    atoms.positions += rng.normal(scale=0.1, size=atoms.positions.shape)
    relaxed = atoms.positions + rng.normal(scale=0.05, size=atoms.positions.shape)
    return atoms, torch.as_tensor(relaxed[None])


def emt_forces_energy(atoms):
    atoms = atoms.copy()
    atoms.calc = EMT()
    return atoms.get_forces(), atoms.get_potential_energy()


def moved_atoms(atoms, positions):
    out = atoms.copy()
    out.positions = positions
    return out


def test_the_48_cube_operations_are_the_cube_group():
    ops = CUBIC_OPS.numpy()
    assert ops.shape == (48, 3, 3)
    assert np.array_equal(ops[0], np.eye(3))
    assert len({op.tobytes() for op in ops}) == 48
    for op in ops:
        assert np.array_equal(op @ op.T, np.eye(3))  # orthogonal, entries 0/+-1
        assert np.array_equal(np.abs(op), np.abs(op).round())
    products = {(a @ b).tobytes() for a in ops for b in ops}
    assert products == {op.tobytes() for op in ops}  # closed: a group


@pytest.mark.parametrize("op_index", [1, 7, 13, 30, 47])
def test_cube_operation_is_an_exact_symmetry_of_emt_cu(op_index):
    atoms, relaxed = rattled_pair(seed=op_index)
    batch = Batch.from_atoms(atoms, dtype=torch.float64)
    op = CUBIC_OPS[op_index : op_index + 1]
    moved, moved_relaxed = augment_rollouts(batch, relaxed, None, op)

    # Axis-aligned cube: P acts on Cartesian coordinates as it does on fractional ones.
    p = op[0].numpy()
    assert np.allclose(moved.positions[0].numpy(), atoms.positions @ p.T, rtol=0, atol=1e-12)
    forces, energy = emt_forces_energy(atoms)
    moved_forces, moved_energy = emt_forces_energy(moved_atoms(atoms, moved.positions[0].numpy()))
    np.testing.assert_allclose(moved_forces, forces @ p.T, rtol=0, atol=FORCE_ATOL)
    assert abs(moved_energy - energy) <= ENERGY_ATOL
    assert not np.allclose(moved_forces, forces, atol=1e-3)  # the operation did move the structure

    before = float(metrics.dq(relaxed, batch.positions, batch)[0])
    after = float(metrics.dq(moved_relaxed, moved.positions, moved)[0])
    assert after == pytest.approx(before, rel=DQ_RTOL)


def test_cube_operation_on_a_rotated_cube_is_an_isometry():
    """A cube whose axes are not the Cartesian ones: the forces move by an orthogonal map."""
    atoms, relaxed = rattled_pair(seed=5)
    angle = 0.3
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    atoms.set_cell(atoms.cell.array @ rot.T, scale_atoms=True)
    relaxed = relaxed @ torch.as_tensor(rot.T)
    batch = Batch.from_atoms(atoms, dtype=torch.float64)
    assert bool(is_cubic(batch.cell)[0])
    moved, moved_relaxed = augment_rollouts(batch, relaxed, None, CUBIC_OPS[21:22])
    # Cartesian map x -> rot P rot^T x, built from the rotation, not from the cell.
    m = rot @ CUBIC_OPS[21].numpy() @ rot.T
    forces, energy = emt_forces_energy(atoms)
    moved_forces, moved_energy = emt_forces_energy(moved_atoms(atoms, moved.positions[0].numpy()))
    np.testing.assert_allclose(moved_forces, forces @ m.T, rtol=0, atol=FORCE_ATOL)
    assert abs(moved_energy - energy) <= ENERGY_ATOL
    before = float(metrics.dq(relaxed, batch.positions, batch)[0])
    after = float(metrics.dq(moved_relaxed, moved.positions, moved)[0])
    assert after == pytest.approx(before, rel=DQ_RTOL)


def test_rigid_shift_is_an_exact_symmetry_of_emt_cu():
    atoms, relaxed = rattled_pair(seed=3)
    batch = Batch.from_atoms(atoms, dtype=torch.float64)
    shift = torch.tensor([[0.37, 0.81, 0.05]], dtype=torch.float64)
    moved, moved_relaxed = augment_rollouts(batch, relaxed, shift, None)
    expected = atoms.positions + shift[0].numpy() @ atoms.cell.array
    np.testing.assert_allclose(moved.positions[0].numpy(), expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose((moved_relaxed - relaxed)[0].numpy(), expected - atoms.positions, atol=1e-12)
    forces, energy = emt_forces_energy(atoms)
    moved_forces, moved_energy = emt_forces_energy(moved_atoms(atoms, expected))
    np.testing.assert_allclose(moved_forces, forces, rtol=0, atol=FORCE_ATOL)
    assert abs(moved_energy - energy) <= ENERGY_ATOL
    before = float(metrics.dq(relaxed, batch.positions, batch)[0])
    after = float(metrics.dq(moved_relaxed, moved.positions, moved)[0])
    assert after == pytest.approx(before, rel=DQ_RTOL)


@pytest.mark.parametrize("scale", [(1.0, 1.0, 1.02), (1.0, 1.0, 1.0 + 1e-5)])
def test_non_cubic_cell_is_left_unchanged_by_the_cube_operations(scale):
    atoms, relaxed = rattled_pair(cell_scale=scale, seed=4)
    batch = Batch.from_atoms(atoms, dtype=torch.float64)
    assert not bool(is_cubic(batch.cell)[0])
    moved, moved_relaxed = augment_rollouts(batch, relaxed, None, CUBIC_OPS[5:6])
    assert torch.equal(moved.positions, batch.positions)
    assert torch.equal(moved_relaxed, relaxed)


def test_cubic_check_tolerance_and_mixed_batch():
    """Within 1e-6 relative a cell is cubic; a batch moves only its cubic members."""
    near, _ = rattled_pair(cell_scale=(1.0, 1.0, 1.0 + 1e-7), seed=6)
    sheared = near.copy()
    sheared.set_cell(near.cell.array + np.array([[0, 0, 0], [0.01, 0, 0], [0, 0, 0]]), scale_atoms=True)
    cube, _ = rattled_pair(seed=7)
    batch = Batch.from_atoms([near, sheared, cube], dtype=torch.float64)
    assert is_cubic(batch.cell).tolist() == [True, False, True]
    relaxed = batch.positions.clone()
    moved, _ = augment_rollouts(batch, relaxed, None, CUBIC_OPS[[9, 9, 9]])
    assert torch.equal(moved.positions[1], batch.positions[1])
    assert not torch.allclose(moved.positions[2], batch.positions[2])


def test_cube_operations_leave_a_slab_in_a_cubic_cell_unchanged():
    """Swapping a slab's open axis with a periodic one is no symmetry: only fully periodic (or open) cells move."""
    atoms, relaxed = rattled_pair(seed=9)
    slab, cluster = atoms.copy(), atoms.copy()
    slab.pbc = (True, True, False)
    cluster.pbc = False
    batch = Batch.from_atoms([slab, cluster], dtype=torch.float64)
    moved, moved_relaxed = augment_rollouts(batch, torch.cat([relaxed, relaxed]), None, CUBIC_OPS[[9, 9]])
    assert torch.equal(moved.positions[0], batch.positions[0]) and torch.equal(moved_relaxed[0], relaxed[0])
    assert not torch.allclose(moved.positions[1], batch.positions[1])  # an isometry of a cluster


def test_shift_only_for_fully_periodic_cells():
    atoms, relaxed = rattled_pair(seed=8)
    slab = atoms.copy()
    slab.pbc = (True, True, False)
    batch = Batch.from_atoms([atoms, slab], dtype=torch.float64)
    relaxed = torch.cat([relaxed, relaxed])
    moved, moved_relaxed = augment_rollouts(batch, relaxed, torch.full((2, 3), 0.25, dtype=torch.float64), None)
    assert not torch.equal(moved.positions[0], batch.positions[0])
    assert torch.equal(moved.positions[1], batch.positions[1])
    assert torch.equal(moved_relaxed[1], relaxed[1])


def test_draws_are_seeded_and_independent_of_each_other():
    a = rollout_draws(0, 1, 2, 5, True, True)
    b = rollout_draws(0, 1, 2, 5, True, False)
    c = rollout_draws(0, 1, 3, 5, True, True)
    assert a[0] is not None and a[1] is not None and b[1] is None
    assert torch.equal(a[0], b[0])  # the shifts do not depend on whether cubic is on
    assert not torch.equal(a[0], c[0])  # another batch, other draws
    assert torch.equal(a[1], rollout_draws(0, 1, 2, 5, False, True)[1])
    assert float(a[0].min()) >= 0.0 and float(a[0].max()) < 1.0
