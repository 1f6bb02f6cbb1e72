"""BPTT fine-tuning: grid search on train, best-epoch export, step rules, skipped batches, controls."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from ase.geometry import find_mic
from conftest import TINY_MODEL
from conftest import make_cu_db as make_db


@pytest.fixture(scope="module")
def emt_db(tmp_path_factory):
    path = tmp_path_factory.mktemp("finetune") / "emt.db"
    make_db(path, n_train=4, n_val=2, n_test=1, seed=1)
    return path


@pytest.fixture(scope="module")
def init_model(emt_db, tmp_path_factory):
    """A tiny ADAPT with fitted standardisation (cheap stand-in for a pretrained model)."""
    from ase_bptt.data.datasets import load_frames, open_db
    from ase_bptt.models.adapt import ADAPT, ADAPTConfig
    from ase_bptt.models.checkpoint import save_checkpoint

    frames = load_frames(open_db(emt_db), "train")
    torch.manual_seed(0)
    model = ADAPT(ADAPTConfig.from_dict(dict(TINY_MODEL, species=(29,))))
    model.fit_standardisation(frames.batch, frames.forces, frames.energy)
    path = tmp_path_factory.mktemp("init") / "init.pt"
    save_checkpoint(path, model.float())
    return path


def config(**changes):
    from ase_bptt.train.finetune import FinetuneConfig

    # The fixed-step BPTT of the paper (these tests check its mechanics; the default recipe has its own tests).
    options = dict(
        step="fixed",
        epochs=2,
        batch_size=2,
        lr=1e-3,
        eta_grid=(0.02, 0.05, 0.1),
        maxstep=None,
        max_steps=10,
        tol=1e-3,
        eval_every=None,
        lr_schedule="constant",
        warmup=0,
        force_weight=0.0,
        energy_weight=0.0,
        export="own",
        refit_energy=False,
        checkpoint_every=None,
        seed=0,
    )
    options.update(changes)
    return FinetuneConfig(**options)


def reference_mean_dq(model, trajectories, eta, *, tol=1e-3, max_steps=10):
    """Fixed-step relaxations one structure at a time, Dq with ASE's minimum image (independent of rollout)."""
    from ase_bptt.batch import Batch

    values = []
    with torch.no_grad():
        for t in trajectories:
            atoms = t.initial.copy()
            x = torch.as_tensor(atoms.positions, dtype=torch.float32)
            batch = Batch.from_atoms(atoms, dtype=torch.float32)
            for _ in range(max_steps):
                update = eta * model(batch, positions=x[None]).forces[0]
                x = x + update
                if float(update.pow(2).sum(-1).mean().sqrt()) < tol:
                    break
            d, _ = find_mic(x.double().numpy() - t.final.positions, atoms.cell, atoms.pbc)
            values.append(math.sqrt(float((atoms.get_masses()[:, None] * d**2).sum())))
    return float(np.mean(values))


