"""Relaxations in torch: step rules, differentiable FIRE, DifferentiableRelaxer, LearnedStepOptimizer."""

from __future__ import annotations

from ase_bptt.relax.fire import FIREStep
from ase_bptt.relax.optimizer import LearnedStepOptimizer
from ase_bptt.relax.relaxer import DifferentiableRelaxer, RolloutResult, rollout
from ase_bptt.relax.steps import (
    DecoderStep,
    FixedStep,
    LearnedStep,
    StepRule,
    make_step_rule,
    relax_settings,
    rule_from_relax_settings,
    step_rule_from_dict,
)

__all__ = [
    "StepRule",
    "FixedStep",
    "LearnedStep",
    "DecoderStep",
    "FIREStep",
    "make_step_rule",
    "step_rule_from_dict",
    "relax_settings",
    "rule_from_relax_settings",
    "rollout",
    "RolloutResult",
    "DifferentiableRelaxer",
    "LearnedStepOptimizer",
]
