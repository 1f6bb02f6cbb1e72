"""ConservativeForces: turn any torch energy model into a ForceModel (``F = -dE/dX``).

BPTT only needs a differentiable map from positions to forces, so it works for
energy-conserving MLIPs too: wrap the energy model, and the forces are the
negative position gradient of the energy, computed with ``create_graph=True``
while gradients are enabled so the relaxer can backpropagate through them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from ase_bptt.batch import Batch
from ase_bptt.models.base import ForceModel, ModelOutput

__all__ = ["ConservativeForces"]

EnergyModel = Callable[[Batch, torch.Tensor], "torch.Tensor | ModelOutput"]


class ConservativeForces(ForceModel):
    """Forces as ``-dE/dX`` of a wrapped energy model.

    Args:
        energy_model: a callable (usually an ``nn.Module``) taking
            ``(batch, positions)`` and returning the total energy ``(B,)`` in
            eV, or a :class:`ModelOutput` whose ``energy`` is used. It must
            ignore padding atoms (``batch.mask``) and keep their gradient
            finite: padding atoms all sit at the origin, so mask pair
            distances before a ``sqrt``, not after.

    While gradients are enabled, ``F.scaled_dot_product_attention`` inside the
    energy model runs on its math kernel, the one with a double backward
    (e.g. for ADAPT's energy head).

    Under ``torch.no_grad()`` (e.g. in a calculator) gradients are enabled
    locally for the positions only and the result carries no graph. Under
    ``torch.inference_mode()`` no gradient can be taken at all: use
    ``no_grad`` instead. Forces are zero on padding; fixed atoms are left to
    the relaxer or ASE.
    """

    def __init__(self, energy_model: EnergyModel) -> None:
        super().__init__()
        self.energy_model = energy_model

    @property
    def species(self) -> tuple[int, ...] | None:  # type: ignore[override]
        return getattr(self.energy_model, "species", None)

    @property
    def periodic_features(self) -> bool:  # type: ignore[override]
        return bool(getattr(self.energy_model, "periodic_features", False))

    def forward(self, batch: Batch, positions: torch.Tensor | None = None) -> ModelOutput:
        """``ModelOutput(forces=-dE/dX, energy=E)`` for a Batch."""
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                "ConservativeForces needs autograd for -dE/dX; call it under torch.no_grad(), "
                "not torch.inference_mode()"
            )
        training_graph = torch.is_grad_enabled()
        pos = batch.positions if positions is None else positions
        with torch.enable_grad():
            if not pos.requires_grad:
                # A leaf of our own: never flips requires_grad on the caller's tensor.
                pos = pos.detach().requires_grad_(True)
            if training_graph:
                # Training backpropagates through -dE/dX (a double backward).
                # The fused CPU/GPU attention kernels have no double backward;
                # the math kernel is built of ordinary differentiable ops.
                with sdpa_kernel(SDPBackend.MATH):
                    out = self.energy_model(batch, pos)
            else:
                out = self.energy_model(batch, pos)
            energy = out.energy if isinstance(out, ModelOutput) else out
            if energy is None:
                raise ValueError(f"{type(self.energy_model).__name__} returned no energy; ConservativeForces needs one")
            (grad,) = torch.autograd.grad(energy.sum(), pos, create_graph=training_graph, allow_unused=True)
        if grad is None:  # the energy does not depend on positions
            grad = torch.zeros_like(pos)
        forces = -grad * batch.mask.unsqueeze(-1).to(grad.dtype)
        if not training_graph:
            forces, energy = forces.detach(), energy.detach()
        return ModelOutput(forces=forces, energy=energy)
