"""MinImageADAPT ("adapt-mi"): exact symmetries, padding, cutoff, periodic images, checkpoints, pretraining, CLI."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk
from conftest import silicon_vacancy

from ase_bptt.batch import Batch
from ase_bptt.models.base import UnknownElementError
from ase_bptt.models.mi_attention import (
    MinImageADAPT,
    MinImageADAPTConfig,
    cell_heights,
    image_shifts,
    reciprocal_cell,
)

#: float64 results that agree up to the order of summation (shifted, permuted, padded, rotated).
TOL64 = 1e-10
#: Forces are continuous at the cutoff: moving a neighbour from just inside to just outside
#: (2e-6 A) changes them by about the force gradient times 2e-6 A, far below this.
CONTINUITY_TOL = 1e-5
#: float32 against float64 on the same weights.
TOL32 = 1e-4
#: Central differences (h = 1e-6 A) of a float64 loss against autograd, relative.
FD_TOL = 1e-6


def tiny(cutoff: float = 5.0, **kw) -> MinImageADAPT:
    """A small random float64 model whose forces are O(1) eV/A."""
    torch.manual_seed(0)
    config = MinImageADAPTConfig(d_model=16, d_ff=32, n_layers=2, n_heads=2, cutoff=cutoff, n_rbf=8, d_pair=16, **kw)
    model = MinImageADAPT(config).double().eval()
    model.force_scale.fill_(3.0)
    return model


def si_cluster(seed: int = 0) -> Atoms:
    """A rattled 17-atom silicon cluster without a cell (pbc False)."""
    atoms = bulk("Si", "diamond", a=5.43, cubic=True) * 2
    centre = atoms.positions.mean(0)
    keep = np.argsort(np.linalg.norm(atoms.positions - centre, axis=1))[:17]
    cluster = Atoms("Si17", positions=atoms.positions[keep] - centre)
    cluster.positions += np.random.default_rng(seed).normal(scale=0.1, size=(17, 3))
    return cluster


def random_rotation(seed: int) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    return q if torch.linalg.det(q) > 0 else -q


# ----------------------------------------------------------------- config
def test_config_round_trip_and_errors():
    c = MinImageADAPTConfig(d_model=32, n_heads=4, cutoff=4, species=(14, 8, 14))
    d = c.to_dict()
    assert d["species"] == [8, 14] and d["cutoff"] == 4.0
    assert MinImageADAPTConfig.from_dict(d) == c
    with pytest.raises(ValueError, match="unknown MinImageADAPTConfig keys"):
        MinImageADAPTConfig.from_dict({**d, "frequencies": [1]})
    with pytest.raises(ValueError, match="multiple of n_heads"):
        MinImageADAPTConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="cutoff"):
        MinImageADAPTConfig(cutoff=0)
    assert MinImageADAPT().periodic_features is False  # a cluster without a cell is fine


def test_unknown_and_out_of_table_elements_are_refused():
    model = tiny(species=(14,))
    with pytest.raises(UnknownElementError, match="not trained on"):
        model.check_species([14, 6])
    with pytest.raises(UnknownElementError, match="Z = 1..94"):
        model.check_species([14, 100])


# ------------------------------------------------------------- symmetries
def test_atoms_of_one_element_get_tokens_from_their_neighbourhood(si_vacancy):
    # Element descriptors alone would give every Si atom the same token (a pair potential).
    model = tiny()
    batch = Batch.from_atoms(si_vacancy)
    model.fit_standardisation(batch, torch.zeros_like(batch.positions))
    assert model.geometry_std.min() >= 1e-2 and float(model.geometry_std.max()) > 0.02
    seen = {}
    model.embed.register_forward_hook(lambda module, inputs, output: seen.update(tokens=output))
    model(Batch.from_atoms(si_vacancy))
    assert seen["tokens"][0].std(dim=0).max() > 0.01


def test_exact_translation_invariance_in_a_periodic_cell(si_vacancy):
    model = tiny()
    shifted = si_vacancy.copy()
    shifted.positions += np.random.default_rng(5).normal(scale=4.0, size=3)
    shifted.wrap()
    assert np.abs(shifted.positions - si_vacancy.positions).max() > 1.0  # some atoms did wrap
    a, b = model(Batch.from_atoms(si_vacancy)), model(Batch.from_atoms(shifted))
    assert (a.forces - b.forces).abs().max() < TOL64
    assert (a.energy - b.energy).abs().max() < TOL64 * len(si_vacancy)
    assert a.forces.abs().max() > 0.1  # not vacuous


def test_rotation_equivariance_of_a_cluster():
    model = tiny()
    cluster = si_cluster()
    rot = random_rotation(7)
    turned = cluster.copy()
    turned.positions = cluster.positions @ rot.numpy().T
    a, b = model(Batch.from_atoms(cluster)), model(Batch.from_atoms(turned))
    assert (a.forces @ rot.T - b.forces).abs().max() < TOL64
    assert (a.energy - b.energy).abs().max() < TOL64
    assert a.forces.abs().max() > 0.1


def test_net_force_is_zero_in_a_periodic_cell_and_in_a_cluster(si_vacancy):
    model = tiny()
    for atoms in (si_vacancy, si_cluster()):
        forces = model(Batch.from_atoms(atoms)).forces
        assert forces.sum(1).abs().max() < TOL64
        assert forces.abs().max() > 0.1


def test_forces_permute_with_atoms(si_vacancy):
    model = tiny()
    perm = torch.randperm(len(si_vacancy), generator=torch.Generator().manual_seed(3))
    a = model(Batch.from_atoms(si_vacancy))
    b = model(Batch.from_atoms(si_vacancy[perm.numpy()]))
    assert (a.forces[0, perm] - b.forces[0]).abs().max() < TOL64
    assert (a.energy - b.energy).abs().max() < TOL64


def test_padding_is_inert_and_a_batch_equals_its_members(si_vacancy):
    model = tiny()
    small = silicon_vacancy(seed=4)
    del small[10]  # 62 atoms: padded by one in a batch with the 63-atom cell
    batch = Batch.from_atoms([small, si_vacancy])
    out = model(batch)
    assert bool((out.forces[0, 62:] == 0).all())
    for i, atoms in enumerate((small, si_vacancy)):
        single = model(Batch.from_atoms(atoms))
        assert (out.forces[i, : len(atoms)] - single.forces[0]).abs().max() < TOL64
        assert (out.energy[i] - single.energy[0]).abs() < TOL64


def test_forces_are_continuous_at_the_cutoff():
    # A dimer plus a third atom crossing the cutoff of the first one.
    model = tiny(cutoff=3.0)
    outs = []
    for d in (3.0 - 1e-6, 3.0 + 1e-6):
        atoms = Atoms("Si3", positions=[[0, 0, 0], [2.3, 0, 0], [-d, 0, 0]])
        outs.append(model(Batch.from_atoms(atoms)).forces)
    assert outs[0].abs().max() > 0.1
    assert (outs[0] - outs[1]).abs().max() < CONTINUITY_TOL


def ase_descriptors(atoms: Atoms, c: MinImageADAPTConfig) -> np.ndarray:
    """Radial density, dipole and quadrupole norms per RBF of every atom, from ase.neighborlist (which
    counts every periodic image within the cutoff, the atom's own images included)."""
    from ase.neighborlist import neighbor_list

    i, j, d, vec = neighbor_list("ijdD", atoms, c.cutoff)
    # The model builds its centres in float32 (then casts them): the same rounding here.
    centres = torch.linspace(0.0, c.cutoff, c.n_rbf, dtype=torch.float32).double().numpy()
    width = c.cutoff / (c.n_rbf - 1)
    envelope = 0.5 * (1 + np.cos(np.pi * d / c.cutoff))
    rbf = np.exp(-(((d[:, None] - centres) / width) ** 2)) * envelope[:, None]  # (pairs, K)
    u = vec / d[:, None]
    n = len(atoms)
    rho = np.exp(-((centres / width) ** 2)) + np.zeros((n, c.n_rbf))  # the atom itself: rbf(0)
    dipole_vec = np.zeros((n, c.n_rbf, 3))
    second = np.zeros((n, c.n_rbf, 3, 3))
    np.add.at(rho, i, rbf)
    np.add.at(dipole_vec, i, rbf[:, :, None] * u[:, None, :])
    np.add.at(second, i, rbf[:, :, None, None] * (u[:, :, None] * u[:, None, :])[:, None])
    traceless = second - np.eye(3) * np.trace(second, axis1=2, axis2=3)[..., None, None] / 3
    return np.log1p(
        np.concatenate([rho, (dipole_vec**2).sum(-1), np.clip((traceless**2).sum((-1, -2)), 0, None)], axis=1)
    )


def wurtzite_gan(seed: int = 0) -> Atoms:
    """A rattled 72-atom 3x3x2 wurtzite GaN supercell: in-plane heights 8.3 A, below twice the 5 A cutoff."""
    atoms = bulk("GaN", "wurtzite", a=3.19, c=5.19) * (3, 3, 2)
    atoms.rattle(0.05, seed=seed)
    return atoms


def test_neighbourhood_descriptors_match_ase_neighbour_lists(si_vacancy):
    """Every atom of a rattled vacancy cell, recomputed from ase.neighborlist; a padded batch gives the same rows."""
    model = tiny()
    c = model.config
    want = ase_descriptors(si_vacancy, c)
    n = len(si_vacancy)
    small = si_vacancy[:20]
    small.cell = si_vacancy.cell
    got, padded = model.neighbourhood_descriptors(Batch.from_atoms([si_vacancy, small]))
    assert got.shape == (n, 3 * c.n_rbf) and padded.shape == (20, 3 * c.n_rbf)
    assert np.abs(got.numpy() - want).max() < TOL64
    alone = model.neighbourhood_descriptors(Batch.from_atoms(small))[0]
    assert (alone - padded).abs().max() < TOL64
    assert float(got[:, c.n_rbf :].max()) > 0.1  # the vacancy's neighbours see a dipole: not vacuous


def test_cells_below_twice_the_cutoff_see_every_image(si_vacancy):
    """A 72-atom wurtzite supercell (heights 8.3 A) and an 8-atom silicon cube (5.43 A, an atom's own
    images within the cutoff) against ase.neighborlist, alone and batched with a cell that needs no images."""
    model = tiny()
    c = model.config
    cube = bulk("Si", "diamond", a=5.43, cubic=True)
    cube.rattle(0.1, seed=3)
    gan = wurtzite_gan()
    for atoms in (gan, cube):
        assert float(cell_heights(Batch.from_atoms(atoms).cell, Batch.from_atoms(atoms).pbc).min()) < 2 * c.cutoff
        (got,) = model.neighbourhood_descriptors(Batch.from_atoms(atoms))
        assert np.abs(got.numpy() - ase_descriptors(atoms, c)).max() < TOL64
    got = model.neighbourhood_descriptors(Batch.from_atoms([si_vacancy, cube]))
    assert np.abs(got[0].numpy() - ase_descriptors(si_vacancy, c)).max() < TOL64
    assert np.abs(got[1].numpy() - ase_descriptors(cube, c)).max() < TOL64


def test_position_gradients_are_finite_with_padding(si_vacancy):
    model = tiny()
    batch = Batch.from_atoms([si_vacancy, silicon_vacancy(seed=2)[:-3]])
    pos = batch.positions.clone().requires_grad_(True)
    out = model(batch, positions=pos)
    (out.forces.pow(2).sum() + out.energy.sum()).backward()
    assert pos.grad is not None and bool(pos.grad.isfinite().all())
    assert bool((pos.grad[1, -3:] == 0).all())  # padding atoms have no influence
    params = [p.grad for p in model.parameters()]
    assert all(g is not None and bool(g.isfinite().all()) for g in params)


def test_float32_matches_float64(si_vacancy):
    model = tiny()
    f64 = model(Batch.from_atoms(si_vacancy)).forces
    f32 = model.float()(Batch.from_atoms(si_vacancy)).forces
    assert f32.dtype == torch.float32 and torch.get_default_dtype() == torch.float32
    assert (f32.double() - f64).abs().max() < TOL32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(si_vacancy):
    model = tiny()
    cpu = model(Batch.from_atoms(si_vacancy)).forces
    gpu = model.cuda()(Batch.from_atoms(si_vacancy)).forces
    assert (gpu.cpu() - cpu).abs().max() < TOL64


# ----------------------------------------------------------------- cutoff
def test_reciprocal_cell_matches_the_fractional_coordinates_of_metrics():
    from ase_bptt.metrics import fractional

    skewed = bulk("Si", "diamond", a=5.43) * (3, 3, 3)
    skewed.rattle(0.1, seed=2)
    slab = skewed.copy()
    slab.pbc = [True, True, False]
    batch = Batch.from_atoms([skewed, slab])
    safe, inverse = reciprocal_cell(batch.cell, batch.pbc)
    frac, safe_metrics = fractional(batch.positions, batch.cell, batch.pbc)
    assert torch.equal(safe, safe_metrics)
    assert (batch.positions @ inverse - frac).abs().max() < TOL64


def test_cell_heights():
    atoms = bulk("Si", "diamond", a=5.43)  # primitive fcc cell: height a / sqrt(3)
    batch = Batch.from_atoms(atoms)
    heights = cell_heights(batch.cell, batch.pbc)
    assert torch.allclose(heights, torch.full((1, 3), 5.43 / math.sqrt(3), dtype=torch.float64))
    batch = Batch.from_atoms(Atoms("Si", cell=[4, 5, 6], pbc=[True, False, True]))
    assert cell_heights(batch.cell, batch.pbc).tolist() == [[4.0, math.inf, 6.0]]


def test_image_shifts():
    cube = Batch.from_atoms(bulk("Si", "diamond", a=5.43, cubic=True))  # height 5.43: floor(5 / 5.43 + 1/2) = 1
    shifts = image_shifts(cube.cell, cube.pbc, 5.0)
    assert shifts.shape == (27, 3) and torch.equal(shifts[13], torch.zeros(3, dtype=shifts.dtype))
    assert torch.equal(shifts.flip(0), -shifts)  # row S - 1 - k is minus row k
    assert image_shifts(cube.cell, cube.pbc, 2.0).shape == (1, 3)  # 2 / 5.43 + 1/2 < 1: the minimum image
    big = Batch.from_atoms(silicon_vacancy())  # 10.86 A: no images
    assert image_shifts(big.cell, big.pbc, 5.0).tolist() == [[0.0, 0.0, 0.0]]
    slab = Atoms("Si", cell=[4, 5, 6], pbc=[True, False, True])
    batch = Batch.from_atoms(slab)  # heights 4 and 6 with cutoff 5: reach 1 along a and c, none along b
    assert image_shifts(batch.cell, batch.pbc, 5.0)[:, 1].abs().max() == 0
    assert image_shifts(batch.cell, batch.pbc, 5.0).shape == (9, 3)


def test_a_small_cell_gives_the_forces_of_its_supercell():
    """Periodic images counted right: a cell below twice the cutoff (images needed) and a supercell of it
    (minimum image only) are the same crystal, so every atom gets the same force and the energy scales."""
    model = tiny()
    for atoms, repeat in ((wurtzite_gan(), (2, 2, 1)), (silicon_vacancy(repeat=1, seed=4), (2, 2, 2))):
        supercell = atoms * repeat
        n = len(atoms)
        a, b = model(Batch.from_atoms(atoms)), model(Batch.from_atoms(supercell))
        copies = b.forces[0].reshape(-1, n, 3)
        assert (copies - a.forces[0]).abs().max() < TOL64
        assert abs(float(b.energy[0].detach()) - len(copies) * float(a.energy[0].detach())) < TOL64 * len(supercell)
        assert a.forces.abs().max() > 0.1 and a.forces.sum(1).abs().max() < TOL64  # not vacuous; Newton's third law


def test_gradients_through_periodic_images_match_finite_differences():
    """The log-sum-exp over images keeps position gradients exact (a loss on forces, central differences)."""
    model = tiny(cutoff=3.0)
    atoms = bulk("Si", "diamond", a=5.43, cubic=True)  # height 5.43 < 6: images within the 3 A cutoff
    atoms.rattle(0.1, seed=1)
    batch = Batch.from_atoms(atoms)
    assert len(model.image_shifts(batch)) == 27

    def loss(pos):
        return model(batch, positions=pos).forces.pow(2).sum()

    pos = batch.positions.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss(pos), pos)
    assert bool(grad.isfinite().all()) and float(grad.abs().max()) > 0.1
    h = 1e-6
    for atom, axis in ((0, 0), (3, 2), (7, 1)):
        step = torch.zeros_like(pos)
        step[0, atom, axis] = h
        fd = (loss(batch.positions + step) - loss(batch.positions - step)) / (2 * h)
        assert abs(float(fd) - float(grad[0, atom, axis])) < FD_TOL * max(1.0, abs(float(fd)))


