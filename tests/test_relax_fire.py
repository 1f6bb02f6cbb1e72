"""Differentiable FIRE against ase.optimize.FIRE, and its gradients against finite differences."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.constraints import FixAtoms
from ase.optimize import FIRE
from conftest import MorseModel, check_gradients, silicon_vacancy, tiny_adapt
from torch import nn

from ase_bptt.batch import Batch
from ase_bptt.calculator import BPTTCalculator
from ase_bptt.metrics import dq
from ase_bptt.models.base import ForceModel, ModelOutput
from ase_bptt.relax.fire import FIREStep
from ase_bptt.relax.relaxer import rollout

POSITION_ATOL = 1e-6  # A, the bound for matching ASE in float64


def structures():
    """Two cells with different atom counts; the first holds two fixed atoms."""
    a = silicon_vacancy(repeat=1, rattle=0.05, seed=1)
    a.set_constraint(FixAtoms(indices=[0, 3]))
    b = silicon_vacancy(repeat=1, rattle=0.08, seed=2) * (2, 1, 1)
    return [a, b]


CHECKPOINTS = (1, 10, 50)


def ase_fire_positions(atoms, model) -> dict[int, np.ndarray]:
    """Positions after each of CHECKPOINTS steps of ase.optimize.FIRE through BPTTCalculator."""
    atoms = atoms.copy()
    atoms.calc = BPTTCalculator(model)
    opt = FIRE(atoms, logfile=None)
    seen = {}
    opt.attach(lambda: seen.setdefault(opt.nsteps, atoms.positions.copy()))
    opt.run(fmax=-1.0, steps=max(CHECKPOINTS))  # fmax < 0: never converged, exactly that many steps
    return {k: seen[k] for k in CHECKPOINTS}


@pytest.mark.parametrize("model_kind", ["adapt", "morse"])
def test_fire_matches_ase(model_kind):
    model = tiny_adapt() if model_kind == "adapt" else MorseModel()
    images = structures()
    batch = Batch.from_atoms(images)
    rule = FIREStep()
    reference = [ase_fire_positions(atoms, model) for atoms in images]
    for steps in CHECKPOINTS:
        with torch.no_grad():
            out = rollout(model, batch, rule, tol=None, max_steps=steps)
        assert out.n_frames.tolist() == [steps, steps]
        for i, atoms in enumerate(images):
            ours = out.positions[i, : len(atoms)].numpy()
            np.testing.assert_allclose(ours, reference[i][steps], rtol=0, atol=POSITION_ATOL)
            fixed = batch.fixed[i, : len(atoms)].numpy()
            assert fixed.any() == (i == 0)
            assert np.array_equal(ours[fixed], atoms.positions[fixed])  # exactly in place
    # The 50 frames went through FIRE's branches (dt changed), or the match would prove little.
    state = rule.init_state(batch, batch.positions)
    pos = batch.positions
    dts = []
    with torch.no_grad():
        for k in range(max(CHECKPOINTS)):
            f = model(batch, positions=pos).forces * batch.movable[..., None]
            dr, state = rule(pos, f, batch, state, k)
            pos = pos + dr
            dts.append(state["dt"].clone())
    dts = torch.stack(dts)
    assert ((dts - 0.1).abs() > 1e-12).any(), "FIRE never changed dt: weak test"


def test_fire_first_step_is_dt_squared_force(si_small):
    """ASE's first FIRE step: v = dt F, dr = dt^2 F (then the maxstep rescale)."""
    model = MorseModel()
    batch = Batch.from_atoms(si_small)
    with torch.no_grad():
        f = model(batch).forces
        out = rollout(model, batch, FIREStep(), tol=None, max_steps=1)
    torch.testing.assert_close(out.positions - batch.positions, 0.01 * f, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("checkpoint_frames", [False, 1, True], ids=["plain", "per-frame", "sqrt-segments"])
@pytest.mark.parametrize("maxstep", [0.2, 0.01], ids=["free", "capped"])
def test_fire_gradients_match_finite_differences(maxstep, checkpoint_frames, si_small):
    batch = Batch.from_atoms(si_small)
    model = MorseModel()
    rule = FIREStep(maxstep=maxstep, dt=0.3)
    if maxstep < 0.2:  # make sure the cap binds at some frame: some update has norm == maxstep
        with torch.no_grad():
            pos, state, norms = batch.positions, rule.init_state(batch, batch.positions), []
            for k in range(8):
                dr, state = rule(pos, model(batch, positions=pos).forces, batch, state, k)
                pos = pos + dr
                norms.append(float(dr.norm()))
        assert max(norms) == pytest.approx(maxstep, rel=1e-12)
    check_gradients(model, rule, batch, frames=8, checkpoint_frames=checkpoint_frames)


class Spring(ForceModel):
    """F = k (X_eq - X): exactly zero force at X_eq."""

    def __init__(self, x_eq: torch.Tensor) -> None:
        super().__init__()
        self.k = nn.Parameter(torch.tensor(2.0, dtype=torch.float64))
        self.x_eq = nn.Parameter(x_eq.clone())

    def forward(self, batch, positions=None):
        pos = batch.positions if positions is None else positions
        return ModelOutput(forces=self.k * (self.x_eq - pos) * batch.mask[..., None])


@pytest.mark.parametrize("checkpoint_frames", [False, 1, True], ids=["plain", "per-frame", "sqrt-segments"])
def test_zero_forces_give_finite_gradients(checkpoint_frames, si_small):
    batch = Batch.from_atoms(si_small)
    model = Spring(batch.positions)
    out = rollout(model, batch, FIREStep(), tol=None, max_steps=5, checkpoint_frames=checkpoint_frames)
    assert torch.equal(out.positions, batch.positions)  # zero force, zero velocity: nothing moves
    ref = batch.positions + 0.01
    grads = torch.autograd.grad(dq(out.positions, ref, batch).sum(), [model.k, model.x_eq])
    for g in grads:
        assert torch.isfinite(g).all()
    assert grads[1].abs().sum() > 0  # the equilibrium still steers the result
