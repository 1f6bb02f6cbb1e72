"""The CHGNet backend: BPTT gradients against finite differences, checkpointed frames, padded batches, parameters."""

from __future__ import annotations

import pytest
import torch
from conftest import check_gradients, freeze_unused, reference_for, silicon_vacancy, small_backend

from ase_bptt.batch import Batch
from ase_bptt.metrics import dq
from ase_bptt.models.universal import load_universal_model
from ase_bptt.relax.rollout import rollout
from ase_bptt.relax.steps import FixedStep

pytest.importorskip("chgnet")  # CI installs the extra (pyproject's test extra); skipped only without it


def test_rollout_gradients_match_finite_differences():
    model = small_backend("chgnet", skin=0.0)  # rebuilt at every frame: rebuilds change no gradient
    batch = Batch.from_atoms(silicon_vacancy(repeat=1, rattle=0.1, seed=7))
    assert freeze_unused(model, batch, frames=3) < len(list(model.parameters())) // 4
    check_gradients(model, FixedStep(0.05), batch, frames=3, checkpoint_frames=False, n_directions=2)


def test_checkpoint_frames_give_the_same_gradient():
    # No skin: the graph is rebuilt at every frame, in the forward runs and in the recomputation alike.
    model = small_backend("chgnet", skin=0.0)
    batch = Batch.from_atoms([silicon_vacancy(repeat=1, rattle=0.1, seed=s) for s in (8, 9)])
    ref = reference_for(batch)
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(checkpoint_frames):
        out = rollout(model, batch, FixedStep(0.05), tol=None, max_steps=4, checkpoint_frames=checkpoint_frames)
        return torch.autograd.grad(dq(out.positions, ref, batch).sum(), params, allow_unused=True)

    naive, segments, every = grads(False), grads(True), grads(1)
    assert model.backend.graph.n_builds >= 2 * 4 * 3
    for a, b, c in zip(naive, segments, every):
        assert (a is None) == (b is None) == (c is None)
        if a is not None:
            assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
            assert torch.allclose(a, c, rtol=1e-9, atol=1e-12)


def test_a_padded_batch_relaxes_each_structure_as_alone():
    model = small_backend("chgnet", skin=0.3)
    a = silicon_vacancy(repeat=1, rattle=0.1, seed=10)
    b = silicon_vacancy(repeat=1, rattle=0.1, seed=11)
    del b[2]  # 6 atoms: padded to 7 in the batch
    rule = FixedStep(0.05)
    with torch.no_grad():
        both = rollout(model, Batch.from_atoms([a, b]), rule, tol=None, max_steps=5).positions
        alone = [rollout(model, Batch.from_atoms(x), rule, tol=None, max_steps=5).positions[0] for x in (a, b)]
    assert torch.allclose(both[0], alone[0], atol=1e-10)
    assert torch.allclose(both[1, :6], alone[1], atol=1e-10)
    assert torch.equal(both[1, 6], torch.zeros(3, dtype=both.dtype))  # the padding atom never moves


def test_every_trainable_parameter_is_named_and_frozen_groups_get_no_gradient():
    """What finetune's freeze and proximal term rely on: named parameters, None gradients for unused ones."""
    model = load_universal_model("chgnet")
    names = [n for n, _ in model.named_parameters()]
    assert all(n.startswith("energy_model.net.") for n in names)
    frozen = ("energy_model.net.atom_embedding", "energy_model.net.composition_model")
    for n, p in model.named_parameters():
        if n.startswith(frozen):
            p.requires_grad_(False)
    anchor = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():  # a nudge away from the anchor, so the proximal term has a gradient too
        next(p for n, p in model.named_parameters() if n.startswith("energy_model.net.mlp")).add_(1e-3)
    batch = Batch.from_atoms(silicon_vacancy(repeat=1, rattle=0.1, seed=12))
    out = rollout(model, batch, FixedStep(0.02), tol=None, max_steps=2)
    loss = dq(out.positions, reference_for(batch), batch).sum()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [p for _, p in trainable], retain_graph=True, allow_unused=True)
    # No gradient, and no error, for what cannot move an atom: the magnetic-moment head, the last
    # angle update (its output is never read) and the readout's last bias (a constant energy per atom).
    unused = {n for (n, _), g in zip(trainable, grads) if g is None}
    never = ("energy_model.net.site_wise.", "energy_model.net.angle_layers.2.", "energy_model.net.mlp.layers.7.bias")
    assert all(n.startswith(never) for n in unused)
    assert len(trainable) - len(unused) == 124 - 1  # of CHGNet's 135 trainable tensors; atom_embedding frozen
    prox = sum((p - anchor[n]).pow(2).sum() for n, p in trainable)
    (loss + prox).backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None}
    assert got == {n for n, _ in trainable}
    assert not any(n.startswith(frozen) for n in got)
    assert all(torch.isfinite(p.grad).all() for _, p in model.named_parameters() if p.grad is not None)


def test_loading_keeps_the_default_dtype_and_the_species():
    before = torch.get_default_dtype()
    model = load_universal_model("chgnet")
    assert torch.get_default_dtype() == before
    assert model.species == tuple(range(1, 95))
    assert next(model.parameters()).dtype == torch.float32
