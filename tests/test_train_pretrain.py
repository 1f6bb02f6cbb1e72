"""Pretraining: loss goes down, metrics are right, augmentation is consistent, resume refuses mixing."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from ase.calculators.emt import EMT
from conftest import TINY_MODEL, emt_cu_relaxation
from conftest import make_cu_db as make_db


@pytest.fixture(scope="module")
def emt_db(tmp_path_factory):
    path = tmp_path_factory.mktemp("pretrain") / "emt.db"
    make_db(path, n_train=4, n_val=2, n_test=1)
    return path


def small_config(**changes):
    from ase_bptt.train.pretrain import PretrainConfig

    options = dict(
        model=TINY_MODEL,
        epochs=4,
        batch_size=8,
        lr=1e-2,
        patience=None,
        checkpoint_every=None,
        eval_frames=None,
        seed=0,
    )
    options.update(changes)
    return PretrainConfig(**options)


@pytest.fixture(scope="module")
def pretrained(emt_db, tmp_path_factory):
    from ase_bptt.train.pretrain import pretrain

    out = tmp_path_factory.mktemp("pretrain-out") / "pre.pt"
    config = small_config()
    pretrain(emt_db, out, config=config, progress=False)
    return out, config


def reference_force_errors(model, frames):
    """Force MAE/RMSE (eV/A) and energy MAE (meV/atom), one frame at a time in numpy."""
    from ase_bptt.batch import Batch

    abs_sum = sq_sum = count = e_sum = 0.0
    with torch.no_grad():
        for atoms in frames:
            out = model(Batch.from_atoms(atoms, dtype=torch.float64))
            pred = out.forces[0].double().numpy()
            ref = atoms.calc.results["forces"]
            abs_sum += np.abs(pred - ref).sum()
            sq_sum += ((pred - ref) ** 2).sum()
            count += ref.size
            e_sum += abs(float(out.energy[0]) - atoms.calc.results["energy"]) / len(atoms)
    return abs_sum / count, math.sqrt(sq_sum / count), 1000 * e_sum / len(frames)


def test_pretrain_learns_logs_and_exports_the_best_epoch(emt_db, pretrained):
    import hashlib

    from ase_bptt.data.db import TrajectoryDB
    from ase_bptt.models.checkpoint import load_checkpoint, load_model

    out, config = pretrained
    ckpt = load_checkpoint(out)
    meta = ckpt["metadata"]
    history = meta["history"]
    assert [h["epoch"] for h in history] == list(range(1, config.epochs + 1))
    for key in (
        "train_force_mae",
        "train_force_rmse",
        "train_energy_mae_mev_per_atom",
        "val_force_mae",
        "val_force_rmse",
        "val_energy_mae_mev_per_atom",
        "train_loss",
        "lr",
    ):
        assert all(math.isfinite(h[key]) for h in history), key
    # It learns: the mean training loss of the last epoch is well below the first's.
    assert history[-1]["train_loss"] < 0.8 * history[0]["train_loss"]
    # The exported model is the best epoch by val force MAE ...
    best = min(history, key=lambda h: h["val_force_mae"])
    assert meta["best_epoch"] == best["epoch"]
    # ... and its logged metrics agree with a frame-by-frame numpy recomputation.
    db = TrajectoryDB(emt_db, create=False)
    val_frames = [a for t in db.trajectories("val", converged_only=False) for a in t.frames]
    model = load_model(out, dtype=torch.float64)
    mae, rmse, e_mae = reference_force_errors(model, val_frames)
    tol = 1e-4  # the logged numbers come from the float32 model
    assert best["val_force_mae"] == pytest.approx(mae, rel=tol)
    assert best["val_force_rmse"] == pytest.approx(rmse, rel=tol)
    assert best["val_energy_mae_mev_per_atom"] == pytest.approx(e_mae, rel=1e-3)
    # Provenance: fingerprint of the train traj_ids, default fixed step relax settings.
    ids = sorted(t.traj_id for t in db.trajectories("train", converged_only=False))
    assert meta["data_fingerprint"] == hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]
    assert meta["train_frames"] == sum(len(t.frames) for t in db.trajectories("train", converged_only=False))
    assert ckpt["relax"] == {
        "step": {"step": "fixed", "eta": 0.05, "momentum": 0.0, "anneal": 1.0, "noise": 0.0, "maxstep": 0.2},
        "tol": 1e-3,
        "max_steps": 75,
    }
    assert model.species == (29,)


def test_rerun_returns_and_other_runs_are_refused(emt_db, pretrained, tmp_path):
    from ase_bptt.runs.errors import ConfigMismatchError
    from ase_bptt.train.pretrain import pretrain

    out, config = pretrained
    before = out.stat().st_mtime_ns
    assert pretrain(emt_db, out, config=config, progress=False) == out
    assert out.stat().st_mtime_ns == before  # finished: nothing redone
    with pytest.raises(ConfigMismatchError, match=r"lr: 0.01 -> 0.001"):
        pretrain(emt_db, out, config=small_config(lr=1e-3), progress=False)
    other_db = tmp_path / "other.db"
    make_db(other_db, n_train=2, n_val=1, n_test=0, seed=5)
    with pytest.raises(ConfigMismatchError, match="database differs"):
        pretrain(other_db, out, config=config, progress=False)
    # Run-control fields (device, time budget, checkpoint cadence) may change between runs.
    assert pretrain(emt_db, out, config=small_config(checkpoint_every=3), progress=False) == out


def test_rotation_and_translation_augmentation_match_emt(tmp_path):
    from ase_bptt.batch import Batch
    from ase_bptt.runs.config import seed_generator
    from ase_bptt.train.augment import augment, random_rotations

    frames = [emt_cu_relaxation(s, steps=1)[0] for s in (1, 2)]
    rotations = random_rotations(2, seed_generator(0))
    eye = torch.eye(3, dtype=torch.float64)
    assert torch.allclose(rotations @ rotations.transpose(1, 2), eye.expand(2, 3, 3), atol=1e-12)
    assert torch.allclose(torch.linalg.det(rotations), torch.ones(2, dtype=torch.float64), atol=1e-12)
    shifts = torch.tensor([[0.3, -1.2, 2.0], [5.0, 0.1, -0.4]], dtype=torch.float64)
    batch = Batch.from_atoms(frames)
    forces = torch.as_tensor(np.stack([a.calc.results["forces"] for a in frames]))
    new_batch, new_forces = augment(batch, forces, rotations=rotations, shifts=shifts)
    for i, atoms in enumerate(new_batch.to_atoms()):
        # Independent reference: EMT on the rotated-then-shifted structure.
        atoms.calc = EMT()
        np.testing.assert_allclose(new_forces[i].numpy(), atoms.get_forces(), atol=1e-9)
        np.testing.assert_allclose(atoms.get_potential_energy(), frames[i].calc.results["energy"], atol=1e-9)
        expected = frames[i].positions @ rotations[i].numpy().T + shifts[i].numpy()
        np.testing.assert_allclose(atoms.positions, expected, atol=1e-12)


def test_learning_rate_schedules():
    from ase_bptt.runs.loop import lr_factor

    total, warmup = 100, 10
    cos = [lr_factor(s, total, schedule="cosine", warmup=warmup, min_factor=0.01) for s in range(total)]
    assert cos[0] == pytest.approx(0.1) and cos[warmup - 1] == pytest.approx(1.0)
    assert cos[warmup] == pytest.approx(1.0) and cos[-1] == pytest.approx(0.01)
    assert all(a >= b for a, b in zip(cos[warmup:], cos[warmup + 1 :]))
    # Half way through the decay the cosine is at the mid point between 1 and min_factor.
    mid = warmup + (total - warmup - 1) / 2
    assert lr_factor(int(mid), total, schedule="cosine", warmup=warmup, min_factor=0.0) == pytest.approx(
        0.5 * (1 + math.cos(math.pi * int(mid - warmup) / (total - warmup - 1)))
    )
    one = [lr_factor(s, total, schedule="onecycle", warmup=warmup, min_factor=0.0) for s in range(total)]
    assert one[0] == pytest.approx(1 / 25 + (1 - 1 / 25) * 0.5 * (1 - math.cos(math.pi / warmup)))
    assert max(one) == pytest.approx(1.0) and one[-1] == pytest.approx(0.0)
    assert lr_factor(50, total, schedule="constant", warmup=warmup) == 1.0


def test_time_budget_stops_after_one_batch_and_exports(emt_db, tmp_path):
    from ase_bptt.models.checkpoint import load_checkpoint
    from ase_bptt.train.pretrain import pretrain

    out = pretrain(emt_db, tmp_path / "budget.pt", config=small_config(time_budget=1e-9, batch_size=8), progress=False)
    meta = load_checkpoint(out)["metadata"]
    assert meta["steps"] == 1 and "time budget" in meta["stop_reason"]
    assert len(meta["history"]) == 1 and 0 < meta["history"][0]["partial_epoch"] < 1


def test_missing_database_and_empty_split_are_clear_errors(tmp_path):
    from ase_bptt.data.db import TrajectoryDB
    from ase_bptt.runs.errors import EmptySplitError
    from ase_bptt.train.pretrain import pretrain

    with pytest.raises(FileNotFoundError, match="nope.db"):
        pretrain(tmp_path / "nope.db", tmp_path / "x.pt", config=small_config(), progress=False)
    db = TrajectoryDB(tmp_path / "val-only.db")
    db.add_trajectory(emt_cu_relaxation(3, steps=3), split="val")
    with pytest.raises(EmptySplitError, match="val-only.db has no frames in the train split"):
        pretrain(db, tmp_path / "x.pt", config=small_config(), progress=False)
    with pytest.raises(ValueError, match="schedule"):
        small_config(schedule="linear")


def test_configs_share_one_base_round_trip_and_errors():
    from ase_bptt.errors import AseBpttError
    from ase_bptt.runs.config import ConfigError, TrainConfig
    from ase_bptt.train.finetune import FinetuneConfig
    from ase_bptt.train.pretrain import PretrainConfig

    fine = FinetuneConfig(step="learned", eta=0.03, tol_range=[1e-4, 1e-3], pretrain=small_config(lr=5e-3))
    data = json.loads(json.dumps(fine.to_dict()))  # JSON-safe: tuples became lists, the nested config a dict
    assert data["tol_range"] == [1e-4, 1e-3] and data["pretrain"]["lr"] == 5e-3
    again = FinetuneConfig.from_dict(data)
    assert again == fine and isinstance(again.pretrain, PretrainConfig) and again.tol_range == (1e-4, 1e-3)
    assert PretrainConfig.from_dict(small_config().to_dict()) == small_config()
    for cls, bad, field in (
        (PretrainConfig, {"warmup": 1.5}, "PretrainConfig.warmup"),
        (PretrainConfig, {"batch_size": 0}, "PretrainConfig.batch_size"),
        (FinetuneConfig, {"loss": "mae"}, "FinetuneConfig.loss"),
        (FinetuneConfig, {"tol_range": (1e-3,)}, "FinetuneConfig.tol_range"),
        (FinetuneConfig, {"step_lr": 0.0}, "FinetuneConfig.step_lr"),
    ):
        assert issubclass(cls, TrainConfig)
        with pytest.raises(ConfigError, match=field) as info:
            cls(**bad)
        assert isinstance(info.value, AseBpttError) and isinstance(info.value, ValueError)
    with pytest.raises(ConfigError, match="dtype"):
        PretrainConfig(dtype="float16")
