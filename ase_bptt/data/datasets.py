"""Datasets over a TrajectoryDB: frames for pretraining, relaxations for BPTT.

Both load one split into memory once, as padded tensors (not ``Atoms``), and
yield :class:`~ase_bptt.batch.Batch` es padded to the largest structure of
each batch, so an epoch over tens of thousands of frames costs only tensor
indexing. The trainers hold a whole split this way and draw their batches with
``take(index)``; ``to(device, dtype)`` moves and casts a split at once.

- :class:`FrameDataset`: every frame of every trajectory (converged or not:
  a frame's forces are valid training data either way), with its forces and
  energy.
- :class:`RelaxationDataset`: one item per trajectory: the initial structure
  and the relaxed positions. ``relaxed`` is the final frame's positions
  unwrapped to the minimum image of the initial positions, ``initial +
  minimum_image(final - initial)`` in the initial cell, so ``relaxed -
  initial`` is the physical displacement even when an atom crossed the cell
  boundary. (For a cell relaxation the final cell is not used: the relaxers
  keep the cell fixed.)
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple, Self

import numpy as np
import torch
from ase.constraints import FixAtoms
from ase.data import atomic_masses

from ase_bptt.batch import Batch
from ase_bptt.data.db import TrajectoryDB

__all__ = [
    "FrameBatch",
    "RelaxationBatch",
    "FrameDataset",
    "RelaxationDataset",
    "open_db",
    "load_frames",
    "load_relaxations",
]


class FrameBatch(NamedTuple):
    """Frames with their reference forces and energies.

    Attributes:
        batch: the structures.
        forces: ``(B, N, 3)`` reference forces (eV/A), zero on padding.
        energy: ``(B,)`` reference energies (eV), or None when a frame of
            the dataset has no energy.
    """

    batch: Batch
    forces: torch.Tensor
    energy: torch.Tensor | None


class RelaxationBatch(NamedTuple):
    """Relaxations: initial structures and relaxed positions.

    Attributes:
        initial: the initial structures (frame 0).
        relaxed: ``(B, N, 3)`` relaxed positions, unwrapped to the minimum
            image of ``initial.positions``; equal to the initial positions on
            padding.
        labels: the trajectories' labels ("" when none).
        traj_ids: the trajectories' ids.
    """

    initial: Batch
    relaxed: torch.Tensor
    labels: list[str]
    traj_ids: list[str]


def _fixed(n: int, constraints) -> np.ndarray:
    fixed = np.zeros(n, dtype=bool)
    for c in constraints:
        if isinstance(c, FixAtoms):
            fixed[c.get_indices()] = True
    return fixed


class _Padded:
    """Frames (the database's raw frame dicts) stacked as padded tensors."""

    def __init__(self, frames: list[dict], n_max: int) -> None:
        m = len(frames)
        self.positions = np.zeros((m, n_max, 3))
        self.numbers = np.zeros((m, n_max), dtype=np.int64)
        self.masses = np.zeros((m, n_max))
        self.mask = np.zeros((m, n_max), dtype=bool)
        self.fixed = np.zeros((m, n_max), dtype=bool)
        self.cell = np.zeros((m, 3, 3))
        self.pbc = np.zeros((m, 3), dtype=bool)
        for i, f in enumerate(frames):
            n = len(f["numbers"])
            self.positions[i, :n] = f["positions"]
            self.numbers[i, :n] = f["numbers"]
            self.masses[i, :n] = atomic_masses[f["numbers"]] if f["masses"] is None else f["masses"]
            self.mask[i, :n] = True
            if f["constraints"]:
                self.fixed[i, :n] = _fixed(n, f["constraints"])
            self.cell[i] = f["cell"]
            self.pbc[i] = f["pbc"]

    def tensors(self, dtype: torch.dtype, device) -> dict[str, torch.Tensor]:
        out = {}
        for name in ("positions", "numbers", "masses", "mask", "fixed", "cell", "pbc"):
            arr = getattr(self, name)
            kind = dtype if arr.dtype == np.float64 else None
            out[name] = torch.as_tensor(arr, dtype=kind, device=device)
        return out


class _PaddedSet:
    """One split held as padded tensors (``_t``); the base of both datasets."""

    _t: dict[str, torch.Tensor]
    traj_ids: list[str]

    def __len__(self) -> int:
        return len(self.traj_ids)

    @property
    def trajectories(self) -> list[str]:
        """The ids of the trajectories the items came from (sorted, unique)."""
        return sorted(set(self.traj_ids))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Self:
        """A copy on ``device`` with the floating tensors cast to ``dtype``."""
        other = copy.copy(self)
        other._t = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else None) for k, v in self._t.items()}
        return other

    def _select(self, index: torch.Tensor) -> tuple[Batch, int, torch.Tensor]:
        """Items ``index`` as a Batch trimmed to their largest structure, that size, the index."""
        t = self._t
        index = index.to(t["mask"].device)
        # Atoms are packed at the front, so trimming to the batch's largest
        # structure pads per batch.
        n = int(t["n_atoms"][index].max()) if len(index) else 0
        batch = Batch(
            positions=t["positions"][index, :n],
            numbers=t["numbers"][index, :n],
            masses=t["masses"][index, :n],
            mask=t["mask"][index, :n],
            fixed=t["fixed"][index, :n],
            cell=t["cell"][index],
            pbc=t["pbc"][index],
        )
        return batch, n, index

    def _whole(self) -> Batch:
        return Batch(**{k: self._t[k] for k in ("positions", "numbers", "masses", "mask", "fixed", "cell", "pbc")})

    def _orders(self, batch_size: int, shuffle: bool, generator: torch.Generator | None) -> Iterator[torch.Tensor]:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        order = torch.randperm(len(self), generator=generator) if shuffle else torch.arange(len(self))
        for start in range(0, len(self), batch_size):
            yield order[start : start + batch_size]


