"""Structure and force errors: pure torch, batched over a Batch, masked.

All functions take ``(B, N, 3)`` tensors and a Batch (for masks, masses, cell
and pbc) and return one value per structure, ``(B,)``, so callers choose how
to reduce. Padding atoms never contribute.
"""

from __future__ import annotations

import torch

from ase_bptt.batch import Batch

__all__ = [
    "fractional",
    "minimum_image",
    "displacement",
    "dq",
    "mse",
    "rms_displacement",
    "rms_distance",
    "correct_basin",
    "CORRECT_BASIN_RMS",
    "force_errors",
    "max_force",
]


def fractional(vectors: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fractional coordinates of Cartesian ``vectors`` along the periodic directions.

    A non-periodic direction may have a zero lattice vector: the identity
    stands in for it, so the solve stays regular and that component is just
    the Cartesian one. ``solve_ex``, not ``solve``: ``solve`` synchronises a
    CUDA device with the host on every call (its error check), and this runs
    every frame.

    Args:
        vectors: ``(B, N, 3)`` Cartesian positions or displacements.
        cell: ``(B, 3, 3)`` lattice vectors as rows.
        pbc: ``(B, 3)`` periodic flags.

    Returns:
        ``(frac, safe_cell)``: ``(B, N, 3)`` coordinates and the ``(B, 3, 3)``
        cell they refer to (``frac @ safe_cell == vectors``).
    """
    cell = cell.to(vectors.dtype)
    eye = torch.eye(3, dtype=cell.dtype, device=cell.device).expand_as(cell)
    safe_cell = torch.where(pbc.unsqueeze(-1), cell, eye)
    frac = torch.linalg.solve_ex(safe_cell.transpose(1, 2), vectors.transpose(1, 2))[0].transpose(1, 2)
    return frac, safe_cell


def minimum_image(vectors: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor) -> torch.Tensor:
    """Wrap displacement vectors to their minimum image.

    Uses the fractional-coordinate rounding rule, exact for displacements
    shorter than half the smallest cell height (always true between an
    initial and a relaxed structure).

    Args:
        vectors: ``(B, N, 3)`` Cartesian displacements.
        cell: ``(B, 3, 3)`` lattice vectors as rows.
        pbc: ``(B, 3)`` periodic flags; non-periodic directions are left alone.
    """
    # No early exit for non-periodic input: a Python branch on a tensor would
    # synchronise a GPU every frame.
    frac, safe_cell = fractional(vectors, cell, pbc)
    shift = torch.where(pbc.unsqueeze(1), torch.round(frac), torch.zeros_like(frac))
    return vectors - shift @ safe_cell


def displacement(final: torch.Tensor, reference: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Minimum-image ``final - reference``, zero on padding, ``(B, N, 3)``."""
    d = minimum_image(final - reference, batch.cell, batch.pbc)
    return d * batch.mask.unsqueeze(-1)


def dq(final: torch.Tensor, reference: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Mass-weighted structure error Dq (the paper's Eq. 3), ``(B,)``.

    ``Dq = sqrt(sum_j m_j |X*_j - X_j|^2)`` with masses in amu and positions
    in A, so Dq is in amu^1/2 A. The square root has an infinite derivative
    at zero, so a tiny epsilon keeps gradients finite for a perfect match.
    """
    d = displacement(final, reference, batch)
    sq = (batch.masses * (d * d).sum(-1)).sum(-1)
    return torch.sqrt(sq + torch.finfo(sq.dtype).tiny)


def mse(final: torch.Tensor, reference: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Mean squared per-atom displacement (A^2), ``(B,)``: the pure-crystal loss."""
    d = displacement(final, reference, batch)
    return (d * d).sum(-1).sum(-1) / batch.n_atoms.clamp(min=1).to(d.dtype)


#: RMS per-atom distance (A) below which a relaxation counts as ending in the reference's basin.
#: Why 0.1 A: it is well under the ~0.17 A RMS of a 0.1 A-per-component rattle (the built-in
#: recipes' sigma), and one atom of a 64-atom cell that ends in a neighbouring site (a hop of
#: 0.8 A or more) already exceeds it, so a point defect in the wrong minimum never counts.
CORRECT_BASIN_RMS = 0.1


def rms_distance(final: torch.Tensor, reference: torch.Tensor, batch: Batch) -> torch.Tensor:
    """RMS per-atom minimum-image distance between ``final`` and ``reference`` (A), ``(B,)``."""
    return torch.sqrt(mse(final, reference, batch))


def correct_basin(
    final: torch.Tensor, reference: torch.Tensor, batch: Batch, threshold: float = CORRECT_BASIN_RMS
) -> torch.Tensor:
    """Whether each structure ended within ``threshold`` A RMS per atom of its reference, ``(B,)`` bool."""
    return rms_distance(final, reference, batch) <= threshold


def rms_displacement(step: torch.Tensor, batch: Batch) -> torch.Tensor:
    """RMS per-atom length of one update ``step`` (A), ``(B,)``: the stopping rule."""
    s = step * batch.mask.unsqueeze(-1)
    return torch.sqrt((s * s).sum(-1).sum(-1) / batch.n_atoms.clamp(min=1).to(s.dtype))


def max_force(forces: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Largest force norm over movable atoms (eV/A), ``(B,)``: ASE's ``fmax`` rule."""
    f = forces * batch.movable.unsqueeze(-1)
    return torch.linalg.vector_norm(f, dim=-1).amax(dim=-1)


def force_errors(predicted: torch.Tensor, reference: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
    """Per-structure force errors over real atoms, in eV/A.

    Returns:
        ``mae`` (mean absolute component error), ``rmse`` (root mean squared
        component error) and ``l2`` (root of the summed squared error, the
        paper's Table 2 "L2 force error"), each ``(B,)``.
    """
    diff = (predicted - reference) * batch.mask.unsqueeze(-1)
    n = (3 * batch.n_atoms).clamp(min=1).to(diff.dtype)
    sq = (diff * diff).sum(-1).sum(-1)
    return {
        "mae": diff.abs().sum(-1).sum(-1) / n,
        "rmse": torch.sqrt(sq / n),
        "l2": torch.sqrt(sq),
    }
