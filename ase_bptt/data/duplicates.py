"""The same relaxation from two files: duplicate trajectories found by content within a tolerance.

One VASP run is often kept twice (``vasprun.xml`` and ``OUTCAR``), or one
relaxation saved as ``.traj`` and as extended XYZ; the files differ in the
last digits they print, so comparing exact bytes would import it twice and
could put one copy in train and the other in test. Two trajectories are
*the same relaxation* when

- they have the same number of frames, the same atoms in the same order
  (atomic numbers) and the same periodicity, and
- in every frame each cell vector component agrees within
  :data:`POSITION_TOL` and each atom's position agrees within
  :data:`POSITION_TOL` per Cartesian component, compared by minimum image
  along periodic directions (an atom written on the other side of the cell
  is the same atom).

Forces and energies are not compared: the files print them at different
precisions, and a relaxation is identified by where its atoms went. Values
are compared directly, within the tolerance, not by a rounded hash (two
numbers 1e-9 A apart can round to different grid points).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from ase import Atoms

__all__ = ["POSITION_TOL", "Shape", "StoredRelaxations", "same_frames", "same_relaxation", "shape_of"]

#: Largest difference (A) of a position or cell component between two copies of one relaxation.
POSITION_TOL = 1e-4


@dataclass(frozen=True)
class Shape:
    """What two copies of one relaxation share exactly: frame count, atomic numbers, periodicity."""

    n_frames: int
    numbers: tuple[int, ...]
    pbc: tuple[bool, ...]


def shape_of(n_frames: int, numbers: Sequence[int], pbc: Sequence[bool]) -> Shape:
    return Shape(int(n_frames), tuple(int(z) for z in numbers), tuple(bool(p) for p in pbc))


def same_frames(
    positions_a: np.ndarray,
    cell_a: np.ndarray,
    positions_b: np.ndarray,
    cell_b: np.ndarray,
    pbc: Sequence[bool],
    tol: float = POSITION_TOL,
) -> bool:
    """Whether two frames of the same atoms agree within ``tol`` (A): cells componentwise, positions by minimum image."""
    cell_a, cell_b = np.asarray(cell_a, dtype=float), np.asarray(cell_b, dtype=float)
    if np.abs(cell_a - cell_b).max() > tol:
        return False
    delta = np.asarray(positions_b, dtype=float) - np.asarray(positions_a, dtype=float)
    periodic = np.asarray(pbc, dtype=bool)
    if periodic.any():
        # Fractional differences along periodic directions wrapped to [-0.5, 0.5): an atom written
        # a lattice vector away is the same atom.
        frac = np.linalg.solve(cell_a.T, delta.T).T if np.linalg.matrix_rank(cell_a) == 3 else None
        if frac is not None:
            frac[:, periodic] -= np.round(frac[:, periodic])
            delta = frac @ cell_a
    return bool(np.abs(delta).max(initial=0.0) <= tol)


def same_relaxation(frames_a: Sequence[Atoms], frames_b: Sequence[Atoms], tol: float = POSITION_TOL) -> bool:
    """Whether two trajectories are the same relaxation (see the module docstring)."""
    a0, b0 = frames_a[0], frames_b[0]
    if shape_of(len(frames_a), a0.numbers, a0.pbc) != shape_of(len(frames_b), b0.numbers, b0.pbc):
        return False
    return all(
        same_frames(a.positions, a.cell.array, b.positions, b.cell.array, a0.pbc, tol)
        for a, b in zip(frames_a, frames_b)
    )


class StoredRelaxations:
    """The trajectories of a database, indexed by :class:`Shape`, to find a new one's stored copy.

    Reads every trajectory's last frame once (one query); a trajectory whose
    last frame matches is then read whole and compared frame by frame.

    Args:
        db: a :class:`~ase_bptt.data.db.TrajectoryDB`.
        tol: see :data:`POSITION_TOL`.
    """

    def __init__(self, db, tol: float = POSITION_TOL) -> None:
        self.db, self.tol = db, tol
        self.by_shape: dict[Shape, list[tuple[dict, dict]]] = {}
        for meta, (final,) in db.read_records(converged_only=False, final_only=True):
            shape = shape_of(meta["n_frames"], final["numbers"], final["pbc"])
            self.by_shape.setdefault(shape, []).append((meta, final))

    def find(self, frames: Sequence[Atoms]) -> dict | None:
        """The stored trajectory (its ``read_records`` meta: traj_id, source, ...) that is the same relaxation, or None."""
        first, last = frames[0], frames[-1]
        for meta, final in self.by_shape.get(shape_of(len(frames), first.numbers, first.pbc), []):
            if not same_frames(last.positions, last.cell.array, final["positions"], final["cell"], first.pbc, self.tol):
                continue
            ((_, records),) = self.db.read_records(converged_only=False, traj_ids=[meta["traj_id"]])
            if len(records) == len(frames) and all(
                same_frames(a.positions, a.cell.array, r["positions"], r["cell"], first.pbc, self.tol)
                for a, r in zip(frames, records)
            ):
                return meta
        return None
