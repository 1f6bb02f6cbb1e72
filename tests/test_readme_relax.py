"""The snippets of the README ("Use a tuned model in ASE") and docs/training.md ("Relax in torch") run as
written (tiny ADAPT saved as si.pt)."""

from __future__ import annotations

import numpy as np
import torch
from ase.optimize import FIRE
from conftest import silicon_vacancy

from ase_bptt import BPTTCalculator, DifferentiableRelaxer, LearnedStepOptimizer
from ase_bptt.batch import Batch
from ase_bptt.metrics import dq
from ase_bptt.models.adapt import ADAPT, ADAPTConfig
from ase_bptt.models.checkpoint import save_checkpoint
from ase_bptt.relax import FixedStep, LearnedStep, relax_settings, rollout


def test_readme_relax_snippets(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    model = ADAPT(ADAPTConfig(d_model=8, d_ff=16, n_layers=1, n_heads=2, frequencies=(1,))).double()
    save_checkpoint("si.pt", model, relax=relax_settings(FixedStep(0.05), tol=1e-3, max_steps=20))
    atoms = silicon_vacancy(repeat=1)

    ase_atoms = atoms.copy()
    ase_atoms.calc = BPTTCalculator("si.pt")
    FIRE(ase_atoms, logfile=None).run(fmax=0.05, steps=5)

    relaxer = DifferentiableRelaxer(atoms, "si.pt")
    converged = relaxer.run()
    assert isinstance(converged, bool)
    assert relaxer.positions.shape == (1, len(atoms), 3)
    relaxed = relaxer.get_atoms()
    assert relaxed[0].get_forces().shape == (len(atoms), 3)

    batch = Batch.from_atoms([atoms, silicon_vacancy(repeat=1, seed=5)])
    relaxed_positions = batch.positions + 0.01
    rule = LearnedStep(0.05, dtype=torch.float64)
    out = rollout(model, batch, rule, tol=1e-3, max_steps=10, checkpoint_frames=True)
    loss = dq(out.positions, relaxed_positions, batch).mean()
    loss.backward()
    assert rule.log_eta.grad is not None and model.force_head.weight.grad is not None

    deploy = atoms.copy()
    deploy.calc = BPTTCalculator("si.pt")
    LearnedStepOptimizer(deploy, logfile=None).run()
    np.testing.assert_allclose(deploy.positions, relaxed[0].positions, atol=1e-6)
