"""BPTTCalculator with ASE's own optimizers, constraints, dtypes and errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import bulk, molecule
from ase.calculators.calculator import PropertyNotImplementedError
from ase.constraints import FixAtoms
from ase.optimize import BFGS, FIRE, LBFGS

from ase_bptt.batch import Batch
from ase_bptt.calculator import BPTTCalculator
from ase_bptt.models.adapt import ADAPT, ADAPTConfig
from ase_bptt.models.base import ForceModel, ModelOutput, UnknownElementError
from ase_bptt.models.checkpoint import CheckpointNotFoundError, save_checkpoint
from ase_bptt.models.domain import ATOM_COUNT_MARGIN, NonFiniteResultError, OutOfDomainWarning, StructureError


def tiny_model(atoms) -> ADAPT:
    torch.manual_seed(0)
    m = ADAPT(ADAPTConfig(d_model=16, d_ff=32, n_layers=2, n_heads=2))
    batch = Batch.from_atoms(atoms)
    # forces of a plausible size (0.3 eV/A) so the optimizers take real steps
    m.fit_standardisation(
        batch, 0.3 * torch.randn(batch.positions.shape, dtype=torch.float64), torch.tensor([-4.6 * len(atoms)])
    )
    return m


@pytest.fixture
def checkpoint(tmp_path, si_vacancy):
    relax = {"step": {"rule": "fixed", "eta": 0.05}, "tol": 1e-3, "max_steps": 75}
    return save_checkpoint(tmp_path / "si.pt", tiny_model(si_vacancy), relax=relax)


def test_units_shapes_and_properties(checkpoint, si_vacancy):
    assert BPTTCalculator.implemented_properties == ("energy", "free_energy", "forces")
    calc = BPTTCalculator(checkpoint)
    si_vacancy.calc = calc
    forces = si_vacancy.get_forces()
    energy = si_vacancy.get_potential_energy()
    assert forces.shape == (63, 3) and forces.dtype == np.float64
    assert np.isfinite(energy) and energy == si_vacancy.get_potential_energy(force_consistent=True)
    assert abs(energy / 63 + 4.6) < 0.5  # the fitted per-atom energy shift, in eV
    assert np.abs(forces.sum(0)).max() < 1e-4  # net force removed (float32)
    # same numbers as the model itself on a Batch of one
    out = calc.model(Batch.from_atoms(si_vacancy, dtype=torch.float32))
    np.testing.assert_allclose(forces, out.forces[0].detach().double().numpy(), rtol=0, atol=0)
    assert calc.relax_settings == {"step": {"rule": "fixed", "eta": 0.05}, "tol": 1e-3, "max_steps": 75}
    assert BPTTCalculator.from_file(checkpoint).checkpoint["format"] == "ase-bptt"


@pytest.mark.parametrize("optimizer", [FIRE, BFGS, LBFGS])
def test_ase_optimizers_run_20_steps(checkpoint, si_vacancy, optimizer):
    start = si_vacancy.positions.copy()
    si_vacancy.calc = BPTTCalculator(checkpoint, dtype=torch.float64)
    opt = optimizer(si_vacancy, logfile=None)
    opt.run(fmax=1e-6, steps=20)  # unreachable fmax: all 20 steps are taken
    assert opt.nsteps == 20
    assert np.isfinite(si_vacancy.get_potential_energy())
    assert np.isfinite(si_vacancy.get_forces()).all()
    assert np.abs(si_vacancy.positions - start).max() > 1e-3  # it moved


def test_fixed_atom_stays_fixed_through_fire(checkpoint, si_vacancy):
    si_vacancy.set_constraint(FixAtoms(indices=[3, 10]))
    fixed = si_vacancy.positions[[3, 10]].copy()
    si_vacancy.calc = BPTTCalculator(checkpoint)
    FIRE(si_vacancy, logfile=None).run(fmax=1e-6, steps=20)
    assert np.array_equal(si_vacancy.positions[[3, 10]], fixed)
    assert np.all(si_vacancy.get_forces()[[3, 10]] == 0)  # ASE zeroes them
    assert np.abs(si_vacancy.get_forces(apply_constraint=False)[[3, 10]]).max() > 0


def test_default_dtype_unchanged_by_float64(checkpoint, si_vacancy):
    before = torch.get_default_dtype()
    calc = BPTTCalculator(checkpoint, dtype=torch.float64)
    si_vacancy.calc = calc
    si_vacancy.get_forces()
    assert calc.model.force_head.weight.dtype == torch.float64
    assert torch.get_default_dtype() == before == torch.float32


def test_float64_agrees_with_float32(checkpoint, si_vacancy):
    a = si_vacancy.copy()
    a.calc = BPTTCalculator(checkpoint)
    si_vacancy.calc = BPTTCalculator(checkpoint, dtype=torch.float64)
    np.testing.assert_allclose(a.get_forces(), si_vacancy.get_forces(), atol=1e-4)


def test_unknown_element_is_named(checkpoint):
    atoms = bulk("Ge", "diamond", a=5.66, cubic=True)
    atoms.calc = BPTTCalculator(checkpoint)
    with pytest.raises(UnknownElementError, match="Ge"):
        atoms.get_forces()


def test_model_object_path(si_vacancy):
    model = tiny_model(si_vacancy).train()
    calc = BPTTCalculator(model)
    assert calc.model is model and not model.training and calc.relax_settings is None
    si_vacancy.calc = calc
    assert np.isfinite(si_vacancy.get_forces()).all()


def test_missing_checkpoint_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="missing.pt"):
        BPTTCalculator(tmp_path / "missing.pt")
    with pytest.raises(TypeError):
        BPTTCalculator(42)


class ForcesOnly(ForceModel):
    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones((), dtype=torch.float64))

    def forward(self, batch, positions=None):
        pos = batch.positions if positions is None else positions
        return ModelOutput(forces=-0.1 * self.scale * (pos - pos.mean(1, keepdim=True)))


def test_forces_only_model_has_no_energy(si_small):
    si_small.calc = BPTTCalculator(ForcesOnly())
    assert si_small.get_forces().shape == (7, 3)
    with pytest.raises(PropertyNotImplementedError, match="forces only"):
        si_small.get_potential_energy()


def test_works_with_ase_db_and_io(tmp_path, checkpoint, si_small):
    import ase.db
    import ase.io

    si_small.calc = BPTTCalculator(checkpoint)
    forces = si_small.get_forces()
    ase.io.write(tmp_path / "a.extxyz", si_small)
    np.testing.assert_allclose(ase.io.read(tmp_path / "a.extxyz").get_forces(), forces, atol=1e-6)
    with ase.db.connect(tmp_path / "a.db") as db:
        db.write(si_small)
    np.testing.assert_allclose(ase.db.connect(tmp_path / "a.db").get(1).forces, forces)


def test_conservative_model_matches_ase_numerical_forces(si_small):
    """A ConservativeForces model through the calculator: forces = ASE's own finite differences."""
    from ase.calculators.fd import calculate_numerical_forces
    from test_conservative import MorsePairs

    from ase_bptt.models.conservative import ConservativeForces

    si_small.pbc = False
    calc = BPTTCalculator(ConservativeForces(MorsePairs()))
    si_small.calc = calc
    numerical = calculate_numerical_forces(si_small, eps=1e-5)
    np.testing.assert_allclose(si_small.get_forces(), numerical, rtol=0, atol=1e-7)


