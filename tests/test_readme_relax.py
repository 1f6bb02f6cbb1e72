"""The Python blocks of the README ("Use a tuned model in ASE") and of docs/training.md ("Relax in torch"),
read from those files and run as written, then checked against the same relaxations done by hand.

A tiny float64 ADAPT saved as the file names the blocks use (model.pt, si.pt) stands in for a tuned model, so
a block that drifts from the API fails here, and one that runs but does something else fails the checks.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from ase.optimize import FIRE
from conftest import silicon_vacancy

from ase_bptt import BPTTCalculator, DifferentiableRelaxer, LearnedStepOptimizer
from ase_bptt.batch import Batch
from ase_bptt.metrics import dq
from ase_bptt.models.adapt import ADAPT, ADAPTConfig
from ase_bptt.models.checkpoint import save_checkpoint
from ase_bptt.relax import FixedStep, LearnedStep, relax_settings, rollout

ROOT = Path(__file__).resolve().parents[1]
#: Positions of a block's relaxation against the same calls made by hand (A): float64, same operations.
SAME_RELAXATION_TOL = 1e-10
#: Central finite differences of the block's loss in log(eta) against its backward pass (relative).
FD_RTOL = 1e-4


def python_blocks(path: Path, section: str) -> list[str]:
    """The ```python blocks of the section headed ``section`` of the Markdown file at ``path``."""
    text = path.read_text()
    start = text.index(f"## {section}\n")
    end = text.find("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start : end if end > 0 else None], re.S)


@pytest.fixture
def tiny_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    model = ADAPT(ADAPTConfig(d_model=8, d_ff=16, n_layers=1, n_heads=2, frequencies=(1,))).double()
    for name in ("model.pt", "si.pt"):
        save_checkpoint(name, model, relax=relax_settings(FixedStep(0.05), tol=1e-3, max_steps=20))
    return model


def test_the_readme_block_relaxes_as_the_same_calls_by_hand(tiny_model):
    (block,) = python_blocks(ROOT / "README.md", "Use a tuned model in ASE")
    atoms = silicon_vacancy(repeat=1)
    start = atoms.positions.copy()
    exec(block, {"atoms": atoms})
    by_hand = silicon_vacancy(repeat=1)
    by_hand.calc = BPTTCalculator("model.pt")
    FIRE(by_hand, logfile=None).run(fmax=0.05)
    LearnedStepOptimizer(by_hand, logfile=None).run()
    assert np.abs(atoms.positions - by_hand.positions).max() < SAME_RELAXATION_TOL
    assert np.abs(atoms.positions - start).max() > 1e-3  # the block did relax


def test_the_training_md_blocks_relax_in_torch_and_backpropagate(tiny_model):
    ase_block, core_block = python_blocks(ROOT / "docs" / "training.md", "Relax in torch")
    atoms = silicon_vacancy(repeat=1)
    namespace = {"atoms": atoms}
    exec(ase_block, namespace)
    relaxer = namespace["relaxer"]
    assert relaxer.positions.shape == (1, len(atoms), 3)
    by_hand = DifferentiableRelaxer(atoms.copy(), "si.pt")
    by_hand.run()
    assert torch.equal(relaxer.positions, by_hand.positions)
    np.testing.assert_allclose(namespace["relaxed"][0].positions, by_hand.positions[0].detach().numpy(), atol=1e-12)

    batch = Batch.from_atoms([silicon_vacancy(repeat=1), silicon_vacancy(repeat=1, seed=5)])
    relaxed_positions = batch.positions + 0.01
    namespace = {"model": tiny_model, "batch": batch, "relaxed_positions": relaxed_positions}
    exec(core_block, namespace)
    rule, out = namespace["rule"], namespace["out"]
    assert out.n_frames.shape == (2,) and tiny_model.force_head.weight.grad is not None

    def loss_at(log_eta: float) -> float:
        with torch.no_grad():
            probe = LearnedStep(float(np.exp(log_eta)), dtype=torch.float64)
            result = rollout(tiny_model, batch, probe, tol=1e-3, max_steps=75)
            return float(dq(result.positions, relaxed_positions, batch).mean())

    h, log_eta = 1e-5, float(rule.log_eta.detach())
    finite_difference = (loss_at(log_eta + h) - loss_at(log_eta - h)) / (2 * h)
    assert float(rule.log_eta.grad) == pytest.approx(finite_difference, rel=FD_RTOL)
