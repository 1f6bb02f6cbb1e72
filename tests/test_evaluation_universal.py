"""A tuned universal MLIP is evaluated against its untouched base: ASE FIRE with the base model as a baseline row."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.optimize import FIRE
from conftest import small_backend, tiny_adapt
from test_evaluation_baselines import silicon_relaxation
from test_evaluation_evaluate import independent_dq

from ase_bptt.calculator import BPTTCalculator
from ase_bptt.data.db import TrajectoryDB
from ase_bptt.data.recipes import stillinger_weber
from ase_bptt.evaluation.pipeline import evaluate
from ase_bptt.models.checkpoint import save_checkpoint
from ase_bptt.models.universal import load_universal_model
from ase_bptt.relax.registry import relax_settings
from ase_bptt.relax.steps import FixedStep

pytest.importorskip("chgnet")  # CI installs the extra (pyproject's test extra); skipped only without it

#: ASE FIRE with the same float64 model twice; Dq by two implementations.
SAME_RUN = 1e-9
FMAX, STEPS = 0.05, 8


def test_the_untouched_base_model_is_a_baseline_row(tmp_path):
    db = TrajectoryDB(tmp_path / "si.db", create=True)
    calc = stillinger_weber()
    for seed, split in enumerate(["val", "test", "test"]):
        db.add_trajectory(silicon_relaxation(seed, calc), label="vacancy", source="test", split=split)
    tuned = load_universal_model("chgnet", dtype=torch.float64)
    with torch.no_grad():  # as fine-tuning would: one weight changed
        tuned.energy_model.net.atom_embedding.embedding.weight.mul_(1.05)
    path = save_checkpoint(tmp_path / "tuned.pt", tuned, relax=relax_settings(FixedStep(0.01), max_steps=5))
    result = evaluate(
        [path],
        db,
        None,
        eta_grid=[0.01],
        max_steps=5,
        fire_fmax=FMAX,
        fire_steps=STEPS,
        dtype="float64",
        device="cpu",
        progress=False,
    )
    (row,) = result["baselines"]
    assert row["name"] == "chgnet 0.3.0 (untouched)"
    base = load_universal_model("chgnet", dtype=torch.float64)
    expected = []
    for t in db.trajectories(split="test"):
        atoms = t.frames[0].copy()
        atoms.calc = BPTTCalculator(base, device="cpu", dtype=torch.float64)
        FIRE(atoms, logfile=None).run(fmax=FMAX, steps=STEPS)
        expected.append(independent_dq(atoms.positions, t.frames[-1]))
    np.testing.assert_allclose(row["per_structure"], expected, rtol=SAME_RUN)
    # its own force errors, not the tuned model's
    assert row["forces"]["n_frames"] == result["checkpoints"][0]["forces"]["n_frames"]
    assert row["forces"]["mae"] != result["checkpoints"][0]["forces"]["mae"]
    # and the tuned model is compared with it, structure by structure
    against = {(c["method"], c["against_model"]) for c in result["comparisons"]}
    assert ("own_rule", "chgnet 0.3.0 (untouched)") in against


def test_a_universal_checkpoint_gets_the_short_eta_grid():
    from ase_bptt.evaluation.universal import default_eta_grid
    from ase_bptt.relax.defaults import DEFAULT_ETA_GRID, UNIVERSAL_ETA_GRID

    assert default_eta_grid({"tuned": small_backend("chgnet"), "adapt": tiny_adapt()}) == UNIVERSAL_ETA_GRID
    assert len(UNIVERSAL_ETA_GRID) == 4
    assert default_eta_grid({"adapt": tiny_adapt()}) == DEFAULT_ETA_GRID
