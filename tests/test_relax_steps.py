"""Step rules: updates checked by hand and BPTT gradients against finite differences.

``MorseModel`` and ``check_gradients`` live in ``conftest.py`` (the other relax tests use them too).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import MorseModel, check_gradients, reference_for
from torch import nn

from ase_bptt.batch import Batch
from ase_bptt.metrics import dq
from ase_bptt.relax.relaxer import rollout
from ase_bptt.relax.steps import (
    DecoderStep,
    FixedStep,
    LearnedStep,
    cap_displacement,
    safe_norm,
)


@pytest.fixture
def batch(si_small):
    return Batch.from_atoms(si_small)


# ------------------------------------------------------------------ updates
def test_fixed_step_update_is_eta_times_force(batch):
    forces = torch.randn(batch.positions.shape, dtype=torch.float64) * batch.movable[..., None]
    rule = FixedStep(0.01, maxstep=None)
    update, state = rule(batch.positions, forces, batch, rule.init_state(batch, batch.positions), 0)
    torch.testing.assert_close(update, 0.01 * forces, rtol=0, atol=0)
    assert state == {}


def test_momentum_and_annealing_by_hand(batch):
    g = torch.Generator().manual_seed(0)
    f0, f1 = (
        torch.randn(batch.positions.shape, generator=g, dtype=torch.float64) * batch.movable[..., None]
        for _ in range(2)
    )
    rule = FixedStep(0.02, momentum=0.25, anneal=0.9, maxstep=None)
    state = rule.init_state(batch, batch.positions)
    u0, state = rule(batch.positions, f0, batch, state, 0)
    u1, state = rule(batch.positions, f1, batch, state, 1)
    d0 = 0.75 * 0.02 * f0.numpy()
    d1 = 0.75 * 0.02 * 0.9 * f1.numpy() + 0.25 * d0
    np.testing.assert_allclose(u0.numpy(), d0, rtol=1e-14, atol=1e-16)
    np.testing.assert_allclose(u1.numpy(), d1, rtol=1e-14, atol=1e-16)


def test_maxstep_rescales_whole_structure_not_single_atoms():
    update = torch.zeros(2, 3, 3, dtype=torch.float64)
    update[0, 0] = torch.tensor([0.3, 0.4, 0.0], dtype=torch.float64)  # |u| = 0.5
    update[0, 1] = torch.tensor([0.1, 0.0, 0.0], dtype=torch.float64)
    update[1, 0] = torch.tensor([0.05, 0.0, 0.0], dtype=torch.float64)  # under the cap: untouched
    capped = cap_displacement(update, 0.2)
    torch.testing.assert_close(capped[0], update[0] * 0.4, rtol=1e-15, atol=0)
    torch.testing.assert_close(capped[1], update[1], rtol=0, atol=0)


def test_zero_update_has_finite_gradient():
    update = torch.zeros(1, 2, 3, dtype=torch.float64, requires_grad=True)
    cap_displacement(update, 0.2).sum().backward()
    assert torch.isfinite(update.grad).all()


def test_learned_step_is_positive_and_separate(batch):
    rule = LearnedStep(0.07)
    assert rule.step_parameters() == [rule.log_eta]
    assert float(rule.eta.detach()) == pytest.approx(0.07, rel=1e-6)
    with torch.no_grad():
        rule.log_eta.fill_(-50.0)
    assert float(rule.eta.detach()) > 0


def test_decoder_starts_at_eta0_per_structure(si_small, si_vacancy):
    batch = Batch.from_atoms([si_small, si_vacancy])
    rule = DecoderStep(0.077, dtype=torch.float64)
    forces = torch.randn(batch.positions.shape, dtype=torch.float64) * batch.mask[..., None]
    s = rule.step_size(batch.positions, forces, batch, {}, 0)
    assert s.shape == (2,)
    torch.testing.assert_close(s, torch.full((2,), 0.077, dtype=torch.float64), rtol=1e-12, atol=0)


def test_decoder_ignores_padding(si_small, si_vacancy):
    rule = DecoderStep(0.05, dtype=torch.float64)
    nn.init.normal_(rule.head.weight, std=0.5)
    alone = Batch.from_atoms(si_small)
    padded = Batch.from_atoms([si_small, si_vacancy])
    forces = torch.randn(padded.positions.shape, dtype=torch.float64) * padded.mask[..., None]
    f_alone = forces[:1, : alone.positions.shape[1]]
    s_alone = rule.step_size(alone.positions, f_alone, alone, {}, 0)
    s_padded = rule.step_size(padded.positions, forces, padded, {}, 0)
    torch.testing.assert_close(s_padded[:1], s_alone, rtol=1e-12, atol=1e-14)


# ------------------------------------------------- gradients through frames
def _learned(**kw):
    return LearnedStep(0.05, dtype=torch.float64, **kw)


def _decoder(**kw):
    rule = DecoderStep(0.05, dtype=torch.float64, d_model=8, n_heads=2, d_ff=8, **kw)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # move the head off zero so every decoder weight matters
        rule.head.weight.copy_(0.3 * torch.randn(rule.head.weight.shape, generator=g, dtype=torch.float64))
    return rule


RULES = {
    "fixed": lambda: FixedStep(0.05),
    "learned": _learned,
    "decoder": _decoder,
    "momentum": lambda: _learned(momentum=0.3),
    "anneal": lambda: _learned(anneal=0.9),
    "maxstep": lambda: _learned(maxstep=0.005),
}


CHECKPOINTING = dict(argvalues=[False, 1, True, 4], ids=["plain", "per-frame", "sqrt-segments", "segments-4+2"])


@pytest.mark.parametrize("checkpoint_frames", **CHECKPOINTING)
@pytest.mark.parametrize("name", list(RULES))
def test_gradients_match_finite_differences(name, checkpoint_frames, batch):
    model = MorseModel()
    rule = RULES[name]()
    if name == "maxstep":  # the cap must actually bind on the first frame
        with torch.no_grad():
            forces = model(batch).forces * batch.movable[..., None]
        raw = float(safe_norm(rule.eta.detach() * forces).max())
        assert raw > 2 * rule.maxstep
    # (with the cap binding on every frame eta has no effect, so no eta-only direction there)
    extra = [{"rule.log_eta": 1.0}] if isinstance(rule, LearnedStep) and name != "maxstep" else None
    check_gradients(model, rule, batch, frames=6, checkpoint_frames=checkpoint_frames, extra_directions=extra)


@pytest.mark.parametrize("segment", [1, 3, True], ids=["per-frame", "3", "sqrt"])
def test_checkpointed_gradients_equal_plain_with_noise(segment, batch):
    """Noise is drawn outside the recomputed segments, so backward replays the same numbers."""
    model = MorseModel()
    grads = []
    for checkpoint_frames in (False, segment):
        rule = FixedStep(0.05, noise=0.01).train()
        gen = torch.Generator().manual_seed(4)
        out = rollout(model, batch, rule, tol=None, max_steps=7, checkpoint_frames=checkpoint_frames, generator=gen)
        grads.append(
            torch.autograd.grad(dq(out.positions, reference_for(batch), batch).sum(), list(model.parameters()))
        )
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_noise_only_in_training(batch):
    model = MorseModel()
    rule = FixedStep(0.05, noise=0.01)
    runs = []
    for mode, seed in (("train", 1), ("train", 2), ("eval", 1), ("eval", 2)):
        getattr(rule, mode)()
        out = rollout(model, batch, rule, tol=None, max_steps=3, generator=torch.Generator().manual_seed(seed))
        runs.append(out.positions.detach())
    assert not torch.equal(runs[0], runs[1])
    assert torch.equal(runs[2], runs[3])


# ----------------------------------------------- recomputed segments vs naive BPTT (ADAPT, float64)
EQUAL_GRAD_RTOL = 1e-12  # float64: recomputation replays the same operations; only summation order may differ


@pytest.mark.parametrize("segment", [1, 3, True], ids=["per-frame", "3", "sqrt"])
@pytest.mark.parametrize("rule_name", ["fixed-momentum", "learned", "fire"])
def test_recomputed_rollout_equals_naive(segment, rule_name, si_vacancy):
    """``checkpoint_frames`` gives naive BPTT's positions, frame counts and gradients (tiny ADAPT, dropout on)."""
    from ase_bptt.models.adapt import ADAPT, ADAPTConfig
    from ase_bptt.relax.fire import FIREStep

    torch.manual_seed(0)
    model = ADAPT(ADAPTConfig(d_model=16, d_ff=32, n_layers=1, n_heads=2, dropout=0.1)).double()
    model.train()  # dropout on: the recomputation must replay the same masks
    atoms = si_vacancy.copy()
    atoms.rattle(0.1, seed=3)
    batch = Batch.from_atoms(atoms)
    reference = torch.as_tensor(si_vacancy.positions)[None]
    rule = {
        "fixed-momentum": lambda: FixedStep(0.05, momentum=0.3, anneal=0.99),
        "learned": lambda: LearnedStep(0.05, dtype=torch.float64),
        "fire": FIREStep,
    }[rule_name]().double()
    results = []
    for ck in (False, segment):
        model.zero_grad(set_to_none=True)
        rule.zero_grad(set_to_none=True)
        torch.manual_seed(5)  # the dropout masks, the same in both runs
        out = rollout(model, batch, rule, tol=None, max_steps=7, checkpoint_frames=ck)
        dq(out.positions, reference, batch).sum().backward()
        # The energy head gets no gradient from a position loss: zeros, in both runs alike.
        grads = torch.cat(
            [
                (torch.zeros_like(p) if p.grad is None else p.grad).flatten()
                for p in list(model.parameters()) + list(rule.parameters())
            ]
        )
        results.append((out.positions.detach(), out.n_frames, grads))
    (p0, n0, g0), (p1, n1, g1) = results
    assert torch.equal(n0, n1) and int(n0[0]) == 7
    assert torch.allclose(p0, p1, rtol=0, atol=1e-12)
    assert float(g0.norm()) > 0
    assert float((g1 - g0).norm() / g0.norm()) < EQUAL_GRAD_RTOL


def test_recomputed_rollout_stops_inside_a_segment(batch):
    """A structure that stops mid-segment is frozen there: same frames, positions and gradients as naive."""
    model = MorseModel()
    results = []
    for ck in (False, 4):
        out = rollout(model, batch, FixedStep(0.05), tol=5e-3, max_steps=30, checkpoint_frames=ck)
        grads = torch.autograd.grad(dq(out.positions, reference_for(batch), batch).sum(), list(model.parameters()))
        results.append((out, grads))
    (a, ga), (b, gb) = results
    assert 0 < int(a.n_frames.max()) < 30 and int(a.n_frames.max()) % 4 != 0  # stopped, mid-segment
    assert torch.equal(a.n_frames, b.n_frames) and torch.equal(a.converged, b.converged)
    torch.testing.assert_close(a.positions, b.positions, rtol=0, atol=1e-14)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14)


def test_bad_checkpoint_frames(batch):
    with pytest.raises(ValueError, match="checkpoint_frames"):
        rollout(MorseModel(), batch, FixedStep(0.05), max_steps=3, checkpoint_frames=-2)
