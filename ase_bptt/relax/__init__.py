"""Relaxations in torch: step rules, differentiable FIRE, DifferentiableRelaxer, LearnedStepOptimizer.

Importing this package registers the built-in step rules (``fixed``,
``learned``, ``decoder``, ``fire``) in :mod:`ase_bptt.relax.registry`.
"""

from __future__ import annotations

# The step-size rules register first: the order the CLI's --step lists them.
from ase_bptt.relax.steps import DecoderStep, FixedStep, LearnedStep

# isort: split
from ase_bptt.relax.base import StepRule, StepRuleError
from ase_bptt.relax.fire import FIREStep
from ase_bptt.relax.optimizer import LearnedStepOptimizer
from ase_bptt.relax.registry import (
    make_step_rule,
    register_step_rule,
    relax_settings,
    rule_from_relax_settings,
    step_rule_from_dict,
    step_rule_names,
    unregister_step_rule,
)
from ase_bptt.relax.relaxer import DifferentiableRelaxer, RolloutResult, rollout

__all__ = [
    "StepRule",
    "StepRuleError",
    "FixedStep",
    "LearnedStep",
    "DecoderStep",
    "FIREStep",
    "register_step_rule",
    "unregister_step_rule",
    "step_rule_names",
    "make_step_rule",
    "step_rule_from_dict",
    "relax_settings",
    "rule_from_relax_settings",
    "rollout",
    "RolloutResult",
    "DifferentiableRelaxer",
    "LearnedStepOptimizer",
]
