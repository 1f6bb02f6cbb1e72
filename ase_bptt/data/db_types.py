"""The records and errors of a :class:`~ase_bptt.data.db.TrajectoryDB` (re-exported there)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ase import Atoms

from ase_bptt.errors import AseBpttError

__all__ = [
    "DatabaseAccessError",
    "DatabasePathError",
    "DuplicateTrajectoryError",
    "NotATrajectoryDBError",
    "Trajectory",
    "TrajectoryDBError",
]


class TrajectoryDBError(AseBpttError):
    """Base class for errors about a trajectory database."""


class NotATrajectoryDBError(TrajectoryDBError):
    """The database exists but was not made by ase-bptt (or is newer)."""


class DuplicateTrajectoryError(TrajectoryDBError):
    """A trajectory with the same id or the same content is already stored."""


class DatabaseAccessError(TrajectoryDBError):
    """The database cannot be created or written (read-only file or folder) or is locked."""


class DatabasePathError(TrajectoryDBError, ValueError):
    """The path cannot hold a trajectory database (a JSON file)."""


@dataclass
class Trajectory:
    """One relaxation as stored in the database.

    Attributes:
        traj_id: unique id of the trajectory.
        label: free label (e.g. the defect type) or None.
        source: where it came from (file path, generator recipe) or None.
        split: "train", "val", "test" or None when not assigned yet.
        converged: whether the last frame's max force is below the database's
            ``converged_fmax``.
        frames: the frames in order; each carries a ``SinglePointCalculator``
            with forces and, when known, energy.
    """

    traj_id: str
    label: str | None
    source: str | None
    split: str | None
    converged: bool
    frames: list[Atoms] = field(repr=False)

    @property
    def initial(self) -> Atoms:
        return self.frames[0]

    @property
    def final(self) -> Atoms:
        return self.frames[-1]
