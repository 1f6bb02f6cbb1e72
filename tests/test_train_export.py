"""What fine-tuning exports (train/export.py): the relaxation chosen on val, checked against ASE's own FIRE."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.optimize import FIRE
from conftest import MorseModel, silicon_vacancy
from test_train_finetune import config, emt_db, init_model, reference_mean_dq  # noqa: F401 (fixtures)
from test_train_finetune_force import FIRE_RTOL, ase_fire_mean_dq

from ase_bptt.data.db import TrajectoryDB
from ase_bptt.models.checkpoint import load_checkpoint, load_model
from ase_bptt.train.export import FIRE_RELAX, fire_relax

#: float64 through the same algorithm in another code path (ASE's NumPy FIRE against the torch rule).
POSITION_TOL = 1e-8


def test_the_fire_export_relaxes_as_ase_fire_does():
    """Relax settings exported as ASE FIRE: LearnedStepOptimizer (what `ase-bptt relax` runs) stops where
    ase.optimize.FIRE through the same calculator stops, after as many steps, below fmax 0.05."""
    from ase_bptt.calculator import BPTTCalculator
    from ase_bptt.relax.optimizer import LearnedStepOptimizer

    class Exported(BPTTCalculator):
        relax_settings = fire_relax()  # what export_decision stores for "fire"

    assert FIRE_RELAX == {"fmax": 0.05, "max_steps": 300}
    start = silicon_vacancy(repeat=1, rattle=0.1, seed=5)
    ours, theirs = start.copy(), start.copy()
    ours.calc, theirs.calc = Exported(MorseModel()), Exported(MorseModel())
    opt = LearnedStepOptimizer(ours, logfile=None)
    ref = FIRE(theirs, logfile=None)
    assert opt.run() and ref.run(fmax=0.05, steps=300)
    assert opt.nsteps == ref.nsteps > 3
    assert np.abs(ours.positions - theirs.positions).max() < POSITION_TOL
    assert np.linalg.norm(ours.get_forces(), axis=1).max() < 0.05


def test_auto_export_keeps_the_relaxation_with_the_lower_val_dq(emt_db, init_model, tmp_path):  # noqa: F811
    from ase_bptt.train.finetune import finetune

    cfg = config(eta=0.05, epochs=3, lr=1e-2, export="auto", dtype="float64")
    out = finetune(emt_db, tmp_path / "m.pt", init=init_model, config=cfg, progress=False)
    ckpt = load_checkpoint(out)
    record = ckpt["metadata"]["export"]
    assert ckpt["metadata"]["no_harm"]["exported"] == "tuned"
    tuned = load_model(out, dtype=torch.float64)
    val = TrajectoryDB(emt_db, create=False).trajectories("val")
    eta = ckpt["metadata"]["eta_grid"]["chosen"] if ckpt["relax"]["step"]["step"] == "fire" else None
    by_hand = {
        "own": reference_mean_dq(tuned, val, eta if eta is not None else ckpt["relax"]["step"]["eta"]),
        "fire": ase_fire_mean_dq(tuned, val),
    }
    assert record["offered"] == "auto" and set(record["val"]) == {"own", "fire"}
    assert record["val"]["own"] == pytest.approx(by_hand["own"], rel=1e-4)
    assert record["val"]["fire"] == pytest.approx(by_hand["fire"], rel=FIRE_RTOL)
    assert abs(by_hand["own"] - by_hand["fire"]) > 2 * FIRE_RTOL * by_hand["fire"]  # a real choice
    chosen = min(by_hand, key=by_hand.get)
    assert record["chosen"] == chosen
    if chosen == "fire":
        assert ckpt["relax"] == fire_relax()
    else:
        assert ckpt["relax"]["step"]["step"] == "fixed" and ckpt["relax"]["tol"] == cfg.tol


@pytest.mark.parametrize("export", ["own", "fire"])
def test_a_fixed_export_offers_only_that_relaxation(emt_db, init_model, tmp_path, export):  # noqa: F811
    from ase_bptt.train.finetune import finetune

    out = finetune(emt_db, tmp_path / f"{export}.pt", init=init_model, config=config(eta=0.05, epochs=1, export=export))
    ckpt = load_checkpoint(out)
    assert list(ckpt["metadata"]["export"]["val"]) == [export] and ckpt["metadata"]["export"]["chosen"] == export
    if ckpt["metadata"]["no_harm"]["exported"] == "tuned":
        assert ckpt["relax"]["step"]["step"] == ("fire" if export == "fire" else "fixed")


# ------------------------------------------------------------ energy head
def frames_of(db_path, split):
    from ase_bptt.data.datasets import load_frames, open_db

    return load_frames(open_db(db_path), split)


def test_energy_refit_fixes_the_energies_and_never_touches_the_forces(emt_db, init_model):  # noqa: F811
    from ase_bptt.train.export import refit_energy_head

    model = load_model(init_model, dtype=torch.float64)
    train, val = frames_of(emt_db, "train"), frames_of(emt_db, "val")

    def train_sse() -> float:  # what the least squares minimises: total energies of the train frames
        with torch.no_grad():
            return float((model(train.batch).energy - train.energy).pow(2).sum())

    original = train_sse()
    with torch.no_grad():
        model.energy_head.weight.add_(0.3 * torch.randn_like(model.energy_head.weight))  # energies drifted
        before = model(val.batch)
    record = refit_energy_head(model, train, val)
    after = model(val.batch)
    assert record["kept"] and record["val_mae_after"] < record["val_mae_before"]
    assert train_sse() <= original * (1 + 1e-9)  # no head fits the train energies better, the original included
    assert torch.equal(before.forces, after.forces)
    # By hand: the per-atom energy error over the val frames, in meV/atom.
    mae = (1000 * ((after.energy - val.energy) / val.batch.mask.sum(1)).abs().mean()).item()
    assert mae == pytest.approx(record["val_mae_after"], rel=1e-9)


def test_an_energy_refit_that_does_not_help_on_val_is_dropped(emt_db, init_model):  # noqa: F811
    from ase_bptt.train.export import refit_energy_head

    model = load_model(init_model, dtype=torch.float64)
    train, val = frames_of(emt_db, "train"), frames_of(emt_db, "val")
    val._t["energy"] = -val._t["energy"]  # val energies the train frames cannot teach
    head = model.energy_head.weight.detach().clone()
    record = refit_energy_head(model, train, val)
    assert not record["kept"] and record["val_mae_after"] >= record["val_mae_before"]
    assert torch.equal(model.energy_head.weight, head)


def test_finetune_exports_the_refit_head_and_records_it(emt_db, init_model, tmp_path):  # noqa: F811
    from ase_bptt.runs.state import load_state, state_path
    from ase_bptt.train.finetune import finetune

    out = finetune(
        emt_db, tmp_path / "m.pt", init=init_model, config=config(eta=0.05, epochs=3, lr=1e-2, refit_energy=True)
    )
    ckpt = load_checkpoint(out)
    record = ckpt["metadata"]["energy_refit"]
    best = load_state(state_path(out))["best_model"]
    exported = ckpt["model"]["state_dict"]
    head = {"energy_head.weight", "energy_head.bias"}
    assert all(torch.equal(exported[k], best[k]) for k in best if k not in head)
    assert record["kept"] == any(not torch.equal(exported[k], best[k]) for k in head)
