"""DifferentiableRelaxer: the ASE-like interface over the rollout frame, checkpoint settings, stopping per rule."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from ase.io import read
from ase.optimize import FIRE
from conftest import MorseModel, reference_for, silicon_vacancy, three_structures, tiny_adapt

from ase_bptt import BPTTCalculator, DifferentiableRelaxer
from ase_bptt.batch import Batch
from ase_bptt.metrics import dq
from ase_bptt.models.adapt import ADAPT, ADAPTConfig
from ase_bptt.models.checkpoint import save_checkpoint
from ase_bptt.relax.relaxer import rollout
from ase_bptt.relax.steps import FixedStep, LearnedStep, relax_settings

POSITION_ATOL = 1e-6  # A, batch vs separate runs in float64
TOL = 1e-3  # A, the paper's RMS-displacement stopping rule


# ------------------------------------------------------- DifferentiableRelaxer
def test_relaxer_matches_rollout_and_logs_like_ase(tmp_path):
    model = MorseModel()
    images = three_structures()
    log = io.StringIO()
    seen = []
    relaxer = DifferentiableRelaxer(
        images, model, eta=0.05, logfile=log, trajectory=str(tmp_path / "relax-{index}.traj")
    )
    relaxer.attach(lambda: seen.append(relaxer.nsteps), interval=5)
    assert relaxer.run() is True
    relaxer.close()
    out = rollout(model, Batch.from_atoms(images), FixedStep(0.05), tol=TOL, max_steps=75)
    assert torch.equal(relaxer.n_frames, out.n_frames)
    torch.testing.assert_close(relaxer.positions, out.positions, rtol=0, atol=1e-12)
    assert relaxer.nsteps == int(out.n_frames.max())
    assert seen == list(range(0, relaxer.nsteps + 1, 5))

    lines = log.getvalue().splitlines()
    assert lines[0].split() == ["Step", "Time", "Energy", "fmax"]
    first = lines[1].split()
    assert first[0] == "DifferentiableRelaxer[0]:" and first[1] == "0"
    # one line per structure per frame it moved in, plus the initial frame
    assert len(lines) - 1 == 3 + int(out.n_frames.sum())

    for i, atoms in enumerate(images):
        traj = read(tmp_path / f"relax-{i}.traj", index=":")
        assert len(traj) == int(out.n_frames[i]) + 1
        np.testing.assert_allclose(traj[-1].positions, out.positions[i, : len(atoms)].detach().numpy(), atol=1e-12)
        assert traj[-1].get_forces().shape == (len(atoms), 3)

    final = relaxer.get_atoms()
    assert [len(a) for a in final] == [len(a) for a in images]
    assert max(np.linalg.norm(a.get_forces(), axis=1).max() for a in final) < 0.05
    d = relaxer.todict()
    assert d["optimizer"] == "DifferentiableRelaxer" and d["step_rule"]["step"] == "fixed" and d["tol"] == TOL


def test_single_structure_log_and_steps_limit():
    log = io.StringIO()
    relaxer = DifferentiableRelaxer(three_structures()[0], MorseModel(), eta=0.01, logfile=log)
    assert relaxer.run(steps=3) is False
    assert relaxer.nsteps == 3 and not relaxer.converged()
    lines = log.getvalue().splitlines()
    assert [ln.split()[:2] for ln in lines[1:]] == [["DifferentiableRelaxer:", str(k)] for k in range(4)]
    assert relaxer.run(steps=100) is True  # resumes where it stopped


@pytest.mark.parametrize("step", ["fixed", "learned", "decoder", "fire"])
def test_gradients_flow_and_checkpointing_agrees(step):
    images = three_structures()[:2]
    grads = []
    for checkpoint_frames in (False, True):
        model = MorseModel()
        torch.manual_seed(0)  # the decoder's initial weights
        relaxer = DifferentiableRelaxer(
            images, model, step=step, eta=None if step == "fire" else 0.05, checkpoint_frames=checkpoint_frames
        )
        relaxer.run(steps=6)
        loss = dq(relaxer.positions, reference_for(relaxer.batch), relaxer.batch).sum()
        params = list(model.parameters()) + relaxer.step_rule.step_parameters()
        assert all(p.dtype == torch.float64 for p in params)
        grads.append(torch.autograd.grad(loss, params, allow_unused=True))
    for a, b in zip(*grads):
        if a is None:
            assert b is None
            continue
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_relaxer_fmax_and_batch_input():
    model = MorseModel()
    batch = Batch.from_atoms(three_structures())
    relaxer = DifferentiableRelaxer(batch, model, eta=0.05)
    assert relaxer.run(fmax=0.05) is True
    with torch.no_grad():
        out = rollout(model, batch, FixedStep(0.05), tol=TOL, fmax=0.05, max_steps=75)
    assert torch.equal(relaxer.n_frames, out.n_frames)
    torch.testing.assert_close(relaxer.positions, out.positions, rtol=0, atol=1e-12)


def test_relax_settings_come_with_the_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = ADAPT(ADAPTConfig(d_model=8, d_ff=16, n_layers=1, n_heads=2, frequencies=(1,))).double()
    path = save_checkpoint(
        tmp_path / "m.pt",
        model,
        relax=relax_settings(LearnedStep(0.0321, momentum=0.05, dtype=torch.float64), tol=2e-3, max_steps=30),
    )
    relaxer = DifferentiableRelaxer(three_structures()[0], str(path))
    assert isinstance(relaxer.step_rule, LearnedStep)
    assert float(relaxer.step_rule.eta.detach()) == pytest.approx(0.0321, rel=1e-12)
    assert relaxer.step_rule.momentum == 0.05
    assert relaxer.batch.dtype == torch.float64
    # an explicit eta wins over the checkpoint
    assert isinstance(DifferentiableRelaxer(three_structures()[0], str(path), eta=0.01).step_rule, FixedStep)


def test_bad_trajectory_count():
    with pytest.raises(ValueError, match="3 structures"):
        DifferentiableRelaxer(three_structures(), MorseModel(), trajectory="one.traj")


def test_unknown_element_is_rejected_up_front():
    from ase.build import bulk

    from ase_bptt.models.base import UnknownElementError

    model = MorseModel()
    model.species = (14,)
    with pytest.raises(UnknownElementError, match="Ge"):
        DifferentiableRelaxer(bulk("Ge", "diamond", a=5.66), model)


def test_fire_stops_like_ase_fire():
    """``step="fire"`` and ``run(fmax=0.05)`` stop as ase.optimize.FIRE does (fmax, steps), not by ``tol``."""
    model = tiny_adapt()
    atoms = silicon_vacancy(repeat=1, rattle=0.05, seed=1)
    reference = atoms.copy()
    reference.calc = BPTTCalculator(model)
    ase_fire = FIRE(reference, logfile=None)
    assert ase_fire.run(fmax=0.05)
    relaxer = DifferentiableRelaxer(atoms, model, step="fire")
    with torch.no_grad():
        assert relaxer.run(fmax=0.05) is True
    assert relaxer.tol is None and ase_fire.nsteps > 3  # the displacement rule would have stopped it at once
    assert relaxer.nsteps == ase_fire.nsteps
    np.testing.assert_allclose(relaxer.get_atoms()[0].positions, reference.positions, rtol=0, atol=POSITION_ATOL)
    # run() with no fmax uses ASE's default, 0.05
    again = DifferentiableRelaxer(atoms, model, step="fire")
    with torch.no_grad():
        assert again.run() is True
    assert again.nsteps == ase_fire.nsteps
    # an explicit tol turns the displacement rule on for FIRE too
    explicit = DifferentiableRelaxer(atoms, model, step="fire", tol=TOL)
    with torch.no_grad():
        explicit.run(fmax=0.05)
    assert explicit.nsteps < ase_fire.nsteps
