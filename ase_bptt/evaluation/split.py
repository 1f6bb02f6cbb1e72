"""The structures ``evaluate`` scores, and how one method's final structures become a report entry.

Every method (ASE FIRE, fixed steps, a model's own rule, a baseline
calculator) ends with final positions ``(S, N, 3)``; :func:`method_entry`
turns them into the same dict: the structure error (Dq or MSE) per structure,
its mean/median per label, and the *correct basin* fraction (the share of
structures ending within :data:`~ase_bptt.metrics.CORRECT_BASIN_RMS` A RMS
per atom of the reference).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import median
from typing import Any

import numpy as np
import torch

from ase_bptt import metrics
from ase_bptt.batch import Batch
from ase_bptt.models.base import UnknownElementError
from ase_bptt.runs.errors import EmptySplitError

__all__ = [
    "EvalSplit",
    "load_split",
    "evaluable",
    "unknown_species",
    "summary",
    "method_entry",
    "structure_errors",
    "force_errors",
    "selection_split",
    "unique_stems",
]


@dataclass
class EvalSplit:
    """The evaluated structures: ASE frames plus a float64 Batch for metrics."""

    name: str
    traj_ids: list[str]
    labels: list[str]
    initial: list  # list[Atoms]
    batch64: Batch  # initial structures, float64, CPU
    relaxed64: torch.Tensor  # (B, N, 3) reference relaxed positions
    relaxed: list  # list[Atoms], the reference relaxed frames

    def __len__(self) -> int:
        return len(self.initial)

    def subset(self, keep: Sequence[int]) -> EvalSplit:
        """The same split restricted to the structures at indices ``keep`` (in order)."""
        return _make_split(
            self.name,
            [self.traj_ids[i] for i in keep],
            [self.labels[i] for i in keep],
            [self.initial[i] for i in keep],
            [self.relaxed[i] for i in keep],
        )


def _make_split(name: str, traj_ids: list[str], labels: list[str], initial: list, relaxed: list) -> EvalSplit:
    return EvalSplit(
        name=name,
        traj_ids=traj_ids,
        labels=labels,
        initial=initial,
        batch64=Batch.from_atoms(initial, dtype=torch.float64),
        relaxed64=Batch.from_atoms(relaxed, dtype=torch.float64, constraints=False).positions,
        relaxed=relaxed,
    )


def load_split(db, split: str) -> EvalSplit:
    """The converged trajectories of ``split``: initial frames and reference relaxed frames."""
    trajs = db.trajectories(split=split, converged_only=True)
    if not trajs:
        raise EmptySplitError(
            f"split {split!r} of {getattr(db, 'name', db)} has no converged trajectories: "
            "assign splits (ase-bptt import/generate do) or evaluate another --split"
        )
    return _make_split(
        split,
        [str(t.traj_id) for t in trajs],
        [str(t.label) if t.label is not None else "unlabelled" for t in trajs],
        [t.frames[0].copy() for t in trajs],
        [t.frames[-1] for t in trajs],
    )


def unknown_species(model, atoms) -> str | None:
    """Why ``model`` cannot evaluate ``atoms`` (an element it was not trained on), or None."""
    try:
        model.check_species(atoms.numbers, where="the structure")
    except UnknownElementError as exc:
        return str(exc)
    return None


def evaluable(split: EvalSplit, models: Mapping[str, Any]) -> tuple[EvalSplit, list[dict[str, str]]]:
    """``split`` without the structures some model has not seen the species of, and those structures with why."""
    keep, skipped = [], []
    for i, atoms in enumerate(split.initial):
        reasons = [f"{name}: {r}" for name, m in models.items() if (r := unknown_species(m, atoms)) is not None]
        if reasons:
            skipped.append({"traj_id": split.traj_ids[i], "label": split.labels[i], "reason": "; ".join(reasons)})
        else:
            keep.append(i)
    return (split.subset(keep) if keep else split), skipped


def summary(values: Sequence[float], labels: Sequence[str]) -> dict[str, Any]:
    """mean / median / per-label {mean, median, n} of per-structure values."""
    per_label: dict[str, list[float]] = {}
    for v, lab in zip(values, labels):
        per_label.setdefault(lab, []).append(v)
    return {
        "mean": float(np.mean(values)),
        "median": float(median(values)),
        "per_label": {
            lab: {"mean": float(np.mean(v)), "median": float(median(v)), "n": len(v)}
            for lab, v in sorted(per_label.items())
        },
    }


def _fraction(flags: Sequence[bool], labels: Sequence[str]) -> dict[str, Any]:
    per_label: dict[str, list[bool]] = {}
    for f, lab in zip(flags, labels):
        per_label.setdefault(lab, []).append(f)
    return {
        "fraction": float(np.mean(flags)),
        "per_label": {lab: float(np.mean(v)) for lab, v in sorted(per_label.items())},
    }


def structure_errors(split: EvalSplit, final: torch.Tensor, metric: str) -> list[float]:
    """Per-structure error (``"dq"`` or ``"mse"``) of final positions ``(S, N, 3)`` against the references."""
    fn = {"dq": metrics.dq, "mse": metrics.mse}.get(metric)
    if fn is None:
        raise ValueError(f"unknown metric {metric!r}: use dq or mse")
    return fn(final.detach().to("cpu", torch.float64), split.relaxed64, split.batch64).tolist()


def method_entry(
    split: EvalSplit,
    final: torch.Tensor,
    *,
    metric: str,
    basin_rms: float,
    frames: torch.Tensor | None = None,
    converged: torch.Tensor | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One method's report entry from its final positions ``(S, N, 3)`` on ``split``.

    Keys: ``dq`` (summary of the structure error, whichever metric),
    ``per_structure``, ``rms_distance`` (A, per structure), ``correct_basin``
    ({threshold, fraction, per_label}), and ``frames_mean`` /
    ``converged_fraction`` when ``frames`` / ``converged`` are given.
    """
    final64 = final.detach().to("cpu", torch.float64)
    values = structure_errors(split, final64, metric)
    rms = metrics.rms_distance(final64, split.relaxed64, split.batch64).tolist()
    in_basin = metrics.correct_basin(final64, split.relaxed64, split.batch64, basin_rms).tolist()
    entry: dict[str, Any] = {
        **extra,
        "dq": summary(values, split.labels),
        "per_structure": values,
        "rms_distance": rms,
        "correct_basin": {"threshold": basin_rms, **_fraction(in_basin, split.labels)},
    }
    if frames is not None:
        entry["frames_mean"] = float(frames.double().mean())
    if converged is not None:
        entry["converged_fraction"] = float(converged.double().mean())
    return entry


