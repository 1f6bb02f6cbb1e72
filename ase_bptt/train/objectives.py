"""Extra terms of the BPTT loss: force matching on reference frames.

BPTT scores only the final structure of a relaxation, so the tuned model
drifts away from the reference forces (measured: force MAE on test frames
0.17 -> 1.06 eV/A on random-site silicon). :class:`ForceTerm` adds
``force_weight * mean squared force error`` (per component, (eV/A)^2) on
``force_frames`` frames of the train split to every optimiser step, drawn
with a generator seeded by ``(seed, epoch, batch, FORCE_SALT)`` from the
frames pretraining fits (:func:`~ase_bptt.data.datasets.load_frames`), so the
draw is the same on every rank and in a resumed run. ``force_weight`` is in
amu^1/2 A per (eV/A)^2: Dq per squared force error. With weight 0 nothing is
loaded or drawn and the run is unchanged.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from ase_bptt.data.datasets import FrameDataset, load_frames
from ase_bptt.train.common import EmptySplitError
from ase_bptt.train.config import seed_generator
from ase_bptt.train.distributed import DistContext
from ase_bptt.train.loop import local_share
from ase_bptt.train.pretrain import force_metrics

if TYPE_CHECKING:
    from ase_bptt.models.base import ForceModel

__all__ = ["FORCE_SALT", "ForceTerm", "draw_force_frames"]

log = logging.getLogger("ase_bptt.train")

#: Last part of the seed of the frames drawn for one optimiser step.
FORCE_SALT = 41


def draw_force_frames(seed: int, epoch: int, batch: int, n_frames: int, n_available: int) -> torch.Tensor:
    """Indices of the reference frames of optimiser step ``(epoch, batch)``: ``min(n_frames, n_available)``
    distinct frames, seeded by ``(seed, epoch, batch, FORCE_SALT)`` (sorted, so batches pad alike)."""
    gen = seed_generator(seed, epoch, batch, FORCE_SALT)
    return torch.randperm(n_available, generator=gen)[: min(n_frames, n_available)].sort().values


class ForceTerm:
    """The force-matching term of the BPTT loss and its logging.

    Args:
        db: the database (its train split's frames are loaded once).
        weight: ``force_weight`` (> 0).
        n_frames: reference frames per optimiser step.
        seed: the run's seed.
        device, dtype: where the frames go.

    The val split's frames are loaded too: their force MAE is reported at each
    evaluation (the train frames' when there is no val split).
    """

    def __init__(self, db, *, weight: float, n_frames: int, seed: int, device, dtype: torch.dtype) -> None:
        frames = load_frames(db, "train")
        if frames is None:
            raise EmptySplitError("the train split has no frames to match forces on")
        self.train: FrameDataset = frames.to(device, dtype)
        val = load_frames(db, "val")
        self.val: FrameDataset | None = None if val is None else val.to(device, dtype)
        self.weight, self.n_frames, self.seed = float(weight), int(n_frames), int(seed)
        self.running = {"sum": 0.0, "n": 0}

    @classmethod
    def from_config(cls, db, config, *, device, dtype: torch.dtype) -> ForceTerm | None:
        """The term of a :class:`~ase_bptt.train.finetune.FinetuneConfig`; None when ``force_weight`` is 0
        (then nothing is loaded or drawn)."""
        if not config.force_weight > 0:
            return None
        return cls(
            db, weight=config.force_weight, n_frames=config.force_frames, seed=config.seed, device=device, dtype=dtype
        )

    def mse(self, model: ForceModel, epoch: int, batch: int, ctx: DistContext) -> tuple[torch.Tensor, float]:
        """``(this rank's share of the mean squared force error, the global value)`` on the drawn frames.

        The first is differentiable and sums over ranks to the global mean, like
        the Dq term of :meth:`~ase_bptt.train.finetune.FinetuneRun.train_batch`.
        """
        index = draw_force_frames(self.seed, epoch, batch, self.n_frames, len(self.train))
        local, share = local_share(index, ctx)
        frames, forces, _ = self.train.take(local)
        mask = frames.mask.unsqueeze(-1)
        components = ctx.all_reduce_sum(
            torch.tensor([3.0 * float(frames.mask.sum()) * share], dtype=torch.float64, device=ctx.device)
        )
        out = model(frames)
        sq = ((out.forces - forces) * mask).pow(2).sum() * share / float(components[0])
        value = float(ctx.all_reduce_sum(sq.detach().double().reshape(1).to(ctx.device))[0])
        return sq, value

    def record(self, value: float) -> None:
        """Count one optimiser step's mean squared force error (for the history)."""
        self.running["sum"] += value
        self.running["n"] += 1

    def history_entry(self, model: ForceModel, ctx: DistContext, *, batch_size: int) -> dict[str, Any]:
        """``train_force_mse`` (mean over the steps since the last evaluation) and the force
        MAE/RMSE (eV/A) on the val frames (the train frames without a val split)."""
        entry: dict[str, Any] = {}
        if self.running["n"]:
            entry["train_force_mse"] = self.running["sum"] / self.running["n"]
        self.running.update(sum=0.0, n=0)
        split, frames = ("val", self.val) if self.val is not None else ("train", self.train)
        result = force_metrics(model, frames, torch.arange(len(frames)), batch_size=batch_size, ctx=ctx)
        entry[f"{split}_force_mae"] = result["force_mae"]
        entry[f"{split}_force_rmse"] = result["force_rmse"]
        return entry
