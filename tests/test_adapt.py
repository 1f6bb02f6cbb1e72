"""ADAPT: shapes, permutation equivariance, padding invariance, net force, standardisation."""

from __future__ import annotations

import pytest
import torch
from ase.build import molecule
from conftest import silicon_vacancy

from ase_bptt.batch import Batch
from ase_bptt.models.adapt import ADAPT, ADAPTConfig
from ase_bptt.models.base import UnknownElementError

# float64 reorders sums when atoms are permuted or padded; the result may
# differ in the last bits only.
TOL64 = 1e-12


def tiny(coordinates: str = "periodic", **kw) -> ADAPT:
    torch.manual_seed(0)
    model = ADAPT(ADAPTConfig(d_model=16, d_ff=32, n_layers=2, n_heads=2, coordinates=coordinates, **kw))
    return model.double()


def fitted(model: ADAPT, atoms) -> ADAPT:
    batch = Batch.from_atoms(atoms)
    g = torch.Generator().manual_seed(1)
    forces = torch.randn(batch.positions.shape, generator=g, dtype=torch.float64)
    energy = -4.6 * batch.n_atoms.double() + 0.1 * torch.randn(len(batch), generator=g, dtype=torch.float64)
    model.fit_standardisation(batch, forces, energy)
    return model


def test_default_config_matches_prototype_size():
    model = ADAPT()
    n = sum(p.numel() for p in model.parameters())
    assert 100_000 < n < 120_000  # the ~110k-parameter prototype of issue 7
    assert model.config.coordinates == "periodic" and model.config.remove_net_force


def test_config_round_trip_and_errors():
    c = ADAPTConfig(d_model=32, n_heads=4, species=(14, 8, 14), frequencies=[1, 3])
    d = c.to_dict()
    assert d["species"] == [8, 14] and d["frequencies"] == [1, 3]
    assert ADAPTConfig.from_dict(d) == c
    with pytest.raises(ValueError, match="unknown ADAPTConfig keys"):
        ADAPTConfig.from_dict({**d, "rotary": True})
    with pytest.raises(ValueError, match="coordinates"):
        ADAPTConfig(coordinates="spherical")
    with pytest.raises(ValueError, match="multiple of n_heads"):
        ADAPTConfig(d_model=30, n_heads=4)


@pytest.mark.parametrize("coordinates", ["periodic", "cartesian"])
def test_forces_permute_with_atoms(si_vacancy, coordinates):
    model = fitted(tiny(coordinates), [si_vacancy]).eval()
    perm = torch.randperm(len(si_vacancy), generator=torch.Generator().manual_seed(3))
    a = Batch.from_atoms(si_vacancy)
    b = Batch.from_atoms(si_vacancy[perm.numpy()])
    out_a, out_b = model(a), model(b)
    assert out_a.forces.abs().max() > 1e-3  # not trivially zero
    torch.testing.assert_close(out_b.forces[0], out_a.forces[0, perm], rtol=0, atol=TOL64)
    torch.testing.assert_close(out_b.energy, out_a.energy, rtol=TOL64, atol=0)


def test_padding_changes_nothing(si_vacancy, si_small):
    model = fitted(tiny(), [si_vacancy, si_small]).eval()
    alone = model(Batch.from_atoms(si_small))
    padded = model(Batch.from_atoms([si_small, si_vacancy]))
    torch.testing.assert_close(padded.forces[0, :7], alone.forces[0], rtol=0, atol=TOL64)
    assert torch.all(padded.forces[0, 7:] == 0)
    torch.testing.assert_close(padded.energy[0], alone.energy[0], rtol=TOL64, atol=0)
    # padding atoms moved far away still change nothing
    batch = Batch.from_atoms([si_small, si_vacancy])
    pos = batch.positions.clone()
    pos[0, 7:] = 1e3
    moved = model(batch, positions=pos)
    torch.testing.assert_close(moved.forces[0], padded.forces[0], rtol=0, atol=TOL64)


def test_net_force_removed_only_for_periodic_cells(si_small):
    model = fitted(tiny(), [si_small]).eval()
    mol = molecule("H2O")
    mol.center(vacuum=3.0)
    on = model(Batch.from_atoms([si_small, mol]))
    assert on.forces[0].sum(0).abs().max() < 1e-12
    model_off = tiny(remove_net_force=False)
    model_off.load_state_dict(model.state_dict())
    off = model_off.eval()(Batch.from_atoms([si_small, mol]))
    assert off.forces[0].sum(0).abs().max() > 1e-4
    # the open molecule keeps its net force either way
    torch.testing.assert_close(on.forces[1], off.forces[1], rtol=0, atol=0)
    torch.testing.assert_close(on.forces[0], off.forces[0] - off.forces[0, :7].mean(0), rtol=0, atol=TOL64)


def test_periodic_features_exact_in_float64(si_small):
    """sin/cos features of s and s + 1 agree to float64 precision (2 pi not rounded to float32)."""
    model = tiny("periodic")
    batch = Batch.from_atoms(si_small)
    shifted = batch.positions + batch.cell[:, 0:1, :]  # every atom by one lattice vector
    a = model._tokens(batch, batch.positions)[..., 3 : 3 + 24]
    b = model._tokens(batch, shifted)[..., 3 : 3 + 24]
    assert (a - b).abs().max() < 1e-13


