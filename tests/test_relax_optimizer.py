"""LearnedStepOptimizer (the torch rule inside an ase.optimize.Optimizer) reproduces DifferentiableRelaxer."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.constraints import FixAtoms
from ase.filters import FrechetCellFilter
from ase.io import read
from ase.optimize import FIRE
from conftest import MorseModel, silicon_vacancy, tiny_adapt

from ase_bptt import BPTTCalculator, DifferentiableRelaxer, LearnedStepOptimizer
from ase_bptt.models.checkpoint import save_checkpoint
from ase_bptt.relax.fire import FIREStep
from ase_bptt.relax.steps import DecoderStep, LearnedStep, relax_settings

POSITION_ATOL = 1e-6  # A, float64


def structure(fixed: bool = True):
    atoms = silicon_vacancy(repeat=1, rattle=0.08, seed=4)
    if fixed:
        atoms.set_constraint(FixAtoms(indices=[1, 2]))
    return atoms


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
    model = tiny_adapt(force_scale=30.0)
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


def test_fire_checkpoint_stops_like_ase_fire(tmp_path):
    """A FIRE checkpoint (even one saved with a tol) stops by fmax, as ase.optimize.FIRE does."""
    model = tiny_adapt()
    path = save_checkpoint(tmp_path / "fire.pt", model, relax=relax_settings(FIREStep(), tol=1e-3, max_steps=75))
    reference = structure(fixed=False)
    reference.calc = BPTTCalculator(model)
    ase_fire = FIRE(reference, logfile=None)
    assert ase_fire.run(fmax=0.05)
    atoms, opt = deploy(structure(fixed=False), BPTTCalculator(path, dtype=torch.float64))
    assert opt.tol is None and opt.run() is True and opt.fmax == 0.05
    assert opt.nsteps == ase_fire.nsteps > 3
    np.testing.assert_allclose(atoms.positions, reference.positions, rtol=0, atol=POSITION_ATOL)


def test_fixed_eta_on_a_cell_filter():
    """Fixed steps run on ASE filters (atoms plus cell degrees of freedom), as the NumPy update did."""
    atoms = bulk("Cu", cubic=True) * (2, 2, 2)
    atoms.rattle(0.05, seed=0)
    atoms.set_cell(atoms.cell * 1.03, scale_atoms=True)
    atoms.calc = EMT()
    filtered = FrechetCellFilter(atoms)
    start = filtered.get_positions()
    update = 0.01 * filtered.get_forces()
    update *= 0.2 / max(np.linalg.norm(update, axis=1).max(), 0.2)  # the maxstep rescale, by hand
    opt = LearnedStepOptimizer(filtered, eta=0.01, logfile=None)
    opt.run(steps=1)
    np.testing.assert_allclose(filtered.get_positions(), start + update, rtol=0, atol=1e-10)
    volume = atoms.get_volume()
    opt.run(steps=20)
    assert atoms.get_volume() < volume  # the stretched cell shrinks back
