"""Metrics against hand-computed numpy values, incl. a periodic-boundary crossing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms

from ase_bptt.batch import Batch
from ase_bptt.metrics import displacement, dq, force_errors, max_force, minimum_image, mse, rms_displacement


def two_structures():
    # Structure 0: cubic 10 A cell; atom 0 sits at x=0.1 and its reference at
    # x=9.9, a 0.2 A displacement across the periodic boundary (not 9.8 A).
    a = Atoms("SiC", positions=[[0.1, 1.0, 1.0], [5.0, 5.0, 5.0]], cell=[10, 10, 10], pbc=True)
    ref_a = np.array([[9.9, 1.0, 1.0], [5.0, 5.3, 5.0]])
    # Structure 1: non-periodic, a single H atom (padded to 2).
    b = Atoms("H", positions=[[0.0, 0.0, 0.0]], cell=[10, 10, 10], pbc=False)
    ref_b = np.array([[0.3, 0.4, 0.0], [0.0, 0.0, 0.0]])
    batch = Batch.from_atoms([a, b])
    ref = torch.tensor(np.stack([ref_a, ref_b]))
    return batch, ref, (a, b)


def test_dq_hand_computed():
    batch, ref, (a, b) = two_structures()
    m = a.get_masses()
    # by hand: Si moved 0.2 A (minimum image), C moved 0.3 A; H moved 0.5 A
    expected0 = np.sqrt(m[0] * 0.2**2 + m[1] * 0.3**2)
    expected1 = np.sqrt(b.get_masses()[0] * 0.5**2)
    got = dq(batch.positions, ref, batch)
    assert got.tolist() == pytest.approx([expected0, expected1], rel=1e-12)


def test_displacement_minimum_image_and_padding():
    batch, ref, _ = two_structures()
    d = displacement(batch.positions, ref, batch)
    assert d[0, 0].tolist() == pytest.approx([0.2, 0.0, 0.0], abs=1e-12)
    assert torch.all(d[1, 1] == 0)  # padding
    # no wrapping without pbc: 9.8 A stays 9.8 A
    v = torch.tensor([[[9.8, 0.0, 0.0]]], dtype=torch.float64)
    cell = torch.eye(3, dtype=torch.float64)[None] * 10
    assert minimum_image(v, cell, torch.tensor([[False] * 3])).tolist() == v.tolist()
    assert minimum_image(v, cell, torch.tensor([[True] * 3]))[0, 0, 0].item() == pytest.approx(-0.2)


def test_mse_and_rms_displacement():
    batch, ref, _ = two_structures()
    assert mse(batch.positions, ref, batch).tolist() == pytest.approx([(0.04 + 0.09) / 2, 0.25], rel=1e-12)
    step = torch.zeros_like(ref)
    step[0, 0, 0] = 0.3
    step[0, 1, 1] = 0.4
    step[1, 1, 2] = 5.0  # padding: ignored
    assert rms_displacement(step, batch).tolist() == pytest.approx([np.sqrt(0.25 / 2), 0.0])


def test_force_errors_and_max_force():
    batch, _, _ = two_structures()
    ref = torch.zeros(2, 2, 3, dtype=torch.float64)
    pred = torch.zeros_like(ref)
    pred[0, 0] = torch.tensor([1.0, -2.0, 2.0])
    pred[1, 1] = 100.0  # padding: ignored
    e = force_errors(pred, ref, batch)
    assert e["mae"].tolist() == pytest.approx([5.0 / 6, 0.0])
    assert e["rmse"].tolist() == pytest.approx([np.sqrt(9.0 / 6), 0.0])
    assert e["l2"].tolist() == pytest.approx([3.0, 0.0])
    assert max_force(pred, batch).tolist() == pytest.approx([3.0, 0.0])


def test_dq_gradient_finite_at_perfect_match():
    batch, _, _ = two_structures()
    p = batch.positions.clone().requires_grad_(True)
    dq(p, batch.positions, batch).sum().backward()
    assert torch.isfinite(p.grad).all()
