"""The force-matching term of the BPTT loss, and the no-harm rule of the export.

Numbers are checked against hand computations on the ASE frames of the
database (forces from the model one frame at a time, Dq of fixed-step
relaxations one structure at a time), not against the code under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from ase.geometry import find_mic
from conftest import make_cu_db as make_db
from test_train_finetune import config, emt_db, init_model, reference_mean_dq  # noqa: F401 (fixtures)

from ase_bptt.batch import Batch
from ase_bptt.data.db import TrajectoryDB

GRID = (0.02, 0.05, 0.1)


def frame_errors(model, frames) -> np.ndarray:
    """Force errors (model - reference) of ASE frames, one frame at a time, flattened, float64."""
    out = []
    with torch.no_grad():
        for a in frames:
            f = model(Batch.from_atoms(a, dtype=torch.float32, constraints=False)).forces[0].double().numpy()
            out.append((f - a.get_forces()).ravel())
    return np.concatenate(out)


def split_frames(db_path, split: str) -> list:
    return [a for t in TrajectoryDB(db_path, create=False).trajectories(split, converged_only=False) for a in t.frames]


def drawn_frames(db_path, seed: int, epoch: int, batch: int, n_frames: int) -> list:
    """The train frames ForceTerm draws at ``(epoch, batch)``, as the database's ASE frames (by trajectory
    and frame index)."""
    from ase_bptt.data.datasets import load_frames, open_db
    from ase_bptt.train.objectives import draw_force_frames

    dataset = load_frames(open_db(db_path), "train")
    index = draw_force_frames(seed, epoch, batch, n_frames, len(dataset)).tolist()
    trajs = {str(t.traj_id): t for t in TrajectoryDB(db_path, create=False).trajectories("train", converged_only=False)}
    return [trajs[dataset.traj_ids[i]].frames[dataset.frame_index[i]] for i in index]


def finetune_cli(db_path, init_path, out, *options: str):
    """``ase-bptt --quiet finetune DB -o OUT --init INIT`` with a fixed step 0.05, 1 epoch, 5 frames, no force
    or energy term, lr 1e-3 (nothing raced), the own rule exported, then ``OPTIONS`` (the last value wins)."""
    from click.testing import CliRunner

    from ase_bptt.cli import cli

    args = ["--quiet", "finetune", str(db_path), "-o", str(out), "--init", str(init_path), "--step", "fixed"]
    args += ["--eta", "0.05", "--epochs", "1", "--max-steps", "5", "--lr", "1e-3", "--export", "own"]
    return CliRunner().invoke(cli, [*args, "--force-weight", "0", "--energy-weight", "0", *options])


def test_force_frames_are_drawn_seeded_distinct_and_capped():
    from ase_bptt.train.objectives import draw_force_frames

    a = draw_force_frames(0, 1, 2, 5, 40)
    assert torch.equal(a, draw_force_frames(0, 1, 2, 5, 40))
    assert len(a) == 5 and len(set(a.tolist())) == 5 and 0 <= int(a.min()) and int(a.max()) < 40
    assert a.tolist() == sorted(a.tolist())
    others = [draw_force_frames(s, e, b, 5, 40).tolist() for s, e, b in ((1, 1, 2), (0, 0, 2), (0, 1, 3))]
    assert all(o != a.tolist() for o in others)
    assert draw_force_frames(0, 0, 0, 100, 7).tolist() == list(range(7))


def test_force_term_is_the_mean_squared_error_of_the_drawn_frames(emt_db, init_model):  # noqa: F811
    from ase_bptt.data.datasets import open_db
    from ase_bptt.models.checkpoint import load_model
    from ase_bptt.runs.distributed import DistContext
    from ase_bptt.train.objectives import ForceTerm

    model = load_model(init_model).eval()
    term = ForceTerm(open_db(emt_db), weight=1.0, n_frames=3, seed=5, device="cpu", dtype=torch.float32)
    value_t, value, energy_value = term.loss(model, 2, 1, DistContext())
    assert float(value_t.detach()) == pytest.approx(value, rel=1e-12)  # weight 1
    assert energy_value == 0.0  # energy_weight 0: not computed
    # The same frames by (trajectory, frame index) in the database's ASE frames.
    frames = drawn_frames(emt_db, 5, 2, 1, 3)
    assert value == pytest.approx(float(np.mean(frame_errors(model, frames) ** 2)), rel=1e-4)
    value_t.backward()  # differentiable in the model's parameters
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in model.parameters())


def test_history_logs_the_force_term_and_val_force_mae(emt_db, init_model, tmp_path):  # noqa: F811
    from ase_bptt.models.checkpoint import load_checkpoint, load_model
    from ase_bptt.train.finetune import finetune

    # One batch of all 4 train trajectories, and every train frame in the force term (10000 > frames):
    # epoch 1's train_force_mse is the initial model's MSE on every train frame.
    cfg = config(eta=0.05, epochs=1, batch_size=4, force_weight=0.5, force_frames=10000)
    out = finetune(emt_db, tmp_path / "f.pt", init=init_model, config=cfg, progress=False)
    meta = load_checkpoint(out)["metadata"]
    h0, h1 = meta["history"]
    init = load_model(init_model).eval()
    train_err = frame_errors(init, split_frames(emt_db, "train"))
    assert h1["train_force_mse"] == pytest.approx(float(np.mean(train_err**2)), rel=1e-4)
    assert "train_force_mse" not in h0  # no step before epoch 0
    val_err = frame_errors(init, split_frames(emt_db, "val"))
    assert h0["val_force_mae"] == pytest.approx(float(np.mean(np.abs(val_err))), rel=1e-4)
    assert h1["val_force_mae"] != h0["val_force_mae"]
    assert meta["config"]["force_weight"] == 0.5 and meta["config"]["force_frames"] == 10000


def test_force_weight_zero_loads_and_logs_nothing(emt_db, init_model, tmp_path, monkeypatch):  # noqa: F811
    from ase_bptt.models.checkpoint import load_checkpoint
    from ase_bptt.runs.state import load_state, state_path
    from ase_bptt.train import objectives
    from ase_bptt.train.finetune import finetune

    def refuse(*args, **kwargs):
        raise AssertionError("force_weight=0 must not load frames")

    runs = {}
    for frames in (16, 3):
        with monkeypatch.context() as m:
            m.setattr(objectives, "load_frames", refuse)
            out = finetune(
                emt_db,
                tmp_path / f"w0-{frames}.pt",
                init=init_model,
                config=config(eta=0.05, epochs=1, force_frames=frames),
                progress=False,
            )
        runs[frames] = load_state(state_path(out))["model"]
        history = load_checkpoint(out)["metadata"]["history"]
        assert not any("force" in k for h in history for k in h)
    # force_frames does nothing while the term is off: the same weights, bit for bit.
    assert all(torch.equal(runs[16][k], runs[3][k]) for k in runs[16])


def test_force_term_lowers_the_force_error(emt_db, init_model, tmp_path):  # noqa: F811
    from ase_bptt.models.checkpoint import load_model
    from ase_bptt.runs.state import load_state, state_path
    from ase_bptt.train.finetune import finetune

    val = split_frames(emt_db, "val")

    def val_force_mae(weight: float) -> float:
        out = tmp_path / f"w{weight}.pt"
        cfg = config(eta=0.05, epochs=3, lr=1e-2, force_weight=weight, force_frames=8)
        finetune(emt_db, out, init=init_model, config=cfg, progress=False)
        model = load_model(init_model)
        model.load_state_dict(load_state(state_path(out))["model"])
        return float(np.mean(np.abs(frame_errors(model.eval(), val))))

    weighted, unweighted = val_force_mae(100.0), val_force_mae(0.0)
    assert weighted < 0.9 * unweighted  # measured 0.149 vs 0.175


# ------------------------------------------------------------------ no harm
#: The pretrained model relaxed by ASE's FIRE (one structure at a time through the calculator) against the
#: package's batched torch FIRE on the same float32 model: the same algorithm, summed in another order.
FIRE_RTOL = 1e-3


def ase_fire_mean_dq(model, trajectories, *, fmax=0.05, steps=300):
    """Mean Dq of ASE's own FIRE relaxations (BPTTCalculator, one structure at a time) against the references."""
    from ase.optimize import FIRE

    from ase_bptt.calculator import BPTTCalculator

    values = []
    for t in trajectories:
        atoms = t.initial.copy()
        atoms.calc = BPTTCalculator(model, dtype=next(model.parameters()).dtype)
        FIRE(atoms, logfile=None).run(fmax=fmax, steps=steps)
        d, _ = find_mic(atoms.positions - t.final.positions, atoms.cell, atoms.pbc)
        values.append(math.sqrt(float((atoms.get_masses()[:, None] * d**2).sum())))
    return float(np.mean(values))


