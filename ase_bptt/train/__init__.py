"""Training: pretrain (force/energy matching) and finetune (BPTT).

The entry points are ``ase_bptt.pretrain`` and ``ase_bptt.finetune`` (or
``ase_bptt.train.pretrain.pretrain``): a function here named like its module
would be shadowed by the module once imported. The rest is imported lazily so
``import ase_bptt.train`` stays cheap.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "PretrainConfig": "ase_bptt.train.pretrain",
    "FinetuneConfig": "ase_bptt.train.finetune",
    "grid_search_eta": "ase_bptt.train.finetune",
    "TrainingError": "ase_bptt.runs.errors",
    "TrainingInterrupted": "ase_bptt.runs.errors",
    "ConfigMismatchError": "ase_bptt.runs.errors",
    "EmptySplitError": "ase_bptt.runs.errors",
    "StateError": "ase_bptt.runs.state",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ase_bptt.train' has no attribute {name!r}")
