"""How far do a defect's neighbours move, shell by shell: reference vs pretrained vs BPTT?

    python -m studies.defect_shells gen-loeo/Ni                         # every int:* test structure
    python -m studies.defect_shells gen-loko/divacancy --label divacancy --shells 2.9,4.2,5.5
    python -m studies.defect_shells gen-loeo/Ni --pool gen-loeo/pool.db  # and the reference per label

For the test structures of one ``studies/generalisation.py`` group whose label matches ``--label``
(an fnmatch pattern, default ``int:*``), the mean radial displacement (A, positive = away from the
defect) of the atoms in each shell around the defect, from the initial to the final structure: the
EMT reference, the pretrained model with the fixed step chosen on val (from the group's evaluation
report) and the BPTT-tuned model with its own step rule, both through ``LearnedStepOptimizer`` and
``BPTTCalculator`` as a user runs them. A model that moves a shell further out than the reference
ends outside it in Dq; the last row, tuned minus reference, says which way and where. Each column
also holds the undoing of the recipe's 0.1 A rattle, which averages to zero only over many atoms
(about 0.1 / sqrt(atoms in the shell x structures) A of noise); it is the same for every row, so the
difference row is free of it.

The defect centre (:func:`defect_centre`): the interstitial atom of ``int:X`` (as before this script
covered other kinds); otherwise the mean, by minimum image, of the host sites of the perfect fcc
supercell left empty (vacancies) and the sites holding another element (substitutions). Shells are
``[0, r1), [r1, r2), ...`` from ``--shells`` (A; Cu: first neighbours 2.55 A, second 3.61 A).
``--pool`` adds the reference's first shell for every label of the pool (what the models saw in
training). Reads the group folder only; writes nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from fnmatch import fnmatchcase
from pathlib import Path

import numpy as np
import torch
from ase import Atoms
from ase.build import bulk
from ase.data import atomic_numbers, chemical_symbols
from ase.geometry import find_mic

from ase_bptt.calculator import BPTTCalculator
from ase_bptt.data.db import TrajectoryDB
from ase_bptt.relax.optimizer import LearnedStepOptimizer


def interstitial_index(atoms: Atoms, label: str) -> int:
    """The atom of ``int:X``: the one atom of element X (the host is another element)."""
    z = atomic_numbers[label.split(":", 1)[1]]
    (index,) = [i for i, n in enumerate(atoms.numbers) if n == z]
    return index


def defect_centre(atoms: Atoms, label: str) -> np.ndarray:
    """The defect's position (A) in ``atoms`` (an initial structure of the ``fcc-defects`` recipe).

    ``int:X``: the X atom. Otherwise the host's perfect fcc supercell (cubic cell, ``n`` conventional
    cells a side with ``4 n^3`` close to the atom count) is laid over the structure; its sites with no
    atom within a quarter lattice constant (vacancies) and the atoms of another element than the host
    (substitutions) are the defect sites, and the centre is their mean taken by minimum image from the
    first. Raises ValueError for a cell that is not such a supercell or a structure with no defect site.
    """
    if label.startswith("int:"):
        return atoms.positions[interstitial_index(atoms, label)].copy()
    cell = atoms.cell.array
    n = round((len(atoms) / 4) ** (1 / 3))
    if n < 1 or not np.allclose(cell, np.diag(np.diag(cell))) or not np.allclose(np.diag(cell), cell[0, 0]):
        raise ValueError(f"{label}: defect_centre needs a cubic fcc supercell, got cell {np.diag(cell)}")
    host = Counter(atoms.numbers.tolist()).most_common(1)[0][0]
    a = cell[0, 0] / n
    sites = (bulk(chemical_symbols[host], "fcc", a=a, cubic=True) * (n, n, n)).positions
    nearest = np.array([find_mic(atoms.positions - p, cell, atoms.pbc)[1].min() for p in sites])
    defect_sites = [*sites[nearest > a / 4], *atoms.positions[atoms.numbers != host]]
    if not defect_sites:
        raise ValueError(f"{label}: no empty site and no substituent found: not a defect of the fcc recipe")
    first = defect_sites[0]
    shifts, _ = find_mic(np.array(defect_sites) - first, cell, atoms.pbc)
    return first + shifts.mean(0)


def shell_bounds(edges: list[float]) -> list[tuple[float, float]]:
    """``[(0, r1), (r1, r2), ...]``: the shells of ``--shells`` radii (A)."""
    return list(zip([0.0, *edges[:-1]], edges, strict=True))


def shell_displacements(initial: Atoms, final: Atoms, centre: np.ndarray, edges: list[float]) -> list[float]:
    """Mean radial displacement (A) of the atoms in each shell ``[0, e1), [e1, e2), ...`` around
    ``centre`` (minimum image; an atom at the centre itself is left out); NaN for an empty shell."""
    d, _ = find_mic(final.positions - initial.positions, initial.cell, initial.pbc)
    r, dist = find_mic(initial.positions - centre, initial.cell, initial.pbc)
    radial = (d * r).sum(1) / np.maximum(dist, 1e-12)
    out = []
    for lo, hi in shell_bounds(edges):
        near = (dist > 1e-6) & (dist >= lo) & (dist < hi)
        out.append(float(radial[near].mean()) if near.any() else float("nan"))
    return out


def relax(checkpoint: Path, atoms: Atoms, eta: float | None, steps: int) -> Atoms:
    a = atoms.copy()
    a.calc = BPTTCalculator(checkpoint)
    opt = LearnedStepOptimizer(a, eta=eta, logfile=None)
    opt.run(fmax=1e-9, steps=steps if eta is not None else opt.max_frames)  # stopped by the rule's own tol
    return a


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("group", type=Path, help="a group folder of generalisation.py (fcc.db, *.pt, eval/)")
    parser.add_argument("--label", default="int:*", help="fnmatch pattern of the test labels, e.g. 'divacancy'")
    parser.add_argument(
        "--shells", default="2.9", help="comma-separated shell radii (A), e.g. 2.9,4.2,5.5; Cu: 2.55 A bonds"
    )
    parser.add_argument("--steps", type=int, default=75, help="frames of the fixed-step relaxation")
    parser.add_argument("--pool", type=Path, default=None, help="pool.db: the reference for every label")
    args = parser.parse_args(argv)
    try:
        edges = [float(e) for e in args.shells.split(",")]
    except ValueError:
        parser.error(f"--shells {args.shells!r}: give comma-separated radii in A, e.g. 2.9,4.2")
    if not edges or any(e <= 0 for e in edges) or edges != sorted(edges):
        parser.error(f"--shells {args.shells!r}: radii must be positive and increasing")
    torch.set_num_threads(1)

    report = json.loads((args.group / "eval" / "report.json").read_text())
    eta = float(report["checkpoints"][0]["fixed_step_selected"]["eta"])
    db = TrajectoryDB(args.group / "fcc.db", create=False)
    names = ("reference (EMT)", f"pretrained, fixed step eta {eta:g}", "BPTT-tuned, own rule")
    rows: dict[str, dict[str, list[list[float]]]] = {}
    for t in db.trajectories("test"):
        if not fnmatchcase(t.label, args.label):
            continue
        centre = defect_centre(t.initial, t.label)
        finals = (
            t.final,
            relax(args.group / "pretrained.pt", t.initial, eta, args.steps),
            relax(args.group / "bptt.pt", t.initial, None, args.steps),
        )
        for name, final in zip(names, finals, strict=True):
            rows.setdefault(t.label, {}).setdefault(name, []).append(
                shell_displacements(t.initial, final, centre, edges)
            )
    if not rows:
        print(f"no test structure of {args.group} matches {args.label}", file=sys.stderr)
        return 1
    heads = [f"{lo:g}-{hi:g} A" for lo, hi in shell_bounds(edges)]
    print("radial displacement of each shell around the defect, mean over the test structures (A):")
    print(f"  {'label':10s} {'':38s} " + " ".join(f"{h:>10s}" for h in heads))
    for label, by_name in rows.items():
        means = {name: np.nanmean(np.array(v), axis=0) for name, v in by_name.items()}
        n = len(by_name[names[0]])
        for name in names:
            print(f"  {label:10s} {name:38s} " + " ".join(f"{m:+10.4f}" for m in means[name]) + f"  (n {n})")
        diff = means[names[2]] - means[names[0]]
        print(f"  {label:10s} {'tuned - reference':38s} " + " ".join(f"{m:+10.4f}" for m in diff))
    if args.pool:
        pool: dict[str, list[float]] = {}
        for t in TrajectoryDB(args.pool, create=False).trajectories(None):
            centre = defect_centre(t.initial, t.label)
            pool.setdefault(t.label, []).append(shell_displacements(t.initial, t.final, centre, edges[:1])[0])
        print(f"reference first shell (< {edges[0]:g} A) over the pool, per label:")
        for label, values in sorted(pool.items(), key=lambda kv: np.mean(kv[1])):
            print(f"  {label:16s} {np.mean(values):+.4f}  (n {len(values)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
