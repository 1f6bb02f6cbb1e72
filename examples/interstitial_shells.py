"""How far do the first neighbours of an interstitial move: reference vs pretrained vs BPTT?

    python examples/interstitial_shells.py gen-loeo/Ni                   # a group of generalisation.py
    python examples/interstitial_shells.py gen-loeo/Ni --pool gen-loeo/pool.db  # and the reference per element

For the test interstitials of one ``examples/generalisation.py`` group (``--label``, default every
``int:*`` label there), the mean radial displacement (A, positive = away from the interstitial) of
the host atoms within ``--shell`` A of it, from the initial to the final structure: the EMT reference,
the pretrained model with the fixed step chosen on val (from the group's evaluation report) and the
BPTT-tuned model with its own step rule, both through ``LearnedStepOptimizer`` and ``BPTTCalculator``
as a user runs them. ``--pool`` adds the reference's value for every interstitial element of the pool,
which shows what the models saw in training. Reads the group folder only; writes nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from fnmatch import fnmatchcase
from pathlib import Path

import numpy as np
import torch
from ase import Atoms
from ase.data import atomic_numbers
from ase.geometry import find_mic

from ase_bptt.calculator import BPTTCalculator
from ase_bptt.data.db import TrajectoryDB
from ase_bptt.relax.optimizer import LearnedStepOptimizer


def interstitial_index(atoms: Atoms, label: str) -> int:
    """The atom of ``int:X``: the one atom of element X (the host is another element)."""
    z = atomic_numbers[label.split(":", 1)[1]]
    (index,) = [i for i, n in enumerate(atoms.numbers) if n == z]
    return index


def shell_displacement(initial: Atoms, final: Atoms, centre: int, shell: float) -> float:
    """Mean radial displacement (A) of the atoms within ``shell`` A of ``centre`` (minimum image)."""
    d, _ = find_mic(final.positions - initial.positions, initial.cell, initial.pbc)
    r, dist = find_mic(initial.positions - initial.positions[centre], initial.cell, initial.pbc)
    near = (dist > 1e-6) & (dist < shell)
    return float(((d[near] * r[near]).sum(1) / dist[near]).mean())


def relax(checkpoint: Path, atoms: Atoms, eta: float | None, steps: int) -> Atoms:
    a = atoms.copy()
    a.calc = BPTTCalculator(checkpoint)
    opt = LearnedStepOptimizer(a, eta=eta, logfile=None)
    opt.run(fmax=1e-9, steps=steps if eta is not None else opt.max_frames)  # stopped by the rule's own tol
    return a


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("group", type=Path, help="a group folder of generalisation.py (fcc.db, *.pt, eval/)")
    parser.add_argument("--label", default="int:*", help="fnmatch pattern of the interstitial labels")
    parser.add_argument("--shell", type=float, default=2.9, help="first-shell radius (A); Cu: 2.55 A bonds")
    parser.add_argument("--steps", type=int, default=75, help="frames of the fixed-step relaxation")
    parser.add_argument("--pool", type=Path, default=None, help="pool.db: the reference for every element")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    report = json.loads((args.group / "eval" / "report.json").read_text())
    eta = float(report["checkpoints"][0]["fixed_step_selected"]["eta"])
    db = TrajectoryDB(args.group / "fcc.db", create=False)
    rows: dict[str, list[float]] = {}
    for t in db.trajectories("test"):
        if not (t.label.startswith("int:") and fnmatchcase(t.label, args.label)):
            continue
        c = interstitial_index(t.initial, t.label)
        finals = {
            "reference (EMT)": t.final,
            f"pretrained, fixed step eta {eta:g}": relax(args.group / "pretrained.pt", t.initial, eta, args.steps),
            "BPTT-tuned, own rule": relax(args.group / "bptt.pt", t.initial, None, args.steps),
        }
        for name, final in finals.items():
            rows.setdefault(f"{t.label:8s} {name}", []).append(shell_displacement(t.initial, final, c, args.shell))
    if not rows:
        print(f"no test structure of {args.group} matches {args.label}", file=sys.stderr)
        return 1
    print(f"first shell (< {args.shell} A) radial displacement, mean over the test structures (A):")
    for name, values in rows.items():
        print(f"  {name:45s} {np.mean(values):+.4f}  (n {len(values)})")
    if args.pool:
        pool: dict[str, list[float]] = {}
        for t in TrajectoryDB(args.pool, create=False).trajectories(None):
            if t.label.startswith("int:"):
                c = interstitial_index(t.initial, t.label)
                pool.setdefault(t.label, []).append(shell_displacement(t.initial, t.final, c, args.shell))
        print("reference over the pool, per interstitial element:")
        for label, values in sorted(pool.items(), key=lambda kv: np.mean(kv[1])):
            print(f"  {label:8s} {np.mean(values):+.4f}  (n {len(values)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