def pretrained_relaxations(model, val) -> dict[str, float]:
    """Every relaxation the no-harm rule offers the pretrained model, scored by hand on val."""
    by_hand = {f"fixed step {eta:g}": reference_mean_dq(model, val, eta) for eta in GRID}
    return {**by_hand, "fire": ase_fire_mean_dq(model, val)}


def test_no_harm_exports_the_pretrained_model_with_its_val_best_relaxation(emt_db, init_model, tmp_path):  # noqa: F811
    from ase_bptt.models.checkpoint import load_checkpoint, load_model
    from ase_bptt.train.finetune import finetune

    # lr 1e4 wrecks the model: the tuned model cannot beat the pretrained one.
    cfg = config(lr=1e4, grad_clip=None, eta=0.1, epochs=1, eta_grid=GRID)
    out = finetune(emt_db, tmp_path / "wrecked.pt", init=init_model, config=cfg, progress=False)
    ckpt = load_checkpoint(out)
    record = ckpt["metadata"]["no_harm"]
    val = TrajectoryDB(emt_db, create=False).trajectories("val")
    by_hand = pretrained_relaxations(load_model(init_model), val)
    best = min(by_hand, key=by_hand.get)
    assert record["exported"] == "pretrained"
    assert record["pretrained_relax"] == best
    assert record["pretrained_val_dq"] == pytest.approx(by_hand[best], rel=FIRE_RTOL if best == "fire" else 1e-4)
    assert record["tuned_val_dq"] == pytest.approx(ckpt["metadata"]["best_metric"], rel=1e-12)
    assert record["tuned_val_dq"] >= record["pretrained_val_dq"]
    if best == "fire":
        assert ckpt["relax"]["step"]["step"] == "fire" and ckpt["relax"]["fmax"] == 0.05
    else:
        assert ckpt["relax"]["step"]["step"] == "fixed" and f"fixed step {ckpt['relax']['step']['eta']:g}" == best
    assert "pretrained model" in ckpt["metadata"]["note"]
    exported, initial = ckpt["model"]["state_dict"], load_checkpoint(init_model)["model"]["state_dict"]
    assert all(torch.equal(exported[k], initial[k]) for k in initial)


