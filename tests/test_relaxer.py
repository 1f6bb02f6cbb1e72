"""rollout and DifferentiableRelaxer: per-structure stopping, masks, the ASE-like interface."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from ase.constraints import FixAtoms
from ase.io import read
from conftest import silicon_vacancy
from test_relax_steps import MorseModel, reference_for

from ase_bptt import DifferentiableRelaxer
from ase_bptt.batch import Batch
from ase_bptt.metrics import dq, max_force
from ase_bptt.models.adapt import ADAPT, ADAPTConfig
from ase_bptt.models.checkpoint import save_checkpoint
from ase_bptt.relax.fire import FIREStep
from ase_bptt.relax.relaxer import rollout
from ase_bptt.relax.steps import DecoderStep, FixedStep, LearnedStep, relax_settings

POSITION_ATOL = 1e-6  # A, batch vs separate runs in float64
TOL = 1e-3  # A, the paper's RMS-displacement stopping rule


def three_structures():
    """7, 6 and 15 atoms; they converge at different frames under MorseModel with eta 0.05."""
    a = silicon_vacancy(repeat=1, rattle=0.05, seed=1)
    b = silicon_vacancy(repeat=1, rattle=0.1, seed=2)
    del b[3]
    c = silicon_vacancy(repeat=1, rattle=0.03, seed=3) * (2, 1, 1)
    return [a, b, c]


@pytest.mark.parametrize(
    "rule_factory",
    [lambda: FixedStep(0.05), lambda: FixedStep(0.05, momentum=0.05), lambda: FIREStep()],
    ids=["fixed", "momentum", "fire"],
)
def test_batch_equals_separate_runs(rule_factory):
    model = MorseModel()
    images = three_structures()
    with torch.no_grad():
        together = rollout(model, Batch.from_atoms(images), rule_factory(), tol=TOL, max_steps=75)
        alone = [rollout(model, Batch.from_atoms(a), rule_factory(), tol=TOL, max_steps=75) for a in images]
    frames = together.n_frames.tolist()
    assert frames == [int(r.n_frames[0]) for r in alone]
    assert len(set(frames)) == 3 and max(frames) < 75, frames  # each stopped on its own frame
    assert together.converged.all()
    for i, (atoms, r) in enumerate(zip(images, alone)):
        np.testing.assert_allclose(
            together.positions[i, : len(atoms)].numpy(), r.positions[0].numpy(), rtol=0, atol=POSITION_ATOL
        )


@pytest.mark.parametrize(
    "rule_factory",
    [
        lambda: FixedStep(0.05, noise=0.02, momentum=0.3),
        lambda: DecoderStep(0.05, dtype=torch.float64, noise=0.02),
        lambda: FIREStep(noise=0.02),
    ],
    ids=["fixed", "decoder", "fire"],
)
def test_fixed_and_padding_atoms_never_move(rule_factory):
    images = three_structures()
    images[2].set_constraint(FixAtoms(indices=[0, 5, 9]))
    batch = Batch.from_atoms(images)
    rule = rule_factory().train()  # noise on: it must not leak onto fixed or padding atoms
    out = rollout(MorseModel(), batch, rule, tol=None, max_steps=10, generator=torch.Generator().manual_seed(0))
    still = ~batch.movable
    assert still[2].sum() == 3 and (~batch.mask).sum() > 0
    assert torch.equal(out.positions[still], batch.positions[still])
    assert not torch.equal(out.positions[batch.movable], batch.positions[batch.movable])


def test_fmax_stops_each_structure():
    model = MorseModel()
    batch = Batch.from_atoms(three_structures())
    with torch.no_grad():
        out = rollout(model, batch, FixedStep(0.05), tol=None, fmax=0.05, max_steps=75)
        f = model(batch, positions=out.positions).forces
    assert out.converged.all()
    assert (max_force(f, batch) < 0.05).all()
    assert len(set(out.n_frames.tolist())) > 1


def _always_moving_hook():
    """A DDP-like ``sync_active`` that records each local flag and claims another rank still moves."""
    calls = []

    def always_moving(flag):
        calls.append(float(flag))
        return torch.ones_like(flag)

    return calls, always_moving


def test_sync_active_keeps_frames_in_step():
    """A DDP-like hook that claims another rank still moves: frames continue, numbers unchanged."""
    model = MorseModel()
    batch = Batch.from_atoms(three_structures())
    calls, always_moving = _always_moving_hook()
    with torch.no_grad():
        ref = rollout(model, batch, FixedStep(0.05), tol=TOL, max_steps=40)
        synced = rollout(model, batch, FixedStep(0.05), tol=TOL, max_steps=40, sync_active=always_moving)
    assert len(calls) == 40 and calls[-1] == 0.0
    assert torch.equal(ref.positions, synced.positions) and torch.equal(ref.n_frames, synced.n_frames)


def test_sync_active_once_per_segment_with_checkpointing():
    """With recomputed segments every rank still runs the same frames: the hook is asked once per segment."""
    model = MorseModel()
    batch = Batch.from_atoms(three_structures())
    calls, always_moving = _always_moving_hook()
    ref = rollout(model, batch, FixedStep(0.05), tol=TOL, max_steps=40)
    synced = rollout(
        model, batch, FixedStep(0.05), tol=TOL, max_steps=40, checkpoint_frames=True, sync_active=always_moving
    )
    assert len(calls) == 7 and calls[-1] == 0.0  # round(sqrt(40)) = 6 frames per segment: 7 segments
    assert torch.equal(ref.n_frames, synced.n_frames)
    torch.testing.assert_close(ref.positions, synced.positions, rtol=0, atol=1e-14)
    g_ref = torch.autograd.grad(ref.positions.square().sum(), list(model.parameters()))
    g_syn = torch.autograd.grad(synced.positions.square().sum(), list(model.parameters()))
    for a, b in zip(g_ref, g_syn):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    "rule_factory, fmax",
    [(lambda: FixedStep(0.05, momentum=0.3), None), (lambda: FIREStep(), 0.3)],
    ids=["fixed-momentum", "fire-fmax"],
)
def test_no_grad_rollout_drops_stopped_structures(rule_factory, fmax, monkeypatch):
    """Under no_grad, stopped structures leave the batch: fewer model evaluations, the same results."""
    from ase_bptt.relax import relaxer as relaxer_module

    batch = Batch.from_atoms(three_structures())
    model = MorseModel()
    sizes = []
    original = MorseModel.forward

    def counting(self, b, positions=None):
        sizes.append(len(b))
        return original(self, b, positions=positions)

    monkeypatch.setattr(MorseModel, "forward", counting)
    with torch.no_grad():
        compacted = rollout(model, batch, rule_factory(), tol=TOL, fmax=fmax, max_steps=60)
        evaluations = sum(sizes)
        sizes.clear()
        monkeypatch.setattr(relaxer_module._Compactor, "applies", staticmethod(lambda rule, device: False))
        full = rollout(model, batch, rule_factory(), tol=TOL, fmax=fmax, max_steps=60)
    assert len(set(full.n_frames.tolist())) > 1  # structures stop at different frames
    assert torch.equal(compacted.n_frames, full.n_frames) and torch.equal(compacted.converged, full.converged)
    torch.testing.assert_close(compacted.positions, full.positions, rtol=0, atol=1e-12)
    assert not torch.equal(compacted.positions, batch.positions)
    # every structure is evaluated once per frame it takes (plus, with fmax, the check that stops it)
    assert evaluations < sum(sizes)
    assert evaluations <= int(full.n_frames.sum()) + len(batch)


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


class _Harmonic(MorseModel):
    """Forces with no host synchronisation inside (unlike minimum_image's periodic check)."""

    def forward(self, batch, positions=None):
        from ase_bptt.models.base import ModelOutput

        pos = batch.positions if positions is None else positions
        centre = batch.positions.detach()
        return ModelOutput(forces=-self.D * (pos - centre + 0.05 * torch.tanh(self.a * pos)) * batch.mask[..., None])


@pytest.mark.parametrize(
    "checkpoint_frames, reads_expected",
    [(False, 7), (1, 7), (True, 3), (3, 3), (7, 1)],
    ids=["plain", "per-frame", "sqrt-segments", "segments-3", "one-segment"],
)
@pytest.mark.parametrize(
    "rule_factory",
    [
        lambda: FixedStep(0.05, momentum=0.05, anneal=0.99),
        lambda: LearnedStep(0.05, dtype=torch.float64),
        lambda: DecoderStep(0.05, dtype=torch.float64),
        lambda: FIREStep(),
    ],
    ids=["fixed", "learned", "decoder", "fire"],
)
def test_at_most_one_host_read_per_frame(rule_factory, checkpoint_frames, reads_expected, monkeypatch):
    """rollout reads one value per frame (or per recomputed segment) back to the host, nothing else.

    The value is the 'still moving?' flag; with ``checkpoint_frames`` it is read
    once per segment (7 frames: sqrt -> segments of 3, so 3 reads).
    """
    batch = Batch.from_atoms(three_structures())
    model = _Harmonic()
    rule = rule_factory()
    reads = []
    for name in ("__bool__", "item", "tolist", "__float__", "__int__", "__index__", "numpy"):
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, _name=name, **kwargs):
            reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    out = rollout(model, batch, rule, tol=None, fmax=1e-9, max_steps=7, checkpoint_frames=checkpoint_frames)
    monkeypatch.undo()
    assert int(out.n_frames.min()) == 7
    assert reads == ["__bool__"] * reads_expected
