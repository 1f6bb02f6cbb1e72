"""What a model can evaluate and what it was trained on, checked before a structure reaches it.

Three kinds of answer, from hard to soft:

* **cannot evaluate** (:class:`StructureError`): non-finite positions or cell,
  a periodic direction whose lattice vector is zero or linearly dependent on
  the others (fractional coordinates would be NaN), a structure with no
  periodic direction for a model that describes atoms by periodic features, or
  a non-periodic direction where every training structure was periodic.
* **closer than any training structure came** (:class:`StructureError`): two
  atoms (or an atom and its own periodic image) nearer than
  :data:`MIN_DISTANCE_FRACTION` of the shortest distance in the training
  data. In practice that is an input error (a duplicated atom, Cartesian
  coordinates read as fractional, wrong units) and the model's forces there
  mean nothing: a relaxation would "converge" to garbage, so it is refused,
  naming the atoms.
* **outside the training domain** (:class:`OutOfDomainWarning`, a Python
  warning): an atom count outside ``[min / ATOM_COUNT_MARGIN, max *
  ATOM_COUNT_MARGIN]`` of the training structures, or a periodicity (pbc
  pattern) no training structure had. The model still runs; its answer is an
  extrapolation.
* **unknown element**: already an error of the model itself
  (:meth:`~ase_bptt.models.base.ForceModel.check_species`).

The training domain is a small JSON-like dict stored in a checkpoint's
``metadata["training_domain"]`` (see :func:`training_domain`); checkpoints
written before it existed have none, and then only the model's own needs are
checked.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from ase import Atoms

from ase_bptt.errors import AseBpttError

__all__ = [
    "ATOM_COUNT_MARGIN",
    "DOMAIN_KEY",
    "MIN_DISTANCE_FRACTION",
    "NonFiniteResultError",
    "OutOfDomainWarning",
    "StructureCheck",
    "StructureError",
    "merge_training_domains",
    "read_training_domain",
    "shortest_distance",
    "training_domain",
]

#: A structure whose atom count is within this factor of the trained range counts as inside it.
ATOM_COUNT_MARGIN = 2.0
#: Atoms closer than this fraction of the shortest distance in the training data are refused.
MIN_DISTANCE_FRACTION = 0.5
#: Structures per chunk when the shortest distance of a training set is computed (memory: chunk x N^2 x 3).
_DISTANCE_CHUNK = 128
#: Where a checkpoint's metadata keeps the training domain.
DOMAIN_KEY = "training_domain"
#: A periodic cell whose volume is below this fraction of the product of its vector lengths is singular.
_SINGULAR_CELL = 1e-8
_AXES = "xyz"


class StructureError(AseBpttError, ValueError):
    """A structure the model cannot evaluate (the message names it and says what to change)."""


class NonFiniteResultError(AseBpttError, FloatingPointError):
    """A model returned NaN or infinite energies or forces for a structure."""


class OutOfDomainWarning(UserWarning):
    """A structure lies outside what the model was trained on (the model still evaluates it)."""


def _pbc_text(pbc: Sequence[bool]) -> str:
    periodic = "".join(a for a, p in zip(_AXES, pbc) if p)
    return f"periodic along {periodic}" if periodic else "not periodic in any direction"


def training_domain(structures: Any) -> dict:
    """The training domain of a set of structures, as stored in a checkpoint's metadata.

    Args:
        structures: a :class:`~ase_bptt.batch.Batch` or a sequence of ``ase.Atoms``
            (e.g. the train split's frames at pretraining).

    Returns:
        ``{"species": [Z, ...], "n_atoms": [min, max], "pbc": [[bool] * 3, ...],
        "n_structures": int, "min_distance": float}``: the elements met, the
        smallest and largest atom count, each distinct periodicity, and the
        shortest distance between two atoms (A, :func:`shortest_distance`;
        left out when no structure has two atoms or a periodic direction).
    """
    if not (hasattr(structures, "mask") and hasattr(structures, "pbc")):  # a sequence of Atoms
        if not len(structures):
            raise ValueError("training_domain needs at least one structure")
        from ase_bptt.batch import Batch

        structures = Batch.from_atoms(list(structures), constraints=False)
    counts = structures.mask.sum(1).tolist()
    numbers = structures.numbers[structures.mask].tolist()
    pbcs = [tuple(bool(p) for p in row) for row in structures.pbc.tolist()]
    if not counts:
        raise ValueError("training_domain needs at least one structure")
    domain: dict[str, Any] = {
        "species": sorted({int(z) for z in numbers}),
        "n_atoms": [int(min(counts)), int(max(counts))],
        "pbc": [list(p) for p in sorted(set(pbcs))],
        "n_structures": len(counts),
    }
    nearest = shortest_distance(structures)
    if nearest is not None:
        domain["min_distance"] = nearest
    return domain


def shortest_distance(batch: Any) -> float | None:
    """The shortest distance (A) between two atoms of any structure in a Batch, or None when there is none.

    Pairs by minimum image (the fractional-rounding rule of
    :func:`ase_bptt.metrics.minimum_image`, exact for distances below half
    the smallest cell height, so always for the nearest neighbours of a
    training cell), and each atom with its own periodic images (the shortest
    lattice vector along a periodic direction). Computed in chunks of
    structures, in float64.
    """
    import torch

    from ase_bptt.metrics import minimum_image

    best = float("inf")
    total = batch.positions.shape[0]
    for start in range(0, total, _DISTANCE_CHUNK):
        part = batch.select(list(range(start, min(start + _DISTANCE_CHUNK, total))))
        pos, cell = part.positions.detach().double(), part.cell.detach().double()
        b, n, _ = pos.shape
        rij = minimum_image((pos[:, None] - pos[:, :, None]).reshape(b, n * n, 3), cell, part.pbc).reshape(b, n, n, 3)
        pair = part.mask[:, :, None] & part.mask[:, None, :] & ~torch.eye(n, dtype=torch.bool, device=pos.device)
        if pair.any():
            best = min(best, float(rij.norm(dim=-1)[pair].min()))
        lattice = cell.norm(dim=-1)[part.pbc]
        if lattice.numel():
            best = min(best, float(lattice.min()))
    return best if best < float("inf") else None


def merge_training_domains(*domains: dict | None) -> dict | None:
    """One domain covering all of ``domains`` (None entries, e.g. an old checkpoint's, are skipped).

    For fine-tuning: the pretrained checkpoint's domain merged with that of
    the structures the model is tuned on. None when every entry is None.
    """
    known = [d for d in domains if d is not None]
    if not known:
        return None
    merged: dict[str, Any] = {
        "species": sorted({int(z) for d in known for z in d["species"]}),
        "n_atoms": [min(d["n_atoms"][0] for d in known), max(d["n_atoms"][1] for d in known)],
        "pbc": [list(p) for p in sorted({tuple(bool(x) for x in row) for d in known for row in d["pbc"]})],
        "n_structures": sum(int(d.get("n_structures", 0)) for d in known),
    }
    distances = [float(d["min_distance"]) for d in known if d.get("min_distance") is not None]
    if distances:
        merged["min_distance"] = min(distances)
    return merged


def read_training_domain(checkpoint: Mapping, source: str = "checkpoint") -> dict | None:
    """The checkpoint's training domain, or None when it stores none (written before domains existed).

    Raises:
        CorruptCheckpointError: a domain is stored but malformed.
    """
    domain = (checkpoint.get("metadata") or {}).get(DOMAIN_KEY)
    if domain is None:
        return None
    try:
        low, high = (int(n) for n in domain["n_atoms"])
        pbc = [[bool(p) for p in row] for row in domain["pbc"]]
        nearest = domain.get("min_distance")  # absent in checkpoints written before it was recorded
        if nearest is not None and not (float(nearest) > 0 and np.isfinite(float(nearest))):
            raise ValueError(f"min_distance {nearest!r} is not a positive distance")
        if low < 1 or high < low or not pbc or any(len(row) != 3 for row in pbc):
            raise ValueError("out of range")
        return {**domain, "n_atoms": [low, high], "pbc": pbc, "species": [int(z) for z in domain["species"]]}
    except (KeyError, TypeError, ValueError) as e:
        from ase_bptt.models.checkpoint import CorruptCheckpointError

        raise CorruptCheckpointError(
            f"{source}: metadata.{DOMAIN_KEY} is malformed ({type(e).__name__}: {e}); re-save the checkpoint"
        ) from None


class StructureCheck:
    """Checks structures for one model: errors for what it cannot evaluate, one warning per reason otherwise.

    Args:
        model: the force model (its ``check_species`` and ``periodic_features`` are used).
        domain: the checkpoint's training domain, or None.
        source: the model's name in messages (e.g. the checkpoint path).
    """

    def __init__(self, model: Any, domain: dict | None, source: str) -> None:
        self.model = model
        self.domain = domain
        self.source = source
        self.warned: set[str] = set()

    def __call__(self, atoms: Atoms, where: str) -> None:
        """Raise :class:`StructureError` (or ``UnknownElementError``) or warn about ``atoms``, named ``where``."""
        check_species = getattr(self.model, "check_species", None)
        if check_species is not None:
            check_species(atoms.numbers, where=where)
        check_geometry(atoms, where)
        self._check_periodicity(atoms, where)
        self._check_distances(atoms, where)
        for reason, message in self._outside(atoms, where):
            if reason not in self.warned:
                self.warned.add(reason)
                warnings.warn(message, OutOfDomainWarning, stacklevel=3)

    def _check_periodicity(self, atoms: Atoms, where: str) -> None:
        if not getattr(self.model, "periodic_features", False):
            return
        pbc = [bool(p) for p in atoms.pbc]
        if not any(pbc):
            raise StructureError(
                f"{where} has no periodic cell (pbc=False), but {self.source} describes atoms by periodic "
                "features of their fractional coordinates and cannot evaluate it; give it a cell and pbc=True "
                "(a cluster: atoms.center(vacuum=10); atoms.pbc = True)"
            )
        if self.domain is None:
            return
        needed = [all(row[i] for row in self.domain["pbc"]) for i in range(3)]
        missing = [a for a, need, p in zip(_AXES, needed, pbc) if need and not p]
        if missing:
            raise StructureError(
                f"{where} is not periodic along {''.join(missing)}, but {self.source} was trained only on "
                f"structures periodic along {''.join(a for a, n in zip(_AXES, needed) if n)} and needs that "
                "periodicity; set atoms.pbc = True with a cell along those directions"
            )

    def _check_distances(self, atoms: Atoms, where: str) -> None:
        nearest = None if self.domain is None else self.domain.get("min_distance")
        if nearest is None or len(atoms) == 0:
            return
        from ase.neighborlist import neighbor_list

        limit = MIN_DISTANCE_FRACTION * float(nearest)
        i, j, d = neighbor_list("ijd", atoms, limit)  # every periodic image, exactly
        if not len(d):
            return
        k = int(np.argmin(d))
        a, b = int(i[k]), int(j[k])
        symbols = atoms.get_chemical_symbols()
        pair = (
            f"atom {a} ({symbols[a]}) and its own periodic image are"
            if a == b
            else f"atoms {a} ({symbols[a]}) and {b} ({symbols[b]}) are"
        )
        raise StructureError(
            f"{where}: {pair} {d[k]:.3f} A apart, closer than {MIN_DISTANCE_FRACTION:g} x the shortest distance in "
            f"{self.source}'s training data ({float(nearest):.3f} A), so its forces there mean nothing; check the "
            "input for overlapping or duplicated atoms (or coordinates in the wrong units)"
        )

    def _outside(self, atoms: Atoms, where: str) -> list[tuple[str, str]]:
        if self.domain is None:
            return []
        found = []
        low, high = self.domain["n_atoms"]
        if not low / ATOM_COUNT_MARGIN <= len(atoms) <= high * ATOM_COUNT_MARGIN:
            found.append(
                (
                    "n_atoms",
                    f"{where} has {len(atoms)} atoms, outside the {low}-{high} atoms {self.source} was trained on "
                    f"(by more than a factor {ATOM_COUNT_MARGIN:g}); its forces there are an extrapolation",
                )
            )
        pbc = [bool(p) for p in atoms.pbc]
        if pbc not in self.domain["pbc"]:
            trained = " or ".join(_pbc_text(row) for row in self.domain["pbc"])
            found.append(
                (
                    "pbc",
                    f"{where} is {_pbc_text(pbc)}, but {self.source} was trained on structures {trained}; "
                    "its forces there are an extrapolation",
                )
            )
        return found


def check_geometry(atoms: Atoms, where: str) -> None:
    """Raise :class:`StructureError` for non-finite positions or cell, or a singular periodic cell."""
    if not np.isfinite(atoms.positions).all():
        raise StructureError(f"{where} has non-finite (NaN or infinite) positions; fix the input structure")
    cell = np.asarray(atoms.cell.array, dtype=float)
    if not np.isfinite(cell).all():
        raise StructureError(f"{where} has a non-finite cell; fix the input structure's lattice vectors")
    pbc = np.asarray(atoms.pbc, dtype=bool)
    if not pbc.any():
        return
    # Non-periodic directions stand in with a unit vector, as metrics.fractional does.
    safe = np.where(pbc[:, None], cell, np.eye(3))
    lengths = np.linalg.norm(safe, axis=1)
    if lengths.min() == 0 or abs(np.linalg.det(safe)) <= _SINGULAR_CELL * lengths.prod():
        raise StructureError(
            f"{where} is {_pbc_text(pbc.tolist())} but its cell there is zero or singular "
            f"(lattice vector lengths {', '.join(f'{x:g}' for x in np.linalg.norm(cell[pbc], axis=1))} A); "
            "give it its lattice vectors "
            "(atoms.set_cell) or set pbc=False along directions without one"
        )
