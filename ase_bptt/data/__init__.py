"""Trajectory data: the database, importers, reference generators, datasets.

Names are imported lazily so ``import ase_bptt.data`` does not pull in torch
or the generators' calculators.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "TrajectoryDB": "ase_bptt.data.db",
    "Trajectory": "ase_bptt.data.db",
    "TrajectoryDBError": "ase_bptt.data.db",
    "NotATrajectoryDBError": "ase_bptt.data.db",
    "InvalidTrajectoryError": "ase_bptt.data.db",
    "DuplicateTrajectoryError": "ase_bptt.data.db",
    "ImportReport": "ase_bptt.data.ingest",
    "import_paths": "ase_bptt.data.ingest",
    "SplitFractions": "ase_bptt.data.splits",
    "HoldOut": "ase_bptt.data.splits",
    "RECIPES": "ase_bptt.data.recipes",
    "MissingDependencyError": "ase_bptt.data.recipes",
    "FrameDataset": "ase_bptt.data.datasets",
    "RelaxationDataset": "ase_bptt.data.datasets",
    "FrameBatch": "ase_bptt.data.datasets",
    "RelaxationBatch": "ase_bptt.data.datasets",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ase_bptt.data' has no attribute {name!r}")
