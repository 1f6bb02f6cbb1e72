"""Force models: the ForceModel contract, ADAPT and its minimum-image variant, the conservative wrapper,
universal MLIPs (a backend as a ForceModel), checkpoints."""

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
from ase_bptt.models.mi_attention import MinImageADAPT, MinImageADAPTConfig
from ase_bptt.models.universal import UniversalConfig, UniversalModel, base_model, load_universal_model

__all__ = [
    "ADAPT",
    "ADAPTConfig",
    "CheckpointError",
    "ConservativeForces",
    "ForceModel",
    "MinImageADAPT",
    "MinImageADAPTConfig",
    "ModelOutput",
    "UniversalConfig",
    "UniversalModel",
    "UnknownElementError",
    "base_model",
    "load_checkpoint",
    "load_model",
    "load_universal_model",
    "register_model",
    "save_checkpoint",
]