# ------------------------------------------------------------ checkpoints
def test_checkpoint_round_trip_gives_identical_forces(si_vacancy, tmp_path):
    from ase_bptt.calculator import BPTTCalculator
    from ase_bptt.models.checkpoint import load_checkpoint, load_model, save_checkpoint

    model = tiny(species=(14,))
    batch = Batch.from_atoms(si_vacancy)
    g = torch.Generator().manual_seed(1)
    forces = torch.randn(batch.positions.shape, generator=g, dtype=torch.float64)
    model.fit_standardisation(batch, forces, -4.3 * batch.n_atoms.double())
    assert model.config.species == (14,) and float(model.force_scale) > 0.5
    path = save_checkpoint(tmp_path / "mi.pt", model)
    assert load_checkpoint(path)["model"]["name"] == "ADAPT-MI"
    loaded = load_model(path)
    assert isinstance(loaded, MinImageADAPT) and loaded.config == model.config
    a, b = model(batch), loaded(batch)
    assert torch.equal(a.forces, b.forces) and torch.equal(a.energy, b.energy)
    # ... and ASE sees the same forces through the calculator.
    atoms = si_vacancy.copy()
    atoms.calc = BPTTCalculator(path)
    assert np.abs(atoms.get_forces() - a.forces[0].detach().numpy()).max() < TOL64


