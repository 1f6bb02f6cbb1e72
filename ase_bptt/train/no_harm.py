"""The no-harm rule of fine-tuning's export: never export a model worse than the pretrained one.

At the end of :func:`~ase_bptt.train.finetune.finetune` the best tuned model's
val loss (mean Dq, or MSE with ``loss="mse"``) is compared with the PRETRAINED
model's at its best fixed step: every eta of ``config.eta_grid`` on the val
split, with the run's ``tol``, ``max_steps`` and ``maxstep`` (no momentum, no
annealing: the fixed step ``evaluate`` reports). If the tuned model is not
strictly better, the pretrained model is exported with that eta, and a warning
is logged. The decision is stored in the checkpoint's ``metadata["no_harm"]``.
Without a val split there is nothing honest to compare on, so the rule is
skipped (and the metadata says so).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch

from ase_bptt.data.datasets import RelaxationDataset
from ase_bptt.train.distributed import DistContext
from ase_bptt.train.rollouts import evaluate_rollouts

__all__ = ["NoHarmDecision", "pretrained_best_fixed_step", "no_harm_decision"]

log = logging.getLogger("ase_bptt.train")


class NoHarmDecision:
    """What to export: ``record`` (for the metadata), and the pretrained weights and
    step rule when they win (both None when the tuned model is exported)."""

    def __init__(self, record: dict[str, Any], weights: dict | None = None, rule: dict | None = None) -> None:
        self.record, self.weights, self.rule = record, weights, rule

    @property
    def pretrained(self) -> bool:
        return self.weights is not None

    @property
    def note(self) -> str | None:
        """The checkpoint's ``metadata["note"]`` when the pretrained model is exported."""
        if not self.pretrained:
            return None
        return "not better on val than the pretrained model's best fixed step: the pretrained model, unchanged"


def pretrained_best_fixed_step(
    model, val: RelaxationDataset, config, *, ctx: DistContext
) -> tuple[float | None, float, dict[str, float]]:
    """``(best eta, its mean val loss, {repr(eta): mean val loss})`` of fixed-step rollouts
    over ``config.eta_grid`` (eta None and loss inf when every eta diverged)."""
    from ase_bptt.relax.steps import FixedStep

    param = next(model.parameters())
    scores: dict[str, float] = {}
    for eta in config.eta_grid:
        rule = FixedStep(float(eta), maxstep=config.maxstep).to(device=param.device, dtype=param.dtype)
        result = evaluate_rollouts(
            model,
            rule,
            val,
            tol=config.tol,
            max_steps=config.max_steps,
            batch_size=config.eval_batch_size,
            ctx=ctx,
        )
        scores[repr(float(eta))] = result[config.loss]
    finite = {float(k): v for k, v in scores.items() if math.isfinite(v)}
    if not finite:
        return None, math.inf, scores
    eta = min(finite, key=lambda k: (finite[k], k))
    return eta, finite[eta], scores


def no_harm_decision(
    init: str | Path,
    val: RelaxationDataset | None,
    tuned_metric: float | None,
    config,
    *,
    ctx: DistContext,
    dtype: torch.dtype,
) -> NoHarmDecision:
    """Decide whether the tuned model (val loss ``tuned_metric``) or the pretrained
    checkpoint ``init`` at its val-best fixed step is exported (see the module doc).

    Every rank calls it (the rollouts are sharded by rank); every rank gets the same decision.
    """
    from ase_bptt.models.checkpoint import load_model
    from ase_bptt.relax.steps import FixedStep

    if val is None:
        if ctx.is_main:
            log.warning("no val split: the no-harm comparison with the pretrained model is skipped")
        return NoHarmDecision({"skipped": "no val split", "exported": "tuned"})
    pretrained = load_model(init, device=ctx.device, dtype=dtype)
    eta, pre_metric, scores = pretrained_best_fixed_step(pretrained, val, config, ctx=ctx)
    tuned = math.inf if tuned_metric is None or not math.isfinite(tuned_metric) else float(tuned_metric)
    tuned_wins = eta is None or tuned < pre_metric
    record = {
        "metric": config.loss,
        "pretrained_val_dq": pre_metric,
        "pretrained_eta": eta,
        "tuned_val_dq": tuned,
        "exported": "tuned" if tuned_wins else "pretrained",
        "pretrained_scores": scores,
    }
    if tuned_wins:
        if ctx.is_main:
            log.info(
                "no-harm check: the tuned model (val %s %.5g) beats the pretrained model's best fixed step "
                "(eta %s: %.5g)",
                config.loss,
                tuned,
                eta,
                pre_metric,
            )
        return NoHarmDecision(record)
    if ctx.is_main:
        log.warning(
            "no-harm check: the tuned model (val %s %.5g) is not better than the pretrained model with its best "
            "fixed step (eta %g: %.5g); exporting the pretrained model %s with that step",
            config.loss,
            tuned,
            eta,
            pre_metric,
            init,
        )
    assert eta is not None  # tuned_wins otherwise
    weights = {k: v.detach().cpu().clone() for k, v in pretrained.state_dict().items()}
    rule = FixedStep(float(eta), maxstep=config.maxstep).to_dict()
    return NoHarmDecision(record, weights, rule)
