"""Datasets over a TrajectoryDB: frames for pretraining, relaxations for BPTT.

Both load one split into memory once, as padded tensors (not ``Atoms``), and
yield :class:`~ase_bptt.batch.Batch` es padded to the largest structure of
each batch, so an epoch over tens of thousands of frames costs only tensor
indexing.

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

import os
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch
from ase.constraints import FixAtoms
from ase.data import atomic_masses

from ase_bptt.batch import Batch
from ase_bptt.data.db import TrajectoryDB

__all__ = ["FrameBatch", "RelaxationBatch", "FrameDataset", "RelaxationDataset"]


class FrameBatch(NamedTuple):
    """Frames with their reference forces and energies.

    Attributes:
        batch: the structures.
        forces: ``(B, N, 3)`` reference forces (eV/A), zero on padding.
        energy: ``(B,)`` reference energies (eV), or None when a frame of
            this batch has no energy.
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


def _open(db: TrajectoryDB | str | os.PathLike) -> TrajectoryDB:
    return db if isinstance(db, TrajectoryDB) else TrajectoryDB(db, create=False)


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


def _batch(t: dict[str, torch.Tensor], index: torch.Tensor) -> tuple[Batch, int]:
    n = int(t["n_atoms"][index].max())
    # Atoms are packed at the front, so trimming to the batch's largest
    # structure pads per batch.
    b = Batch(
        positions=t["positions"][index, :n],
        numbers=t["numbers"][index, :n],
        masses=t["masses"][index, :n],
        mask=t["mask"][index, :n],
        fixed=t["fixed"][index, :n],
        cell=t["cell"][index],
        pbc=t["pbc"][index],
    )
    return b, n


def _order(m: int, shuffle: bool, generator: torch.Generator | None) -> torch.Tensor:
    if shuffle:
        return torch.randperm(m, generator=generator)
    return torch.arange(m)


class FrameDataset:
    """Every frame of one split, for force (and energy) matching.

    Args:
        db: a TrajectoryDB or its path/URL.
        split: "train", "val", "test" or None for all.
        converged_only: keep only converged trajectories (default False: all
            frames carry valid forces).
        dtype: floating dtype of positions, masses, cell, forces, energies.
        device: where the tensors live.
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
        loaded = _open(db)._load(split, converged_only)
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
        self._has_energy = torch.as_tensor(~np.isnan(energy), device=device)

    def __len__(self) -> int:
        return len(self.traj_ids)

    @property
    def has_energy(self) -> bool:
        """True when every frame has a reference energy."""
        return bool(self._has_energy.all()) if len(self) else False

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
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        order = _order(len(self), shuffle, generator).to(self._t["mask"].device)
        for start in range(0, len(self), batch_size):
            index = order[start : start + batch_size]
            batch, n = _batch(self._t, index)
            energy = self._t["energy"][index] if bool(self._has_energy[index].all()) else None
            yield FrameBatch(batch, self._t["forces"][index, :n], energy)


class RelaxationDataset:
    """One (initial, relaxed) pair per trajectory of one split, for BPTT.

    Args:
        db: a TrajectoryDB or its path/URL.
        split: "train", "val", "test" or None for all.
        converged_only: leave out trajectories whose last frame is not relaxed
            (default True: their last frame is no BPTT target).
        dtype: floating dtype.
        device: where the tensors live.
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
        loaded = _open(db)._load(split, converged_only)
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

    def __len__(self) -> int:
        return len(self.traj_ids)

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
    ) -> Iterator[RelaxationBatch]:
        """Yield RelaxationBatches of up to ``batch_size`` trajectories."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        order = _order(len(self), shuffle, generator)
        for start in range(0, len(self), batch_size):
            index = order[start : start + batch_size]
            batch, n = _batch(self._t, index.to(self._t["mask"].device))
            idx = index.tolist()
            yield RelaxationBatch(
                batch,
                self._t["relaxed"][index.to(self._t["mask"].device), :n],
                [self.labels[i] for i in idx],
                [self.traj_ids[i] for i in idx],
            )


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