def test_other_ase_constraints_are_left_to_ase(checkpoint, si_small):
    """Constraints the torch relaxers refuse (FixBondLength) work through ASE."""
    from ase.constraints import FixBondLength

    bond = si_small.get_distance(0, 1)
    si_small.set_constraint(FixBondLength(0, 1))
    si_small.calc = BPTTCalculator(checkpoint, dtype=torch.float64)
    FIRE(si_small, logfile=None).run(fmax=1e-6, steps=10)
    assert si_small.get_distance(0, 1) == pytest.approx(bond, abs=1e-8)


# ------------------------------------------------------------ check_state fast path
class _Counting(ForceModel):
    """Harmonic forces that count the model calls (one per recalculation)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, batch, positions=None):
        self.calls += 1
        pos = batch.positions if positions is None else positions
        return ModelOutput(forces=-pos * batch.mask[..., None], energy=pos.square().sum((1, 2)))


def _changes():
    """(name, how to change a copy): each must trigger a recalculation, except the sub-tolerance one."""

    def nudge(eps):
        def f(a):
            p = a.get_positions()
            p[1, 2] += eps
            a.set_positions(p)

        return f

    return {
        "position 1e-6 A": nudge(1e-6),
        "position 1 ulp": nudge(np.spacing(1.0)),  # below ASE's 1e-15 A tolerance when |x| ~ 1
        "numbers": lambda a: a.numbers.__setitem__(0, 32),
        "cell": lambda a: a.set_cell(a.cell.array * 1.001, scale_atoms=False),
        "pbc": lambda a: a.set_pbc([True, True, False]),
        "magmoms": lambda a: a.set_initial_magnetic_moments([1.0] + [0.0] * (len(a) - 1)),
        "charges": lambda a: a.set_initial_charges([0.5] + [0.0] * (len(a) - 1)),
        "tags": lambda a: a.set_tags([1] + [0] * (len(a) - 1)),  # not a calculator input for ASE
    }


UNCHANGED_FOR_ASE = ("position 1 ulp", "tags")


@pytest.mark.parametrize("change", list(_changes()))
def test_check_state_gives_ases_answer(change, si_small):
    """The exact fast path never hides a change: the answer equals ASE's compare_atoms for every change."""
    from ase.calculators.calculator import Calculator

    atoms = si_small.copy()
    atoms.positions[1, 2] = 1.0 + 0.25  # a coordinate ~1 A, so one ulp (2.2e-16) is below ASE's atol 1e-15
    model = _Counting()
    calc = BPTTCalculator(model)
    atoms.calc = calc
    atoms.get_forces()
    assert calc.check_state(atoms) == [] and model.calls == 1
    changed = atoms.copy()
    _changes()[change](changed)
    ase_answer = Calculator.check_state(calc, changed)  # ASE's own comparison, no fast path
    assert sorted(calc.check_state(changed)) == sorted(ase_answer)
    if change in UNCHANGED_FOR_ASE:
        assert change != "position 1 ulp" or not np.array_equal(changed.positions, atoms.positions)
        assert ase_answer == []  # ASE calls it unchanged, and so do we (same answer, no extra work)
    else:
        assert ase_answer  # a real change ...
        changed.calc = calc
        changed.get_forces()
        assert model.calls == 2  # ... recalculates
    atoms.get_forces()  # back to the first structure: recalculates only if something changed
    assert model.calls == (1 if change in UNCHANGED_FOR_ASE else 3)


