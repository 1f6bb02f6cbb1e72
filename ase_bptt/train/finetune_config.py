"""Settings of BPTT fine-tuning (:class:`FinetuneConfig`), checked before anything is written.

The defaults are the package's default training recipe (:mod:`ase_bptt.train.presets`,
where the measurements behind them are); ``"auto"`` marks a setting decided from
the data when the run starts (:func:`ase_bptt.train.presets.resolve_finetune`).
Every field with a ``help`` is also a command-line option of ``ase-bptt finetune``
(:func:`ase_bptt.runs.config.option`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ase_bptt.relax.defaults import DEFAULT_ETA_GRID, DEFAULT_MAXSTEP
from ase_bptt.relax.registry import step_rule_names
from ase_bptt.runs.config import AUTO, TrainConfig, option
from ase_bptt.train.objectives import check_label_weights
from ase_bptt.train.pretrain import PretrainConfig

__all__ = ["FinetuneConfig", "EXPORTS"]

#: How the tuned model is meant to relax (``FinetuneConfig.export``): "own": the step rule it was
#: tuned through, with the run's ``tol`` and ``max_steps``; "fire": ASE's FIRE to fmax 0.05 eV/A
#: (at most 300 steps); "auto": whichever gives the lower mean val Dq.
EXPORTS = ("auto", "own", "fire")


@dataclass
class FinetuneConfig(TrainConfig):
    """Settings of :func:`~ase_bptt.train.finetune.finetune`.

    Each field's ``help`` says what it does; the attributes without one:
        eta_grid: step sizes of the grid search for the initial eta (A^2/eV).
        grid_structures: at most this many train structures in the grid search.
        step_lr: learning rate of the step rule's own parameters.
        step_grad_clip: max gradient norm of the step rule's parameters
            (clipped separately: clipping model and eta together froze eta).
        maxstep: largest displacement of an atom in one frame (A).
        tol_range: (low, high) of the variable tolerance (A).
        max_steps_range: (low, high), inclusive, of the variable frame limit.
        min_lr_factor: final learning rate of cosine/onecycle as a fraction of ``lr``.
        augment_translation: random rigid shift per training structure (initial
            and relaxed together; fully periodic cells).
        augment_cubic: random one of the cube's 48 symmetries per training
            structure (fractional coordinates, initial and relaxed; cubic cells).
        weight_decay: decoupled weight decay of the model (AdamW; 0 = Adam).
        grad_clip: max gradient norm of the model (None: no clipping).
        rollout_dropout: keep the model's dropout on during training rollouts.
        converged_only: train only on trajectories whose last frame is relaxed.
        eval_batch_size: structures per evaluation rollout batch.
        checkpoint_every: write the resumable state every this many batches.
        candidates: settings tried on the val split, ``{field: (value, ...)}``: one BPTT run per
            combination, the best exported model kept (ase_bptt.train.candidates; ``--candidate``). A
            field the user changed from its default is not raced. None by default: on the three data
            sets of docs/results.md the learning rate 5e-4 beat 1e-3 every time, so the default spends
            the second core on the one run instead.
        pretrain: settings for pretraining first when no ``init`` is given.
    """

    recipe: str = option("default", help="Named training recipe whose settings the other options change")
    step: str = option("fire", help="Step rule of the unrolled relaxation", choices=step_rule_names)
    eta: float | None = option(
        None, help="Step size in A^2/eV (initial value for learned/decoder)", shown="grid search on the train split"
    )
    eta_grid: tuple[float, ...] = DEFAULT_ETA_GRID
    grid_structures: int | None = 256
    step_lr: float = 1e-3
    step_grad_clip: float | None = 1.0
    momentum: float = option(0.0, help="Momentum weight w of the update (the paper used 0.05)")
    anneal: float = option(1.0, help="Step annealing factor per frame (the paper used 0.99)")
    noise: float = option(0.0, help="Exploration noise on each update (A)")
    maxstep: float | None = DEFAULT_MAXSTEP
    stopping: str = option(
        "fixed",
        help="fixed: --tol/--max-steps; variable: drawn per batch (tol in [1e-4, 1e-2] A, 50-75 frames)",
        choices=("fixed", "variable"),
    )
    tol: float | str = option(
        AUTO,
        help="RMS displacement of one frame that stops a rollout (A)",
        shown="auto: 1e-5 for fire (its first steps are tiny), else 1e-3",
    )
    max_steps: int | str = option(
        AUTO,
        help="Most relaxation steps (frames) of one rollout",
        shown="auto: 1.2 x the 90th percentile of the train relaxations' frames, 50 to 200 (presets.py)",
        metavar="auto|N",
    )
    tol_range: tuple[float, float] = (1e-4, 1e-2)
    max_steps_range: tuple[int, int] = (50, 75)
    loss: str = option("dq", help="dq (mass-weighted, defects) or mse (pure crystals)", choices=("dq", "mse"))
    epochs: int = option(1000, help="Most passes over the train trajectories")
    max_batches: int | str | None = option(
        AUTO,
        help="Optimiser steps of BPTT (off: --epochs decide)",
        flag="--train-steps",
        shown="auto: 150 for ~100 train relaxations, scaled with their number (presets.py)",
        metavar="auto|off|N",
    )
    eval_every: int | None = option(
        15, help="Optimiser steps between val evaluations (off: once per epoch)", metavar="STEPS"
    )
    patience: int | None = option(None, help="Early stopping after this many evaluations without a better val Dq")
    lr_schedule: str = option(
        "cosine",
        help="Learning-rate schedule over the run's optimiser steps",
        choices=("constant", "cosine", "onecycle"),
    )
    warmup: int = option(5, help="Warmup optimiser steps", metavar="STEPS")
    min_lr_factor: float = 0.01
    augment_translation: bool = False
    augment_cubic: bool = False
    time_budget: float | None = option(
        None, help="Stop (keeping the best model) after this many seconds of training", metavar="SECONDS"
    )
    batch_size: int = option(4, help="Trajectories per optimiser step")
    lr: float = option(5e-4, help="Learning rate of the model (Adam)")
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    proximal: float = option(0.0, help="Weight of an L2 term to the pretrained weights (an alternative to clipping)")
    freeze: tuple[str, ...] = option(
        (),
        help="Keep the parameters whose names start with PREFIX at their initial values, e.g. --freeze embed "
        "--freeze blocks to tune only the readout (repeatable; names as in model.named_parameters())",
        shown="tune all",
        metavar="PREFIX",
    )
    force_weight: float = option(
        10.0,
        help="Weight of a force-matching term (mean squared force error on train frames, amu^1/2 A per "
        "(eV/A)^2) added to the BPTT loss; keeps the tuned model a usable force field (0: off)",
    )
    force_frames: int = option(16, help="Train frames drawn per optimiser step for the force and energy terms")
    energy_weight: float | str = option(
        AUTO,
        help="Weight of an energy-matching term (mean squared per-atom energy error on the force term's frames, "
        "amu^1/2 A per (eV/atom)^2; needs reference energies); keeps the tuned model's energies usable (0: off)",
        shown="auto: 30 when every train frame has an energy, else 0",
    )
    label_weights: dict[str, float] = field(default_factory=dict)
    checkpoint_frames: bool = option(False, help="Recompute frames in backward (less memory, ~1.4x time)")
    rollout_dropout: bool = False
    converged_only: bool = True
    candidates: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    export: str = option(
        "auto",
        help="How the tuned model relaxes (stored in the checkpoint): own = the step rule it was tuned through; "
        "fire = ASE's FIRE to fmax 0.05; auto = whichever has the lower val Dq",
        choices=EXPORTS,
    )
    refit_energy: bool = option(
        True,
        help="Refit the exported model's linear energy head to the train frames' energies (forces and "
        "relaxations unchanged; kept only if the val energy MAE falls)",
    )
    eval_batch_size: int = 16
    seed: int = 0
    device: str | None = None
    dtype: str = "float32"
    checkpoint_every: int | None = 10
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)

    def validate(self) -> None:
        if isinstance(self.pretrain, dict):
            self.pretrain = PretrainConfig.from_dict(self.pretrain)
        self.eta_grid = tuple(float(e) for e in self.eta_grid)
        for name in ("tol_range", "max_steps_range"):
            if len(getattr(self, name)) != 2:
                raise self._fail(name, "a pair (low, high)")
        self.tol_range = (float(self.tol_range[0]), float(self.tol_range[1]))
        self.max_steps_range = (int(self.max_steps_range[0]), int(self.max_steps_range[1]))
        self._one_of("step", step_rule_names())
        self._one_of("stopping", ("fixed", "variable"))
        self._one_of("loss", ("dq", "mse"))
        self._one_of("export", EXPORTS)
        if self.eta is not None:
            self._positive(("eta",))
        if self.step == "fire" and self.eta is not None:
            raise self._fail("eta", "unset for the FIRE step (it adapts its own time step)")
        if self.eta is None and self.step != "fire" and (not self.eta_grid or min(self.eta_grid) <= 0):
            raise self._fail("eta_grid", "at least one positive step size when eta is not given")
        self._auto_or(("tol",), self._positive)
        self._auto_or(("max_batches",), self._at_least_one, off=True)
        self._auto_or(("max_steps",), self._at_least_one)
        self._at_least_one(("epochs", "batch_size", "eval_batch_size"))
        if not (0 < self.tol_range[0] <= self.tol_range[1]):
            raise self._fail("tol_range", "(low, high) with 0 < low <= high")
        if not (1 <= self.max_steps_range[0] <= self.max_steps_range[1]):
            raise self._fail("max_steps_range", "(low, high) with 1 <= low <= high")
        self._positive(("lr", "step_lr"))
        if not 0.0 <= self.momentum < 1.0:
            raise self._fail("momentum", "in [0, 1)")
        if not 0.0 < self.anneal <= 1.0:
            raise self._fail("anneal", "in (0, 1]")
        self._finite_non_negative(("noise",))
        if self.time_budget is not None:
            self._positive(("time_budget",))
        self._one_of("lr_schedule", ("constant", "cosine", "onecycle"))
        self._at_least_one(name for name in ("eval_every", "patience") if getattr(self, name) is not None)
        if self.warmup < 0:
            raise self._fail("warmup", ">= 0 optimiser steps")
        if not 0.0 <= self.min_lr_factor <= 1.0:
            raise self._fail("min_lr_factor", "in [0, 1]")
        if self.proximal < 0:
            raise self._fail("proximal", ">= 0")
        if isinstance(self.freeze, str) or not all(isinstance(p, str) and p.strip(".") for p in self.freeze):
            raise self._fail("freeze", "a list of parameter-name prefixes such as ['embed', 'blocks']")
        self.freeze = tuple(p.strip(".") for p in self.freeze)
        self._finite_non_negative(("force_weight",))
        self._auto_or(("energy_weight",), self._finite_non_negative)
        self._at_least_one(("force_frames",))
        if not isinstance(self.label_weights, dict):
            raise self._fail("label_weights", "a mapping of label or pattern -> weight")
        if problem := check_label_weights(self.label_weights):
            raise self._fail("label_weights", problem)
        self.label_weights = {k: float(v) for k, v in self.label_weights.items()}
        self._check_candidates()

    def _finite_non_negative(self, names) -> None:
        for name in names:
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise self._fail(name, "a finite number >= 0")

    def _check_candidates(self) -> None:
        """Each candidate key names a tunable field, with two or more distinct values that field accepts."""
        from dataclasses import replace

        self.candidates = {k: tuple(v) for k, v in dict(self.candidates).items()}
        for key, values in self.candidates.items():
            if key not in CANDIDATE_FIELDS:
                raise self._fail("candidates", f"keyed by {', '.join(CANDIDATE_FIELDS)}")
            if len(set(values)) < 2:
                raise self._fail("candidates", f"two or more different values of {key}")
            for value in values:
                replace(self, candidates={}, **{key: value})  # each value passes this class's checks


#: The settings :attr:`FinetuneConfig.candidates` may try on the val split.
CANDIDATE_FIELDS = ("lr", "force_weight", "energy_weight", "step", "batch_size", "proximal")
