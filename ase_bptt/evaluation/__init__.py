"""Evaluation: how checkpoints relax a split's structures against the references, and the report.

``evaluate`` runs the methods (ASE FIRE, the fixed-step grid, each checkpoint's exported relaxation,
baseline calculators), compares them structure by structure and writes report.md, report.json and the
plots. Entry points are imported lazily so ``import ase_bptt.evaluation`` stays cheap.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "evaluate": "ase_bptt.evaluation.pipeline",
    "NoStepRuleError": "ase_bptt.evaluation.pipeline",
    "summary_text": "ase_bptt.evaluation.report",
    "BaselineError": "ase_bptt.evaluation.baselines",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ase_bptt.evaluation' has no attribute {name!r}")
