"""Training recipes: every setting of a pretrain -> BPTT run, named, in one place.

``ase-bptt finetune traj.db -o model.pt`` with no options runs the **default**
recipe, and so does ``finetune(db, out)`` in Python: its settings are the
defaults of :class:`~ase_bptt.train.pretrain.PretrainConfig` and
:class:`~ase_bptt.train.finetune_config.FinetuneConfig` themselves, so the
command line, the Python API, ``ase-bptt demo`` and the studies read one set
of numbers. Other recipes change some of them (:data:`TRAINING_RECIPES`,
``--recipe NAME``), and every option the user gives changes them again.

The default recipe, and why (measured on 2 cores; docs/results.md):

* ADAPT-MI, 32 wide, 2 blocks, 4 heads (``pretrain.DEFAULT_MODEL``): translation
  invariant, so a defect at any site of the cell is one problem; on random-site
  silicon it reached val force MAE 0.050 eV/A against 0.147 for ADAPT of the
  same width and fixed-step val Dq 1.26 against 3.40.
* Pretraining is short and steady: about 5 passes over the train frames
  (1000-3000 optimiser steps of 16 frames, :func:`pretrain_steps`), lr 2e-3,
  cosine schedule, no early stopping. The old default (50 epochs with
  patience 10 of a 64-wide model) spent 14 of 16 minutes here and tuned worse.
* BPTT through ASE's FIRE (``step="fire"``, tol 1e-5: FIRE's first steps are
  tiny and 1e-3 stopped it after one frame), rollouts of 1.2x the train
  relaxations' 90th-percentile length (:func:`rollout_frames`: 75 frames
  stopped half the fcc relaxations half way), 4 relaxations per step, lr 5e-4
  on a cosine schedule (smoother and lower val Dq than a constant lr: 1.015
  against 1.043 on the GaAs set), val scored every 15 steps and the best kept,
  about 150 optimiser steps for 100 train relaxations (:func:`bptt_steps`).
* A force term (weight 10) and, when the data has energies, an energy term
  (weight 30) keep the tuned model a usable force field: without them the
  exported calculator's force MAE rose 3.5x and its energy MAE 10x; the
  exported energy head is refit to the train energies (train/export.py).
* Chosen on val every run: how the tuned model relaxes (its own FIRE rule, or
  ASE's FIRE to fmax 0.05) and whether the refit energy head is kept. Racing
  more (:attr:`FinetuneConfig.candidates`) is an option, not the default: the
  learning rate 5e-4 beat 1e-3 on all three data sets of docs/results.md, and
  FIRE beat the fixed step, so both cores go to the one run
  (ase_bptt.train.launch).

Settings marked ``"auto"`` are decided from the data when a run starts
(:func:`resolve_pretrain`, :func:`resolve_finetune`), each decision announced in
one log line and stored, decided, in the checkpoint.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from ase_bptt.relax.defaults import UNIVERSAL_ETA_GRID
from ase_bptt.runs.config import AUTO, ConfigError
from ase_bptt.train.finetune_config import FinetuneConfig
from ase_bptt.train.pretrain import PretrainConfig

__all__ = [
    "TrainingRecipe",
    "TRAINING_RECIPES",
    "register_training_recipe",
    "training_recipe_names",
    "pretrain_config",
    "finetune_config",
    "DataSummary",
    "pretrain_steps",
    "bptt_steps",
    "resolve_pretrain",
    "resolve_finetune",
    "candidate_configs",
    "recipe_for_init",
    "FIRE_TOL",
    "STEP_TOL",
]

log = logging.getLogger("ase_bptt.train")

#: BPTT's energy term when every train frame has an energy (amu^1/2 A per (eV/atom)^2).
ENERGY_WEIGHT = 30.0
#: Stopping tolerance of a FIRE rollout (A): FIRE's first steps are tiny, and 1e-3 stopped it after one
#: frame (BPTT then learned forces so small that FIRE never moved; studies/interstitial_limits.py).
FIRE_TOL = 1e-5
#: Stopping tolerance of the other step rules (A).
STEP_TOL = 1e-3


@dataclass(frozen=True)
class TrainingRecipe:
    """A named set of changes to the training configs' defaults.

    Attributes:
        name: what ``--recipe`` calls it.
        summary: one line for ``--help`` and the docs.
        pretrain: :class:`PretrainConfig` fields it changes (``model`` replaces the whole model dict).
        finetune: :class:`FinetuneConfig` fields it changes (not ``pretrain``).
    """

    name: str
    summary: str
    pretrain: Mapping[str, Any] = field(default_factory=dict)
    finetune: Mapping[str, Any] = field(default_factory=dict)


TRAINING_RECIPES: dict[str, TrainingRecipe] = {}


def register_training_recipe(recipe: TrainingRecipe) -> TrainingRecipe:
    """Add a recipe to :data:`TRAINING_RECIPES` (its fields are checked by building its configs)."""
    TRAINING_RECIPES[recipe.name] = recipe
    try:
        finetune_config(recipe.name)
    except ConfigError:
        del TRAINING_RECIPES[recipe.name]
        raise
    return recipe


def training_recipe_names() -> tuple[str, ...]:
    """The names ``--recipe`` accepts."""
    return tuple(TRAINING_RECIPES)


def _recipe(name: str) -> TrainingRecipe:
    if name not in TRAINING_RECIPES:
        raise ConfigError(f"unknown training recipe {name!r}; choose one of {', '.join(TRAINING_RECIPES)}")
    return TRAINING_RECIPES[name]


def pretrain_config(recipe: str = "default", **changes: Any) -> PretrainConfig:
    """The recipe's :class:`PretrainConfig`, with ``changes`` on top (a ``model`` dict is merged into the
    recipe's model: ``{"d_model": 64}`` keeps its architecture; a new ``model_name`` starts from that
    architecture's own defaults)."""
    base = {**_recipe(recipe).pretrain}
    model = dict(base.pop("model", None) or PretrainConfig().model)
    new_model = dict(changes.pop("model", None) or {})
    if "model_name" in new_model and new_model["model_name"] != model.get("model_name", "adapt"):
        model = {}
    return PretrainConfig(**{**base, **changes, "model": {**model, **new_model}, "recipe": recipe})