class FrameDataset(_PaddedSet):
    """Every frame of one split, for force (and energy) matching.

    Args:
        db: a TrajectoryDB or its path/URL.
        split: "train", "val", "test" or None for all.
        converged_only: keep only converged trajectories (default False: all
            frames carry valid forces).
        dtype: floating dtype of positions, masses, cell, forces, energies.
        device: where the tensors live.

    Attributes:
        traj_ids: the trajectory of each frame.
        frame_index: each frame's index in its trajectory.
    """

    def __init__(
        self,
        db: TrajectoryDB | str | os.PathLike,
        split: str | None,
        *,
        converged_only: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        # Raw arrays, not Atoms: building 10^4 Atoms costs more than the query.
        loaded = open_db(db).read_records(split, converged_only)
        frames = [f for _, records in loaded for f in records]
        self.traj_ids = [meta["traj_id"] for meta, records in loaded for _ in records]
        self.frame_index = [i for _, records in loaded for i in range(len(records))]
        n_max = max((len(f["numbers"]) for f in frames), default=0)
        padded = _Padded(frames, n_max)
        forces = np.zeros((len(frames), n_max, 3))
        energy = np.full(len(frames), np.nan)
        for i, f in enumerate(frames):
            forces[i, : len(f["numbers"])] = f["forces"]
            if f["energy"] is not None:
                energy[i] = f["energy"]
        self._t = padded.tensors(dtype, device)
        self._t["n_atoms"] = self._t["mask"].sum(1)
        self._t["forces"] = torch.as_tensor(forces, dtype=dtype, device=device)
        self._t["energy"] = torch.as_tensor(energy, dtype=dtype, device=device)
        self._t["has_energy"] = torch.as_tensor(~np.isnan(energy), device=device)

    @property
    def has_energy(self) -> bool:
        """True when every frame has a reference energy (energy matching is all or nothing)."""
        return bool(self._t["has_energy"].all()) if len(self) else False

    @property
    def batch(self) -> Batch:
        """Every frame as one Batch, padded to the largest structure of the split."""
        return self._whole()

    @property
    def forces(self) -> torch.Tensor:
        """``(F, N, 3)`` reference forces of every frame (eV/A), zero on padding."""
        return self._t["forces"]

    @property
    def energy(self) -> torch.Tensor | None:
        """``(F,)`` reference energies (eV), or None unless every frame has one."""
        return self._t["energy"] if self.has_energy else None

    def take(self, index: torch.Tensor) -> FrameBatch:
        """Frames ``index`` padded to their largest structure."""
        batch, n, index = self._select(index)
        energy = self.energy
        return FrameBatch(batch, self._t["forces"][index, :n], None if energy is None else energy[index])

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
    ) -> Iterator[FrameBatch]:
        """Yield FrameBatches of up to ``batch_size`` frames.

        Args:
            batch_size: frames per batch (the last one may be smaller).
            shuffle: random order (from ``generator``) instead of the stored
                order (by traj_id, then frame).
            generator: torch random generator for reproducible shuffling.
        """
        for index in self._orders(batch_size, shuffle, generator):
            yield self.take(index)