def test_unchanged_atoms_are_not_recalculated(si_small):
    model = _Counting()
    atoms = si_small.copy()
    atoms.calc = BPTTCalculator(model)
    f1 = atoms.get_forces()
    f2 = atoms.get_forces()
    atoms.get_potential_energy()
    assert model.calls == 1 and np.array_equal(f1, f2)


# ----------------------------------------------- structures the model cannot evaluate, or was not trained on
@pytest.mark.parametrize(
    "cell", [np.zeros((3, 3)), [[5.43, 0, 0], [0, 5.43, 0], [5.43, 5.43, 0]]], ids=["zero", "singular"]
)
def test_periodic_structure_without_a_regular_cell_is_refused(checkpoint, si_small, cell):
    si_small.set_cell(cell)
    si_small.pbc = True
    si_small.calc = BPTTCalculator(checkpoint)
    with pytest.raises(
        StructureError, match=r"structure Si7 is periodic along xyz but its cell there is zero or singular"
    ):
        si_small.get_forces()


def test_non_finite_results_are_an_error_naming_the_structure(si_small):
    model = tiny_model(si_small)
    with torch.no_grad():
        model.energy_head.bias.fill_(float("inf"))
    si_small.calc = BPTTCalculator(model)
    with pytest.raises(NonFiniteResultError, match=r"ADAPT gave non-finite .* for structure Si7"):
        si_small.get_potential_energy()
    assert "forces" not in si_small.calc.results


def test_structure_without_cell_is_refused_by_a_periodic_model(checkpoint):
    cluster = molecule("Si2H6")
    cluster.numbers[cluster.numbers == 1] = 14  # an Si8 cluster, no cell
    cluster.calc = BPTTCalculator(checkpoint)
    with pytest.raises(StructureError, match=r"si\.pt describes atoms by periodic features"):
        cluster.get_forces()


def test_cartesian_model_evaluates_a_cluster(si_small):
    torch.manual_seed(0)
    cartesian = ADAPT(ADAPTConfig(d_model=16, d_ff=32, n_layers=2, n_heads=2, coordinates="cartesian"))
    cluster = si_small.copy()
    cluster.pbc = False
    cluster.calc = BPTTCalculator(cartesian)
    assert np.isfinite(cluster.get_forces()).all()