def finetune_config(recipe: str = "default", **changes: Any) -> FinetuneConfig:
    """The recipe's :class:`FinetuneConfig`, with ``changes`` on top (``pretrain``: a dict of
    :func:`pretrain_config` changes). A setting changed here is the user's: the recipe no longer races
    candidates for it on val."""
    pre = changes.pop("pretrain", None) or {}
    pretrain = pre if isinstance(pre, PretrainConfig) else pretrain_config(recipe, **dict(pre))
    settings = {**_recipe(recipe).finetune, **changes, "pretrain": pretrain, "recipe": recipe}
    if "candidates" not in changes:
        raced = settings.get("candidates", _default_candidates())
        settings["candidates"] = {k: v for k, v in raced.items() if k not in changes}
    return FinetuneConfig(**settings)


def _default_candidates() -> dict[str, tuple[Any, ...]]:
    return FinetuneConfig().candidates


register_training_recipe(
    TrainingRecipe(
        "default",
        "the best measured: ADAPT-MI, short pretraining, BPTT through FIRE with force and energy terms, "
        "the learning rate and the exported relaxation chosen on val",
    )
)
register_training_recipe(
    TrainingRecipe(
        "paper",
        "the paper's settings: ADAPT (64 wide, 3 blocks) by force matching, then BPTT through 75-frame "
        "fixed-step rollouts at lr 5e-4, no force term, its own rule exported",
        pretrain={
            "model": {"model_name": "adapt", "d_model": 64, "d_ff": 128, "n_layers": 3, "n_heads": 4},
            "max_steps": 14000,
            "lr": 1e-3,
        },
        finetune={
            "step": "fixed",
            "tol": STEP_TOL,
            "max_steps": 75,
            "lr_schedule": "constant",
            "warmup": 0,
            "max_batches": 600,
            "eval_every": None,
            "epochs": 60,
            "force_weight": 0.0,
            "energy_weight": 0.0,
            "candidates": {},
            "export": "own",
        },
    )
)
register_training_recipe(
    TrainingRecipe(
        "quick",
        "a smoke run of every stage in seconds (tiny model and budgets; not for results)",
        pretrain={
            "model": {"model_name": "adapt-mi", "d_model": 16, "d_ff": 32, "n_layers": 1, "n_heads": 2},
            "max_steps": 40,
            "eval_frames": 200,
        },
        finetune={
            "max_batches": 4,
            "eval_every": 2,
            "max_steps": 20,
            "grid_structures": 4,
        },
    )
)