def test_relaxer_backpropagates_through_a_rollout(si_vacancy):
    from ase_bptt.relax.rollout import rollout
    from ase_bptt.relax.steps import FixedStep

    model = tiny()
    batch = Batch.from_atoms(si_vacancy)
    result = rollout(model, batch, FixedStep(0.02), tol=None, max_steps=3)
    loss = result.positions.pow(2).sum()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(bool(g.isfinite().all()) for g in grads)


# ------------------------------------------------------------ pretraining
@pytest.fixture(scope="module")
def si_db(tmp_path_factory):
    """Short Stillinger-Weber relaxations of rattled 64-site silicon vacancy cells (10.9 A across)."""
    pytest.importorskip("matscipy")
    from ase_bptt.data.db import TrajectoryDB
    from ase_bptt.data.generate import relax_frames
    from ase_bptt.data.recipes import stillinger_weber

    path = tmp_path_factory.mktemp("mi") / "si.db"
    db = TrajectoryDB(path)
    for k, split in enumerate(["train"] * 3 + ["val"]):
        frames = relax_frames(silicon_vacancy(rattle=0.15, seed=10 + k), stillinger_weber(), max_steps=20)
        db.add_trajectory(frames, label="vacancy", source="test", split=split)
    return path


#: 60 Adam steps of the tiny model take the train force MAE from ~0.7 to ~0.33 eV/A (measured);
#: a model that does not learn stays near its fresh value.
LEARNED_FRACTION = 0.7


