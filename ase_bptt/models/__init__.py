"""Force models: the ForceModel contract, ADAPT, the conservative wrapper, checkpoints."""

from ase_bptt.models.base import ForceModel, ModelOutput, UnknownElementError

__all__ = ["ForceModel", "ModelOutput", "UnknownElementError"]
