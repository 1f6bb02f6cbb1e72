"""ase-bptt: fine-tune MLIPs by backpropagation through whole relaxations.

Public entry points are imported lazily so ``import ase_bptt`` stays cheap
(the CLI and the calculator should not pay for each other's imports).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "Batch": "ase_bptt.batch",
    "BPTTCalculator": "ase_bptt.calculator",
    "DifferentiableRelaxer": "ase_bptt.relax.relaxer",
    "LearnedStepOptimizer": "ase_bptt.relax.optimizer",
    "ADAPT": "ase_bptt.models.adapt",
    "ADAPTConfig": "ase_bptt.models.adapt",
    "MinImageADAPT": "ase_bptt.models.mi_attention",
    "MinImageADAPTConfig": "ase_bptt.models.mi_attention",
    "ConservativeForces": "ase_bptt.models.conservative",
    "UniversalModel": "ase_bptt.models.universal",
    "load_universal_model": "ase_bptt.models.universal",
    "load_checkpoint": "ase_bptt.models.checkpoint",
    "save_checkpoint": "ase_bptt.models.checkpoint",
    "load_model": "ase_bptt.models.checkpoint",
    "UnknownElementError": "ase_bptt.models.base",
    "pretrain": "ase_bptt.train.pretrain",
    "PretrainConfig": "ase_bptt.train.pretrain",
    "finetune": "ase_bptt.train.finetune",
    "FinetuneConfig": "ase_bptt.train.finetune",
    "evaluate": "ase_bptt.evaluation.pipeline",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ase_bptt' has no attribute {name!r}")
