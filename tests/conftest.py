"""Shared fixtures: small silicon cells and tiny models, so the suite stays fast."""

from __future__ import annotations

import os

# Before numpy loads: OpenBLAS threads fighting torch's make ASE's BFGS 5x slower.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from pathlib import Path

import numpy as np
import pytest
import torch
from ase.build import bulk

# Keep the suite predictable on a 2-core CI machine.
torch.set_num_threads(2)

#: Real VASP relaxations committed with the tests (sources and licences: data/vasp/SOURCES.md).
VASP_DATA = Path(__file__).resolve().parent / "data" / "vasp"


def silicon_vacancy(repeat: int = 2, rattle: float = 0.1, seed: int = 0):
    """Diamond Si, ``repeat`` conventional cells per side, one vacancy, rattled."""
    atoms = bulk("Si", "diamond", a=5.43, cubic=True) * (repeat, repeat, repeat)
    del atoms[0]
    rng = np.random.default_rng(seed)
    atoms.positions += rng.normal(scale=rattle, size=atoms.positions.shape)
    return atoms


@pytest.fixture
def si_vacancy():
    """Rattled 64-site silicon cell with one vacancy (63 atoms)."""
    return silicon_vacancy()


@pytest.fixture
def si_small():
    """Rattled 8-site silicon cell with one vacancy (7 atoms): for gradient checks."""
    return silicon_vacancy(repeat=1, rattle=0.05, seed=1)


@pytest.fixture
def vasp_data() -> Path:
    """``tests/data/vasp``: real VASP outputs in the repository (read them, never write)."""
    return VASP_DATA
