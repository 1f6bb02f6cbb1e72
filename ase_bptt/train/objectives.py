"""Extra terms of the BPTT loss: force (and energy) matching on reference frames, and per-label weights.

BPTT scores only the final structure of a relaxation, so the tuned model
drifts away from the reference forces (measured: force MAE on test frames
0.17 -> 1.06 eV/A on random-site silicon). :class:`ForceTerm` adds
``force_weight * mean squared force error`` (per component, (eV/A)^2) on
``force_frames`` frames of the train split to every optimiser step, drawn
with a generator seeded by ``(seed, epoch, batch, FORCE_SALT)`` from the
frames pretraining fits (:func:`~ase_bptt.data.datasets.load_frames`), so the
draw is the same on every rank and in a resumed run. ``force_weight`` is in
amu^1/2 A per (eV/A)^2: Dq per squared force error. ``energy_weight`` (amu^1/2 A
per (eV/atom)^2) adds the mean squared per-atom energy error of the same
frames: the energy head shares the encoder the Dq term moves, so without it
the energy drifts (measured: energy MAE 3.6 -> 28 meV/atom on fcc defects with
force weight 10). With both weights 0 nothing is loaded or drawn and the run
is unchanged.

:func:`structure_weights` turns ``label_weights`` (like MACE's
``config_type_weights``: a label or an ``fnmatch`` pattern such as ``"int:*"``
-> weight) into one weight per train structure of the Dq term, so rare defect
kinds can count more than the common ones.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any

import torch

from ase_bptt.data.datasets import FrameDataset, load_frames
from ase_bptt.runs.config import ConfigError, seed_generator
from ase_bptt.runs.distributed import DistContext
from ase_bptt.runs.errors import EmptySplitError
from ase_bptt.runs.loop import local_share
from ase_bptt.train.pretrain import force_metrics

if TYPE_CHECKING:
    from ase_bptt.models.base import ForceModel

__all__ = [
    "FORCE_SALT",
    "ForceTerm",
    "LabelWeightError",
    "check_label_weights",
    "draw_force_frames",
    "structure_weights",
    "weight_summary",
]

log = logging.getLogger("ase_bptt.train")

#: Last part of the seed of the frames drawn for one optimiser step.
FORCE_SALT = 41


def draw_force_frames(seed: int, epoch: int, batch: int, n_frames: int, n_available: int) -> torch.Tensor:
    """Indices of the reference frames of optimiser step ``(epoch, batch)``: ``min(n_frames, n_available)``
    distinct frames, seeded by ``(seed, epoch, batch, FORCE_SALT)`` (sorted, so batches pad alike)."""
    gen = seed_generator(seed, epoch, batch, FORCE_SALT)
    return torch.randperm(n_available, generator=gen)[: min(n_frames, n_available)].sort().values


class LabelWeightError(ConfigError):
    """A ``label_weights`` key that matches no train structure (a typo would otherwise do nothing)."""


def check_label_weights(label_weights: Mapping[str, float]) -> str | None:
    """What a ``label_weights`` mapping must be, if it is not (None: it is fine)."""
    for key, value in label_weights.items():
        ok_value = not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
        if not isinstance(key, str) or not key or not ok_value or value < 0:
            return f"label or pattern -> finite weight >= 0 ({key!r}: {value!r} is not)"
    return None


def check_energy_term(frames: FrameDataset | None, energy_weight: float) -> None:
    """ConfigError when the energy term is on and some train frame has no reference energy."""
    if energy_weight > 0 and not (frames is not None and frames.has_energy):
        raise ConfigError(
            "energy_weight needs a reference energy on every train frame, and some have none: "
            "leave --energy-weight at 0 (or auto) or import the energies",
            field="energy_weight",
        )


def structure_weights(labels: Sequence[str], label_weights: Mapping[str, float] | None) -> torch.Tensor | None:
    """The Dq term's weight of each train structure, scaled to mean 1 over them (so ``lr`` keeps its meaning).

    A structure's weight is that of its exact label, else of the first key (in the mapping's order) that
    matches it as an ``fnmatch`` pattern (``"sub:*"`` matches ``sub:Ni`` and ``sub:Ni+vacancy``), else 1.
    None (nothing to weight) when ``label_weights`` is empty. A key matching no label is a
    :class:`LabelWeightError`, as is a weighting that gives every structure weight 0.
    """
    if not label_weights:
        return None
    keys = list(label_weights)
    unused = [k for k in keys if not any(lab == k or fnmatchcase(lab, k) for lab in labels)]
    if unused:
        shown = ", ".join(sorted(set(labels))[:12]) or "(none)"
        raise LabelWeightError(
            f"label_weights {', '.join(map(repr, unused))} match(es) no train structure; its labels are: {shown}"
        )

    def weight(label: str) -> float:
        if label in label_weights:
            return float(label_weights[label])
        return next((float(label_weights[k]) for k in keys if fnmatchcase(label, k)), 1.0)

    w = torch.tensor([weight(lab) for lab in labels], dtype=torch.float64)
    if not float(w.sum()) > 0:
        raise LabelWeightError("label_weights give every train structure weight 0")
    return w * (len(w) / w.sum())


def weight_summary(labels: Sequence[str], weights: torch.Tensor) -> str:
    """``label xcount: weight`` for each label (weights after scaling), for the log."""
    seen: dict[str, tuple[int, float]] = {}
    for label, w in zip(labels, weights.tolist()):
        n, _ = seen.get(label, (0, w))
        seen[label] = (n + 1, w)
    return ", ".join(f"{lab or '(no label)'} x{n}: {w:.3g}" for lab, (n, w) in sorted(seen.items()))


class ForceTerm:
    """The force (and energy) matching term of the BPTT loss and its logging.

    Args:
        db: the database (its train split's frames are loaded once).
        weight: ``force_weight`` (>= 0).
        n_frames: reference frames per optimiser step.
        seed: the run's seed.
        device, dtype: where the frames go.
        energy_weight: ``energy_weight`` (>= 0); > 0 needs a reference energy
            on every train frame (else :class:`~ase_bptt.runs.config.ConfigError`).

    The val split's frames are loaded too: their force MAE (and energy MAE)
    is reported at each evaluation (the train frames' when there is no val split).
    """

    def __init__(
        self,
        db,
        *,
        weight: float,
        n_frames: int,
        seed: int,
        device,
        dtype: torch.dtype,
        energy_weight: float = 0.0,
        frames: FrameDataset | None = None,
    ) -> None:
        frames = load_frames(db, "train") if frames is None else frames
        if frames is None:
            raise EmptySplitError("the train split has no frames to match forces on")
        check_energy_term(frames, energy_weight)
        self.train: FrameDataset = frames.to(device, dtype)
        val = load_frames(db, "val")
        self.val: FrameDataset | None = None if val is None else val.to(device, dtype)
        self.weight, self.n_frames, self.seed = float(weight), int(n_frames), int(seed)
        self.energy_weight = float(energy_weight)
        self.running = {"sum": 0.0, "energy_sum": 0.0, "n": 0}

    @classmethod
    def from_config(
        cls, db, config, *, device, dtype: torch.dtype, model: ForceModel, frames: FrameDataset | None = None
    ) -> ForceTerm | None:
        """The term of a :class:`~ase_bptt.train.finetune.FinetuneConfig` for ``model`` (``frames``: the
        train frames when already loaded); None when ``force_weight`` and ``energy_weight`` are 0 (then
        nothing is drawn)."""
        if not (config.force_weight > 0 or config.energy_weight > 0):
            return None
        term = cls(
            db,
            weight=config.force_weight,
            n_frames=config.force_frames,
            seed=config.seed,
            device=device,
            dtype=dtype,
            energy_weight=config.energy_weight,
            frames=frames,
        )
        if term.energy_weight > 0:
            with torch.no_grad():
                if model(term.train.take(torch.arange(1)).batch).energy is None:
                    raise ConfigError("energy_weight > 0 but the model predicts no energy: leave --energy-weight at 0")
        return term

    def loss(self, model: ForceModel, epoch: int, batch: int, ctx: DistContext) -> tuple[torch.Tensor, float, float]:
        """``(this rank's share of the weighted term, global force MSE, global per-atom energy MSE)``.

        The term is ``weight * force MSE (per component, (eV/A)^2) + energy_weight * energy MSE
        ((eV/atom)^2)`` on the drawn frames; it is differentiable and sums over ranks to the global
        value, like the Dq term of :meth:`~ase_bptt.train.finetune.FinetuneRun.train_batch`. The energy
        MSE is 0.0 when ``energy_weight`` is 0 (not computed).
        """
        index = draw_force_frames(self.seed, epoch, batch, self.n_frames, len(self.train))
        local, share = local_share(index, ctx)
        frames, forces, energy = self.train.take(local)
        mask = frames.mask.unsqueeze(-1)
        counts = ctx.all_reduce_sum(
            torch.tensor(
                [3.0 * float(frames.mask.sum()) * share, float(len(local)) * share],
                dtype=torch.float64,
                device=ctx.device,
            )
        )
        out = model(frames)
        force_sq = ((out.forces - forces) * mask).pow(2).sum() * share / float(counts[0])
        energy_sq = torch.zeros_like(force_sq)
        if self.energy_weight > 0:
            assert out.energy is not None  # checked by from_config
            energy_sq = ((out.energy - energy) / frames.mask.sum(1)).pow(2).sum() * share / float(counts[1])
        term = self.weight * force_sq + self.energy_weight * energy_sq
        force_mse, energy_mse = ctx.all_reduce_sum(
            torch.stack([force_sq, energy_sq]).detach().double().to(ctx.device)
        ).tolist()
        return term, force_mse, energy_mse

    def record(self, force_mse: float, energy_mse: float = 0.0) -> None:
        """Count one optimiser step's mean squared force (and energy) error (for the history)."""
        self.running["sum"] += force_mse
        self.running["energy_sum"] += energy_mse
        self.running["n"] += 1

    def history_entry(self, model: ForceModel, ctx: DistContext, *, batch_size: int) -> dict[str, Any]:
        """``train_force_mse`` (mean over the steps since the last evaluation; ``train_energy_mse`` too
        when energies are matched) and the force MAE/RMSE (eV/A) and energy MAE (meV/atom, when the
        frames have energies) on the val frames (the train frames without a val split)."""
        entry: dict[str, Any] = {}
        if self.running["n"]:
            entry["train_force_mse"] = self.running["sum"] / self.running["n"]
            if self.energy_weight > 0:
                entry["train_energy_mse"] = self.running["energy_sum"] / self.running["n"]
        self.running.update(sum=0.0, energy_sum=0.0, n=0)
        split, frames = ("val", self.val) if self.val is not None else ("train", self.train)
        result = force_metrics(model, frames, torch.arange(len(frames)), batch_size=batch_size, ctx=ctx)
        entry[f"{split}_force_mae"] = result["force_mae"]
        entry[f"{split}_force_rmse"] = result["force_rmse"]
        if result["energy_mae_mev_per_atom"] is not None:
            entry[f"{split}_energy_mae_mev_per_atom"] = result["energy_mae_mev_per_atom"]
        return entry
