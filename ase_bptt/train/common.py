"""The errors of a training run, and the names this module held before it was split.

The jobs it held live in their own modules now: configs, JSON, hashes and
seeds in :mod:`ase_bptt.train.config`; the epoch loop, schedule and SIGINT
handling in :mod:`ase_bptt.train.loop`; the resume decision in
:mod:`ase_bptt.train.resume`; the run skeleton in :mod:`ase_bptt.train.run`;
the data containers in :mod:`ase_bptt.data.datasets`. The names other modules
import from here stay importable.
"""

from __future__ import annotations

from ase_bptt.data.datasets import load_frames, load_relaxations, open_db
from ase_bptt.errors import AseBpttError
from ase_bptt.train.config import RUN_CONTROL, config_hash, fingerprint, resolve_dtype, run_header, seed_generator
from ase_bptt.train.state import StateError

__all__ = [
    "TrainingError",
    "TrainingInterrupted",
    "ConfigMismatchError",
    "EmptySplitError",
    # kept importable from here (moved):
    "RUN_CONTROL",
    "config_hash",
    "fingerprint",
    "load_frames",
    "load_relaxations",
    "open_db",
    "resolve_dtype",
    "run_header",
    "seed_generator",
]


class TrainingError(AseBpttError, RuntimeError):
    """Training cannot go on (e.g. every batch was non-finite)."""


class TrainingInterrupted(AseBpttError, RuntimeError):
    """SIGINT stopped the run after the state was saved; the message says how to resume."""


class ConfigMismatchError(StateError):
    """An output or state file belongs to another configuration or database."""


class EmptySplitError(AseBpttError, ValueError):
    """A split the run needs holds no data."""
