"""Pretraining: force (and energy) matching on the frames of the train split.

The MLIP BPTT starts from (the paper's method fine-tunes a pretrained model):
AdamW, gradient clipping, a warmup + cosine (or one-cycle) learning-rate
schedule, early stopping on the validation force MAE, optional rotation and
translation augmentation. Every frame of the split is loaded once into padded
tensors; a batch is an index into them, so the inner loop does no per-frame
Python work. Resumable (see :mod:`ase_bptt.runs.loop`), and runs unchanged
under ``torchrun``.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

from ase_bptt.data.datasets import FrameDataset, load_frames
from ase_bptt.models.domain import DOMAIN_KEY, training_domain
from ase_bptt.relax.defaults import DEFAULT_ETA, DEFAULT_MAX_STEPS, DEFAULT_TOL
from ase_bptt.runs.config import AUTO, TrainConfig, option, seed_generator
from ase_bptt.runs.distributed import DistContext, shard_chunks
from ase_bptt.runs.errors import EmptySplitError
from ase_bptt.runs.loop import local_share, lr_factor
from ase_bptt.runs.run import TrainingRun
from ase_bptt.train.augment import augment, random_rotations

if TYPE_CHECKING:
    from ase_bptt.models.base import ForceModel

__all__ = ["ARCHITECTURES", "DEFAULT_MODEL", "PretrainConfig", "build_model", "force_metrics", "pretrain"]

#: ``PretrainConfig.model["model_name"]`` (``ase-bptt pretrain --model``) -> (module, model class, config class).
ARCHITECTURES = {
    "adapt": ("ase_bptt.models.adapt", "ADAPT", "ADAPTConfig"),
    "adapt-mi": ("ase_bptt.models.mi_attention", "MinImageADAPT", "MinImageADAPTConfig"),
}

log = logging.getLogger("ase_bptt.train")


#: The default recipe's model (ase_bptt.train.presets): ADAPT-MI, 32 wide, 2 blocks, 4 heads.
DEFAULT_MODEL: dict[str, Any] = {"model_name": "adapt-mi", "d_model": 32, "d_ff": 64, "n_layers": 2, "n_heads": 4}


@dataclass
class PretrainConfig(TrainConfig):
    """Settings of :func:`pretrain` (the defaults are the default training recipe, :mod:`ase_bptt.train.presets`).

    Each field's ``help`` says what it does; the attributes without one:
        model: the fresh model's config fields (dict, an ``ADAPTConfig`` or a
            ``MinImageADAPTConfig``); ``species`` defaults to the elements of
            the train split. The key ``model_name`` chooses the architecture
            (:data:`ARCHITECTURES`): ``"adapt-mi"`` (MinImageADAPTConfig fields,
            the default) or ``"adapt"`` (ADAPTConfig fields).
        weight_decay: AdamW weight decay (not applied to biases and norms).
        grad_clip: max gradient norm (None: no clipping).
        schedule: "cosine", "onecycle" or "constant".
        warmup: fraction of the steps spent warming up.
        min_lr_factor: final learning rate as a fraction of ``lr``.
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
        checkpoint_every: write the resumable state every this many batches.
    """

    recipe: str = option("default", help="Named training recipe whose settings the other options change")
    model: Any = field(default_factory=lambda: dict(DEFAULT_MODEL))
    epochs: int = option(1000, help="Most passes over the train frames")
    max_steps: int | str | None = option(
        AUTO,
        help="Optimiser steps of pretraining (off: --epochs decide)",
        flag="--train-steps",
        shown="auto: about 5 passes over the train frames, 1000 to 3000 (presets.py)",
        metavar="auto|off|N",
    )
    time_budget: float | None = option(
        None,
        help="Stop (keeping the best model) after this many seconds of training; the schedule follows "
        "the clock or the steps, whichever is further along",
        metavar="SECONDS",
    )
    batch_size: int = option(16, help="Frames per optimiser step (the global batch under torchrun)")
    lr: float = option(2e-3, help="Peak learning rate (AdamW)")
    weight_decay: float = 1e-2
    grad_clip: float | None = 10.0
    schedule: str = "cosine"
    warmup: float = 0.05
    min_lr_factor: float = 0.01
    patience: int | None = option(None, help="Early stopping after this many epochs without a better val force MAE")
    energy_weight: float = 0.1
    augment_rotation: bool = False
    augment_translation: bool = False
    standardisation_frames: int = 1000
    eval_frames: int | None = 500
    eval_batch_size: int = 64
    relax_eta: float = DEFAULT_ETA
    relax_tol: float = DEFAULT_TOL
    relax_max_steps: int = DEFAULT_MAX_STEPS
    seed: int = 0
    device: str | None = None
    dtype: str = "float32"
    checkpoint_every: int | None = 100

    def validate(self) -> None:
        if hasattr(self.model, "to_dict"):
            self.model = {**self.model.to_dict(), "model_name": getattr(self.model, "architecture", "adapt")}
        self.model = dict(self.model or {})
        name = str(self.model.pop("model_name", None) or "adapt").lower()
        if name not in ARCHITECTURES:
            raise self._fail("model", f"a dict whose model_name is one of {', '.join(map(repr, ARCHITECTURES))}")
        if name != "adapt":  # ADAPT configs keep the dict (and the run hash) they always had
            self.model["model_name"] = name
        self._auto_or(("max_steps",), self._at_least_one, off=True)
        self._at_least_one(("epochs", "batch_size", "standardisation_frames", "eval_batch_size", "relax_max_steps"))
        self._positive(("lr", "relax_eta", "relax_tol"))
        if self.time_budget is not None:
            self._positive(("time_budget",))
        if self.patience is not None:
            self._at_least_one(("patience",))
        self._one_of("schedule", ("cosine", "onecycle", "constant"))
        if not 0.0 <= self.warmup < 1.0:
            raise self._fail("warmup", "a fraction of the steps in [0, 1)")
        if self.energy_weight < 0:
            raise self._fail("energy_weight", ">= 0")


# ----------------------------------------------------------------- helpers
def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def force_metrics(model, frames: FrameDataset, index: torch.Tensor, *, batch_size: int, ctx: DistContext) -> dict:
    """Force MAE/RMSE (eV/A) and energy MAE (meV/atom) over frames ``index`` (sharded by rank)."""
    was_training = model.training
    model.eval()
    dev = frames.forces.device
    sums = torch.zeros(5, dtype=torch.float64, device=dev)  # |dF|, dF^2, components, |dE|/N, frames with E
    for chunk in shard_chunks(index, ctx, batch_size):
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


def architecture(name: str) -> tuple[Any, Any]:
    """The model class and config class ``PretrainConfig.model["model_name"]`` names."""
    import importlib

    module, model_cls, config_cls = ARCHITECTURES[name]
    loaded = importlib.import_module(module)
    return getattr(loaded, model_cls), getattr(loaded, config_cls)


def build_model(model: dict[str, Any]) -> ForceModel:
    """A fresh model from a ``PretrainConfig.model`` dict (``model_name`` picks the architecture, the
    rest is its config)."""
    model_config = dict(model)
    model_cls, config_cls = architecture(model_config.pop("model_name", "adapt"))
    return model_cls(config_cls.from_dict(model_config))


def load_initial_model(init, *, device=None, dtype=None) -> ForceModel:
    """The model a run starts from: a checkpoint file, or a universal MLIP's shipped weights for an ``init``
    that names one (``"chgnet"``, ``"sevenn"``; :func:`~ase_bptt.models.universal.universal_init`)."""
    from ase_bptt.models.checkpoint import load_model
    from ase_bptt.models.universal import universal_init

    if (spec := universal_init(init)) is not None:
        return spec.load(device=device, dtype=dtype)
    return cast("ForceModel", load_model(init, device=device, dtype=dtype))


def starts_universal(init) -> bool:
    """Whether a run from ``init`` tunes a universal MLIP: ``init`` names one (``"chgnet"``) or is a checkpoint
    of one (e.g. made by ``pretrain --init chgnet``)."""
    from ase_bptt.models.checkpoint import load_checkpoint
    from ase_bptt.models.universal import universal_init

    if init is None:
        return False
    if universal_init(init) is not None:
        return True
    return Path(init).is_file() and load_checkpoint(init)["model"].get("name") == "universal"


#: Train frames the energy reference of a universal model is fitted on (CHGNet: ~0.06 s a 64-atom frame).
ENERGY_REFERENCE_FRAMES = 64


def fit_energy_reference(model, frames: FrameDataset | None, seed: int, *, announce: bool) -> None:
    """Fit a universal MLIP's per-element energy reference to the train frames' energies, once (a model whose
    reference is already fitted, e.g. one pretrained here, keeps it); nothing for other models or without
    energies. See :meth:`~ase_bptt.models.universal.UniversalModel.fit_energy_reference`."""
    reference = getattr(model, "energy_reference", None)
    if reference is None or bool(reference.any()) or frames is None or not frames.has_energy:
        return
    n = min(ENERGY_REFERENCE_FRAMES, len(frames))
    batch, _, energy = frames.take(torch.randperm(len(frames), generator=seed_generator(seed, 17))[:n])
    assert energy is not None  # has_energy
    ref = next(iter(model.parameters()))
    fit = model.fit_energy_reference(batch.to(ref.device, ref.dtype), energy.to(ref.device, ref.dtype))
    if announce:
        log.info(
            "energy reference fitted per element on %d train frames: energy MAE %.1f -> %.1f meV/atom "
            "(the data's zero of energy is not the base model's)",
            n,
            fit["mae_before"],
            fit["mae_after"],
        )


def _build_model(config: PretrainConfig, train: FrameDataset, init, device, dtype):
    if init is not None:
        loaded = load_initial_model(init, device=device, dtype=dtype)
        loaded.check_species(train.batch.numbers, where="the train split")
        return loaded, False
    species = tuple(sorted({int(z) for z in train.batch.numbers[train.batch.mask].tolist()}))
    model_cfg = dict(config.model)
    if model_cfg.get("species") is None:
        model_cfg["species"] = species
    torch.manual_seed(config.seed)
    model = build_model(model_cfg)
    model.check_species(train.batch.numbers, where="the train split")
    return model.to(device=device, dtype=dtype), True


# -------------------------------------------------------------------- main
def pretrain(
    db,
    out,
    *,
    config: PretrainConfig | None = None,
    init=None,
    progress: bool = True,
    overwrite: bool = False,
    workers: int = 1,
) -> Path:
    """Pretrain a force model on the frames of the train split of ``db``.

    Args:
        db: a :class:`~ase_bptt.data.db.TrajectoryDB` or its path.
        out: the checkpoint to write (e.g. ``runs/pretrained.pt``); the
            resumable state goes next to it (``runs/pretrained.state.pt``).
        config: settings (default :class:`PretrainConfig`).
        init: a checkpoint to continue from instead of a fresh model (its
            standardisation is kept; ``config.model`` is then unused).
        progress: show progress bars (rank 0 only).
        overwrite: replace an existing ``out`` made with other settings or data
            (without it that is a :class:`ConfigMismatchError`).
        workers: CPU processes sharing the run (torch.distributed; ase_bptt.train.launch): 2 halves
            the wall time on a 2-core machine. Ignored under ``torchrun``, which has its own.

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
    from ase_bptt.train.presets import recipe_for_init

    config, note = recipe_for_init(PretrainConfig() if config is None else config, starts_universal(init))
    if note and int(os.environ.get("RANK", "0")) == 0:
        log.info(note)
    if workers > 1 and "WORLD_SIZE" not in os.environ:
        from ase_bptt.train.launch import run_distributed

        return run_distributed(
            "pretrain", db, Path(out), config, init, workers=workers, progress=progress, overwrite=overwrite
        )
    return PretrainRun(db, out, config, init, progress=progress, overwrite=overwrite).run()


