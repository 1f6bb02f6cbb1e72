"""Forgetting: how far a tuned universal model's forces moved from its base model's, away from the tuning data.

Fine-tuning a universal MLIP on silicon defects should not unlearn the rest of
the periodic table. :func:`forgetting` measures the per-atom force deviation
``|F_tuned - F_base|`` (eV/A) on :func:`forgetting_structures`: a small fixed
set of bulk crystals and surfaces of elements other than silicon, built with
``ase.build`` and rattled with a fixed seed, so every run measures the same
structures. Zero means nothing was forgotten; compare it with the base model's
typical force error (tens of meV/A for CHGNet on its own training data).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from ase import Atoms
from ase.build import bulk, fcc100, fcc111

from ase_bptt.batch import Batch
from ase_bptt.errors import AseBpttError

__all__ = [
    "FORGETTING_RATTLE",
    "FORGETTING_SEED",
    "ForceDeviation",
    "NonFiniteForcesError",
    "forgetting",
    "forgetting_structures",
]

#: Standard deviation (A) of the Gaussian rattle applied to every forgetting structure.
FORGETTING_RATTLE = 0.05
#: Seed of that rattle (one generator, structures drawn in the order below).
FORGETTING_SEED = 2024


def forgetting_structures() -> list[Atoms]:
    """Bulk crystals and surfaces of elements other than Si (68 atoms in 10 structures), rattled, fixed seed.

    Metals (Cu, Al, Fe, W), ionic (NaCl, MgO), covalent (GaAs, diamond C) and two
    slabs (Cu(111), Pt(100), 10 A of vacuum), so forgetting is measured across
    bonding types. ``atoms.info["label"]`` names each one.
    """
    structures = [
        ("Cu fcc", bulk("Cu", "fcc", a=3.61, cubic=True)),
        ("Al fcc", bulk("Al", "fcc", a=4.05, cubic=True)),
        ("Fe bcc", bulk("Fe", "bcc", a=2.87, cubic=True) * (2, 1, 1)),
        ("W bcc", bulk("W", "bcc", a=3.17, cubic=True) * (2, 1, 1)),
        ("NaCl rocksalt", bulk("NaCl", "rocksalt", a=5.64, cubic=True)),
        ("MgO rocksalt", bulk("MgO", "rocksalt", a=4.21, cubic=True)),
        ("GaAs zincblende", bulk("GaAs", "zincblende", a=5.65, cubic=True)),
        ("C diamond", bulk("C", "diamond", a=3.57, cubic=True)),
        ("Cu(111) slab", fcc111("Cu", size=(2, 2, 3), vacuum=5.0, periodic=True)),
        ("Pt(100) slab", fcc100("Pt", size=(2, 2, 2), vacuum=5.0, periodic=True)),
    ]
    rng = np.random.default_rng(FORGETTING_SEED)
    out = []
    for label, atoms in structures:
        atoms.positions += rng.normal(scale=FORGETTING_RATTLE, size=atoms.positions.shape)
        atoms.info["label"] = label
        out.append(atoms)
    return out


class NonFiniteForcesError(AseBpttError, FloatingPointError):
    """A model gave NaN or infinite forces on a forgetting structure (its weights diverged?)."""


@dataclass(frozen=True)
class ForceDeviation:
    """Per-atom force deviation between two models (eV/A).

    Attributes:
        mean: mean over all atoms of ``|F_a - F_b|``.
        max: its largest value.
        rms: root mean square of ``|F_a - F_b|``.
        n_structures, n_atoms: what was measured.
        per_structure: label -> mean deviation of that structure.
    """

    mean: float
    max: float
    rms: float
    n_structures: int
    n_atoms: int
    per_structure: dict[str, float]

    def to_dict(self) -> dict:
        """JSON-like dict (for reports)."""
        return asdict(self)


def _forces(model: torch.nn.Module, atoms: Atoms) -> np.ndarray:
    ref = next(iter(model.parameters()))
    batch = Batch.from_atoms(atoms, device=ref.device, dtype=ref.dtype, constraints=False)
    with torch.no_grad():  # not inference_mode: conservative models need autograd for -dE/dX
        return model(batch).forces[0].detach().cpu().double().numpy()


def forgetting(
    tuned: torch.nn.Module, base: torch.nn.Module, structures: Sequence[Atoms] | None = None
) -> ForceDeviation:
    """Force deviation of ``tuned`` from ``base`` on ``structures`` (default :func:`forgetting_structures`).

    Both are ForceModels (e.g. a tuned :class:`~ase_bptt.models.universal.UniversalModel` and
    :func:`~ase_bptt.models.universal.base_model` of it); structures are evaluated one at a
    time under ``torch.no_grad``, each model in its own dtype and device.

    Raises:
        NonFiniteForcesError: a model gave non-finite forces.
    """
    structures = forgetting_structures() if structures is None else list(structures)
    per_atom, per_structure = [], {}
    for k, atoms in enumerate(structures):
        delta = np.linalg.norm(_forces(tuned, atoms) - _forces(base, atoms), axis=1)
        if not np.isfinite(delta).all():
            raise NonFiniteForcesError(
                f"forgetting: a model gave non-finite forces on structure {k} ({atoms.get_chemical_formula()}); "
                "check the tuned weights (a diverged run?)"
            )
        per_atom.append(delta)
        per_structure[str(atoms.info.get("label", f"{k}: {atoms.get_chemical_formula()}"))] = float(delta.mean())
    values = np.concatenate(per_atom)
    return ForceDeviation(
        mean=float(values.mean()),
        max=float(values.max()),
        rms=float(np.sqrt((values**2).mean())),
        n_structures=len(structures),
        n_atoms=len(values),
        per_structure=per_structure,
    )
