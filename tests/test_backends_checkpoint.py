"""Universal-model checkpoints: round trip under weights_only, the calculator, and the one-line dependency errors."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from conftest import silicon_vacancy, small_backend

from ase_bptt.backends import BackendError, BackendMissingError, BackendVersionError, backend_class, backend_names
from ase_bptt.backends.registry import sha256_of
from ase_bptt.batch import Batch
from ase_bptt.calculator import BPTTCalculator
from ase_bptt.errors import AseBpttError
from ase_bptt.models.checkpoint import CheckpointKeyError, atomic_torch_save, load_model, save_checkpoint
from ase_bptt.models.universal import UniversalModel, base_model, load_universal_model
from ase_bptt.relax.registry import relax_settings
from ase_bptt.relax.steps import FixedStep

pytest.importorskip("chgnet")  # CI installs the extra (pyproject's test extra); skipped only without it


def forces(model, atoms) -> np.ndarray:
    with torch.no_grad():
        batch = Batch.from_atoms(atoms, dtype=next(model.parameters()).dtype)
        return model(batch).forces[0].double().numpy()


def tuned_chgnet() -> UniversalModel:
    """CHGNet 0.3.0 with one weight changed, as fine-tuning would."""
    model = load_universal_model("chgnet")
    with torch.no_grad():
        model.energy_model.net.atom_embedding.embedding.weight.mul_(1.05)
    return model


def test_round_trip_loads_with_weights_only_and_the_calculator_gives_the_same_forces(tmp_path):
    model = tuned_chgnet()
    path = save_checkpoint(tmp_path / "tuned.pt", model, relax=relax_settings(FixedStep(0.05)))
    raw = torch.load(path, weights_only=True)  # only tensors and JSON-like values
    config = raw["model"]["config"]
    assert raw["model"]["name"] == "universal"
    assert (config["backend"], config["model"], config["architecture"]) == ("chgnet", "0.3.0", None)
    assert config["package_version"] == backend_class("chgnet").installed_version()
    assert config["base_sha256"] == sha256_of(model.backend.weight_file("0.3.0"))
    atoms = silicon_vacancy(repeat=1, rattle=0.1, seed=3)
    calc = BPTTCalculator(path)
    atoms.calc = calc
    assert isinstance(calc.model, UniversalModel)
    np.testing.assert_array_equal(atoms.get_forces(), forces(model, atoms))
    # the tuned weights came back, not the base ones
    assert np.abs(forces(base_model(calc.model), atoms) - atoms.get_forces()).max() > 1e-3


def test_the_relaxers_take_a_tuned_file(tmp_path):
    """ase-bptt's own relaxers use a universal checkpoint like any other: in torch, and as an ASE optimizer."""
    from ase_bptt.relax import DifferentiableRelaxer, LearnedStepOptimizer

    model = small_backend("chgnet")
    path = save_checkpoint(tmp_path / "small.pt", model, relax=relax_settings(FixedStep(0.05), tol=1e-9))
    atoms = silicon_vacancy(repeat=1, rattle=0.1, seed=5)
    with torch.no_grad():
        relaxer = DifferentiableRelaxer(atoms, str(path), logfile=None)
        relaxer.run(steps=4)
    in_torch = relaxer.get_atoms()[0].positions
    atoms.calc = BPTTCalculator(path)
    LearnedStepOptimizer(atoms, logfile=None).run(steps=4)
    np.testing.assert_allclose(atoms.positions, in_torch, atol=1e-9)  # one implementation of the rule
    assert np.abs(atoms.positions - silicon_vacancy(repeat=1, rattle=0.1, seed=5).positions).max() > 1e-4


def test_an_untrained_architecture_round_trips(tmp_path):
    model = small_backend("chgnet", skin=0.3)
    path = save_checkpoint(tmp_path / "small.pt", model)
    loaded = load_model(path)
    assert loaded.config.skin == 0.3 and loaded.config.model is None
    atoms = silicon_vacancy(repeat=1, rattle=0.1, seed=4)
    np.testing.assert_array_equal(forces(loaded, atoms), forces(model, atoms))
    with pytest.raises(BackendError, match="architecture, not pretrained weights"):
        base_model(loaded)


def _rewrite(path, **config):
    data = torch.load(path, weights_only=True)
    data["model"]["config"].update(config)
    atomic_torch_save(data, path)


def test_another_package_version_is_one_clear_line(tmp_path):
    path = save_checkpoint(tmp_path / "tuned.pt", tuned_chgnet())
    _rewrite(path, package_version="0.0.1")
    with pytest.raises(BackendVersionError) as err:
        BPTTCalculator(path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(str(path))
    assert "tuned with chgnet 0.0.1" in message and "pip install 'chgnet==0.0.1'" in message


def test_other_base_weights_are_refused(tmp_path):
    path = save_checkpoint(tmp_path / "tuned.pt", tuned_chgnet())
    _rewrite(path, base_sha256="0" * 64)
    with pytest.raises(BackendVersionError, match=r"ships other 0\.3\.0 weights"):
        load_model(path)


def test_a_missing_package_is_one_clear_line(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "tuned.pt", tuned_chgnet())
    monkeypatch.setitem(sys.modules, "chgnet", None)  # hides the installed chgnet: import raises ImportError
    with pytest.raises(BackendMissingError) as err:
        BPTTCalculator(path)
    message = str(err.value)
    assert isinstance(err.value, AseBpttError) and "\n" not in message
    assert message.startswith(f"{path}: ") and "pip install 'ase-bptt[chgnet]'" in message
    with pytest.raises(BackendMissingError, match=r"pip install 'ase-bptt\[chgnet\]'"):
        load_universal_model("chgnet")


def test_unknown_names_are_errors(tmp_path):
    assert backend_names()[:2] == ("chgnet", "sevenn")
    with pytest.raises(BackendError, match="unknown universal-model backend 'mace'"):
        load_universal_model("mace")
    with pytest.raises(BackendError, match="has no pretrained model '9.9'"):
        load_universal_model("chgnet", model="9.9")
    path = save_checkpoint(tmp_path / "tuned.pt", small_backend("chgnet"))
    _rewrite(path, backend="mace")
    with pytest.raises(CheckpointKeyError, match="unknown universal-model backend 'mace'"):
        load_model(path)
