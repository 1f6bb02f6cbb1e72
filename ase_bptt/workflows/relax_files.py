"""``ase-bptt relax``: relax every structure of a file with a checkpoint and write the results."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import ase.io
import numpy as np
import torch
from ase.io.formats import UnknownFileTypeError, filetype, ioformats

from ase_bptt.errors import AseBpttError
from ase_bptt.evaluation.pipeline import NoStepRuleError
from ase_bptt.evaluation.relaxations import progress_bar as _progress
from ase_bptt.outputs import check_not_inputs, check_writable_output
from ase_bptt.relax.defaults import DEFAULT_FIRE_STEPS, DEFAULT_MAX_STEPS
from ase_bptt.runs.config import resolve_dtype
from ase_bptt.runs.distributed import resolve_device

__all__ = ["OutputFormatError", "RelaxedStructure", "UnreadableInputError", "read_structures", "relax_file"]

#: Formats worth naming when the user has to pick one (any ase.io format works).
_COMMON_FORMATS = "extxyz, traj, vasp (POSCAR/CONTCAR), cif, xyz"


class UnreadableInputError(AseBpttError, ValueError):
    """The input file cannot be read as structures (wrong format, damaged, empty)."""


class OutputFormatError(AseBpttError, ValueError):
    """The output file's format is unknown, cannot be written, or cannot hold all the frames."""


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

    Nothing is written unless every frame relaxed to finite positions; the
    output appears whole (written to a temporary file, then renamed).

    Raises:
        FileNotFoundError: the input or model is missing.
        UnreadableInputError: the input cannot be read, or holds no structures.
        OutputFormatError: the output format is unknown, not writable, or holds
            one structure while the input has several (checked before relaxing).
        OutputIsInputError, OutputNotWritableError: the output is the input
            file or the model, or cannot be created (checked before relaxing).
        UnknownElementError, StructureError: a frame the model cannot evaluate
            (checked for every frame before anything is relaxed or written);
            frames outside the training domain give an ``OutOfDomainWarning``.
        NonFiniteResultError: the model gave NaN or infinite results for a frame.
        ValueError: an unknown optimizer.
    """
    from ase_bptt.calculator import BPTTCalculator
    from ase_bptt.models.checkpoint import atomic_write

    if optimizer not in ("learned", "fire"):
        raise ValueError(f"unknown optimizer {optimizer!r}: use learned or fire")
    src = Path(input_path)
    if not src.exists():
        raise FileNotFoundError(f"input file {src} does not exist")
    if not Path(model).exists():
        raise FileNotFoundError(f"model checkpoint {model} does not exist")
    out = Path(output_path)
    check_not_inputs(
        [(out, "the relaxed structures")], [(src, "the input"), (model, "the model")], option="-o/--output"
    )
    out_format = _output_format(out, output_format)
    check_writable_output(out, option="-o/--output")
    images = read_structures(src, input_format)
    if len(images) > 1 and ioformats[out_format].single:
        raise OutputFormatError(
            f"{out}: the {out_format} format holds one structure, but {src} has {len(images)}; write them all "
            "to a multi-frame file (e.g. -o relaxed.extxyz or -o relaxed.traj) or give one structure"
        )
    calc = BPTTCalculator(Path(model), device=resolve_device(device), dtype=resolve_dtype(dtype))
    for i, atoms in enumerate(images):
        calc.check_structure(atoms, where=f"{src} (frame {i}, {atoms.get_chemical_formula()})")
    if optimizer == "learned" and not calc.relax_settings:
        raise NoStepRuleError(
            f"{model} stores no step rule (relax settings); relax with --optimizer fire, or fine-tune it first"
        )
    if steps is None:
        relax = calc.relax_settings or {}
        steps = int(relax.get("max_steps") or DEFAULT_MAX_STEPS) if optimizer == "learned" else DEFAULT_FIRE_STEPS
    done = [
        _relax_frame(atoms, calc, optimizer, fmax=fmax, steps=steps, index=i, where=src)
        for i, atoms in enumerate(_progress(images, enabled=progress, desc=f"relax ({optimizer})"))
    ]
    frames = images[0] if len(images) == 1 else images
    atomic_write(out, lambda tmp: ase.io.write(tmp, frames, format=out_format))
    return done


def _relax_frame(atoms, calc, optimizer: str, *, fmax: float, steps: int, index: int, where: Path) -> RelaxedStructure:
    """Relax one frame in place with ``calc`` and freeze its own energy and forces on it."""
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.optimize import FIRE

    from ase_bptt.models.domain import NonFiniteResultError
    from ase_bptt.relax.optimizer import LearnedStepOptimizer

    start = atoms.get_positions()
    atoms.calc = calc
    try:
        opt = FIRE(atoms, logfile=None) if optimizer == "fire" else LearnedStepOptimizer(atoms, logfile=None)
        converged = bool(opt.run(fmax=fmax, steps=steps) if optimizer == "fire" else opt.run(steps=steps))
        forces = atoms.get_forces()
        if not np.isfinite(atoms.positions).all():
            raise NonFiniteResultError(f"the {optimizer} optimizer moved atoms to non-finite positions")
    except NonFiniteResultError as e:
        raise NonFiniteResultError(f"{where} (frame {index}): {e}; nothing was written") from None
    energy = atoms.calc.results.get("energy")
    # The calculator is shared by all frames: freeze this frame's results so
    # the output file carries its own energy and forces.
    atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces.copy())
    moved = atoms.get_positions() - start
    return RelaxedStructure(
        index=index,
        formula=atoms.get_chemical_formula(),
        n_atoms=len(atoms),
        steps=int(opt.nsteps),
        converged=converged,
        fmax=float(np.linalg.norm(forces, axis=1).max()),
        displacement_rms=float(np.sqrt((moved**2).sum(axis=1).mean())),
    )


def read_structures(path: Path, input_format: str | None = None) -> list:
    """Every frame of ``path`` (``ase.io.read(..., index=":")``), or one :class:`UnreadableInputError` line.

    ase.io's readers fail in many ways on a damaged or mislabelled file
    (XYZError, RuntimeError, AssertionError, UnicodeDecodeError, ...): each
    becomes one error naming the file, the format tried and what to do.
    """
    try:
        fmt = input_format or filetype(str(path))
    except UnknownFileTypeError:
        raise UnreadableInputError(
            f"{path}: cannot tell its format from its name or content; name it with --input-format "
            f"(any ase.io format, e.g. {_COMMON_FORMATS})"
        ) from None
    if fmt not in ioformats or not ioformats[fmt].can_read:
        raise UnreadableInputError(
            f"{path}: {fmt!r} is not a format ase.io can read; give --input-format one that it can "
            f"(e.g. {_COMMON_FORMATS})"
        )
    try:
        images = ase.io.read(path, index=":", format=fmt)
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise
    except Exception as e:  # noqa: BLE001 - each ase.io reader has its own exceptions for a bad file
        detail = str(e).strip().splitlines()[0] if str(e).strip() else "no detail"
        raise UnreadableInputError(
            f"{path}: cannot be read as {fmt} ({type(e).__name__}: {detail}); check that it is a complete "
            f"{fmt} file, or name its real format with --input-format (e.g. {_COMMON_FORMATS})"
        ) from None
    if not images or any(len(a) == 0 for a in images):
        raise UnreadableInputError(f"{path}: read as {fmt}, it holds no structure with atoms; check the file")
    return list(images)


def _output_format(out: Path, output_format: str | None) -> str:
    """The ase.io format ``out`` will be written in, checked before anything is relaxed."""
    try:
        fmt = output_format or filetype(str(out), read=False)
    except UnknownFileTypeError:
        fmt = ""  # no suffix ase.io knows
    if fmt not in ioformats:
        given = f"--output-format {fmt}" if output_format else f"the name {out.name}"
        raise OutputFormatError(
            f"{out}: ase.io has no format {fmt!r} (from {given}), so the output cannot be written; use a known suffix (.extxyz, .traj, .cif, "
            f".xyz, or the name CONTCAR/POSCAR) or name an ase.io format with --output-format "
            f"(e.g. {_COMMON_FORMATS})"
        )
    if not ioformats[fmt].can_write:
        raise OutputFormatError(
            f"{out}: ase.io reads {fmt} but cannot write it; choose another output (e.g. {_COMMON_FORMATS})"
        )
    return fmt