def test_fixed_step_grid_search_on_train_and_best_epoch_export(emt_db, init_model, tmp_path):
    from ase_bptt.data.db import TrajectoryDB
    from ase_bptt.models.checkpoint import load_checkpoint, load_model
    from ase_bptt.train.finetune import finetune

    out = finetune(emt_db, tmp_path / "ft.pt", init=init_model, config=config(), progress=False)
    ckpt = load_checkpoint(out)
    meta = ckpt["metadata"]
    db = TrajectoryDB(emt_db, create=False)
    train, val = db.trajectories("train"), db.trajectories("val")
    # eta: the argmin of the grid, scored on the TRAIN split with the initial model.
    grid = meta["eta_grid"]
    assert grid["split"] == "train"
    # The smallest eta within 5% of the best score (a margin from the stability limit).
    best_score = min(grid["scores"].values())
    assert grid["chosen"] == min(float(k) for k, v in grid["scores"].items() if v <= 1.05 * best_score)
    init = load_model(init_model)
    chosen = grid["chosen"]
    assert grid["scores"][repr(chosen)] == pytest.approx(reference_mean_dq(init, train, chosen), rel=1e-4)
    # History: epoch 0 (before training) and each epoch; the export is the best by val Dq.
    history = meta["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2]
    best = min(history, key=lambda h: h["val_dq"])
    assert meta["best_epoch"] == best["epoch"] and meta["improved"] == (best["epoch"] > 0)
    tuned = load_model(out)
    assert best["val_dq"] == pytest.approx(reference_mean_dq(tuned, val, grid["chosen"]), rel=1e-4)
    assert history[0]["val_dq"] == pytest.approx(reference_mean_dq(init, val, grid["chosen"]), rel=1e-4)
    assert ckpt["relax"] == {
        "step": {"step": "fixed", "eta": grid["chosen"], "momentum": 0.0, "anneal": 1.0, "noise": 0.0, "maxstep": None},
        "tol": 1e-3,
        "max_steps": 10,
    }
    assert meta["skipped_batches"] == 0 and meta["steps"] == 4
    assert meta["no_harm"]["exported"] == "tuned"  # else the export is the pretrained model (no-harm rule)


def test_no_better_epoch_exports_the_initial_model_unchanged(emt_db, init_model, tmp_path):
    from ase_bptt.models.checkpoint import load_checkpoint
    from ase_bptt.train.finetune import finetune

    # A learning rate of 1e4 wrecks the model (forces ~1e4 times too large), so no epoch beats epoch 0.
    out = finetune(
        emt_db,
        tmp_path / "wrecked.pt",
        init=init_model,
        config=config(lr=1e4, grad_clip=None, eta=0.05, epochs=1),
        progress=False,
    )
    meta = load_checkpoint(out)["metadata"]
    assert meta["best_epoch"] == 0 and meta["improved"] is False and "unchanged" in meta["note"]
    exported = load_checkpoint(out)["model"]["state_dict"]
    initial = load_checkpoint(init_model)["model"]["state_dict"]
    assert all(torch.equal(exported[k], initial[k]) for k in initial)


def test_learned_step_has_its_own_group_and_moves(emt_db, init_model, tmp_path):
    from ase_bptt.runs.state import load_state, state_path
    from ase_bptt.train.finetune import finetune

    out = tmp_path / "learned.pt"
    finetune(
        emt_db,
        out,
        init=init_model,
        config=config(step="learned", eta=0.05, step_lr=0.05, epochs=1, lr=1e-4),
        progress=False,
    )
    state = load_state(state_path(out), kind="finetune")
    groups = state["optimizer"]["param_groups"]
    assert [g["lr"] for g in groups] == [1e-4, 0.05]
    assert len(groups[1]["params"]) == 1  # log_eta alone
    assert state["step_rule"]["step"] == "learned"
    assert abs(state["step_rule"]["eta"] - 0.05) > 1e-3  # Adam moves log_eta by ~step_lr per step


@pytest.mark.parametrize("step", ["decoder", "fire"])
def test_decoder_and_fire_steps_train(emt_db, init_model, tmp_path, step):
    """Each rule trains: val Dq falls below the initial model's, and the tuned model is exported with the
    rule it was tuned through (a run that learned nothing would export the initial model)."""
    import torch

    from ase_bptt.models.checkpoint import load_checkpoint
    from ase_bptt.relax.steps import step_rule_from_dict
    from ase_bptt.runs.state import load_state, state_path
    from ase_bptt.train.finetune import finetune

    options = {"eta": None, "tol": 1e-5} if step == "fire" else {"eta": 0.05}
    out = finetune(
        emt_db,
        tmp_path / f"{step}.pt",
        init=init_model,
        config=config(step=step, epochs=3, max_steps=5, batch_size=4, **options),
        progress=False,
    )
    ckpt = load_checkpoint(out)
    trained = load_state(state_path(out))["step_rule"]
    assert trained["step"] == step
    assert type(step_rule_from_dict(trained)).__name__.lower().startswith(step)
    history = ckpt["metadata"]["history"]
    assert all(math.isfinite(h["val_dq"]) for h in history)
    assert min(h["val_dq"] for h in history[1:]) < history[0]["val_dq"]  # it learned
    assert ckpt["metadata"]["no_harm"]["exported"] == "tuned"
    assert ckpt["relax"]["step"]["step"] == step and ckpt["relax"]["max_steps"] == 5
    initial = load_checkpoint(init_model)["model"]["state_dict"]
    tuned = ckpt["model"]["state_dict"]
    assert any(not torch.equal(initial[k], tuned[k]) for k in initial)


def test_non_finite_loss_skips_the_batch(emt_db, init_model, tmp_path, monkeypatch):
    from ase_bptt import metrics
    from ase_bptt.models.checkpoint import load_checkpoint
    from ase_bptt.runs.errors import TrainingError
    from ase_bptt.train.finetune import finetune

    real_dq = metrics.dq
    calls = {"n": 0}

    def poisoned(final, ref, batch):
        value = real_dq(final, ref, batch)
        if torch.is_grad_enabled():  # training batches only; evaluation stays honest
            calls["n"] += 1
            if calls["n"] == 1 or calls["always"]:
                return value * float("nan")
        return value

    calls["always"] = False
    monkeypatch.setattr(metrics, "dq", poisoned)
    out = finetune(emt_db, tmp_path / "nan.pt", init=init_model, config=config(eta=0.05, epochs=1), progress=False)
    meta = load_checkpoint(out)["metadata"]
    assert meta["skipped_batches"] == 1 and meta["steps"] == 2
    assert all(torch.isfinite(v).all() for v in load_checkpoint(out)["model"]["state_dict"].values())
    calls["always"] = True
    with pytest.raises(TrainingError, match="non-finite"):
        finetune(emt_db, tmp_path / "allnan.pt", init=init_model, config=config(eta=0.05, epochs=1), progress=False)


def test_variable_stopping_is_seeded_and_in_range():
    from ase_bptt.train.finetune import draw_stopping

    cfg = config(stopping="variable")
    draws = [draw_stopping(cfg, e, b) for e in range(5) for b in range(40)]
    assert draws == [draw_stopping(cfg, e, b) for e in range(5) for b in range(40)]
    tols = np.array([d[0] for d in draws])
    steps = np.array([d[1] for d in draws])
    assert tols.min() >= 1e-4 and tols.max() <= 1e-2 and steps.min() >= 50 and steps.max() <= 75
    # log-uniform: about half the draws below the geometric mean 1e-3 (200 draws, 5 sigma ~ 0.18)
    assert abs(np.mean(tols < 1e-3) - 0.5) < 0.18
    assert len(set(steps)) > 10
    assert draw_stopping(config(), 0, 0) == (1e-3, 10)


def test_proximal_term_keeps_weights_near_the_pretrained_ones(emt_db, init_model, tmp_path):
    from ase_bptt.models.checkpoint import load_checkpoint
    from ase_bptt.runs.state import load_state, state_path
    from ase_bptt.train.finetune import finetune

    initial = load_checkpoint(init_model)["model"]["state_dict"]

    def distance(proximal):
        out = tmp_path / f"prox{proximal}.pt"
        finetune(
            emt_db,
            out,
            init=init_model,
            config=config(eta=0.05, epochs=1, batch_size=1, lr=1e-2, grad_clip=None, proximal=proximal),
            progress=False,
        )
        current = load_state(state_path(out))["model"]
        return sum(float((current[k] - initial[k]).pow(2).sum()) for k in initial)

    assert distance(100.0) < 0.5 * distance(0.0)


def test_finetune_without_init_pretrains_first(emt_db, tmp_path):
    from ase_bptt.models.checkpoint import load_checkpoint
    from ase_bptt.train.finetune import finetune
    from ase_bptt.train.pretrain import PretrainConfig

    pre = PretrainConfig(model=TINY_MODEL, epochs=1, batch_size=32, eval_frames=16, checkpoint_every=None)
    out = finetune(emt_db, tmp_path / "auto.pt", config=config(eta=0.05, epochs=1, pretrain=pre), progress=False)
    pretrained = tmp_path / "auto-pretrained.pt"
    assert load_checkpoint(pretrained)["metadata"]["kind"] == "pretrain"
    assert load_checkpoint(out)["metadata"]["init"] == str(pretrained)
    # Both checkpoints carry the training domain (models/domain.py): Cu only, the cells' atom count, periodic.
    from ase_bptt.data.db import TrajectoryDB

    n_atoms = {len(t.initial) for t in TrajectoryDB(emt_db, create=False).trajectories("train")}
    for path in (pretrained, out):
        domain = load_checkpoint(path)["metadata"]["training_domain"]
        assert domain["species"] == [29]
        assert domain["n_atoms"] == [min(n_atoms), max(n_atoms)]
        assert domain["pbc"] == [[True, True, True]]


# ------------------------------------------------ evaluation cadence, patience, schedule, augmentation
def test_eval_every_evaluates_between_epochs_and_keeps_the_best(emt_db, init_model, tmp_path):
    from ase_bptt.models.checkpoint import load_checkpoint, load_model
    from ase_bptt.train.finetune import finetune

    # 4 train trajectories, one per batch: 4 steps per epoch, 8 in all. eval_every=3 counts over the
    # whole run: steps 3 and 6 (a quarter before the end of epoch 1, half-way through epoch 2), then the end.
    options = dict(eta=0.05, batch_size=1, eval_every=3)
    out = finetune(emt_db, tmp_path / "e3.pt", init=init_model, config=config(**options), progress=False)
    meta = load_checkpoint(out)["metadata"]
    history = meta["history"]
    assert [h["step"] for h in history] == [0, 3, 6, 8]
    assert [h["epoch"] for h in history] == [0, 0.75, 1.5, 2]
    best = min(history, key=lambda h: h["val_dq"])
    assert meta["best_epoch"] == best["epoch"]
    assert meta["best_metric"] == best["val_dq"]
    # The export is the best evaluation's model: re-scored independently.
    from ase_bptt.data.db import TrajectoryDB

    trajectories = TrajectoryDB(emt_db, create=False).trajectories("val")
    assert best["val_dq"] == pytest.approx(reference_mean_dq(load_model(out), trajectories, 0.05), rel=1e-4)

    # eval_every=2 with 4 steps per epoch: every other step; the epoch's end is one of them (not evaluated twice).
    options = dict(eta=0.05, batch_size=1, eval_every=2, epochs=1)
    out = finetune(emt_db, tmp_path / "e2.pt", init=init_model, config=config(**options), progress=False)
    assert [h["epoch"] for h in load_checkpoint(out)["metadata"]["history"]] == [0, 0.5, 1]


def test_patience_stops_after_evaluations_without_improvement(emt_db, init_model, tmp_path):
    from ase_bptt.models.checkpoint import load_checkpoint
    from ase_bptt.train.finetune import finetune

    # lr 1e4 wrecks the model at the first step, so no evaluation beats epoch 0.
    wreck = dict(lr=1e4, grad_clip=None, eta=0.05, batch_size=1, eval_every=1)
    out = finetune(emt_db, tmp_path / "p.pt", init=init_model, config=config(patience=2, **wreck), progress=False)
    meta = load_checkpoint(out)["metadata"]
    assert [h["step"] for h in meta["history"]] == [0, 1, 2]
    assert meta["stop_reason"] == "early stopping: no improvement for 2 evaluations"
    assert meta["steps"] == 2 and meta["best_epoch"] == 0  # of 8 steps (2 epochs x 4 batches)


@pytest.fixture
def recorded_lrs():
    """The learning rate of every param group at every optimiser step."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    lrs: list[list[float]] = []
    handle = register_optimizer_step_pre_hook(lambda opt, args, kwargs: lrs.append([g["lr"] for g in opt.param_groups]))
    yield lrs
    handle.remove()


def test_cosine_schedule_over_the_run_applies_to_model_and_step_rule(emt_db, init_model, tmp_path, recorded_lrs):
    from ase_bptt.runs.loop import lr_factor
    from ase_bptt.train.finetune import finetune

    # 2 epochs x 2 batches = 4 steps, no warmup: cosine from lr to min_lr_factor * lr, written out here.
    options = dict(step="learned", eta=0.05, lr=1e-3, step_lr=1e-2, lr_schedule="cosine", min_lr_factor=0.1)
    finetune(emt_db, tmp_path / "cos.pt", init=init_model, config=config(**options), progress=False)
    expected = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * k / 3)) for k in range(4)]
    assert [lr for lr, _ in recorded_lrs] == pytest.approx([1e-3 * f for f in expected], rel=1e-12)
    assert [slr for _, slr in recorded_lrs] == pytest.approx([1e-2 * f for f in expected], rel=1e-12)

    # max_batches shortens the schedule; warmup and onecycle through lr_factor.
    recorded_lrs.clear()
    options = dict(eta=0.05, lr=1e-3, lr_schedule="onecycle", warmup=2, max_batches=5, epochs=5)
    finetune(emt_db, tmp_path / "one.pt", init=init_model, config=config(**options), progress=False)
    factors = [lr_factor(k, 5, schedule="onecycle", warmup=2, min_factor=0.01) for k in range(5)]
    assert [g[0] for g in recorded_lrs] == pytest.approx([1e-3 * f for f in factors], rel=1e-12)
    assert len(set(factors)) >= 4 and factors[-1] == pytest.approx(0.01)

    # The default (constant) keeps today's learning rate exactly.
    recorded_lrs.clear()
    finetune(emt_db, tmp_path / "const.pt", init=init_model, config=config(eta=0.05), progress=False)
    assert [g[0] for g in recorded_lrs] == [1e-3] * 4


@pytest.fixture(scope="module")
def cubic_db(tmp_path_factory):
    """Cubic EMT Cu cells (1x1x1, one vacancy): augment_cubic moves them."""
    from conftest import emt_cu_relaxation

    from ase_bptt.data.db import TrajectoryDB

    path = tmp_path_factory.mktemp("cubic") / "cubic.db"
    db = TrajectoryDB(path)
    for k, split in enumerate(["train"] * 4 + ["val"] * 2):
        db.add_trajectory(emt_cu_relaxation(50 + k, repeat=(1, 1, 1)), label="vacancy", source="test", split=split)
    return path


def test_augmented_rollouts_are_seeded_and_change_training(cubic_db, init_model, tmp_path):
    from ase_bptt.runs.state import load_state, state_path
    from ase_bptt.train.finetune import finetune

    def weights(name, **options):
        out = tmp_path / f"{name}.pt"
        finetune(cubic_db, out, init=init_model, config=config(eta=0.05, epochs=1, **options), progress=False)
        return load_state(state_path(out))["model"]

    plain = weights("plain")
    for kind in ("augment_translation", "augment_cubic"):
        first, again = weights(f"{kind}-1", **{kind: True}), weights(f"{kind}-2", **{kind: True})
        assert all(torch.equal(first[k], again[k]) for k in first), kind  # seeded: reproducible
        assert any(not torch.allclose(first[k], plain[k]) for k in first), kind  # and it did something


@pytest.mark.parametrize(
    "changes, name",
    [
        ({"eval_every": 0}, "eval_every"),
        ({"patience": 0}, "patience"),
        ({"lr_schedule": "linear"}, "lr_schedule"),
        ({"warmup": -1}, "warmup"),
        ({"min_lr_factor": 1.5}, "min_lr_factor"),
        ({"max_batches": 0}, "max_batches"),
    ],
)
def test_bad_control_values_name_the_option(changes, name):
    from ase_bptt.runs.config import ConfigError

    with pytest.raises(ConfigError, match=f"FinetuneConfig.{name} must be"):
        config(**changes)


def test_freeze_keeps_the_named_parameters_and_tunes_the_rest(emt_db, init_model, tmp_path):
    """``freeze``: the frozen groups leave BPTT bit for bit as they came; the others move."""
    from ase_bptt.models.checkpoint import load_checkpoint
    from ase_bptt.runs.state import load_state, state_path
    from ase_bptt.train.finetune import finetune

    initial = load_checkpoint(init_model)["model"]["state_dict"]
    out = tmp_path / "frozen.pt"
    cfg = config(eta=0.05, epochs=1, batch_size=1, lr=1e-2, freeze=("embed", "blocks."))
    finetune(emt_db, out, init=init_model, config=cfg, progress=False)
    tuned = load_state(state_path(out))["model"]
    frozen = [k for k in initial if k.startswith(("embed.", "blocks.")) and initial[k].is_floating_point()]
    free = [k for k in initial if k.startswith(("force_head.", "energy_head.", "norm."))]
    assert frozen and free
    assert all(torch.equal(tuned[k], initial[k]) for k in frozen)
    assert any(not torch.equal(tuned[k], initial[k]) for k in free)
    assert load_checkpoint(out)["metadata"]["config"]["freeze"] == ["embed", "blocks"]


def test_freeze_names_what_it_cannot_find_before_anything_is_written(emt_db, init_model, tmp_path):
    from ase_bptt.runs.config import ConfigError
    from ase_bptt.train.finetune import finetune
    from ase_bptt.train.pretrain import PretrainConfig

    with pytest.raises(ConfigError, match="'pair_i' names no parameter of this model; its groups are embed, blocks"):
        finetune(emt_db, tmp_path / "a.pt", init=init_model, config=config(freeze=("pair_i",)), progress=False)
    everything = ("embed", "blocks", "norm", "force_head", "energy_head")
    with pytest.raises(ConfigError, match="leaves nothing to tune .no model parameter, and the fixed step rule"):
        finetune(emt_db, tmp_path / "b.pt", init=init_model, config=config(freeze=everything), progress=False)
    # Without --init the check comes before pretraining, not after it.
    pre = PretrainConfig(model=TINY_MODEL, epochs=1, batch_size=32, eval_frames=16, checkpoint_every=None)
    with pytest.raises(ConfigError, match="'pair_i' names no parameter"):
        finetune(emt_db, tmp_path / "c.pt", config=config(freeze=("pair_i",), pretrain=pre), progress=False)
    with pytest.raises(ConfigError, match="leaves nothing to tune"):
        finetune(emt_db, tmp_path / "d.pt", config=config(freeze=everything, pretrain=pre), progress=False)
    assert list(tmp_path.iterdir()) == []
    for bad in ("embed", ("",), (".",), (3,)):
        with pytest.raises(ConfigError, match="FinetuneConfig.freeze must be a list of parameter-name prefixes"):
            config(freeze=bad)


def test_freeze_default_keeps_the_config_hash_of_older_state_files():
    from ase_bptt.runs.config import RUN_CONTROL, config_hash

    new = config().to_dict()
    old = {k: v for k, v in new.items() if k != "freeze"}
    assert config_hash(new, ignore=RUN_CONTROL) == config_hash(old, ignore=RUN_CONTROL)
    assert config_hash(config(freeze=("embed",)).to_dict(), ignore=RUN_CONTROL) != config_hash(new, ignore=RUN_CONTROL)


def test_cli_freeze(emt_db, init_model, tmp_path):
    from click.testing import CliRunner

    from ase_bptt.cli import cli
    from ase_bptt.models.checkpoint import load_checkpoint

    base = ["--quiet", "finetune", str(emt_db), "--init", str(init_model), "--step", "fixed", "--eta", "0.05"]
    base += ["--epochs", "1", "--export", "own"]
    typo = CliRunner().invoke(cli, [*base, "-o", str(tmp_path / "typo.pt"), "--freeze", "embedd"])
    assert typo.exit_code == 1 and "'embedd' names no parameter of this model" in typo.output
    assert len(typo.output.strip().splitlines()) == 1 and list(tmp_path.iterdir()) == []
    ok = CliRunner().invoke(cli, [*base, "-o", str(tmp_path / "ok.pt"), "--freeze", "embed", "--freeze", "blocks"])
    assert ok.exit_code == 0, ok.output
    assert load_checkpoint(tmp_path / "ok.pt")["metadata"]["config"]["freeze"] == ["embed", "blocks"]


def test_freezing_the_whole_model_tunes_a_learned_step_alone(emt_db, init_model, tmp_path):
    """Every model parameter frozen with ``step="learned"``: the model leaves bit for bit, eta moves."""
    from ase_bptt.models.checkpoint import load_checkpoint
    from ase_bptt.runs.state import load_state, state_path
    from ase_bptt.train.finetune import finetune

    initial = load_checkpoint(init_model)["model"]["state_dict"]
    everything = ("embed", "blocks", "norm", "force_head", "energy_head")
    out = tmp_path / "eta-only.pt"
    cfg = config(step="learned", eta=0.05, epochs=2, batch_size=1, step_lr=1e-2, freeze=everything)
    finetune(emt_db, out, init=init_model, config=cfg, progress=False)
    state = load_state(state_path(out))
    assert all(torch.equal(state["model"][k], initial[k]) for k in initial)
    assert float(state["step_rule"]["eta"]) != pytest.approx(0.05, rel=1e-6)
