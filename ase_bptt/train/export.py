"""What fine-tuning exports: how the tuned model relaxes, and never a model worse than the pretrained one.

Two decisions on the val split, at the end of :func:`~ase_bptt.train.finetune.finetune`:

1. **The relaxation** (``FinetuneConfig.export``): the tuned model's own step rule
   (the one BPTT unrolled, with the run's ``tol`` and ``max_steps``), or ASE's
   FIRE to fmax 0.05 eV/A (:data:`FIRE_RELAX`), whichever gives the lower mean
   val Dq ("auto"); the chosen one is the checkpoint's ``relax`` settings, so
   ``LearnedStepOptimizer``, ``ase-bptt relax`` and ``evaluate`` use it. Measured:
   after tuning through fixed steps the tuned model relaxed better with FIRE
   (median val Dq 0.49 against 0.77 for its own rule); after tuning through
   FIRE at tol 1e-5 its own 75 frames did better than FIRE's fmax 0.05 stop.
2. **No harm**: the exported relaxation's val loss is compared with the PRETRAINED
   model's best of the same choices: a fixed step over ``config.eta_grid`` (the
   run's ``tol``, ``max_steps``, ``maxstep``; no momentum, no annealing) and ASE's
   FIRE. If the tuned model is not strictly better, the pretrained model is
   exported with its best relaxation, and a warning is logged.

3. **Energies**: BPTT moves the encoder the energy head reads, and nothing in a
   relaxation uses the energy (ADAPT's and ADAPT-MI's forces are heads of their
   own), so the tuned model's energies drift (measured: energy MAE 3.4x the
   pretrained model's with the energy term on). The linear energy head alone
   is refit to the train frames' energies by least squares
   (:func:`refit_energy_head`), which leaves every force and every relaxation
   unchanged, and kept only if the val frames' energy MAE falls.

All three are recorded in the checkpoint's metadata (``export``, ``no_harm``, ``energy_refit``).
Without a val split there is nothing honest to compare on: the run's own rule is
exported and the metadata says why.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from ase_bptt.data.datasets import RelaxationDataset
from ase_bptt.runs.distributed import DistContext
from ase_bptt.train.rollouts import evaluate_rollouts

__all__ = [
    "FIRE_RELAX",
    "refit_energy_head",
    "ExportDecision",
    "own_relax",
    "fire_relax",
    "pretrained_relaxations",
    "relax_scores",
    "export_decision",
]

log = logging.getLogger("ase_bptt.train")

#: ASE FIRE as a checkpoint's relax settings: ASE's default force criterion and evaluate's step limit.
FIRE_RELAX: dict[str, Any] = {"fmax": 0.05, "max_steps": 300}


def own_relax(rule: Mapping[str, Any], config) -> dict[str, Any]:
    """The relax settings of the rule BPTT unrolled: ``{"step", "tol", "max_steps"}``."""
    return {"step": dict(rule), "tol": float(config.decided("tol")), "max_steps": int(config.decided("max_steps"))}


def fire_relax() -> dict[str, Any]:
    """ASE's FIRE (its defaults) to fmax 0.05 eV/A as relax settings (no displacement rule)."""
    from ase_bptt.relax.fire import FIREStep

    return {"step": FIREStep().to_dict(), "tol": None, **FIRE_RELAX}


def relax_scores(
    model, candidates: Mapping[str, Mapping[str, Any]], val: RelaxationDataset, *, loss: str, batch_size: int, ctx
) -> dict[str, float]:
    """Mean val loss (``"dq"`` or ``"mse"``) of ``model`` relaxed with each candidate's relax settings."""
    from ase_bptt.relax.registry import rule_from_relax_settings

    param = next(model.parameters())
    scores = {}
    for name, relax in candidates.items():
        rule, tol, max_steps = rule_from_relax_settings(dict(relax))
        rule = rule.to(device=param.device, dtype=param.dtype)
        steps = int(max_steps) if max_steps is not None else int(FIRE_RELAX["max_steps"])
        result = evaluate_rollouts(
            model, rule, val, tol=tol, max_steps=steps, fmax=relax.get("fmax"), batch_size=batch_size, ctx=ctx
        )
        scores[name] = result[loss] if math.isfinite(result[loss]) else math.inf
    return scores


