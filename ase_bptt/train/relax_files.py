"""``ase-bptt relax``: relax every structure of a file with a checkpoint and write the results."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ase_bptt.relax.defaults import DEFAULT_MAX_STEPS
from ase_bptt.train.common import resolve_dtype
from ase_bptt.train.distributed import resolve_device
from ase_bptt.train.evaluate import NoStepRuleError, _progress

__all__ = ["RelaxedStructure", "relax_file"]


@dataclass
class RelaxedStructure:
    """What ``relax_file`` did to one frame of the input."""

    index: int
    formula: str
    n_atoms: int
    steps: int
    converged: bool
    fmax: float
    displacement_rms: float


def relax_file(
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    *,
    model: str | os.PathLike,
    optimizer: str = "learned",
    fmax: float = 0.05,
    steps: int | None = None,
    input_format: str | None = None,
    output_format: str | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = "float32",
    progress: bool = True,
) -> list[RelaxedStructure]:
    """Relax every frame of an ``ase.io``-readable file and write the results.

    Args:
        input_path: any file ``ase.io.read(..., index=":")`` reads.
        output_path: any file ``ase.io.write`` writes (format from the suffix
            unless ``output_format`` is given).
        model: checkpoint path.
        optimizer: "learned" (:class:`~ase_bptt.relax.optimizer.LearnedStepOptimizer`
            with the checkpoint's step rule, exactly as trained) or "fire"
            (``ase.optimize.FIRE`` to ``fmax``).
        fmax: force criterion of FIRE (eV/A); unused by "learned", which stops
            on the checkpoint's displacement tolerance.
        steps: step limit (default: the checkpoint's ``max_steps`` for
            "learned", 300 for "fire").

    Raises:
        FileNotFoundError: the input or model is missing.
        UnknownElementError: a frame holds an element the model does not know
            (checked for every frame before anything is relaxed or written).
        ValueError: an unknown optimizer or an input with no structures.
    """
    import ase.io
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.optimize import FIRE

    from ase_bptt.calculator import BPTTCalculator

    if optimizer not in ("learned", "fire"):
        raise ValueError(f"unknown optimizer {optimizer!r}: use learned or fire")
    src = Path(input_path)
    if not src.exists():
        raise FileNotFoundError(f"input file {src} does not exist")
    if not Path(model).exists():
        raise FileNotFoundError(f"model checkpoint {model} does not exist")
    images = ase.io.read(src, index=":", format=input_format)
    if not images:
        raise ValueError(f"{src} holds no structures")
    calc = BPTTCalculator(Path(model), device=resolve_device(device), dtype=resolve_dtype(dtype))
    for i, atoms in enumerate(images):
        calc.model.check_species(atoms.numbers, where=f"{src} (frame {i}, {atoms.get_chemical_formula()})")

    if optimizer == "learned" and not calc.relax_settings:
        raise NoStepRuleError(
            f"{model} stores no step rule (relax settings); relax with --optimizer fire, or fine-tune it first"
        )
    if steps is None:
        relax = calc.relax_settings or {}
        steps = int(relax.get("max_steps") or DEFAULT_MAX_STEPS) if optimizer == "learned" else 300
    done: list[RelaxedStructure] = []
    for i, atoms in enumerate(_progress(images, enabled=progress, desc=f"relax ({optimizer})")):
        start = atoms.get_positions()
        atoms.calc = calc
        if optimizer == "fire":
            opt = FIRE(atoms, logfile=None)
            converged = bool(opt.run(fmax=fmax, steps=steps))
        else:
            from ase_bptt.relax.optimizer import LearnedStepOptimizer

            opt = LearnedStepOptimizer(atoms, logfile=None)
            converged = bool(opt.run(steps=steps))
        forces = atoms.get_forces()
        energy = atoms.calc.results.get("energy")
        # The calculator is shared by all frames: freeze this frame's results so
        # the output file carries its own energy and forces.
        atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces.copy())
        moved = atoms.get_positions() - start
        done.append(
            RelaxedStructure(
                index=i,
                formula=atoms.get_chemical_formula(),
                n_atoms=len(atoms),
                steps=int(opt.nsteps),
                converged=converged,
                fmax=float(np.linalg.norm(forces, axis=1).max()),
                displacement_rms=float(np.sqrt((moved**2).sum(axis=1).mean())),
            )
        )
    out = Path(output_path)
    if out.parent and not out.parent.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
    ase.io.write(out, images[0] if len(images) == 1 else images, format=output_format)
    return done
