"""TorchSim side of the throughput benchmark: the same ADAPT model as a TorchSim model, relaxed with TorchSim's FIRE.

Optional: needs ``torch-sim-atomistic`` (``pip install ase-bptt[torchsim]``);
:func:`available` says whether it is importable, and the benchmark skips the
TorchSim rows when it is not.

TorchSim keeps atoms flat (``(n_atoms, 3)`` with a ``system_idx`` per atom);
ADAPT takes a padded :class:`~ase_bptt.batch.Batch`. :class:`ADAPTTorchSimModel`
scatters the flat state into a padded batch and gathers the forces back on
every call: that conversion is part of what a TorchSim user of this model
pays, so it is inside the timing (on CUDA it costs one host read, the padded
width).

Stopping rule, the same on both sides: a structure stops once its largest force
is below ``fmax`` or after ``max_steps`` updates (``ts.optimize`` with a force
convergence function checked after every step and ``steps_between_swaps=1``;
ase-bptt's ``rollout(..., fmax=fmax, tol=None)``). Both FIREs follow ASE's
(``md_flavor="ase_fire"`` in TorchSim); they differ in epsilons (TorchSim adds
1e-8 in float32 to norms, ase-bptt uses epsilon-safe norms), so positions agree
to rounding until a branch (uphill reset, max-step cap, the fmax test) flips
on a near tie, after which trajectories may part.
"""

from __future__ import annotations

import importlib.util
import warnings
from typing import Any

import numpy as np
import torch

__all__ = ["available", "ADAPTTorchSimModel", "relax_torchsim"]


def available() -> bool:
    """True when ``torch_sim`` (package ``torch-sim-atomistic``) can be imported."""
    return importlib.util.find_spec("torch_sim") is not None


def _model_class() -> type:
    from torch_sim.models.interface import ModelInterface

    from ase_bptt.batch import Batch

    class _ADAPTTorchSimModel(ModelInterface):
        """An ase-bptt ForceModel behind TorchSim's ``ModelInterface`` (energy and forces, no stress)."""

        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.model = model
            ref = next(model.parameters())
            self._device, self._dtype = ref.device, ref.dtype
            self._compute_forces, self._compute_stress = True, False
            self._memory_scales_with = "n_atoms"

        def forward(self, state: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
            positions, system_idx = state.positions, state.system_idx
            n_systems = int(state.cell.shape[0])
            counts = torch.bincount(system_idx, minlength=n_systems)
            starts = torch.cumsum(counts, 0) - counts
            slot = torch.arange(len(system_idx), device=positions.device) - starts[system_idx]
            width = int(counts.max())
            padded = torch.zeros(n_systems, width, 3, dtype=positions.dtype, device=positions.device)
            padded[system_idx, slot] = positions
            mask = torch.zeros(n_systems, width, dtype=torch.bool, device=positions.device)
            mask[system_idx, slot] = True
            numbers = torch.zeros(n_systems, width, dtype=torch.long, device=positions.device)
            numbers[system_idx, slot] = state.atomic_numbers.long()
            masses = torch.zeros(n_systems, width, dtype=positions.dtype, device=positions.device)
            masses[system_idx, slot] = state.masses
            pbc = torch.full((n_systems, 3), bool(state.pbc), dtype=torch.bool, device=positions.device)
            # TorchSim stores cells as column vectors; ase-bptt (like ASE) as rows.
            cell = state.cell.transpose(1, 2)
            batch = Batch(padded, numbers, masses, mask, torch.zeros_like(mask), cell, pbc)
            out = self.model(batch)
            energy = out.energy if out.energy is not None else torch.zeros(n_systems, dtype=positions.dtype)
            return {"energy": energy, "forces": out.forces[system_idx, slot]}

    return _ADAPTTorchSimModel


def ADAPTTorchSimModel(model: torch.nn.Module) -> Any:  # noqa: N802 (a class built on first use)
    """Wrap an ase-bptt ForceModel (e.g. ADAPT) as a ``torch_sim`` model."""
    return _model_class()(model)


def relax_torchsim(model: torch.nn.Module, cells: list, *, fmax: float, max_steps: int) -> tuple[list, list[int]]:
    """Relax ``cells`` together with TorchSim's FIRE (ASE flavour) and ``ts.optimize``.

    Returns:
        The relaxed positions (one ``(n_i, 3)`` array per cell) and, per cell, the
        number of FIRE updates TorchSim reports (``-1`` where it does not say).
    """
    import torch_sim as ts
    from torch_sim.runners import generate_force_convergence_fn

    wrapped = ADAPTTorchSimModel(model)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimize has reached max steps")  # the stopping rule, not a fault
        final = ts.optimize(
            system=cells,
            model=wrapped,
            optimizer=ts.optimizers.fire,
            convergence_fn=generate_force_convergence_fn(fmax, include_cell_forces=False),
            max_steps=max_steps,
            steps_between_swaps=1,
            autobatcher=False,
            md_flavor="ase_fire",
        )
    positions = final.positions.detach().double().cpu().numpy()
    idx = final.system_idx.cpu().numpy()
    return [positions[idx == i] for i in range(len(cells))], [-1] * len(cells)


def max_position_difference(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """Largest |dx| (A) between two lists of position arrays."""
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b))
