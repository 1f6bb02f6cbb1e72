"""Pre-relax a batch of structures with a tuned model and write each as a VASP input (POSCAR).

    python examples/prerelax_for_dft.py si.pt candidates/ -o dft-inputs/
    python examples/prerelax_for_dft.py si.pt defects.extxyz -o dft-inputs/ --fire --fmax 0.05

Every structure file under the inputs (POSCAR, CIF, extxyz, .traj: anything ``ase.io`` reads; every frame of a
multi-frame file) is checked against the model first (an element it was never trained on stops the run before
any structure is relaxed), then relaxed with the checkpoint's own step rule (``LearnedStepOptimizer``, how the
model was tuned) or with ASE's FIRE (``--fire``), and written to ``OUT/<name>/POSCAR`` with
``OUT/prerelax.json`` (steps taken, final maximum force and energy per structure). The DFT code then starts
from these positions: what the pre-relaxation saves is the DFT ionic steps it no longer needs
(``ase-bptt evaluate --refine-with`` measures that on your test split).

Workflow managers build the same calculator from a JSON spec, so a tuned model drops into their force-field
jobs unchanged. atomate2 (a ``monty`` spec and keyword arguments)::

    from atomate2.forcefields.jobs import ForceFieldRelaxMaker
    maker = ForceFieldRelaxMaker(
        force_field_name={"@module": "ase_bptt", "@callable": "BPTTCalculator"},
        calculator_kwargs={"model_or_path": "si.pt", "dtype": "float64"},
    )

quacc's ASE runners take the calculator object itself: ``Runner(atoms, BPTTCalculator("si.pt"))``.
``tests/test_examples_prerelax.py`` runs this script and resolves the spec with monty (neither manager is
needed).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import ase.io
import numpy as np
from ase import Atoms
from ase.optimize import FIRE

from ase_bptt import BPTTCalculator, LearnedStepOptimizer


def read_structures(inputs: list[Path]) -> list[tuple[str, Atoms]]:
    """(name, structure) for every frame of every readable file under ``inputs``; the name is the file's stem,
    with the frame index for multi-frame files."""
    files = [f for p in inputs for f in (sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p])]
    structures = []
    for path in files:
        frames = ase.io.read(path, index=":")
        assert isinstance(frames, list)
        stem = path.name if path.suffix == "" else path.stem  # POSCAR_vac1 keeps its name
        for k, atoms in enumerate(frames):
            structures.append((stem if len(frames) == 1 else f"{stem}-{k}", atoms))
    names = [name for name, _ in structures]
    if len(set(names)) != len(names):
        raise SystemExit("two inputs share a name; rename one (outputs are written to OUT/<name>/POSCAR)")
    return structures


def prerelax(model: Path, inputs: list[Path], out: Path, *, fire: bool, fmax: float, steps: int) -> list[dict]:
    """Relax every structure of ``inputs`` with ``model`` and write ``out/<name>/POSCAR``; returns the summary."""
    calc = BPTTCalculator(model)
    structures = read_structures(inputs)
    for name, atoms in structures:  # every structure checked before any is relaxed
        calc.check_structure(atoms, where=name)
    summary = []
    for name, atoms in structures:
        atoms = atoms.copy()
        atoms.calc = calc
        optimizer = FIRE(atoms, logfile=None) if fire else LearnedStepOptimizer(atoms, logfile=None)
        converged = optimizer.run(fmax=fmax, steps=steps)
        forces = atoms.get_forces()
        (out / name).mkdir(parents=True, exist_ok=True)
        ase.io.write(out / name / "POSCAR", atoms, format="vasp", direct=True)
        summary.append(
            {
                "name": name,
                "steps": int(optimizer.nsteps),
                "converged": bool(converged),
                "fmax_eV_per_A": float(np.linalg.norm(forces, axis=1).max()),
                "energy_eV": float(atoms.get_potential_energy()),
            }
        )
    (out / "prerelax.json").write_text(json.dumps({"model": str(model), "structures": summary}, indent=1) + "\n")
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="tuned checkpoint (ase-bptt finetune ... -o model.pt)")
    parser.add_argument("inputs", type=Path, nargs="+", help="structure files or folders")
    parser.add_argument("-o", "--out", type=Path, required=True, help="folder for <name>/POSCAR and prerelax.json")
    parser.add_argument("--fire", action="store_true", help="relax with ASE's FIRE instead of the learned rule")
    parser.add_argument("--fmax", type=float, default=0.05, help="force criterion, eV/A (default 0.05)")
    parser.add_argument("--steps", type=int, default=300, help="step limit per structure (default 300)")
    args = parser.parse_args(argv)
    if args.out.exists() and any(args.out.iterdir()):
        parser.error(f"{args.out} is not empty; choose a new folder (nothing is overwritten)")
    summary = prerelax(args.model, args.inputs, args.out, fire=args.fire, fmax=args.fmax, steps=args.steps)
    for row in summary:
        print(f"{row['name']}: {row['steps']} steps, fmax {row['fmax_eV_per_A']:.3f} eV/A -> {args.out / row['name']}")


if __name__ == "__main__":
    main()
