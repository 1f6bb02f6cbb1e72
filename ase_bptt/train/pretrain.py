"""Pretraining: force (and energy) matching on the frames of the train split.

The MLIP BPTT starts from (the paper's method fine-tunes a pretrained model):
AdamW, gradient clipping, a warmup + cosine (or one-cycle) learning-rate
schedule, early stopping on the validation force MAE, optional rotation and
translation augmentation. Every frame of the split is loaded once into padded
tensors; a batch is an index into them, so the inner loop does no per-frame
Python work. Resumable (see :mod:`ase_bptt.train.common`), and runs unchanged
under ``torchrun``.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ase_bptt.train.common import (
    EmptySplitError,
    FrameSet,
    LoopSpec,
    LoopState,
    config_to_dict,
    epoch_batches,
    load_frames,
    local_share,
    lr_factor,
    open_db,
    resolve_dtype,
    restore_rng,
    run_epochs,
    run_header,
    seed_generator,
    start_or_resume,
)
from ase_bptt.train.distributed import DistContext, init_distributed, shard

__all__ = ["PretrainConfig", "pretrain"]

log = logging.getLogger("ase_bptt.train")

#: Config fields that do not change the result: a resumed run may change them.


@dataclass
class PretrainConfig:
    """Settings of :func:`pretrain`.

    Attributes:
        model: ADAPTConfig fields (dict or an ``ADAPTConfig``); ``species``
            defaults to the elements of the train split.
        epochs: passes over the train frames.
        max_steps: stop after this many optimiser steps (None: no limit).
        time_budget: stop after this many seconds of training (None: no limit),
            summed over resumed runs; the best model so far is exported. The
            learning-rate schedule then follows the steps or the clock,
            whichever is further along, so warmup and decay fit in the budget.
        batch_size: frames per optimiser step (the global batch under torchrun).
        lr: peak learning rate (AdamW).
        weight_decay: AdamW weight decay (not applied to biases and norms).
        grad_clip: max gradient norm (None: no clipping).
        schedule: "cosine", "onecycle" or "constant".
        warmup: fraction of the steps spent warming up.
        min_lr_factor: final learning rate as a fraction of ``lr``.
        patience: early stopping after this many epochs without a better val
            force MAE (None: never).
        energy_weight: weight of the per-atom energy loss (used only when every
            frame has an energy; 0 turns it off).
        augment_rotation: rotate each frame randomly (cell, positions and forces
            together, so periodic images stay consistent).
        augment_translation: translate each frame randomly.
        standardisation_frames: frames used to fit the model's standardisation.
        eval_frames: train frames scored each epoch (None: all).
        eval_batch_size: frames per evaluation batch.
        relax_eta: step size written into the checkpoint's relax settings.
        relax_tol: stopping tolerance written into them (A).
        relax_max_steps: frame limit written into them.
        seed: seeds initialisation, batch order, augmentation.
        device: "cpu", "cuda", ... (None: cuda when available).
        dtype: "float32" or "float64".
        checkpoint_every: write the resumable state every this many batches.
    """

    model: Any = field(default_factory=dict)
    epochs: int = 50
    max_steps: int | None = None
    time_budget: float | None = None
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-2
    grad_clip: float | None = 10.0
    schedule: str = "cosine"
    warmup: float = 0.05
    min_lr_factor: float = 0.01
    patience: int | None = 10
    energy_weight: float = 0.1
    augment_rotation: bool = False
    augment_translation: bool = False
    standardisation_frames: int = 1000
    eval_frames: int | None = 1000
    eval_batch_size: int = 64
    relax_eta: float = 0.05
    relax_tol: float = 1e-3
    relax_max_steps: int = 75
    seed: int = 0
    device: str | None = None
    dtype: str = "float32"
    checkpoint_every: int | None = 100

    def __post_init__(self) -> None:
        if hasattr(self.model, "to_dict"):
            self.model = self.model.to_dict()
        self.model = dict(self.model or {})
        for name in ("epochs", "batch_size", "standardisation_frames", "eval_batch_size", "relax_max_steps"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"PretrainConfig.{name} must be at least 1, got {getattr(self, name)}.")
        for name in ("lr", "relax_eta", "relax_tol"):
            if not getattr(self, name) > 0:
                raise ValueError(f"PretrainConfig.{name} must be positive, got {getattr(self, name)}.")
        if self.schedule not in ("cosine", "onecycle", "constant"):
            raise ValueError(f"schedule must be 'cosine', 'onecycle' or 'constant', not {self.schedule!r}.")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"warmup is a fraction of the steps in [0, 1), got {self.warmup}.")
        if self.energy_weight < 0:
            raise ValueError(f"energy_weight must be >= 0, got {self.energy_weight}.")
        resolve_dtype(self.dtype)

    def to_dict(self) -> dict:
        """JSON-like dict (stored in checkpoints and state files)."""
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, d: dict) -> PretrainConfig:
        """Inverse of :meth:`to_dict` (unknown keys are an error)."""
        return cls(**d)


# ----------------------------------------------------------------- helpers
def random_rotations(n: int, generator: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    """``n`` uniformly random proper rotation matrices ``(n, 3, 3)`` (QR of Gaussians)."""
    a = torch.randn(n, 3, 3, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
    det = torch.linalg.det(q)
    q[:, :, 0] = q[:, :, 0] * det.unsqueeze(-1)  # reflections -> rotations
    return q.to(dtype)


def augment(batch, forces: torch.Tensor, *, rotations: torch.Tensor | None, shifts: torch.Tensor | None):
    """Rotate (cell, positions and forces together) and/or translate frames."""
    positions, cell = batch.positions, batch.cell
    if rotations is not None:
        rt = rotations.to(positions).transpose(1, 2)
        positions, cell, forces = positions @ rt, cell @ rt, forces @ rt
    if shifts is not None:
        positions = positions + shifts.to(positions).unsqueeze(1) * batch.mask.unsqueeze(-1)
    return replace(batch, positions=positions, cell=cell), forces


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def file_digest(path: str | Path | None) -> str | None:
    """sha256 (first 16 hex digits) of a file, identifying an ``init`` checkpoint."""
    if path is None:
        return None
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


@torch.no_grad()
def force_metrics(model, frames: FrameSet, index: torch.Tensor, *, batch_size: int, ctx: DistContext) -> dict:
    """Force MAE/RMSE (eV/A) and energy MAE (meV/atom) over frames ``index`` (sharded by rank)."""
    was_training = model.training
    model.eval()
    dev = frames.forces.device
    sums = torch.zeros(5, dtype=torch.float64, device=dev)  # |dF|, dF^2, components, |dE|/N, frames with E
    for chunk in torch.split(shard(index, ctx.rank, ctx.world_size), batch_size):
        batch, forces, energy = frames.take(chunk)
        out = model(batch)
        diff = (out.forces - forces) * batch.mask.unsqueeze(-1)
        sums[0] += diff.abs().sum().double()
        sums[1] += diff.pow(2).sum().double()
        sums[2] += 3 * batch.mask.sum()
        if energy is not None and out.energy is not None:
            sums[3] += ((out.energy - energy).abs() / batch.mask.sum(1)).sum().double()
            sums[4] += len(chunk)
    sums = ctx.all_reduce_sum(sums.to(ctx.device)).cpu()
    model.train(was_training)
    n = max(float(sums[2]), 1.0)
    return {
        "force_mae": float(sums[0]) / n,
        "force_rmse": math.sqrt(float(sums[1]) / n),
        "energy_mae_mev_per_atom": 1000.0 * float(sums[3]) / float(sums[4]) if sums[4] > 0 else None,
    }


def _build_model(config: PretrainConfig, train: FrameSet, init, device, dtype):
    from ase_bptt.models.adapt import ADAPT, ADAPTConfig
    from ase_bptt.models.checkpoint import load_model

    if init is not None:
        model = load_model(init, device=device, dtype=dtype)
        model.check_species(train.batch.numbers, where="the train split")
        return model, False
    species = tuple(sorted({int(z) for z in train.batch.numbers[train.batch.mask].tolist()}))
    model_cfg = dict(config.model)
    if model_cfg.get("species") is None:
        model_cfg["species"] = species
    torch.manual_seed(config.seed)
    model = ADAPT(ADAPTConfig.from_dict(model_cfg))
    model.check_species(train.batch.numbers, where="the train split")
    return model.to(device=device, dtype=dtype), True


# -------------------------------------------------------------------- main
def pretrain(
    db, out, *, config: PretrainConfig | None = None, init=None, progress: bool = True, overwrite: bool = False
) -> Path:
    """Pretrain a force model on the frames of the train split of ``db``.

    Args:
        db: a :class:`~ase_bptt.data.db.TrajectoryDB` or its path.
        out: the checkpoint to write (e.g. ``runs/pretrained.pt``); the
            resumable state goes next to it (``runs/pretrained.state.pt``).
        config: settings (default :class:`PretrainConfig`).
        init: a checkpoint to continue from instead of a fresh ADAPT (its
            standardisation is kept).
        progress: show progress bars (rank 0 only).
        overwrite: replace an existing ``out`` made with other settings or data
            (without it that is a :class:`ConfigMismatchError`).

    Returns:
        ``out``. Running the same call again continues an unfinished run from
        its state file, and returns at once when the run has finished.

    Raises:
        FileNotFoundError: ``db`` does not exist.
        EmptySplitError: the train split has no frames.
        ConfigMismatchError: ``out`` or its state belongs to another config,
            database or init checkpoint.
        TrainingInterrupted: SIGINT; the state was saved.
    """
    config = PretrainConfig() if config is None else config
    ctx = init_distributed(config.device)
    try:
        return _pretrain(db, Path(out), config, init, progress, overwrite, ctx)
    finally:
        ctx.close()


def _pretrain(db, out: Path, config: PretrainConfig, init, progress: bool, overwrite: bool, ctx: DistContext) -> Path:
    from ase_bptt.models.checkpoint import save_checkpoint
    from ase_bptt.relax.steps import FixedStep, relax_settings

    dtype = resolve_dtype(config.dtype)
    device = ctx.device
    db = open_db(db)
    train = load_frames(db, "train")
    if train is None:
        raise EmptySplitError(
            f"{db.name} has no frames in the train split; assign splits (TrajectoryDB.assign_splits) "
            "or import more trajectories."
        )
    val = load_frames(db, "val")
    if val is None and ctx.is_main:
        log.warning("%s has no val split: the best epoch is chosen by train force MAE, no early stopping", db.name)

    header = run_header(config.to_dict(), train.traj_ids, file_digest(init))
    sfile, state, done = start_or_resume(out, header, kind="pretrain", ctx=ctx, overwrite=overwrite)
    if done:
        return out

    model, fresh = _build_model(config, train, init, device, dtype)
    # Loss scales: constants from a seeded sample, so the loss is ~1 at the start.
    n_std = min(config.standardisation_frames, len(train))
    sample = torch.randperm(len(train), generator=seed_generator(config.seed, 11))[:n_std]
    s_batch, s_forces, s_energy = train.take(sample)
    if fresh:
        model.fit_standardisation(s_batch, s_forces, s_energy)
    force_var = float(s_forces[s_batch.mask].pow(2).mean().clamp(min=1e-6))
    use_energy = config.energy_weight > 0 and train.energy is not None
    energy_var = 1.0
    if use_energy:
        per_atom = s_energy / s_batch.mask.sum(1)
        energy_var = float(per_atom.var(unbiased=False).clamp(min=1e-6)) if len(per_atom) > 1 else 1e-6
    elif config.energy_weight > 0 and ctx.is_main:
        log.info("the train split lacks energies for some frames: fitting forces only")

    train = train.to(device, dtype)
    val = None if val is None else val.to(device, dtype)
    ctx.broadcast_parameters(model)
    optimizer = torch.optim.AdamW(_param_groups(model, config.weight_decay), lr=config.lr)
    params = [p for g in optimizer.param_groups for p in g["params"]]

    spec = LoopSpec(
        kind="pretrain",
        state_file=sfile,
        n_items=len(train),
        batch_size=config.batch_size,
        epochs=config.epochs,
        seed=config.seed,
        max_steps=config.max_steps,
        time_budget=config.time_budget,
        checkpoint_every=config.checkpoint_every,
        patience=config.patience if val is not None else None,
        header=header,
    )
    steps_per_epoch = len(epoch_batches(spec, 0))
    total = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    warmup = int(round(config.warmup * total))
    loop = LoopState()
    best: dict[str, Any] = {"model": None}
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        best["model"] = state.get("best_model")
        loop = LoopState.from_dict(state["loop"])
        restore_rng(state)
        if ctx.is_main:
            log.info("resuming pretrain from %s at epoch %d, batch %d", sfile, loop.epoch + 1, loop.batch)
    elif ctx.is_main:
        log.info(
            "pretraining on %d frames from %d trajectories (%d steps per epoch); val: %d frames",
            len(train),
            len(train.traj_ids),
            steps_per_epoch,
            0 if val is None else len(val),
        )
    eval_index = torch.randperm(len(train), generator=seed_generator(config.seed, 13))
    if config.eval_frames is not None:
        eval_index = eval_index[: config.eval_frames]
    running = {"loss": 0.0, "n": 0}

    def train_batch(epoch: int, b: int, index: torch.Tensor) -> dict | None:
        position = loop.step
        if config.time_budget:
            # With a time budget the run may end long before ``total`` steps: follow
            # whichever is further along, the steps or the clock, so warmup and decay
            # fit in the budget.
            position = max(position, int(total * min(loop.elapsed / config.time_budget, 1.0)))
        lr = config.lr * lr_factor(
            position, total, schedule=config.schedule, warmup=warmup, min_factor=config.min_lr_factor
        )
        for g in optimizer.param_groups:
            g["lr"] = lr
        gen = seed_generator(config.seed, epoch, b, 17)
        rotations = random_rotations(len(index), gen) if config.augment_rotation else None
        shifts = None
        if config.augment_translation:
            shifts = torch.rand(len(index), 3, generator=gen, dtype=torch.float64)
        local, weight = local_share(torch.arange(len(index)), ctx)
        batch, forces, energy = train.take(index[local])
        if rotations is not None or shifts is not None:
            if shifts is not None:  # fractional shift for periodic directions, 1 A scale otherwise
                eye = torch.eye(3, dtype=batch.cell.dtype, device=device).expand_as(batch.cell)
                cell = torch.where(batch.pbc.unsqueeze(-1), batch.cell, eye)
                shifts = (shifts[local].to(device=device, dtype=cell.dtype).unsqueeze(1) @ cell).squeeze(1)
            batch, forces = augment(
                batch, forces, rotations=None if rotations is None else rotations[local], shifts=shifts
            )
        counts = ctx.all_reduce_sum(
            torch.tensor(
                [3.0 * float(batch.mask.sum()) * weight, float(len(local)) * weight], dtype=torch.float64, device=device
            )
        )
        model.train()
        out = model(batch)
        diff = (out.forces - forces) * batch.mask.unsqueeze(-1)
        loss = weight * diff.pow(2).sum() / (float(counts[0]) * force_var)
        if use_energy and out.energy is not None:
            err = (out.energy - energy) / batch.mask.sum(1)
            loss = loss + weight * config.energy_weight * err.pow(2).sum() / (float(counts[1]) * energy_var)
        loss.backward()
        ctx.sync_gradients(params)
        total_loss = float(ctx.all_reduce_sum(loss.detach().double().reshape(1)))
        norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip if config.grad_clip else float("inf"))
        if not (math.isfinite(total_loss) and bool(torch.isfinite(norm))):
            optimizer.zero_grad(set_to_none=True)
            return None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        running["loss"] += total_loss
        running["n"] += 1
        return {"loss": total_loss, "lr": lr}

    def evaluate(epoch: int) -> tuple[float, dict]:
        entry: dict[str, Any] = {"lr": optimizer.param_groups[0]["lr"]}
        if running["n"]:
            entry["train_loss"] = running["loss"] / running["n"]
        running.update(loss=0.0, n=0)
        for name, value in force_metrics(model, train, eval_index, batch_size=config.eval_batch_size, ctx=ctx).items():
            entry[f"train_{name}"] = value
        if val is not None:
            for name, value in force_metrics(
                model, val, torch.arange(len(val)), batch_size=config.eval_batch_size, ctx=ctx
            ).items():
                entry[f"val_{name}"] = value
        entry["elapsed_s"] = round(loop.elapsed, 2)
        metric = entry["val_force_mae"] if val is not None else entry["train_force_mae"]
        return metric, entry

    def on_best() -> None:
        best["model"] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}

    def payload() -> dict:
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "best_model": best["model"]}

    if not loop.finished:
        run_epochs(
            spec,
            loop,
            ctx,
            train_batch=train_batch,
            evaluate=evaluate,
            on_best=on_best,
            payload=payload,
            progress=progress,
        )

    if ctx.is_main:
        final = copy.deepcopy(model)
        if best["model"] is not None:
            final.load_state_dict(best["model"])
        relax = relax_settings(FixedStep(config.relax_eta), tol=config.relax_tol, max_steps=config.relax_max_steps)
        metadata = {
            "kind": "pretrain",
            "database": str(db.name),
            "data_fingerprint": header["data_fingerprint"],
            "train_trajectories": len(train.traj_ids),
            "train_frames": len(train),
            "val_frames": 0 if val is None else len(val),
            "config": header["config"],
            "config_hash": header["config_hash"],
            "init": None if init is None else str(init),
            "init_digest": header["init"],
            "history": loop.history,
            "best_epoch": loop.best_epoch,
            "best_metric": loop.best_metric,
            "stop_reason": loop.stop_reason,
            "skipped_batches": loop.skipped,
            "steps": loop.step,
            "world_size": ctx.world_size,
        }
        save_checkpoint(out, final.eval(), relax=relax, metadata=metadata)
        log.info("wrote %s (best epoch %s, %s)", out, loop.best_epoch, loop.stop_reason)
    ctx.barrier()
    return out
