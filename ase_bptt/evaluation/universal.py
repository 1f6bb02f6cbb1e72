"""What ``evaluate`` adds for checkpoints that tuned a universal MLIP: the untouched base model as a baseline
row, the forgetting measure, and the short eta grid."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from ase_bptt.calculator import BPTTCalculator
from ase_bptt.evaluation.baselines import Baseline
from ase_bptt.relax.defaults import DEFAULT_ETA_GRID, UNIVERSAL_ETA_GRID

__all__ = ["default_eta_grid", "forgetting_entry", "untouched_bases"]

log = logging.getLogger("ase_bptt.evaluation")


def default_eta_grid(models: Mapping[str, torch.nn.Module]) -> tuple[float, ...]:
    """:data:`UNIVERSAL_ETA_GRID` when a model is a universal MLIP (its relaxations cost ~25x), else the default."""
    from ase_bptt.models.universal import UniversalModel

    if any(isinstance(model, UniversalModel) for model in models.values()):
        log.info("a universal MLIP: fixed steps over the eta grid %s", ", ".join(map(str, UNIVERSAL_ETA_GRID)))
        return UNIVERSAL_ETA_GRID
    return DEFAULT_ETA_GRID


def untouched_bases(
    models: Mapping[str, torch.nn.Module], device: torch.device, dtype: torch.dtype
) -> tuple[dict[str, str], dict[str, tuple[Baseline, torch.nn.Module]]]:
    """For the models that tuned a universal MLIP's shipped weights: checkpoint name -> the base's label
    (``"chgnet 0.3.0 (untouched)"``), and label -> (a baseline relaxing with the untouched base, the base model)."""
    from ase_bptt.models.universal import UniversalModel, base_model

    names: dict[str, str] = {}
    bases: dict[str, tuple[Baseline, torch.nn.Module]] = {}
    for name, model in models.items():
        if not isinstance(model, UniversalModel) or model.config.model is None:
            continue
        label = names[name] = f"{model.config.backend} {model.config.model} (untouched)"
        if label not in bases:
            base = base_model(model).eval()
            bases[label] = (Baseline(label, lambda base=base: BPTTCalculator(base, device=device, dtype=dtype)), base)
    return names, bases


def forgetting_entry(model: torch.nn.Module, base: torch.nn.Module, label: str) -> dict[str, Any]:
    """The tuned model's force deviation from ``base`` on structures of other elements
    (:func:`~ase_bptt.backends.forgetting.forgetting`), for the checkpoint's entry."""
    from ase_bptt.backends.forgetting import forgetting

    return {"against": label, **forgetting(model, base).to_dict()}