def force_errors(model, db, split: str, *, batch_size: int, device, dtype, progress: Callable = iter) -> dict[str, Any]:
    """Force (and energy) errors of ``model`` on every frame of the split's trajectories.

    All trajectories count here, converged or not: every frame carries
    reference forces even when its relaxation did not finish.
    """
    trajs = db.trajectories(split=split, converged_only=False)
    frames = [a for t in trajs if unknown_species(model, t.frames[0]) is None for a in t.frames]
    if not frames:
        return {"n_frames": 0, "mae": None, "rmse": None, "l2": None, "energy_mae_mev_per_atom": None}
    sums = {"abs": 0.0, "sq": 0.0, "components": 0, "l2": 0.0, "e_abs_per_atom": 0.0, "e_frames": 0}
    with torch.no_grad():
        for start in progress(range(0, len(frames), batch_size)):
            chunk = frames[start : start + batch_size]
            batch = Batch.from_atoms(chunk, device=device, dtype=dtype, constraints=False)
            out = model(batch)
            b64 = batch.to(device="cpu", dtype=torch.float64)
            ref = torch.zeros_like(b64.positions)
            for i, a in enumerate(chunk):
                ref[i, : len(a)] = torch.from_numpy(np.asarray(a.calc.results["forces"], dtype=np.float64))
            err = metrics.force_errors(out.forces.detach().to("cpu", torch.float64), ref, b64)
            n_comp = (3 * b64.n_atoms).to(torch.float64)
            sums["abs"] += float((err["mae"] * n_comp).sum())
            sums["sq"] += float((err["rmse"] ** 2 * n_comp).sum())
            sums["components"] += int(n_comp.sum())
            sums["l2"] += float(err["l2"].sum())
            if out.energy is not None:
                for i, a in enumerate(chunk):
                    e_ref = a.calc.results.get("energy")
                    if e_ref is not None:
                        sums["e_abs_per_atom"] += abs(float(out.energy[i]) - float(e_ref)) / len(a)
                        sums["e_frames"] += 1
    n = max(sums["components"], 1)
    return {
        "n_frames": len(frames),
        "mae": sums["abs"] / n,
        "rmse": math.sqrt(sums["sq"] / n),
        "l2": sums["l2"] / max(len(frames), 1),
        "energy_mae_mev_per_atom": 1000 * sums["e_abs_per_atom"] / sums["e_frames"] if sums["e_frames"] else None,
    }


def selection_split(database, split: str, select_eta_on: str | None, models) -> tuple[EvalSplit | None, str | None]:
    """The split the honest fixed-step eta is chosen on, and what to tell the user when it is not ``select_eta_on``.

    ``select_eta_on`` first, then train; a split that is the evaluated one,
    empty, or holds no structure the checkpoints can evaluate is passed over,
    and saying so (in the console and the report) is the caller's job.
    """
    if select_eta_on is None:
        return None, None
    passed: list[str] = []
    for candidate in dict.fromkeys([select_eta_on, "train"]):
        if candidate == split:
            passed.append(f"{candidate} is the evaluated split")
            continue
        try:
            selection, skipped = evaluable(load_split(database, candidate), models)
        except EmptySplitError:
            passed.append(f"the {candidate} split has no converged trajectories")
            continue
        if len(skipped) < len(selection):
            note = None if candidate == select_eta_on else f"{passed[0]}: the fixed-step eta is chosen on {candidate}"
            return selection, note
        passed.append(f"no structure of the {candidate} split can be evaluated")
    return (
        None,
        f"{'; '.join(passed)}: no fixed-step baseline with an eta chosen on another split (only the one chosen on "
        f"{split} itself, perfect information)",
    )


def unique_stems(paths: Sequence[Path]) -> list[str]:
    """Display names of checkpoints: their file stems, or the whole paths when two stems are the same."""
    stems = [p.stem for p in paths]
    if len(set(stems)) == len(stems):
        return stems
    return [str(p) for p in paths]
