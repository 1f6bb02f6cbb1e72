"""Neighbour graphs for the backends: built outside torch with a skin, reused until an atom has moved too far.

A graph-network MLIP needs, every frame, the pairs of atoms closer than its
cutoff ``rc``. Building the pair list is NumPy/C work that autograd cannot (and
need not) follow, so it is done once with ``rc + skin`` and kept: while no atom
has moved more than ``skin / 2`` since the build, two atoms have closed in by
at most ``skin``, so every pair now inside ``rc`` is in the list. Each frame
the backend recomputes the pair vectors in torch from the positions tensor
(that is what is differentiated) and drops the pairs now beyond ``rc``
exactly, since some envelopes are not zero past the cutoff (SevenNet's).
When an atom of a structure has moved more than ``skin / 2``, that structure's
list is rebuilt (not differentiated: which pairs are listed changes no value).

The cache also serves a calculator, which hands over a new Batch every step:
batches are compared by value (atomic numbers, padding, cell, periodicity,
dtype and device), not by identity.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from ase.neighborlist import primitive_neighbor_list

from ase_bptt.batch import Batch
from ase_bptt.errors import AseBpttError

__all__ = ["GraphCache", "neighbour_pairs", "NonFinitePositionsError"]


class NonFinitePositionsError(AseBpttError, FloatingPointError):
    """A structure reached NaN or infinite positions: no neighbour list can be built for it."""


def neighbour_pairs(
    positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, cutoff: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Directed pairs ``(i, j, S, d)`` closer than ``cutoff`` (A), each listed both ways, no self pair.

    ``positions[j] + S @ cell - positions[i]`` is the pair vector and ``d`` its
    length (ASE's convention; positions outside the cell are fine).
    """
    i, j, shifts, d = primitive_neighbor_list("ijSd", pbc, cell, positions, cutoff, self_interaction=False)
    return i.astype(np.int64), j.astype(np.int64), shifts.astype(np.int64), d


class GraphCache:
    """Per-structure neighbour graphs of a batch, rebuilt only for structures with an atom moved > ``skin / 2``.

    Args:
        skin: the margin (A) the graphs were built with beyond the cutoff.

    Attributes:
        n_builds: structure graphs built so far (the first build of each structure counts too).
    """

    def __init__(self, skin: float) -> None:
        self.skin = float(skin)
        self.n_builds = 0
        self._key: tuple[Any, ...] | None = None
        self._reference: torch.Tensor | None = None
        self._graphs: list[Any] = []
        self._assembled: Any = None

    def clear(self) -> None:
        """Forget every graph (the next call builds afresh)."""
        self._key, self._reference, self._graphs, self._assembled = None, None, [], None

    def _same_structures(self, key: tuple[Any, ...]) -> bool:
        if self._key is None:
            return False
        for old, new in zip(self._key, key):
            if isinstance(new, torch.Tensor):
                if old.shape != new.shape or not torch.equal(old, new):
                    return False
            elif old != new:
                return False
        return True

    def get(
        self,
        batch: Batch,
        positions: torch.Tensor,
        build: Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], Any],
        assemble: Callable[[list[Any], Batch], Any],
    ) -> Any:
        """The batched graph for ``positions``: the cached one, or one with the stale structures rebuilt.

        Args:
            batch: the structures (numbers, padding, cell, periodicity).
            positions: ``(B, N, 3)`` current positions (only read, never differentiated).
            build: ``build(positions, cell, pbc, numbers)`` of one structure's real atoms (NumPy).
            assemble: joins the per-structure graphs into the batched graph.
        """
        pos = positions.detach()
        key = (batch.numbers, batch.mask, batch.cell.detach(), batch.pbc, pos.dtype, pos.device)
        if self._same_structures(key) and self._reference is not None:
            moved = torch.linalg.vector_norm(pos - self._reference, dim=-1).masked_fill(~batch.mask, 0.0)
            # NaN positions compare False: a diverged structure keeps its graph and its NaN
            # energy reaches the caller, which reports the divergence.
            stale = [b for b, d in enumerate(moved.amax(dim=1).tolist()) if d > self.skin / 2]
            if not stale:
                return self._assembled
        else:
            self._key = tuple(k.clone() if isinstance(k, torch.Tensor) else k for k in key)
            self._reference = pos.clone()
            self._graphs = [None] * len(batch)
            stale = list(range(len(batch)))
        self._rebuild(batch, pos, stale, build)
        self._assembled = assemble(self._graphs, batch)
        return self._assembled

    def _rebuild(self, batch: Batch, pos: torch.Tensor, stale: list[int], build: Callable[..., Any]) -> None:
        assert self._reference is not None
        rows = torch.as_tensor(stale, device=pos.device)
        self._reference[rows] = pos[rows]
        host = pos[rows].cpu().double().numpy()
        mask = batch.mask[rows].cpu().numpy()
        numbers = batch.numbers[rows].cpu().numpy()
        cell = batch.cell[rows].detach().cpu().double().numpy()
        pbc = batch.pbc[rows].cpu().numpy()
        for k, b in enumerate(stale):
            real = host[k][mask[k]]
            if not np.isfinite(real).all():
                raise NonFinitePositionsError(
                    f"structure {b} of the batch has non-finite positions (a diverged relaxation?); "
                    "no neighbour list can be built for it"
                )
            self._graphs[b] = build(real, cell[k], pbc[k], numbers[k][mask[k]])
            self.n_builds += 1
