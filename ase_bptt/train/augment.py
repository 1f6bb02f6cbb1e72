"""Data augmentation by exact symmetries, shared by pretraining and BPTT fine-tuning.

Pretraining (:func:`augment`) rotates frames (cell, positions and forces
together) and translates them. BPTT fine-tuning (:func:`augment_rollouts`)
moves the initial AND relaxed positions of each structure together, inside its
cell, by a rigid shift (fully periodic cells) and/or by an element of the
cube's symmetry group (:data:`CUBIC_OPS`, cubic cells only). Both map the
lattice onto itself and act on Cartesian positions as an isometry, so the
physics (energies, forces up to the same rotation, Dq) is unchanged; the model
(ADAPT's tokens are not symmetric) and the defect's place in the cell are not,
which is what the augmentation is for. The draws come from generators seeded
with ``(seed, epoch, batch, ...)`` (:func:`rollout_draws`), so runs are
reproducible and resume exactly.
"""

from __future__ import annotations

import itertools
from dataclasses import replace

import torch

from ase_bptt.runs.config import seed_generator

__all__ = [
    "CUBIC_OPS",
    "CUBIC_RTOL",
    "augment",
    "augment_rollouts",
    "cube_applies",
    "is_cubic",
    "random_rotations",
    "rollout_draws",
]

#: Relative tolerance of "a = b = c and orthogonal" in :func:`is_cubic`.
CUBIC_RTOL = 1e-6


def _cubic_ops() -> torch.Tensor:
    ops = []
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1.0, -1.0), repeat=3):
            m = torch.zeros(3, 3, dtype=torch.float64)
            for row, (col, sign) in enumerate(zip(perm, signs)):
                m[row, col] = sign
            ops.append(m)
    return torch.stack(ops)


#: The 48 signed permutation matrices (the full symmetry group of the cube, O_h),
#: acting on fractional coordinates as ``f' = P f``; element 0 is the identity.
CUBIC_OPS = _cubic_ops()


def random_rotations(n: int, generator: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    """``n`` uniformly random proper rotation matrices ``(n, 3, 3)`` (QR of Gaussians)."""
    a = torch.randn(n, 3, 3, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
    det = torch.linalg.det(q)
    q[:, :, 0] = q[:, :, 0] * det.unsqueeze(-1)  # reflections -> rotations
    return q.to(dtype)


def augment(batch, forces: torch.Tensor, *, rotations: torch.Tensor | None, shifts: torch.Tensor | None):
    """Rotate (cell, positions and forces together) and/or translate frames (pretraining)."""
    positions, cell = batch.positions, batch.cell
    if rotations is not None:
        rt = rotations.to(positions).transpose(1, 2)
        positions, cell, forces = positions @ rt, cell @ rt, forces @ rt
    if shifts is not None:
        positions = positions + shifts.to(positions).unsqueeze(1) * batch.mask.unsqueeze(-1)
    return replace(batch, positions=positions, cell=cell), forces


def is_cubic(cell: torch.Tensor, rtol: float = CUBIC_RTOL) -> torch.Tensor:
    """``(B,)`` bool: the cell's vectors have equal lengths and are orthogonal, within ``rtol`` (relative)."""
    cell = cell.double()
    gram = cell @ cell.transpose(-1, -2)
    a2 = torch.diagonal(gram, dim1=-2, dim2=-1).mean(-1).clamp(min=torch.finfo(torch.float64).tiny)
    eye = torch.eye(3, dtype=torch.float64, device=cell.device)
    # |a_i . a_j - a^2 delta_ij| <= 2 rtol a^2 covers lengths equal to rtol and angles to ~2 rtol rad.
    return ((gram - a2[:, None, None] * eye).abs() <= 2 * rtol * a2[:, None, None]).all(-1).all(-1)


def cube_applies(batch) -> torch.Tensor:
    """``(B,)`` bool: the cube's symmetries apply: a cubic cell, periodic along all three axes or none
    (a slab's periodic and open axes must not be swapped)."""
    return is_cubic(batch.cell) & (batch.pbc.all(-1) | ~batch.pbc.any(-1)).to(batch.cell.device)


def rollout_draws(
    seed: int, epoch: int, batch: int, n: int, translation: bool, cubic: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(fractional shifts (n, 3), cube operations (n, 3, 3))`` of one global batch of ``n`` structures.

    Each kind has its own generator seeded with ``(seed, epoch, batch, salt)``, so
    the draws of one do not depend on whether the other is on; None where off.
    """
    shifts = ops = None
    if translation:
        shifts = torch.rand(n, 3, generator=seed_generator(seed, epoch, batch, 37), dtype=torch.float64)
    if cubic:
        pick = torch.randint(len(CUBIC_OPS), (n,), generator=seed_generator(seed, epoch, batch, 41))
        ops = CUBIC_OPS[pick]
    return shifts, ops


def augment_rollouts(batch, relaxed: torch.Tensor, shifts: torch.Tensor | None, ops: torch.Tensor | None):
    """Move each structure's initial and relaxed positions together by a symmetry of its cell.

    Args:
        batch: the initial structures (:class:`~ase_bptt.batch.Batch`, ``B`` of them).
        relaxed: their relaxed positions ``(B, N, 3)`` (unwrapped, as in the dataset).
        shifts: ``(B, 3)`` fractional shifts (uniform in [0, 1)), applied only to
            fully periodic cells; None: none.
        ops: ``(B, 3, 3)`` signed permutations of the fractional axes (``f' = P f``),
            applied only where :func:`cube_applies` (cubic cells); None: none.

    Returns:
        ``(batch, relaxed)`` moved; the cell, numbers and the rest are unchanged.
        Both maps send the lattice onto itself and act on Cartesian positions as
        ``x' = x M + t`` with ``M = cell^-1 P^T cell`` orthogonal for a cubic cell,
        so distances, minimum images and Dq are preserved exactly.
    """
    positions, cell = batch.positions, batch.cell
    mask = batch.mask.unsqueeze(-1).to(positions.dtype)
    if ops is not None:
        c64 = cell.double()
        apply = cube_applies(batch)
        eye = torch.eye(3, dtype=torch.float64, device=cell.device)
        p = torch.where(apply[:, None, None], ops.to(c64), eye)
        m = (torch.linalg.inv(c64) @ p.transpose(-1, -2) @ c64).to(positions)
        positions, relaxed = positions @ m, relaxed @ m
    if shifts is not None:
        periodic = batch.pbc.all(-1)
        t = (shifts.to(cell).unsqueeze(1) @ cell).squeeze(1) * periodic.unsqueeze(-1).to(cell.dtype)
        t = t.to(positions).unsqueeze(1) * mask
        positions, relaxed = positions + t, relaxed + t
    return replace(batch, positions=positions), relaxed
