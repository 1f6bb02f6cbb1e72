"""BPTT fine-tuning (the paper's Section 3): train through whole relaxations.

Each optimiser step takes a batch of trajectories, unrolls a relaxation from
their initial structures with autograd on (:func:`ase_bptt.relax.relaxer.rollout`),
scores the final positions against the relaxed reference with Dq
(mass-weighted, minimum image) or MSE, backpropagates through every frame and
updates the model (and a learned step rule). The controls are the paper's:
fixed / learned / decoder / FIRE step rule, momentum, annealing, exploration
noise, fixed or variable stopping, gradient clipping or a proximal term to the
pretrained weights. The mean val Dq is measured before training (epoch 0) and
after every epoch; the best model is exported, with the step rule it was
tuned with, as an ordinary checkpoint for :class:`~ase_bptt.calculator.BPTTCalculator`.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ase_bptt import metrics
from ase_bptt.relax.defaults import DEFAULT_ETA_GRID
from ase_bptt.relax.registry import step_rule_names
from ase_bptt.train.common import (
    EmptySplitError,
    LoopSpec,
    LoopState,
    RelaxationSet,
    config_to_dict,
    load_relaxations,
    local_share,
    open_db,
    resolve_dtype,
    restore_rng,
    run_epochs,
    run_header,
    seed_generator,
    start_or_resume,
)
from ase_bptt.train.distributed import DistContext, init_distributed, shard
from ase_bptt.train.pretrain import PretrainConfig, file_digest, pretrain

__all__ = ["FinetuneConfig", "finetune", "grid_search_eta", "evaluate_rollouts", "draw_stopping", "DEFAULT_ETA_GRID"]

log = logging.getLogger("ase_bptt.train")

#: Step sizes (A^2/eV) tried when ``eta`` is not given.


@dataclass
class FinetuneConfig:
    """Settings of :func:`finetune` (defaults follow the paper where it says).

    Attributes:
        step: step rule, "fixed" (default), "learned", "decoder" or "fire".
        eta: step size (A^2/eV; initial value for learned/decoder). None: the
            best of ``eta_grid`` by mean loss on the TRAIN split with the
            initial model (never the test split).
        eta_grid: step sizes tried by the grid search.
        grid_structures: at most this many train structures in the grid search.
        step_lr: learning rate of the step rule's own parameters.
        step_grad_clip: max gradient norm of the step rule's parameters
            (clipped separately: clipping model and eta together froze eta).
        momentum: momentum weight of the update, in [0, 1).
        anneal: step annealing factor per frame (eta_k = eta * anneal**k).
        noise: exploration noise (A) added to each update in training.
        maxstep: largest displacement of an atom in one frame (A).
        stopping: "fixed" (tol, max_steps) or "variable" (per batch: tol
            log-uniform in ``tol_range``, max steps uniform in ``max_steps_range``).
        tol: RMS displacement stopping tolerance (A), also used for evaluation.
        max_steps: most frames per rollout, also used for evaluation.
        tol_range: (low, high) of the variable tolerance.
        max_steps_range: (low, high), inclusive, of the variable frame limit.
        loss: "dq" (mass-weighted, amu^1/2 A) or "mse" (A^2 per atom, pure crystals).
        epochs: passes over the train trajectories.
        max_batches: stop after this many optimiser steps (None: no limit).
        time_budget: stop after this many seconds (None: no limit).
        batch_size: trajectories per optimiser step (global under torchrun).
        lr: learning rate of the model (Adam).
        weight_decay: decoupled weight decay of the model (AdamW; 0 = Adam).
        grad_clip: max gradient norm of the model (None: no clipping).
        proximal: weight of the L2 term ``sum (theta - theta_pretrained)^2``
            (0: off). The paper uses it as an alternative to clipping.
        checkpoint_frames: recompute each frame in backward (less memory).
        rollout_dropout: keep the model's dropout on during training rollouts.
        converged_only: train only on trajectories whose last frame is relaxed.
        eval_batch_size: structures per evaluation rollout batch.
        seed: seeds batch order, variable stopping and noise.
        device: "cpu", "cuda", ... (None: cuda when available).
        dtype: "float32" or "float64".
        checkpoint_every: write the resumable state every this many batches.
        pretrain: settings for pretraining first when no ``init`` is given.
    """

    step: str = "fixed"
    eta: float | None = None
    eta_grid: tuple[float, ...] = DEFAULT_ETA_GRID
    grid_structures: int | None = 256
    step_lr: float = 1e-3
    step_grad_clip: float | None = 1.0
    momentum: float = 0.0
    anneal: float = 1.0
    noise: float = 0.0
    maxstep: float | None = 0.2
    stopping: str = "fixed"
    tol: float = 1e-3
    max_steps: int = 75
    tol_range: tuple[float, float] = (1e-4, 1e-2)
    max_steps_range: tuple[int, int] = (50, 75)
    loss: str = "dq"
    epochs: int = 5
    max_batches: int | None = None
    time_budget: float | None = None
    batch_size: int = 4
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    proximal: float = 0.0
    checkpoint_frames: bool = False
    rollout_dropout: bool = False
    converged_only: bool = True
    eval_batch_size: int = 16
    seed: int = 0
    device: str | None = None
    dtype: str = "float32"
    checkpoint_every: int | None = 10
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)

    def __post_init__(self) -> None:
        if isinstance(self.pretrain, dict):
            self.pretrain = PretrainConfig.from_dict(self.pretrain)
        self.eta_grid = tuple(float(e) for e in self.eta_grid)
        self.tol_range = tuple(float(t) for t in self.tol_range)
        self.max_steps_range = tuple(int(m) for m in self.max_steps_range)
        if self.step not in step_rule_names():
            raise ValueError(f"step must be 'fixed', 'learned', 'decoder' or 'fire', not {self.step!r}.")
        if self.stopping not in ("fixed", "variable"):
            raise ValueError(f"stopping must be 'fixed' or 'variable', not {self.stopping!r}.")
        if self.loss not in ("dq", "mse"):
            raise ValueError(f"loss must be 'dq' or 'mse', not {self.loss!r}.")
        if self.eta is not None and not self.eta > 0:
            raise ValueError(f"eta must be positive, got {self.eta}.")
        if self.step == "fire" and self.eta is not None:
            raise ValueError("the FIRE step adapts its own time step and takes no eta; leave eta unset.")
        if self.eta is None and self.step != "fire" and (not self.eta_grid or min(self.eta_grid) <= 0):
            raise ValueError("eta_grid needs at least one positive step size when eta is not given.")
        for name in ("epochs", "batch_size", "max_steps", "eval_batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"FinetuneConfig.{name} must be at least 1, got {getattr(self, name)}.")
        if not (0 < self.tol_range[0] <= self.tol_range[1]):
            raise ValueError(f"tol_range must be (low, high) with 0 < low <= high, got {self.tol_range}.")
        if not (1 <= self.max_steps_range[0] <= self.max_steps_range[1]):
            raise ValueError(f"max_steps_range must be (low, high) with 1 <= low <= high, got {self.max_steps_range}.")
        if not self.lr > 0 or not self.step_lr > 0:
            raise ValueError("lr and step_lr must be positive.")
        if self.proximal < 0:
            raise ValueError(f"proximal must be >= 0, got {self.proximal}.")
        resolve_dtype(self.dtype)

    def to_dict(self) -> dict:
        """JSON-like dict (stored in checkpoints and state files)."""
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, d: dict) -> FinetuneConfig:
        """Inverse of :meth:`to_dict`."""
        return cls(**d)


# --------------------------------------------------------------- rollouts
def _loss_fn(name: str):
    return metrics.dq if name == "dq" else metrics.mse


@torch.no_grad()
def evaluate_rollouts(
    model,
    rule,
    data: RelaxationSet,
    *,
    tol: float,
    max_steps: int,
    batch_size: int,
    ctx: DistContext,
    index: torch.Tensor | None = None,
) -> dict:
    """Mean Dq, MSE, frames and converged fraction of rollouts over ``data`` (sharded by rank).

    The model and the rule run in eval mode (no dropout, no noise).
    """
    from ase_bptt.relax.relaxer import rollout

    modes = (model.training, rule.training)
    model.eval()
    rule.eval()
    index = torch.arange(len(data)) if index is None else index
    sums = torch.zeros(5, dtype=torch.float64)  # dq, mse, frames, converged, structures
    for chunk in torch.split(shard(index, ctx.rank, ctx.world_size), batch_size):
        batch, relaxed = data.take(chunk)
        res = rollout(model, batch, rule, tol=tol, max_steps=max_steps)
        batch = batch.to(res.positions.device, res.positions.dtype)
        relaxed = relaxed.to(res.positions)
        sums[0] += metrics.dq(res.positions, relaxed, batch).double().sum().cpu()
        sums[1] += metrics.mse(res.positions, relaxed, batch).double().sum().cpu()
        sums[2] += res.n_frames.double().sum().cpu()
        sums[3] += res.converged.double().sum().cpu()
        sums[4] += len(chunk)
    sums = ctx.all_reduce_sum(sums.to(ctx.device)).cpu()
    model.train(modes[0])
    rule.train(modes[1])
    n = max(float(sums[4]), 1.0)
    return {
        "dq": float(sums[0]) / n,
        "mse": float(sums[1]) / n,
        "frames": float(sums[2]) / n,
        "converged": float(sums[3]) / n,
    }


def grid_search_eta(
    model,
    data: RelaxationSet,
    etas,
    *,
    loss: str = "dq",
    tol: float = 1e-3,
    max_steps: int = 75,
    maxstep: float | None = 0.2,
    momentum: float = 0.0,
    anneal: float = 1.0,
    batch_size: int = 16,
    max_structures: int | None = None,
    seed: int = 0,
    ctx: DistContext | None = None,
    progress: bool = False,
    margin: float = 0.05,
) -> tuple[float, dict[str, float]]:
    """The step size BPTT starts from: the smallest eta whose mean loss of
    fixed-step rollouts over ``data`` is within ``margin`` (5%) of the best.

    Not simply the best: the eta curve is flat near the stability limit
    (2/largest Hessian eigenvalue, about 0.07 A^2/eV for silicon), and BPTT
    from the best eta there diverged within a few epochs where a smaller eta
    of nearly the same loss trained stably (measured: val-best 0.065 diverged,
    0.035 went from val Dq 3.43 to 3.08; examples/reproduce_paper.py).
    Use the TRAIN split: choosing eta on the test split would leak it.

    Returns:
        ``(eta, {str(eta): mean loss})``.
    """
    from ase_bptt.relax.steps import FixedStep

    ctx = DistContext() if ctx is None else ctx
    index = torch.arange(len(data))
    if max_structures is not None and len(data) > max_structures:
        index = torch.randperm(len(data), generator=seed_generator(seed, 31))[:max_structures].sort().values
    scores: dict[str, float] = {}
    from tqdm.auto import tqdm

    for eta in tqdm(
        list(etas),
        desc=f"eta grid ({len(index)} train structures)",
        leave=False,
        disable=not (progress and ctx.is_main),
        dynamic_ncols=True,
    ):
        rule = FixedStep(float(eta), momentum=momentum, anneal=anneal, maxstep=maxstep)
        result = evaluate_rollouts(
            model, rule, data, tol=tol, max_steps=max_steps, batch_size=batch_size, ctx=ctx, index=index
        )
        scores[repr(float(eta))] = result[loss]
    finite = {k: v for k, v in scores.items() if math.isfinite(v)}
    if not finite:
        raise ValueError(f"every step size in the grid {list(etas)} diverged; try smaller values.")
    limit = min(finite.values()) * (1.0 + margin)
    return min(float(k) for k, v in finite.items() if v <= limit), scores


def draw_stopping(config: FinetuneConfig, epoch: int, batch: int) -> tuple[float, int]:
    """``(tol, max_steps)`` for one training batch.

    Fixed stopping: ``config.tol`` and ``config.max_steps``. Variable stopping
    (the paper's ablation): tol log-uniform in ``config.tol_range`` and max
    steps uniform (inclusive) in ``config.max_steps_range``, drawn from a
    generator seeded with ``(seed, epoch, batch)``, so every rank and every
    resumed run draws the same values.
    """
    if config.stopping != "variable":
        return config.tol, config.max_steps
    gen = seed_generator(config.seed, epoch, batch, 23)
    lo, hi = (math.log10(t) for t in config.tol_range)
    tol = 10.0 ** (lo + (hi - lo) * float(torch.rand((), generator=gen, dtype=torch.float64)))
    max_steps = int(torch.randint(config.max_steps_range[0], config.max_steps_range[1] + 1, (), generator=gen))
    return tol, max_steps


def _current_eta(rule) -> float | None:
    eta = getattr(rule, "eta", None)
    if eta is None or callable(eta):
        return None
    try:
        return float(eta.detach()) if isinstance(eta, torch.Tensor) else float(eta)
    except (TypeError, ValueError):
        return None


# -------------------------------------------------------------------- main
def finetune(
    db, out, *, init=None, config: FinetuneConfig | None = None, progress: bool = True, overwrite: bool = False
) -> Path:
    """Fine-tune a pretrained model by BPTT through relaxations of the train split.

    Args:
        db: a :class:`~ase_bptt.data.db.TrajectoryDB` or its path.
        out: the tuned checkpoint to write (e.g. ``si.pt``); its resumable
            state goes next to it (``si.state.pt``).
        init: the pretrained checkpoint. None pretrains first with
            ``config.pretrain`` into ``<out stem>-pretrained.pt`` beside
            ``out`` (BPTT from a random model is not the method).
        config: settings (default :class:`FinetuneConfig`).
        progress: show progress bars (rank 0 only).
        overwrite: replace an ``out`` made with other settings or data.

    Returns:
        ``out``: the best model by mean val loss (epoch 0 = the pretrained
        model, if no epoch beat it), with its step rule, ``tol`` and
        ``max_steps`` in the checkpoint's ``relax`` settings.

    Raises:
        FileNotFoundError: ``db`` or ``init`` does not exist.
        EmptySplitError: no (converged) trajectory in the train split.
        ConfigMismatchError: ``out`` or its state belongs to another run.
        TrainingInterrupted: SIGINT; the state was saved.
    """
    config = FinetuneConfig() if config is None else config
    ctx = init_distributed(config.device)
    try:
        return _finetune(db, Path(out), init, config, progress, overwrite, ctx)
    finally:
        ctx.close()


def _finetune(db, out: Path, init, config: FinetuneConfig, progress: bool, overwrite: bool, ctx: DistContext) -> Path:
    from ase_bptt.models.checkpoint import load_model, save_checkpoint
    from ase_bptt.relax.relaxer import rollout
    from ase_bptt.relax.steps import make_step_rule

    dtype = resolve_dtype(config.dtype)
    device = ctx.device
    db = open_db(db)
    train = load_relaxations(db, "train", converged_only=config.converged_only)
    if train is None:
        raise EmptySplitError(
            f"{db.name} has no {'converged ' if config.converged_only else ''}trajectories in the train split; "
            "import or generate relaxations that reach the database's converged_fmax, and assign splits."
        )
    val = load_relaxations(db, "val", converged_only=True)
    if val is None and ctx.is_main:
        log.warning("%s has no converged val trajectories: the best epoch is chosen on the train split", db.name)

    if init is None:
        init = out.with_name(f"{out.stem}-pretrained.pt")
        if ctx.is_main:
            log.info(
                "no initial model given: pretraining first into %s "
                "(BPTT from a random model is not the method; see the paper's Fig. 5b)",
                init,
            )
        pretrain(
            db,
            init,
            config=replace(config.pretrain, device=config.device, dtype=config.dtype),
            progress=progress,
            overwrite=overwrite,
        )
    init = Path(init)
    if not init.exists():
        raise FileNotFoundError(f"initial model {init} does not exist; pretrain one first (ase-bptt pretrain).")

    header = run_header(config.to_dict(), train.traj_ids, file_digest(init))
    sfile, state, done = start_or_resume(out, header, kind="finetune", ctx=ctx, overwrite=overwrite)
    if done:
        return out

    model = load_model(init, device=device, dtype=dtype)
    model.check_species(train.initial.numbers, where="the train split")
    train = train.to(device, dtype)
    val = None if val is None else val.to(device, dtype)
    select = val if val is not None else train

    # ---- step rule: eta from a grid search on the TRAIN split (never test)
    grid: dict[str, Any] | None = None
    if state is not None:
        rule = make_step_rule(dict(state["step_rule"]))
        grid = state.get("eta_grid")
    else:
        eta = config.eta
        if eta is None and config.step != "fire":
            best_eta, scores = grid_search_eta(
                model,
                train,
                config.eta_grid,
                loss=config.loss,
                tol=config.tol,
                max_steps=config.max_steps,
                maxstep=config.maxstep,
                momentum=config.momentum,
                anneal=config.anneal,
                batch_size=config.eval_batch_size,
                max_structures=config.grid_structures,
                seed=config.seed,
                ctx=ctx,
                progress=progress,
            )
            grid = {"split": "train", "loss": config.loss, "scores": scores, "chosen": best_eta}
            eta = best_eta
            if ctx.is_main:
                log.info(
                    "eta grid search on the train split (mean %s): %s -> eta = %g",
                    config.loss,
                    ", ".join(f"{k}: {v:.4g}" for k, v in scores.items()),
                    eta,
                )
        rule = make_step_rule(
            config.step,
            eta=None if config.step == "fire" else eta,
            maxstep=config.maxstep,
            momentum=config.momentum,
            anneal=config.anneal,
            noise=config.noise,
        )
    rule = rule.to(device=device, dtype=dtype)

    model_params = [p for p in model.parameters() if p.requires_grad]
    step_params = list(rule.step_parameters())
    groups = [{"params": model_params, "lr": config.lr, "weight_decay": config.weight_decay}]
    if step_params:
        groups.append({"params": step_params, "lr": config.step_lr, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    anchor = [p.detach().clone() for p in model_params] if config.proximal > 0 else None
    all_params = model_params + step_params

    spec = LoopSpec(
        kind="finetune",
        state_file=sfile,
        n_items=len(train),
        batch_size=config.batch_size,
        epochs=config.epochs,
        seed=config.seed,
        max_steps=config.max_batches,
        time_budget=config.time_budget,
        checkpoint_every=config.checkpoint_every,
        patience=None,
        header=header,
    )
    loop = LoopState()
    best: dict[str, Any] = {"model": None, "rule": None}
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        best["model"], best["rule"] = state.get("best_model"), state.get("best_rule")
        loop = LoopState.from_dict(state["loop"])
        restore_rng(state)
        if ctx.is_main:
            log.info("resuming finetune from %s at epoch %d, batch %d", sfile, loop.epoch + 1, loop.batch)
    elif ctx.is_main:
        log.info(
            "BPTT fine-tuning on %d train trajectories (val: %d), step rule %s",
            len(train),
            0 if val is None else len(val),
            rule.to_dict().get("step"),
        )
    running = {"loss": 0.0, "frames": 0.0, "n": 0}
    loss_fn = _loss_fn(config.loss)

    def train_batch(epoch: int, b: int, index: torch.Tensor) -> dict | None:
        tol, max_steps = draw_stopping(config, epoch, b)
        noise_gen = seed_generator(config.seed, epoch, b, 29, ctx.rank, device=device)
        local, weight = local_share(index, ctx)
        batch, relaxed = train.take(local)
        model.train(config.rollout_dropout)
        rule.train()
        res = rollout(
            model,
            batch,
            rule,
            tol=tol,
            max_steps=max_steps,
            checkpoint_frames=config.checkpoint_frames,
            generator=noise_gen,
            sync_active=ctx.sync_active if ctx.enabled else None,
        )
        per = loss_fn(res.positions, relaxed, batch) * weight
        loss = per.sum() / len(index)
        if anchor is not None:
            prox = sum((p - a).pow(2).sum() for p, a in zip(model_params, anchor))
            loss = loss + (config.proximal / ctx.world_size) * prox
        loss.backward()
        ctx.sync_gradients(all_params)
        stats = ctx.all_reduce_sum(
            torch.stack([per.detach().double().sum(), res.n_frames.double().sum() * weight]).to(device)
        )
        mean_loss, mean_frames = float(stats[0]) / len(index), float(stats[1]) / len(index)
        norm = torch.nn.utils.clip_grad_norm_(model_params, config.grad_clip or float("inf"))
        finite = math.isfinite(mean_loss) and bool(torch.isfinite(norm))
        if step_params:
            step_norm = torch.nn.utils.clip_grad_norm_(step_params, config.step_grad_clip or float("inf"))
            finite = finite and bool(torch.isfinite(step_norm))
        if not finite:
            optimizer.zero_grad(set_to_none=True)
            if ctx.is_main:
                log.warning("finetune epoch %d batch %d: non-finite loss or gradient, batch skipped", epoch + 1, b + 1)
            return None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        running["loss"] += mean_loss
        running["frames"] += mean_frames
        running["n"] += 1
        out_metrics = {"loss": mean_loss, "frames": mean_frames}
        eta = _current_eta(rule)
        if eta is not None and step_params:
            out_metrics["eta"] = eta
        return out_metrics

    def evaluate(epoch: int) -> tuple[float, dict]:
        entry: dict[str, Any] = {}
        if running["n"]:
            entry["train_loss"] = running["loss"] / running["n"]
            entry["train_frames"] = running["frames"] / running["n"]
        running.update(loss=0.0, frames=0.0, n=0)
        result = evaluate_rollouts(
            model, rule, select, tol=config.tol, max_steps=config.max_steps, batch_size=config.eval_batch_size, ctx=ctx
        )
        prefix = "val" if val is not None else "train"
        entry.update({f"{prefix}_{k}": v for k, v in result.items()})
        eta = _current_eta(rule)
        if eta is not None:
            entry["eta"] = eta
        entry["elapsed_s"] = round(loop.elapsed, 2)
        metric = result[config.loss]
        return (metric if math.isfinite(metric) else float("inf")), entry

    def on_best() -> None:
        best["model"] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        best["rule"] = rule.to_dict()

    def payload() -> dict:
        return {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "step_rule": rule.to_dict(),
            "best_model": best["model"],
            "best_rule": best["rule"],
            "eta_grid": grid,
        }

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
            evaluate_first=True,
        )

    if ctx.is_main:
        final = copy.deepcopy(model)
        if best["model"] is not None:
            final.load_state_dict(best["model"])
        rule_dict = best["rule"] if best["rule"] is not None else rule.to_dict()
        improved = bool(loop.best_epoch)
        if not improved:
            log.warning(
                "no fine-tuning epoch beat the initial model on the %s split: exporting the initial "
                "model %s unchanged (with its step rule)",
                "val" if val is not None else "train",
                init,
            )
        metadata = {
            "kind": "finetune",
            "database": str(db.name),
            "data_fingerprint": header["data_fingerprint"],
            "train_trajectories": len(train),
            "val_trajectories": 0 if val is None else len(val),
            "selection_split": "val" if val is not None else "train",
            "config": header["config"],
            "config_hash": header["config_hash"],
            "init": str(init),
            "init_digest": header["init"],
            "eta_grid": grid,
            "history": loop.history,
            "best_epoch": loop.best_epoch,
            "best_metric": loop.best_metric,
            "improved": improved,
            "note": None if improved else "no epoch beat epoch 0: this is the initial model, unchanged",
            "stop_reason": loop.stop_reason,
            "skipped_batches": loop.skipped,
            "steps": loop.step,
            "world_size": ctx.world_size,
        }
        # The canonical layout (relax.steps.relax_settings): {"step": rule dict, "tol", "max_steps"}.
        relax = {"step": rule_dict, "tol": float(config.tol), "max_steps": int(config.max_steps)}
        save_checkpoint(out, final.eval(), relax=relax, metadata=metadata)
        log.info("wrote %s (best epoch %s of %d, %s)", out, loop.best_epoch, config.epochs, loop.stop_reason)
    ctx.barrier()
    return out