def pretrained_relaxations(config) -> dict[str, dict[str, Any]]:
    """The relaxations the no-harm rule tries with the pretrained model: a fixed step of each eta of
    ``config.eta_grid`` (named ``"fixed step ETA"``, the run's tol, frames and maxstep) and ``"fire"``."""
    from ase_bptt.relax.steps import FixedStep

    grid = {
        f"fixed step {float(eta):g}": {
            "step": FixedStep(float(eta), maxstep=config.maxstep).to_dict(),
            "tol": float(config.decided("tol")),
            "max_steps": int(config.decided("max_steps")),
        }
        for eta in config.eta_grid
    }
    return {**grid, "fire": fire_relax()}


class ExportDecision:
    """What to export: ``relax`` (the checkpoint's relax settings), ``weights`` (the state dict to
    export: the pretrained model's when it wins, the tuned model's with its energy head refit; None:
    the best tuned weights as trained) and ``records`` (metadata)."""

    def __init__(self, relax: dict[str, Any], records: dict[str, Any], weights: dict | None = None) -> None:
        self.relax, self.records, self.weights = relax, records, weights

    @property
    def note(self) -> str | None:
        """The checkpoint's ``metadata["note"]`` when the pretrained model is exported."""
        if self.records.get("no_harm", {}).get("exported") != "pretrained":
            return None
        return "not better on val than the pretrained model's best relaxation: the pretrained model, unchanged"


def export_decision(
    init: str | Path,
    tuned,
    rule: Mapping[str, Any],
    val: RelaxationDataset | None,
    config,
    *,
    ctx: DistContext,
    dtype: torch.dtype,
) -> ExportDecision:
    """Decide the exported relaxation and model (see the module doc); every rank calls it and gets
    the same decision (the rollouts are sharded by rank).

    Args:
        init: the pretrained checkpoint (or a universal MLIP by name).
        tuned: the best tuned model (its weights loaded).
        rule: the step rule BPTT unrolled (``to_dict``), as the best evaluation left it.
        val: the val split, or None.
        config: the run's :class:`~ase_bptt.train.finetune_config.FinetuneConfig`.
    """
    from ase_bptt.train.pretrain import load_initial_model

    own = own_relax(rule, config)
    if val is None:
        if ctx.is_main:
            log.warning(
                "no val split: the tuned model's own rule is exported, with no comparison to the pretrained one"
            )
        skipped = {"skipped": "no val split", "exported": "tuned"}
        return ExportDecision(own, {"export": {**skipped, "chosen": "own"}, "no_harm": skipped})
    kw = {"loss": config.loss, "batch_size": config.eval_batch_size, "ctx": ctx}
    offered = {"own": own, "fire": fire_relax()}
    if config.export != "auto":
        offered = {config.export: offered[config.export]}
    tuned_scores = relax_scores(tuned, offered, val, **kw)
    chosen = min(tuned_scores, key=lambda k: (tuned_scores[k], k != "own"))
    relax = offered[chosen]
    export_record = {"offered": config.export, "val": tuned_scores, "chosen": chosen}
    pretrained = load_initial_model(init, device=ctx.device, dtype=dtype)
    pre_scores = relax_scores(pretrained, pretrained_relaxations(config), val, **kw)
    pre_best = min(pre_scores, key=lambda k: pre_scores[k])
    tuned_wins = not math.isfinite(pre_scores[pre_best]) or tuned_scores[chosen] < pre_scores[pre_best]
    no_harm = {
        "metric": config.loss,
        "pretrained_val_dq": pre_scores[pre_best],
        "pretrained_relax": pre_best,
        "tuned_val_dq": tuned_scores[chosen],
        "exported": "tuned" if tuned_wins else "pretrained",
        "pretrained_scores": pre_scores,
    }
    records = {"export": export_record, "no_harm": no_harm}
    if ctx.is_main:
        log.info("exported relaxation: %s (val %s %s)", chosen, config.loss, _fmt(tuned_scores))
    if tuned_wins:
        if ctx.is_main:
            log.info(
                "no-harm check: the tuned model (val %s %.5g) beats the pretrained model's best (%s: %.5g)",
                config.loss,
                tuned_scores[chosen],
                pre_best,
                pre_scores[pre_best],
            )
        return ExportDecision(relax, records)
    if ctx.is_main:
        log.warning(
            "no-harm check: the tuned model (val %s %.5g) is not better than the pretrained model relaxed by %s "
            "(%.5g); exporting the pretrained model %s with it",
            config.loss,
            tuned_scores[chosen],
            pre_best,
            pre_scores[pre_best],
            init,
        )
    weights = {k: v.detach().cpu().clone() for k, v in pretrained.state_dict().items()}
    return ExportDecision(pretrained_relaxations(config)[pre_best], records, weights)


