"""rollout: per-structure stopping, masks, batch == separate runs, compaction, host reads."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.constraints import FixAtoms
from conftest import MorseModel, three_structures

from ase_bptt.batch import Batch
from ase_bptt.metrics import max_force
from ase_bptt.relax.fire import FIREStep
from ase_bptt.relax.relaxer import rollout
from ase_bptt.relax.steps import DecoderStep, FixedStep, LearnedStep

POSITION_ATOL = 1e-6  # A, batch vs separate runs in float64
TOL = 1e-3  # A, the paper's RMS-displacement stopping rule


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
    from ase_bptt.relax.rollout import _Compactor

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
        monkeypatch.setattr(_Compactor, "applies", staticmethod(lambda rule, device: False))
        full = rollout(model, batch, rule_factory(), tol=TOL, fmax=fmax, max_steps=60)
    assert len(set(full.n_frames.tolist())) > 1  # structures stop at different frames
    assert torch.equal(compacted.n_frames, full.n_frames) and torch.equal(compacted.converged, full.converged)
    torch.testing.assert_close(compacted.positions, full.positions, rtol=0, atol=1e-12)
    assert not torch.equal(compacted.positions, batch.positions)
    # every structure is evaluated once per frame it takes (plus, with fmax, the check that stops it)
    assert evaluations < sum(sizes)
    assert evaluations <= int(full.n_frames.sum()) + len(batch)


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
