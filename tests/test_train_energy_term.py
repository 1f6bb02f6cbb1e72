"""The energy-matching part of the BPTT reference term (``energy_weight``, ``--energy-weight``).

Values are checked against hand computations on the database's ASE frames (the
model's energy one frame at a time against ``atoms.get_potential_energy()``), not
against the code under test.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.calculators.singlepoint import SinglePointCalculator
from conftest import emt_cu_relaxation
from test_train_finetune import config, emt_db, init_model  # noqa: F401 (fixtures)
from test_train_finetune_force import drawn_frames, finetune_cli, split_frames

from ase_bptt.batch import Batch
from ase_bptt.runs.config import ConfigError


def frame_energy_errors(model, frames) -> np.ndarray:
    """Per-atom energy errors (model - reference, eV/atom) of ASE frames, one frame at a time, float64."""
    with torch.no_grad():
        return np.array(
            [
                (
                    float(model(Batch.from_atoms(a, dtype=torch.float32, constraints=False)).energy[0])
                    - a.get_potential_energy()
                )
                / len(a)
                for a in frames
            ]
        )


def test_energy_term_is_the_per_atom_energy_mse_of_the_drawn_frames(emt_db, init_model):  # noqa: F811
    from ase_bptt.data.datasets import open_db
    from ase_bptt.models.checkpoint import load_model
    from ase_bptt.runs.distributed import DistContext
    from ase_bptt.train.objectives import ForceTerm

    model = load_model(init_model).eval()
    term = ForceTerm(
        open_db(emt_db), weight=0.0, n_frames=3, seed=5, device="cpu", dtype=torch.float32, energy_weight=2.0
    )
    value_t, force_mse, energy_mse = term.loss(model, 2, 1, DistContext())
    by_hand = float(np.mean(frame_energy_errors(model, drawn_frames(emt_db, 5, 2, 1, 3)) ** 2))
    assert by_hand > 0
    assert energy_mse == pytest.approx(by_hand, rel=1e-4)
    assert float(value_t.detach()) == pytest.approx(2.0 * energy_mse, rel=1e-6)  # force weight 0: energy only
    assert force_mse > 0  # still measured (logged) with weight 0
    value_t.backward()
    assert float(model.energy_head.weight.grad.abs().sum()) > 0  # the energy head is trained


def test_energy_term_keeps_the_energy_error_from_drifting(emt_db, init_model, tmp_path):  # noqa: F811
    from ase_bptt.models.checkpoint import load_checkpoint, load_model
    from ase_bptt.runs.state import load_state, state_path
    from ase_bptt.train.finetune import finetune

    train = split_frames(emt_db, "train")

    def run(energy_weight: float) -> tuple[float, dict]:
        out = tmp_path / f"e{energy_weight}.pt"
        cfg = config(
            eta=0.05, epochs=8, lr=1e-2, force_weight=1.0, force_frames=10000, energy_weight=energy_weight, seed=2
        )
        finetune(emt_db, out, init=init_model, config=cfg, progress=False)
        model = load_model(init_model)
        model.load_state_dict(load_state(state_path(out))["model"])
        mae = float(np.mean(np.abs(frame_energy_errors(model.eval(), train))))
        return mae, load_checkpoint(out)["metadata"]["history"]

    initial = float(np.mean(np.abs(frame_energy_errors(load_model(init_model).eval(), train))))
    (weighted, h_weighted), (unweighted, h_unweighted) = run(1e3), run(0.0)
    # Measured on the train frames (the ones the term fits), meV/atom: initial 32, weighted 20, unweighted 62
    # (this seed's BPTT steps push the energy away; seeds 0 and 1: 20 vs 23 and 20 vs 25).
    assert weighted < initial and weighted < 0.6 * unweighted
    energy_mse = [h["train_energy_mse"] for h in h_weighted[1:]]
    assert energy_mse[-1] < 0.5 * energy_mse[0]  # measured 2.8e-3 -> 8.6e-4 (eV/atom)^2
    assert not any("train_energy_mse" in h for h in h_unweighted)


def test_energy_weight_zero_keeps_the_config_hash_of_older_state_files():
    """A run interrupted before energy_weight existed (no such key in its config) still resumes."""
    from ase_bptt.runs.config import RUN_CONTROL, config_hash

    new = config().to_dict()
    old = {k: v for k, v in new.items() if k != "energy_weight"}
    assert config_hash(new, ignore=RUN_CONTROL) == config_hash(old, ignore=RUN_CONTROL)
    assert config_hash(config(energy_weight=1.0).to_dict(), ignore=RUN_CONTROL) != config_hash(new, ignore=RUN_CONTROL)


@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf")])
def test_config_rejects_a_bad_energy_weight(value):
    with pytest.raises(ConfigError, match="energy_weight"):
        config(energy_weight=value)


def no_energy_database(path):
    """Cu relaxations whose frames carry forces but no energy (as from a code that wrote none)."""
    from ase_bptt.data.db import TrajectoryDB

    db = TrajectoryDB(path)
    for k, split in enumerate(("train", "train", "val")):
        frames = []
        for a in emt_cu_relaxation(100 + k):
            b = a.copy()
            b.calc = SinglePointCalculator(b, forces=a.get_forces())
            frames.append(b)
        db.add_trajectory(frames, label="vacancy", source="test", split=split)
    return path


@pytest.fixture(scope="module")
def no_energy_db(tmp_path_factory):
    return no_energy_database(tmp_path_factory.mktemp("noenergy") / "noe.db")


def test_energy_weight_without_reference_energies_is_one_error_line_and_writes_nothing(
    no_energy_db,
    init_model,  # noqa: F811
    tmp_path,
):
    out = tmp_path / "run" / "x.pt"
    out.parent.mkdir()
    result = finetune_cli(no_energy_db, init_model, out, "--energy-weight", "1")
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "energy_weight" in lines[0] and "--energy-weight" in lines[0], result.output
    assert list(out.parent.iterdir()) == []
    # The same run with forces only works on this database.
    ok = finetune_cli(no_energy_db, init_model, out, "--force-weight", "1")
    assert ok.exit_code == 0, ok.output


def test_cli_passes_the_energy_weight(emt_db, init_model, tmp_path):  # noqa: F811
    from ase_bptt.models.checkpoint import load_checkpoint

    out = tmp_path / "cli.pt"
    result = finetune_cli(emt_db, init_model, out, "--energy-weight", "3", "--force-frames", "4")
    assert result.exit_code == 0, result.output
    meta = load_checkpoint(out)["metadata"]
    assert meta["config"]["energy_weight"] == 3.0 and meta["config"]["force_weight"] == 0.0
    assert "train_energy_mse" in meta["history"][-1] and "val_energy_mae_mev_per_atom" in meta["history"][-1]
