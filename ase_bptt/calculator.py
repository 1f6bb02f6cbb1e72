"""BPTTCalculator: a tuned (or any) ase-bptt force model as an ordinary ASE calculator.

    from ase_bptt import BPTTCalculator
    atoms.calc = BPTTCalculator("si.pt")
    FIRE(atoms).run(fmax=0.05)

Energies are in eV and forces in eV/A. Constraints such as ``FixAtoms`` are
applied by ASE itself (the calculator returns raw forces), so every ASE
optimizer, ``ase.db`` and ``ase.io`` work unchanged.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes

from ase_bptt.batch import Batch
from ase_bptt.models.base import ForceModel

__all__ = ["BPTTCalculator"]


class BPTTCalculator(Calculator):
    """ASE calculator around a :class:`~ase_bptt.models.base.ForceModel`.

    Args:
        model_or_path: a checkpoint path (e.g. ``"si.pt"``) or a model object.
            A model object is used as is (put in eval mode, moved to
            ``device``/``dtype`` in place when those are given).
        device: torch device for the model (default: CPU for a checkpoint,
            the model's own device for a model object).
        dtype: floating dtype, e.g. ``torch.float64`` (default: the dtype the
            weights were saved in / the model's own). Torch's global default
            dtype is never touched.
        **kwargs: passed to :class:`ase.calculators.calculator.Calculator`
            (e.g. ``label``).

    Attributes:
        model: the force model (eval mode).
        checkpoint: the loaded checkpoint dict, or None for a model object.
        relax_settings: the checkpoint's ``relax`` dict (step rule, ``tol``,
            ``max_steps``) or None: how the model was tuned to be relaxed.

    Raises:
        UnknownElementError: (on calculation) the structure holds an element
            the model was not trained on.
        PropertyNotImplementedError: energy requested from a forces-only model.
    """

    implemented_properties = ("energy", "free_energy", "forces")

    def __init__(
        self,
        model_or_path: ForceModel | str | os.PathLike,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if isinstance(model_or_path, (str, os.PathLike)):
            from ase_bptt.models.checkpoint import load_checkpoint, load_model

            self.checkpoint: dict | None = load_checkpoint(model_or_path)
            model = load_model(self.checkpoint, device=device, dtype=dtype)
            self.source = os.fspath(model_or_path)
        elif isinstance(model_or_path, torch.nn.Module):
            self.checkpoint = None
            model = model_or_path
            if device is not None or dtype is not None:
                model.to(device=device, dtype=dtype)
            self.source = type(model).__name__
        else:
            raise TypeError(
                f"BPTTCalculator takes a checkpoint path or a torch model, not {type(model_or_path).__name__}"
            )
        self.model = model.eval()
        ref = next(iter(model.parameters()), None)
        if ref is None:
            ref = next(iter(model.buffers()), torch.zeros(()))
        self._device = ref.device
        self._dtype = ref.dtype if ref.is_floating_point() else torch.float64
        self._checked: tuple[int, ...] | None = None

    @classmethod
    def from_file(cls, path: str | os.PathLike, **kwargs: Any) -> BPTTCalculator:
        """Same as ``BPTTCalculator(path, **kwargs)``."""
        return cls(path, **kwargs)

    @property
    def relax_settings(self) -> dict | None:
        """The checkpoint's ``relax`` dict, or None (model object or no settings saved)."""
        return None if self.checkpoint is None else self.checkpoint.get("relax")

    def check_state(self, atoms: Atoms, tol: float = 1e-15) -> list[str]:
        """Changes since the last calculation: ASE's answer, with an exact fast path.

        When every property ASE compares (cell, pbc and each per-atom array it
        checks: positions, numbers, tags, momenta, masses, magnetic moments,
        charges) is bit-for-bit equal, nothing changed and ASE's tolerance
        comparison is skipped (``np.array_equal`` is cheaper than its
        ``allclose``-style test, and an ASE optimizer asks every step).
        Otherwise ASE's own :func:`~ase.calculators.calculator.compare_atoms`
        decides, so the answer is always exactly ASE's: the fast path returns
        "unchanged" only for identical values, which ASE's tolerance also
        calls unchanged.
        """
        old = self.atoms
        if old is not None and len(old) == len(atoms) and self._identical(old, atoms):
            return []
        return super().check_state(atoms, tol=tol)

    def _identical(self, old: Atoms, atoms: Atoms) -> bool:
        checked = set(all_changes) - set(self.ignored_changes)
        if "cell" in checked and not np.array_equal(old.cell.array, atoms.cell.array):
            return False
        if "pbc" in checked and not np.array_equal(old.pbc, atoms.pbc):
            return False
        arrays_old, arrays_new = old.arrays, atoms.arrays
        if checked & (set(arrays_old) ^ set(arrays_new)):
            return False
        return all(np.array_equal(arrays_old[name], arrays_new[name]) for name in checked & set(arrays_old))

    def calculate(
        self,
        atoms: Atoms | None = None,
        properties: list[str] | tuple[str, ...] = ("energy",),
        system_changes: list[str] = all_changes,
    ) -> None:
        super().calculate(atoms, properties, system_changes)
        atoms = self.atoms
        numbers = tuple(atoms.numbers.tolist())
        if numbers != self._checked:  # the species check runs once per composition
            check = getattr(self.model, "check_species", None)
            if check is not None:
                check(atoms.numbers, where=f"structure {atoms.get_chemical_formula()}")
            self._checked = numbers
        batch = Batch.from_atoms(atoms, device=self._device, dtype=self._dtype, constraints=False)
        # no_grad, not inference_mode: a ConservativeForces model needs autograd.
        with torch.no_grad():
            out = self.model(batch)
        self.results["forces"] = out.forces[0].detach().to("cpu", torch.float64).numpy()
        if out.energy is not None:
            energy = float(out.energy[0])
            self.results["energy"] = energy
            self.results["free_energy"] = energy
        elif "energy" in properties or "free_energy" in properties:
            raise PropertyNotImplementedError(
                f"{self.source} predicts forces only (no energy head), so it cannot give 'energy'; "
                "use force-only optimizers (ase_bptt.relax.optimizer.LearnedStepOptimizer) or a model with an energy head"
            )

    def __repr__(self) -> str:
        return f"BPTTCalculator({self.source!r}, device={str(self._device)!r}, dtype={self._dtype})"
