"""No-grad rollouts over a split: the mean Dq/MSE of a model and step rule, and
the grid search for the fixed step size BPTT starts from."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from ase_bptt import metrics
from ase_bptt.data.datasets import RelaxationDataset
from ase_bptt.relax.defaults import DEFAULT_MAX_STEPS, DEFAULT_MAXSTEP, DEFAULT_TOL
from ase_bptt.runs.config import seed_generator
from ase_bptt.runs.distributed import DistContext, shard_chunks

if TYPE_CHECKING:
    from ase_bptt.train.finetune_config import FinetuneConfig

__all__ = ["evaluate_rollouts", "grid_search_eta", "draw_stopping", "loss_fn", "current_eta"]


@torch.no_grad()
def evaluate_rollouts(
    model,
    rule,
    data: RelaxationDataset,
    *,
    tol: float | None,
    max_steps: int,
    batch_size: int,
    ctx: DistContext,
    index: torch.Tensor | None = None,
    fmax: float | None = None,
) -> dict:
    """Mean Dq, MSE, frames and converged fraction of rollouts over ``data`` (sharded by rank).

    ``tol`` (A) and ``fmax`` (eV/A, None: none) stop a structure, as in :func:`~ase_bptt.relax.rollout.rollout`.
    The model and the rule run in eval mode (no dropout, no noise).
    """
    from ase_bptt.relax.relaxer import rollout

    modes = (model.training, rule.training)
    model.eval()
    rule.eval()
    index = torch.arange(len(data)) if index is None else index
    sums = torch.zeros(5, dtype=torch.float64)  # dq, mse, frames, converged, structures
    for chunk in shard_chunks(index, ctx, batch_size):
        batch, relaxed = data.take(chunk)
        res = rollout(model, batch, rule, tol=tol, max_steps=max_steps, fmax=fmax)
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
    data: RelaxationDataset,
    etas,
    *,
    loss: str = "dq",
    tol: float = DEFAULT_TOL,
    max_steps: int = DEFAULT_MAX_STEPS,
    maxstep: float | None = DEFAULT_MAXSTEP,
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
    0.035 went from val Dq 3.43 to 3.08; studies/reproduce_paper.py).
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


def loss_fn(name: str):
    """The rollout loss by name: ``metrics.dq`` or ``metrics.mse``."""
    return metrics.dq if name == "dq" else metrics.mse


def draw_stopping(config: FinetuneConfig, epoch: int, batch: int) -> tuple[float, int]:
    """``(tol, max_steps)`` for one training batch.

    Fixed stopping: ``config.tol`` and ``config.max_steps``. Variable stopping
    (the paper's ablation): tol log-uniform in ``config.tol_range`` and max
    steps uniform (inclusive) in ``config.max_steps_range``, drawn from a
    generator seeded with ``(seed, epoch, batch)``, so every rank and every
    resumed run draws the same values.
    """
    if config.stopping != "variable":
        return config.decided("tol"), config.decided("max_steps")
    gen = seed_generator(config.seed, epoch, batch, 23)
    lo, hi = (math.log10(t) for t in config.tol_range)
    tol = 10.0 ** (lo + (hi - lo) * float(torch.rand((), generator=gen, dtype=torch.float64)))
    max_steps = int(torch.randint(config.max_steps_range[0], config.max_steps_range[1] + 1, (), generator=gen))
    return tol, max_steps


def current_eta(rule) -> float | None:
    """The step rule's scalar eta (A^2/eV) for the logs, or None (a learned or per-atom eta)."""
    eta = getattr(rule, "eta", None)
    if eta is None or callable(eta):
        return None
    try:
        return float(eta.detach()) if isinstance(eta, torch.Tensor) else float(eta)
    except (TypeError, ValueError):
        return None
