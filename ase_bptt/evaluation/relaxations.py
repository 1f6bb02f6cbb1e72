"""The relaxations ``evaluate`` scores: batched torch rollouts (the fixed-step grid, a checkpoint's stored
relaxation) and the progress bars they show. ASE FIRE, one structure at a time, is
:func:`ase_bptt.evaluation.baselines.fire_relax_all`."""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from ase_bptt.batch import Batch
from ase_bptt.evaluation.split import EvalSplit, method_entry

__all__ = ["progress_bar", "rollout_all", "eta_curves", "best_point", "stored_relaxation", "rule_name"]


def progress_bar(iterable: Iterable, *, enabled: bool, desc: str, total: int | None = None):
    """A tqdm bar on stderr that disappears when done."""
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, disable=not enabled, file=sys.stderr, leave=False, dynamic_ncols=True)


def rollout_all(
    model,
    initial: Sequence,
    rule,
    *,
    tol: float | None,
    max_steps: int,
    fmax: float | None,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batched no-grad rollouts of the structures ``initial`` (Atoms).

    Returns final positions ``(S, N_max, 3)`` (float64, CPU, zero padded),
    frames taken ``(S,)`` and converged ``(S,)``.
    """
    from ase_bptt.relax.relaxer import rollout

    n_max = max(len(a) for a in initial)
    positions = torch.zeros(len(initial), n_max, 3, dtype=torch.float64)
    n_frames = torch.zeros(len(initial), dtype=torch.long)
    converged = torch.zeros(len(initial), dtype=torch.bool)
    for start in range(0, len(initial), batch_size):
        chunk = initial[start : start + batch_size]
        idx = torch.arange(start, start + len(chunk))
        batch = Batch.from_atoms(chunk, device=device, dtype=dtype)
        with torch.no_grad():
            res = rollout(model, batch, rule, tol=tol, max_steps=max_steps, fmax=fmax)
        n = res.positions.shape[1]
        positions[idx, :n] = res.positions.detach().to("cpu", torch.float64)
        n_frames[idx] = res.n_frames.to("cpu")
        converged[idx] = res.converged.to("cpu")
    return positions, n_frames, converged


def eta_curves(
    model,
    splits: Sequence[EvalSplit],
    grid: Sequence[float],
    *,
    tol: float,
    max_steps: int,
    maxstep: float,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
    entry_kw: Mapping[str, Any],
    progress: bool,
    desc: str,
) -> tuple[list[list[dict[str, Any]]], dict[float, torch.Tensor]]:
    """Fixed-step rollouts over the eta grid: one curve of method entries per split, and the final positions
    of the first split per eta (what a refinement starts from).

    The splits' structures are rolled out together (fuller batches, fewer
    model calls); each structure's rollout is independent of its batch mates.
    """
    from ase_bptt.relax.steps import FixedStep

    initial = [a for sp in splits for a in sp.initial]
    curves: list[list[dict[str, Any]]] = [[] for _ in splits]
    finals: dict[float, torch.Tensor] = {}
    for eta in progress_bar(grid, enabled=progress, desc=desc):
        rule = FixedStep(float(eta), maxstep=maxstep).to(device=device, dtype=dtype)
        pos, frames, conv = rollout_all(
            model,
            initial,
            rule,
            tol=tol,
            max_steps=max_steps,
            fmax=None,
            batch_size=batch_size,
            device=device,
            dtype=dtype,
        )
        start = 0
        for k, (sp, curve) in enumerate(zip(splits, curves)):
            sl = slice(start, start + len(sp))
            n = sp.batch64.positions.shape[1]
            if k == 0:
                finals[float(eta)] = pos[sl, :n]
            curve.append(
                method_entry(sp, pos[sl, :n], frames=frames[sl], converged=conv[sl], eta=float(eta), **entry_kw)
            )
            start += len(sp)
    return curves, finals


def best_point(curve: list[dict[str, Any]]) -> dict[str, Any]:
    """The eta-curve point with the lowest mean; a diverged rollout (inf/nan) is worse than anything finite."""
    return min(curve, key=lambda p: p["dq"]["mean"] if math.isfinite(p["dq"]["mean"]) else math.inf)


def stored_relaxation(checkpoint: Mapping[str, Any]):
    """The relaxation a checkpoint stores: ``(rule, tol, max_steps, fmax)``, or None when it has none."""
    relax = checkpoint.get("relax")
    if not relax:
        return None
    from ase_bptt.relax.steps import rule_from_relax_settings

    rule, tol, max_steps = rule_from_relax_settings(dict(relax))
    return rule, tol, max_steps, relax.get("fmax")


def rule_name(rule, fmax: float | None = None) -> str:
    """How a report names a stored relaxation: the rule, its eta, and the force criterion it stops at."""
    name = type(rule).__name__
    eta = getattr(rule, "eta", None)
    if eta is not None and not callable(eta):
        try:
            name = f"{name}, eta {float(eta):.4g}"
        except (TypeError, ValueError):
            pass
    return f"{name}, fmax {fmax:g}" if fmax is not None else name
