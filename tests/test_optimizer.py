"""LearnedStepOptimizer (NumPy, an ase.optimize.Optimizer) reproduces DifferentiableRelaxer."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from ase.constraints import FixAtoms
from ase.io import read
from conftest import silicon_vacancy
from test_relax_steps import MorseModel

from ase_bptt import BPTTCalculator, DifferentiableRelaxer, LearnedStepOptimizer
from ase_bptt.models.adapt import ADAPT, ADAPTConfig
from ase_bptt.models.checkpoint import save_checkpoint
from ase_bptt.relax.fire import FIREStep
from ase_bptt.relax.steps import DecoderStep, LearnedStep, relax_settings

POSITION_ATOL = 1e-6  # A, float64


def structure(fixed: bool = True):
    atoms = silicon_vacancy(repeat=1, rattle=0.08, seed=4)
    if fixed:
        atoms.set_constraint(FixAtoms(indices=[1, 2]))
    return atoms


def tiny_adapt() -> ADAPT:
    """Random tiny ADAPT; its output scale raised so forces are O(1) eV/A and relaxations take many steps."""
    torch.manual_seed(0)
    model = ADAPT(ADAPTConfig(d_model=8, d_ff=16, n_layers=1, n_heads=2, frequencies=(1,))).double()
    model.force_scale.fill_(30.0)
    return model


def deploy(atoms, calc, **kw):
    atoms = atoms.copy()
    atoms.calc = calc
    opt = LearnedStepOptimizer(atoms, logfile=None, **kw)
    return atoms, opt


def test_fixed_eta_matches_relaxer_with_stopping_rule():
    """A converging model: same positions and the same number of steps under the RMS rule."""
    model = MorseModel()
    atoms, opt = deploy(structure(), BPTTCalculator(model), eta=0.05)
    assert opt.run() is True
    relaxer = DifferentiableRelaxer(structure(), model, eta=0.05)
    assert relaxer.run() is True
    assert opt.nsteps == int(relaxer.n_frames[0]) == relaxer.nsteps
    np.testing.assert_allclose(atoms.positions, relaxer.get_atoms()[0].positions, rtol=0, atol=POSITION_ATOL)
    assert np.array_equal(atoms.positions[[1, 2]], structure().positions[[1, 2]])
    assert opt.last_rms < opt.tol


def test_fmax_is_honoured_only_when_given():
    model = MorseModel()
    atoms, opt = deploy(structure(), BPTTCalculator(model), eta=0.05, tol=1e-9)
    assert opt.run(fmax=0.05) is True
    relaxer = DifferentiableRelaxer(structure(), model, eta=0.05, tol=1e-9)
    relaxer.run(fmax=0.05)
    assert opt.nsteps == relaxer.nsteps
    assert np.linalg.norm(atoms.get_forces(), axis=1).max() < 0.05
    np.testing.assert_allclose(atoms.positions, relaxer.get_atoms()[0].positions, rtol=0, atol=POSITION_ATOL)
    # with no fmax only the displacement rule stops it, however small the forces get
    _, opt2 = deploy(structure(), BPTTCalculator(model), eta=0.05, tol=1e-9)
    opt2.run(steps=opt.nsteps + 5)
    assert opt2.nsteps == opt.nsteps + 5


def rules():
    learned = LearnedStep(0.03, momentum=0.05, anneal=0.8, maxstep=0.02, dtype=torch.float64)
    torch.manual_seed(1)
    decoder = DecoderStep(0.02, dtype=torch.float64, d_model=8, n_heads=2, d_ff=8, anneal=0.8)
    with torch.no_grad():
        decoder.head.weight.normal_(std=0.3)
    return {"learned": learned, "decoder": decoder, "fire": FIREStep(maxstep=0.1)}


@pytest.mark.parametrize("name", ["learned", "decoder", "fire"])
def test_checkpoint_rule_matches_relaxer(name, tmp_path):
    """The rule saved in a checkpoint, deployed through BPTTCalculator, against the torch relaxer."""
    model = tiny_adapt()
    rule = rules()[name]
    path = save_checkpoint(tmp_path / "tuned.pt", model, relax=relax_settings(rule, tol=1e-3, max_steps=40))
    calc = BPTTCalculator(path, dtype=torch.float64)
    atoms, opt = deploy(structure(), calc)
    assert type(opt.step_rule) is type(rule) and opt.max_frames == 40
    converged = opt.run()
    relaxer = DifferentiableRelaxer(structure(), path)  # the same checkpoint, its own rule
    assert type(relaxer.step_rule) is type(rule)
    assert relaxer.run(steps=40) is converged
    assert opt.nsteps == relaxer.nsteps
    if name != "fire":  # annealing 0.8 makes the steps shrink until the RMS rule stops them
        assert converged and opt.nsteps < 40
    np.testing.assert_allclose(atoms.positions, relaxer.get_atoms()[0].positions, rtol=0, atol=POSITION_ATOL)


def test_logs_and_trajectory_like_ase(tmp_path):
    log = io.StringIO()
    atoms = structure(fixed=False)
    atoms.calc = BPTTCalculator(MorseModel())
    with LearnedStepOptimizer(atoms, eta=0.05, logfile=log, trajectory=str(tmp_path / "t.traj")) as opt:
        opt.run(steps=3)
    lines = log.getvalue().splitlines()
    assert lines[0].split() == ["Step", "Time", "Energy", "fmax"]
    assert [ln.split()[:2] for ln in lines[1:]] == [["LearnedStepOptimizer:", str(k)] for k in range(4)]
    assert len(read(tmp_path / "t.traj", index=":")) == 4
    assert opt.todict()["step_rule"]["eta"] == 0.05


def test_needs_a_step_rule():
    atoms = structure()
    atoms.calc = BPTTCalculator(MorseModel())
    with pytest.raises(ValueError, match="pass eta="):
        LearnedStepOptimizer(atoms)
