"""Validation and content hashing of relaxation trajectories.

Used by :class:`~ase_bptt.data.db.TrajectoryDB` before every write and by the
importers before anything is written.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
from ase import Atoms

from ase_bptt.errors import AseBpttError

__all__ = ["InvalidTrajectoryError", "validate_frames", "content_hash"]


class InvalidTrajectoryError(AseBpttError, ValueError):
    """A trajectory fails validation (too short, missing forces, NaN, ...)."""


def _frame_forces(atoms: Atoms, i: int) -> np.ndarray:
    calc = atoms.calc
    forces = None if calc is None else calc.results.get("forces")
    if forces is None:
        raise InvalidTrajectoryError(f"frame {i} has no forces")
    return np.asarray(forces, dtype=float)


def _frame_energy(atoms: Atoms) -> float | None:
    calc = atoms.calc
    if calc is None:
        return None
    energy = calc.results.get("energy")
    return None if energy is None else float(energy)


def _movable_fmax(atoms: Atoms, forces: np.ndarray) -> float:
    fixed = np.zeros(len(atoms), dtype=bool)
    for c in atoms.constraints:
        idx = getattr(c, "get_indices", None)
        if idx is not None and type(c).__name__ == "FixAtoms":
            fixed[idx()] = True
    f = forces[~fixed]
    return float(np.sqrt((f * f).sum(axis=1)).max()) if len(f) else 0.0


def validate_frames(frames: Sequence[Atoms]) -> None:
    """Check a trajectory before anything is written.

    Rules: at least 2 frames; every frame has forces of shape ``(natoms, 3)``;
    forces, positions and cell are finite, and so is the energy when present;
    the atom count and the species order stay the same along the trajectory.

    Raises:
        InvalidTrajectoryError: with the first rule that fails.
    """
    if len(frames) < 2:
        raise InvalidTrajectoryError(f"{len(frames)} frame(s); a relaxation needs at least 2 (initial and relaxed)")
    numbers0 = frames[0].numbers
    for i, atoms in enumerate(frames):
        if len(atoms) != len(numbers0):
            raise InvalidTrajectoryError(
                f"atom count changes along the trajectory: {len(numbers0)} in frame 0, {len(atoms)} in frame {i}"
            )
        if not np.array_equal(atoms.numbers, numbers0):
            raise InvalidTrajectoryError(f"species order in frame {i} differs from frame 0")
        if not np.isfinite(atoms.positions).all():
            raise InvalidTrajectoryError(f"frame {i} has non-finite positions")
        if not np.isfinite(atoms.cell.array).all():
            raise InvalidTrajectoryError(f"frame {i} has a non-finite cell")
        forces = _frame_forces(atoms, i)
        if forces.shape != (len(atoms), 3):
            raise InvalidTrajectoryError(f"frame {i} has forces of shape {forces.shape}, expected ({len(atoms)}, 3)")
        if not np.isfinite(forces).all():
            raise InvalidTrajectoryError(f"frame {i} has non-finite forces")
        energy = _frame_energy(atoms)
        if energy is not None and not np.isfinite(energy):
            raise InvalidTrajectoryError(f"frame {i} has a non-finite energy")


def content_hash(frames: Sequence[Atoms]) -> str:
    """sha256 over positions, numbers, cell and forces of all frames (hex)."""
    h = hashlib.sha256()
    for i, atoms in enumerate(frames):
        h.update(np.ascontiguousarray(atoms.numbers, dtype=np.int64).tobytes())
        h.update(np.ascontiguousarray(atoms.positions, dtype=np.float64).tobytes())
        h.update(np.ascontiguousarray(atoms.cell.array, dtype=np.float64).tobytes())
        h.update(np.ascontiguousarray(_frame_forces(atoms, i), dtype=np.float64).tobytes())
    return h.hexdigest()
