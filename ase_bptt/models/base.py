"""The ForceModel contract every model in ase-bptt implements."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from ase_bptt.batch import Batch
from ase_bptt.errors import AseBpttError

__all__ = ["ModelOutput", "ForceModel", "UnknownElementError"]


class ModelOutput(NamedTuple):
    """What a ForceModel returns.

    Attributes:
        forces: ``(B, N, 3)`` in eV/A, zero on padding atoms.
        energy: ``(B,)`` total energy in eV, or None when the model has none.
    """

    forces: torch.Tensor
    energy: torch.Tensor | None = None


class ForceModel(nn.Module):
    """Base class: ``forward(batch, positions=None) -> ModelOutput``.

    ``positions`` overrides ``batch.positions`` so a relaxer can thread a
    differentiable tensor through many frames without rebuilding the Batch.
    Subclasses set ``species`` (the atomic numbers they were trained on, or
    None for "any"), used to reject unknown elements with a clear error, and
    ``periodic_features`` when they describe atoms by their fractional
    coordinates in a periodic cell (and so cannot evaluate a structure without one).
    """

    species: tuple[int, ...] | None = None
    periodic_features: bool = False

    def forward(
        self, batch: Batch, positions: torch.Tensor | None = None
    ) -> ModelOutput:  # pragma: no cover - interface
        raise NotImplementedError

    def check_species(self, numbers: torch.Tensor | list[int], where: str = "input") -> None:
        """Raise ``UnknownElementError`` if ``numbers`` holds an untrained element."""
        if self.species is None:
            return
        present = {int(z) for z in torch.as_tensor(numbers).flatten().tolist() if int(z) > 0}
        unknown = sorted(present - set(self.species))
        if unknown:
            from ase.data import chemical_symbols

            names = ", ".join(chemical_symbols[z] for z in unknown)
            known = ", ".join(chemical_symbols[z] for z in self.species)
            raise UnknownElementError(
                f"{where} contains {names}, which this model was not trained on "
                f"(it knows {known}). Fine-tune on data that contains {names} first."
            )


class UnknownElementError(AseBpttError, ValueError):
    """A structure holds an element the model was never trained on."""
