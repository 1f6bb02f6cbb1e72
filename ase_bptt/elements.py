"""Per-element descriptor table for Z = 1..94, built from pymatgen's element data.

ADAPT gives every atom a token made of its coordinates and a fixed vector of
element properties, so the model can share what it learns between chemically
similar elements. :func:`element_table` returns that vector for every element
as one ``(95, N_FEATURES)`` float64 tensor; row ``Z`` belongs to atomic number
``Z`` and row 0 (padding atoms) is all zeros.

Columns (``FEATURES`` holds the names, in this order):

===  ==========================  ======  =======================================
col  name                        unit    source / how a missing value is filled
===  ==========================  ======  =======================================
0    ``period``                  --      pymatgen ``Element.row`` (1..7)
1    ``group``                   --      pymatgen ``Element.group`` (1..18; the
                                         lanthanides and actinides are group 3)
2    ``block_s``                 0/1     one-hot of pymatgen ``Element.block``
3    ``block_p``                 0/1
4    ``block_d``                 0/1
5    ``block_f``                 0/1
6    ``electronegativity``       --      Pauling, pymatgen ``Element.X``;
                                         missing for He, Ne, Ar: filled with the
                                         mean over the elements that have one,
                                         and flagged in column 13
7    ``covalent_radius``         A       ``ase.data.covalent_radii`` (Cordero et
                                         al. 2008), defined for every element
8    ``atomic_radius``           A       pymatgen ``Element.atomic_radius``
                                         (empirical); missing for He, Ne, Kr, Xe,
                                         At, Rn, Fr: filled with the covalent
                                         radius, and flagged in column 13
9    ``valence_electrons``       --      electrons outside the preceding noble-
                                         gas core, not counting the filled
                                         ``(n-1)d`` (p block) and ``(n-2)f``
                                         (p and d blocks from period 6)
                                         subshells: Si 4, Fe 8, Au 11, Kr 8
10   ``ionization_energy``       eV      first ionisation energy, pymatgen
                                         ``Element.ionization_energies[0]``
11   ``electron_affinity``       eV      pymatgen ``Element.electron_affinity``
                                         (negative where the anion is unbound)
12   ``atomic_mass``             amu     pymatgen ``Element.atomic_mass``
13   ``filled``                  0/1     1 where column 6 or 8 was filled
===  ==========================  ======  =======================================

Models should not feed raw columns (masses near 200 next to 0/1 flags) to a
network: :func:`standardised_element_table` scales each column to zero mean
and unit variance over Z = 1..94, a fixed normalisation that does not depend
on the training data, so one model can meet new elements at fine-tuning time.
"""

from __future__ import annotations

import math
import warnings
from functools import lru_cache

import numpy as np
import torch

__all__ = [
    "MAX_Z",
    "FEATURES",
    "N_FEATURES",
    "element_table",
    "standardised_element_table",
]

MAX_Z = 94

FEATURES: tuple[str, ...] = (
    "period",
    "group",
    "block_s",
    "block_p",
    "block_d",
    "block_f",
    "electronegativity",
    "covalent_radius",
    "atomic_radius",
    "valence_electrons",
    "ionization_energy",
    "electron_affinity",
    "atomic_mass",
    "filled",
)
N_FEATURES = len(FEATURES)

_BLOCKS = ("s", "p", "d", "f")


_NOBLE_CORES = (0, 2, 10, 18, 36, 54, 86)


def _valence_electrons(z: int, period: int, block: str) -> int:
    """Electrons beyond the noble-gas core, less the filled inner d/f subshells."""
    count = z - _NOBLE_CORES[period - 1]
    if block == "p" and period >= 4:
        count -= 10  # filled (n-1)d
    if block in ("p", "d") and period >= 6:
        count -= 14  # filled (n-2)f
    return count


@lru_cache(maxsize=1)
def _raw_table() -> np.ndarray:
    from ase.data import covalent_radii
    from pymatgen.core.periodic_table import Element

    table = np.zeros((MAX_Z + 1, N_FEATURES))
    electronegativity = np.full(MAX_Z + 1, np.nan)
    atomic_radius = np.full(MAX_Z + 1, np.nan)
    # pymatgen warns for every element with a missing property; the fill rules
    # above handle those, so the warnings would only alarm users.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for z in range(1, MAX_Z + 1):
            el = Element.from_Z(z)
            row = table[z]
            row[0] = el.row
            row[1] = el.group
            row[2 + _BLOCKS.index(el.block)] = 1.0
            x = float(el.X)
            electronegativity[z] = x if math.isfinite(x) else np.nan
            row[7] = covalent_radii[z]
            r = el.atomic_radius
            atomic_radius[z] = float(r) if r is not None else np.nan
            row[9] = _valence_electrons(z, el.row, el.block)
            row[10] = float(el.ionization_energies[0])
            row[11] = float(el.electron_affinity)
            row[12] = float(el.atomic_mass)
    real = slice(1, MAX_Z + 1)
    missing_x = np.isnan(electronegativity[real])
    missing_r = np.isnan(atomic_radius[real])
    table[real, 6] = np.where(missing_x, np.nanmean(electronegativity[real]), electronegativity[real])
    table[real, 8] = np.where(missing_r, table[real, 7], atomic_radius[real])
    table[real, 13] = (missing_x | missing_r).astype(float)
    if not np.isfinite(table).all():  # pragma: no cover - guards a pymatgen data change
        bad = sorted({int(z) for z in np.argwhere(~np.isfinite(table))[:, 0]})
        raise RuntimeError(f"element descriptors not finite for Z = {bad}; check the pymatgen version")
    table.setflags(write=False)
    return table


def element_table() -> torch.Tensor:
    """Raw descriptors, ``(95, N_FEATURES)`` float64, row 0 (padding) zeros.

    Columns and units are listed in the module docstring. Built once per
    process (a few ms) and returned as a fresh tensor each call.
    """
    return torch.tensor(_raw_table())


def standardised_element_table() -> torch.Tensor:
    """Descriptors scaled to zero mean, unit variance over Z = 1..94.

    ``(95, N_FEATURES)`` float64; row 0 (padding) stays zero. Columns with no
    spread (none today) are left centred but unscaled.
    """
    raw = _raw_table()
    real = raw[1:]
    mean = real.mean(axis=0)
    std = real.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    out = np.zeros_like(raw)
    out[1:] = (real - mean) / std
    return torch.tensor(out)
