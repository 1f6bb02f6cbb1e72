"""Batch: B structures as padded tensors, the one data carrier of ase-bptt.

Every module that touches atoms (models, relaxers, metrics, datasets) passes a
``Batch``. Structures with different atom counts are padded to the largest
count ``N``; ``mask`` marks real atoms. Padding atoms have atomic number 0 and
mass 0, never move, never contribute to losses and never attend.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields, replace

import numpy as np
import torch
from ase import Atoms
from ase.constraints import FixAtoms

__all__ = ["Batch"]


@dataclass(frozen=True)
class Batch:
    """B structures as padded tensors.

    Attributes:
        positions: Cartesian positions, shape ``(B, N, 3)``, in A.
        numbers: atomic numbers, ``(B, N)`` int64; 0 for padding.
        masses: atomic masses, ``(B, N)``, in amu; 0 for padding.
        mask: ``(B, N)`` bool, True for real atoms.
        fixed: ``(B, N)`` bool, True for atoms held by ``FixAtoms``.
        cell: ``(B, 3, 3)`` lattice vectors as rows, in A.
        pbc: ``(B, 3)`` bool periodic boundary flags.
    """

    positions: torch.Tensor
    numbers: torch.Tensor
    masses: torch.Tensor
    mask: torch.Tensor
    fixed: torch.Tensor
    cell: torch.Tensor
    pbc: torch.Tensor

    # ------------------------------------------------------------------ build
    @classmethod
    def from_atoms(
        cls,
        atoms: Atoms | Sequence[Atoms],
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float64,
        constraints: bool = True,
    ) -> Batch:
        """Pad one or more ``ase.Atoms`` into a Batch.

        Args:
            atoms: one structure or a sequence of structures.
            device: where the tensors live.
            dtype: floating dtype. float64 (the default) keeps the round trip
                ``Batch.from_atoms(a).to_atoms()`` exact; models cast with
                :meth:`to`.
            constraints: honour ``FixAtoms`` (``fixed``). Any other constraint
                is an error, because a relaxer would silently ignore it. Pass
                False where only forces are evaluated (ASE applies constraints
                itself), e.g. in a calculator.

        Raises:
            ValueError: empty input, or an unsupported constraint.
        """
        if isinstance(atoms, Atoms):
            atoms = [atoms]
        atoms = list(atoms)
        if not atoms:
            raise ValueError("Batch.from_atoms needs at least one structure.")
        n_max = max(len(a) for a in atoms)
        b = len(atoms)
        positions = np.zeros((b, n_max, 3))
        numbers = np.zeros((b, n_max), dtype=np.int64)
        masses = np.zeros((b, n_max))
        mask = np.zeros((b, n_max), dtype=bool)
        fixed = np.zeros((b, n_max), dtype=bool)
        cell = np.zeros((b, 3, 3))
        pbc = np.zeros((b, 3), dtype=bool)
        for i, a in enumerate(atoms):
            n = len(a)
            positions[i, :n] = a.positions
            numbers[i, :n] = a.numbers
            masses[i, :n] = a.get_masses()
            mask[i, :n] = True
            cell[i] = a.cell.array
            pbc[i] = a.pbc
            if constraints:
                for c in a.constraints:
                    if isinstance(c, FixAtoms):
                        fixed[i, c.get_indices()] = True
                    else:
                        raise ValueError(
                            f"structure {i} ({a.get_chemical_formula()}) has a "
                            f"{type(c).__name__} constraint; only FixAtoms is "
                            "supported by the torch relaxers. Remove it, or relax "
                            "with an ASE optimizer through BPTTCalculator."
                        )
        return cls(
            positions=torch.as_tensor(positions, dtype=dtype, device=device),
            numbers=torch.as_tensor(numbers, device=device),
            masses=torch.as_tensor(masses, dtype=dtype, device=device),
            mask=torch.as_tensor(mask, device=device),
            fixed=torch.as_tensor(fixed, device=device),
            cell=torch.as_tensor(cell, dtype=dtype, device=device),
            pbc=torch.as_tensor(pbc, device=device),
        )

    def to_atoms(self, positions: torch.Tensor | None = None) -> list[Atoms]:
        """Unpad into a list of ``ase.Atoms`` (with ``FixAtoms`` where set).

        Args:
            positions: optional ``(B, N, 3)`` positions to use instead of
                ``self.positions`` (e.g. a relaxer's final positions).
        """
        pos = (self.positions if positions is None else positions).detach().cpu().double().numpy()
        numbers = self.numbers.cpu().numpy()
        masses = self.masses.detach().cpu().double().numpy()
        mask = self.mask.cpu().numpy()
        fixed = self.fixed.cpu().numpy()
        cell = self.cell.detach().cpu().double().numpy()
        pbc = self.pbc.cpu().numpy()
        out = []
        for i in range(len(self)):
            m = mask[i]
            a = Atoms(numbers=numbers[i, m], positions=pos[i, m], cell=cell[i], pbc=pbc[i])
            if not np.array_equal(a.get_masses(), masses[i, m]):
                a.set_masses(masses[i, m])
            if fixed[i, m].any():
                a.set_constraint(FixAtoms(indices=np.flatnonzero(fixed[i, m])))
            out.append(a)
        return out

    # ----------------------------------------------------------------- tensors
    def to(
        self,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Batch:
        """Return a Batch on ``device`` with floating tensors cast to ``dtype``.

        Integer and boolean tensors keep their dtype. Returns ``self`` when
        nothing changes, so calling it in a hot loop costs nothing.
        """
        same_device = device is None or self.positions.device == torch.device(device)
        if same_device and (dtype is None or dtype == self.positions.dtype):
            return self
        changes = {}
        for f in fields(self):
            t = getattr(self, f.name)
            if t.is_floating_point():
                changes[f.name] = t.to(device=device, dtype=dtype)
            else:
                changes[f.name] = t.to(device=device)
        return replace(self, **changes)

    def with_positions(self, positions: torch.Tensor) -> Batch:
        """Same structures at new positions (keeps autograd history)."""
        return replace(self, positions=positions)

    def select(self, index: torch.Tensor | Sequence[int]) -> Batch:
        """Sub-batch of the structures in ``index`` (padding is kept)."""
        index = torch.as_tensor(index, device=self.positions.device, dtype=torch.long)
        return Batch(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    @classmethod
    def concatenate(cls, batches: Iterable[Batch]) -> Batch:
        """Join batches along the structure axis, re-padding to the largest N."""
        batches = list(batches)
        n_max = max(b.positions.shape[1] for b in batches)
        out = {}
        for f in fields(cls):
            parts = []
            for b in batches:
                t = getattr(b, f.name)
                pad = n_max - t.shape[1]
                if pad and f.name in ("positions", "numbers", "masses", "mask", "fixed"):
                    shape = (t.shape[0], pad) + tuple(t.shape[2:])
                    t = torch.cat([t, t.new_zeros(shape)], dim=1)
                parts.append(t)
            out[f.name] = torch.cat(parts, dim=0)
        return cls(**out)

    # ------------------------------------------------------------ properties
    def __len__(self) -> int:
        return self.positions.shape[0]

    @property
    def n_atoms(self) -> torch.Tensor:
        """Number of real atoms per structure, ``(B,)`` int64."""
        return self.mask.sum(dim=1)

    @property
    def movable(self) -> torch.Tensor:
        """``(B, N)`` bool: real atoms that are not fixed (the ones a relaxer moves)."""
        return self.mask & ~self.fixed

    @property
    def device(self) -> torch.device:
        return self.positions.device

    @property
    def dtype(self) -> torch.dtype:
        return self.positions.dtype
