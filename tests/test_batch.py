"""Batch: exact round trip with ase.Atoms, padding, dtype/device moves."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import molecule
from ase.constraints import FixAtoms, FixBondLength

from ase_bptt.batch import Batch


def structures(si_vacancy, si_small):
    a = si_vacancy.copy()
    a.set_constraint(FixAtoms(indices=[0, 5, 7]))
    b = si_small.copy()
    b.set_masses(np.arange(1, len(b) + 1, dtype=float) * 3.5)
    c = molecule("H2O")  # no cell, no pbc
    c.pbc = (True, False, False)
    c.cell = [[4.0, 0, 0], [0, 0, 0], [0, 0, 0]]
    return [a, b, c]


def test_round_trip_exact(si_vacancy, si_small):
    atoms = structures(si_vacancy, si_small)
    batch = Batch.from_atoms(atoms)
    assert batch.positions.shape == (3, 63, 3) and batch.dtype == torch.float64
    assert batch.n_atoms.tolist() == [63, 7, 3]
    back = batch.to_atoms()
    for a, r in zip(atoms, back):
        assert np.array_equal(a.positions, r.positions)
        assert np.array_equal(a.numbers, r.numbers)
        assert np.array_equal(a.cell.array, r.cell.array)
        assert np.array_equal(a.pbc, r.pbc)
        assert np.array_equal(a.get_masses(), r.get_masses())
    assert back[0].constraints[0].get_indices().tolist() == [0, 5, 7]
    assert not back[1].constraints


def test_padding_is_inert(si_vacancy, si_small):
    batch = Batch.from_atoms([si_vacancy, si_small])
    pad = ~batch.mask[1]
    assert pad.sum() == 56
    assert torch.all(batch.numbers[1, pad] == 0) and torch.all(batch.masses[1, pad] == 0)
    assert not batch.fixed[1, pad].any()
    assert torch.equal(batch.movable, batch.mask & ~batch.fixed)


def test_to_casts_floats_only_and_is_lazy(si_small):
    batch = Batch.from_atoms(si_small)
    assert batch.to() is batch and batch.to(dtype=torch.float64) is batch
    b32 = batch.to(dtype=torch.float32)
    assert b32.positions.dtype == b32.masses.dtype == b32.cell.dtype == torch.float32
    assert b32.numbers.dtype == torch.int64 and b32.mask.dtype == b32.pbc.dtype == b32.fixed.dtype == torch.bool
    assert torch.equal(b32.positions, batch.positions.float())
    assert b32.to(device="cpu", dtype=torch.float32) is b32


def test_select_concatenate_with_positions(si_vacancy, si_small):
    a = Batch.from_atoms(si_small)
    b = Batch.from_atoms(si_vacancy)
    both = Batch.concatenate([a, b])
    assert both.positions.shape == (2, 63, 3)
    assert torch.equal(both.select([1]).positions, b.positions)
    assert torch.equal(both.select([0]).positions[0, :7], a.positions[0])
    p = torch.zeros_like(both.positions, requires_grad=True)
    assert both.with_positions(p).positions is p


def test_unsupported_constraint_is_an_error(si_small):
    a = si_small.copy()
    a.set_constraint(FixBondLength(0, 1))
    with pytest.raises(ValueError, match="FixBondLength"):
        Batch.from_atoms(a)
    assert Batch.from_atoms(a, constraints=False).fixed.sum() == 0


def test_empty_input_is_an_error():
    with pytest.raises(ValueError):
        Batch.from_atoms([])
