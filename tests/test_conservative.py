"""ConservativeForces: -dE/dX against central finite differences in float64."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ase_bptt.batch import Batch
from ase_bptt.models.adapt import ADAPT, ADAPTConfig
from ase_bptt.models.base import ModelOutput
from ase_bptt.models.conservative import ConservativeForces

FD_STEP = 1e-5  # A; central differences err by O(h^2) ~ 1e-10 relative
FD_RTOL = 1e-6  # the bound on the relative error


class MorsePairs(nn.Module):
    """A smooth all-pairs Morse energy (open boundaries), padding masked out."""

    def __init__(self) -> None:
        super().__init__()
        self.depth = nn.Parameter(torch.tensor(2.0, dtype=torch.float64))
        self.alpha = nn.Parameter(torch.tensor(1.3, dtype=torch.float64))
        self.r0 = 2.35
        self.species = (14,)

    def forward(self, batch: Batch, positions: torch.Tensor) -> torch.Tensor:
        diff = positions.unsqueeze(2) - positions.unsqueeze(1)
        n = positions.shape[1]
        eye = torch.eye(n, dtype=torch.bool, device=positions.device)
        pair = batch.mask.unsqueeze(1) & batch.mask.unsqueeze(2) & ~eye
        # keep sqrt away from 0 for self and padding pairs (padding atoms all
        # sit at the origin): masked terms must not give NaN gradients either
        r = torch.sqrt((diff * diff).sum(-1) + (~pair).to(diff.dtype))
        e = self.depth * ((1 - torch.exp(-self.alpha * (r - self.r0))) ** 2 - 1)
        return 0.5 * (e * pair).sum((1, 2))


def finite_difference_forces(energy_fn, batch: Batch) -> torch.Tensor:
    pos = batch.positions
    out = torch.zeros_like(pos)
    for b in range(len(batch)):
        for i in range(int(batch.n_atoms[b])):
            for k in range(3):
                plus, minus = pos.clone(), pos.clone()
                plus[b, i, k] += FD_STEP
                minus[b, i, k] -= FD_STEP
                out[b, i, k] = -(energy_fn(batch, plus)[b] - energy_fn(batch, minus)[b]) / (2 * FD_STEP)
    return out


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_pair_potential_matches_finite_differences(si_small, si_vacancy):
    si_small.pbc = False
    batch = Batch.from_atoms([si_small, si_vacancy[:10]])
    model = ConservativeForces(MorsePairs())
    with torch.no_grad():
        out = model(batch)
        fd = finite_difference_forces(model.energy_model, batch)
    assert relative_error(out.forces, fd) < FD_RTOL
    assert torch.all(out.forces[0, 7:] == 0)  # padding
    assert model.species == (14,)


def test_adapt_energy_head_matches_finite_differences(si_small):
    torch.manual_seed(0)
    adapt = ADAPT(ADAPTConfig(d_model=16, d_ff=32, n_layers=2, n_heads=2)).double()
    with torch.no_grad():
        adapt.energy_scale.fill_(0.7)
    model = ConservativeForces(adapt)  # ModelOutput.energy is used
    batch = Batch.from_atoms(si_small)
    with torch.no_grad():
        out = model(batch)
        fd = finite_difference_forces(lambda b, p: adapt(b, p).energy, batch)
    assert out.forces.abs().max() > 1e-4
    assert relative_error(out.forces, fd) < FD_RTOL


def test_graph_for_training_and_none_for_inference(si_small):
    si_small.pbc = False
    batch = Batch.from_atoms(si_small)
    energy_model = MorsePairs()
    model = ConservativeForces(energy_model)
    pos = batch.positions.clone().requires_grad_(True)
    out = model(batch, positions=pos)
    assert out.forces.requires_grad  # create_graph=True: BPTT can go through forces
    out.forces.pow(2).sum().backward()
    assert energy_model.depth.grad is not None and pos.grad is not None
    with torch.no_grad():
        plain = batch.positions.clone()
        inference = model(batch, positions=plain)
    assert not inference.forces.requires_grad and not plain.requires_grad
    torch.testing.assert_close(inference.forces, out.forces.detach())


def test_inference_mode_is_a_clear_error(si_small):
    model = ConservativeForces(MorsePairs())
    with torch.inference_mode(), pytest.raises(RuntimeError, match="no_grad"):
        model(Batch.from_atoms(si_small))


def test_energy_model_without_energy_is_an_error(si_small):
    model = ConservativeForces(lambda b, p: ModelOutput(forces=p))
    with pytest.raises(ValueError, match="no energy"):
        model(Batch.from_atoms(si_small))


def test_training_through_adapt_energy_forces(si_small):
    """Force matching / BPTT through -dE/dX of ADAPT needs a double backward through attention."""
    torch.manual_seed(0)
    adapt = ADAPT(ADAPTConfig(d_model=16, d_ff=32, n_layers=2, n_heads=2)).double()
    model = ConservativeForces(adapt)
    batch = Batch.from_atoms([si_small, si_small[:5]])
    pos = batch.positions.clone().requires_grad_(True)
    loss = model(batch, positions=pos).forces.pow(2).sum()
    loss.backward()
    weight = adapt.blocks[0].qkv.weight
    assert weight.grad is not None and weight.grad.abs().sum() > 0
    # the parameter gradient agrees with a central finite difference
    direction = torch.randn_like(weight)
    h = 1e-6
    with torch.no_grad():
        weight += h * direction
    plus = model(batch, positions=batch.positions.clone().requires_grad_(True)).forces.pow(2).sum()
    with torch.no_grad():
        weight -= 2 * h * direction
    minus = model(batch, positions=batch.positions.clone().requires_grad_(True)).forces.pow(2).sum()
    with torch.no_grad():
        weight += h * direction
    fd = (plus - minus).item() / (2 * h)
    assert (weight.grad * direction).sum().item() == pytest.approx(fd, rel=FD_RTOL)
