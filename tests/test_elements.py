"""Element descriptor table: shape, units, fill rules, no warnings, speed."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from ase.data import atomic_masses, covalent_radii

from ase_bptt.elements import FEATURES, MAX_Z, N_FEATURES, element_table, standardised_element_table


def col(name: str) -> int:
    return FEATURES.index(name)


def test_shape_and_padding_row():
    t = element_table()
    assert t.shape == (MAX_Z + 1, N_FEATURES) and t.dtype == torch.float64
    assert torch.all(t[0] == 0)
    assert torch.isfinite(t).all()


def test_known_values_silicon_iron_gold():
    t = element_table()
    si, fe, au = t[14], t[26], t[79]
    assert si[col("period")] == 3 and si[col("group")] == 14 and si[col("block_p")] == 1
    assert (
        si[col("valence_electrons")] == 4 and fe[col("valence_electrons")] == 8 and au[col("valence_electrons")] == 11
    )
    assert si[col("electronegativity")] == pytest.approx(1.90)
    assert si[col("ionization_energy")] == pytest.approx(8.1517, abs=1e-3)  # eV
    assert si[col("covalent_radius")] == pytest.approx(covalent_radii[14])  # A
    # pymatgen and ASE agree on the standard atomic mass to 1e-3 amu
    assert si[col("atomic_mass")] == pytest.approx(atomic_masses[14], abs=1e-3)
    assert si[col("filled")] == 0


def test_missing_values_are_filled_and_flagged():
    t = element_table()
    he, ne, kr = t[2], t[10], t[36]
    # He has no Pauling electronegativity: filled with the mean of those that do
    x_known = [float(t[z, col("electronegativity")]) for z in range(1, MAX_Z + 1) if z not in (2, 10, 18)]
    assert he[col("electronegativity")] == pytest.approx(np.mean(x_known))
    assert he[col("filled")] == 1 and ne[col("filled")] == 1
    # Kr has an electronegativity but no empirical atomic radius: covalent radius used
    assert kr[col("atomic_radius")] == kr[col("covalent_radius")] and kr[col("filled")] == 1


def test_one_hot_block_and_standardised_stats():
    t = element_table()
    blocks = t[1:, col("block_s") : col("block_f") + 1]
    assert torch.all(blocks.sum(1) == 1)
    s = standardised_element_table()
    assert torch.all(s[0] == 0)
    assert torch.allclose(s[1:].mean(0), torch.zeros(N_FEATURES, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(s[1:].std(0, unbiased=False), torch.ones(N_FEATURES, dtype=torch.float64), atol=1e-12)


def test_build_is_fast_and_silent():
    # A fresh interpreter: the cache must not hide the first build. Warnings
    # are errors there, so any pymatgen warning that leaks fails the run.
    code = (
        "import time, warnings; warnings.simplefilter('error');"
        "import pymatgen.core.periodic_table, ase_bptt.elements as e;"
        "t=time.perf_counter(); e.element_table(); print(time.perf_counter()-t)"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stderr == ""
    # seconds for the build itself (~0.01 s; pymatgen's import adds ~0.2 s)
    assert float(run.stdout) < 1.0


def test_returns_fresh_tensor():
    a = element_table()
    a[14, 0] = -1
    assert element_table()[14, 0] == 3
