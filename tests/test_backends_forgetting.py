"""Forgetting: force deviation of a tuned universal model from its base on structures outside the tuning set."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import small_backend

from ase_bptt.backends.forgetting import NonFiniteForcesError, forgetting, forgetting_structures
from ase_bptt.calculator import BPTTCalculator

pytest.importorskip("chgnet")  # CI installs the extra (pyproject's test extra); skipped only without it

#: Two evaluations of the same weights on the same structure (float64): equal to rounding.
SAME_MODEL_ATOL = 1e-12


def test_the_structures_are_fixed_and_hold_no_silicon():
    first, again = forgetting_structures(), forgetting_structures()
    assert len(first) == 10 and sum(len(a) for a in first) == 68
    assert all(14 not in a.numbers for a in first)
    assert len({z for a in first for z in a.numbers}) >= 10  # several elements
    assert any(not a.pbc.all() or a.cell.lengths()[2] > 10 for a in first)  # surfaces among them
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a.positions, b.positions)


def test_zero_for_the_base_model_itself():
    base, same = small_backend("chgnet", seed=1), small_backend("chgnet", seed=1)
    result = forgetting(same, base)
    assert result.max < SAME_MODEL_ATOL and result.n_atoms == 68 and result.n_structures == 10


def test_a_changed_weight_is_measured_in_ev_per_angstrom():
    base, tuned = small_backend("chgnet", seed=1), small_backend("chgnet", seed=1)
    with torch.no_grad():
        tuned.energy_model.net.atom_conv_layers[0].twoBody_atom.mlp_core.layers[0].weight.mul_(1.2)
    result = forgetting(tuned, base)
    assert result.mean > 1e-6 and result.max >= result.mean
    # independent check on one structure: the two models as ASE calculators
    atoms = forgetting_structures()[4]
    diffs = []
    for model in (tuned, base):
        a = atoms.copy()
        a.calc = BPTTCalculator(model)
        diffs.append(a.get_forces())
    expected = np.linalg.norm(diffs[0] - diffs[1], axis=1).mean()
    assert result.per_structure[atoms.info["label"]] == pytest.approx(expected, rel=1e-9)
    assert set(result.to_dict()) == {"mean", "max", "rms", "n_structures", "n_atoms", "per_structure"}


def test_non_finite_forces_are_an_error():
    base, broken = small_backend("chgnet", seed=1), small_backend("chgnet", seed=1)
    with torch.no_grad():
        broken.energy_model.net.mlp.layers[0].weight.fill_(float("nan"))
    with pytest.raises(NonFiniteForcesError, match="non-finite forces on structure 0"):
        forgetting(broken, base)