class PretrainRun(TrainingRun):
    """Force (and energy) matching plugged into the run skeleton (see :func:`pretrain`)."""

    kind = "pretrain"
    stage = "pretraining (force matching)"
    config: PretrainConfig

    def load_data(self) -> None:
        self.train = load_frames(self.db, "train")
        if self.train is None:
            raise EmptySplitError(
                f"{self.db.name} has no frames in the train split; assign splits (TrajectoryDB.assign_splits) "
                "or import more trajectories."
            )
        self.val = load_frames(self.db, "val")
        if self.val is None and self.ctx.is_main:
            log.warning(
                "%s has no val split: the best epoch is chosen by train force MAE, no early stopping", self.db.name
            )
        from ase_bptt.train.presets import DataSummary, resolve_pretrain

        data = DataSummary(len(self.train.trajectories), len(self.train), self.train.has_energy)
        self.config, notes = resolve_pretrain(self.config, data)
        for note in notes if self.ctx.is_main and self.init is None else ():
            log.info(note)

    def build(self, state: dict | None) -> None:
        config, train, device = self.config, self.train, self.device
        self.model, fresh = _build_model(config, train, self.init, device, self.dtype)
        # Loss scales: constants from a seeded sample, so the loss is ~1 at the start.
        n_std = min(config.standardisation_frames, len(train))
        sample = torch.randperm(len(train), generator=seed_generator(config.seed, 11))[:n_std]
        s_batch, s_forces, s_energy = train.take(sample)
        if fresh:  # every architecture of ARCHITECTURES fits its standardisation from data
            cast(Any, self.model).fit_standardisation(s_batch, s_forces, s_energy)
        fit_energy_reference(self.model, train, config.seed, announce=self.ctx.is_main)
        self.force_var = float(s_forces[s_batch.mask].pow(2).mean().clamp(min=1e-6))
        self.use_energy = config.energy_weight > 0 and train.has_energy
        self.energy_var = 1.0
        if self.use_energy:
            per_atom = s_energy / s_batch.mask.sum(1)
            self.energy_var = float(per_atom.var(unbiased=False).clamp(min=1e-6)) if len(per_atom) > 1 else 1e-6
        elif config.energy_weight > 0 and self.ctx.is_main:
            log.info("the train split lacks energies for some frames: fitting forces only")

        self.train = train.to(device, self.dtype)
        self.val = None if self.val is None else self.val.to(device, self.dtype)
        self.ctx.broadcast_parameters(self.model)
        self.optimizer = torch.optim.AdamW(_param_groups(self.model, config.weight_decay), lr=config.lr)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.steps_per_epoch = math.ceil(len(train) / config.batch_size)
        self.total = self.steps_per_epoch * config.epochs
        if config.decided("max_steps") is not None:
            self.total = min(self.total, config.decided("max_steps"))
        self.warmup = int(round(config.warmup * self.total))
        self.eval_index = torch.randperm(len(train), generator=seed_generator(config.seed, 13))
        if config.eval_frames is not None:
            self.eval_index = self.eval_index[: config.eval_frames]
        self.running = {"loss": 0.0, "n": 0}

    def limits(self) -> tuple[int | None, int | None]:
        return self.config.decided("max_steps"), self.config.patience if self.val is not None else None

    def log_start(self) -> None:
        log.info(
            "pretraining on %d frames from %d trajectories (%d steps per epoch); val: %d frames",
            len(self.train),
            len(self.train.trajectories),
            self.steps_per_epoch,
            0 if self.val is None else len(self.val),
        )

    def _lr(self) -> float:
        config, position = self.config, self.loop.step
        if config.time_budget:
            # With a time budget the run may end long before ``total`` steps: follow
            # whichever is further along, the steps or the clock, so warmup and decay
            # fit in the budget.
            position = max(position, int(self.total * min(self.loop.elapsed / config.time_budget, 1.0)))
        factor = lr_factor(
            position, self.total, schedule=config.schedule, warmup=self.warmup, min_factor=config.min_lr_factor
        )
        return config.lr * factor

    def train_batch(self, epoch: int, b: int, index: torch.Tensor) -> dict | None:
        config, ctx, device = self.config, self.ctx, self.device
        lr = self._lr()
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        gen = seed_generator(config.seed, epoch, b, 17)
        rotations = random_rotations(len(index), gen) if config.augment_rotation else None
        shifts = None
        if config.augment_translation:
            shifts = torch.rand(len(index), 3, generator=gen, dtype=torch.float64)
        local, weight = local_share(torch.arange(len(index)), ctx)
        batch, forces, energy = self.train.take(index[local])
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
        self.model.train()
        out = self.model(batch)
        diff = (out.forces - forces) * batch.mask.unsqueeze(-1)
        loss = weight * diff.pow(2).sum() / (float(counts[0]) * self.force_var)
        if self.use_energy and out.energy is not None:
            err = (out.energy - energy) / batch.mask.sum(1)
            loss = loss + weight * config.energy_weight * err.pow(2).sum() / (float(counts[1]) * self.energy_var)
        loss.backward()
        ctx.sync_gradients(self.params)
        total_loss = float(ctx.all_reduce_sum(loss.detach().double().reshape(1)))
        norm = torch.nn.utils.clip_grad_norm_(self.params, config.grad_clip if config.grad_clip else float("inf"))
        if not (math.isfinite(total_loss) and bool(torch.isfinite(norm))):
            self.optimizer.zero_grad(set_to_none=True)
            return None
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.running["loss"] += total_loss
        self.running["n"] += 1
        return {"loss": total_loss, "lr": lr}

    def validate(self, epoch: int) -> tuple[float, dict]:
        entry: dict[str, Any] = {"lr": self.optimizer.param_groups[0]["lr"]}
        if self.running["n"]:
            entry["train_loss"] = self.running["loss"] / self.running["n"]
        self.running.update(loss=0.0, n=0)
        scored = {"train": (self.train, self.eval_index), "val": (self.val, None)}
        for split, (frames, index) in scored.items():
            if frames is None:
                continue
            index = torch.arange(len(frames)) if index is None else index
            result = force_metrics(self.model, frames, index, batch_size=self.config.eval_batch_size, ctx=self.ctx)
            entry.update({f"{split}_{name}": value for name, value in result.items()})
        entry["elapsed_s"] = round(self.loop.elapsed, 2)
        metric = entry["val_force_mae"] if self.val is not None else entry["train_force_mae"]
        return metric, entry

    def export_settings(self) -> tuple[dict, dict]:
        from ase_bptt.relax.steps import FixedStep, relax_settings

        config = self.config
        relax = relax_settings(FixedStep(config.relax_eta), tol=config.relax_tol, max_steps=config.relax_max_steps)
        extra = {
            "train_trajectories": len(self.train.trajectories),
            "train_frames": len(self.train),
            "val_frames": 0 if self.val is None else len(self.val),
            # What the model was trained on, so calculators can warn outside it (models/domain.py).
            DOMAIN_KEY: training_domain(self.train.batch),
        }
        return relax, extra
