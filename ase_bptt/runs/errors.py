"""The errors of a training run."""

from __future__ import annotations

from ase_bptt.errors import AseBpttError
from ase_bptt.runs.state import StateError

__all__ = ["TrainingError", "TrainingInterrupted", "ConfigMismatchError", "EmptySplitError"]


class TrainingError(AseBpttError, RuntimeError):
    """Training cannot go on (e.g. every batch was non-finite)."""


class TrainingInterrupted(AseBpttError, RuntimeError):
    """SIGINT stopped the run after the state was saved; the message says how to resume."""


class ConfigMismatchError(StateError):
    """An output or state file belongs to another configuration or database."""


class EmptySplitError(AseBpttError, ValueError):
    """A split the run needs holds no data."""
