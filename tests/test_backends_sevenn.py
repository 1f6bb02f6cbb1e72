"""The SevenNet backend: BPTT gradients against finite differences (through checkpointed frames), species."""

from __future__ import annotations

import pytest
import torch
from conftest import check_gradients, freeze_unused, silicon_vacancy, small_backend

from ase_bptt.batch import Batch
from ase_bptt.models.universal import load_universal_model
from ase_bptt.relax.steps import FixedStep

pytest.importorskip("sevenn")  # CI installs the extra (pyproject's test extra); skipped only without it


def test_rollout_gradients_match_finite_differences():
    model = small_backend("sevenn", skin=0.0)  # rebuilt at every frame: rebuilds change no gradient
    batch = Batch.from_atoms(silicon_vacancy(repeat=1, rattle=0.1, seed=7))
    freeze_unused(model, batch, frames=3)
    check_gradients(model, FixedStep(0.05), batch, frames=3, checkpoint_frames=True, n_directions=2)


def test_species_are_sevennet_0s_and_the_default_dtype_stays():
    before = torch.get_default_dtype()
    model = load_universal_model("sevenn")
    assert torch.get_default_dtype() == before
    assert len(model.species) == 89 and 14 in model.species and 1 in model.species
    assert next(model.parameters()).dtype == torch.float32