def _fmt(scores: Mapping[str, float]) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in scores.items())


@torch.no_grad()
def refit_energy_head(model, train, val, *, max_frames: int = 4000, batch_size: int = 32) -> dict[str, Any]:
    """Refit ``model.energy_head`` (a linear map of the final tokens) to the reference energies of the
    train frames, by least squares; keep the new head only if the val frames' energy MAE falls.

    The model's energy is ``E = scale (w . sum_i x_i + b n) + sum_i shift(Z_i)`` over its real atoms,
    linear in ``(w, b)`` given the tokens ``x_i``, so the fit is exact and cheap. Forces never read
    the head, so they are unchanged. Changes ``model`` in place when kept.

    Args:
        model: an ADAPT or ADAPT-MI (anything with ``energy_head``, ``energy_scale``, ``energy_shift``).
        train, val: :class:`~ase_bptt.data.datasets.FrameDataset` of the train and val frames (val may be
            None: then the fit is judged on the train frames).
        max_frames: the train frames used (an even spread over the split).

    Returns:
        ``{"kept", "val_mae_before", "val_mae_after"}`` (meV/atom), or ``{"skipped": why}``.
    """
    head = getattr(model, "energy_head", None)
    if not isinstance(head, torch.nn.Linear) or train is None or train.energy is None:
        return {"skipped": "no linear energy head" if not isinstance(head, torch.nn.Linear) else "no energies"}
    judge = val if val is not None and val.energy is not None else train
    was_training = model.training
    model.eval()
    param = head.weight
    index = torch.linspace(0, len(train) - 1, min(max_frames, len(train))).round().long().unique()
    rows, targets = [], []
    for features, frame in _token_sums(model, train, index, batch_size):
        batch, _, energy = frame
        shift = (model.energy_shift[batch.numbers] * batch.mask).sum(1)
        rows.append(features)
        targets.append((energy.to(features) - shift.to(features)) / model.energy_scale.to(features))
    a, y = torch.cat(rows).double(), torch.cat(targets).double()
    ridge = 1e-8 * float(a.pow(2).sum()) / a.shape[1]  # keeps the solve finite when features repeat
    w = torch.linalg.solve(a.T @ a + ridge * torch.eye(a.shape[1], dtype=a.dtype), a.T @ y)
    before = _energy_mae(model, judge, batch_size)
    old = (head.weight.detach().clone(), head.bias.detach().clone())
    head.weight.copy_(w[:-1].to(param).view_as(head.weight))
    head.bias.copy_(w[-1:].to(param))
    after = _energy_mae(model, judge, batch_size)
    kept = after < before
    if not kept:
        head.weight.copy_(old[0])
        head.bias.copy_(old[1])
    model.train(was_training)
    split = "val" if judge is val else "train"
    return {"kept": kept, f"{split}_mae_before": before, f"{split}_mae_after": after, "frames": len(index)}


def _token_sums(model, frames, index: torch.Tensor, batch_size: int) -> Iterator[tuple[torch.Tensor, Any]]:
    """``(sum of the final tokens over real atoms, with the atom count appended; the FrameBatch)`` per chunk."""
    captured: list[torch.Tensor] = []
    hook = model.energy_head.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0]))
    try:
        for chunk in torch.split(index, batch_size):
            frame = frames.take(chunk)
            captured.clear()
            model(frame.batch)
            mask = frame.batch.mask.to(captured[0].dtype)
            summed = (captured[0] * mask.unsqueeze(-1)).sum(1)
            yield torch.cat([summed, mask.sum(1, keepdim=True)], dim=1), frame
    finally:
        hook.remove()


def _energy_mae(model, frames, batch_size: int) -> float:
    """Energy MAE (meV/atom) of ``model`` over every frame of ``frames``."""
    total, count = 0.0, 0
    for chunk in torch.split(torch.arange(len(frames)), batch_size):
        batch, _, energy = frames.take(chunk)
        out = model(batch).energy
        total += float(((out - energy.to(out)).abs() / batch.mask.sum(1)).sum())
        count += len(chunk)
    return 1000.0 * total / max(count, 1)
