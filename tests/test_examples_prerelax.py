"""examples/prerelax_for_dft.py: a batch of structures pre-relaxed with a tuned model and written as POSCARs,
and the JSON calculator spec atomate2 and quacc use resolving to the same calculator (neither manager installed).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import ase.io
import numpy as np
import pytest
import torch
from conftest import emt_cu_relaxation

from ase_bptt import BPTTCalculator, LearnedStepOptimizer
from ase_bptt.models.base import UnknownElementError
from ase_bptt.models.checkpoint import save_checkpoint
from ase_bptt.models.domain import DOMAIN_KEY, training_domain
from ase_bptt.relax import FixedStep
from ase_bptt.relax.registry import relax_settings

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "prerelax_for_dft.py"
#: Positions read back from a written POSCAR against the same relaxation done by hand (A): the text precision
#: of ASE's POSCAR writer (measured 1.3e-8 A on a 7.2 A cell).
POSCAR_TOL = 1e-7
#: Steps per structure: enough to move every atom, few enough to keep the test fast.
STEPS = "40"


def load_example():
    spec = importlib.util.spec_from_file_location("prerelax_for_dft", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def cu_model(tmp_path):
    """A tiny float64 ADAPT with O(1) eV/A forces, a fixed-step rule and a copper training domain."""
    from ase_bptt.models.adapt import ADAPT, ADAPTConfig

    torch.manual_seed(0)
    model = ADAPT(ADAPTConfig(d_model=8, d_ff=16, n_layers=1, n_heads=2, frequencies=(1,), species=(29,))).double()
    model.force_scale.fill_(30.0)
    path = tmp_path / "cu.pt"
    relax = relax_settings(FixedStep(0.01), tol=1e-4, max_steps=25)
    save_checkpoint(path, model, relax=relax, metadata={DOMAIN_KEY: training_domain([emt_cu_relaxation(0)[0]])})
    return path


@pytest.fixture
def candidates(tmp_path):
    folder = tmp_path / "candidates"
    folder.mkdir()
    ase.io.write(folder / "POSCAR_vac1", emt_cu_relaxation(1)[0], format="vasp")
    ase.io.write(folder / "more.extxyz", [emt_cu_relaxation(2)[0], emt_cu_relaxation(3)[0]], format="extxyz")
    return folder


def test_every_structure_is_relaxed_as_by_hand_and_written_as_a_poscar(cu_model, candidates, tmp_path):
    out = tmp_path / "dft-inputs"
    load_example().main([str(cu_model), str(candidates), "-o", str(out), "--steps", STEPS])
    summary = json.loads((out / "prerelax.json").read_text())["structures"]
    assert sorted(row["name"] for row in summary) == ["POSCAR_vac1", "more-0", "more-1"]
    by_hand = emt_cu_relaxation(3)[0]
    start = by_hand.positions.copy()
    by_hand.calc = BPTTCalculator(cu_model)
    optimizer = LearnedStepOptimizer(by_hand, logfile=None)
    optimizer.run(fmax=0.05, steps=int(STEPS))
    written = ase.io.read(out / "more-1" / "POSCAR", format="vasp")
    assert written.get_chemical_symbols() == by_hand.get_chemical_symbols()
    assert np.abs(written.positions - by_hand.positions).max() < POSCAR_TOL
    assert np.abs(written.positions - start).max() > 1e-3  # it did move
    row = next(r for r in summary if r["name"] == "more-1")
    assert row["steps"] == optimizer.nsteps


def test_pymatgen_reads_the_written_inputs(cu_model, candidates, tmp_path):
    from pymatgen.core import Structure

    out = tmp_path / "dft-inputs"
    load_example().main([str(cu_model), str(candidates), "-o", str(out), "--fire", "--steps", "3"])
    structure = Structure.from_file(out / "POSCAR_vac1" / "POSCAR")
    assert len(structure) == 7 and structure.composition.reduced_formula == "Cu"


def test_an_unknown_element_stops_the_batch_before_anything_is_written(cu_model, candidates, tmp_path):
    gold = emt_cu_relaxation(4)[0]
    gold.symbols[0] = "Au"
    ase.io.write(candidates / "zz_gold.extxyz", gold, format="extxyz")
    out = tmp_path / "dft-inputs"
    with pytest.raises(UnknownElementError, match="zz_gold"):
        load_example().main([str(cu_model), str(candidates), "-o", str(out)])
    assert not any(out.rglob("POSCAR"))


def test_the_workflow_manager_spec_resolves_to_the_tuned_calculator(cu_model):
    from monty.json import MontyDecoder

    spec = json.loads(json.dumps({"@module": "ase_bptt", "@callable": "BPTTCalculator"}))  # as a job stores it
    kwargs = json.loads(json.dumps({"model_or_path": str(cu_model), "dtype": "float64", "device": "cpu"}))
    factory = MontyDecoder().process_decoded(spec)
    assert factory is BPTTCalculator
    atoms = emt_cu_relaxation(5)[0]
    atoms.calc = factory(**kwargs)
    direct = atoms.copy()
    direct.calc = BPTTCalculator(cu_model, dtype=torch.float64)
    np.testing.assert_array_equal(atoms.get_forces(), direct.get_forces())
    with pytest.raises(ValueError, match="'half'"):
        BPTTCalculator(cu_model, dtype="half")