@pytest.fixture
def bulk_domain_checkpoint(tmp_path, si_vacancy):
    """A checkpoint whose metadata says: trained on 7-63 atom fully periodic Si cells."""
    domain = {"species": [14], "n_atoms": [7, 63], "pbc": [[True, True, True]], "n_structures": 2}
    relax = {"step": {"rule": "fixed", "eta": 0.05}, "tol": 1e-3, "max_steps": 75}
    model = tiny_model(si_vacancy)
    return save_checkpoint(tmp_path / "bulk.pt", model, relax=relax, metadata={"training_domain": domain})


def test_slab_is_refused_by_a_model_trained_on_bulk(bulk_domain_checkpoint, si_small):
    si_small.pbc = (True, True, False)
    si_small.calc = BPTTCalculator(bulk_domain_checkpoint)
    with pytest.raises(StructureError, match=r"structure Si7 is not periodic along z, but .*bulk\.pt was trained"):
        si_small.get_forces()


def test_atom_count_outside_the_trained_range_warns_once(bulk_domain_checkpoint):
    calc = BPTTCalculator(bulk_domain_checkpoint)
    with pytest.warns(OutOfDomainWarning, match=r"Si216 has 216 atoms, outside the 7-63 atoms .*bulk\.pt") as record:
        for repeat in (3, 4):  # 216 and 512 atoms, both beyond 2 x 63
            big = bulk("Si", "diamond", a=5.43, cubic=True) * (repeat, repeat, repeat)
            big.calc = calc
            big.get_forces()
    assert len([w for w in record if issubclass(w.category, OutOfDomainWarning)]) == 1


def test_inside_the_margin_no_warning(bulk_domain_checkpoint, recwarn):
    calc = BPTTCalculator(bulk_domain_checkpoint)
    # 4 atoms (7 / 2 = 3.5 is the margin) and 64 atoms: inside the trained range by ATOM_COUNT_MARGIN
    for atoms in (bulk("Si", "diamond", a=5.43, orthorhombic=True), bulk("Si", "diamond", a=5.43, cubic=True) * 2):
        atoms.calc = calc
        atoms.get_forces()
    assert not [w for w in recwarn.list if issubclass(w.category, OutOfDomainWarning)]
    assert ATOM_COUNT_MARGIN == 2.0


def test_check_structure_before_evaluating(bulk_domain_checkpoint, si_small):
    calc = BPTTCalculator(bulk_domain_checkpoint)
    si_small.positions[0, 0] = np.nan
    with pytest.raises(StructureError, match=r"frame 3 has non-finite"):
        calc.check_structure(si_small, where="frame 3")


@pytest.mark.parametrize(
    "device, text",
    [("cuda", "torch sees no CUDA GPU; use cpu"), ("cuda:1", "torch sees no CUDA GPU"), ("gpu9", "unknown device")],
)
def test_a_device_this_machine_lacks_is_one_clear_error(checkpoint, monkeypatch, device, text):
    from ase_bptt.device import DeviceError
    from ase_bptt.errors import AseBpttError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same on a machine with a GPU
    with pytest.raises(DeviceError, match=text) as info:
        BPTTCalculator(checkpoint, device=device)
    assert isinstance(info.value, AseBpttError) and isinstance(info.value, ValueError)
    assert BPTTCalculator(checkpoint, device="cpu").model is not None


def test_overlapping_atoms_are_refused_naming_them(tmp_path, si_vacancy):
    from ase_bptt.models.domain import MIN_DISTANCE_FRACTION, training_domain

    domain = training_domain([si_vacancy])  # records the shortest distance the model saw
    path = save_checkpoint(tmp_path / "d.pt", tiny_model(si_vacancy), metadata={"training_domain": domain})
    limit = MIN_DISTANCE_FRACTION * domain["min_distance"]
    assert 0.8 < limit < 1.2  # half of rattled Si's shortest bond
    for gap in (0.1, 0.0):  # 0.1 A apart, and on top of each other
        atoms = si_vacancy.copy()
        atoms.positions[7] = atoms.positions[3] + [0.0, gap, 0.0]
        atoms.calc = BPTTCalculator(path)
        with pytest.raises(
            StructureError, match=rf"atoms 3 \(Si\) and 7 \(Si\) are {gap:.3f} A apart, closer than 0\.5 x"
        ):
            atoms.get_forces()
    tiny = bulk("Si", "sc", a=0.8)  # one atom 0.8 A from its own periodic images
    tiny.calc = BPTTCalculator(path)
    with pytest.raises(StructureError, match="atom 0 .Si. and its own periodic image are 0.800 A apart"):
        tiny.get_forces()
    intact = si_vacancy.copy()
    intact.calc = BPTTCalculator(path)
    assert np.isfinite(intact.get_forces()).all()
