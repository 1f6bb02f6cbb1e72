"""Force models: the ForceModel contract, ADAPT, the conservative wrapper, checkpoints."""

from ase_bptt.models.adapt import ADAPT, ADAPTConfig
from ase_bptt.models.base import ForceModel, ModelOutput, UnknownElementError
from ase_bptt.models.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_model,
    register_model,
    save_checkpoint,
)
from ase_bptt.models.conservative import ConservativeForces

__all__ = [
    "ADAPT",
    "ADAPTConfig",
    "CheckpointError",
    "ConservativeForces",
    "ForceModel",
    "ModelOutput",
    "UnknownElementError",
    "load_checkpoint",
    "load_model",
    "register_model",
    "save_checkpoint",
]