def test_periodic_features_see_images(si_small):
    """Shifting one atom by a lattice vector changes nothing with periodic features."""
    model = fitted(tiny("periodic"), [si_small]).eval()
    model.coord_std.fill_(1e6)  # make the Cartesian part negligible...
    shifted = si_small.copy()
    shifted.positions[2] += shifted.cell[0]
    a, b = model(Batch.from_atoms(si_small)), model(Batch.from_atoms(shifted))
    # ...then only the (periodic) fractional features remain: same forces to ~1e-6
    torch.testing.assert_close(a.forces, b.forces, rtol=0, atol=1e-5)


def test_fit_standardisation(si_vacancy, si_small):
    model = tiny()
    atoms = [si_vacancy, si_small, silicon_vacancy(repeat=1, rattle=0.2, seed=4)]
    batch = Batch.from_atoms(atoms)
    forces = torch.randn(batch.positions.shape, dtype=torch.float64) * 0.5 * batch.mask.unsqueeze(-1)
    energy = torch.tensor([-4.5 * 63 + 0.3, -4.5 * 7 - 0.1, -4.5 * 7 + 0.2], dtype=torch.float64)
    model.fit_standardisation(batch, forces, energy)
    real = batch.positions[batch.mask]
    torch.testing.assert_close(model.coord_mean, real.mean(0))
    torch.testing.assert_close(model.force_scale, forces[batch.mask].pow(2).mean().sqrt())
    # least squares of energy on composition: one species -> sum(E)/sum(N)... weighted
    n = batch.n_atoms.double()
    expected = (n * energy).sum() / (n * n).sum()
    torch.testing.assert_close(model.energy_shift[14], expected)
    assert model.species == (14,)
    assert torch.all(model.energy_shift[:14] == 0)


def test_dtype_follows_the_model(si_small):
    before = torch.get_default_dtype()
    model = tiny().float()
    out = model(Batch.from_atoms(si_small))  # float64 batch is cast to the model
    assert out.forces.dtype == torch.float32 and out.energy.dtype == torch.float32
    assert torch.get_default_dtype() == before


def test_gradients_flow_through_positions(si_small):
    model = fitted(tiny(), [si_small])
    batch = Batch.from_atoms(si_small)
    pos = batch.positions.clone().requires_grad_(True)
    model(batch, positions=pos).forces.pow(2).sum().backward()
    assert pos.grad is not None and pos.grad.abs().max() > 0
    assert all(p.grad is not None for p in model.force_head.parameters())


def test_non_periodic_structure_without_cell():
    model = tiny()
    mol = molecule("CH4")  # zero cell, no pbc
    out = model(Batch.from_atoms(mol))
    assert torch.isfinite(out.forces).all() and torch.isfinite(out.energy).all()


def test_species_grow_with_fitted_data_and_are_checked(si_small):
    model = tiny()
    assert model.species is None
    model.check_species([14, 92])  # anything goes before fitting...
    with pytest.raises(UnknownElementError, match="Am"):
        model.check_species([14, 95])  # ...within the descriptor table
    fitted(model, [si_small])
    assert model.species == (14,)
    ge = si_small.copy()
    ge.numbers[:] = 32
    with pytest.raises(UnknownElementError, match="Ge"):
        model.check_species(ge.numbers, where="test structure")
    fitted(model, [ge])
    assert model.species == (14, 32)
    assert ADAPTConfig.from_dict(model.config.to_dict()).species == (14, 32)


def test_dropout_only_in_training(si_small):
    model = fitted(tiny(dropout=0.2), [si_small])
    batch = Batch.from_atoms(si_small)
    model.train()
    a, b = model(batch).forces, model(batch).forces
    assert not torch.equal(a, b)  # stochastic while training
    model.eval()
    torch.testing.assert_close(model(batch).forces, model(batch).forces, rtol=0, atol=0)


# --------------------------------------------- attention without a mask when nothing is padded
def _spy_masks(monkeypatch):
    import torch.nn.functional as F

    seen = []
    original = F.scaled_dot_product_attention

    def spy(*args, attn_mask=None, **kwargs):
        seen.append(attn_mask)
        return original(*args, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return seen


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_unpadded_batch_skips_the_mask_with_identical_results(train, monkeypatch, si_vacancy, si_small):
    """No padding: attention runs without a mask and gives the masked computation's numbers (float64)."""
    model = tiny().train(train)  # dropout is 0: train mode changes only the code path
    alone = Batch.from_atoms(si_vacancy)  # no padding
    padded = Batch.from_atoms([si_vacancy, si_small])  # si_small padded to si_vacancy's size
    seen = _spy_masks(monkeypatch)
    fast = model(alone)
    assert len(seen) == 2 and all(m is None for m in seen)  # two layers, no mask
    seen.clear()
    mixed = model(padded)
    assert len(seen) == 2 and all(m is not None for m in seen)
    seen.clear()
    monkeypatch.setattr(ADAPT, "_attention_mask", staticmethod(lambda mask: mask[:, None, None, :]))
    masked = model(alone)  # the same unpadded batch through the masked path
    assert all(m is not None for m in seen)
    torch.testing.assert_close(fast.forces, masked.forces, rtol=0, atol=TOL64)
    torch.testing.assert_close(fast.energy, masked.energy, rtol=TOL64, atol=TOL64)
    n = len(si_vacancy)
    torch.testing.assert_close(fast.forces[0, :n], mixed.forces[0, :n], rtol=0, atol=TOL64)
    torch.testing.assert_close(fast.energy[0], mixed.energy[0], rtol=TOL64, atol=TOL64)