def test_pretraining_lowers_the_train_force_mae(si_db, tmp_path):
    from ase_bptt.data.datasets import load_frames
    from ase_bptt.models.checkpoint import load_model
    from ase_bptt.train.pretrain import PretrainConfig, pretrain

    model_cfg = {"model_name": "adapt-mi", "d_model": 16, "d_ff": 32, "n_layers": 1, "n_heads": 2}
    config = PretrainConfig(
        model=model_cfg, max_steps=60, epochs=100, batch_size=8, lr=1e-2, patience=None, checkpoint_every=None, seed=0
    )
    out = pretrain(si_db, tmp_path / "mi.pt", config=config, progress=False)
    trained = load_model(out, dtype=torch.float64)
    assert isinstance(trained, MinImageADAPT) and trained.config.species == (14,)

    train = load_frames(si_db, "train")
    assert train is not None
    batch, forces, energy = train.take(torch.arange(len(train)))
    torch.manual_seed(0)  # the fresh model pretrain started from
    fresh = MinImageADAPT(MinImageADAPTConfig.from_dict({k: v for k, v in model_cfg.items() if k != "model_name"}))
    fresh = fresh.double().eval()
    fresh.fit_standardisation(batch, forces, energy)

    def mae(model) -> float:
        with torch.no_grad():
            diff = (model(batch).forces - forces.double()) * batch.mask.unsqueeze(-1)
        return float(diff.abs().sum() / (3 * batch.mask.sum()))

    before, after = mae(fresh), mae(trained)
    assert after < LEARNED_FRACTION * before, (before, after)