class RelaxationDataset(_PaddedSet):
    """One (initial, relaxed) pair per trajectory of one split, for BPTT.

    Args:
        db: a TrajectoryDB or its path/URL.
        split: "train", "val", "test" or None for all.
        converged_only: leave out trajectories whose last frame is not relaxed
            (default True: their last frame is no BPTT target).
        dtype: floating dtype.
        device: where the tensors live.

    Attributes:
        traj_ids: the trajectories' ids.
        labels: the trajectories' labels ("" when none).
    """

    def __init__(
        self,
        db: TrajectoryDB | str | os.PathLike,
        split: str | None,
        *,
        converged_only: bool = True,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        loaded = open_db(db).read_records(split, converged_only)
        self.traj_ids = [meta["traj_id"] for meta, _ in loaded]
        self.labels = [meta["label"] or "" for meta, _ in loaded]
        initial = [records[0] for _, records in loaded]
        n_max = max((len(f["numbers"]) for f in initial), default=0)
        padded = _Padded(initial, n_max)
        relaxed = padded.positions.copy()
        for i, (_, records) in enumerate(loaded):
            relaxed[i, : len(records[0]["numbers"])] = _unwrapped_final(records[0], records[-1])
        self._t = padded.tensors(dtype, device)
        self._t["n_atoms"] = self._t["mask"].sum(1)
        self._t["relaxed"] = torch.as_tensor(relaxed, dtype=dtype, device=device)

    @property
    def initial(self) -> Batch:
        """Every initial structure as one Batch, padded to the largest of the split."""
        return self._whole()

    def take(self, index: torch.Tensor) -> tuple[Batch, torch.Tensor]:
        """Initial structures and relaxed positions of trajectories ``index``, padded to their largest."""
        batch, n, index = self._select(index)
        return batch, self._t["relaxed"][index, :n]

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
    ) -> Iterator[RelaxationBatch]:
        """Yield RelaxationBatches of up to ``batch_size`` trajectories."""
        for index in self._orders(batch_size, shuffle, generator):
            batch, relaxed = self.take(index)
            idx = index.tolist()
            yield RelaxationBatch(batch, relaxed, [self.labels[i] for i in idx], [self.traj_ids[i] for i in idx])


def open_db(db: TrajectoryDB | str | os.PathLike) -> TrajectoryDB:
    """A TrajectoryDB from an instance or a path (which must exist) or URL."""
    if isinstance(db, TrajectoryDB):
        return db
    text = str(db)
    if "://" not in text and not Path(text).exists():
        raise FileNotFoundError(
            f"database {text} does not exist; create one with `ase-bptt generate` or `ase-bptt import`."
        )
    return TrajectoryDB(text, create=False)


def load_frames(db, split: str, *, dtype: torch.dtype = torch.float64) -> FrameDataset | None:
    """Every frame of the trajectories in ``split`` (converged or not); None when there are none."""
    dataset = FrameDataset(db, split, converged_only=False, dtype=dtype)
    return dataset if len(dataset) else None


def load_relaxations(
    db, split: str, *, converged_only: bool = True, dtype: torch.dtype = torch.float64
) -> RelaxationDataset | None:
    """The (converged) relaxations of ``split``; None when there are none."""
    dataset = RelaxationDataset(db, split, converged_only=converged_only, dtype=dtype)
    return dataset if len(dataset) else None


def _unwrapped_final(first: dict, last: dict) -> np.ndarray:
    """Final positions moved to the image nearest each initial position."""
    d = last["positions"] - first["positions"]
    pbc = np.asarray(first["pbc"], dtype=bool)
    if pbc.any():
        cell = np.asarray(first["cell"])
        # Fractional rounding, as metrics.minimum_image; exact for
        # displacements shorter than half the smallest cell height.
        safe = np.where(pbc[:, None], cell, np.eye(3))
        frac = np.linalg.solve(safe.T, d.T).T
        shift = np.where(pbc[None, :], np.round(frac), 0.0)
        d = d - shift @ safe
    return first["positions"] + d
