"""BPTT fine-tuning (the paper's Section 3): train through whole relaxations.

Each optimiser step takes a batch of trajectories, unrolls a relaxation from
their initial structures with autograd on (:func:`ase_bptt.relax.relaxer.rollout`),
scores the final positions against the relaxed reference with Dq
(mass-weighted, minimum image) or MSE, backpropagates through every frame and
updates the model (and a learned step rule). The controls are the paper's:
fixed / learned / decoder / FIRE step rule, momentum, annealing, exploration
noise, fixed or variable stopping, gradient clipping or a proximal term to the
pretrained weights, plus an optional force-matching term (train/objectives.py).
The mean val Dq is measured before training (epoch 0) and after every epoch (or
every ``eval_every`` steps); the best model is exported, with the step rule it
was tuned with, as an ordinary checkpoint for
:class:`~ase_bptt.calculator.BPTTCalculator`, unless it loses to the pretrained
model's best relaxation on val (train/export.py, which also chooses how the tuned model relaxes). Patience, the LR schedule and
augmentation reuse pretraining's (:mod:`~ase_bptt.runs.loop`, :mod:`~ase_bptt.train.augment`).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ase_bptt.backends.registry import backend_names
from ase_bptt.data.datasets import load_frames, load_relaxations, open_db
from ase_bptt.models.checkpoint import load_checkpoint
from ase_bptt.models.domain import DOMAIN_KEY, merge_training_domains, read_training_domain, training_domain
from ase_bptt.models.universal import UniversalInit, universal_init
from ase_bptt.relax.defaults import DEFAULT_ETA_GRID
from ase_bptt.runs.config import ConfigError, seed_generator
from ase_bptt.runs.errors import EmptySplitError
from ase_bptt.runs.loop import local_share, lr_factor
from ase_bptt.runs.run import TrainingRun
from ase_bptt.train.augment import augment_rollouts, cube_applies, rollout_draws
from ase_bptt.train.export import export_decision, refit_energy_head
from ase_bptt.train.finetune_config import FinetuneConfig
from ase_bptt.train.objectives import ForceTerm, check_energy_term, structure_weights, weight_summary
from ase_bptt.train.presets import data_summary, resolve_finetune
from ase_bptt.train.pretrain import (
    build_model,
    fit_energy_reference,
    load_initial_model,
    pretrain,
    starts_universal,
)
from ase_bptt.train.rollouts import current_eta, draw_stopping, evaluate_rollouts, grid_search_eta, loss_fn

if TYPE_CHECKING:
    from ase_bptt.relax.base import StepRule

__all__ = [
    "FinetuneConfig",
    "finetune",
    "grid_search_eta",
    "evaluate_rollouts",
    "draw_stopping",
    "freeze_parameters",
    "DEFAULT_ETA_GRID",
]

log = logging.getLogger("ase_bptt.train")


def freeze_parameters(model: torch.nn.Module, prefixes: tuple[str, ...], step: str | StepRule = "fixed") -> int:
    """Stop gradients to the parameters named ``prefix`` or ``prefix.*`` (``FinetuneConfig.freeze``) and
    return how many model scalars stay trainable (0 is fine when the step rule ``step`` has parameters
    of its own, as a learned step does). ConfigError for a prefix matching no parameter (the message
    names the model's top-level parameter groups) and for a freeze that leaves nothing to tune."""
    from ase_bptt.relax.registry import make_step_rule

    def under(name: str, prefix: str) -> bool:
        return name == prefix or name.startswith(prefix + ".")

    names = [name for name, _ in model.named_parameters()]
    for prefix in prefixes:
        if not any(under(name, prefix) for name in names):
            tops = ", ".join(dict.fromkeys(n.split(".")[0] for n in names))
            raise ConfigError(f"freeze: {prefix!r} names no parameter of this model; its groups are {tops}")
    trainable = 0
    for name, p in model.named_parameters():
        if any(under(name, prefix) for prefix in prefixes):
            p.requires_grad_(False)
        trainable += p.numel() if p.requires_grad else 0
    rule = make_step_rule(step)
    if not trainable and not list(rule.step_parameters()):
        raise ConfigError(
            f"freeze: {', '.join(prefixes)} leaves nothing to tune (no model parameter, and the "
            f"{rule.name} step rule has none of its own)"
        )
    return trainable


# -------------------------------------------------------------------- main
def finetune(
    db,
    out,
    *,
    init=None,
    config: FinetuneConfig | None = None,
    progress: bool = True,
    overwrite: bool = False,
    workers: int | None = None,
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
        workers: CPU processes: the ranks sharing the pretraining and the BPTT run (torch.distributed;
            ase_bptt.train.launch), or the candidates raced on val in parallel (``config.candidates``).
            None or 1: this process alone.

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
    from ase_bptt.train.candidates import race
    from ase_bptt.train.presets import candidate_configs, recipe_for_init

    config, note = recipe_for_init(FinetuneConfig() if config is None else config, starts_universal(init))
    if note and int(os.environ.get("RANK", "0")) == 0:
        log.info(note)
    runs = candidate_configs(config)
    first = FinetuneRun(db, out, runs[0][1], init, progress=progress, overwrite=overwrite)
    # What the data and the options say is one line before pretraining or racing, for every candidate.
    first.preflight(*(c for _, c in runs[1:]))
    workers = 1 if workers is None or "WORLD_SIZE" in os.environ else workers
    init = pretrained_init(db, Path(out), config, init, progress=progress, overwrite=overwrite, workers=workers)
    if len(runs) == 1 and workers > 1:
        from ase_bptt.train.launch import run_distributed

        return run_distributed(
            "finetune", db, Path(out), first.config, init, workers=workers, progress=progress, overwrite=overwrite
        )
    if len(runs) == 1:
        first.init = init
        return first.run()
    return race(db, out, runs, init, progress=progress, overwrite=overwrite, workers=workers)


def pretrained_init(
    db, out: Path, config: FinetuneConfig, init, *, progress: bool, overwrite: bool, workers: int = 1
) -> Path | UniversalInit:
    """The model BPTT starts from: ``init`` (a checkpoint, or a universal MLIP's name: ``"chgnet"``), or, when
    None, a model pretrained first with ``config.pretrain`` (and the run's seed, device and dtype) into
    ``<out stem>-pretrained.pt``."""
    if init is None:
        init = out.with_name(f"{out.stem}-pretrained.pt")
        if int(os.environ.get("RANK", "0")) == 0:  # every rank would say it under torchrun
            log.info(
                "no initial model given: pretraining first into %s "
                "(BPTT from a random model is not the method; see the paper's Fig. 5b)",
                init,
            )
        pretrain(
            db,
            init,
            config=replace(config.pretrain, device=config.device, dtype=config.dtype, seed=config.seed),
            progress=progress,
            overwrite=overwrite,
            workers=workers,
        )
    if (spec := universal_init(init)) is not None:
        return spec
    init = Path(init)
    if not init.exists():
        raise FileNotFoundError(
            f"initial model {init} does not exist: give a checkpoint (ase-bptt pretrain makes one) or a universal "
            f"MLIP ({', '.join(backend_names())})"
        )
    return init


class FinetuneRun(TrainingRun):
    """BPTT through relaxations plugged into the run skeleton (see :func:`finetune`)."""

    kind = "finetune"
    stage = "BPTT"
    evaluate_first = True
    _announced = False  # the data-aware choices were logged (preflight, then the run: once)
    best_keys = ("model", "rule")
    config: FinetuneConfig

    def preflight(self, *others: FinetuneConfig) -> None:
        """Load the splits, decide the data-aware settings (announcing them once) and check the
        options, this run's and ``others``', against the data and the model, before anything is written."""
        from ase_bptt.runs.distributed import DistContext

        self.ctx = DistContext(rank=int(os.environ.get("RANK", "0")))  # no process group yet: only who logs
        self.db = open_db(self.db_arg)
        self.load_data()
        model = None
        for config in (self.config, *(resolve_finetune(c, self.data)[0] for c in others)):
            check_energy_term(self.frames, config.decided("energy_weight"))
            structure_weights(self.train.labels, config.label_weights)
            if config.freeze:
                if model is None:
                    model = build_model(config.pretrain.model) if self.init is None else load_initial_model(self.init)
                freeze_parameters(model, config.freeze, config.step)

    def load_data(self) -> None:
        config, db = self.config, self.db
        self.train = load_relaxations(db, "train", converged_only=config.converged_only)
        if self.train is None:
            raise EmptySplitError(
                f"{db.name} has no {'converged ' if config.converged_only else ''}trajectories in the train split; "
                "import or generate relaxations that reach the database's converged_fmax, and assign splits."
            )
        self.val = load_relaxations(db, "val", converged_only=True)
        if self.val is None and self.ctx.is_main:
            log.warning("%s has no converged val trajectories: the best epoch is chosen on the train split", db.name)
        self.frames = load_frames(db, "train")  # the force and energy terms' frames
        self.data = data_summary(self.train, self.frames)
        self.config, notes = resolve_finetune(config, self.data)
        for note in notes if self.ctx.is_main and not self._announced else ():
            log.info(note)
        self._announced = True

    def prepare_init(self) -> Path | UniversalInit:
        return pretrained_init(
            self.db, self.out, self.config, self.init, progress=self.progress, overwrite=self.overwrite
        )

    def build(self, state: dict | None) -> None:
        from ase_bptt.relax.steps import make_step_rule

        config, device, dtype = self.config, self.device, self.dtype
        self.model = load_initial_model(self.init, device=device, dtype=dtype)
        if config.decided("energy_weight") > 0:
            fit_energy_reference(self.model, self.frames, config.seed, announce=self.ctx.is_main)
        self.model.check_species(self.train.initial.numbers, where="the train split")
        self.train = self.train.to(device, dtype)
        self.val = None if self.val is None else self.val.to(device, dtype)
        self.grid: dict[str, Any] | None = None
        if state is not None:
            rule = make_step_rule(dict(state["step_rule"]))
            self.grid = state.get("eta_grid")
        else:
            eta = config.eta
            if eta is None and config.step != "fire":
                eta = self._search_eta()
            rule = make_step_rule(
                config.step,
                eta=None if config.step == "fire" else eta,
                maxstep=config.maxstep,
                momentum=config.momentum,
                anneal=config.anneal,
                noise=config.noise,
            )
        self.rule = rule.to(device=device, dtype=dtype)

        trainable = freeze_parameters(self.model, config.freeze, self.rule)
        if config.freeze and self.ctx.is_main:
            total = sum(p.numel() for p in self.model.parameters())
            log.info("freeze %s: %d of %d parameters tuned", ", ".join(config.freeze), trainable, total)
        self.model_params = [p for p in self.model.parameters() if p.requires_grad]
        self.step_params = list(self.rule.step_parameters())
        # The model's group comes first even when empty (all frozen): train_batch scales the groups in order.
        groups = [{"params": self.model_params, "lr": config.lr, "weight_decay": config.weight_decay}]
        if self.step_params:
            groups.append({"params": self.step_params, "lr": config.step_lr, "weight_decay": 0.0})
        self.optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
        self.anchor = [p.detach().clone() for p in self.model_params] if config.proximal > 0 else None
        self.running = {"loss": 0.0, "frames": 0.0, "n": 0}
        self.loss_fn = loss_fn(config.loss)
        self.total = config.epochs * math.ceil(len(self.train) / config.batch_size)
        self.total = min(self.total, config.decided("max_batches") or self.total)
        if config.augment_cubic and self.ctx.is_main and (odd := int((~cube_applies(self.train.initial)).sum())):
            log.info("augment_cubic: %d of %d train structures have no cubic cell, not moved", odd, len(self.train))
        self.forces = ForceTerm.from_config(
            self.db, config, device=device, dtype=dtype, model=self.model, frames=self.frames
        )
        weights = structure_weights(self.train.labels, config.label_weights)
        self.structure_weights = None if weights is None else weights.to(device, dtype)
        if weights is not None and self.ctx.is_main:
            log.info("label_weights: %s", weight_summary(self.train.labels, weights))

    def _search_eta(self) -> float:
        """The initial eta: a grid search on the TRAIN split (never test)."""
        config = self.config
        eta, scores = grid_search_eta(
            self.model,
            self.train,
            config.eta_grid,
            loss=config.loss,
            tol=config.decided("tol"),
            max_steps=config.decided("max_steps"),
            maxstep=config.maxstep,
            momentum=config.momentum,
            anneal=config.anneal,
            batch_size=config.eval_batch_size,
            max_structures=config.grid_structures,
            seed=config.seed,
            ctx=self.ctx,
            progress=self.progress,
        )
        self.grid = {"split": "train", "loss": config.loss, "scores": scores, "chosen": eta}
        if self.ctx.is_main:
            log.info(
                "eta grid search on the train split (mean %s): %s -> eta = %g",
                config.loss,
                ", ".join(f"{k}: {v:.4g}" for k, v in scores.items()),
                eta,
            )
        return eta

    def limits(self) -> tuple[int | None, int | None]:
        return self.config.decided("max_batches"), self.config.patience if self.val is not None else None

    def lr_factor(self, step: int) -> float:
        """The learning-rate multiplier of optimiser step ``step`` (0-based)."""
        config = self.config
        return lr_factor(
            step, self.total, schedule=config.lr_schedule, warmup=config.warmup, min_factor=config.min_lr_factor
        )

    def log_start(self) -> None:
        log.info(
            "BPTT fine-tuning on %d train trajectories (val: %d), step rule %s",
            len(self.train),
            0 if self.val is None else len(self.val),
            self.rule.to_dict().get("step"),
        )

    def train_batch(self, epoch: int, b: int, index: torch.Tensor) -> dict | None:
        from ase_bptt.relax.relaxer import rollout

        config, ctx, device, model = self.config, self.ctx, self.device, self.model
        tol, max_steps = draw_stopping(config, epoch, b)
        noise_gen = seed_generator(config.seed, epoch, b, 29, ctx.rank, device=device)
        factor = self.lr_factor(self.loop.step)
        for group, base in zip(self.optimizer.param_groups, (config.lr, config.step_lr)):
            group["lr"] = base * factor
        shares, weight = local_share(torch.arange(len(index)), ctx)  # positions in the global batch
        batch, relaxed = self.train.take(index[shares])
        if config.augment_translation or config.augment_cubic:
            draws = rollout_draws(config.seed, epoch, b, len(index), config.augment_translation, config.augment_cubic)
            batch, relaxed = augment_rollouts(batch, relaxed, *(None if d is None else d[shares] for d in draws))
        model.train(config.rollout_dropout)
        self.rule.train()
        res = rollout(
            model,
            batch,
            self.rule,
            tol=tol,
            max_steps=max_steps,
            checkpoint_frames=config.checkpoint_frames,
            generator=noise_gen,
            sync_active=ctx.sync_active if ctx.enabled else None,
        )
        per = self.loss_fn(res.positions, relaxed, batch) * weight
        if self.structure_weights is not None:
            per = per * self.structure_weights[index[shares].to(self.structure_weights.device)]
        loss = per.sum() / len(index)
        if self.anchor is not None:
            prox = sum((p - a).pow(2).sum() for p, a in zip(self.model_params, self.anchor))
            loss = loss + (config.proximal / ctx.world_size) * prox
        force_mse = energy_mse = 0.0
        if self.forces is not None:
            reference_term, force_mse, energy_mse = self.forces.loss(model, epoch, b, ctx)
            loss = loss + reference_term
        loss.backward()
        ctx.sync_gradients(self.model_params + self.step_params)
        stats = ctx.all_reduce_sum(
            torch.stack([per.detach().double().sum(), res.n_frames.double().sum() * weight]).to(device)
        )
        mean_loss, mean_frames = float(stats[0]) / len(index), float(stats[1]) / len(index)
        norm = torch.nn.utils.clip_grad_norm_(self.model_params, config.grad_clip or float("inf"))
        finite = math.isfinite(mean_loss) and bool(torch.isfinite(norm)) and math.isfinite(force_mse + energy_mse)
        if self.step_params:
            step_norm = torch.nn.utils.clip_grad_norm_(self.step_params, config.step_grad_clip or float("inf"))
            finite = finite and bool(torch.isfinite(step_norm))
        if not finite:
            self.optimizer.zero_grad(set_to_none=True)
            if ctx.is_main:
                log.warning("finetune epoch %d batch %d: non-finite loss or gradient, batch skipped", epoch + 1, b + 1)
            return None
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.running["loss"] += mean_loss
        self.running["frames"] += mean_frames
        self.running["n"] += 1
        out_metrics = {"loss": mean_loss, "frames": mean_frames}
        if self.forces is not None:
            self.forces.record(force_mse, energy_mse)
            out_metrics["force_mse"] = force_mse
            if config.decided("energy_weight") > 0:
                out_metrics["energy_mse"] = energy_mse
        eta = current_eta(self.rule)
        if eta is not None and self.step_params:
            out_metrics["eta"] = eta
        return out_metrics

    def validate(self, epoch: int) -> tuple[float, dict]:
        config, running = self.config, self.running
        entry: dict[str, Any] = {}
        if running["n"]:
            entry["train_loss"] = running["loss"] / running["n"]
            entry["train_frames"] = running["frames"] / running["n"]
        running.update(loss=0.0, frames=0.0, n=0)
        select = self.val if self.val is not None else self.train
        result = evaluate_rollouts(
            self.model,
            self.rule,
            select,
            tol=config.decided("tol"),
            max_steps=config.decided("max_steps"),
            batch_size=config.eval_batch_size,
            ctx=self.ctx,
        )
        entry.update({f"{self._selection_split}_{k}": v for k, v in result.items()})
        if self.forces is not None:
            entry.update(self.forces.history_entry(self.model, self.ctx, batch_size=config.eval_batch_size))
        eta = current_eta(self.rule)
        if eta is not None:
            entry["eta"] = eta
        entry["elapsed_s"] = round(self.loop.elapsed, 2)
        metric = result[config.loss]
        return (metric if math.isfinite(metric) else float("inf")), entry

    @property
    def _selection_split(self) -> str:
        return "val" if self.val is not None else "train"

    def best_extras(self) -> dict:
        return {"rule": self.rule.to_dict()}

    def state_extras(self) -> dict:
        return {"step_rule": self.rule.to_dict(), "eta_grid": self.grid}

    def export_settings(self) -> tuple[dict, dict]:
        loop, decision = self.loop, self.decision
        improved = bool(loop.best_epoch)
        if not improved:
            log.warning(
                "no fine-tuning epoch beat the initial model on the %s split: exporting the initial model %s",
                self._selection_split,
                self.init,
            )
        extra = {
            "train_trajectories": len(self.train),
            "val_trajectories": 0 if self.val is None else len(self.val),
            "selection_split": self._selection_split,
            "eta_grid": self.grid,
            "improved": improved,
            "note": decision.note or (None if improved else "no epoch beat epoch 0: the initial model, unchanged"),
            **decision.records,
            # The pretrained model's domain widened by the structures tuned on (models/domain.py).
            DOMAIN_KEY: merge_training_domains(
                None if universal_init(self.init) else read_training_domain(load_checkpoint(self.init), str(self.init)),
                training_domain(self.train.initial),
            ),
        }
        return decision.relax, extra

    def before_export(self) -> None:
        import copy

        val = self.val if self._selection_split == "val" else None
        tuned = copy.deepcopy(self.model).eval()
        if self.best["model"] is not None:
            tuned.load_state_dict(self.best["model"])
        rule = self.best["rule"] if self.best["rule"] is not None else self.rule.to_dict()
        decision = export_decision(self.init, tuned, rule, val, self.config, ctx=self.ctx, dtype=self.dtype)
        if decision.weights is None and self.config.refit_energy:
            frames = self.forces.val if self.forces is not None else load_frames(self.db, "val")
            decision.records["energy_refit"] = record = refit_energy_head(tuned, self.frames, frames)
            if record.get("kept"):
                decision.weights = {k: v.detach().cpu().clone() for k, v in tuned.state_dict().items()}
                if self.ctx.is_main:
                    log.info(
                        "energy head refit to the train frames' energies: val energy MAE %.4g -> %.4g meV/atom",
                        *(record.get(f"val_mae_{k}", record.get(f"train_mae_{k}")) for k in ("before", "after")),
                    )
        self.decision = decision

    def export_weights(self) -> dict | None:
        return self.decision.weights or self.best["model"]