def test_pretrain_config_names_the_architecture():
    from ase_bptt.runs.config import ConfigError
    from ase_bptt.train.pretrain import PretrainConfig

    assert PretrainConfig(model={"model_name": "adapt", "d_model": 8}).model == {"d_model": 8}
    assert PretrainConfig(model=MinImageADAPTConfig(d_model=8, n_heads=2)).model["model_name"] == "adapt-mi"
    with pytest.raises(ConfigError, match="model_name"):
        PretrainConfig(model={"model_name": "mace"})


def test_cli_pretrain_model_option(monkeypatch, tmp_path):
    from click.testing import CliRunner

    import ase_bptt.train.pretrain as pretrain_module
    from ase_bptt.cli import cli

    seen = {}

    def fake_pretrain(db, out, *, config, **kwargs):
        seen["config"] = config
        return out

    monkeypatch.setattr(pretrain_module, "pretrain", fake_pretrain)
    db = tmp_path / "x.db"
    db.touch()
    args = [
        "--quiet",
        "pretrain",
        str(db),
        "-o",
        str(tmp_path / "m.pt"),
        "--architecture",
        "adapt-mi",
        "--d-model",
        "16",
    ]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert seen["config"].model == {"model_name": "adapt-mi", "d_model": 16, "d_ff": 32, "n_layers": 2, "n_heads": 4}
