"""The ForceModel contract every model in ase-bptt implements."""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any, NamedTuple, Self

import torch
from torch import nn

from ase_bptt.batch import Batch
from ase_bptt.errors import AseBpttError

__all__ = ["ModelConfig", "ModelOutput", "ForceModel", "UnknownElementError"]


class ModelConfig:
    """JSON-like round trip of a model's config dataclass (stored in checkpoints).

    Tuples become lists in :meth:`to_dict`; the subclass's ``__post_init__``
    turns them back into tuples, so :meth:`from_dict` only refuses unknown keys.
    Subclasses are dataclasses (the ignores below: mypy cannot know that here).
    """

    def to_dict(self) -> dict[str, Any]:
        """JSON-like dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Self:
        """Inverse of :meth:`to_dict`; unknown keys are an error (a newer model)."""
        unknown = sorted(set(d) - {f.name for f in fields(cls)})  # type: ignore[arg-type]
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys {unknown}; upgrade ase-bptt to load this model")
        return cls(**d)


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