register_training_recipe(
    TrainingRecipe(
        "universal",
        "a universal MLIP (--init chgnet): force matching and BPTT at a low learning rate, short fixed-step "
        "rollouts and small budgets (a CHGNet step costs ~25x ADAPT-MI's)",
        pretrain={"max_steps": 150, "batch_size": 8, "lr": 3e-4, "eval_frames": 200, "eval_batch_size": 16},
        finetune={
            "step": "fixed",
            "eta_grid": UNIVERSAL_ETA_GRID,
            "grid_structures": 8,
            "max_steps": 40,
            "batch_size": 2,
            "lr": 1e-4,
            "max_batches": 60,
            "eval_every": 10,
            "checkpoint_frames": True,
            "candidates": {},
        },
    )
)


def recipe_for_init(config: Any, universal: bool) -> tuple[Any, str | None]:
    """``config`` (a :class:`PretrainConfig` or :class:`FinetuneConfig`) moved to the ``universal`` recipe when the
    run starts from a universal MLIP and the user left the recipe at ``default``: the universal recipe's settings
    replace every field still at the default recipe's value (a field the user set stays theirs). Returns the
    config and the line announcing the switch (None when nothing changed)."""
    if not universal or config.recipe != "default":
        return config, None
    kind = "pretrain" if isinstance(config, PretrainConfig) else "finetune"
    default = pretrain_config() if kind == "pretrain" else finetune_config()
    wanted = getattr(TRAINING_RECIPES["universal"], kind)
    changes = {k: v for k, v in wanted.items() if getattr(config, k) == getattr(default, k)}
    note = f"starting from a universal MLIP: the universal recipe's {kind} settings ({', '.join(sorted(changes))})"
    return replace(config, recipe="universal", **changes), note


# ----------------------------------------------------------- what the data decides
@dataclass(frozen=True)
class DataSummary:
    """What the data-aware choices read of the train split.

    Attributes:
        relaxations: train relaxations (converged ones, for BPTT).
        frames: train frames.
        energies: every train frame has a reference energy.
        frames_p90: the 90th percentile of the train relaxations' lengths (frames): how many steps
            the reference's own optimiser needed.
    """

    relaxations: int
    frames: int
    energies: bool
    frames_p90: float = 75.0


#: Pretraining: passes over the train frames, and the bounds of the optimiser steps (1000 steps of
#: 16 frames take about 40 s on one core for 64-atom cells).
PRETRAIN_PASSES, PRETRAIN_STEPS = 5.0, (1000, 3000)
#: BPTT: optimiser steps per train relaxation, and the bounds (150 steps for 100 relaxations, about
#: 1.5 s a step for 4 relaxations of 64 atoms through 75 FIRE frames on one core).
BPTT_STEPS_PER_RELAXATION, BPTT_STEPS = 1.5, (60, 180)


#: Rollout frames: this many times the 90th percentile of the train relaxations' lengths, rounded up to 5,
#: within the bounds. Measured on fcc-defects (relaxations of 60 frames, 10% over 104): with 75 frames the
#: pretrained model's val Dq through FIRE was 1.25, with 150 frames 0.68, and after 60 BPTT steps 1.01
#: against 0.45: a rollout shorter than the relaxations it imitates stops most of them half way.
FRAMES_FACTOR, FRAMES = 1.2, (50, 200)


def rollout_frames(frames_p90: float) -> int:
    """The default frames of a rollout: :data:`FRAMES_FACTOR` x ``frames_p90``, rounded up to 5, in :data:`FRAMES`."""
    lo, hi = FRAMES
    return int(min(max(5 * math.ceil(FRAMES_FACTOR * frames_p90 / 5), lo), hi))


def pretrain_steps(frames: int, batch_size: int) -> int:
    """The default pretraining budget: :data:`PRETRAIN_PASSES` passes over ``frames``, rounded to 100,
    within :data:`PRETRAIN_STEPS`."""
    lo, hi = PRETRAIN_STEPS
    return int(min(max(round(PRETRAIN_PASSES * frames / batch_size / 100) * 100, lo), hi))


