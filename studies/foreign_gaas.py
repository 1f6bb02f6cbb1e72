"""A foreign reference set: point defects in zincblende GaAs (or ZnS) relaxed by CHGNet, written as extxyz files.

    python -m studies.foreign_gaas --out gaas-files --n-train 150 --n-test 30 --workers 2
    python -m studies.foreign_gaas --compound ZnS --seed 1 --out zns-files --n-train 120 --n-test 30 --workers 2

No setting of ase-bptt was tuned on this set: another host crystal (a III-V compound, two elements),
other defect kinds (vacancies on either sublattice, antisites, tetrahedral interstitials, a
nearest-neighbour divacancy), and another reference (the universal MLIP CHGNet 0.3.0, the weights
inside the ``chgnet`` wheel) than the built-in silicon and fcc sets. Each relaxation is one extxyz
file (every FIRE frame with CHGNet's energy and forces), in ``train/`` (for ``ase-bptt import``) or
``test/`` (the user's own held-out relaxations: ``ase-bptt import test/ --db d.db --split test``).

Structures: a 2x2x2 conventional GaAs supercell (64 sites, CHGNet's own lattice constant, found
once by a bulk relaxation), one defect at a random site, every atom rattled by 0.1 A (normal);
relaxed with ASE's FIRE to fmax 0.01 eV/A (at most 600 steps), positions only. Deterministic:
structure ``i`` comes from ``numpy.random.default_rng((seed, i))``; the test files use indices
beyond the train files', so the two sets never share a structure.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
from pathlib import Path

import numpy as np

#: Zincblende compounds: (cation, anion, the lattice-constant scan's range in A for CHGNet's minimum).
COMPOUNDS = {"GaAs": ("Ga", "As", 5.55, 5.85), "ZnS": ("Zn", "S", 5.25, 5.65)}
#: Defect kinds, for the cation c and the anion a (GaAs: V_Ga, V_As, Ga_As, As_Ga, Ga_i, As_i, V_Ga+V_As).
KINDS = ("V_{c}", "V_{a}", "{c}_{a}", "{a}_{c}", "{c}_i", "{a}_i", "V_{c}+V_{a}")
RATTLE = 0.1  # A
FMAX = 0.01  # eV/A
MAX_STEPS = 600


def _calculator():
    import torch

    torch.set_num_threads(1)
    from chgnet.model import CHGNet
    from chgnet.model.dynamics import CHGNetCalculator

    return CHGNetCalculator(CHGNet.load(verbose=False), use_device="cpu")


def lattice_constant(calc, compound: str = "GaAs") -> float:
    """CHGNet's equilibrium zincblende lattice constant (A), from a bulk energy scan refined by a parabola."""
    from ase.build import bulk

    _, _, low, high = COMPOUNDS[compound]
    grid = np.linspace(low, high, 13)
    energies = []
    for a in grid:
        atoms = bulk(compound, "zincblende", a=float(a), cubic=True)
        atoms.calc = calc
        energies.append(atoms.get_potential_energy())
    k = int(np.argmin(energies))
    k = min(max(k, 1), len(grid) - 2)
    c = np.polyfit(grid[k - 1 : k + 2], energies[k - 1 : k + 2], 2)
    return float(-c[1] / (2 * c[0]))


def build(index: int, seed: int, a: float, compound: str = "GaAs"):
    """Structure ``index``: (atoms, label)."""
    from ase.build import bulk

    cation, anion = COMPOUNDS[compound][:2]
    rng = np.random.default_rng((seed, index))
    atoms = bulk(compound, "zincblende", a=a, cubic=True) * (2, 2, 2)
    generic = KINDS[rng.integers(len(KINDS))]
    kind = generic.format(c=cation, a=anion)
    symbols = np.array(atoms.get_chemical_symbols())
    ga, as_ = np.flatnonzero(symbols == cation), np.flatnonzero(symbols == anion)
    remove: list[int] = []
    if generic == "V_{c}":
        remove = [int(rng.choice(ga))]
    elif generic == "V_{a}":
        remove = [int(rng.choice(as_))]
    elif generic == "{c}_{a}":  # a cation on an anion site
        atoms.symbols[int(rng.choice(as_))] = cation
    elif generic == "{a}_{c}":
        atoms.symbols[int(rng.choice(ga))] = anion
    elif generic in ("{c}_i", "{a}_i"):
        # The tetrahedral interstitial site next to a random cation: the cation's position + a(1/2,1/2,1/2)/... ;
        # in zincblende the empty tetrahedral sites sit at the anion positions shifted by a/2 along x.
        host = int(rng.choice(as_))
        site = atoms.positions[host] + np.array([a / 2, 0.0, 0.0])
        atoms.append(cation if generic == "{c}_i" else anion)
        atoms.positions[-1] = site
    else:  # nearest-neighbour divacancy
        i = int(rng.choice(ga))
        d = atoms.get_distances(i, as_, mic=True)
        remove = [i, int(as_[int(np.argmin(d))])]
    if remove:
        del atoms[remove]
    atoms.positions += rng.normal(scale=RATTLE, size=atoms.positions.shape)
    atoms.wrap()
    atoms.info["label"] = kind
    return atoms, kind


def relax_one(job):
    index, seed, a, path, compound = job
    if Path(path).exists():
        return path, "exists"
    from ase.io import write

    from ase_bptt.data.generate import relax_frames

    calc = _worker_calc()
    atoms, label = build(index, seed, a, compound)
    frames = relax_frames(atoms, calc, fmax=FMAX, max_steps=MAX_STEPS)
    for f in frames:
        f.info["label"] = label
    tmp = Path(path).with_suffix(".tmp.extxyz")
    write(tmp, frames, format="extxyz")
    os.replace(tmp, path)
    return path, f"{label}: {len(frames)} frames"


_CALC = None


def _worker_calc():
    global _CALC
    if _CALC is None:
        _CALC = _calculator()
    return _CALC


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--n-train", type=int, default=150)
    p.add_argument("--n-test", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--compound", choices=sorted(COMPOUNDS), default="GaAs", help="the zincblende host (default GaAs)")
    args = p.parse_args()
    (args.out / "train").mkdir(parents=True, exist_ok=True)
    (args.out / "test").mkdir(parents=True, exist_ok=True)
    a_file = args.out / "lattice_constant.txt"
    if a_file.exists():
        a = float(a_file.read_text())
    else:
        a = lattice_constant(_worker_calc(), args.compound)
        a_file.write_text(f"{a:.6f}\n")
    print(f"CHGNet zincblende {args.compound} lattice constant: {a:.4f} A", flush=True)
    stem = args.compound.lower()
    jobs = [
        (i, args.seed, a, str(args.out / "train" / f"{stem}-{i:04d}.extxyz"), args.compound)
        for i in range(args.n_train)
    ]
    jobs += [
        (k, args.seed, a, str(args.out / "test" / f"{stem}-{k:04d}.extxyz"), args.compound)
        for k in range(args.n_train, args.n_train + args.n_test)
    ]
    ctx = mp.get_context("spawn")
    with ctx.Pool(args.workers) as pool:
        for n, (path, what) in enumerate(pool.imap_unordered(relax_one, jobs), 1):
            print(f"[{n}/{len(jobs)}] {Path(path).name}: {what}", flush=True)


if __name__ == "__main__":
    main()
