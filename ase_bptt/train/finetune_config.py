"""Settings of BPTT fine-tuning (:class:`FinetuneConfig`), checked before anything is written."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ase_bptt.relax.defaults import DEFAULT_ETA_GRID, DEFAULT_MAX_STEPS, DEFAULT_MAXSTEP, DEFAULT_TOL
from ase_bptt.relax.registry import step_rule_names
from ase_bptt.train.config import TrainConfig
from ase_bptt.train.objectives import check_label_weights
from ase_bptt.train.pretrain import PretrainConfig

__all__ = ["FinetuneConfig"]


@dataclass
class FinetuneConfig(TrainConfig):
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
        eval_every: optimiser steps between val evaluations, counted over the
            whole run (None: after every epoch); the run's end is evaluated too.
        patience: stop after this many evaluations without a better val loss
            (None: never; off without a val split).
        lr_schedule: "constant", "cosine" or "onecycle" (``loop.lr_factor`` over
            epochs x batches per epoch, or ``max_batches``); scales lr and step_lr.
        warmup: optimiser steps of warmup.
        min_lr_factor: final learning rate of cosine/onecycle as a fraction of ``lr``.
        augment_translation: random rigid shift per training structure (initial
            and relaxed together; fully periodic cells).
        augment_cubic: random one of the cube's 48 symmetries per training
            structure (fractional coordinates, initial and relaxed; cubic cells).
        time_budget: stop after this many seconds (None: no limit).
        batch_size: trajectories per optimiser step (global under torchrun).
        lr: learning rate of the model (Adam).
        weight_decay: decoupled weight decay of the model (AdamW; 0 = Adam).
        grad_clip: max gradient norm of the model (None: no clipping).
        proximal: weight of the L2 term ``sum (theta - theta_pretrained)^2``
            (0: off). The paper uses it as an alternative to clipping.
        freeze: parameter-name prefixes (as ``model.named_parameters()`` spells them, e.g.
            ``"embed"``, ``"blocks"``, ``"blocks.0"``) kept at their initial values: only
            the other parameters are tuned (fine-tuning the readout alone distorts the
            pretrained features less; Kumar et al., ICLR 2022). Every prefix must match.
        force_weight: weight (amu^1/2 A per (eV/A)^2; 0: off) of the force term (train/objectives.py).
        force_frames: train frames drawn per optimiser step for it.
        energy_weight: weight (amu^1/2 A per (eV/atom)^2; 0: off) of the
            per-atom energy error on the same frames (needs reference energies);
            keeps the energy head, which shares the tuned encoder, usable.
        label_weights: weight of each train structure's Dq by its label, like
            MACE's ``config_type_weights``: ``{"int:*": 3, "sub:Ni": 2}`` (exact
            label first, else the first matching ``fnmatch`` pattern, else 1;
            scaled to mean 1 over the train split; val selection stays unweighted).
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
    maxstep: float | None = DEFAULT_MAXSTEP
    stopping: str = "fixed"
    tol: float = DEFAULT_TOL
    max_steps: int = DEFAULT_MAX_STEPS
    tol_range: tuple[float, float] = (1e-4, 1e-2)
    max_steps_range: tuple[int, int] = (50, 75)
    loss: str = "dq"
    epochs: int = 5
    max_batches: int | None = None
    eval_every: int | None = None
    patience: int | None = None
    lr_schedule: str = "constant"
    warmup: int = 0
    min_lr_factor: float = 0.01
    augment_translation: bool = False
    augment_cubic: bool = False
    time_budget: float | None = None
    batch_size: int = 4
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    proximal: float = 0.0
    freeze: tuple[str, ...] = ()
    force_weight: float = 0.0
    force_frames: int = 16
    energy_weight: float = 0.0
    label_weights: dict[str, float] = field(default_factory=dict)
    checkpoint_frames: bool = False
    rollout_dropout: bool = False
    converged_only: bool = True
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
        if self.eta is not None:
            self._positive(("eta",))
        if self.step == "fire" and self.eta is not None:
            raise self._fail("eta", "unset for the FIRE step (it adapts its own time step)")
        if self.eta is None and self.step != "fire" and (not self.eta_grid or min(self.eta_grid) <= 0):
            raise self._fail("eta_grid", "at least one positive step size when eta is not given")
        self._at_least_one(("epochs", "batch_size", "max_steps", "eval_batch_size"))
        if not (0 < self.tol_range[0] <= self.tol_range[1]):
            raise self._fail("tol_range", "(low, high) with 0 < low <= high")
        if not (1 <= self.max_steps_range[0] <= self.max_steps_range[1]):
            raise self._fail("max_steps_range", "(low, high) with 1 <= low <= high")
        self._positive(("lr", "step_lr"))
        self._one_of("lr_schedule", ("constant", "cosine", "onecycle"))
        self._at_least_one(
            name for name in ("max_batches", "eval_every", "patience") if getattr(self, name) is not None
        )
        if self.warmup < 0:
            raise self._fail("warmup", ">= 0 optimiser steps")
        if not 0.0 <= self.min_lr_factor <= 1.0:
            raise self._fail("min_lr_factor", "in [0, 1]")
        if self.proximal < 0:
            raise self._fail("proximal", ">= 0")
        if isinstance(self.freeze, str) or not all(isinstance(p, str) and p.strip(".") for p in self.freeze):
            raise self._fail("freeze", "a list of parameter-name prefixes such as ['embed', 'blocks']")
        self.freeze = tuple(p.strip(".") for p in self.freeze)
        if not (self.force_weight >= 0 and math.isfinite(self.force_weight)):
            raise self._fail("force_weight", "a finite number >= 0")
        if not (self.energy_weight >= 0 and math.isfinite(self.energy_weight)):
            raise self._fail("energy_weight", "a finite number >= 0")
        self._at_least_one(("force_frames",))
        if not isinstance(self.label_weights, dict):
            raise self._fail("label_weights", "a mapping of label or pattern -> weight")
        if problem := check_label_weights(self.label_weights):
            raise self._fail("label_weights", problem)
        self.label_weights = {k: float(v) for k, v in self.label_weights.items()}
