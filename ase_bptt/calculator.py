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
from ase_bptt.device import DTYPES, check_device
from ase_bptt.models.base import ForceModel
from ase_bptt.models.domain import NonFiniteResultError, StructureCheck, read_training_domain

__all__ = ["BPTTCalculator"]


class BPTTCalculator(Calculator):
    """ASE calculator around a :class:`~ase_bptt.models.base.ForceModel`.

    Args:
        model_or_path: a checkpoint path (e.g. ``"si.pt"``) or a model object.
            A model object is used as is (put in eval mode, moved to
            ``device``/``dtype`` in place when those are given).
        device: torch device for the model (default: CPU for a checkpoint,
            the model's own device for a model object).
        dtype: floating dtype, ``torch.float64`` or its name ``"float64"`` (default: the
            dtype the weights were saved in / the model's own). Torch's global
            default dtype is never touched.
        **kwargs: passed to :class:`ase.calculators.calculator.Calculator`
            (e.g. ``label``).

    Attributes:
        model: the force model (eval mode).
        checkpoint: the loaded checkpoint dict, or None for a model object.
        relax_settings: the checkpoint's ``relax`` dict (step rule, ``tol``,
            ``max_steps``) or None: how the model was tuned to be relaxed.
        training_domain: the checkpoint's training domain (species, atom
            counts, periodicity; :mod:`ase_bptt.models.domain`) or None.

    Raises:
        DeviceError: ``device`` is unknown or not on this machine (``"cuda"`` without CUDA).
        UnknownElementError: (on calculation) the structure holds an element
            the model was not trained on.
        StructureError: (on calculation) the model cannot evaluate the
            structure: a zero or singular periodic cell, no periodic cell for
            a model with periodic features, ... (see :meth:`check_structure`).
        NonFiniteResultError: the model returned NaN or infinite numbers.
        PropertyNotImplementedError: energy requested from a forces-only model.
    """

    # A tuple (ASE's stubs say list) so no caller can change what every instance implements.
    implemented_properties = ("energy", "free_energy", "forces")  # type: ignore[assignment]

    def __init__(
        self,
        model_or_path: ForceModel | str | os.PathLike,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if device is not None:
            device = check_device(device)
        if isinstance(dtype, str):  # a JSON calculator spec (atomate2, quacc) carries the name
            if dtype not in DTYPES:
                raise ValueError(f"BPTTCalculator dtype must be 'float32' or 'float64', not {dtype!r}")
            dtype = DTYPES[dtype]
        if isinstance(model_or_path, (str, os.PathLike)):
            from ase_bptt.models.checkpoint import load_checkpoint, load_model

            self.source = os.fspath(model_or_path)
            self.checkpoint: dict | None = load_checkpoint(model_or_path)
            model = load_model(self.checkpoint, device=device, dtype=dtype, name=self.source)
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
        ref: torch.Tensor | None = next(iter(model.parameters()), None)
        if ref is None:
            ref = next(iter(model.buffers()), torch.zeros(()))
        self._device = ref.device
        self._dtype = ref.dtype if ref.is_floating_point() else torch.float64
        self.training_domain = None if self.checkpoint is None else read_training_domain(self.checkpoint, self.source)
        self._check = StructureCheck(self.model, self.training_domain, self.source)
        self._checked: tuple | None = None

    @classmethod
    def from_file(cls, path: str | os.PathLike, **kwargs: Any) -> BPTTCalculator:
        """Same as ``BPTTCalculator(path, **kwargs)``."""
        return cls(path, **kwargs)

    @property
    def relax_settings(self) -> dict | None:
        """The checkpoint's ``relax`` dict, or None (model object or no settings saved)."""
        return None if self.checkpoint is None else self.checkpoint.get("relax")

    def check_structure(self, atoms: Atoms, where: str | None = None) -> None:
        """Raise if the model cannot evaluate ``atoms``; warn once per reason if it lies outside the training domain.

        Errors (``UnknownElementError``, ``StructureError``): an untrained
        element, non-finite positions or cell, a zero or singular periodic
        cell, no periodic cell for a model with periodic features, a
        non-periodic direction where every training structure was periodic.
        Warnings (``OutOfDomainWarning``, once per reason and calculator): an
        atom count outside the trained range by more than a factor
        :data:`~ase_bptt.models.domain.ATOM_COUNT_MARGIN`, or a periodicity no
        training structure had. ``calculate`` runs this itself; call it to
        check many structures before relaxing any.
        """
        self._check(atoms, where or f"structure {atoms.get_chemical_formula()}")

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
        # Checked once per composition, periodicity and cell, not at every step.
        key = (tuple(atoms.numbers.tolist()), tuple(atoms.pbc.tolist()), atoms.cell.array.tobytes())
        if key != self._checked:
            self.check_structure(atoms)
            self._checked = key
        batch = Batch.from_atoms(atoms, device=self._device, dtype=self._dtype, constraints=False)
        # no_grad, not inference_mode: a ConservativeForces model needs autograd.
        with torch.no_grad():
            out = self.model(batch)
        forces = out.forces[0].detach().to("cpu", torch.float64).numpy()
        energy = None if out.energy is None else float(out.energy[0])
        if not np.isfinite(forces).all() or (energy is not None and not np.isfinite(energy)):
            raise NonFiniteResultError(
                f"{self.source} gave non-finite (NaN or infinite) energy or forces for structure "
                f"{atoms.get_chemical_formula()}; check the structure's positions and cell, and the model's weights"
            )
        self.results["forces"] = forces
        if energy is not None:
            self.results["energy"] = energy
            self.results["free_energy"] = energy
        elif "energy" in properties or "free_energy" in properties:
            raise PropertyNotImplementedError(
                f"{self.source} predicts forces only (no energy head), so it cannot give 'energy'; "
                "use force-only optimizers (ase_bptt.relax.optimizer.LearnedStepOptimizer) or a model with an energy head"
            )

    def __repr__(self) -> str:
        return f"BPTTCalculator({self.source!r}, device={str(self._device)!r}, dtype={self._dtype})"
