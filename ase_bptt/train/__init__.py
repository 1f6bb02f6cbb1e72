"""Training: pretrain (force/energy matching), finetune (BPTT), evaluate.

Entry points are imported lazily so ``import ase_bptt.train`` stays cheap.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "PretrainConfig": "ase_bptt.train.pretrain",
    "pretrain": "ase_bptt.train.pretrain",
    "FinetuneConfig": "ase_bptt.train.finetune",
    "finetune": "ase_bptt.train.finetune",
    "grid_search_eta": "ase_bptt.train.finetune",
    "TrainingError": "ase_bptt.train.common",
    "TrainingInterrupted": "ase_bptt.train.common",
    "ConfigMismatchError": "ase_bptt.train.common",
    "EmptySplitError": "ase_bptt.train.common",
    "StateError": "ase_bptt.train.state",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ase_bptt.train' has no attribute {name!r}")