def test_no_harm_keeps_a_tuned_model_that_wins(emt_db, init_model, tmp_path):  # noqa: F811
    from ase_bptt.models.checkpoint import load_checkpoint, load_model
    from ase_bptt.train.finetune import finetune

    # lr 1e-2 for 4 epochs on the tiny set: the tuned model beats every relaxation of the pretrained one on val.
    cfg = config(eta=0.05, epochs=4, lr=1e-2, eta_grid=GRID)
    out = finetune(emt_db, tmp_path / "tuned.pt", init=init_model, config=cfg, progress=False)
    ckpt = load_checkpoint(out)
    record = ckpt["metadata"]["no_harm"]
    val = TrajectoryDB(emt_db, create=False).trajectories("val")
    init, tuned = load_model(init_model), load_model(out)
    by_hand = pretrained_relaxations(init, val)
    best = min(by_hand, key=by_hand.get)
    tuned_val = reference_mean_dq(tuned, val, ckpt["relax"]["step"]["eta"])
    assert tuned_val < by_hand[best]  # the premise, by hand
    assert record["exported"] == "tuned"
    assert record["tuned_val_dq"] == pytest.approx(tuned_val, rel=1e-4)
    assert record["pretrained_val_dq"] == pytest.approx(by_hand[best], rel=FIRE_RTOL if best == "fire" else 1e-4)
    initial = load_checkpoint(init_model)["model"]["state_dict"]
    assert not all(torch.equal(ckpt["model"]["state_dict"][k], initial[k]) for k in initial)


def test_no_harm_is_skipped_without_a_val_split(init_model, tmp_path, caplog):  # noqa: F811
    from ase_bptt.models.checkpoint import load_checkpoint
    from ase_bptt.train.finetune import finetune

    make_db(tmp_path / "noval.db", n_train=2, n_val=0, n_test=0, seed=3)
    with caplog.at_level("WARNING", logger="ase_bptt.train"):
        out = finetune(tmp_path / "noval.db", tmp_path / "nv.pt", init=init_model, config=config(eta=0.05, epochs=1))
    assert load_checkpoint(out)["metadata"]["no_harm"] == {"skipped": "no val split", "exported": "tuned"}
    assert "no val split: the tuned model's own rule is exported" in caplog.text


# ---------------------------------------------------------------------- CLI
@pytest.mark.parametrize(
    "args, hint",
    [
        (["--force-weight", "-1"], "--force-weight"),
        (["--force-frames", "0"], "--force-frames"),
        (["--energy-weight", "-1"], "--energy-weight"),
    ],
)
def test_cli_rejects_bad_force_options_before_writing(emt_db, init_model, tmp_path, args, hint):  # noqa: F811
    from click.testing import CliRunner

    from ase_bptt.cli import cli

    out = tmp_path / "x.pt"
    result = CliRunner().invoke(
        cli, ["--quiet", "finetune", str(emt_db), "-o", str(out), "--init", str(init_model), *args]
    )
    assert result.exit_code == 2 and hint in result.output
    assert list(tmp_path.iterdir()) == []


def test_cli_passes_the_force_options(emt_db, init_model, tmp_path):  # noqa: F811
    from ase_bptt.models.checkpoint import load_checkpoint

    out = tmp_path / "cli.pt"
    result = finetune_cli(emt_db, init_model, out, "--force-weight", "0.25", "--force-frames", "4")
    assert result.exit_code == 0, result.output
    meta = load_checkpoint(out)["metadata"]
    assert meta["config"]["force_weight"] == 0.25 and meta["config"]["force_frames"] == 4
    assert "train_force_mse" in meta["history"][-1]