def bptt_steps(relaxations: int) -> int:
    """The default BPTT budget: :data:`BPTT_STEPS_PER_RELAXATION` per train relaxation, rounded to 10,
    within :data:`BPTT_STEPS`."""
    lo, hi = BPTT_STEPS
    return int(min(max(round(BPTT_STEPS_PER_RELAXATION * relaxations / 10) * 10, lo), hi))


def resolve_pretrain(config: PretrainConfig, data: DataSummary) -> tuple[PretrainConfig, list[str]]:
    """``config`` with its ``"auto"`` settings decided from ``data``, and one line per decision."""
    notes = []
    if config.max_steps == AUTO:
        steps = pretrain_steps(data.frames, config.batch_size)
        config = replace(config, max_steps=steps)
        notes.append(f"pretraining budget: {steps} optimiser steps ({data.frames} train frames, about 5 passes)")
    name = config.model.get("model_name", "adapt")
    notes.append(
        f"architecture: {name}"
        + (" (translation invariant; every periodic image within its cutoff)" if name == "adapt-mi" else "")
    )
    return config, notes


def resolve_finetune(config: FinetuneConfig, data: DataSummary) -> tuple[FinetuneConfig, list[str]]:
    """``config`` with its ``"auto"`` settings decided from ``data``, and one line per decision."""
    changes: dict[str, Any] = {}
    notes = []
    if config.tol == AUTO:
        changes["tol"] = FIRE_TOL if config.step == "fire" else STEP_TOL
        why = "FIRE's first steps are tiny" if config.step == "fire" else "RMS displacement of one frame"
        notes.append(f"stopping tolerance {changes['tol']:g} A for the {config.step} step rule ({why})")
    if config.energy_weight == AUTO:
        changes["energy_weight"] = ENERGY_WEIGHT if data.energies else 0.0
        notes.append(
            f"energy term: weight {ENERGY_WEIGHT:g} (every train frame has an energy)"
            if data.energies
            else "energy term off: some train frames have no reference energy"
        )
    if config.max_steps == AUTO:
        changes["max_steps"] = rollout_frames(data.frames_p90)
        notes.append(
            f"rollouts of {changes['max_steps']} frames (90% of the train relaxations took at most "
            f"{data.frames_p90:.0f})"
        )
    if config.max_batches == AUTO:
        changes["max_batches"] = bptt_steps(data.relaxations)
        notes.append(f"BPTT budget: {changes['max_batches']} optimiser steps ({data.relaxations} train relaxations)")
    return replace(config, **changes), notes


def candidate_configs(config: FinetuneConfig) -> list[tuple[str, FinetuneConfig]]:
    """The BPTT runs raced on val: ``[(name, config)]``, one per combination of
    :attr:`FinetuneConfig.candidates` (each without candidates of its own); one entry, named ``""``,
    when there is nothing to race.

    A setting the user changed from its default is theirs, not raced: the
    candidates of a field race only while the field holds its default value.
    """
    defaults = {f.name: f.default for f in fields(FinetuneConfig)}
    raced = {k: v for k, v in config.candidates.items() if getattr(config, k) == defaults.get(k, math.nan)}
    runs: list[dict[str, Any]] = [{}]
    for key, values in raced.items():
        runs = [{**run, key: value} for run in runs for value in values]
    if len(runs) == 1:
        return [("", replace(config, candidates={}))]
    return [
        (
            ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in run.items()),
            replace(copy.copy(config), candidates={}, **run),
        )
        for run in runs
    ]


def data_summary(train, frames) -> DataSummary:
    """What the data-aware settings read: the converged train relaxations, the train frames (all of them,
    for the force term), whether every one has an energy, and how long the relaxations BPTT imitates are."""
    from collections import Counter

    import numpy as np

    lengths = Counter(frames.traj_ids) if frames is not None else Counter()
    used = [lengths[t] for t in train.trajectories if t in lengths] or [75]
    return DataSummary(
        relaxations=len(train),
        frames=0 if frames is None else len(frames),
        energies=frames is not None and frames.has_energy,
        frames_p90=float(np.percentile(used, 90)),
    )
