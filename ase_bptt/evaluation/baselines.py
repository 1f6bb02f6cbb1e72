"""What users would relax with instead: ASE FIRE with any ASE calculator, as rows of ``evaluate``.

A baseline is written like ``generate --reference``, plus calculator keyword
arguments: ``NAME|module:Class[,key=value...]``, e.g. ``emt``, ``sw``,
``chgnet``, ``chgnet,model_name=r2scan`` or ``mypkg.calc:MyCalc,cutoff=5``.
Names and ``module:Class`` are resolved by
:func:`ase_bptt.data.recipes.resolve_reference`; ``chgnet`` is the universal
MLIP CHGNet (optional extra ``ase-bptt[chgnet]``), whose wheel ships its
pretrained weights, so it runs without network access.

:func:`fire_relax_all` is also how ``evaluate`` runs ASE FIRE with a
checkpoint (through :class:`~ase_bptt.calculator.BPTTCalculator`): the
baseline rows and the model's FIRE rows share one code path and one fmax and
step limit.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ase_bptt.data.recipes import MissingDependencyError, resolve_reference
from ase_bptt.errors import AseBpttError

__all__ = ["Baseline", "BaselineError", "parse_baseline", "chgnet_calculator", "fire_relax_all", "run_baseline"]


class BaselineError(AseBpttError, ValueError):
    """A ``--baseline`` specification that cannot be turned into an ASE calculator."""


@dataclass(frozen=True)
class Baseline:
    """An ASE calculator to relax the evaluated structures with, and the name its row shows."""

    name: str
    factory: Callable[..., Any]
    options: dict[str, Any] = field(default_factory=dict)

    def calculator(self):
        """A fresh calculator instance."""
        return self.factory(**self.options)


def chgnet_calculator(model_name: str = "0.3.0", use_device: str = "cpu", **kwargs: Any):
    """CHGNet's ASE calculator with the pretrained weights its wheel ships (no download).

    ``CHGNet.load`` reads ``chgnet/pretrained/<version>/*.pth.tar`` from the
    installed package. CHGNet prints its device on stdout; that line goes to
    stderr here so ``evaluate``'s table stays clean.
    """
    try:
        from chgnet.model import CHGNet
        from chgnet.model.dynamics import CHGNetCalculator
    except ImportError as exc:
        raise MissingDependencyError(
            "--baseline chgnet needs the chgnet package: pip install 'ase-bptt[chgnet]'"
        ) from exc
    with contextlib.redirect_stdout(sys.stderr):
        model = CHGNet.load(model_name=model_name, use_device=use_device, verbose=False)
        return CHGNetCalculator(model, use_device=use_device, **kwargs)


#: Named baselines beyond the references ``generate`` knows.
NAMED_BASELINES: dict[str, Callable[..., Any]] = {"chgnet": chgnet_calculator}


def _option(item: str, spec: str, option: str) -> tuple[str, Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key.isidentifier():
        raise BaselineError(f"{option} {spec!r}: {item!r} is not key=value, e.g. {option} chgnet,model_name=0.3.0")
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw


def parse_baseline(spec: str | Baseline, *, option: str = "--baseline") -> Baseline:
    """Turn ``NAME|module:Class[,key=value...]`` into a :class:`Baseline`; errors name ``option``.

    The calculator is created once here (and thrown away), so a wrong class,
    a bad keyword or a missing optional package fails before anything runs.

    Raises:
        BaselineError: unknown name, unimportable class, bad key=value, or the
            calculator cannot be created with these options.
        MissingDependencyError: the package behind a named baseline (chgnet,
            matscipy for sw/tersoff) is not installed.
    """
    if isinstance(spec, Baseline):
        return spec
    head, *items = [part.strip() for part in str(spec).split(",")]
    options = dict(_option(item, spec, option) for item in items if item)
    if head.lower() in NAMED_BASELINES:
        factory: Callable[..., Any] = NAMED_BASELINES[head.lower()]
    else:
        try:
            factory, _ = resolve_reference(head)
        except (ValueError, TypeError) as exc:
            raise BaselineError(f"{option} {spec!r}: {exc}") from None
    baseline = Baseline(name=str(spec).strip(), factory=factory, options=options)
    try:
        baseline.calculator()
    except (TypeError, ValueError) as exc:
        raise BaselineError(f"{option} {spec!r}: cannot create the calculator: {exc}") from None
    return baseline


def fire_relax_all(
    calculator,
    initial: Sequence,
    *,
    fmax: float,
    steps: int,
    progress: Callable = iter,
    renew: Callable[[], Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str | None]]:
    """ASE FIRE with ``calculator`` on each structure of ``initial``, one at a time, as a user would relax.

    ``renew()`` replaces the calculator after it raised: a calculator can be
    left half-initialised by a failure (ASE's EMT is), and must not spoil the
    next structure.

    Returns:
        ``(final, n_steps, converged, failures)``: final positions ``(S,
        N_max, 3)`` (float64, zero padded), steps taken ``(S,)``, whether fmax
        was reached ``(S,)``, and per structure None or why it could not be
        relaxed (the calculator raised, or the positions became non-finite).
    """
    from ase.optimize import FIRE

    n_max = max(len(a) for a in initial)
    final = torch.zeros(len(initial), n_max, 3, dtype=torch.float64)
    n_steps = torch.zeros(len(initial), dtype=torch.long)
    converged = torch.zeros(len(initial), dtype=torch.bool)
    failures: list[str | None] = [None] * len(initial)
    for i, atoms0 in enumerate(progress(initial)):
        atoms = atoms0.copy()
        atoms.calc = calculator
        opt = FIRE(atoms, logfile=None)
        try:
            converged[i] = bool(opt.run(fmax=fmax, steps=steps))
        except Exception as exc:  # any calculator's failure on one structure is reported, not fatal
            failures[i] = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
            if renew is not None:
                calculator = renew()
            continue
        positions = atoms.get_positions()
        if not np.isfinite(positions).all():
            failures[i] = "the relaxation gave non-finite positions"
            continue
        n_steps[i] = int(opt.nsteps)
        final[i, : len(atoms)] = torch.from_numpy(positions)
    return final, n_steps, converged, failures


def run_baseline(
    baseline: Baseline, split, *, fmax: float, steps: int, entry: Callable[..., dict[str, Any]], progress: Callable
) -> dict[str, Any]:
    """The report entry of ``baseline`` on ``split`` (an :class:`~ase_bptt.evaluation.split.EvalSplit`).

    ``entry(split, final, frames=, converged=, **extra)`` builds the method
    entry; it is called on the structures the calculator could relax, and
    ``per_structure`` / ``rms_distance`` are then spread back over the whole
    split with None where it could not (listed under ``failed``).
    """
    calc = baseline.calculator()
    final, n_steps, conv, failures = fire_relax_all(
        calc, split.initial, fmax=fmax, steps=steps, progress=progress, renew=baseline.calculator
    )
    ok = [i for i, f in enumerate(failures) if f is None]
    info = {
        "name": baseline.name,
        "calculator": type(calc).__name__,
        "fmax": fmax,
        "max_steps": steps,
        "n_evaluated": len(ok),
        "failed": [
            {"traj_id": split.traj_ids[i], "label": split.labels[i], "reason": f}
            for i, f in enumerate(failures)
            if f is not None
        ],
    }
    if not ok:
        return {**info, "dq": None, "per_structure": [None] * len(split), "rms_distance": [None] * len(split)}
    idx = torch.tensor(ok)
    evaluated = split.subset(ok)
    n = evaluated.batch64.positions.shape[1]
    result = entry(evaluated, final[idx, :n], frames=n_steps[idx], converged=conv[idx], **info)
    result["steps_mean"] = result["frames_mean"]
    for key in ("per_structure", "rms_distance"):
        spread: list[float | None] = [None] * len(split)
        for j, i in enumerate(ok):
            value = result[key][j]
            spread[i] = value if math.isfinite(value) else None
        result[key] = spread
    return result
