"""Reference steps saved: each method's final structures refined with the reference calculator (``--refine-with``).

A pre-relaxation is paid back in the reference's ionic steps (DFT's): from each
method's final structure, the reference calculator (any ``--baseline`` spec:
``sw``, ``emt``, ``chgnet``, ``module:Class[,key=value]``, so a user's own DFT
calculator too) and an ASE optimizer (FIRE by default) relax on to ``fmax``.
:func:`refine` records, per method and structure, the steps that took, whether
it reached ``fmax``, and where it ended against the reference relaxed structure
(Dq and the RMS per-atom distance after refinement: a method whose refinement
ends at the reference landed in the reference's basin). Each method is also
compared, structure by structure, with refining the initial structure (doing
nothing first) and the pretrained model's ASE FIRE result
(:func:`~ase_bptt.evaluation.compare.ratio_stats` of the steps).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ase_bptt import metrics
from ase_bptt.errors import AseBpttError
from ase_bptt.evaluation.baselines import Baseline, parse_baseline
from ase_bptt.evaluation.compare import ratio_stats
from ase_bptt.evaluation.split import EvalSplit
from ase_bptt.relax.defaults import DEFAULT_FMAX, REFINE_STEPS
from ase_bptt.relax.defaults import REFINE_OPTIMIZERS as OPTIMIZERS

__all__ = ["Refinement", "RefineError", "parse_refinement", "refine", "OPTIMIZERS"]


class RefineError(AseBpttError, ValueError):
    """A ``--refine-*`` option that cannot be used; the message names it."""


@dataclass(frozen=True)
class Refinement:
    """How final structures are refined: the reference ``calculator``, an ASE ``optimizer`` name, the force
    criterion ``fmax`` (eV/A) and the step limit ``steps``."""

    calculator: Baseline
    optimizer: str = "FIRE"
    fmax: float = DEFAULT_FMAX
    steps: int = REFINE_STEPS


def parse_refinement(
    spec: str | Baseline, *, optimizer: str = "FIRE", fmax: float = DEFAULT_FMAX, steps: int = REFINE_STEPS
) -> Refinement:
    """The :class:`Refinement` of ``--refine-with SPEC`` and its options, checked before anything runs.

    Raises:
        RefineError: a bad optimizer, fmax or step limit.
        BaselineError: ``spec`` is no calculator (the message names ``--refine-with``).
    """
    if optimizer not in OPTIMIZERS:
        raise RefineError(f"--refine-optimizer {optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
    if not (fmax > 0 and math.isfinite(fmax)):
        raise RefineError(f"--refine-fmax must be a positive force in eV/A, got {fmax}")
    if steps < 1:
        raise RefineError(f"--refine-steps must be at least 1, got {steps}")
    return Refinement(parse_baseline(spec, option="--refine-with"), optimizer, float(fmax), int(steps))


def _relax(refinement: Refinement, atoms, calculator) -> tuple[np.ndarray, int, bool]:
    """Refine one structure: its final positions, the steps taken and whether ``fmax`` was reached."""
    import ase.optimize

    atoms.calc = calculator
    opt = getattr(ase.optimize, refinement.optimizer)(atoms, logfile=None)
    converged = bool(opt.run(fmax=refinement.fmax, steps=refinement.steps))
    return atoms.get_positions(), int(opt.nsteps), converged


def refine(
    refinement: Refinement,
    split: EvalSplit,
    starts: Mapping[tuple[str, str], torch.Tensor],
    *,
    labels: Mapping[tuple[str, str], str],
    initial: tuple[str, str],
    pretrained_fire: tuple[str, str] | None,
    progress: Callable = iter,
) -> dict[str, Any]:
    """Refine every method's final structures with the reference (see the module doc).

    Args:
        refinement: calculator, optimizer, fmax and step limit.
        split: the evaluated structures and their references.
        starts: ``{(model, method key): final positions (S, N, 3)}`` of each method to refine.
        labels: the row label of each method (as the report's main table shows it).
        initial: the key of ``starts`` that holds the initial structures.
        pretrained_fire: the key of the pretrained model's ASE FIRE result (None without one).

    Returns:
        ``{"calculator", "optimizer", "fmax", "max_steps", "methods": [...]}``; each method:
        ``model``, ``method``, ``label``, per structure ``steps``, ``converged``, ``dq_after``,
        ``rms_after`` (A), the ``steps`` ``mean`` / ``median`` / ``per_label``, and ``vs_initial`` /
        ``vs_pretrained_fire`` (ratio statistics of the steps).
    """
    calculator = refinement.calculator.calculator()
    methods = []
    for key, positions in starts.items():
        steps, converged, final = [], [], torch.zeros_like(positions)
        for i, atoms0 in enumerate(progress(split.initial, desc=f"refine {labels[key]}")):
            atoms = atoms0.copy()
            atoms.positions = positions[i, : len(atoms)].numpy()
            pos, n, ok = _relax(refinement, atoms, calculator)
            final[i, : len(atoms)] = torch.from_numpy(pos)
            steps.append(n)
            converged.append(ok)
        after = metrics.dq(final, split.relaxed64, split.batch64).tolist()
        rms = metrics.rms_distance(final, split.relaxed64, split.batch64).tolist()
        methods.append(
            {
                "model": key[0],
                "method": key[1],
                "label": labels[key],
                "steps": steps,
                "converged": converged,
                "dq_after": after,
                "rms_after": rms,
                **_step_summary(steps, split.labels),
            }
        )
    by_key = {(m["model"], m["method"]): m for m in methods}
    for m in methods:
        m["vs_initial"] = ratio_stats(m["steps"], by_key[initial]["steps"])
        if pretrained_fire is not None:
            m["vs_pretrained_fire"] = ratio_stats(m["steps"], by_key[pretrained_fire]["steps"])
    return {
        "calculator": refinement.calculator.name,
        "optimizer": refinement.optimizer,
        "fmax": refinement.fmax,
        "max_steps": refinement.steps,
        "methods": methods,
    }


def _step_summary(steps: Sequence[int], labels: Sequence[str]) -> dict[str, Any]:
    per_label: dict[str, list[int]] = {}
    for n, lab in zip(steps, labels):
        per_label.setdefault(lab, []).append(n)
    return {
        "steps_mean": float(np.mean(steps)),
        "steps_median": float(statistics.median(steps)),
        "per_label": {
            lab: {"mean": float(np.mean(v)), "median": float(statistics.median(v)), "n": len(v)}
            for lab, v in sorted(per_label.items())
        },
    }
